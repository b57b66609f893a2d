"""aiohttp handlers that speak the OpenAI HTTP schema.

Routing matches on the path *suffix*, so the simulator answers behind any base
path a gateway may add (``/v1``, ``/openai/v1``, ``/x/y``). Per-request knobs
arrive as ``x-sim-*`` headers (listed in ``wire``, shared by every simulated API), so
tests can drive the upstream through a gateway.

Chat replies call a tool when function tools are offered and the last user text says
"weather" (or ``tool_choice`` forces a call, or ``x-sim-tool-call: 1``), unless the
last message is a tool's answer: a short text, then the call (id and name, then its
arguments in two pieces when streamed), with finish_reason ``tool_calls``.

Fault knobs (OpenAI API only), for testing what a gateway does when a provider misbehaves:

* ``x-sim-reset-after-chunks: N``: abort the TCP connection (RST, no clean end). ``0``:
  right after reading the request, before any response byte. On a stream: after ``N``
  SSE events (the usage chunk and ``[DONE]`` count as events). On a JSON reply (any
  ``N`` > 0): after the headers and the first half of the body. Before aborting, the
  simulator pauses ``RESET_PAUSE_S`` so the bytes it sent reach the peer first (they
  are not lost to the RST), as a provider that dies after sending them would.
* ``x-sim-garbage: KIND``: a body that is not what the content type promises.
  ``json``: ``application/json`` that is not JSON; ``sse``: ``text/event-stream`` of
  malformed events (not JSON, invalid UTF-8, NUL, bare CR, comments, fields without
  colon) and no ``[DONE]``; ``html``: an HTML error page (``text/html``);
  ``truncated-json``: the real JSON reply cut in half (its content-length matches the
  cut body); ``truncated-sse``: the real stream without ``[DONE]``, ending in the middle
  of an event. The status is 200, or the ``x-sim-error`` status when both are sent.
* ``x-sim-content-type: VALUE``: send this ``Content-Type`` instead of the real one
  (body unchanged), e.g. ``text/plain`` for a JSON reply.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from extproc.sim import text, wire
from extproc.sim.bedrock_api import _sample_input as sample_tool_input

DEMO_MODELS = ("demo-model", "demo-chat", "demo-embedding")
DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 4096
RESET_PAUSE_S = 0.5  # x-sim-reset-after-chunks: let sent bytes arrive before the RST
_GARBAGE_JSON = b'{"id": "chatcmpl-garbage", "choices": [{"message": <<not json>> \x00 \xff\xfe'
_GARBAGE_SSE = (
    b"data: {not json}\n\n"
    b"data: \xff\xfe\x00 invalid utf-8 and a NUL\n\n"
    b": a comment\n\n"
    b"event\ndata\n\n"
    b"data: [1, 2\r\rdata: {\"usage\": \"many\"}\n\n"
    b"data: {\"choices\": 7, \"usage\": {\"prompt_tokens\": \"x\"}}\n\n"
)
_GARBAGE_HTML = (
    b"<!DOCTYPE html>\n<html><head><title>500 Internal Server Error</title></head>\n"
    b"<body><h1>Internal Server Error</h1><p>nginx</p></body></html>\n"
)

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout_error", None),
    409: ("conflict_error", None),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}


class ApiError(Exception):
    """Raised inside a handler to answer with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> web.Response:
    """OpenAI error body ``{"error": {message, type, param, code}}`` with ``status``."""
    etype, default_code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    body = {"error": {"message": message, "type": etype, "param": param, "code": code or default_code}}
    headers = {"retry-after": "1"} if status == 429 else None
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _json(obj: Any, compress: str | None = None) -> web.Response:
    return wire.json_reply(orjson.dumps(obj), compress)


def _simulated_error(status: int, how: str) -> ApiError:
    return ApiError(status, wire.simulated_error(status, how))


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or the 400 OpenAI answers (Chat, Completions, Responses)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    status = wire.model_error(model)
    if status is not None:
        raise _simulated_error(status, f"model {model}")
    return model


