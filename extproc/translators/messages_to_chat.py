"""Anthropic Messages clients served by OpenAI-chat-shaped backends, and the answer back.

``messages_to_chat`` rewrites an Anthropic Messages request as an OpenAI chat request;
``chat_to_message`` / ``ChatToMessagesStream`` rewrite the chat reply (JSON or
``chat.completion.chunk`` SSE) as Anthropic's Message and named events, and
``error_to_anthropic`` the errors. ``MessagesViaChat`` composes these with the backend's
own OpenAI chat translator (OpenAI, Azure OpenAI, Bedrock Converse, ...), so every
schema that serves OpenAI chat clients serves Anthropic clients with one REGISTRY line:
``via_chat(<that schema's chat translator>)``. Pure functions and one incremental stream
state machine; no I/O.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson

from extproc.config import Schema
from extproc.contract import ClientApi
from extproc.schemas.anthropic import ERROR_TYPES_BY_STATUS, AnthropicRequestError, error_body
from extproc.schemas.openai import usage_from_openai
from extproc.sse import SSEDecoder, SSEEvent
from extproc.translators.base import Attempt, StreamTranslator, Translator, UpstreamRequest
from extproc.usage import TokenUsage

# -- Anthropic Messages request -> OpenAI chat request -----------------------------------------

# Request fields with no OpenAI chat counterpart: refused rather than silently dropped.
_UNSUPPORTED_FIELDS = {
    "top_k": "top_k has no OpenAI chat counterpart",
    "mcp_servers": "MCP connectors run only on Anthropic's API",
    "container": "code-execution containers run only on Anthropic's API",
}
# Content blocks OpenAI chat cannot carry.
_UNSUPPORTED_BLOCKS = ("document", "search_result", "server_tool_use", "web_search_tool_result", "container_upload")
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _invalid(message: str) -> AnthropicRequestError:
    return AnthropicRequestError(400, message, "invalid_request_error")


def messages_to_chat(body: dict[str, Any], model: str, limit_field: str = "max_tokens") -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request for ``model``.

    ``limit_field``: where ``max_tokens`` goes (``max_tokens`` or
    ``max_completion_tokens``). Raises AnthropicRequestError (400) for what cannot be
    expressed, so the client gets an error its SDK reads instead of a silent change.
    """
    for key, why in _UNSUPPORTED_FIELDS.items():
        if body.get(key) is not None:
            raise _invalid(f"{key}: not supported by this model's backend ({why}).")
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled"):
        raise _invalid("thinking: extended thinking is not supported by this model's backend "
                       "(it speaks the OpenAI chat API); remove `thinking` or disable it.")
    messages, limit = body.get("messages"), body.get("max_tokens")
    if not isinstance(messages, list) or not messages:  # the request stage checked; a fallback attempt re-reads
        raise _invalid("messages: at least one message is required")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise _invalid("max_tokens: Input should be a positive integer")
    out: dict[str, Any] = {"model": model, "messages": _system(body.get("system"))}
    for i, message in enumerate(messages):
        out["messages"].extend(_message(message, f"messages.{i}"))
    out[limit_field] = limit
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _invalid(f"{key}: Input should be a valid number")
            out[key] = value
    stops = stop_sequences(body)
    if stops:
        out["stop"] = stops
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    _tool_choice(body.get("tool_choice"), bool(tools), out)
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str) and metadata["user_id"]:
        out["user"] = metadata["user_id"]
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # always: usage stays exact
    return out


def stop_sequences(body: dict[str, Any]) -> list[str]:
    stops = body.get("stop_sequences")
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _invalid("stop_sequences: Input should be a valid list of strings")
    return [s for s in stops if s]


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None or system == "":
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if not isinstance(system, list):
        raise _invalid("system: Input should be a valid string or a list of text blocks")
    texts = [_text_of(block, f"system.{j}") for j, block in enumerate(system)]
    texts = [t for t in texts if t]
    return [{"role": "system", "content": "\n\n".join(texts)}] if texts else []


