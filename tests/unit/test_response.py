"""ResponseObserver: what the processor learns from one upstream response, however it is chunked."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.response import BodyKind, ResponseObserver
from extproc.usage import TokenUsage

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "streams"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.sse"))

# Every recorded stream that carries usage, with what the observer must read from it.
EXPECTED: dict[str, tuple[TokenUsage, str]] = {
    "openai_chat_crlf_keepalive.sse": (TokenUsage(14, 27, 41), "gpt-4o-2024-08-06"),
    "openai_chat_include_usage.sse": (
        TokenUsage(input_tokens=1387, output_tokens=203, total_tokens=1590, cached_input_tokens=1280, reasoning_tokens=192),
        "o4-mini-2025-04-16",
    ),
    "openai_chat_non_ascii.sse": (TokenUsage(25, 31, 56), "gpt-4.1-mini-2025-04-14"),
    "openai_chat_usage_in_last_choice_chunk.sse": (TokenUsage(11, 11, 22), "deepseek-chat"),
    "openai_completions.sse": (TokenUsage(9, 16, 25), "gpt-3.5-turbo-instruct:20230824-v2"),
}
USAGE_FIXTURES = sorted(EXPECTED)
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,  # zlib-wrapped
    "br": brotli.compress,
}
LIMIT = 1 << 20


@cache
def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@cache
def compressed(name: str, coding: str) -> bytes:
    return COMPRESSORS[coding](fixture(name))


def split(raw: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Cut raw at the given offsets (repeats and 0/len give empty chunks)."""
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


@st.composite
def chunkings(draw: st.DrawFn, raw: bytes) -> list[bytes]:
    """Any way Envoy might hand `raw` over: random cuts, runs of tiny/empty pieces, or 1-byte pieces."""
    n = len(raw)
    how = draw(st.sampled_from(["cuts", "sizes", "bytes"]))
    if how == "bytes":
        return [raw[i : i + 1] for i in range(n)] + [b""]
    if how == "cuts":
        return split(raw, draw(st.lists(st.integers(0, n), max_size=40)))
    sizes = draw(st.lists(st.sampled_from([0, 0, 1, 1, 2, 3, 5, 13]) | st.integers(0, 600), min_size=1, max_size=120))
    cuts, pos = [], 0
    for size in sizes:
        pos = min(n, pos + size)
        cuts.append(pos)
    return split(raw, cuts)


def observer(
    content_type: str = "text/event-stream",
    encoding: str = "",
    *,
    status: int = 200,
    strip: bool = False,
    collect: bool = False,
    limit: int = LIMIT,
    length: int | None = None,
) -> ResponseObserver:
    obs = ResponseObserver(strip_usage=strip, collect_text=collect, max_json_bytes=limit)
    obs.on_headers(status, content_type, encoding, length)
    return obs


def feed(obs: ResponseObserver, chunks: Sequence[bytes], *, end: bool = True, t0: float = 0.0) -> list[bytes | None]:
    """Feed chunks in order (end_of_stream on the last one); chunk i arrives at time t0 + i."""
    return [obs.on_chunk(c, end and i == len(chunks) - 1, t0 + i) for i, c in enumerate(chunks)]


def client_bytes(chunks: Sequence[bytes], replies: Sequence[bytes | None]) -> bytes:
    """What the client receives: a replacement where one was returned, else the chunk as it was."""
    return b"".join(c if r is None else r for c, r in zip(chunks, replies, strict=True))


def facts(obs: ResponseObserver) -> tuple[Any, ...]:
    return (obs.usage, obs.response_model, obs.complete, obs.error_type)


_BLOCK = re.compile(rb".*?(?:\r\n\r\n|\n\n)", re.S)


def blocks(raw: bytes) -> list[bytes]:
    """The fixture's SSE blocks, each with its blank line (fixtures use one line-end style)."""
    parts = _BLOCK.findall(raw)
    assert b"".join(parts) == raw
    return parts


def block_json(block: bytes) -> Any:
    line = block.strip().split(b"\n")[0].strip()
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
        return None
    return json.loads(line[len(b"data: ") :])


