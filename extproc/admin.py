"""The admin port's HTTP/1.1: a few GET routes served, and one GET fetched from a peer worker.

h11 does the HTTP parsing and framing; asyncio streams do the I/O. A full web framework
(aiohttp) cost every worker 12 MiB of RSS for two routes, which is most of the gap to
the performance issue's memory target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11

log = logging.getLogger(__name__)

_MAX_REQUEST_BYTES = 64 * 1024  # an admin request is a line and a few headers
_READ_TIMEOUT = 10.0


@dataclass(slots=True)
class AdminRequest:
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    accept: str = ""  # the Accept header (/metrics answers OpenMetrics when asked)


@dataclass(slots=True)
class AdminResponse:
    status: int
    body: bytes
    content_type: str = "application/json"


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


class AdminServer:
    """GET-only routes on a TCP port; every answer closes its connection (scrapes are rare)."""

    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self.routes = dict(routes)
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen and return the bound port (useful when `port` is 0)."""
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
        try:
            request = await asyncio.wait_for(_next_request(connection, reader), _READ_TIMEOUT)
            if request is None:
                return
            response = await self._answer(request)
            writer.write(_encode_response(connection, response))
            await writer.drain()
        except (h11.RemoteProtocolError, TimeoutError, ConnectionError):
            pass  # a broken or slow admin client gets its connection closed
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, request: h11.Request) -> AdminResponse:
        target = urlsplit(request.target.decode("latin-1"))
        handler = self.routes.get(target.path)
        if handler is None:
            return AdminResponse(404, b'{"error": "not found"}')
        if request.method != b"GET":
            return AdminResponse(405, b'{"error": "method not allowed"}')
        try:
            accept = b",".join(value for name, value in request.headers if name == b"accept").decode("latin-1")
            return await handler(AdminRequest(target.path, parse_qs(target.query), accept))
        except Exception:  # never let one scrape take the worker down
            log.exception("admin request %s failed", target.path)
            return AdminResponse(500, b'{"error": "internal error"}')


async def _next_request(connection: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            data = await reader.read(8192)
            connection.receive_data(data)  # b"" marks the end of the peer's data
            continue
        return None  # ConnectionClosed or a paused connection


def _encode_response(connection: h11.Connection, response: AdminResponse) -> bytes:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("connection", "close"),
    ]
    return b"".join(
        (
            connection.send(h11.Response(status_code=response.status, headers=headers)) or b"",
            connection.send(h11.Data(data=response.body)) or b"",
            connection.send(h11.EndOfMessage()) or b"",
        )
    )


async def fetch(host: str, port: int, target: str, timeout: float) -> tuple[int, bytes]:
    """GET `target` from host:port; returns (status, body). Raises OSError/TimeoutError/h11 errors."""
    return await asyncio.wait_for(_fetch(host, port, target), timeout)


async def _fetch(host: str, port: int, target: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        connection = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=target, headers=[("host", f"{host}:{port}"), ("connection", "close")])
        writer.write((connection.send(request) or b"") + (connection.send(h11.EndOfMessage()) or b""))
        await writer.drain()
        status = 0
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(body)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
