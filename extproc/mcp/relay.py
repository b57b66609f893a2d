"""The relay of one client message to one MCP server, and of its answer back as it arrives.

Why a module of its own: it is the part of the gateway that streams. A JSON answer goes
back as JSON; an event stream goes back event by event (progress, log messages, then the
result), or as the final JSON alone for a client that does not accept
`text/event-stream`. Requests a server sends the client inside that stream (sampling,
elicitation, roots) get the id `mcpgw/<server>/<original id as JSON>`, which
`server_request_origin` reads back when the client answers. A server's
`notifications/tools/list_changed` seen on the way drops its remembered tool names.
A server failing mid-way is a JSON-RPC error naming it (-32050, -32051), never an HTTP 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import aiohttp
import orjson
from aiohttp import web

from extproc.mcp.jsonrpc import INTERNAL_ERROR, SERVER_UNAVAILABLE, Message, RequestId, error_response
from extproc.mcp.observation import Observation
from extproc.mcp.replies import error_reply, json_reply
from extproc.mcp.sessions import ServerSession
from extproc.mcp.toolnames import ToolsKey
from extproc.mcp.upstream import (
    ServerPool,
    SessionGone,
    UpstreamError,
    answer_in,
    is_json,
    is_sse,
    read_body,
    read_error,
    sse_events,
)
from extproc.sse import SSEDecoder, SSEEvent

log = logging.getLogger("extproc.mcp.gateway")  # the gateway's log lines keep their logger name

__all__ = ["SERVER_REQUEST_PREFIX", "Relay", "server_request_origin"]

MAX_RELAYED_JSON: Final = 64 * 1024 * 1024
SERVER_REQUEST_PREFIX: Final = "mcpgw/"  # ids of server-to-client requests relayed to the client
TOOLS_CHANGED: Final = "notifications/tools/list_changed"
_TOOLS_CHANGED_BYTES: Final = TOOLS_CHANGED.encode()


class Relay:
    """Forwards a message to one server of a session and relays the server's answer."""

    __slots__ = ("_pool",)

    def __init__(self, pool: ServerPool) -> None:
        self._pool = pool

    async def relay(self, request: web.Request, server: str, server_session: ServerSession, body: bytes,
                    message: Message, observation: Observation) -> web.StreamResponse:
        """Send `body` (the client's message as `server` must see it) and answer the client
        with what the server answers."""
        client = self._pool.clients[server]
        try:
            response = await client.open(body, server_session, observation.trace_out)
        except UpstreamError as exc:
            return error_reply(observation, message.id, exc.code, exc.message)
        try:
            status = response.status
            if status == 404 and server_session.session_id:
                raise SessionGone(server)
            if status >= 300 or status == 202:
                error = await read_error(response) if status >= 300 else None
                if error is not None:
                    answer = {"jsonrpc": "2.0", "id": message.id, "error": error["error"]}
                    observation.answered(answer)
                    return json_reply(orjson.dumps(answer))
                return error_reply(observation, message.id, SERVER_UNAVAILABLE,
                                   f"MCP server {server!r} answered HTTP {status}")
            if is_json(response):
                data = await read_body(response, MAX_RELAYED_JSON)
                if data is None:
                    return error_reply(observation, message.id, SERVER_UNAVAILABLE,
                                       f"MCP server {server!r} answered with more than {MAX_RELAYED_JSON} bytes")
                relayed = answer_in(data, message.id)
                if relayed is None:
                    return error_reply(observation, message.id, SERVER_UNAVAILABLE,
                                       f"MCP server {server!r} answered with a malformed JSON-RPC message")
                observation.answered(relayed)
                return json_reply(data)
            if is_sse(response):
                tools_key: ToolsKey = (server, server_session.session_id)
                if _accepts_sse(request):
                    return await self._relay_stream(request, response, tools_key, message, observation)
                return await self._collect_stream(response, tools_key, message, observation)
            kind = response.headers.get("content-type", "none")
            return error_reply(observation, message.id, SERVER_UNAVAILABLE,
                               f"MCP server {server!r} answered with content-type {kind}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            failure = client.failure(exc)
            return error_reply(observation, message.id, failure.code, failure.message)
        finally:
            response.close()  # not release(): an unfinished stream must not be drained

    async def _collect_stream(self, response: aiohttp.ClientResponse, tools_key: ToolsKey, message: Message,
                              observation: Observation) -> web.Response:
        """An event stream for a client that only takes JSON: the final answer, alone."""
        async for event in sse_events(response):
            data = event.data if event.has_data else b""
            if _TOOLS_CHANGED_BYTES in data:  # at worst a needless fresh listing
                self._pool.listed.forget(tools_key)
            answer = answer_in(data, message.id)
            if answer is not None:
                observation.answered(answer)
                return json_reply(data)
        return error_reply(observation, message.id, SERVER_UNAVAILABLE,
                           f"MCP server {tools_key[0]!r} ended its event stream without an answer")

    async def _relay_stream(self, request: web.Request, response: aiohttp.ClientResponse, tools_key: ToolsKey,
                            message: Message, observation: Observation) -> web.StreamResponse:
        """The server's event stream to the client as it arrives, event by event."""
        server = tools_key[0]
        stream = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
        })
        await stream.prepare(request)
        decoder = SSEDecoder(keep_raw=True)
        chunks = response.content.iter_any()
        failure: UpstreamError | None = None
        try:
            while True:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    events = decoder.flush()
                    done = True
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:  # the server's side
                    failure = self._pool.clients[server].failure(exc)
                    break
                else:
                    events = decoder.feed(chunk)
                    done = False
                if events:
                    await stream.write(b"".join(self._relay_event(e, tools_key, message, observation) for e in events))
                if done:
                    break
            if not observation.got_answer:
                if failure is None:
                    failure = UpstreamError(server, SERVER_UNAVAILABLE, "ended its event stream without an answer")
                observation.fail(failure.code, failure.message)
                await stream.write(
                    b"event: message\ndata: " + error_response(message.id, failure.code, failure.message) + b"\n\n"
                )
            await stream.write_eof()
        except ConnectionError:  # the client left (aiohttp's ClientConnectionResetError is one)
            log.debug("client left during a %s stream from MCP server %r", message.method, server)
            if not observation.got_answer:
                observation.http_failure(499, "the client closed the connection")
        except Exception:
            log.exception("relaying the event stream of MCP server %r failed", server)
            if not observation.got_answer:
                observation.fail(INTERNAL_ERROR, "internal error while relaying the stream")
        return stream

    def _relay_event(self, event: SSEEvent, tools_key: ToolsKey, message: Message,
                     observation: Observation) -> bytes:
        """One event for the client: server requests get routable ids; the answer is noted;
        a tools/list_changed drops the server session's remembered tool names."""
        server = tools_key[0]
        if not event.has_data:
            return event.raw
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return event.raw
        if not isinstance(data, dict):
            return event.raw
        if data.get("method") == TOOLS_CHANGED:
            self._pool.listed.forget(tools_key)
        if "method" in data and "id" in data:  # a request the server sends the client
            data["id"] = f"{SERVER_REQUEST_PREFIX}{server}/{orjson.dumps(data['id']).decode()}"
            return _with_data(event, orjson.dumps(data))
        if "method" not in data and data.get("id") == message.id and ("result" in data or "error" in data):
            observation.answered(data)
        return event.raw


def _accepts_sse(request: web.Request) -> bool:
    accept = request.headers.get("accept", "")
    if not accept:
        return True
    kinds = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(kinds & {"text/event-stream", "*/*", "text/*"})


def _with_data(event: SSEEvent, data: bytes) -> bytes:
    """`event`'s block with its data replaced (other fields and their order kept)."""
    lines = event.raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    out: list[bytes] = []
    placed = False
    for line in lines:
        if not line:
            continue
        field = line.split(b":", 1)[0]
        if field == b"data":
            if not placed:
                out.append(b"data: " + data)
                placed = True
            continue
        out.append(line)
    return b"\n".join(out) + b"\n\n"


def server_request_origin(request_id: RequestId | None) -> tuple[str, RequestId] | None:
    """`mcpgw/<server>/<JSON id>` -> (server, original id), else None."""
    if not isinstance(request_id, str) or not request_id.startswith(SERVER_REQUEST_PREFIX):
        return None
    server, sep, raw = request_id[len(SERVER_REQUEST_PREFIX):].partition("/")
    if not sep or not server:
        return None
    try:
        original = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(original, bool) or not isinstance(original, (str, int)):
        return None
    return server, original
