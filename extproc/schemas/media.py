"""Usage in the responses of OpenAI's image and audio APIs, and of rerank APIs.

Images (gpt-image models) and token-billed transcriptions (gpt-4o-transcribe) report
`usage` {input_tokens, output_tokens, total_tokens} in the JSON body, or in the last
event of a stream (`image_generation.completed`, `transcript.text.done`, and
`speech.audio.done` of speech asked with `stream_format: sse`); whisper's
`{"type": "duration", "seconds": N}` and dall-e's missing usage are not tokens, so
nothing is accounted for them. Rerank answers in Cohere's v2 shape, whose
`meta.tokens.input_tokens` (or `meta.billed_units.input_tokens`) is what it read;
vLLM and Jina put `usage.total_tokens` (or `prompt_tokens`) instead.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.schemas.openai import as_count
from extproc.schemas.responses import usage_from_response
from extproc.usage import TokenUsage


def media_usage(body: dict[str, Any]) -> TokenUsage | None:
    """The tokens of an image or audio answer (a JSON body or a stream event), if it has any."""
    usage = body.get("usage")
    if not isinstance(usage, dict) or usage.get("type") == "duration" or "input_tokens" not in usage:
        return None
    return usage_from_response(usage)


# A JSON answer larger than this (images in base64: megabytes each) is not parsed whole
# for its usage: OpenAI puts `usage` after `data`, so its object is read from the last
# TAIL_BYTES alone (33 MB of images take orjson ~50 ms, the tail microseconds).
LARGE_BODY = 1024 * 1024
TAIL_BYTES = 4096
_USAGE_KEY = b'"usage":'


def usage_near_end(tail: bytes) -> dict[str, Any] | None:
    """The top-level `usage` object when it is whole in `tail` (the body's last bytes);
    None when it is not there or not plainly readable (the caller parses the whole body)."""
    at = tail.rfind(_USAGE_KEY)
    if at <= 0 or tail[at - 1:at] == b"\\":
        return None
    start = tail.find(b"{", at)
    if start < 0 or tail[at + len(_USAGE_KEY):start].strip():
        return None
    end, depth = start, 0
    for end in range(start, len(tail)):
        depth += {0x7B: 1, 0x7D: -1}.get(tail[end], 0)
        if depth == 0:
            break
    else:
        return None
    try:
        usage = orjson.loads(tail[start:end + 1])
    except orjson.JSONDecodeError:
        return None
    return usage if isinstance(usage, dict) else None


def rerank_usage(body: dict[str, Any]) -> TokenUsage | None:
    """The tokens a rerank read, all of them input."""
    meta = body.get("meta")
    if isinstance(meta, dict):
        for key in ("tokens", "billed_units"):
            counts = meta.get(key)
            if isinstance(counts, dict) and "input_tokens" in counts:
                tokens = as_count(counts.get("input_tokens"))
                return TokenUsage(input_tokens=tokens, total_tokens=tokens)
    usage = body.get("usage")
    if isinstance(usage, dict):
        tokens = as_count(usage.get("prompt_tokens")) or as_count(usage.get("total_tokens"))
        return TokenUsage(input_tokens=tokens, total_tokens=tokens)
    return None


def is_stream_end(event: dict[str, Any]) -> bool:
    """The last event of an image or transcription stream (it carries the usage)."""
    kind = event.get("type")
    return kind in ("image_generation.completed", "transcript.text.done", "speech.audio.done")


def is_stream_output(event: dict[str, Any]) -> bool:
    """An event that carries generated output (for time to first output)."""
    kind = event.get("type")
    return kind in ("image_generation.partial_image", "image_generation.completed", "transcript.text.delta",
                    "speech.audio.delta")
