"""OpenAI chat completions to the Anthropic Messages API, and the answer back.

``chat_to_messages`` rewrites the request, ``messages_to_chat`` /
``AnthropicStreamTranslator`` rewrite the reply and ``error_to_openai`` the errors, so
the OpenAI client never sees Anthropic's shapes. Pure functions (and one incremental
stream state machine), no I/O. What Anthropic's own API says (usage, paths) is read with
extproc/schemas/anthropic.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from extproc.schemas.anthropic import ERROR_TYPES_BY_STATUS, MESSAGES_SUFFIX, UsageTracker, usage_from_anthropic
from extproc.schemas.openai import STREAM_DONE, bad_request, max_output_tokens, sse_event, usage_object
from extproc.sse import SSEDecoder, SSEEvent
from extproc.translators.anthropic_messages import anthropic_headers
from extproc.translators.base import StreamTranslator, Translator, UpstreamRequest
from extproc.translators.chat_request import (
    UserPart,
    data_url,
    function_tools,
    messages_of,
    texts,
    tool_call_id,
    tool_calls,
    user_parts,
)
from extproc.usage import TokenUsage

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI clients usually leave it out

# -- OpenAI chat request -> Anthropic Messages request ----------------------------------------

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_CHOICES = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}


def chat_to_messages(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI chat-completions request as an Anthropic Messages request for ``model``.

    Raises RequestError (400) for what cannot be expressed, rather than letting the
    backend answer with an Anthropic-shaped error the OpenAI client cannot read.
    """
    system: list[str] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for role, where, message in messages_of(body):
        if role in ("system", "developer"):
            system.extend(t for t in texts(message.get("content"), f"{where}.content") if t)
            continue
        if role == "user":
            blocks = [_user_block(part) for part in user_parts(message.get("content"), f"{where}.content",
                                                                 "Anthropic models")]
        elif role == "assistant":
            blocks = _assistant_blocks(message, where)
        else:  # tool
            role, blocks = "user", [_tool_result(message, where)]
        if not blocks:
            continue  # Anthropic rejects empty turns; an empty OpenAI message says nothing
        if turns and turns[-1][0] == role:  # Anthropic wants alternating turns: merge
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    if not turns:
        raise bad_request("'messages' must contain a user or assistant message with content.", param="messages")

    out: dict[str, Any] = {
        "model": model,
        "messages": [{"role": role, "content": _content(role, blocks)} for role, blocks in turns],
        "max_tokens": max_output_tokens(body) or DEFAULT_MAX_TOKENS,
    }
    if system:
        out["system"] = system[0] if len(system) == 1 else [{"type": "text", "text": t} for t in system]
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("Anthropic models generate one choice per request; 'n' must be 1.", param="n")
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad_request(f"'{key}' must be a number.", param=key)
            out[key] = value
    stop = _stop_sequences(body.get("stop"))
    if stop:
        out["stop_sequences"] = stop
    tools = body.get("tools")
    if tools is not None:
        out["tools"] = _tools(tools)
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), bool(out.get("tools")))
    if choice is not None:
        out["tool_choice"] = choice
    if body.get("stream") is True:
        out["stream"] = True
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    return out


def _text_blocks(values: list[str]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": t} for t in values if t]  # Anthropic rejects empty text blocks


def _user_block(part: UserPart) -> dict[str, Any]:
    if part.kind == "text":
        return {"type": "text", "text": part.value}
    return _image_block(part.value, part.where)


def _image_block(url: str, where: str) -> dict[str, Any]:
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    media_type, data = data_url(url, where)
    if media_type not in _IMAGE_TYPES:
        raise bad_request(
            f"{where}.url: image type {media_type or 'unknown'!r} is not supported "
            f"(supported: {', '.join(sorted(_IMAGE_TYPES))}).",
            param=where,
        )
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks = _text_blocks(texts(message.get("content"), f"{where}.content"))
    blocks += [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
               for call in tool_calls(message, where)]
    return blocks


def _tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_call_id(message, where)}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        blocks = _text_blocks(texts(content, f"{where}.content"))
        if blocks:
            block["content"] = blocks
    return block