def expected_stripped(raw: bytes) -> bytes:
    """The stream minus the usage-only event, with every `,"usage":null` removed (computed independently)."""
    out = []
    for block in blocks(raw):
        chunk = block_json(block)
        if isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict):
            continue
        out.append(block.replace(b',"usage":null', b""))
    return b"".join(out)


def test_fixture_set_is_known() -> None:
    """Every fixture with usage has expectations here (so the properties below cannot pass vacuously)."""
    with_usage = sorted(n for n in FIXTURE_NAMES if b'"usage":{' in fixture(n))
    assert with_usage == USAGE_FIXTURES
    assert "openai_chat_tool_calls.sse" in FIXTURE_NAMES


# -- SSE: reading -----------------------------------------------------------------


@pytest.mark.parametrize("name", USAGE_FIXTURES)
def test_whole_stream_reads_usage_and_model(name: str) -> None:
    """Fed in one piece, each recorded stream gives its usage (incl. cached/reasoning) and model."""
    obs = observer()
    assert obs.kind is BodyKind.sse
    assert feed(obs, [fixture(name)]) == [None]
    usage, model = EXPECTED[name]
    assert (obs.usage, obs.response_model, obs.complete, obs.error_type) == (usage, model, True, None)


@pytest.mark.parametrize("name", USAGE_FIXTURES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_chunking_reads_the_same(name: str, data: st.DataObject) -> None:
    """However the stream is cut (1-byte pieces, empty chunks), usage/model/complete equal the one-piece read."""
    raw = fixture(name)
    chunks = data.draw(chunkings(raw))
    whole = observer()
    feed(whole, [raw])
    obs = observer()
    replies = feed(obs, chunks)
    assert all(r is None for r in replies)  # not stripping: the client's bytes are never replaced
    assert facts(obs) == facts(whole)
    assert obs.usage == EXPECTED[name][0]


@pytest.mark.parametrize("name", USAGE_FIXTURES)
def test_one_byte_chunks_with_empty_chunks_between(name: str) -> None:
    """The extreme chunking: every byte alone, an empty chunk after each."""
    raw = fixture(name)
    chunks = [piece for i in range(len(raw)) for piece in (raw[i : i + 1], b"")]
    obs = observer()
    assert all(r is None for r in feed(obs, chunks))
    assert (obs.usage, obs.response_model, obs.complete) == (*EXPECTED[name], True)


def _spaced_stream() -> bytes:
    """Events as `json.dumps` writes them (spaces after colons): an error, then usage
    riding on a choice chunk, both after output in the same chunk of bytes."""
    events = [
        {"model": "m-1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None},
        *({"model": "m-1", "choices": [{"index": 0, "delta": {"content": f"w{i}"}}], "usage": None} for i in range(5)),
        {"error": {"message": "overloaded", "type": "server_error"}},
        {"model": "m-2", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}},
    ]
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("raw", [*(fixture(n) for n in [*USAGE_FIXTURES, "openai_chat_tool_calls.sse"]), _spaced_stream()])
@pytest.mark.parametrize("strip", [False, True])
def test_events_arriving_together_read_as_if_each_was_parsed(raw: bytes, strip: bool) -> None:
    """Events of one chunk share an arrival time, so the observer skips parsing those that
    cannot change anything: usage, model, error, completion and output times must equal
    those of an observer that parses every event (collecting text makes it do so)."""
    fast = observer(strip=strip)
    reference = observer(strip=strip, collect=True)
    assert feed(fast, [raw]) == feed(reference, [raw])
    assert facts(fast) == facts(reference)
    assert (fast.first_output_at, fast.last_output_at) == (reference.first_output_at, reference.last_output_at)


def test_spaced_usage_and_error_after_output_are_read() -> None:
    obs = observer()
    feed(obs, [_spaced_stream()])
    assert (obs.usage, obs.error_type, obs.response_model) == (TokenUsage(3, 5, 8), "server_error", "m-1")


def test_stream_without_usage() -> None:
    """A stream the provider sent no usage on leaves usage None but still completes."""
    obs = observer()
    feed(obs, [fixture("openai_chat_tool_calls.sse")])
    assert obs.usage is None
    assert obs.response_model == "gpt-4o-mini-2024-07-18"
    assert obs.complete


def test_first_model_wins() -> None:
    """The response model is the first one the stream names."""
    obs = observer()
    feed(obs, [b'data: {"model":"a","choices":[]}\n\n', b'data: {"model":"b","choices":[]}\n\ndata: [DONE]\n\n'])
    assert obs.response_model == "a"


def test_error_event_in_stream() -> None:
    """An error event mid-stream sets error_type (type, else code)."""
    obs = observer()
    feed(obs, [b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n', b'data: {"error":{"message":"m","type":"server_error"}}\n\n'])
    assert obs.error_type == "server_error"
    obs = observer()
    feed(obs, [b'data: {"error":{"message":"m","type":null,"code":"overloaded"}}\n\n'])
    assert obs.error_type == "overloaded"


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("text/event-stream", BodyKind.sse),
        ("Text/Event-Stream; charset=utf-8", BodyKind.sse),
        ("application/json", BodyKind.json),
        ("application/json; charset=utf-8", BodyKind.json),
        ("APPLICATION/JSON", BodyKind.json),
        ("application/problem+json", BodyKind.json),
        ("text/plain", BodyKind.none),
        ("text/html; charset=utf-8", BodyKind.none),
        ("application/octet-stream", BodyKind.none),
        ("", BodyKind.none),
        ("application/jsonl", BodyKind.none),
    ],
)
def test_body_kind_from_content_type(content_type: str, kind: BodyKind) -> None:
    obs = ResponseObserver(strip_usage=False, collect_text=False, max_json_bytes=LIMIT)
    assert obs.on_headers(200, content_type, "") is kind
    assert obs.kind is kind


def test_unknown_content_type_reads_nothing() -> None:
    """With BodyKind.none even a body full of usage is not read, and nothing is replaced."""
    obs = observer("text/plain", strip=True)
    raw = fixture("openai_chat_include_usage.sse")
    assert feed(obs, [raw[:100], raw[100:]]) == [None, None]
    assert obs.usage is None and obs.response_model is None


# -- SSE: stripping the forced usage event -----------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_strip_usage_any_chunking(name: str, data: st.DataObject) -> None:
    """Stripping: the client gets the stream minus the usage-only event and `,"usage":null`; usage is still read."""
    raw = fixture(name)
    chunks = data.draw(chunkings(raw))
    obs = observer(strip=True)
    received = client_bytes(chunks, feed(obs, chunks))
    assert received == expected_stripped(raw)
    assert b',"usage":null' not in received
    assert received.endswith(b"data: [DONE]" + (b"\r\n\r\n" if b"\r\n" in raw else b"\n\n"))
    assert obs.usage == EXPECTED.get(name, (None,))[0]
    assert obs.complete


def test_strip_usage_drops_exactly_the_usage_only_event() -> None:
    """Only the `"choices":[]` + usage event goes; every content event and [DONE] stay."""
    raw = fixture("openai_chat_include_usage.sse")
    obs = observer(strip=True)
    (received,) = feed(obs, [raw])
    assert received is not None
    assert b'"usage"' not in received and b'"choices":[]' not in received
    assert len(blocks(received)) == len(blocks(raw)) - 1
    assert obs.usage == EXPECTED["openai_chat_include_usage.sse"][0]


def test_strip_keeps_keepalive_comments_byte_for_byte() -> None:
    """Comment blocks (keep-alives, CRLF) pass through untouched, in place."""
    raw = fixture("openai_chat_crlf_keepalive.sse")
    obs = observer(strip=True)
    received = client_bytes([raw], feed(obs, [raw]))
    assert raw.count(b": keep-alive\r\n\r\n") == 5
    assert received.count(b": keep-alive\r\n\r\n") == 5
    assert received.startswith(b": keep-alive\r\n\r\ndata: ")
    kept = [b for b in blocks(received) if b.startswith(b":")]
    assert kept == [b for b in blocks(raw) if b.startswith(b":")]


def test_strip_keeps_usage_riding_on_a_choice_chunk() -> None:
    """When usage comes on the last chunk that has choices, nothing is dropped (only `usage:null` goes)."""
    raw = fixture("openai_chat_usage_in_last_choice_chunk.sse")
    obs = observer(strip=True)
    received = client_bytes([raw], feed(obs, [raw]))
    assert received == raw.replace(b',"usage":null', b"")
    assert b'"usage":{"prompt_tokens":11' in received
    assert len(blocks(received)) == len(blocks(raw))
    assert obs.usage == TokenUsage(11, 11, 22)


_SSE_PIECES = st.sampled_from(
    [b"data: ", b"data:", b"event: x\n", b"id: 1\n", b": ping", b"\n", b"\r", b"\r\n", b"\n\n", b"{", b"}", b"[", b"]",
     b'"choices":', b'"usage":', b"null", b"[DONE]", b"\xef\xbb\xbf", b"\xff", b"x", b",", b" ", b"retry: 5\n"]
)


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(_SSE_PIECES, max_size=60), cuts=st.lists(st.integers(0, 400), max_size=10))
def test_strip_mode_is_transparent_for_other_streams(pieces: list[bytes], cuts: list[int]) -> None:
    """A stream with nothing to strip reaches the client byte for byte, however chunked; no exception."""
    raw = b"".join(pieces)
    if b',"usage":null' in raw:
        return
    chunks = split(raw, [c % (len(raw) + 1) for c in cuts])
    obs = observer(strip=True)
    assert client_bytes(chunks, feed(obs, chunks)) == raw
    assert obs.usage is None