def _text_of(block: Any, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise _invalid(f"{where}: only text blocks are supported here")
    text = block.get("text")
    if not isinstance(text, str):
        raise _invalid(f"{where}.text: Input should be a valid string")
    return text


def _message(message: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic turn as OpenAI messages (a user turn's tool results become tool messages)."""
    if not isinstance(message, dict):
        raise _invalid(f"{where}: Input should be a valid dictionary")
    role, content = message.get("role"), message.get("content")
    if role not in ("user", "assistant"):
        raise _invalid(f"{where}.role: Input should be 'user' or 'assistant'")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _invalid(f"{where}.content: Input should be a valid string or list of content blocks")
    if role == "assistant":
        return _assistant(content, where)
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        here = f"{where}.content.{j}"
        kind = _block_type(block, here)
        if kind == "tool_result":
            tool_messages.append(_tool_result(block, here))
        elif kind == "text":
            parts.append({"type": "text", "text": _text_of(block, here)})
        elif kind == "image":
            parts.append(_image(block.get("source"), here))
        else:
            raise _unsupported_block(kind, here)
    out = tool_messages  # OpenAI wants the tool answers right after the assistant's calls
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _block_type(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str):
        raise _invalid(f"{where}: Input should be a content block object with a type")
    return kind


def _unsupported_block(kind: str, where: str) -> AnthropicRequestError:
    what = "not supported by this model's backend" if kind in _UNSUPPORTED_BLOCKS else "not supported here"
    return _invalid(f"{where}: content block type '{kind}' is {what} (supported: text, image, tool_use, tool_result).")


def _image(source: Any, where: str) -> dict[str, Any]:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not isinstance(data, str) or not data:
            raise _invalid(f"{where}.source: base64 images need a media_type and data")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise _invalid(f"{where}.source.url: Input should be a valid URL")
        return {"type": "image_url", "image_url": {"url": url}}
    raise _invalid(f"{where}.source: image source type {kind!r} is not supported by this model's backend "
                   "(supported: base64, url).")


def _assistant(content: list[Any], where: str) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        here = f"{where}.content.{j}"
        kind = _block_type(block, here)
        if kind == "text":
            texts.append(_text_of(block, here))
        elif kind == "tool_use":
            calls.append(_tool_call(block, here))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier turns' reasoning: the backend neither needs nor reads it
        else:
            raise _unsupported_block(kind, here)
    if not texts and not calls:
        return []
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name = block.get("id"), block.get("name")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid(f"{where}.id: Field required")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{where}.name: Field required")
    arguments = block.get("input", {})
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(arguments if arguments is not None else {}).decode()}}


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid(f"{where}.tool_use_id: Field required")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "\n".join(_text_of(part, f"{where}.content.{k}") for k, part in enumerate(content))
    else:
        raise _invalid(f"{where}.content: Input should be a valid string or list of text blocks")
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"  # OpenAI's tool message has no error flag
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools: Input should be a valid list")
    out: list[dict[str, Any]] = []
    for j, tool in enumerate(tools):
        where = f"tools.{j}"
        if not isinstance(tool, dict):
            raise _invalid(f"{where}: Input should be a valid dictionary")
        if tool.get("type") not in (None, "custom"):
            raise _invalid(f"{where}: server tool '{tool.get('type')}' runs only on Anthropic's API; "
                           "this model's backend takes custom tools (name, description, input_schema).")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _invalid(f"{where}.name: Field required")
        if not isinstance(schema, dict):
            raise _invalid(f"{where}.input_schema: Field required")
        function: dict[str, Any] = {"name": name}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = schema
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, have_tools: bool, out: dict[str, Any]) -> None:
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid("tool_choice.name: Field required")
        mapped: Any = {"type": "function", "function": {"name": name}}
    elif isinstance(kind, str) and kind in _TOOL_CHOICES:
        mapped = _TOOL_CHOICES[kind]
    else:
        raise _invalid("tool_choice: Input should be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}")
    if not have_tools:
        if kind in ("any", "tool"):
            raise _invalid("tool_choice: requires `tools`")
        return
    out["tool_choice"] = mapped
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


# -- OpenAI chat reply -> Anthropic Message ------------------------------------------------------

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}


def stop_reason(finish: Any, matched: Any, stops: list[str]) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for an OpenAI finish_reason. OpenAI does
    not say which stop sequence ended the text; vLLM-style backends do, in ``stop_reason``."""
    if finish == "stop" and isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return _STOP_REASONS.get(finish if isinstance(finish, str) else "", "end_turn"), None


def usage_to_anthropic(usage: TokenUsage) -> dict[str, Any]:
    """Anthropic's usage: ``input_tokens`` excludes cache reads and writes, as Anthropic counts."""
    creation = usage.cache_creation_input_tokens
    out: dict[str, Any] = {
        "input_tokens": max(usage.input_tokens - usage.cached_input_tokens - (creation or 0), 0),
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
    }
    if creation is not None:
        out["cache_creation_input_tokens"] = creation
    if usage.reasoning_tokens:
        out["output_tokens_details"] = {"thinking_tokens": usage.reasoning_tokens}
    return out


def message_id(chat_id: Any) -> str:
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + chat_id.removeprefix("chatcmpl-")
    return "msg_" + uuid.uuid4().hex


def tool_input(arguments: Any) -> Any:
    """A tool call's JSON-string arguments as Anthropic's ``input`` object."""
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"raw_arguments": arguments}  # the model wrote invalid JSON: keep it visible


