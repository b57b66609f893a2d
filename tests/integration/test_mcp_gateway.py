"""The MCP gateway (extproc.mcp.McpGateway) driven directly, with real MCP servers and clients.

Two MCP servers built with the official `mcp` SDK (MCPServer, Streamable HTTP, uvicorn in a
thread): server `a` answers JSON (`add`, `echo`), server `b` answers with event streams
(`weather` reports progress, `confirm` asks the client through elicitation, `secret_tool`
is denied by the route, plus a prompt). A third configured server, `down`, listens nowhere.
Clients are the SDK's `streamable_http_client` + `ClientSession`, or raw HTTP for what the
SDK would never send. No Envoy here (the Envoy-level test lives elsewhere).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiohttp.web
import orjson
import pytest

pytest.importorskip("mcp.server.mcpserver", reason="needs the official MCP SDK 2.x: pip install 'mcp>=2.3'")

import httpx2  # noqa: E402 (the mcp SDK's HTTP client)
import uvicorn  # noqa: E402 (installed with mcp)
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import ElicitResult, ToolListChangedNotification
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from extproc.config import TelemetrySettings
from extproc.mcp import McpGateway, McpSettings
from extproc.mcp.sessions import GatewaySession, ServerSession, SessionCodec
from extproc.telemetry import Telemetry
from extproc.telemetry.tracing import Tracing

pytestmark = pytest.mark.timeout(60)

KEY_A = "sk-mcp-a-7c1e"  # what the gateway sends server a
CLIENT_KEY = "sk-client-only-55aa"  # what the client sends the gateway; must never reach a server
SESSION_SECRET = "test-session-secret"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


# -- MCP servers ---------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> dict[str, Any]:
        return orjson.loads(self.body) if self.body else {}


class Recorder:
    """ASGI wrapper keeping every HTTP request a server got (headers and body)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[Seen] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry = Seen(scope["method"], {k.decode().lower(): v.decode() for k, v in scope["headers"]})
        self.seen.append(entry)

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                entry.body += message.get("body", b"")
            return message

        await self.app(scope, recording_receive, send)

    def calls(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST" and s.body and s.json().get("method") == method]


class ServerThread:
    def __init__(self, server: MCPServer, json_response: bool, stateless: bool = False) -> None:
        self.recorder = Recorder(server.streamable_http_app(json_response=json_response, stateless_http=stateless))
        config = uvicorn.Config(self.recorder, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "MCP server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/mcp"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Servers:
    a: ServerThread
    b: ServerThread
    down_url: str
    stateless: ServerThread  # issues no Mcp-Session-Id
    loose: ServerThread  # matches called tool names loosely (LooseServer)
    secret_calls: list[int] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # what loose's delete_repo was asked to delete


class Confirm(BaseModel):
    ok: bool


def build_a() -> MCPServer:
    server = MCPServer("server-a", log_level="WARNING", instructions="Arithmetic and echo.")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def echo(text: str) -> str:
        """Say it back."""
        return text

    return server


def build_b(secret_calls: list[int]) -> MCPServer:
    server = MCPServer("server-b", log_level="WARNING")

    @server.tool()
    async def weather(city: str, ctx: Context) -> str:
        """Weather, with progress."""
        await ctx.report_progress(1, 2, "looking outside")
        await ctx.report_progress(2, 2, "done")
        return f"sunny in {city}"

    @server.tool()
    async def confirm(ctx: Context) -> str:
        """Asks the user first."""
        answer = await ctx.elicit("Proceed?", Confirm)
        return "confirmed" if answer.action == "accept" and answer.data and answer.data.ok else "declined"

    @server.tool()
    def secret_tool() -> str:
        """Denied by the gateway route."""
        secret_calls.append(1)
        return "secret"

    @server.prompt()
    def greet(name: str) -> str:
        """A greeting prompt."""
        return f"Say hello to {name}"

    return server


class LooseServer(MCPServer):
    """Matches a called tool name loosely (ignoring case and a leading '_', '.' or '/'), as
    some servers do. Through the gateway, no such variant may reach a tool the route denies."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        return await super().call_tool(name.lower().lstrip("_./"), arguments, context)


def build_loose(deleted: list[str]) -> MCPServer:
    server = LooseServer("loose", log_level="WARNING")

    @server.tool()
    def delete_repo(repo: str) -> str:
        """Denied by the gateway route."""
        deleted.append(repo)
        return f"deleted {repo}"

    @server.tool()
    def list_repos() -> list[str]:
        """Allowed."""
        return ["gateway"]

    return server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    secret_calls: list[int] = []
    deleted: list[str] = []
    with ServerThread(build_a(), json_response=True) as a, ServerThread(build_b(secret_calls), False) as b, \
            ServerThread(build_a(), json_response=True, stateless=True) as stateless, \
            ServerThread(build_loose(deleted), json_response=True) as loose:
        yield Servers(a, b, f"http://127.0.0.1:{free_port()}/mcp", stateless, loose, secret_calls, deleted)


# -- the gateway ---------------------------------------------------------------------------


@dataclass
class Gateway:
    gateway: McpGateway
    base: str
    spans: InMemorySpanExporter
    telemetry: Telemetry

    def url(self, path: str = "/mcp") -> str:
        return self.base + path

    def metrics(self) -> str:
        return self.telemetry.metrics.render_prometheus()[0].decode()

    async def span(self, name: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in self.spans.get_finished_spans() if s.name == name]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, f"no span {name!r}: {[s.name for s in self.spans.get_finished_spans()]}"
            await asyncio.sleep(0.02)


def settings_for(servers: Servers) -> McpSettings:
    return McpSettings.model_validate({
        "port": 0,
        "request_timeout_seconds": 5,
        "session_secret": {"env": "MCP_TEST_SESSION_SECRET"},
        "servers": [
            {"name": "a", "url": servers.a.url, "api_key": {"env": "MCP_TEST_KEY_A"}},
            {"name": "b", "url": servers.b.url, "headers": {"x-team": "platform"}},
            {"name": "down", "url": servers.down_url},
            {"name": "s", "url": servers.stateless.url},
            {"name": "loose", "url": servers.loose.url},
        ],
        "routes": [
            {"path": "/mcp", "servers": ["a", "b", "down"], "deny_tools": ["b__secret_*"]},
            {"path": "/only-add", "servers": ["a"], "allow_tools": ["a__add"]},
            {"path": "/down", "servers": ["down"]},
            {"path": "/stateless", "servers": ["s"]},
            {"path": "/loose", "servers": ["loose", "a"], "deny_tools": ["loose__delete_*"]},
        ],
    })


@pytest.fixture
async def gw(servers: Servers) -> AsyncIterator[Gateway]:
    from extproc.mcp import resolve_mcp_secrets

    settings = settings_for(servers)
    secrets = resolve_mcp_secrets(settings, {"MCP_TEST_KEY_A": KEY_A, "MCP_TEST_SESSION_SECRET": SESSION_SECRET})
    assert secrets == {"a": KEY_A, "session_secret": SESSION_SECRET}
    telemetry = Telemetry(TelemetrySettings(), environ={})
    exporter = InMemorySpanExporter()
    telemetry.tracing = Tracing(TelemetrySettings(), environ={}, span_processor=SimpleSpanProcessor(exporter))
    gateway = McpGateway(settings, secrets, telemetry)
    port = await gateway.start("127.0.0.1", 0, shutdown_timeout=1)
    try:
        yield Gateway(gateway, f"http://127.0.0.1:{port}", exporter, telemetry)
    finally:
        await gateway.stop()
        telemetry.shutdown()


def http_client(headers: dict[str, str] | None = None) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60))


@asynccontextmanager
async def connect(url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> AsyncIterator[ClientSession]:
    async with http_client(headers) as http, streamable_http_client(url, http_client=http) as (
        read,
        write,
    ), ClientSession(read, write, **kwargs) as session:
        await session.initialize()
        yield session


async def post(url: str, message: Any, session_id: str | None = None, raw: bytes | None = None,
               accept: str = "application/json, text/event-stream") -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/json", "accept": accept}
    if session_id is not None:
        headers["mcp-session-id"] = session_id
    async with aiohttp.ClientSession() as http, http.post(
        url, data=raw if raw is not None else orjson.dumps(message), headers=headers
    ) as response:
        return response.status, dict(response.headers), await response.read()


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}


async def raw_session(url: str) -> str:
    status, headers, body = await post(url, INIT)
    assert status == 200, body
    token = headers["Mcp-Session-Id"]
    status, _, _ = await post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, token)
    assert status == 202
    return token


# -- tests ---------------------------------------------------------------------------------


async def test_initialize_and_aggregated_listing(gw: Gateway, servers: Servers) -> None:
    async with connect(gw.url()) as client:
        result = client.initialize_result
        assert result is not None
        assert result.server_info.name == "extproc-mcp-gateway"
        assert result.protocol_version == "2025-11-25"  # the client's, which both servers accepted
        assert result.capabilities.tools is not None and result.capabilities.tools.list_changed is False
        assert result.capabilities.prompts is not None
        assert result.instructions and "[a] Arithmetic and echo." in result.instructions
        tools = await client.list_tools()
        names = [tool.name for tool in tools.tools]
        # b__secret_tool is denied; `down` could not join the session.
        assert sorted(names) == ["a__add", "a__echo", "b__confirm", "b__weather"]
        assert tools.next_cursor is None
        add = next(tool for tool in tools.tools if tool.name == "a__add")
        assert add.description == "Add two integers." and "a" in add.input_schema["properties"]
        prompts = await client.list_prompts()
        assert [p.name for p in prompts.prompts] == ["b__greet"]
        prompt = await client.get_prompt("b__greet", {"name": "Ada"})
        assert "Say hello to Ada" in prompt.messages[0].content.text  # type: ignore[union-attr]
        await client.send_ping()
    # Every server got initialize with the client's version, then notifications/initialized.
    for server in (servers.a, servers.b):
        init = server.recorder.calls("initialize")[-1]
        assert init.json()["params"]["protocolVersion"] == "2025-11-25"
        assert server.recorder.calls("notifications/initialized")
    # The client's DELETE at exit ended both servers' sessions.
    assert any(s.method == "DELETE" for s in servers.a.recorder.seen)
    assert any(s.method == "DELETE" for s in servers.b.recorder.seen)


async def test_tools_call_routed_with_credentials_and_streaming(gw: Gateway, servers: Servers) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    headers = {"authorization": f"Bearer {CLIENT_KEY}", "x-client-header": "not-forwarded"}
    async with connect(gw.url(), headers=headers) as client:
        added = await client.call_tool("a__add", {"a": 2, "b": 3})
        assert added.is_error is False
        assert added.structured_content == {"result": 5}
        weather = await client.call_tool("b__weather", {"city": "Paris"}, progress_callback=on_progress)
        assert weather.content[0].text == "sunny in Paris"  # type: ignore[union-attr]
    assert progress == [(1, 2, "looking outside"), (2, 2, "done")]  # relayed from b's event stream

    call_a = servers.a.recorder.calls("tools/call")[-1]
    assert call_a.json()["params"]["name"] == "add"  # the original name
    assert call_a.headers["authorization"] == f"Bearer {KEY_A}"
    call_b = servers.b.recorder.calls("tools/call")[-1]
    assert call_b.json()["params"]["name"] == "weather"
    assert call_b.headers["x-team"] == "platform"
    assert "authorization" not in call_b.headers  # b has no api_key; the client's is never forwarded
    for seen in servers.a.recorder.seen + servers.b.recorder.seen:
        assert CLIENT_KEY not in str(seen.headers)
        assert "x-client-header" not in seen.headers
    # Each server gets its own session id, not the gateway's.
    assert call_a.headers["mcp-session-id"] != call_b.headers["mcp-session-id"]
    assert "." not in call_a.headers["mcp-session-id"]


async def test_server_to_client_request_relayed(gw: Gateway) -> None:
    asked: list[str] = []

    async def elicit(context: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"ok": True})

    async with connect(gw.url(), elicitation_callback=elicit) as client:
        result = await client.call_tool("b__confirm", {})
    assert asked == ["Proceed?"]
    assert result.content[0].text == "confirmed"  # type: ignore[union-attr]


async def test_hidden_and_unknown_tools_never_reach_a_server(gw: Gateway, servers: Servers) -> None:
    before_b = len(servers.b.recorder.calls("tools/call"))
    async with connect(gw.url()) as client:
        for name in ("b__secret_tool", "nowhere__x", "add", "a__"):
            with pytest.raises(MCPError) as refused:
                await client.call_tool(name, {})
            assert refused.value.error.code == -32602
            assert name in refused.value.error.message
    async with connect(gw.url("/only-add")) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["a__add"]
        with pytest.raises(MCPError) as refused:
            await client.call_tool("a__echo", {"text": "x"})
        assert refused.value.error.code == -32602 and "a__echo" in refused.value.error.message
    assert servers.secret_calls == []
    assert len(servers.b.recorder.calls("tools/call")) == before_b
    assert not [s for s in servers.a.recorder.calls("tools/call") if s.json()["params"]["name"] == "echo"]


async def test_only_exact_listed_tool_names_are_forwarded(gw: Gateway, servers: Servers) -> None:
    """A called name must be exactly <server>__<tool> for a tool that server listed: variants
    a loose server would accept (case, extra '_', './') are "Unknown tool" at the gateway
    and never reach the server, so they cannot get around a deny rule."""
    variants = ["loose__DELETE_REPO", "loose___delete_repo", "loose__./delete_repo", "loose__/delete_repo",
                "loose__Delete_Repo", "loose__delete_repo", "loose__LIST_REPOS", "loose___list_repos",
                "loose__list_repos ", "a__ADD", "a___add", "a__add\u200b"]
    async with connect(gw.url("/loose")) as client:
        listed = sorted(tool.name for tool in (await client.list_tools()).tools)
        assert listed == ["a__add", "a__echo", "loose__list_repos"]
        for name in variants:
            with pytest.raises(MCPError) as refused:
                await client.call_tool(name, {"repo": "prod", "a": 1, "b": 2})
            assert refused.value.error.code == -32602
            assert refused.value.error.message == f"Unknown tool: {name}"
        assert (await client.call_tool("loose__list_repos", {})).is_error is False  # the exact name works
    assert servers.deleted == []
    called = [s.json()["params"]["name"] for s in servers.loose.recorder.calls("tools/call")]
    assert called == ["list_repos"]
    assert not [s for s in servers.a.recorder.calls("tools/call") if s.json()["params"]["name"] != "add"]


async def test_calls_without_listing_first(gw: Gateway, servers: Servers) -> None:
    """A client that calls before (or without) tools/list still reaches real tools: the gateway
    lists the server itself, once, through that server's own session."""
    token = await raw_session(gw.url())
    call = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "a__add", "arguments": {"a": 4, "b": 5}}}
    for request_id in (1, 2):
        status, _, body = await post(gw.url(), {**call, "id": request_id}, token, accept="application/json")
        assert status == 200 and orjson.loads(body)["result"]["structuredContent"] == {"result": 9}, body
    status, _, body = await post(gw.url(), {**call, "id": 3, "params": {"name": "a__Add"}}, token)
    assert orjson.loads(body)["error"] == {"code": -32602, "message": "Unknown tool: a__Add"}
    server_session = servers.a.recorder.calls("tools/call")[-1].headers["mcp-session-id"]
    listings = [s for s in servers.a.recorder.calls("tools/list") if s.headers.get("mcp-session-id") == server_session]
    # Once for the first call; the second used what it listed; the unknown name listed again.
    assert len(listings) == 2
    assert [s.json()["params"]["name"] for s in servers.a.recorder.calls("tools/call")
            if s.headers["mcp-session-id"] == server_session] == ["add", "add"]


