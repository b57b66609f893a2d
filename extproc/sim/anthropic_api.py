"""aiohttp handler that speaks the Anthropic Messages API (``POST .../v1/messages``, and
``.../v1/messages/count_tokens``).

Faithful where a gateway or the official ``anthropic`` SDK can tell: required
credentials (``x-api-key``, or ``Authorization: Bearer`` as anthropic SDK 2.x sends an
API key) and ``anthropic-version`` header, validation errors in Anthropic's
shape (``{"type": "error", "error": {...}}``), the JSON message, and the streamed
event order (message_start, content_block_start, ping, content_block_delta*,
content_block_stop, message_delta, message_stop). It validates on its own, sharing
no code with the gateway's translation, so it can catch the gateway's mistakes; the
one thing it takes from the gateway's side is data, Anthropic's documented error type
per status (``schemas.anthropic.ERROR_TYPES_BY_STATUS``).

The reply echoes the last user text like the OpenAI simulator's, or calls a tool
when tools are offered and that text says "weather" (or ``tool_choice`` forces a
call), after a thinking block when ``thinking`` is enabled; ``max_tokens`` and
``stop_sequences`` cut it with the matching stop_reason.

Knobs are the ``x-sim-*`` headers every simulated API reads (``wire.read_knobs``:
chunks, delays, error, cached tokens, compression, hold) plus:

* ``x-sim-cache-creation-tokens``: prompt tokens reported as cache writes;
* ``x-sim-tool-call: 1``: call the first tool even without "weather" in the prompt;
* ``x-sim-reply-tokens``: the natural reply length (default ``text.DEFAULT_REPLY_TOKENS``).

Token rule (deterministic, see ``text``): the prompt is the tokens of the system
text, of each tool's name and description, and per message ``text.MESSAGE_OVERHEAD``
plus the tokens of its text blocks, tool_use names and JSON inputs and tool_result
texts. The cache knobs move that many prompt tokens into cache_read_input_tokens and
cache_creation_input_tokens, so input + cache read + cache creation is always the
whole prompt. Output is the tokens of each text or thinking block, plus a tool call's
name and JSON input.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from extproc.schemas.anthropic import ERROR_TYPES_BY_STATUS  # Anthropic's documented table, not gateway logic
from extproc.sim import text, wire

MESSAGES_SUFFIX = "/v1/messages"
COUNT_TOKENS_SUFFIX = "/v1/messages/count_tokens"  # {"input_tokens": the prompt's tokens}
# Versions are dates; the SDK's own constant moves (2.x sends a newer one than "2023-06-01"),
# and the simulator cannot know the real list, so any well-formed date is accepted.
_VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
MIN_THINKING_BUDGET = 1024
THINKING_TEXT = "Let me think about this request step by step before answering."
_WEATHER_RE = re.compile(r"\bweather\b", re.IGNORECASE)

def matches(path: str) -> bool:
    """Is this a Messages API path (behind any base path)?"""
    return path.rstrip("/").endswith((MESSAGES_SUFFIX, COUNT_TOKENS_SUFFIX))


class ApiError(Exception):
    """Raised inside the handler to answer with an Anthropic-shaped error."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or ERROR_TYPES_BY_STATUS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )


def _has_credentials(request: web.Request) -> bool:
    """An ``x-api-key``, or ``Authorization: Bearer`` (how anthropic SDK 2.x sends an API key)."""
    if request.headers.get("x-api-key"):
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def _request_id() -> str:
    return f"req_sim{uuid.uuid4().hex[:24]}"


