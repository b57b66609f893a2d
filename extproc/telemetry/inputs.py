"""A request's input messages for traces, whatever API the client spoke.

Span attributes are written from one message shape, OpenAI chat's (`role`, `content` as
text or parts of type text / image_url, `tool_calls`, `tool_call_id`); this module reads
the other client APIs' requests into it:

* Anthropic Messages: `system` (text or text blocks) becomes a first `system` message;
  each message's content blocks become text and image parts, `tool_use` blocks tool calls
  (arguments: the `input` object, serialized only if recorded), and each `tool_result`
  block a `tool` message of its own (OpenInference has one tool call id per message).
* OpenAI Responses: `instructions` becomes a `system` message, a string `input` a `user`
  message; input items: messages (input_text / output_text / refusal / input_image
  parts), `function_call` (an assistant tool call) and `function_call_output` (a `tool`
  message). Reasoning, item references and built-in tool calls are left to input.value.

Documents, files, audio and thinking blocks are left to input.value too, as the
OpenInference instrumentations leave them. Only the last `MAX_ITEMS` messages or input
items are read; the caller is told how many were not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from extproc.contract import ClientApi

__all__ = ["INPUT_FIELDS", "input_messages"]

MAX_ITEMS: Final = 2000  # request messages / input items read (the span keeps fewer)

ANTHROPIC_MESSAGES: Final = ClientApi.ANTHROPIC_MESSAGES
RESPONSES: Final = ClientApi.OPENAI_RESPONSES

# Request fields that are the input (recorded as messages), per client API.
INPUT_FIELDS: Final[dict[str, frozenset[str]]] = {
    ANTHROPIC_MESSAGES: frozenset({"system", "messages"}),
    RESPONSES: frozenset({"instructions", "input"}),
    ClientApi.ANTHROPIC_COUNT_TOKENS: frozenset({"system", "messages"}),
    ClientApi.RERANK: frozenset({"query", "documents"}),
}

Message = dict[str, Any]


def input_messages(client_api: str, body: dict[str, Any]) -> tuple[list[Message], int] | None:
    """The request's messages in the chat shape, and how many of the request's messages
    (or input items) were not read; None when it has none to show."""
    reader = _READERS.get(client_api)
    if reader is not None:
        return reader(body)
    messages = body.get("messages")
    return (messages, 0) if isinstance(messages, list) else None


def _unread(items: list[Any]) -> int:
    return max(0, len(items) - MAX_ITEMS)


# -- Anthropic Messages -------------------------------------------------------------------------


def _anthropic(body: dict[str, Any]) -> tuple[list[Message], int] | None:
    out: list[Message] = []
    system = body.get("system")
    if isinstance(system, str) and system:
        out.append({"role": "system", "content": system})
    elif isinstance(system, list):
        texts = [b["text"] for b in system if isinstance(b, dict) and isinstance(b.get("text"), str)]
        if texts:
            out.append({"role": "system", "content": "\n".join(texts)})
    messages = body.get("messages")
    if not isinstance(messages, list):
        return (out, 0) if out else None
    for message in messages[-MAX_ITEMS:]:
        if isinstance(message, dict):
            out.extend(_anthropic_message(message))
    return out, _unread(messages)


def _anthropic_message(message: dict[str, Any]) -> list[Message]:
    role = message.get("role") if isinstance(message.get("role"), str) else None
    content = message.get("content")
    if not isinstance(content, list):
        return [{"role": role, "content": content}]
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[Message] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text")})
        elif kind == "image":
            if (url := _anthropic_image(block.get("source"))) is not None:
                parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "function": {"name": block.get("name"), "arguments": block.get("input")}})
        elif kind == "tool_result":
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": _tool_result(block)})
    out: list[Message] = results  # tool results come first in a user turn, as the API requires
    if parts or calls or not results:
        main: Message = {"role": role, "content": _simplified(parts)}
        if calls:
            main["tool_calls"] = calls
        out.append(main)
    return out


def _anthropic_image(source: Any) -> str | None:
    if not isinstance(source, dict):
        return None
    if source.get("type") == "url":
        return source.get("url") if isinstance(source.get("url"), str) else None
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return f"data:{source.get('media_type') or 'image'};base64,{source['data']}"
    return None


def _tool_result(block: dict[str, Any]) -> Any:
    content = block.get("content")
    if not isinstance(content, list):
        return content
    parts: list[dict[str, Any]] = []
    for inner in content:
        if isinstance(inner, dict) and inner.get("type") == "text":
            parts.append({"type": "text", "text": inner.get("text")})
        elif isinstance(inner, dict) and inner.get("type") == "image":
            if (url := _anthropic_image(inner.get("source"))) is not None:
                parts.append({"type": "image_url", "image_url": {"url": url}})
    return _simplified(parts)


def _simplified(parts: list[dict[str, Any]]) -> Any:
    """One text part is plain content (as the API's string shorthand); none is no content."""
    if not parts:
        return None
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


# -- OpenAI Responses ---------------------------------------------------------------------------


def _responses(body: dict[str, Any]) -> tuple[list[Message], int] | None:
    out: list[Message] = []
    unread = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        out.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
    elif isinstance(items, list):
        unread = _unread(items)
        for item in items[-MAX_ITEMS:]:
            if isinstance(item, dict) and (message := _responses_item(item)) is not None:
                out.append(message)
    return (out, unread) if out or unread else None


def _responses_item(item: dict[str, Any]) -> Message | None:
    kind = item.get("type")
    if kind is None or kind == "message":
        if "role" not in item:
            return None
        content = item.get("content")
        if isinstance(content, list):
            content = _simplified([p for p in map(_responses_part, content) if p is not None])
        return {"role": item.get("role"), "content": content}
    if kind == "function_call":
        call = {"id": item.get("call_id"), "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, list):
            output = _simplified([p for p in map(_responses_part, output) if p is not None])
        return {"role": "tool", "tool_call_id": item.get("call_id"), "content": output}
    return None


def _responses_part(part: Any) -> dict[str, Any] | None:
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal")}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    return None


_READERS: Final[dict[str, Callable[[dict[str, Any]], tuple[list[Message], int] | None]]] = {
    ANTHROPIC_MESSAGES: _anthropic,
    ClientApi.ANTHROPIC_COUNT_TOKENS: _anthropic,
    RESPONSES: _responses,
    ClientApi.OPENAI_INPUT_TOKENS: _responses,
}