async def test_the_gateway_follows_a_servers_changing_tools() -> None:
    """A tool added after the client listed is callable at once (the gateway lists again for
    a name it does not know); a tool the server withdrew and announced with
    notifications/tools/list_changed is "Unknown tool" at the gateway, not forwarded."""
    server = MCPServer("growing", log_level="WARNING")

    @server.tool()
    def first() -> str:
        """There from the start."""
        return "first"

    @server.tool()
    async def retire_first(ctx: Context) -> str:
        """Withdraws `first` and says so in this call's stream."""
        server.remove_tool("first")
        await ctx.session.send_notification(ToolListChangedNotification(), ctx.request_id)
        return "retired"

    with ServerThread(server, json_response=False) as growing:
        settings = McpSettings.model_validate({
            "port": 0, "servers": [{"name": "g", "url": growing.url}],
            "routes": [{"path": "/mcp", "servers": ["g"]}],
        })
        gateway = McpGateway(settings)
        port = await gateway.start("127.0.0.1", 0, shutdown_timeout=0.5)
        try:
            async with connect(f"http://127.0.0.1:{port}/mcp") as client:
                assert sorted(t.name for t in (await client.list_tools()).tools) == ["g__first", "g__retire_first"]

                def second() -> str:
                    """Added later."""
                    return "second"

                server.add_tool(second)
                result = await client.call_tool("g__second", {})
                assert result.is_error is False and result.content[0].text == "second"  # type: ignore[union-attr]
                assert (await client.call_tool("g__first", {})).is_error is False
                assert (await client.call_tool("g__retire_first", {})).is_error is False
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("g__first", {})
                assert refused.value.error.code == -32602 and refused.value.error.message == "Unknown tool: g__first"
        finally:
            await gateway.stop()
    called = [s.json()["params"]["name"] for s in growing.recorder.calls("tools/call")]
    assert called == ["second", "first", "retire_first"]


