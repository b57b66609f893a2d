"""Output messages for traces from the Anthropic Messages and OpenAI Responses APIs.

The OpenAI chat and completions shapes are read by `extproc.schemas.openai`
(`add_stream_chunk`, `output_from_body`); these assemblers do the same for the other
client APIs the gateway serves, so a span shows what the client was answered whatever
API it spoke. Each assembler takes the response's JSON body (`on_body`) or its stream
events in order (`on_event`, with the SSE `event:` name and the parsed data), and
`output` gives the assistant's answer as one `OutputMessage`: the text of its text
blocks / output items, its tool calls, and why it stopped (the API's own words:
Anthropic's `stop_reason`, the Responses API's `status` or incomplete reason).
Reasoning (Anthropic thinking blocks, Responses reasoning items) is not recorded.

Texts and tool call arguments are bounded to `max_chars`; tool calls to
`MAX_TOOL_CALLS`. Nothing here raises on a malformed event: it is ignored.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import orjson

from extproc.telemetry.record import OutputMessage, ToolCall

__all__ = ["AnthropicOutput", "OutputAssembler", "ResponsesOutput"]

MAX_TOOL_CALLS: Final = 64
MAX_ITEMS: Final = 256  # Responses API output items followed in a stream
# Responses API lifecycle events whose `response` is final, with its whole `output`.
_TERMINAL: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
_TEXT_DELTAS: Final = frozenset({"response.output_text.delta", "response.refusal.delta"})
_CALL_ITEMS: Final = frozenset({"function_call", "custom_tool_call"})


class OutputAssembler(Protocol):
    def on_event(self, name: str | None, data: dict[str, Any]) -> None: ...

    def on_body(self, body: dict[str, Any]) -> None: ...

    @property
    def output(self) -> list[OutputMessage]: ...


def _bounded(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _json(value: Any, max_chars: int) -> str:
    try:
        return _bounded(orjson.dumps(value).decode(), max_chars)
    except TypeError:
        return ""


# -- Anthropic Messages -------------------------------------------------------------------------


class AnthropicOutput:
    """One Anthropic message: `content` blocks (JSON) or the content_block_* events (stream)."""

    __slots__ = ("_max", "_message", "_calls")

    def __init__(self, max_chars: int) -> None:
        self._max = max_chars
        self._message: OutputMessage | None = None
        self._calls: dict[int, ToolCall] = {}  # stream: content block index -> its tool call

    @property
    def output(self) -> list[OutputMessage]:
        return [] if self._message is None else [self._message]

    def _started(self) -> OutputMessage:
        if self._message is None:
            self._message = OutputMessage()
        return self._message

    def on_body(self, body: dict[str, Any]) -> None:
        message = self._message = OutputMessage(role=_str(body.get("role")) or "assistant")
        message.finish_reason = _str(body.get("stop_reason"))
        content = body.get("content")
        if isinstance(content, str):  # lenient: the request shape
            message.content = _bounded(content, self._max)
            return
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict):
                self._block(message, block)

    def _block(self, message: OutputMessage, block: dict[str, Any], index: int | None = None) -> None:
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            message.content = _bounded(message.content + block["text"], self._max)
        elif kind == "tool_use" and len(message.tool_calls) < MAX_TOOL_CALLS:
            arguments = block.get("input")
            call = ToolCall(
                id=_str(block.get("id")),
                name=_str(block.get("name")) or "",
                # A stream starts a call with `input: {}` and sends its JSON in deltas.
                arguments=_json(arguments, self._max) if arguments or index is None else "",
            )
            message.tool_calls.append(call)
            if index is not None:
                self._calls[index] = call

    def on_event(self, name: str | None, data: dict[str, Any]) -> None:
        kind = name or data.get("type")
        if kind == "content_block_delta":
            index, delta = data.get("index"), data.get("delta")
            if not isinstance(delta, dict):
                return
            dtype = delta.get("type")
            if dtype == "text_delta" and isinstance(delta.get("text"), str):
                message = self._started()
                message.content = _bounded(message.content + delta["text"], self._max)
            elif dtype == "input_json_delta" and isinstance(delta.get("partial_json"), str):
                call = self._calls.get(index) if isinstance(index, int) else None
                if call is not None:
                    call.arguments = _bounded(call.arguments + delta["partial_json"], self._max)
        elif kind == "content_block_start":
            block, index = data.get("content_block"), data.get("index")
            if isinstance(block, dict) and isinstance(index, int):
                self._block(self._started(), block, index)
        elif kind == "content_block_stop":
            index = data.get("index")
            call = self._calls.get(index) if isinstance(index, int) else None
            if call is not None and not call.arguments:
                call.arguments = "{}"  # a call without arguments, as the JSON body says it
        elif kind == "message_start":
            started = data.get("message")
            if isinstance(started, dict):
                self._started().role = _str(started.get("role")) or "assistant"
        elif kind == "message_delta":
            delta = data.get("delta")
            if isinstance(delta, dict) and (reason := _str(delta.get("stop_reason"))):
                self._started().finish_reason = reason


# -- OpenAI Responses ---------------------------------------------------------------------------


class ResponsesOutput:
    """One response's `output` items (JSON, or `response.completed` at the end of a stream),
    or, for a stream cut before its end, what its deltas had said so far."""

    __slots__ = ("_max", "_final", "_items")

    def __init__(self, max_chars: int) -> None:
        self._max = max_chars
        self._final: OutputMessage | None = None
        self._items: dict[int, _Item] = {}  # stream: output_index -> its text or tool call so far

    @property
    def output(self) -> list[OutputMessage]:
        if self._final is not None:
            return [self._final]
        if not self._items:
            return []
        message = OutputMessage()
        for index in sorted(self._items):
            item = self._items[index]
            if item.call is not None:
                if len(message.tool_calls) < MAX_TOOL_CALLS:
                    message.tool_calls.append(item.call)
            elif item.text:
                message.content = _bounded(message.content + item.text, self._max)
        return [message]

    def on_body(self, body: dict[str, Any]) -> None:
        self._final = self._from_response(body)

    def _from_response(self, response: dict[str, Any]) -> OutputMessage:
        message = OutputMessage()
        status = _str(response.get("status"))
        details = response.get("incomplete_details")
        reason = _str(details.get("reason")) if isinstance(details, dict) else None
        message.finish_reason = reason if status == "incomplete" and reason else status
        output = response.get("output")
        for item in output if isinstance(output, list) else ():
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "message":
                message.content = _bounded(message.content + _item_text(item), self._max)
            elif kind in _CALL_ITEMS and len(message.tool_calls) < MAX_TOOL_CALLS:
                message.tool_calls.append(self._call(item))
        return message

    def _call(self, item: dict[str, Any]) -> ToolCall:
        arguments = item.get("arguments") if item.get("type") == "function_call" else item.get("input")
        return ToolCall(
            id=_str(item.get("call_id")) or _str(item.get("id")),
            name=_str(item.get("name")) or "",
            arguments=_bounded(arguments, self._max) if isinstance(arguments, str) else "",
        )

    def on_event(self, name: str | None, data: dict[str, Any]) -> None:
        kind = data.get("type") if isinstance(data.get("type"), str) else name
        if kind in _TEXT_DELTAS or kind == "response.function_call_arguments.delta":
            delta, item = data.get("delta"), self._item(data)
            if not isinstance(delta, str) or item is None:
                return
            if item.call is not None:
                item.call.arguments = _bounded(item.call.arguments + delta, self._max)
            else:
                item.text = _bounded(item.text + delta, self._max)
        elif kind in ("response.output_item.added", "response.output_item.done"):
            raw, index = data.get("item"), data.get("output_index")
            if not isinstance(raw, dict) or not isinstance(index, int) or not 0 <= index < MAX_ITEMS:
                return
            item = self._items[index] = _Item()
            if raw.get("type") in _CALL_ITEMS:
                item.call = self._call(raw)
            elif raw.get("type") == "message":
                item.text = _bounded(_item_text(raw), self._max)  # empty when added, whole when done
        elif kind in _TERMINAL:
            response = data.get("response")
            if isinstance(response, dict) and isinstance(response.get("output"), list):
                self._final = self._from_response(response)

    def _item(self, data: dict[str, Any]) -> _Item | None:
        index = data.get("output_index")
        if not isinstance(index, int) or not 0 <= index < MAX_ITEMS:
            return None
        item = self._items.get(index)
        if item is None:  # a delta without its output_item.added: text
            item = self._items[index] = _Item()
        return item


class _Item:
    __slots__ = ("text", "call")

    def __init__(self) -> None:
        self.text = ""
        self.call: ToolCall | None = None


def _item_text(item: dict[str, Any]) -> str:
    """The text of a Responses API message item: its output_text parts (and refusals)."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
        elif isinstance(part.get("text"), str):
            parts.append(part["text"])
    return "".join(parts)