def test_strip_mode_never_loses_bytes_when_an_event_is_unreadable() -> None:
    """Bytes held back for stripping must reach the client even if a later event breaks the reader.

    BUG: with collect_text on, a chunk whose `tool_calls` is not a list makes
    stream_chunk_text raise; on_chunk marks the observer broken and returns None
    (pass the chunk through), but the first half of that event was already
    withheld (returned as b"") and is never sent: the client's stream is corrupted.
    """
    event = b'data: {"choices":[{"index":0,"delta":{"tool_calls":5}}],"usage":null}\n\n'
    rest = fixture("openai_chat_include_usage.sse")
    raw = event + rest
    chunks = [raw[:20], raw[20:]]
    obs = observer(strip=True, collect=True)
    received = client_bytes(chunks, feed(obs, chunks))
    assert b'{"choices":[{"index":0,"delta":{"tool_calls":5}}]' in received
    assert received.startswith(b"data: {")


# -- complete ------------------------------------------------------------------------


@pytest.mark.parametrize("strip", [False, True])
def test_complete_at_done_before_end_of_stream(strip: bool) -> None:
    """[DONE] completes the stream at once, without waiting for end_of_stream."""
    name = "openai_chat_usage_in_last_choice_chunk.sse"  # usage on a choice chunk: no usage-only chunk
    raw = fixture(name)
    done = raw.index(b"data: [DONE]")
    obs = observer(strip=strip)
    feed(obs, [raw[:done]], end=False)
    assert not obs.complete
    assert obs.usage == EXPECTED[name][0]  # usage came before [DONE]
    feed(obs, [raw[done:]], end=False)
    assert obs.complete


