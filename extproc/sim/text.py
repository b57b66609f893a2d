"""Deterministic text generation and token counting for the simulator.

Everything here is a pure function of its inputs, so the same request always
yields the same reply and the same usage numbers. That lets tests compare a
streamed reply with the non-streamed one, and check the usage a gateway reports.

Tokenizer rule (the simulator's stand-in for a real BPE tokenizer):
  a token is a run of word characters (``\\w+``, Unicode-aware) or one single
  character that is neither a word character nor whitespace. Whitespace is
  never a token. ``"Hello, world!"`` is 4 tokens: ``Hello`` ``,`` ``world`` ``!``.

Prompt rule for chat: every message costs ``MESSAGE_OVERHEAD`` tokens plus the
tokens of its text (string content, the ``text`` of ``{"type": "text"}`` parts,
its ``name``, and the name and arguments of any ``tool_calls``). Non-text parts
(images, audio) cost nothing.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
MESSAGE_OVERHEAD = 4
DEFAULT_REPLY_TOKENS = 16
EXCERPT_TOKENS = 8

_FILLER_WORDS = (
    "the", "gateway", "routes", "each", "request", "to", "a", "simulated", "model",
    "which", "answers", "with", "steady", "predictable", "tokens", "so", "tests",
    "can", "check", "usage", "streaming", "and", "latency", "without", "any",
    "network", "access", "or", "real", "provider", "keys", "today",
)


def count_tokens(text: str) -> int:
    """Number of tokens in ``text`` under the simulator's tokenizer rule."""
    return sum(1 for _ in TOKEN_RE.finditer(text))


def call_tokens(name: str, arguments: str) -> int:
    """Output tokens of a tool call, in every simulated API: its name's plus its JSON arguments'."""
    return count_tokens(name) + count_tokens(arguments)


def content_text(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "input_text") and isinstance(p.get("text"), str)
        ]
        return "\n".join(parts)
    return ""


def _message_texts(message: dict[str, Any]) -> Iterable[str]:
    """All texts of one chat message that count towards prompt tokens."""
    yield content_text(message.get("content"))
    name = message.get("name")
    if isinstance(name, str):
        yield name
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                for key in ("name", "arguments"):
                    if isinstance(fn.get(key), str):
                        yield fn[key]


def count_message_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Prompt tokens of a chat request: per-message overhead plus text tokens."""
    return sum(MESSAGE_OVERHEAD + sum(count_tokens(t) for t in _message_texts(m)) for m in messages)


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    """Text of the last user message (or of the last message if none is from a user)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return content_text(messages[-1].get("content")) if messages else ""


def _cut_after_tokens(text: str, k: int) -> tuple[str, bool]:
    """Prefix of ``text`` holding exactly its first ``k`` tokens; flag if tokens remain.

    Cutting at the end of a token match keeps re-tokenisation stable: the next
    character is whitespace or starts a new token, never part of the cut one.
    """
    end = 0
    for i, match in enumerate(TOKEN_RE.finditer(text)):
        if i == k:
            return text[:end], True
        end = match.end()
    return text[:end], False


def _seed(text: str) -> int:
    """Stable seed (unlike ``hash()``, which is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _filler(seed_text: str, words: int) -> str:
    """``words`` pseudo-random filler words in sentences; each word is one token."""
    rng = random.Random(_seed(seed_text))
    out: list[str] = []
    sentence = 0
    for _ in range(words):
        word = rng.choice(_FILLER_WORDS)
        out.append(word.capitalize() if sentence == 0 else word)
        sentence += 1
        if sentence >= 6 and rng.random() < 0.3:
            out[-1] += "."
            sentence = 0
    return " ".join(out)


def reply_text(prompt: str, tokens: int) -> str:
    """Deterministic reply to ``prompt`` that is exactly ``tokens`` tokens long.

    It opens with a phrase echoing the prompt's first words, so a human running
    the demo can see which request was answered, then pads with filler.
    """
    if tokens <= 0:
        return ""
    excerpt, more = _cut_after_tokens(prompt, EXCERPT_TOKENS)
    excerpt = " ".join(excerpt.split())
    if excerpt:
        head = f"This is a simulated reply to: {excerpt}{'...' if more else '.'}"
    else:
        head = "This is a simulated reply."
    text, _ = _cut_after_tokens(f"{head} {_filler(prompt, tokens)}", tokens)
    return text


def split_chunks(text: str, n: int) -> list[str]:
    """Split ``text`` into at most ``n`` pieces on token boundaries.

    The pieces concatenate to ``text`` exactly; each cut sits right after a
    token, so pieces carry leading whitespace (" reply") like real model deltas.
    Token counts differ by at most one; fewer than ``n`` pieces come back only
    when the text has fewer tokens.
    """
    ends = [m.end() for m in TOKEN_RE.finditer(text)]
    if not ends:
        return [text]
    n = max(1, min(n, len(ends)))
    base, extra = divmod(len(ends), n)
    cuts: list[int] = [0]
    index = 0
    for i in range(n - 1):
        index += base + (1 if i < extra else 0)
        cuts.append(ends[index - 1])
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def embedding_vector(seed_text: str, dimensions: int) -> list[float]:
    """Unit-length vector seeded from ``seed_text``, rounded to float32.

    Rounding to float32 makes the float and base64 encodings carry the same numbers.
    """
    rng = random.Random(_seed(seed_text))
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(x / norm for x in raw))
    return list(struct.unpack(f"<{dimensions}f", packed))


def encode_base64_f32(vector: Sequence[float]) -> str:
    """Base64 of little-endian float32, the wire form of ``encoding_format=base64``."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def split_evenly(value: str, n: int) -> list[str]:
    """``value`` in at most ``n`` nearly equal pieces: how the simulators stream a tool call's
    JSON arguments, cut anywhere as the real APIs do."""
    n = max(1, min(n, len(value)))
    size, extra = divmod(len(value), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append(value[start:end])
        start = end
    return pieces
