"""The OpenAI Responses API (``POST /v1/responses``): what the gateway reads from it.

Pure functions, no I/O. Bodies pass through untouched; the gateway only needs the
usage (for costs and budgets), the response id (to remember which backend holds it,
since follow-ups with ``previous_response_id`` must reach the same backend), the
model, and, on a stream, whether output has started and whether it ended properly.

Usage follows OpenAI's accounting: ``input_tokens`` is the whole prompt including its
cached part, ``output_tokens`` includes reasoning tokens.
"""

from __future__ import annotations

from typing import Any

from extproc.schemas.openai import as_count
from extproc.usage import TokenUsage

ENDPOINT_PATH = "/v1/responses"
MAX_RESPONSE_ID_LENGTH = 256

# Lifecycle events carry the whole response object.
_LIFECYCLE = frozenset({
    "response.created", "response.queued", "response.in_progress", "response.completed", "response.incomplete",
    "response.failed",
})
# The stream is over (successfully or not) once one of these arrives.
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Items whose start already shows the client something (a tool call's name).
_CALL_ITEMS = frozenset({"function_call", "custom_tool_call"})


def usage_from_response(usage: Any) -> TokenUsage | None:
    """The Responses API's ``usage`` object as TokenUsage (None when absent or not an object)."""
    if not isinstance(usage, dict):
        return None
    input_tokens = as_count(usage.get("input_tokens"))
    output_tokens = as_count(usage.get("output_tokens"))
    input_details = usage.get("input_tokens_details")
    output_details = usage.get("output_tokens_details")
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=as_count(usage.get("total_tokens")) or input_tokens + output_tokens,
        cached_input_tokens=as_count(input_details.get("cached_tokens")) if isinstance(input_details, dict) else 0,
        reasoning_tokens=as_count(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def response_fields(body: Any) -> tuple[str | None, str | None, TokenUsage | None]:
    """``(id, model, usage)`` of a JSON response object (Nones for what is missing)."""
    if not isinstance(body, dict):
        return None, None, None
    return _str(body.get("id")), _str(body.get("model")), usage_from_response(body.get("usage"))


def valid_response_id(value: Any) -> bool:
    """A non-empty string of printable ASCII, at most MAX_RESPONSE_ID_LENGTH characters."""
    return (
        isinstance(value, str) and 0 < len(value) <= MAX_RESPONSE_ID_LENGTH and value.isascii() and value.isprintable()
    )


def previous_response_id(body: Any) -> str | None:
    """The request's ``previous_response_id`` when it is a plausible id, else None."""
    value = body.get("previous_response_id") if isinstance(body, dict) else None
    return value if valid_response_id(value) else None


def _error_code(error: Any) -> str:
    if isinstance(error, dict):
        for key in ("code", "type"):
            if isinstance(error.get(key), str) and error[key]:
                return str(error[key])
    return "error"


class StreamReader:
    """What the gateway needs from a Responses stream it passes through untouched.

    Feed every event in order (``event_name`` is the SSE ``event:`` field, ``data`` its
    parsed JSON; the ``type`` in the data wins, as the openai SDK reads it).
    ``has_output`` says whether the *last* event carried generated output (a delta of
    text, refusal, function call arguments, reasoning..., or the start of a tool call,
    whose name reaches the client there); ``output_seen`` whether any event so far did.
    """

    __slots__ = ("usage", "response_id", "response_model", "has_output", "output_seen", "complete", "status",
                 "error_type")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.has_output = False
        self.output_seen = False
        self.complete = False  # response.completed, response.incomplete or response.failed seen
        self.status: str | None = None  # the response's last reported status
        self.error_type: str | None = None

    def on_event(self, event_name: str | None, data: dict[str, Any]) -> None:
        kind = data.get("type") if isinstance(data.get("type"), str) else event_name
        self.has_output = False
        if not kind:
            return
        if kind in _LIFECYCLE:
            response = data.get("response")
            if isinstance(response, dict):
                self.response_id = _str(response.get("id")) or self.response_id
                self.response_model = _str(response.get("model")) or self.response_model
                self.status = _str(response.get("status")) or self.status
                usage = usage_from_response(response.get("usage"))
                if usage is not None:
                    self.usage = usage
                if kind == "response.failed":
                    self.error_type = _error_code(response.get("error"))
            elif kind == "response.failed":
                self.error_type = "error"
            if kind in _TERMINAL:
                self.complete = True
        elif kind.startswith("response.") and kind.endswith(".delta"):
            self.has_output = True
        elif kind == "response.output_item.added":
            item = data.get("item")
            self.has_output = isinstance(item, dict) and item.get("type") in _CALL_ITEMS
        elif kind == "error":
            # {"type": "error", "code", "message", "param"}; older streams nest it in "error"
            self.error_type = _error_code(data.get("error") if isinstance(data.get("error"), dict) else data)
        self.output_seen = self.output_seen or self.has_output