@pytest.mark.parametrize("strip", [False, True])
def test_usage_only_chunk_completes_before_done(strip: bool) -> None:
    """The usage-only chunk is the last data before [DONE]: the stream is complete (accountable)
    as soon as it is in, so an upstream dying before [DONE] cannot lose the tokens."""
    raw = fixture("openai_chat_include_usage.sse")
    usage_at = raw.rindex(b"data: {")
    done = raw.index(b"data: [DONE]")
    obs = observer(strip=strip)
    feed(obs, [raw[:usage_at]], end=False)
    assert not obs.complete and obs.usage is None
    feed(obs, [raw[usage_at:done]], end=False)
    assert obs.complete
    assert obs.usage == EXPECTED["openai_chat_include_usage.sse"][0]


def test_stream_without_done_completes_only_at_end() -> None:
    """Without [DONE], a usage-only chunk (and content-length) the stream is complete only at end_of_stream."""
    raw = fixture("openai_chat_usage_in_last_choice_chunk.sse")
    body = raw[: raw.index(b"data: [DONE]")]
    obs = observer()
    feed(obs, [body], end=False)
    assert not obs.complete


def test_sse_complete_when_content_length_reached_without_done() -> None:
    """All content-length bytes in means the body is complete, for SSE too (per `complete`'s contract).

    BUG: `complete` is documented as "[DONE] seen, or all content-length bytes in",
    but for SSE only [DONE] sets it: an SSE body with content-length and no [DONE]
    is flushed and its usage read, yet `complete` stays False, so the exchange waits
    for end_of_stream to account.
    """
    body = b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    obs = observer(length=len(body))
    feed(obs, [body[:30], body[30:]], end=False)
    assert obs.usage == TokenUsage(1, 2, 3)
    assert obs.complete


CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 7,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 3},
        },
    }
).encode()
CHAT_USAGE = TokenUsage(input_tokens=5, output_tokens=7, total_tokens=12, cached_input_tokens=2, reasoning_tokens=3)


def test_json_complete_when_content_length_arrives_without_end() -> None:
    """With content-length, the JSON is read as soon as its last byte is in, end_of_stream or not."""
    obs = observer("application/json", length=len(CHAT_JSON))
    feed(obs, [CHAT_JSON[:50]], end=False)
    assert not obs.complete and obs.usage is None
    feed(obs, [CHAT_JSON[50:]], end=False)
    assert obs.complete
    assert obs.usage == CHAT_USAGE
    assert obs.on_chunk(b"", True, 9.0) is None  # a trailing empty end chunk changes nothing
    assert obs.usage == CHAT_USAGE and obs.complete


def test_json_without_length_completes_at_end() -> None:
    obs = observer("application/json")
    feed(obs, [CHAT_JSON], end=False)
    assert not obs.complete and obs.usage is None
    feed(obs, [b""], end=True)
    assert obs.complete and obs.usage == CHAT_USAGE


# -- timing ---------------------------------------------------------------------------


def per_block_times(name: str) -> tuple[ResponseObserver, list[bytes]]:
    """Feed one block per chunk; block i arrives at time 100 + i."""
    parts = blocks(fixture(name))
    obs = observer()
    feed(obs, parts, t0=100.0)
    return obs, parts


def test_first_output_skips_the_role_only_chunk() -> None:
    """The first output is the first content, not the role chunk with empty content; last is the last content."""
    obs, parts = per_block_times("openai_chat_include_usage.sse")
    assert b'"role":"assistant","content":""' in parts[0]
    assert b'"content":"The"' in parts[1]
    assert obs.first_output_at == 101.0
    last_content = max(i for i, p in enumerate(parts) if b'"delta":{"content":"' in p)
    assert b'"finish_reason":"stop"' in parts[last_content + 1]
    assert obs.last_output_at == 100.0 + last_content


def test_keepalives_and_usage_are_not_output() -> None:
    """Comments, the finish chunk and the usage event do not move the output times."""
    obs, parts = per_block_times("openai_chat_crlf_keepalive.sse")
    first = next(i for i, p in enumerate(parts) if b'"content":"Sure"' in p)
    last = max(i for i, p in enumerate(parts) if b'"content":"."' in p)
    assert (obs.first_output_at, obs.last_output_at) == (100.0 + first, 100.0 + last)
    assert last < len(parts) - 4  # finish, keep-alive, usage and [DONE] come after


def test_tool_call_chunk_is_output() -> None:
    """A first chunk that starts a tool call (name) is output, though it also carries the role."""
    obs, parts = per_block_times("openai_chat_tool_calls.sse")
    assert obs.first_output_at == 100.0
    last = max(i for i, p in enumerate(parts) if b'"arguments":"pan' in p)
    assert obs.last_output_at == 100.0 + last