def chat_to_message(response: Any, model: str, stops: list[str]) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` as an Anthropic Message (first choice)."""
    if not isinstance(response, dict):  # a backend's junk must not crash the gateway
        response = {}
    choices = response.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    found = choice.get("message")
    message: dict[str, Any] = found if isinstance(found, dict) else {}
    content: list[dict[str, Any]] = []
    for key in ("content", "refusal"):
        if isinstance(message.get(key), str) and message[key]:
            content.append({"type": "text", "text": message[key]})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            content.append({"type": "tool_use", "id": str(call.get("id") or f"toolu_{uuid.uuid4().hex}"),
                            "name": str(function.get("name") or ""), "input": tool_input(function.get("arguments"))})
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), stops)
    usage = usage_from_openai(response.get("usage"))
    reported = response.get("model")
    return {
        "id": message_id(response.get("id")),
        "type": "message",
        "role": "assistant",
        "model": reported if isinstance(reported, str) and reported else model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_to_anthropic(usage or TokenUsage()),
    }


# -- errors --------------------------------------------------------------------------------------

_MAX_ERROR_TEXT = 1000


def error_to_anthropic(status: int, body: bytes) -> bytes:
    """An OpenAI-shaped error response as Anthropic's ``{"type": "error", ...}``; never raises."""
    message: Any = None
    try:
        parsed = orjson.loads(body)
    except Exception:  # noqa: BLE001 - not JSON (a proxy's HTML page): use the text
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        message = error.get("message") if isinstance(error, dict) else parsed.get("message")
    if not isinstance(message, str) or not message:
        text = bytes(body[:_MAX_ERROR_TEXT]).decode("utf-8", "replace").strip() if parsed is None else ""
        message = text or f"The backend answered with HTTP status {status}."
    return error_body(message, anthropic_error_type(status))


def anthropic_error_type(status: int) -> str:
    return ERROR_TYPES_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")


# -- OpenAI chat stream -> Anthropic events ------------------------------------------------------


def anthropic_event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **payload}) + b"\n\n"


class ChatToMessagesStream:
    """OpenAI ``chat.completion.chunk`` SSE in, Anthropic's named events out, in any chunking.

    Per ``feed`` the work is the chunk plus one incomplete event (SSEDecoder). The usage
    arrives last in OpenAI's stream, so ``message_start`` reports 0 tokens and the final
    ``message_delta`` the exact counts (cumulative, as Anthropic's are): the anthropic
    SDK and the gateway's own reader both take the latest values.
    """

    def __init__(self, model: str, stops: list[str]) -> None:
        self.model = model
        self.stops = stops
        self.done = False  # message_stop or an error went out: nothing more for the client
        self._decoder = SSEDecoder()
        self._started = False
        self._open: tuple[str, int] | None = None  # the open block: ("text", -1) or ("tool", OpenAI index)
        self._blocks = 0  # Anthropic content block indexes used so far
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool_calls index -> Anthropic block index
        self._finish: tuple[str, str | None] | None = None
        self._usage: TokenUsage | None = None

    def feed(self, data: bytes) -> bytes:
        return self._translate(self._decoder.feed(data))

    def finish(self) -> bytes:
        """End of the backend's body: complete a stream cut after its finish_reason, or
        say it was cut short."""
        out = self._translate(self._decoder.flush())
        if self.done:
            return out
        if self._finish is not None:
            return out + self._end()
        return out + self._error("api_error", "The backend's stream ended before the response was complete.")

    def _translate(self, events: list[SSEEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if self.done:
                break
            if not event.has_data:
                continue
            if event.data.strip() == b"[DONE]":
                out.append(self._end() if self._finish is not None or self._started else
                           self._error("api_error", "The backend's stream ended without a response."))
                continue
            try:
                chunk = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                self._on_chunk(chunk, out)
        return b"".join(out)

    def _on_chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        error = chunk.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            out.append(self._error(_stream_error_type(error), message if isinstance(message, str) and message
                                   else "The backend's stream failed."))
            return
        if not self._started:
            self._started = True
            reported = chunk.get("model")
            self.model = reported if isinstance(reported, str) and reported else self.model
            out.append(anthropic_event("message_start", {"message": {
                "id": message_id(chunk.get("id")), "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}))
        usage = usage_from_openai(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._on_choice(choice, out)
        if self._finish is not None and self._usage is not None:
            out.append(self._end())

    def _on_choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    self._open_block(("text", -1), {"type": "text", "text": ""}, out)
                    out.append(self._delta({"type": "text_delta", "text": text}))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    self._on_tool_call(call, out)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self._close(out)
            self._finish = stop_reason(finish, choice.get("stop_reason"), self.stops)

    def _on_tool_call(self, call: dict[str, Any], out: list[bytes]) -> None:
        index = call.get("index", 0)
        index = index if isinstance(index, int) else 0
        found = call.get("function")
        function: dict[str, Any] = found if isinstance(found, dict) else {}
        if index not in self._tool_blocks:  # a new call: its id and name come first
            self._open_block(("tool", index), {
                "type": "tool_use", "id": str(call.get("id") or f"toolu_{uuid.uuid4().hex}"),
                "name": str(function.get("name") or ""), "input": {}}, out)
            self._tool_blocks[index] = self._blocks - 1
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}, self._tool_blocks[index]))

    def _open_block(self, key: tuple[str, int], block: dict[str, Any], out: list[bytes]) -> None:
        if self._open == key:
            return
        self._close(out)
        self._open = key
        out.append(anthropic_event("content_block_start", {"index": self._blocks, "content_block": block}))
        self._blocks += 1

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(anthropic_event("content_block_stop", {"index": self._blocks - 1}))
            self._open = None

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        return anthropic_event("content_block_delta", {"index": self._blocks - 1 if index is None else index,
                                                       "delta": delta})

    def _end(self) -> bytes:
        out: list[bytes] = []
        self._close(out)
        reason, sequence = self._finish or ("end_turn", None)
        out.append(anthropic_event("message_delta", {
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage_to_anthropic(self._usage or TokenUsage()),
        }))
        out.append(anthropic_event("message_stop", {}))
        self.done = True
        return b"".join(out)

    def _error(self, error_type: str, message: str) -> bytes:
        self.done = True
        return anthropic_event("error", {"error": {"type": error_type, "message": message}})


def _stream_error_type(error: dict[str, Any]) -> str:
    """The Anthropic type for an OpenAI (or translated Bedrock) error event."""
    kind, code = error.get("type"), error.get("code")
    if kind in ("rate_limit_error", "requests") or code == "rate_limit_exceeded":
        return "rate_limit_error"
    if code == "overloaded" or code == "service_unavailable":
        return "overloaded_error"
    if kind == "invalid_request_error":
        return "invalid_request_error"
    return "api_error"


class _Chained:
    """Two stream translators in a row: the backend's into OpenAI chunks, those into Anthropic's."""

    def __init__(self, first: StreamTranslator, second: StreamTranslator) -> None:
        self.first, self.second = first, second

    def feed(self, data: bytes) -> bytes:
        middle = self.first.feed(data)
        return self.second.feed(middle) if middle else b""

    def finish(self) -> bytes:
        middle = self.first.finish()
        out = self.second.feed(middle) if middle else b""
        return out + self.second.finish()


# -- the translator ------------------------------------------------------------------------------


def _limit_field(target_schema: Schema, host: str) -> str:
    """``max_completion_tokens`` where the backend is OpenAI's own API (its reasoning models
    refuse ``max_tokens``) or Azure OpenAI; ``max_tokens`` for every other OpenAI-compatible
    server, as many of them (DeepSeek, Mistral, Ollama, older vLLM) know only that one."""
    if target_schema is Schema.azure_openai or host == "api.openai.com":
        return "max_completion_tokens"
    return "max_tokens"


class MessagesViaChat(Translator):
    """An Anthropic Messages client on a backend that serves OpenAI chat clients: the
    request becomes a chat request the backend's chat translator prepares (path, body,
    headers); its reply, already in OpenAI's shape, becomes Anthropic's."""

    translates_response = True

    def __init__(self, attempt: Attempt, chat: Callable[[Attempt], Translator]) -> None:
        super().__init__(attempt)
        self._chat = chat(replace(attempt, client_api=ClientApi.OPENAI_CHAT, include_usage=True))
        self._stops: list[str] = []

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        target = self.attempt.target
        chat = messages_to_chat(body, self.attempt.model, _limit_field(target.backend.schema_, target.host))
        self._stops = stop_sequences(body)
        return self._chat.request(chat, orjson.dumps(chat))

    def stream_translator(self) -> StreamTranslator | None:
        outer = ChatToMessagesStream(self.attempt.model, self._stops)
        inner = self._chat.stream_translator()  # None: the backend streams OpenAI chunks itself
        return outer if inner is None else _Chained(inner, outer)

    def whole_response(self, status: int, body: bytes, error_type: str | None) -> bytes:
        try:
            chat = self._chat.whole_response(status, body, error_type)
            if status >= 300:
                return error_to_anthropic(status, chat)
            return orjson.dumps(chat_to_message(orjson.loads(chat), self.attempt.model, self._stops))
        except Exception:  # noqa: BLE001 - whatever arrived, the client gets Anthropic's shape
            name = self.attempt.target.name
            return error_body(f"The backend {name} sent a reply the gateway could not read.", "api_error")


def via_chat(chat: Callable[[Attempt], Translator]) -> Callable[[Attempt], Translator]:
    """The REGISTRY factory serving Anthropic Messages clients through ``chat``, the
    backend schema's OpenAI chat translator."""
    return functools.partial(MessagesViaChat, chat=chat)
