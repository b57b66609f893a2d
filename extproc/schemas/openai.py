"""The OpenAI API as clients speak it: endpoints, request parsing and error bodies."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

from extproc.telemetry.record import OutputMessage, ToolCall
from extproc.usage import TokenUsage


class Operation(str, Enum):
    """What a client asked for; the value is the OpenTelemetry gen_ai.operation.name
    (a well-known value where one applies; `rerank` and `count_tokens` have none)."""

    chat = "chat"
    completion = "text_completion"
    embeddings = "embeddings"
    models = "models"
    # Multimodal generation: images, transcriptions and translations, speech.
    generate_content = "generate_content"
    rerank = "rerank"
    count_tokens = "count_tokens"  # not generation: routed and observed, never charged


class RequestError(Exception):
    """A client mistake the gateway answers itself, in the client API's error shape."""

    def __init__(self, status: int, message: str, error_type: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.param = param


def error_body(status: int, message: str, error_type: str, code: str | None = None, param: str | None = None) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, "invalid_request_error", code, param)


def not_found_path(method: str, path: str) -> RequestError:
    return RequestError(404, f"Invalid URL ({method} {path})", "invalid_request_error", "unknown_url")


def model_not_found(model: str) -> RequestError:
    return RequestError(
        404,
        f"The model `{model}` does not exist or is not served by this gateway.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def no_tenant(status: int, message: str) -> RequestError:
    """401 (who are you?) or 403 (not allowed without a tenant), as configured."""
    if status == 401:
        return RequestError(401, message, "invalid_request_error", "invalid_api_key")
    return RequestError(403, message, "permission_error", "tenant_required")


def too_large(limit: int) -> RequestError:
    return RequestError(
        413,
        f"Request body too large: the limit is {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
    )


@dataclass(slots=True)
class ParsedRequest:
    """The few facts the gateway needs from a request body, plus the body itself
    (an OpenAI request, or a native Anthropic one: schemas/anthropic.py)."""

    body: dict[str, Any]
    model: str
    stream: bool


MAX_MODEL_LENGTH = 256  # a model name longer than this is refused, in any client API


def json_object(raw: bytes, invalid: Callable[[str], Exception], empty: str) -> dict[str, Any]:
    """A request body that must be a JSON object, parsed once; `invalid(message)` is the
    client API's 400 (`empty`: what to say about an empty body)."""
    if not raw:
        raise invalid(empty)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


def parse_request(raw: bytes) -> ParsedRequest:
    """Parse the JSON body once; raise RequestError (400) for anything a backend would reject."""
    body = json_object(raw, bad_request, "The request body is empty; expected a JSON object with a 'model' field.")
    model = valid_model(body.get("model"))
    return ParsedRequest(body=body, model=model, stream=body.get("stream") is True)


def valid_model(model: Any) -> str:
    """The request's model; 400 unless it is a short printable string."""
    if model is None or model == "":
        raise bad_request("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise bad_request("'model' must be a string.", param="model", code="invalid_type")
    if len(model) > MAX_MODEL_LENGTH or not model.isprintable():
        raise bad_request(
            f"'model' must be at most {MAX_MODEL_LENGTH} printable characters.", param="model", code="invalid_value"
        )
    return model


# A run of 19+ digits may be an integer outside [-2**63, 2**64), which orjson reads as a float.
_WIDE_INTEGER = re.compile(rb"\d{19}")


def with_updates(raw: bytes, body: dict[str, Any], updates: dict[str, Any]) -> bytes:
    """The request body with top-level `updates` applied and every other value kept exactly.

    orjson is exact for everything but integers outside 64 bits (legal JSON, e.g. a
    huge `seed`); only a body that may contain one takes the slower exact stdlib path.
    """
    if _WIDE_INTEGER.search(raw) is not None:
        try:
            exact = json.loads(raw)
            exact.update(updates)
            return json.dumps(exact, ensure_ascii=False, separators=(",", ":")).encode()
        except RecursionError:  # nested deeper than the stdlib parser goes: orjson's answer is all we have
            pass
    try:
        return orjson.dumps({**body, **updates})  # a shallow copy: `body` stays what the client sent
    except TypeError:  # orjson writes at most 254 levels of nesting; no real request comes near
        raise bad_request("The request body is nested too deeply for the gateway to rewrite it.") from None


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """The client's limit on generated tokens, for a backend that takes it in another
    field: `max_completion_tokens`, else the older `max_tokens` (None: neither given).
    A 400 unless it is a positive integer."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(f"'{key}' must be a positive integer.", param=key)
        return value
    return None


def reserve_estimate(body_bytes: int, body: dict[str, Any]) -> int:
    """Tokens to reserve before a request runs: ~4 bytes of JSON per prompt token, plus
    the most it may generate (`max_completion_tokens` / `max_tokens`, when given)."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    most = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 0
    return body_bytes // 4 + most


def asks_for_usage(body: dict[str, Any]) -> bool:
    """Did the client ask for the usage chunk on its stream (stream_options.include_usage)?"""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def with_include_usage(body: dict[str, Any]) -> dict[str, Any]:
    """The client's stream_options with include_usage turned on."""
    options = body.get("stream_options")
    return {**(options if isinstance(options, dict) else {}), "include_usage": True}


_OWNED_BY = "extproc"
_STARTED = int(time.time())


def _model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": _STARTED, "owned_by": _OWNED_BY}


def models_list(models: tuple[str, ...]) -> bytes:
    """OpenAI's list shape for GET /v1/models, built from the configured model names."""
    return orjson.dumps({"object": "list", "data": [_model(m) for m in models]})


def model_object(model: str) -> bytes:
    """OpenAI's model object for GET /v1/models/{id}."""
    return orjson.dumps(_model(model))


# -- responses -------------------------------------------------------------------


def as_count(value: Any) -> int:
    """A count (or index) as providers' JSON carries it: a non-negative integer, not a
    bool; anything else reads as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_openai(usage: Any) -> TokenUsage | None:
    """OpenAI's `usage` object (chat, completions, embeddings) as TokenUsage."""
    if not isinstance(usage, dict):
        return None
    prompt = as_count(usage.get("prompt_tokens"))
    completion = as_count(usage.get("completion_tokens"))
    total = as_count(usage.get("total_tokens")) or prompt + completion
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    # `cache_creation_tokens` is the gateway's own extension: a translated Anthropic or
    # Bedrock reply keeps its cache writes accountable in OpenAI's shape.
    creation = prompt_details.get("cache_creation_tokens") if isinstance(prompt_details, dict) else None
    return TokenUsage(
        input_tokens=prompt,
        output_tokens=completion,
        total_tokens=total,
        cache_creation_input_tokens=as_count(creation) if creation is not None else None,
        cached_input_tokens=as_count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0,
        reasoning_tokens=(
            as_count(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
        ),
    )


def usage_object(usage: TokenUsage) -> dict[str, Any]:
    """OpenAI's usage object, for a reply translated from another provider;
    ``cache_creation_tokens`` is our extension (only when known) so cache writes stay
    accountable after translation."""
    details: dict[str, Any] = {"cached_tokens": usage.cached_input_tokens}
    if usage.cache_creation_input_tokens is not None:
        details["cache_creation_tokens"] = usage.cache_creation_input_tokens
    out: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": details,
    }
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


STREAM_DONE = b"data: [DONE]\n\n"  # the last event of a chat stream that ended well


def sse_event(obj: Any) -> bytes:
    """One event of a chat stream (a chunk, or an error) as the SSE bytes clients read."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_type_of(body: Any) -> str | None:
    """The error type (or code) a provider put in an OpenAI-shaped error body."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        for key in ("type", "code"):
            if isinstance(error.get(key), str) and error[key]:
                return str(error[key])
        return "error"
    return None


def _has_output(choice: Any) -> bool:
    """True when a streamed choice carries generated output (text, refusal or a tool call)."""
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):  # completions
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    return bool(
        delta.get("content") or delta.get("refusal") or delta.get("tool_calls") or delta.get("reasoning_content")
        or delta.get("function_call")
    )


def stream_chunk_has_output(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(_has_output(c) for c in choices)


def stream_chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text in one chunk (for the opt-in estimate when usage is missing)."""
    parts: list[str] = []
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            parts.append(choice["text"])
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in ("content", "refusal", "reasoning_content"):
                if isinstance(delta.get(key), str):
                    parts.append(delta[key])
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    parts.extend(v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
    return "".join(parts)


def is_usage_only_chunk(chunk: dict[str, Any]) -> bool:
    """The extra final chunk `stream_options.include_usage` adds: no choices, just usage."""
    return chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


def prompt_text(body: dict[str, Any]) -> str:
    """All prompt text of a request (for the opt-in estimate)."""
    parts: list[str] = []
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts.extend(v for v in value if isinstance(v, str))
    return "\n".join(parts)


# -- assembled output (for traces) ---------------------------------------------------

_MAX_CHOICES = 16
_MAX_TOOL_CALLS = 64


def add_stream_chunk(messages: dict[int, OutputMessage], chunk: dict[str, Any], max_chars: int) -> None:
    """Fold one streamed chunk's deltas into per-choice output messages (bounded)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        if not isinstance(index, int) or not 0 <= index < _MAX_CHOICES:
            continue
        message = messages.get(index)
        if message is None:
            message = messages[index] = OutputMessage()
        if isinstance(choice.get("finish_reason"), str):
            message.finish_reason = choice["finish_reason"]
        if isinstance(choice.get("text"), str):  # completions
            message.content = _bounded(message.content + choice["text"], max_chars)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        if isinstance(delta.get("role"), str):
            message.role = delta["role"]
        if isinstance(delta.get("content"), str):
            message.content = _bounded(message.content + delta["content"], max_chars)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                _add_tool_call_delta(message, call, max_chars)


def _add_tool_call_delta(message: OutputMessage, call: dict[str, Any], max_chars: int) -> None:
    position = call.get("index", len(message.tool_calls))
    if not isinstance(position, int) or not 0 <= position < _MAX_TOOL_CALLS:
        return
    while len(message.tool_calls) <= position:
        message.tool_calls.append(ToolCall())
    target = message.tool_calls[position]
    if isinstance(call.get("id"), str):
        target.id = call["id"]
    function = call.get("function")
    if isinstance(function, dict):
        if isinstance(function.get("name"), str):
            target.name += function["name"]
        if isinstance(function.get("arguments"), str):
            target.arguments = _bounded(target.arguments + function["arguments"], max_chars)


def output_from_body(body: dict[str, Any], max_chars: int) -> list[OutputMessage]:
    """The assistant messages of a JSON chat/completions response (bounded)."""
    out: list[OutputMessage] = []
    for choice in (body.get("choices") or ())[:_MAX_CHOICES]:
        if not isinstance(choice, dict):
            continue
        message = OutputMessage(finish_reason=choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None)
        if isinstance(choice.get("text"), str):
            message.content = _bounded(choice["text"], max_chars)
        raw = choice.get("message")
        if isinstance(raw, dict):
            if isinstance(raw.get("role"), str):
                message.role = raw["role"]
            if isinstance(raw.get("content"), str):
                message.content = _bounded(raw["content"], max_chars)
            calls = raw.get("tool_calls")
            for call in (calls if isinstance(calls, list) else ())[:_MAX_TOOL_CALLS]:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    message.tool_calls.append(
                        ToolCall(
                            id=call.get("id") if isinstance(call.get("id"), str) else None,
                            name=str(function.get("name") or ""),
                            arguments=_bounded(str(function.get("arguments") or ""), max_chars),
                        )
                    )
        out.append(message)
    return out


def _bounded(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars]
