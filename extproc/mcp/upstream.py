"""HTTP to one MCP server (Streamable HTTP transport, client side), for the gateway.

Every request carries the server's own credentials (`Authorization: Bearer` from its
`api_key`, plus its configured headers), its own `Mcp-Session-Id` and the protocol version
it agreed to; nothing of the client's headers but the trace context. Redirects are not
followed (a credential must not travel to another origin).

Failures become `UpstreamError` (a JSON-RPC code and a message naming the server) or,
when the server no longer knows our session (HTTP 404), `SessionGone`.

`ServerPool` holds the clients of all configured servers, and the tool names each listed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson

from extproc import __version__
from extproc.contract import MCP_SESSION_HEADER
from extproc.mcp.config import McpServer
from extproc.mcp.jsonrpc import SERVER_TIMEOUT, SERVER_UNAVAILABLE, RequestId
from extproc.mcp.sessions import ServerSession
from extproc.mcp.toolnames import ListedTools
from extproc.sse import SSEDecoder, SSEEvent

log = logging.getLogger(__name__)

__all__ = [
    "GATEWAY_NAME", "Reply", "ServerClient", "ServerPool", "SessionGone", "UpstreamError", "is_sse", "is_json",
    "sse_events",
]

GATEWAY_NAME: Final = "extproc-mcp-gateway"  # to servers (User-Agent) and clients (serverInfo)
USER_AGENT = f"{GATEWAY_NAME}/{__version__}"
MAX_ERROR_BODY = 64 * 1024  # what is read of a non-2xx answer
MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # a JSON answer the gateway itself has to read (initialize, lists)


class UpstreamError(Exception):
    """A server could not be reached, timed out, or answered with something unusable."""

    def __init__(self, server: str, code: int, reason: str) -> None:
        super().__init__(f"MCP server {server!r} {reason}")
        self.server = server
        self.code = code
        self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class SessionGone(Exception):
    """The server answered 404 to our session id: it ended or forgot the session."""

    def __init__(self, server: str) -> None:
        super().__init__(f"MCP server {server!r} no longer knows this session; start a new one")
        self.server = server


@dataclass(slots=True)
class Reply:
    status: int
    session_id: str | None  # the Mcp-Session-Id the server answered with
    message: dict[str, Any] | None  # the JSON-RPC answer to our request (None for a notification)


def _content_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("content-type", "").partition(";")[0].strip().lower()


def is_sse(response: aiohttp.ClientResponse) -> bool:
    return _content_type(response) == "text/event-stream"


def is_json(response: aiohttp.ClientResponse) -> bool:
    kind = _content_type(response)
    return kind == "application/json" or kind.endswith("+json")


class ServerClient:
    """Talks to one configured MCP server."""

    def __init__(self, server: McpServer, api_key: str | None, http: aiohttp.ClientSession, timeout: float,
                 connect_timeout: float) -> None:
        """`timeout`: waiting for an answer (first byte, each silence; a whole `call`);
        `connect_timeout`: opening a connection. Separate, so a long tool call is not cut by
        the short bound that makes a dead server fail fast."""
        self.server = server
        self.name = server.name
        self.http = http
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=timeout)
        headers: dict[str, str] = {"user-agent": USER_AGENT}
        headers.update({name.lower(): value for name, value in server.headers.items()})
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._base_headers = headers

    def headers(self, session: ServerSession | None, trace: Mapping[str, str], *, post: bool = True,
                protocol_version: str | None = None) -> dict[str, str]:
        headers = dict(self._base_headers)
        if post:
            headers["content-type"] = "application/json"
            headers["accept"] = "application/json, text/event-stream"
        if session is not None:
            if session.session_id:
                headers[MCP_SESSION_HEADER] = session.session_id
            protocol_version = session.protocol_version or protocol_version
        if protocol_version:
            headers["mcp-protocol-version"] = protocol_version
        headers.update(trace)
        return headers

    def failure(self, exc: BaseException) -> UpstreamError:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):  # before its base class, a timeout
            return UpstreamError(self.name, SERVER_UNAVAILABLE,
                                 f"is unavailable (no connection within {self.connect_timeout:g}s)")
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            return UpstreamError(self.name, SERVER_TIMEOUT, f"did not answer within {self.timeout:g}s")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return UpstreamError(self.name, SERVER_UNAVAILABLE, "is unavailable (cannot connect)")
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return UpstreamError(self.name, SERVER_UNAVAILABLE, "is unavailable (it closed the connection)")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return UpstreamError(self.name, SERVER_UNAVAILABLE, "is unavailable (its answer was cut off)")
        return UpstreamError(self.name, SERVER_UNAVAILABLE, f"is unavailable ({type(exc).__name__})")

    async def open(self, body: bytes, session: ServerSession | None, trace: Mapping[str, str],
                   protocol_version: str | None = None) -> aiohttp.ClientResponse:
        """POST one message and return the response once its headers are in (the caller
        reads and releases it). Raises UpstreamError."""
        try:
            return await self.http.post(
                self.server.url,
                data=body,
                headers=self.headers(session, trace, protocol_version=protocol_version),
                allow_redirects=False,
                timeout=self._client_timeout,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise self.failure(exc) from None

    async def call(self, body: bytes, request_id: RequestId | None, session: ServerSession | None,
                   trace: Mapping[str, str], protocol_version: str | None = None) -> Reply:
        """POST one message and read the whole answer to `request_id` (JSON, or SSE until
        that answer arrives; other events are dropped), within the request timeout.
        `request_id` None: a notification or response, answered 202. Raises UpstreamError,
        SessionGone."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.open(body, session, trace, protocol_version)
                try:
                    return await self._read(response, request_id, session)
                finally:
                    response.release()
        except TimeoutError:
            raise self.failure(TimeoutError()) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self.failure(exc) from None

    async def _read(self, response: aiohttp.ClientResponse, request_id: RequestId | None,
                    session: ServerSession | None) -> Reply:
        status = response.status
        session_id = response.headers.get(MCP_SESSION_HEADER)
        if status == 404 and session is not None and session.session_id:
            raise SessionGone(self.name)
        if status >= 300:
            error = await read_error(response)
            if error is not None:
                return Reply(status, session_id, error)
            raise UpstreamError(self.name, SERVER_UNAVAILABLE, f"answered HTTP {status}")
        if request_id is None:
            return Reply(status, session_id, None)
        if status == 202:
            raise UpstreamError(self.name, SERVER_UNAVAILABLE, "answered a request with 202 Accepted and no result")
        if is_json(response):
            data = await read_body(response, MAX_MESSAGE_BYTES)
            if data is None:
                raise UpstreamError(self.name, SERVER_UNAVAILABLE, "answered with more than 32 MiB")
            message = _load(data)
            if message is None or message.get("id") != request_id:
                raise UpstreamError(self.name, SERVER_UNAVAILABLE, "answered with a malformed JSON-RPC message")
            return Reply(status, session_id, message)
        if is_sse(response):
            async for event in sse_events(response):
                message = answer_in(event.data if event.has_data else b"", request_id)
                if message is not None:
                    return Reply(status, session_id, message)
            raise UpstreamError(self.name, SERVER_UNAVAILABLE, "ended its event stream without an answer")
        kind = _content_type(response) or "none"
        raise UpstreamError(self.name, SERVER_UNAVAILABLE, f"answered with content-type {kind}")

    async def delete(self, session: ServerSession) -> int | None:
        """End our session on the server (DELETE); returns its status, None if unreachable."""
        if not session.session_id:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                async with self.http.delete(
                    self.server.url, headers=self.headers(session, {}, post=False), allow_redirects=False,
                    timeout=self._client_timeout,
                ) as response:
                    return response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info("%s", self.failure(exc))
            return None