async def test_sessions_are_checked(gw: Gateway) -> None:
    token = await raw_session(gw.url())
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    status, _, body = await post(gw.url(), listing, token)
    assert status == 200 and len(orjson.loads(body)["result"]["tools"]) == 4

    payload, signature = token.split(".")
    tampered = f"{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{signature}"
    for bad in (tampered, token[:-3], "nonsense"):
        status, _, body = await post(gw.url(), listing, bad)
        assert status == 404
        assert orjson.loads(body)["error"]["code"] == -32600
    status, _, _ = await post(gw.url(), listing)  # no session id at all
    assert status == 400
    status, _, _ = await post(gw.url("/only-add"), listing, token)  # another route's session
    assert status == 404

    # DELETE ends the servers' sessions; the gateway's id is then unknown to them: 404 again.
    async with aiohttp.ClientSession() as http:
        async with http.delete(gw.url(), headers={"mcp-session-id": token}) as response:
            assert response.status == 200
        async with http.get(gw.url(), headers={"mcp-session-id": token, "accept": "text/event-stream"}) as response:
            assert response.status == 405
    status, _, body = await post(gw.url(), listing, token)
    assert status == 404, body


async def test_every_client_gets_its_own_session_id(gw: Gateway, servers: Servers) -> None:
    """Two clients of a route whose only server is stateless (it issues no session id of its
    own) never share an Mcp-Session-Id; each id still works and still fails when tampered."""
    first, second = await raw_session(gw.url("/stateless")), await raw_session(gw.url("/stateless"))
    assert not any("mcp-session-id" in s.headers for s in servers.stateless.recorder.seen)  # truly stateless
    assert first != second
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    for token in (first, second):
        status, _, body = await post(gw.url("/stateless"), listing, token)
        assert status == 200 and [t["name"] for t in orjson.loads(body)["result"]["tools"]] == ["s__add", "s__echo"]
    payload, signature = second.split(".")
    status, _, _ = await post(gw.url("/stateless"), listing, f"{first.split('.')[0]}.{signature}")
    assert status == 404
    # The official client sees the same: two sessions, two ids.
    issued: list[str] = []

    async def keep_session_id(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers and response.headers["mcp-session-id"] not in issued:
            issued.append(response.headers["mcp-session-id"])

    for _ in range(2):
        async with httpx2.AsyncClient(event_hooks={"response": [keep_session_id]}, timeout=30) as http, \
                streamable_http_client(gw.url("/stateless"), http_client=http) as (read, write), \
                ClientSession(read, write) as client:
            await client.initialize()
            assert (await client.call_tool("s__add", {"a": 1, "b": 2})).structured_content == {"result": 3}
    assert len(issued) == 2 and first not in issued and second not in issued


async def test_server_down(gw: Gateway) -> None:
    # The only server of the route is down: initialize fails, naming it.
    async with http_client() as http, streamable_http_client(gw.url("/down"), http_client=http) as (
        read,
        write,
    ), ClientSession(read, write) as client:
        with pytest.raises(MCPError) as failed:
            await client.initialize()
    assert failed.value.error.code == -32050
    assert "'down'" in failed.value.error.message

    # On /mcp it stays out of the session; calling it says so.
    async with connect(gw.url()) as client:
        with pytest.raises(MCPError) as failed:
            await client.call_tool("down__anything", {})
        assert failed.value.error.code == -32050 and "'down'" in failed.value.error.message

    # A session that has it (signed with the gateway's key), while it is down: a JSON-RPC error.
    token = await raw_session(gw.url())
    session = SessionCodec(SESSION_SECRET).decode(token)
    with_down = GatewaySession(session.route, session.protocol_version,
                               {**session.servers, "down": ServerSession("s-1", "2025-06-18")})
    forged = SessionCodec(SESSION_SECRET).encode(with_down)
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "down__x", "arguments": {}}}
    status, _, body = await post(gw.url(), call, forged)
    assert status == 200
    error = orjson.loads(body)["error"]
    assert error["code"] == -32050 and "'down'" in error["message"] and "cannot connect" in error["message"]
    listing = {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}
    status, _, body = await post(gw.url(), listing, forged)  # the others still list
    assert status == 200 and len(orjson.loads(body)["result"]["tools"]) == 4