def _content(role: str, blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A turn's content: a plain string when it is one text, else blocks (tool results first)."""
    if len(blocks) == 1 and blocks[0]["type"] == "text":
        return str(blocks[0]["text"])
    if role == "user":  # Anthropic wants tool_result blocks before any other user content
        blocks.sort(key=lambda b: b["type"] != "tool_result")
    return blocks


def _stop_sequences(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise bad_request("'stop' must be a string or an array of strings.", param="stop")


def _tools(tools: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in function_tools(tools, "Anthropic models"):
        schema = tool.parameters
        if schema is None:
            schema = {"type": "object", "properties": {}}
        elif not isinstance(schema, dict):
            raise bad_request(f"{tool.where}.function.parameters must be a JSON Schema object.", param=tool.where)
        elif "type" not in schema:
            schema = {"type": "object", **schema}  # Anthropic requires the top-level type
        entry: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            entry["description"] = tool.description
        entry["input_schema"] = schema
        out.append(entry)
    return out


def _tool_choice(choice: Any, parallel: Any, have_tools: bool) -> dict[str, Any] | None:
    mapped: dict[str, Any] | None
    if choice is None:
        mapped = {"type": "auto"} if parallel is False and have_tools else None
    elif isinstance(choice, str) and choice in _TOOL_CHOICES:
        mapped = dict(_TOOL_CHOICES[choice])
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise bad_request("'tool_choice.function.name' must be a non-empty string.", param="tool_choice")
        mapped = {"type": "tool", "name": name}
    else:
        raise bad_request(
            "'tool_choice' must be 'auto', 'required', 'none' or {\"type\": \"function\", ...}.", param="tool_choice"
        )
    if mapped is None:
        return None
    if not have_tools:
        if mapped["type"] in ("any", "tool"):
            raise bad_request("'tool_choice' requires 'tools'.", param="tool_choice")
        return None  # auto / none without tools: nothing to say
    if parallel is False and mapped["type"] != "none":
        mapped["disable_parallel_tool_use"] = True
    return mapped


# -- Anthropic Messages response -> OpenAI chat completion --------------------------------------

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(stop_reason: Any) -> str | None:
    """OpenAI's finish_reason for an Anthropic stop_reason (None while still generating)."""
    if not isinstance(stop_reason, str):
        return None
    return _FINISH_REASONS.get(stop_reason, "stop")


def _chat_id(message_id: Any) -> str:
    return f"chatcmpl-{message_id if isinstance(message_id, str) and message_id else uuid.uuid4().hex}"


def messages_to_chat(response: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """A non-streaming Anthropic message as an OpenAI ``chat.completion`` (``model`` if it names none)."""
    if not isinstance(response, dict):  # a backend's junk must not crash the gateway
        response = {}
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    content = response.get("content")
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind == "tool_use":
            calls.append({
                "id": str(block.get("id") or ""),
                "type": "function",
                "function": {"name": str(block.get("name") or ""), "arguments": _json_text(block.get("input"))},
            })
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    out: dict[str, Any] = {
        "id": _chat_id(response.get("id")),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": _model_name(response.get("model"), model),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(response.get("stop_reason")) or "stop",
            }
        ],
    }
    usage = usage_from_anthropic(response.get("usage"))
    if usage is not None:
        out["usage"] = usage_object(usage)
    return out


def _json_text(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def _model_name(reported: Any, fallback: str | None) -> str:
    return reported if isinstance(reported, str) and reported else fallback or ""


# -- Anthropic stream -> OpenAI chunks -----------------------------------------------------------

def _event_json(event: SSEEvent) -> tuple[str | None, dict[str, Any] | None]:
    """An event's name (the ``event:`` field, else the payload's ``type``) and JSON payload."""
    if not event.has_data:
        return None, None
    try:
        data = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    name = event.event or data.get("type")
    return (name if isinstance(name, str) else None), data


class AnthropicStreamTranslator:
    """Anthropic Messages SSE in, OpenAI ``chat.completion.chunk`` SSE out, in any chunking.

    Per ``feed`` the work is the chunk plus one incomplete event (SSEDecoder), and every
    complete event is translated at once, so the client sees tokens as they arrive.
    """

    def __init__(self, model: str | None, include_usage: bool, *, created: int | None = None) -> None:
        self.model = model  # replaced by the model message_start names
        self.include_usage = include_usage
        self.usage: TokenUsage | None = None
        self.created = created if created is not None else int(time.time())
        self.id = _chat_id(None)  # replaced by chatcmpl-<message id> at message_start
        self._decoder = SSEDecoder()
        self._tracker = UsageTracker()
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._tool_args: set[int] = set()  # tool blocks that sent argument text
        self._stopped = False  # a message_delta carried the stop_reason
        self._done = False  # [DONE] or an error went out: the stream is over for the client

    def feed(self, data: bytes) -> bytes:
        """OpenAI SSE bytes to send now for these Anthropic bytes (b"" if none yet)."""
        return self._translate(self._decoder.feed(data))

    def finish(self) -> bytes:
        """End of the upstream body: a last unterminated event, and [DONE] if the
        stream was cut after its stop_reason but before message_stop."""
        out = self._translate(self._decoder.flush())
        if not self._done and self._stopped:
            self._done = True
            out += STREAM_DONE
        return out

    @property
    def done(self) -> bool:
        return self._done

    def _translate(self, events: list[SSEEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if self._done:
                break
            name, data = _event_json(event)
            if data is not None:
                self._on_event(name, data, out)
        return b"".join(out)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse_event({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model or "",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        })

    def _on_event(self, name: str | None, data: dict[str, Any], out: list[bytes]) -> None:
        if name == "message_start":
            message = data.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("id"), str) and message["id"]:
                    self.id = _chat_id(message["id"])
                self.model = _model_name(message.get("model"), self.model)
                self._usage(message.get("usage"))
            out.append(self._chunk({"role": "assistant", "content": ""}))
        elif name == "content_block_start":
            self._block_start(data, out)
        elif name == "content_block_delta":
            self._block_delta(data, out)
        elif name == "content_block_stop":
            index = data.get("index")
            if isinstance(index, int) and index in self._tool_index and index not in self._tool_args:
                self._tool_args.add(index)  # OpenAI clients json.loads the arguments: never leave them ""
                out.append(self._tool_delta(index, {"function": {"arguments": "{}"}}))
        elif name == "message_delta":
            self._usage(data.get("usage"))
            delta = data.get("delta")
            reason = finish_reason(delta.get("stop_reason")) if isinstance(delta, dict) else None
            if reason is not None:
                self._stopped = True
                out.append(self._chunk({}, reason))
        elif name == "message_stop":
            if self.include_usage and self.usage is not None:
                out.append(sse_event({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model or "",
                    "choices": [],
                    "usage": usage_object(self.usage),
                }))
            out.append(STREAM_DONE)
            self._done = True
        elif name == "error":
            error = data.get("error")
            error = error if isinstance(error, dict) else {}
            etype, code = _openai_error(error.get("type"), None)
            message = error.get("message")
            out.append(sse_event({
                "error": {
                    "message": message if isinstance(message, str) and message else "The upstream stream failed.",
                    "type": etype,
                    "param": None,
                    "code": code,
                }
            }))
            self._done = True
        # ping and unknown events: nothing for the client

    def _usage(self, usage: Any) -> None:
        self._tracker.update(usage)
        self.usage = self._tracker.usage

    def _tool_delta(self, index: int, call: dict[str, Any]) -> bytes:
        return self._chunk({"tool_calls": [{"index": self._tool_index[index], **call}]})

    def _block_start(self, data: dict[str, Any], out: list[bytes]) -> None:
        index, block = data.get("index"), data.get("content_block")
        if not isinstance(index, int) or not isinstance(block, dict):
            return
        kind = block.get("type")
        if kind == "tool_use":
            self._tool_index[index] = len(self._tool_index)
            arguments = ""
            if isinstance(block.get("input"), dict) and block["input"]:  # streams send {}, but just in case
                arguments = _json_text(block["input"])
                self._tool_args.add(index)
            out.append(self._tool_delta(index, {
                "id": str(block.get("id") or ""),
                "type": "function",
                "function": {"name": str(block.get("name") or ""), "arguments": arguments},
            }))
        elif kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            out.append(self._chunk({"content": block["text"]}))

    def _block_delta(self, data: dict[str, Any], out: list[bytes]) -> None:
        index, delta = data.get("index"), data.get("delta")
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta":
            if isinstance(delta.get("text"), str) and delta["text"]:
                out.append(self._chunk({"content": delta["text"]}))
        elif kind == "input_json_delta":
            fragment = delta.get("partial_json")
            if isinstance(index, int) and index in self._tool_index and isinstance(fragment, str) and fragment:
                self._tool_args.add(index)
                out.append(self._tool_delta(index, {"function": {"arguments": fragment}}))
        elif kind == "thinking_delta":
            if isinstance(delta.get("thinking"), str) and delta["thinking"]:
                out.append(self._chunk({"reasoning_content": delta["thinking"]}))
        # signature_delta, citations_delta: no OpenAI counterpart


# -- errors --------------------------------------------------------------------------------------

# Anthropic error type -> OpenAI (type, code).
_OPENAI_ERRORS: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("permission_error", None),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "timeout_error": ("server_error", "timeout"),
    "overloaded_error": ("server_error", "overloaded"),
    "api_error": ("server_error", None),
}
_MAX_ERROR_TEXT = 1000


def _openai_error(anthropic_type: Any, status: int | None) -> tuple[str, str | None]:
    if isinstance(anthropic_type, str) and anthropic_type in _OPENAI_ERRORS:
        return _OPENAI_ERRORS[anthropic_type]
    if status is not None and status in ERROR_TYPES_BY_STATUS:  # a body that names no type
        return _OPENAI_ERRORS[ERROR_TYPES_BY_STATUS[status]]
    if status is not None and status >= 500:
        return "server_error", None
    if isinstance(anthropic_type, str) and anthropic_type:
        return anthropic_type, None  # a type we don't know: keep it rather than guess
    return "invalid_request_error", None


def error_to_openai(status: int, body: bytes) -> bytes:
    """An Anthropic error response body as OpenAI's ``{"error": {...}}``; never raises."""
    anthropic_type: Any = None
    message: Any = None
    try:
        parsed = orjson.loads(body)
    except Exception:  # noqa: BLE001 - not JSON (an HTML page from a proxy, say): use the text
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            anthropic_type, message = error.get("type"), error.get("message")
        elif isinstance(parsed.get("message"), str):
            message = parsed["message"]
    if not isinstance(message, str) or not message:
        try:
            message = bytes(body[:_MAX_ERROR_TEXT]).decode("utf-8", "replace").strip() if parsed is None else ""
        except Exception:  # noqa: BLE001
            message = ""
        message = message or f"The Anthropic backend answered with HTTP status {status}."
    etype, code = _openai_error(anthropic_type, status if isinstance(status, int) else None)
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


# -- the translator ------------------------------------------------------------------------------


class ChatToAnthropic(Translator):
    translates_response = True

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        target = self.attempt.target
        translated = orjson.dumps(chat_to_messages(body, self.attempt.model))
        return UpstreamRequest(target.path_prefix + MESSAGES_SUFFIX, translated,
                               anthropic_headers(target.backend.anthropic_version))

    def stream_translator(self) -> StreamTranslator | None:
        return AnthropicStreamTranslator(self.attempt.model, self.attempt.include_usage)

    def whole_response(self, status: int, body: bytes, error_type: str | None) -> bytes:
        if status >= 300:
            return error_to_openai(status, body)
        return orjson.dumps(messages_to_chat(orjson.loads(body), self.attempt.model))
