"""The Anthropic Messages API as native clients and Anthropic speak it.

Native clients (``POST /anthropic/v1/messages``) are served without translation: the
body passes through untouched; ``parse_request`` checks what the gateway needs,
``StreamUsage`` / ``usage_from_message`` read the usage and ``error_body`` answers in
Anthropic's error shape. Pure functions, no I/O. (OpenAI chat clients routed to an
Anthropic backend are translated by extproc/translators/chat_to_anthropic.py, which
reads usage with the same functions.)

Usage follows OpenAI's accounting everywhere: input tokens are the whole prompt
(Anthropic's ``input_tokens`` counts only the uncached part), so costs and budgets
mean the same thing whichever provider served the request.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.schemas.openai import MAX_MODEL_LENGTH, ParsedRequest, as_count, json_object
from extproc.usage import TokenUsage

MESSAGES_SUFFIX = "/v1/messages"
COUNT_TOKENS_SUFFIX = "/v1/messages/count_tokens"

# -- usage -------------------------------------------------------------------------------------


def usage_from_anthropic(usage: Any) -> TokenUsage | None:
    """Anthropic's ``usage`` as TokenUsage, with input counting the whole prompt as OpenAI does."""
    if not isinstance(usage, dict):
        return None
    uncached = as_count(usage.get("input_tokens"))
    read = as_count(usage.get("cache_read_input_tokens"))
    raw_creation = usage.get("cache_creation_input_tokens")
    creation = as_count(raw_creation) if raw_creation is not None else None
    prompt = uncached + read + (creation or 0)
    output = as_count(usage.get("output_tokens"))
    details = usage.get("output_tokens_details")
    return TokenUsage(
        input_tokens=prompt,
        output_tokens=output,
        total_tokens=prompt + output,
        cached_input_tokens=read,
        cache_creation_input_tokens=creation,
        reasoning_tokens=as_count(details.get("thinking_tokens")) if isinstance(details, dict) else 0,
    )


def usage_from_message(body: Any) -> TokenUsage | None:
    """The usage of a native (untranslated) JSON Messages response."""
    return usage_from_anthropic(body.get("usage")) if isinstance(body, dict) else None


class UsageTracker:
    """Streamed usage: message_start has the input counts, each message_delta the
    cumulative output (and maybe the input counts again); the latest non-null wins."""

    __slots__ = ("_raw", "usage")

    def __init__(self) -> None:
        self._raw: dict[str, Any] = {}
        self.usage: TokenUsage | None = None

    def update(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self._raw.update((k, v) for k, v in usage.items() if v is not None)
        self.usage = usage_from_anthropic(self._raw)


# -- native Anthropic streams -------------------------------------------------------------------


class StreamUsage:
    """What the gateway needs from a native Anthropic stream it passes through untouched.

    Feed every event in order. ``has_output`` says whether the *last* event carried
    generated output; ``output_seen`` whether any event so far did.
    """

    __slots__ = ("usage", "response_model", "has_output", "output_seen", "complete", "error_type", "_tracker")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.response_model: str | None = None
        self.has_output = False
        self.output_seen = False
        self.complete = False  # message_stop seen
        self.error_type: str | None = None
        self._tracker = UsageTracker()

    def on_event(self, name: str | None, data: dict[str, Any]) -> None:
        kind = name or data.get("type")
        self.has_output = False
        if kind == "message_start":
            message = data.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str) and message["model"]:
                    self.response_model = message["model"]
                self._update(message.get("usage"))
        elif kind == "message_delta":
            self._update(data.get("usage"))
        elif kind == "content_block_delta":
            self.has_output = True
        elif kind == "content_block_start":
            block = data.get("content_block")
            # a tool call's name reaches the client at its start
            self.has_output = isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use")
        elif kind == "message_stop":
            self.complete = True
        elif kind == "error":
            error = data.get("error")
            etype = error.get("type") if isinstance(error, dict) else None
            self.error_type = etype if isinstance(etype, str) and etype else "error"
        self.output_seen = self.output_seen or self.has_output

    def _update(self, usage: Any) -> None:
        self._tracker.update(usage)
        self.usage = self._tracker.usage


# -- native requests -----------------------------------------------------------------------------

# The error type Anthropic documents for each HTTP status (https://docs.anthropic.com/en/api/errors).
# Data, not logic: the gateway reads bodies with it and the simulator writes them with it.
ERROR_TYPES_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(message: str, error_type: str) -> bytes:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


class AnthropicRequestError(Exception):
    """A native-client mistake the gateway answers itself, in Anthropic's error shape."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    @property
    def body(self) -> bytes:
        return error_body(self.message, self.error_type)


def _invalid(message: str) -> AnthropicRequestError:
    return AnthropicRequestError(400, message, "invalid_request_error")


def parse_request(raw: bytes) -> ParsedRequest:
    """Parse a native Messages request once; 400 for what the API would reject anyway
    (messages in the API's own ``field: problem`` style)."""
    body, model = _model_and_messages(
        raw, "The request body is empty; expected a JSON object with model, messages and max_tokens.")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _invalid("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise _invalid("max_tokens: Input should be greater than or equal to 1")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream: Input should be a valid boolean")
    return ParsedRequest(body=body, model=model, stream=stream is True)


def parse_count_tokens(raw: bytes) -> ParsedRequest:
    """A count_tokens request: a Messages request without max_tokens, never streamed."""
    body, model = _model_and_messages(raw, "The request body is empty; expected a JSON object with model and messages.")
    return ParsedRequest(body=body, model=model, stream=False)


def _model_and_messages(raw: bytes, empty: str) -> tuple[dict[str, Any], str]:
    body = json_object(raw, _invalid, empty)
    model = body.get("model")
    if model is None or model == "":
        raise _invalid("model: Field required")
    if not isinstance(model, str):
        raise _invalid("model: Input should be a valid string")
    if len(model) > MAX_MODEL_LENGTH or not model.isprintable():
        raise _invalid(f"model: must be at most {MAX_MODEL_LENGTH} printable characters")
    messages = body.get("messages")
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list):
        raise _invalid("messages: Input should be a valid list")
    if not messages:
        raise _invalid("messages: at least one message is required")
    return body, model