async def test_malformed_messages(gw: Gateway) -> None:
    token = await raw_session(gw.url())
    cases = [  # (body, code, the id the error carries: the request's when it could be read)
        (b"{not json", -32700, None),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', -32600, None),
        (b'{"jsonrpc":"2.0","id":7}', -32600, 7),
        (b'{"id":8,"method":"ping"}', -32600, 8),
    ]
    for raw, code, request_id in cases:
        status, headers, body = await post(gw.url(), None, token, raw=raw)
        assert status == 400, raw
        assert headers["Content-Type"].startswith("application/json")
        answer = orjson.loads(body)
        assert answer["jsonrpc"] == "2.0" and answer["id"] == request_id and answer["error"]["code"] == code
        if raw.startswith(b"["):
            assert "batch" in answer["error"]["message"]
    status, _, body = await post(gw.url(), {"jsonrpc": "2.0", "id": 5, "method": "resources/list"}, token)
    assert status == 200 and orjson.loads(body)["error"]["code"] == -32601
    status, _, body = await post(gw.url(), {"jsonrpc": "2.0", "id": 6, "method": "tools/list",
                                            "params": {"cursor": "x"}}, token)
    assert orjson.loads(body)["error"]["code"] == -32602


async def test_json_only_client_gets_the_final_answer(gw: Gateway) -> None:
    token = await raw_session(gw.url())
    call = {"jsonrpc": "2.0", "id": "w", "method": "tools/call",
            "params": {"name": "b__weather", "arguments": {"city": "Oslo"}, "_meta": {"progressToken": 1}}}
    status, headers, body = await post(gw.url(), call, token, accept="application/json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = orjson.loads(body)
    assert answer["id"] == "w" and answer["result"]["content"][0]["text"] == "sunny in Oslo"
    # With event streams accepted, the events come through as the server sent them.
    status, headers, body = await post(gw.url(), call, token)
    assert headers["Content-Type"].startswith("text/event-stream")
    text = body.decode()
    assert text.count("notifications/progress") == 2 and "sunny in Oslo" in text


async def test_spans_and_metrics(gw: Gateway, servers: Servers) -> None:
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    async with connect(gw.url(), headers={"traceparent": traceparent}) as client:
        await client.call_tool("a__add", {"a": 20, "b": 22})
        with pytest.raises(MCPError):
            await client.call_tool("b__secret_tool", {})
        await client.list_tools()

    tool = await gw.span("tools/call a__add")
    attributes = dict(tool.attributes)
    assert attributes["openinference.span.kind"] == "TOOL"
    assert attributes["tool.name"] == "a__add"
    assert attributes["mcp.tool.original_name"] == "add"
    assert attributes["mcp.method.name"] == "tools/call"
    assert attributes["mcp.server"] == "a"
    assert orjson.loads(attributes["input.value"]) == {"a": 20, "b": 22}
    assert orjson.loads(attributes["output.value"])["structuredContent"] == {"result": 42}
    assert len(attributes["session.id"]) == 32
    assert tool.status.is_ok
    # A child of the client's trace context ...
    assert format(tool.context.trace_id, "032x") == TRACE_ID
    assert tool.parent is not None and format(tool.parent.span_id, "016x") == PARENT_ID
    # ... and the server was handed the gateway span as its parent.
    call_a = next(s for s in reversed(servers.a.recorder.calls("tools/call")) if s.json()["params"]["arguments"] == {
        "a": 20, "b": 22})
    assert call_a.headers["traceparent"] == f"00-{TRACE_ID}-{tool.context.span_id:016x}-01"

    denied = await gw.span("tools/call b__secret_tool")
    assert not denied.status.is_ok and "b__secret_tool" in (denied.status.description or "")
    assert denied.attributes["error.type"] == "-32602"
    listing = await gw.span("tools/list")
    assert listing.attributes["openinference.span.kind"] == "CHAIN"
    assert format(listing.context.trace_id, "032x") == TRACE_ID

    text = gw.metrics()
    lines = [line for line in text.splitlines() if line.startswith("mcp_requests_total{")]
    ok = [line for line in lines if 'mcp_tool_name="a__add"' in line and 'mcp_server="a"' in line]
    assert ok and 'error_type=""' in ok[0] and ok[0].endswith(" 1.0"), lines
    refused = [line for line in lines if 'mcp_method_name="tools/call"' in line and 'error_type="-32602"' in line]
    assert refused, lines
    assert any('mcp_method_name="initialize"' in line for line in lines)
    assert "mcp_request_duration_seconds_bucket" in text


async def test_trace_context_from_meta_wins(gw: Gateway) -> None:
    meta_trace, meta_parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    parent = otel_trace.NonRecordingSpan(otel_trace.SpanContext(
        int(meta_trace, 16), int(meta_parent, 16), is_remote=True, trace_flags=otel_trace.TraceFlags(1)))
    async with connect(gw.url(), headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) as client:
        token = otel_context.attach(otel_trace.set_span_in_context(parent))
        try:
            await client.call_tool("a__echo", {"text": "hi"})  # the SDK puts the context in params._meta
        finally:
            otel_context.detach(token)
    span = await gw.span("tools/call a__echo")
    assert format(span.context.trace_id, "032x") == meta_trace
    assert span.parent is not None and format(span.parent.span_id, "016x") == meta_parent


async def test_misbehaving_server(servers: Servers) -> None:
    """Timeouts, 5xx, garbage and a stream cut short: JSON-RPC errors naming the server."""
    listing_fails = True
    called: list[str] = []

    async def handler(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        message = await request.json()
        if message.get("method") == "initialize":
            result = {"protocolVersion": "2025-03-26", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "bad", "version": "0"}}
            return aiohttp.web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result},
                                             headers={"mcp-session-id": "bad-1"})
        if "id" not in message:
            return aiohttp.web.Response(status=202)
        if message["method"] == "tools/list":
            if listing_fails:
                return aiohttp.web.Response(status=503, text="overloaded")
            tools = [{"name": name, "inputSchema": {"type": "object"}} for name in ("slow", "boom", "garbage", "cut")]
            return aiohttp.web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {"tools": tools}})
        name = message["params"]["name"]
        called.append(name)
        if name == "slow":
            await asyncio.sleep(3)
        if name == "boom":
            return aiohttp.web.Response(status=500, text="oops")
        if name == "garbage":
            return aiohttp.web.Response(text="hello", content_type="text/plain")
        stream = aiohttp.web.StreamResponse(headers={"content-type": "text/event-stream"})
        await stream.prepare(request)
        progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                    "params": {"progressToken": 1, "progress": 1}}
        await stream.write(b"event: message\ndata: " + orjson.dumps(progress) + b"\n\n")
        assert request.transport is not None
        request.transport.close()  # "cut": gone without an answer
        return stream

    app = aiohttp.web.Application()
    app.router.add_post("/mcp", handler)
    runner = aiohttp.web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    bad_url = f"http://127.0.0.1:{runner.addresses[0][1]}/mcp"
    settings = McpSettings.model_validate({
        "port": 0, "request_timeout_seconds": 0.5,
        "servers": [{"name": "a", "url": servers.a.url}, {"name": "bad", "url": bad_url}],
        "routes": [{"path": "/mcp", "servers": ["a", "bad"]}],
    })
    gateway = McpGateway(settings)
    port = await gateway.start("127.0.0.1", 0, shutdown_timeout=0.5)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        status, headers, body = await post(url, INIT)
        assert status == 200
        assert orjson.loads(body)["result"]["protocolVersion"] == "2025-03-26"  # the oldest a server took
        token = headers["Mcp-Session-Id"]
        # bad's tools/list fails (503): a's tools are still listed.
        status, _, body = await post(url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, token)
        assert [t["name"] for t in orjson.loads(body)["result"]["tools"]] == ["a__add", "a__echo"]
        # While bad cannot list its tools, no name of it can be checked: nothing is forwarded.
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "bad__boom"}}
        status, _, body = await post(url, call, token)
        error = orjson.loads(body)["error"]
        assert error["code"] == -32050 and "'bad' answered HTTP 503" in error["message"], error
        assert called == []
        listing_fails = False
        expected = {"slow": (-32051, "did not answer within 0.5s"), "boom": (-32050, "answered HTTP 500"),
                    "garbage": (-32050, "content-type text/plain"), "cut": (-32050, "'bad'")}
        for tool, (code, words) in expected.items():
            call = {"jsonrpc": "2.0", "id": tool, "method": "tools/call", "params": {"name": f"bad__{tool}"}}
            status, headers, body = await post(url, call, token)
            assert status == 200, (tool, body)
            if tool == "cut":  # the stream had begun: the error is its last event
                assert headers["Content-Type"].startswith("text/event-stream")
                events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
                assert "notifications/progress" in events[0]
                error = orjson.loads(events[-1])["error"]
            else:
                error = orjson.loads(body)["error"]
            assert error["code"] == code and words in error["message"] and "'bad'" in error["message"], error
    finally:
        await gateway.stop()
        await runner.cleanup()