def test_completions_text_is_output() -> None:
    obs, parts = per_block_times("openai_completions.sse")
    assert obs.first_output_at == 100.0
    assert obs.last_output_at == 100.0 + max(i for i, p in enumerate(parts) if b'"text":" Earth"' in p)


@pytest.mark.parametrize(
    "delta",
    [{"refusal": "no"}, {"reasoning_content": "hmm"}, {"function_call": {"name": "f"}}, {"content": "x"}],
)
def test_other_output_kinds(delta: dict[str, Any]) -> None:
    """Refusals, reasoning and legacy function calls count as output."""
    obs = observer()
    role = b'data: {"choices":[{"delta":{"role":"assistant","content":null}}]}\n\n'
    out = b"data: " + json.dumps({"choices": [{"delta": delta}]}).encode() + b"\n\n"
    feed(obs, [role, out, b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'], t0=5.0)
    assert (obs.first_output_at, obs.last_output_at) == (6.0, 6.0)


def test_no_output_no_times() -> None:
    obs = observer()
    feed(obs, [b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n', b"data: [DONE]\n\n"])
    assert obs.first_output_at is None and obs.last_output_at is None


# -- JSON bodies ---------------------------------------------------------------------------

COMPLETION_JSON = json.dumps(
    {"object": "text_completion", "model": "gpt-3.5-turbo-instruct", "choices": [{"text": "1. Mercury", "index": 0}],
     "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}
).encode()
EMBEDDINGS_JSON = json.dumps(
    {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
     "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}
).encode()
JSON_BODIES = {
    "chat": (CHAT_JSON, CHAT_USAGE, "gpt-4o-2024-08-06"),
    "completion": (COMPLETION_JSON, TokenUsage(4, 6, 10), "gpt-3.5-turbo-instruct"),
    "embeddings": (EMBEDDINGS_JSON, TokenUsage(input_tokens=8, total_tokens=8), "text-embedding-3-small"),
}


@pytest.mark.parametrize("kind", sorted(JSON_BODIES))
def test_json_usage(kind: str) -> None:
    body, usage, model = JSON_BODIES[kind]
    obs = observer("application/json")
    assert obs.kind is BodyKind.json
    assert feed(obs, [body]) == [None]
    assert (obs.usage, obs.response_model, obs.complete, obs.error_type) == (usage, model, True, None)


@pytest.mark.parametrize("kind", sorted(JSON_BODIES))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_json_any_chunking(kind: str, data: st.DataObject) -> None:
    """JSON split anywhere (even mid-number or mid-UTF-8) reads the same."""
    body, usage, model = JSON_BODIES[kind]
    obs = observer("application/json")
    assert all(r is None for r in feed(obs, data.draw(chunkings(body))))
    assert (obs.usage, obs.response_model, obs.complete) == (usage, model, True)


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (429, {"message": "slow down", "type": "rate_limit_exceeded", "code": "rate_limit"}, "rate_limit_exceeded"),
        (404, {"message": "no", "type": None, "code": "model_not_found"}, "model_not_found"),
        (400, {"message": "no", "type": "", "code": "bad"}, "bad"),
        (500, {"message": "boom"}, "error"),
        (503, {"message": "x", "type": 5, "code": None}, "error"),
    ],
)
def test_json_error_type(status: int, error: dict[str, Any], expected: str) -> None:
    """A non-2xx JSON body's error.type (else error.code, else 'error') becomes error_type."""
    body = json.dumps({"error": error}).encode()
    obs = observer("application/json", status=status)
    feed(obs, [body[:7], body[7:]])
    assert obs.error_type == expected
    assert obs.status == status
    assert obs.complete


def test_error_body_without_error_object() -> None:
    """A non-2xx body that is not OpenAI-shaped gives no error type and no exception."""
    obs = observer("application/json", status=502)
    feed(obs, [b'{"detail": "bad gateway"}'])
    assert obs.error_type is None and obs.usage is None


@pytest.mark.parametrize("delta", [0, 1, 500])
def test_json_at_most_max_bytes_is_read(delta: int) -> None:
    obs = observer("application/json", limit=len(CHAT_JSON) + delta)
    feed(obs, [CHAT_JSON[:40], CHAT_JSON[40:]])
    assert obs.usage == CHAT_USAGE


@pytest.mark.parametrize("cut", [0, 40, 200])
def test_json_over_max_bytes_is_not_read(cut: int) -> None:
    """One byte over the limit: no usage, no exception, nothing replaced, later chunks ignored."""
    obs = observer("application/json", limit=len(CHAT_JSON) - 1)
    assert feed(obs, [CHAT_JSON[:cut], CHAT_JSON[cut:], b""]) == [None, None, None]
    assert obs.usage is None and obs.response_model is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2',  # truncated
        CHAT_JSON[:-1],
        b"[1, 2, 3]",
        b"null",
        b'"usage"',
        b'{"usage": [1, 2]}',
        b'{"usage": null, "model": 5}',
        b"\xff\xfe{}",
        b"[" * 5000 + b"]" * 5000,  # deeper than any parser nests
    ],
)
def test_unreadable_json_gives_no_usage(body: bytes) -> None:
    obs = observer("application/json")
    assert feed(obs, [body[: len(body) // 2], body[len(body) // 2 :]]) == [None, None]
    assert obs.usage is None
    assert obs.response_model is None


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=500), cuts=st.lists(st.integers(0, 500), max_size=8), sse=st.booleans())
def test_garbage_never_raises(body: bytes, cuts: list[int], sse: bool) -> None:
    """Random bytes as JSON or SSE: never an exception, never usage, never replaced bytes."""
    obs = observer("text/event-stream" if sse else "application/json")
    chunks = split(body, [c % (len(body) + 1) for c in cuts])
    assert all(r is None for r in feed(obs, chunks))
    assert obs.usage is None


@pytest.mark.parametrize("name", USAGE_FIXTURES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_truncated_stream_has_no_usage(name: str, data: st.DataObject) -> None:
    """A stream cut anywhere before the usage JSON is whole yields no usage (and no exception)."""
    raw = fixture(name)
    line = raw.index(b'"usage":{')
    # the usage event's JSON ends at the end of its data line
    line_end = raw.index(b"\n", line)
    json_end = line_end - (1 if raw[line_end - 1 : line_end] == b"\r" else 0)
    cut = data.draw(st.integers(0, json_end - 1))
    obs = observer()
    feed(obs, data.draw(chunkings(raw[:cut])))
    assert obs.usage is None
    assert not obs.complete


# -- compressed bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("coding", sorted(COMPRESSORS))
@pytest.mark.parametrize("name", ["openai_chat_include_usage.sse", "openai_chat_crlf_keepalive.sse", "openai_completions.sse"])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_compressed_stream_reads_like_plain(coding: str, name: str, data: st.DataObject) -> None:
    """A compressed SSE body, split anywhere, gives the plain body's usage and model; bytes untouched."""
    body = compressed(name, coding)
    obs = observer(encoding=coding)
    assert obs.kind is BodyKind.sse
    assert all(r is None for r in feed(obs, data.draw(chunkings(body))))
    assert (obs.usage, obs.response_model, obs.complete) == (*EXPECTED[name], True)


@pytest.mark.parametrize("coding", sorted(COMPRESSORS))
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_compressed_json_reads_like_plain(coding: str, data: st.DataObject) -> None:
    body = COMPRESSORS[coding](CHAT_JSON)
    obs = observer("application/json", coding, length=len(body))
    assert all(r is None for r in feed(obs, data.draw(chunkings(body)), end=False))
    assert (obs.usage, obs.response_model, obs.complete) == (CHAT_USAGE, "gpt-4o-2024-08-06", True)


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "GZIP", "deflate", "br", "Br"])
def test_strip_is_off_for_compressed_streams(coding: str) -> None:
    """A compressed stream is passed through as is (no replacement bytes), yet its usage is read."""
    name = "openai_chat_include_usage.sse"
    body = compressed(name, coding.lower().removeprefix("x-"))
    obs = observer(encoding=coding, strip=True)
    assert obs.strip_usage is False
    chunks = split(body, [len(body) // 3, len(body) // 2])
    assert feed(obs, chunks) == [None, None, None]
    assert obs.usage == EXPECTED[name][0]


@pytest.mark.parametrize("coding", ["zstd", "compress", "gzip, br", "bogus"])
@pytest.mark.parametrize("content_type", ["text/event-stream", "application/json"])
def test_unsupported_coding_reads_nothing(coding: str, content_type: str) -> None:
    obs = ResponseObserver(strip_usage=True, collect_text=False, max_json_bytes=LIMIT)
    assert obs.on_headers(200, content_type, coding) is BodyKind.none
    assert obs.kind is BodyKind.none
    assert obs.on_chunk(CHAT_JSON, True, 0.0) is None
    assert obs.usage is None


@pytest.mark.parametrize("content_type", ["text/event-stream", "application/json"])
def test_corrupt_compressed_body_is_not_an_error(content_type: str) -> None:
    obs = observer(content_type, "gzip")
    assert feed(obs, [b"\x1f\x8b not really gzip", CHAT_JSON]) == [None, None]
    assert obs.usage is None


def test_compressed_json_bomb_stays_within_the_limit() -> None:
    """A tiny gzip body that inflates enormously must not be inflated far past max_json_bytes.

    BUG: extproc/decoding.py says "Output is capped so a decompression bomb cannot
    exhaust memory", but decoders inflate each chunk completely and the JSON limit is
    only checked afterwards: ~32 KB of gzip allocates ~32 MB+ for a 64 KB limit.
    """
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(32)) + packer.flush()
    assert len(bomb) < 64 * 1024
    obs = observer("application/json", "gzip", limit=64 * 1024)
    tracemalloc.start()
    try:
        obs.on_chunk(bomb, True, 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert obs.usage is None
    assert peak < 8 * 1024 * 1024


# -- collected text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("openai_chat_include_usage.sse", "The capital of Australia is Canberra, not Sydney."),
        ("openai_completions.sse", "\n\n1. Mercury\n2. Venus\n3. Earth"),
        (
            "openai_chat_tool_calls.sse",
            'get_weather{"location": "Paris, France"}get_weather{"location": "Tokyo, Japan"}',
        ),
    ],
)
def test_collect_text(name: str, text: str) -> None:
    """collect_text gathers every piece of generated text (content, completions text, tool calls)."""
    obs = observer(collect=True)
    feed(obs, [fixture(name)])
    assert obs.output_text == text


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_collect_text_any_chunking_non_ascii(data: st.DataObject) -> None:
    """Multi-byte characters cut across chunks are collected intact."""
    raw = fixture("openai_chat_non_ascii.sse")
    expected = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in map(block_json, blocks(raw))
        if isinstance(c, dict) and c["choices"]
    )
    obs = observer(collect=True)
    feed(obs, data.draw(chunkings(raw)))
    assert obs.output_text == expected
    assert any(ord(ch) > 0xFFFF for ch in expected)  # the fixture really has 4-byte characters


def test_collect_text_json() -> None:
    obs = observer("application/json", collect=True)
    feed(obs, [CHAT_JSON])
    assert obs.output_text == "Hi there"
    obs = observer("application/json", collect=True)
    feed(obs, [COMPLETION_JSON])
    assert obs.output_text == "1. Mercury"


def test_no_text_unless_asked() -> None:
    obs = observer(collect=False)
    feed(obs, [fixture("openai_chat_include_usage.sse")])
    assert obs.output_text == ""
    obs = observer("application/json", collect=False)
    feed(obs, [CHAT_JSON])
    assert obs.output_text == ""


def test_collect_text_with_strip_matches_plain() -> None:
    """Stripping does not change what is collected or read."""
    raw = fixture("openai_chat_crlf_keepalive.sse")
    plain, stripping = observer(collect=True), observer(collect=True, strip=True)
    feed(plain, [raw])
    feed(stripping, [raw])
    assert stripping.output_text == plain.output_text != ""
    assert facts(stripping) == facts(plain)