def error_response(status: int, message: str, error_type: str | None = None) -> web.Response:
    """Anthropic's error body with ``status``, a request-id, and retry-after on 429."""
    error = ApiError(status, message, error_type)
    request_id = _request_id()
    body = {"type": "error", "error": {"type": error.error_type, "message": message}, "request_id": request_id}
    headers = {"request-id": request_id}
    if status == 429:
        headers["retry-after"] = "1"
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _invalid(message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error")


# -- validation (the real API's rules a client can trip over) ----------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _required(value: Any, path: str, valid: Callable[[Any], bool], expected: str) -> Any:
    """``value`` if present and ``valid``, else the API's validation error in its own
    pydantic style: ``PATH: Field required`` or ``PATH: Input should be EXPECTED``."""
    if value is None:
        raise _invalid(f"{path}: Field required")
    if not valid(value):
        raise _invalid(f"{path}: Input should be {expected}")
    return value


def _validate(body: dict[str, Any]) -> None:
    model = _required(body.get("model"), "model", lambda v: isinstance(v, str) and v != "", "a valid string")
    status = wire.model_error(model)
    if status is not None:
        raise ApiError(status, wire.simulated_error(status, f"model {model}"))
    max_tokens = _required(body.get("max_tokens"), "max_tokens", _is_int, "a valid integer")
    if not 1 <= max_tokens <= wire.MAX_TOKENS_LIMIT:
        raise _invalid(f"max_tokens: must be between 1 and {wire.MAX_TOKENS_LIMIT}, got {max_tokens}")
    messages = _required(body.get("messages"), "messages", lambda v: isinstance(v, list), "a valid list")
    if not messages:
        raise _invalid("messages: at least one message is required")
    for i, message in enumerate(messages):
        _validate_message(message, i, last=i == len(messages) - 1)
    _validate_tool_pairs(messages)
    _validate_system(body.get("system"))
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and (not _is_number(value) or not 0 <= value <= 1):
            raise _invalid(f"{key}: Input should be a number between 0 and 1")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream: Input should be a valid boolean")
    stop = body.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise _invalid("stop_sequences: Input should be a list of non-empty strings")
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not isinstance(metadata.get("user_id", ""), str | None)
    ):
        raise _invalid("metadata: Input should be an object with an optional string user_id")
    tools = _validate_tools(body.get("tools"))
    _validate_tool_choice(body.get("tool_choice"), tools)
    _validate_thinking(body.get("thinking"), max_tokens)


def _validate_message(message: Any, i: int, last: bool) -> None:
    where = f"messages.{i}"
    if not isinstance(message, dict):
        raise _invalid(f"{where}: Input should be a valid dictionary")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _invalid(f"{where}.role: Input should be 'user' or 'assistant'")
    content = _required(
        message.get("content"), f"{where}.content", lambda v: isinstance(v, str | list),
        "a valid string or list of content blocks",
    )
    if not content and not (last and role == "assistant"):
        raise _invalid(
            f"{where}: all messages must have non-empty content except for the optional final assistant message"
        )
    for j, block in enumerate(content if isinstance(content, list) else ()):
        _validate_block(block, f"{where}.content.{j}", role)


def _validate_block(block: Any, where: str, role: str) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise _invalid(f"{where}.text: Field required")
        if not block["text"]:
            raise _invalid(f"{where}: text content blocks must be non-empty")
    elif kind in ("image", "document"):
        _validate_source(block.get("source"), f"{where}.source", kind)
    elif kind == "tool_use" and role == "assistant":
        if not isinstance(block.get("id"), str) or not block["id"]:
            raise _invalid(f"{where}.id: Field required")
        if not isinstance(block.get("name"), str) or not block["name"]:
            raise _invalid(f"{where}.name: Field required")
        if not isinstance(block.get("input"), dict):
            raise _invalid(f"{where}.input: Input should be a valid dictionary")
    elif kind == "tool_result" and role == "user":
        if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
            raise _invalid(f"{where}.tool_use_id: Field required")
        content = block.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list):
                raise _invalid(f"{where}.content: Input should be a valid string or list")
            for k, inner in enumerate(content):
                inner_kind = inner.get("type") if isinstance(inner, dict) else None
                if inner_kind not in ("text", "image"):
                    raise _invalid(f"{where}.content.{k}.type: Input should be 'text' or 'image'")
                _validate_block(inner, f"{where}.content.{k}", role)
    elif kind in ("thinking", "redacted_thinking") and role == "assistant":
        pass
    else:
        raise _invalid(f"{where}.type: Input tag {kind!r} found using 'type' does not match any of the expected tags")