async def test_connecting_and_waiting_for_an_answer_have_separate_limits(servers: Servers) -> None:
    """A tool silent for longer than the connect limit still answers (the answer has
    request_timeout_seconds); a server that never accepts the connection fails on the connect
    limit, -32050 saying so, not on the long answer limit."""
    server = MCPServer("slow", log_level="WARNING")

    @server.tool()
    async def think(seconds: float) -> str:
        """Silent for a while, like an agent's long tool call."""
        await asyncio.sleep(seconds)
        return "thought"

    # A listener whose accept queue (backlog 0) is full: connecting to it hangs.
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(0)
    filler = socket.create_connection(hanging.getsockname())
    with ServerThread(server, json_response=False) as slow, hanging, filler:
        settings = McpSettings.model_validate({
            "port": 0, "connect_timeout_seconds": 0.3, "request_timeout_seconds": 30,
            "servers": [{"name": "slow", "url": slow.url},
                        {"name": "hang", "url": f"http://127.0.0.1:{hanging.getsockname()[1]}/mcp"}],
            "routes": [{"path": "/mcp", "servers": ["slow"]}, {"path": "/hang", "servers": ["hang"]}],
        })
        gateway = McpGateway(settings)
        port = await gateway.start("127.0.0.1", 0, shutdown_timeout=0.5)
        try:
            async with connect(f"http://127.0.0.1:{port}/mcp") as client:
                result = await client.call_tool("slow__think", {"seconds": 1.5})  # 5x the connect limit
                assert result.is_error is False and result.content[0].text == "thought"  # type: ignore[union-attr]
            status, _, body = await post(f"http://127.0.0.1:{port}/hang", INIT)
            assert status == 200
            error = orjson.loads(body)["error"]
            assert error["code"] == -32050 and "'hang'" in error["message"], error
            assert "no connection within 0.3s" in error["message"], error
        finally:
            await gateway.stop()
