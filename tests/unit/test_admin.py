"""The admin port's small HTTP server and peer fetch, over real sockets."""

from __future__ import annotations

import asyncio

import pytest

from extproc import admin
from extproc.admin import AdminRequest, AdminResponse, AdminServer


async def _hello(request: AdminRequest) -> AdminResponse:
    return AdminResponse(200, f"hello {request.query.get('name', ['?'])[0]}".encode(), "text/plain")


async def _broken(_request: AdminRequest) -> AdminResponse:
    raise RuntimeError("bug in a handler")


@pytest.fixture
async def server_port():
    server = AdminServer({"/hello": _hello, "/broken": _broken})
    port = await server.start("127.0.0.1", 0)
    yield port
    await server.close()


async def test_get_route_with_query(server_port: int) -> None:
    status, body = await admin.fetch("127.0.0.1", server_port, "/hello?name=worker", timeout=5)
    assert (status, body) == (200, b"hello worker")


async def test_unknown_path_is_404(server_port: int) -> None:
    status, body = await admin.fetch("127.0.0.1", server_port, "/nope", timeout=5)
    assert status == 404 and b"not found" in body


async def test_garbage_and_broken_handlers_do_not_stop_the_server(server_port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
    writer.write(b"\x00\x01 not http\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer to garbage
    writer.close()
    status, body = await admin.fetch("127.0.0.1", server_port, "/broken", timeout=5)
    assert status == 500 and b"internal error" in body
    status, _ = await admin.fetch("127.0.0.1", server_port, "/hello", timeout=5)
    assert status == 200


async def test_post_is_refused(server_port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
    writer.write(b"POST /hello HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 405 ")


async def test_fetch_from_a_closed_port_raises_oserror() -> None:
    probe = AdminServer({})
    port = await probe.start("127.0.0.1", 0)
    await probe.close()
    with pytest.raises(OSError):
        await admin.fetch("127.0.0.1", port, "/metrics", timeout=5)