def _validate_source(source: Any, where: str, kind: str) -> None:
    stype = source.get("type") if isinstance(source, dict) else None
    if stype == "base64":
        media = source.get("media_type")
        allowed = IMAGE_TYPES if kind == "image" else frozenset({"application/pdf"})
        if media not in allowed:
            raise _invalid(f"{where}.media_type: Input should be one of {', '.join(sorted(allowed))}")
        if not isinstance(source.get("data"), str) or not source["data"]:
            raise _invalid(f"{where}.data: Field required")
    elif stype == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise _invalid(f"{where}.url: Input should be an http(s) URL")
    else:
        raise _invalid(f"{where}.type: Input tag {stype!r} found using 'type' does not match any of the expected tags")


def _blocks_of(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    content = message.get("content")
    return [b for b in content if b.get("type") == kind] if isinstance(content, list) else []


def _validate_tool_pairs(messages: list[dict[str, Any]]) -> None:
    """Every tool_use answered by a tool_result in the very next message, and back."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and i + 1 < len(messages):
            wanted = [b["id"] for b in _blocks_of(message, "tool_use")]
            answered = {b["tool_use_id"] for b in _blocks_of(messages[i + 1], "tool_result")}
            missing = [w for w in wanted if w not in answered]
            if missing:
                raise _invalid(
                    f"messages.{i + 1}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block "
                    "in the next message."
                )
        if message["role"] == "user":
            previous = messages[i - 1] if i else None
            known = {b["id"] for b in _blocks_of(previous, "tool_use")} if previous is not None else set()
            for j, block in enumerate(message["content"] if isinstance(message["content"], list) else ()):
                if block["type"] == "tool_result" and block["tool_use_id"] not in known:
                    raise _invalid(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block['tool_use_id']}. Each `tool_result` block must have a corresponding `tool_use` "
                        "block in the previous message."
                    )


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _invalid("system: Input should be a valid string or list of text blocks")
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _invalid(f"system.{j}.type: Input should be 'text'")
        _validate_block(block, f"system.{j}", "user")


def _validate_tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools: Input should be a valid list")
    names: set[str] = set()
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _invalid(f"tools.{j}: Input should be a valid dictionary")
        name = tool.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_-]{1,128}", name):
            raise _invalid(f"tools.{j}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        if name in names:
            raise _invalid(f"tools: Tool names must be unique, {name!r} is repeated")
        names.add(name)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _invalid(f"tools.{j}.input_schema: Field required")
        if schema.get("type") != "object":
            raise _invalid(f"tools.{j}.input_schema.type: Input should be 'object'")
        if tool.get("description") is not None and not isinstance(tool["description"], str):
            raise _invalid(f"tools.{j}.description: Input should be a valid string")
    return tools


def _validate_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> None:
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise _invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if kind == "tool" and choice.get("name") not in {t["name"] for t in tools}:
        raise _invalid(f"tool_choice.name: tool {choice.get('name')!r} is not in tools")
    if kind in ("any", "tool") and not tools:
        raise _invalid("tool_choice: may only be specified while providing tools")
    flag = choice.get("disable_parallel_tool_use")
    if flag is not None and not isinstance(flag, bool):
        raise _invalid("tool_choice.disable_parallel_tool_use: Input should be a valid boolean")


def _validate_thinking(thinking: Any, max_tokens: int) -> None:
    if thinking is None:
        return
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return
    if kind != "enabled":
        raise _invalid("thinking.type: Input should be 'enabled' or 'disabled'")
    budget = thinking.get("budget_tokens")
    if not _is_int(budget) or budget < MIN_THINKING_BUDGET:
        raise _invalid(f"thinking.budget_tokens: Input should be greater than or equal to {MIN_THINKING_BUDGET}")
    if budget >= max_tokens:
        raise _invalid("`max_tokens` must be greater than `thinking.budget_tokens`")


# -- the reply -----------------------------------------------------------------------------------


def _block_texts(content: Any) -> Iterator[str]:
    """Every text of a message content that counts towards the prompt."""
    if isinstance(content, str):
        yield content
        return
    for block in content if isinstance(content, list) else ():
        kind = block.get("type")
        if kind == "text":
            yield block["text"]
        elif kind == "tool_use":
            yield block["name"]
            yield orjson.dumps(block["input"]).decode()
        elif kind == "tool_result":
            yield from _block_texts(block.get("content"))


def prompt_tokens(body: dict[str, Any]) -> int:
    """The whole prompt's tokens under the module's token rule."""
    system = body.get("system")
    total = sum(text.count_tokens(t) for t in _block_texts(system))
    for tool in body.get("tools") or ():
        total += text.count_tokens(tool["name"]) + text.count_tokens(tool.get("description") or "")
    for message in body["messages"]:
        total += text.MESSAGE_OVERHEAD + sum(text.count_tokens(t) for t in _block_texts(message["content"]))
    return total


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text blocks of the last user message ("" when it only returns tool results)."""
    for message in reversed(messages):
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            return "\n".join(b["text"] for b in content if b.get("type") == "text")
    return ""


def _sample_value(schema: Any) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    return {"integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}.get(str(kind), "Paris")


def tool_input(schema: dict[str, Any]) -> dict[str, Any]:
    """A small deterministic input for a tool: its required (else first) properties filled in."""
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        return {}
    required = [p for p in schema.get("required") or () if p in properties]
    names = required or list(properties)[:1]
    return {name: _sample_value(properties[name]) for name in names}


@dataclass
class _Block:
    type: str  # text, thinking or tool_use
    text: str = ""  # the text, or the thinking
    id: str = ""
    name: str = ""
    input: dict[str, Any] = field(default_factory=dict)

    @property
    def json_input(self) -> str:
        return orjson.dumps(self.input).decode()

    @property
    def tokens(self) -> int:
        if self.type == "tool_use":
            return text.call_tokens(self.name, self.json_input)
        return text.count_tokens(self.text)

    @property
    def signature(self) -> str:
        return hashlib.blake2b(self.text.encode(), digest_size=24).hexdigest()

    def content(self) -> dict[str, Any]:
        if self.type == "tool_use":
            return {"type": "tool_use", "id": self.id, "name": self.name, "input": self.input}
        if self.type == "thinking":
            return {"type": "thinking", "thinking": self.text, "signature": self.signature}
        return {"type": "text", "text": self.text}


@dataclass
class _Reply:
    id: str
    model: str
    blocks: list[_Block]
    stop_reason: str
    stop_sequence: str | None
    input_tokens: int  # uncached part of the prompt, as Anthropic reports it
    cache_read: int
    cache_creation: int

    @property
    def output_tokens(self) -> int:
        return sum(b.tokens for b in self.blocks)

    def usage(self, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": self.cache_creation, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    def message(self, streaming: bool = False) -> dict[str, Any]:
        """The message object; at message_start it has no content or stop reason yet."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [] if streaming else [b.content() for b in self.blocks],
            "stop_reason": None if streaming else self.stop_reason,
            "stop_sequence": None if streaming else self.stop_sequence,
            "usage": self.usage(1 if streaming else self.output_tokens),
        }


@dataclass(frozen=True)
class _Extra:
    """The Anthropic-only knobs, on top of the shared ``wire.Knobs``."""

    cache_creation: int = 0
    tool_call: bool = False
    reply_tokens: int = text.DEFAULT_REPLY_TOKENS


def _read_extra(request: web.Request) -> _Extra:
    return _Extra(
        cache_creation=wire.header_int(request, "x-sim-cache-creation-tokens", 0, 0, wire.MAX_TOKENS_LIMIT),
        tool_call=request.headers.get("x-sim-tool-call") == "1",
        reply_tokens=wire.header_int(
            request, "x-sim-reply-tokens", text.DEFAULT_REPLY_TOKENS, 1, wire.MAX_TOKENS_LIMIT
        ),
    )


def _tool_block(body: dict[str, Any], extra: _Extra, last_user: str) -> _Block | None:
    """The tool call to make, if the request invites one."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {"type": "auto"}
    if not tools or choice["type"] == "none":
        return None
    if choice["type"] == "auto" and not extra.tool_call and not _WEATHER_RE.search(last_user):
        return None
    tool = next(t for t in tools if t["name"] == choice["name"]) if choice["type"] == "tool" else tools[0]
    return _Block("tool_use", id=f"toolu_sim{uuid.uuid4().hex[:20]}", name=tool["name"],
                  input=tool_input(tool["input_schema"]))


def _reply(body: dict[str, Any], knobs: wire.Knobs, extra: _Extra) -> _Reply:
    messages = body["messages"]
    prompt = prompt_tokens(body)
    cache_read = min(knobs.usage.cached_tokens, prompt)
    cache_creation = min(extra.cache_creation, prompt - cache_read)
    budget = body["max_tokens"]
    last_user = _last_user_text(messages)
    blocks: list[_Block] = []
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        blocks.append(_Block("thinking", text=THINKING_TEXT))
        budget -= blocks[-1].tokens
    stop_reason, stop_sequence = "end_turn", None
    tool = _tool_block(body, extra, last_user)
    if tool is not None:
        call = [tool]
        if (body.get("tool_choice") or {"type": "auto"})["type"] == "auto":  # a forced call has no preamble
            call.insert(0, _Block("text", text=f"I'll use the {tool.name} tool to help with that."))
        if sum(b.tokens for b in call) > budget:
            tool = None  # no room: answer in text, cut at max_tokens
        else:
            blocks.extend(call)
            stop_reason = "tool_use"
    if tool is None:
        length = min(extra.reply_tokens, budget)
        reply = text.reply_text(last_user, length)
        if length < extra.reply_tokens:
            stop_reason = "max_tokens"
        hits = [(reply.find(s), s) for s in body.get("stop_sequences") or () if s in reply]
        if hits:
            position, stop_sequence = min(hits)
            reply, stop_reason = reply[:position], "stop_sequence"
        if reply:
            blocks.append(_Block("text", text=reply))
    return _Reply(
        id=f"msg_sim{uuid.uuid4().hex[:20]}",
        model=body["model"],
        blocks=blocks,
        stop_reason=stop_reason,
        stop_sequence=stop_sequence,
        input_tokens=prompt - cache_read - cache_creation,
        cache_read=cache_read,
        cache_creation=cache_creation,
    )


# -- streaming -----------------------------------------------------------------------------------


def stream_events(reply: _Reply, chunks: int) -> Iterator[tuple[str, dict[str, Any]] | None]:
    """The events of a streamed reply in the API's order; ``None`` marks a pause point."""
    yield "message_start", {"type": "message_start", "message": reply.message(streaming=True)}
    first_delta = True
    for index, block in enumerate(reply.blocks):
        if block.type == "tool_use":
            start: dict[str, Any] = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": ""}] + [
                {"type": "input_json_delta", "partial_json": p} for p in text.split_evenly(block.json_input, chunks)
            ]
        elif block.type == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": p} for p in text.split_chunks(block.text, chunks)]
            deltas.append({"type": "signature_delta", "signature": block.signature})
        else:
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in text.split_chunks(block.text, chunks)]
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
        if index == 0:
            yield "ping", {"type": "ping"}
        for delta in deltas:
            if not first_delta:
                yield None
            first_delta = False
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    usage = reply.usage(reply.output_tokens)
    del usage["cache_creation"], usage["service_tier"]  # message_delta repeats only the counts
    yield "message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence},
        "usage": usage,
    }
    yield "message_stop", {"type": "message_stop"}


