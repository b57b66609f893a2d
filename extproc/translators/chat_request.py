"""Reading an OpenAI chat request for a translator into another API.

The checks and 400 messages every translation shares (message roles, text contents,
user content parts, tool calls with their JSON arguments, tool results, data: URLs)
live here once, so each provider's module only builds that provider's shapes and the
client sees the same error for the same mistake whichever backend serves the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from extproc.schemas.openai import bad_request

_DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", re.DOTALL)
ROLES = ("system", "developer", "user", "assistant", "tool")


def messages_of(body: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The request's messages as (role, where, message), each an object with a known role."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", param="messages")
    out: list[tuple[str, str, dict[str, Any]]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object.", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(
                f"{where}.role must be 'system', 'developer', 'user', 'assistant' or 'tool', got {role!r}.",
                param=f"{where}.role",
            )
        out.append((role, where, message))
    return out


def texts(content: Any, where: str) -> list[str]:
    """A string content or the texts of its text parts (system, assistant, tool and refusal contents)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or an array of content parts.", param=where)
    out: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
            raise bad_request(f"{where}[{j}] must be a text content part.", param=f"{where}[{j}]")
        value = part.get(part["type"])
        if not isinstance(value, str):
            raise bad_request(f"{where}[{j}].{part['type']} must be a string.", param=f"{where}[{j}]")
        out.append(value)
    return out


@dataclass(frozen=True, slots=True)
class UserPart:
    """One part of a user message: a non-empty text, or an image URL (checked non-empty)."""

    kind: Literal["text", "image"]
    value: str
    where: str  # for the translator's own 400s about this part


def user_parts(content: Any, where: str, models: str) -> list[UserPart]:
    """A user message's texts and images; `models` names the provider's models in the
    400 for any other part type ("Gemini models")."""
    if content is None or isinstance(content, str):
        return [UserPart("text", content, where)] if content else []
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or an array of content parts.", param=where)
    parts: list[UserPart] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{here}.text must be a string.", param=here)
            if part["text"]:
                parts.append(UserPart("text", part["text"], here))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise bad_request(f"{here}.image_url.url must be a non-empty string.", param=f"{here}.image_url")
            parts.append(UserPart("image", url, f"{here}.image_url"))
        else:
            raise bad_request(
                f"{here}: content part type {kind!r} is not supported for {models} (supported: text, image_url).",
                param=here,
            )
    return parts


def data_url(url: str, where: str) -> tuple[str, str]:
    """A base64 data: URL's (media type, lower-cased; data); anything else is the client's 400."""
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise bad_request(f"{where}.url must be an http(s) URL or a base64 data: URL.", param=where)
    if ";base64" not in match.group(2).lower():
        raise bad_request(f"{where}.url: data: URLs must be base64-encoded.", param=where)
    return match.group(1).strip().lower(), match.group(3)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """An assistant message's tool call, checked: its id, function name and arguments object."""

    id: str
    name: str
    arguments: dict[str, Any]


def tool_calls(message: dict[str, Any], where: str) -> list[ToolCall]:
    """An assistant message's tool calls (none when it has none)."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be an array.", param=f"{where}.tool_calls")
    out: list[ToolCall] = []
    for k, call in enumerate(calls):
        here = f"{where}.tool_calls[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str) or not call["id"]:
            raise bad_request(f"{here} must be an object with an 'id' and a 'function'.", param=here)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{here}.function.name must be a non-empty string.", param=here)
        out.append(ToolCall(call["id"], name, _arguments(function.get("arguments"), here)))
    return out


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    """A tool call's JSON-string arguments as the object other APIs take."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}  # some models send "" for a call without arguments
    if not isinstance(raw, str):
        raise bad_request(f"{where}.function.arguments must be a JSON string.", param=where)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"{where}.function.arguments is not valid JSON: {exc}", param=where) from None
    if not isinstance(value, dict):
        raise bad_request(f"{where}.function.arguments must encode a JSON object.", param=where)
    return value


def tool_call_id(message: dict[str, Any], where: str) -> str:
    """The id of the call a tool message answers."""
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{where}.tool_call_id must be a non-empty string.", param=f"{where}.tool_call_id")
    return call_id


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A function tool of the request, checked: its name, description and parameters as sent."""

    name: str
    description: str | None
    parameters: Any  # the JSON Schema as the client sent it (None when left out)
    where: str


def function_tools(tools: Any, models: str) -> list[FunctionTool]:
    """The request's `tools`, which other APIs take as functions only."""
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array.", param="tools")
    out: list[FunctionTool] = []
    for j, tool in enumerate(tools):
        where = f"tools[{j}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad_request(f"{where}: only function tools are supported for {models}.", param=where)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{where}.function.name must be a non-empty string.", param=where)
        description = function.get("description")
        out.append(FunctionTool(name, description if isinstance(description, str) else None,
                                function.get("parameters"), where))
    return out
