"""The request the load generator sends and the answers the fake upstream gives.

The upstream bodies are what OpenAI's chat API returns (checked against the official
openai SDK's types in tests/unit/test_bench.py): a `chat.completion` with usage, and a
stream of 24 content chunks, a finish chunk, a usage-only chunk (`"choices": []`, as
with `stream_options.include_usage`) and `data: [DONE]`. A second stream has 240
content chunks (the same finish and usage chunks and `[DONE]`): the per-event cost of a
proxy shows in how much slower it is than the 24-event one. The request's
`x-bench-mode` header picks the stream (`SSE_MODES`).
"""

from __future__ import annotations

import json
from typing import Any

REQUEST_MODEL = "gpt-4o-mini"
RESPONSE_MODEL = "gpt-4o-mini-2024-07-18"
COMPLETION_ID = "chatcmpl-bench0000000000000000000001"
CREATED = 1_735_689_600
SYSTEM_FINGERPRINT = "fp_bench0001"
PROMPT_CHARS = 900
CONTENT_EVENTS = 24
LONG_CONTENT_EVENTS = 240
PROMPT_TOKENS = 214
SSE_MODE_HEADER = "x-bench-mode"
# x-bench-mode value -> content events of the stream the fake upstream answers with.
SSE_MODES = {"sse": CONTENT_EVENTS, "sse240": LONG_CONTENT_EVENTS}

_PROMPT_SENTENCES = (
    "Our team is preparing the quarterly report for the operations review next week.",
    "Please summarise the main risks in the deployment plan described below, in plain words.",
    "The gateway runs on three hosts behind a load balancer and forwards requests to two providers.",
    "Each provider has its own rate limits, and the budgets are shared between the product teams.",
    "Last month one provider had an outage of forty minutes, and retries doubled our token spend.",
    "We also saw slow first tokens during peak hours, mostly for long prompts with many tool calls.",
    "The plan adds a second region, moves secrets to the vault and turns on usage-based budgets.",
    "List the three biggest risks, one line each, and suggest one measurement for every risk.",
)

# 24 pieces of the answer, as a model streams them (a leading space belongs to the token).
_ANSWER_TOKENS = (
    "1", ".", " Provider", " outages", ":", " track", " failover", " rate", ".\n",
    "2", ".", " Retry", " storms", ":", " track", " tokens", " per", " request", ".\n",
    "3", ".", " Slow", " TTFT", ".",
)
assert len(_ANSWER_TOKENS) == CONTENT_EVENTS


def sse_mode(events: int = CONTENT_EVENTS) -> str:
    """The x-bench-mode value that asks the fake upstream for a stream of `events` content chunks."""
    return next(mode for mode, count in SSE_MODES.items() if count == events)


def answer_tokens(events: int = CONTENT_EVENTS) -> list[str]:
    """The answer's pieces, one per content event: the 24 tokens over and over."""
    return [_ANSWER_TOKENS[i % CONTENT_EVENTS] for i in range(events)]


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True)


def prompt_text(chars: int = PROMPT_CHARS) -> str:
    """Deterministic English text of exactly `chars` characters."""
    text = ""
    while len(text) < chars:
        text += " ".join(_PROMPT_SENTENCES) + " "
    return text[: chars - 1] + "."


def request_body(stream: bool, include_usage: bool = False, model: str = REQUEST_MODEL) -> bytes:
    """A ~1 KB chat request: a system message and a ~900-character user message.

    `model` is the only thing a scenario may change (LiteLLM routes by it)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": prompt_text()},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
    }
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return _compact(body).encode()


def answer_text(events: int = CONTENT_EVENTS) -> str:
    return "".join(answer_tokens(events))


def usage(events: int = CONTENT_EVENTS) -> dict[str, Any]:
    """One completion token per content event."""
    completion = events
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_completion() -> dict[str, Any]:
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": RESPONSE_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer_text(), "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage(),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chat_completion_body() -> str:
    return _compact(chat_completion())


def _chunk(choices: list[dict[str, Any]], usage_value: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": RESPONSE_MODEL,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        # The backend was asked for usage, so every chunk carries "usage" (null until the last).
        "usage": usage_value,
    }


def chat_chunks(events: int = CONTENT_EVENTS) -> list[dict[str, Any]]:
    """`events` content chunks (the first also carries the role), a finish chunk, a usage-only chunk."""
    chunks = []
    for i, token in enumerate(answer_tokens(events)):
        delta: dict[str, Any] = {"content": token}
        if i == 0:
            delta = {"role": "assistant", "content": token, "refusal": None}
        chunks.append(_chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], None))
    chunks.append(_chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], None))
    chunks.append(_chunk([], usage(events)))
    return chunks


def chat_stream_body(events: int = CONTENT_EVENTS) -> str:
    lines = [f"data: {_compact(chunk)}\n\n" for chunk in chat_chunks(events)]
    return "".join(lines) + "data: [DONE]\n\n"


def parse_sse_data(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (enough for the bodies used here)."""
    out = []
    for event in body.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out