@dataclass(frozen=True)
class VertexCall:
    """A Messages call through Vertex AI: the model and method come from the path; the
    token count (`count-tokens:rawPredict`) names its model in the body."""

    model: str
    streaming_method: bool  # streamRawPredict (else rawPredict)
    count_tokens: bool = False


VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
_VERTEX_VERSION_RE = re.compile(r"(vertex-)?\d{4}-\d{2}-\d{2}")


def _vertex_body(body: dict[str, Any], vertex: VertexCall) -> dict[str, Any]:
    """Vertex's convention: the version in the body, the model in the path only."""
    version = body.get("anthropic_version")
    if version is None:
        raise _invalid("anthropic_version: Field required")
    # Google documents vertex-2023-10-16; anthropic SDK 2.x sends its API version date.
    if not isinstance(version, str) or not _VERTEX_VERSION_RE.fullmatch(version):
        raise _invalid(f"anthropic_version: Input should be '{VERTEX_ANTHROPIC_VERSION}' or a version date")
    rest = {k: v for k, v in body.items() if k != "anthropic_version"}
    if vertex.count_tokens:
        return rest  # its model is in the body, as Anthropic's own count_tokens takes it
    if "model" in body:
        raise _invalid("model: Extra inputs are not permitted")
    if (body.get("stream") is True) != vertex.streaming_method:
        raise _invalid("stream: use streamRawPredict for stream: true and rawPredict otherwise")
    return {**rest, "model": vertex.model}