@dataclass(slots=True)
class ServerPool:
    """The configured servers' clients and the tool names each server session listed.

    One per gateway, shared by dispatch, listings and relay. A config reload replaces both
    attributes (a server name may now stand for another server); they are read at each use,
    so a request sees the current ones."""

    clients: dict[str, ServerClient] = field(default_factory=dict)
    listed: ListedTools = field(default_factory=ListedTools)  # to check tools/call names


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than `limit` bytes."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_any():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[SSEEvent]:
    """The events of a server's event stream, as they arrive."""
    decoder = SSEDecoder()
    async for chunk in response.content.iter_any():
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.flush():
        yield event


def _load(data: bytes) -> dict[str, Any] | None:
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None


def answer_in(data: bytes, request_id: RequestId | None) -> dict[str, Any] | None:
    """The JSON-RPC answer (result or error) to `request_id` in an SSE event's data, else None."""
    if not data:
        return None
    message = _load(data)
    if message is None or "method" in message or message.get("id") != request_id:
        return None
    if "result" not in message and "error" not in message:
        return None
    return message


async def read_error(response: aiohttp.ClientResponse) -> dict[str, Any] | None:
    """A JSON-RPC error object in a non-2xx answer, if it holds one."""
    if not is_json(response):
        return None
    try:
        data = await read_body(response, MAX_ERROR_BODY)
    except (aiohttp.ClientError, OSError):
        return None
    message = _load(data) if data is not None else None
    if message is None or not isinstance(message.get("error"), dict):
        return None
    return message