def _reply_tokens(body: dict[str, Any]) -> tuple[int, bool]:
    """Reply length and whether it was capped by the client (finish_reason "length")."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= wire.MAX_TOKENS_LIMIT:
            raise ApiError(400, f"{key} must be an integer between 1 and {wire.MAX_TOKENS_LIMIT}", param=key)
        return value, True
    return text.DEFAULT_REPLY_TOKENS, False


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage(prompt_tokens: int, completion_tokens: int, shape: wire.UsageShape | None = None) -> dict[str, Any]:
    shape = shape or wire.UsageShape()
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(shape.cached_tokens, prompt_tokens)},
        "completion_tokens_details": {"reasoning_tokens": shape.reasoning_tokens},
    }


@dataclass
class _Reply:
    """What both the streaming and non-streaming paths render."""

    id: str
    model: str
    created: int
    texts: list[str]
    finish_reason: str
    prompt_tokens: int
    shape: wire.UsageShape = field(default_factory=wire.UsageShape)
    tool_call: dict[str, Any] | None = None  # chat only: the first choice calls this tool

    @property
    def usage(self) -> dict[str, Any]:
        output = sum(text.count_tokens(t) for t in self.texts)
        if self.tool_call is not None:
            function = self.tool_call["function"]
            output += text.count_tokens(function["name"]) + text.count_tokens(function["arguments"])
        return _usage(self.prompt_tokens, output, self.shape)


def _tool_call(body: dict[str, Any], messages: list[dict[str, Any]], forced: bool) -> dict[str, Any] | None:
    """A call of an offered function tool when the prompt asks about the weather (or
    ``tool_choice`` / ``x-sim-tool-call: 1`` forces one), unless a tool just answered."""
    tools = [t["function"] for t in body.get("tools") or () if isinstance(t, dict) and isinstance(t.get("function"), dict)
             and isinstance(t["function"].get("name"), str)]
    if not tools or messages[-1].get("role") == "tool" or body.get("tool_choice") == "none":
        return None
    choice = body.get("tool_choice")
    chosen = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    forced = forced or choice == "required" or chosen is not None
    if not forced and "weather" not in text.last_user_text(messages).lower():
        return None
    spec = next((t for t in tools if t["name"] == chosen), None) or next(
        (t for t in tools if "weather" in t["name"].lower()), tools[0])
    schema = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {}
    arguments = orjson.dumps(sample_tool_input(schema)).decode()
    call_id = "call_" + uuid.uuid5(uuid.NAMESPACE_OID, orjson.dumps(messages).decode()).hex[:24]
    return {"id": call_id, "type": "function", "function": {"name": spec["name"], "arguments": arguments}}


def _chat_reply(body: dict[str, Any], model: str, force_tool: bool = False) -> _Reply:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array", param="messages", code="missing_required_parameter")
    if not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "each message must be an object", param="messages")
    tokens, capped = _reply_tokens(body)
    n = body.get("n") or 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
        raise ApiError(400, "n must be an integer between 1 and 128", param="n")
    call = _tool_call(body, messages, force_tool) if n == 1 else None
    if call is not None:
        return _Reply(
            f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time()),
            [f"I will use the {call['function']['name']} tool to answer that."], "tool_calls",
            text.count_message_tokens(messages), tool_call=call,
        )
    reply = text.reply_text(text.last_user_text(messages), tokens)
    return _Reply(
        f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time()), [reply] * n,
        "length" if capped else "stop", text.count_message_tokens(messages),
    )


def _texts(value: Any, empty_ids: bool) -> list[tuple[str, int]] | None:
    """A legacy ``prompt`` or embeddings ``input`` as (text, tokens) per item: a string, an
    array of strings, one array of token ids or an array of them (ids stand in as their
    decimal text); None if it is none of these. Completions accept an empty array of token
    ids, embeddings (``empty_ids=False``) do not."""
    if isinstance(value, str):
        return [(value, text.count_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [(v, text.count_tokens(v)) for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [(" ".join(map(str, value)), len(value))]
        if all(isinstance(v, list) and (v or empty_ids) and all(isinstance(i, int) for i in v) for v in value):
            return [(" ".join(map(str, v)), len(v)) for v in value]
    return None


def _prompts(body: dict[str, Any]) -> list[tuple[str, int]]:
    """Legacy ``prompt`` as (text to answer, prompt tokens) per choice."""
    prompts = _texts(body.get("prompt"), empty_ids=True)
    if prompts is None:
        raise ApiError(400, "prompt must be a string, an array of strings or an array of token ids", param="prompt")
    return prompts


def _completion_reply(body: dict[str, Any], model: str) -> _Reply:
    prompts = _prompts(body)
    tokens, capped = _reply_tokens(body)
    return _Reply(
        f"cmpl-{uuid.uuid4().hex}", model, int(time.time()), [text.reply_text(p, tokens) for p, _ in prompts],
        "length" if capped else "stop", sum(count for _, count in prompts),
    )


def _chat_object(reply: _Reply) -> dict[str, Any]:
    return {
        "id": reply.id, "object": "chat.completion", "created": reply.created, "model": reply.model,
        "choices": [
            {
                "index": i, "logprobs": None, "finish_reason": reply.finish_reason,
                "message": {"role": "assistant", "content": t, "refusal": None,
                            **({"tool_calls": [reply.tool_call]} if reply.tool_call and i == 0 else {})},
            }
            for i, t in enumerate(reply.texts)
        ],
        "usage": reply.usage, "system_fingerprint": "fp_extproc_sim",
    }


def _completion_object(reply: _Reply) -> dict[str, Any]:
    return {
        "id": reply.id, "object": "text_completion", "created": reply.created, "model": reply.model,
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": reply.finish_reason}
            for i, t in enumerate(reply.texts)
        ],
        "usage": reply.usage, "system_fingerprint": "fp_extproc_sim",
    }


def _chat_events(reply: _Reply, chunks: int) -> AsyncIterator[dict[str, Any] | None]:
    """Chunk payloads of a streamed chat reply; ``None`` marks a pause point."""

    def delta(i: int, d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
            "model": reply.model, "system_fingerprint": "fp_extproc_sim",
            "choices": [{"index": i, "delta": d, "logprobs": None, "finish_reason": finish}],
        }

    events = _stream_shape(
        reply, chunks,
        first=lambda i: delta(i, {"role": "assistant", "content": "", "refusal": None}),
        piece=lambda i, s: delta(i, {"content": s}),
        last=lambda i: delta(i, {}, reply.finish_reason),
    )
    if reply.tool_call is None:
        return events
    call, function = reply.tool_call, reply.tool_call["function"]
    half = len(function["arguments"]) // 2
    calls = [  # as OpenAI streams a call: id and name first, then the arguments in pieces
        delta(0, {"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                  "function": {"name": function["name"], "arguments": ""}}]}),
        delta(0, {"tool_calls": [{"index": 0, "function": {"arguments": function["arguments"][:half]}}]}),
        delta(0, {"tool_calls": [{"index": 0, "function": {"arguments": function["arguments"][half:]}}]}),
    ]
    return _before_finish(events, calls)


async def _before_finish(
    events: AsyncIterator[dict[str, Any] | None], extra: list[dict[str, Any]]
) -> AsyncIterator[dict[str, Any] | None]:
    """The events, with `extra` chunks just before the first finishing chunk."""
    async for event in events:
        if event is not None and any(c.get("finish_reason") for c in event["choices"]) and extra:
            for chunk in extra:
                yield chunk
            extra = []
        yield event


def _completion_events(reply: _Reply, chunks: int) -> AsyncIterator[dict[str, Any] | None]:
    """Chunk payloads of a streamed legacy completion; no role chunk exists there."""

    def choice(i: int, s: str, finish: str | None = None) -> dict[str, Any]:
        return {
            "id": reply.id, "object": "text_completion", "created": reply.created, "model": reply.model,
            "system_fingerprint": "fp_extproc_sim",
            "choices": [{"index": i, "text": s, "logprobs": None, "finish_reason": finish}],
        }

    return _stream_shape(
        reply, chunks, first=None, piece=choice, last=lambda i: choice(i, "", reply.finish_reason)
    )


async def _stream_shape(
    reply: _Reply,
    chunks: int,
    first: Callable[[int], dict[str, Any]] | None,
    piece: Callable[[int, str], dict[str, Any]],
    last: Callable[[int], dict[str, Any]],
) -> AsyncIterator[dict[str, Any] | None]:
    """Shared event order: opening chunks, content chunks (pause between), finish chunks."""
    if first is not None:
        for i in range(len(reply.texts)):
            yield first(i)
    pieces = [text.split_chunks(t, chunks) for t in reply.texts]
    for step in range(max(len(p) for p in pieces)):
        if step:
            yield None
        for i, parts in enumerate(pieces):
            if step < len(parts):
                yield piece(i, parts[step])
    for i in range(len(reply.texts)):
        yield last(i)


async def _stream(
    request: web.Request,
    reply: _Reply,
    events: AsyncIterator[dict[str, Any] | None],
    include_usage: bool,
    delay: float,
    usage_object: str,
    knobs: wire.Knobs | None = None,
) -> web.StreamResponse:
    """Write each SSE event separately, so clients see chunks arrive over time."""
    knobs = knobs or wire.Knobs(1, 0, 0, None)
    shape = knobs.usage
    headers = {"Content-Type": knobs.content_type or "text/event-stream", "Cache-Control": "no-cache"}
    resp, compressor = await wire.open_stream(request, knobs.compress, headers)
    sent = 0

    async def send(data: bytes) -> None:
        nonlocal sent
        await resp.write(compressor.write(data) if compressor else data)
        sent += 1
        if knobs.reset_after is not None and sent >= knobs.reset_after:
            raise _Reset

    include_usage = include_usage and not shape.omit
    events_list = [e async for e in events]
    last = sum(e is not None for e in events_list)  # the number of the last chunk, counted from 1
    usage_inline = include_usage and shape.in_last_choice
    try:
        number = 0
        async for event in wire.paced(events_list, request, request.app[wire.SETTINGS], delay):
            number += 1
            if include_usage:
                event["usage"] = reply.usage if usage_inline and number == last else None
            await send(b"data: " + orjson.dumps(event) + b"\n\n")
        if include_usage and not usage_inline:
            usage_chunk = {
                "id": reply.id, "object": usage_object, "created": reply.created, "model": reply.model,
                "system_fingerprint": "fp_extproc_sim", "choices": [], "usage": reply.usage,
            }
            await send(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
        if knobs.garbage == "truncated-sse":  # no [DONE]: the body ends inside an event
            await resp.write(b'data: {"id": "' + reply.id.encode() + b'", "object": "chat.compl')
        else:
            await send(b"data: [DONE]\n\n")
        if compressor:
            await resp.write(compressor.end())
        await resp.write_eof()
    except _Reset:
        await _abort(request)
    except ConnectionError:
        pass  # the client went away mid-stream; nothing left to tell it
    return resp


class _Reset(Exception):
    """x-sim-reset-after-chunks reached: the connection is to be aborted."""


async def _abort(request: web.Request, sent: bool = True) -> None:
    """Die like a crashed provider: an RST, no clean end of the body."""
    if sent:
        await asyncio.sleep(RESET_PAUSE_S)  # what was sent reaches the peer before the RST
    if request.transport is not None:
        request.transport.abort()


def _garbage_response(kind: str, status: int) -> web.StreamResponse:
    body, content_type = {
        "json": (_GARBAGE_JSON, "application/json"),
        "sse": (_GARBAGE_SSE, "text/event-stream"),
        "html": (_GARBAGE_HTML, "text/html"),
    }[kind]
    return web.Response(status=status, body=body, headers={"Content-Type": content_type})


async def _apply_faults(request: web.Request, resp: web.StreamResponse, knobs: wire.Knobs) -> web.StreamResponse:
    """The fault knobs that change a finished, not yet sent, reply."""
    if not isinstance(resp, web.Response) or resp.prepared:
        return resp  # a stream applied its faults itself
    if knobs.content_type is not None:
        resp.headers["Content-Type"] = knobs.content_type
    body = resp.body if isinstance(resp.body, bytes) else b""
    if knobs.garbage == "truncated-json":
        resp.body = body[: len(body) // 2]
    if knobs.reset_after:  # headers and half the body, then the connection dies
        partial = web.StreamResponse(status=resp.status, headers=resp.headers)
        partial.content_length = len(body)
        await partial.prepare(request)
        try:
            await partial.write(body[: len(body) // 2])
        except ConnectionError:
            return partial
        await _abort(request)
        return partial
    return resp


async def chat_completions(request: web.Request, body: dict[str, Any], knobs: wire.Knobs) -> web.StreamResponse:
    """``POST .../chat/completions``."""
    reply = _chat_reply(body, _require_model(body), request.headers.get("x-sim-tool-call") == "1")
    reply.shape = knobs.usage
    if body.get("stream") is True:
        events = _chat_events(reply, knobs.chunks)
        return await _stream(
            request, reply, events, _include_usage(body), knobs.chunk_delay, "chat.completion.chunk", knobs
        )
    return _json(_without_usage(_chat_object(reply), knobs), compress=knobs.compress)


async def completions(request: web.Request, body: dict[str, Any], knobs: wire.Knobs) -> web.StreamResponse:
    """``POST .../completions`` (legacy text completions)."""
    reply = _completion_reply(body, _require_model(body))
    reply.shape = knobs.usage
    if body.get("stream") is True:
        events = _completion_events(reply, knobs.chunks)
        return await _stream(request, reply, events, _include_usage(body), knobs.chunk_delay, "text_completion", knobs)
    return _json(_without_usage(_completion_object(reply), knobs), compress=knobs.compress)


def _embedding_inputs(body: dict[str, Any]) -> list[tuple[str, int]]:
    """``input`` as (seed text, token count) per item."""
    value = body.get("input")
    inputs = _texts(value, empty_ids=False)
    if inputs is None:
        raise ApiError(
            400, "input must be a string, an array of strings or an array of token id arrays", param="input",
            code="missing_required_parameter" if value is None else None,
        )
    return inputs


async def embeddings(request: web.Request, body: dict[str, Any], knobs: wire.Knobs) -> web.StreamResponse:
    """``POST .../embeddings``: deterministic unit vectors, float or base64."""
    model = _require_model(body)
    inputs = _embedding_inputs(body)
    dims = body.get("dimensions") or DEFAULT_DIMENSIONS
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= MAX_DIMENSIONS:
        raise ApiError(400, f"dimensions must be an integer between 1 and {MAX_DIMENSIONS}", param="dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    data = []
    for index, (seed, _) in enumerate(inputs):
        vector = text.embedding_vector(seed, dims)
        encoded: Any = text.encode_base64_f32(vector) if fmt == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(count for _, count in inputs)
    return _json(_without_usage({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, knobs), compress=knobs.compress)


def _without_usage(obj: dict[str, Any], knobs: wire.Knobs) -> dict[str, Any]:
    if knobs.usage.omit:
        obj.pop("usage", None)
    return obj


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1_700_000_000, "owned_by": "extproc-sim"}


Handler = Callable[[web.Request, dict[str, Any], wire.Knobs], Awaitable[web.StreamResponse]]
_POST_ROUTES: tuple[tuple[str, Handler], ...] = (
    ("/chat/completions", chat_completions),
    ("/completions", completions),
    ("/embeddings", embeddings),
)


async def dispatch(request: web.Request, settings: wire.SimSettings) -> web.StreamResponse:
    """Route by method and path suffix; turn every failure into an OpenAI error."""
    try:
        knobs = wire.read_knobs(request, settings)
    except wire.KnobError as exc:
        return error_response(400, str(exc))
    return await _apply_faults(request, await _answer(request, knobs), knobs)


async def _answer(request: web.Request, knobs: wire.Knobs) -> web.StreamResponse:
    try:
        await wire.wait_first_byte(knobs)
        if knobs.reset_after == 0:
            await request.read()
            await _abort(request, sent=False)
            return web.Response(status=502)  # never sent: the connection is gone
        if knobs.garbage in ("json", "sse", "html"):
            return _garbage_response(knobs.garbage, knobs.error_status or 200)
        if knobs.error_status is not None:
            raise _simulated_error(knobs.error_status, "x-sim-error header")
        path = request.path.rstrip("/")
        if request.method == "POST":
            for suffix, handler in _POST_ROUTES:
                if path.endswith(suffix):
                    return await handler(request, parse_body(await request.read()), knobs)
        elif request.method == "GET":
            if path.endswith("/models"):
                return _json({"object": "list", "data": [_model_object(m) for m in DEMO_MODELS]})
            if "/models/" in path:
                return _json(_model_object(path.split("/models/", 1)[1]))
        raise ApiError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.param, exc.code)
    except web.HTTPException as exc:  # e.g. body larger than client_max_size
        return error_response(exc.status, exc.reason)