async def dispatch(
    request: web.Request, settings: wire.SimSettings, vertex: VertexCall | None = None
) -> web.StreamResponse:
    """``POST .../v1/messages``, or with `vertex` the same model behind Vertex AI's
    rawPredict (authenticated by the caller); every failure becomes an Anthropic-shaped error."""
    try:
        if request.method != "POST":
            raise ApiError(405, f"Method {request.method} not allowed for {request.path}; use POST.")
        if vertex is None:
            if not _has_credentials(request):
                raise ApiError(401, "x-api-key header is required", "authentication_error")
            version = request.headers.get("anthropic-version")
            if not version:
                raise _invalid("anthropic-version: header is required")
            if not _VERSION_RE.fullmatch(version):
                raise _invalid(f"anthropic-version: {version!r} is not a valid version")
        knobs = wire.read_knobs(request, settings)
        extra = _read_extra(request)
        await wire.wait_first_byte(knobs)
        if knobs.error_status is not None:
            raise ApiError(knobs.error_status, wire.simulated_error(knobs.error_status, "x-sim-error header"))
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise _invalid(f"There was an error parsing the body of your request: {exc}") from None
        if not isinstance(body, dict):
            raise _invalid("The request body must be a JSON object.")
        if vertex is not None:
            body = _vertex_body(body, vertex)
        request_id = _request_id()
        headers = {"request-id": request_id}
        if vertex.count_tokens if vertex is not None else request.path.rstrip("/").endswith(COUNT_TOKENS_SUFFIX):
            _validate({**body, "max_tokens": 1})  # a Messages request without max_tokens
            return wire.json_reply(orjson.dumps({"input_tokens": prompt_tokens(body)}), knobs.compress, headers)
        _validate(body)
        reply = _reply(body, knobs, extra)
        if body.get("stream") is True:
            events = stream_events(reply, knobs.chunks)
            return await wire.write_named_events(request, knobs, settings, events, headers)
        return wire.json_reply(orjson.dumps(reply.message()), knobs.compress, headers)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.error_type)
    except wire.KnobError as exc:
        return error_response(400, str(exc), "invalid_request_error")
    except web.HTTPException as exc:  # e.g. body larger than client_max_size
        return error_response(exc.status, exc.reason)
