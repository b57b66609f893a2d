"""MCP through real Envoy and the processor: the official `mcp` client, two MCP servers
built with the same SDK, aggregation, routing, a hidden tool, a per-tool call budget
Envoy enforces, the access log's MCP fields, and a TOOL span under the agent's span."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

pytest.importorskip("mcp.server.mcpserver", reason="needs the official MCP SDK 2.x")

import httpx2  # noqa: E402 (the mcp SDK's HTTP client)
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from extproc.sim import SimServer  # noqa: E402
from tests.integration.harness import RunningGateway, free_port, running_gateway  # noqa: E402
from tests.integration.test_mcp_gateway import ServerThread, build_a, build_b, build_loose  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402

pytestmark = pytest.mark.timeout(90)

KEY_A = "sk-mcp-server-a-1f2e"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
AGENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{AGENT_SPAN}-01"
ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def loose_deleted() -> list[str]:
    return []  # what the loose server's delete_repo was asked to delete


@pytest.fixture(scope="module")
def loose(loose_deleted: list[str]) -> Iterator[ServerThread]:
    with ServerThread(build_loose(loose_deleted), json_response=True) as server:  # matches names loosely
        yield server


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ServerThread, ServerThread, list[int]]]:
    secret_calls: list[int] = []
    with ServerThread(build_a(), json_response=True) as a, ServerThread(build_b(secret_calls), False) as b:
        yield a, b, secret_calls


@pytest.fixture(scope="module")
def gateway(servers: Any, loose: ServerThread, sim_a: SimServer, receiver: OtlpReceiver,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    a, b, _ = servers
    config = {
        "backends": [{"name": "llm", "base_url": sim_a.base_url}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "llm"}]}],
        "mcp": {
            "port": free_port(),
            "servers": [{"name": "a", "url": a.url, "api_key": {"env": "T_MCP_A_KEY"}}, {"name": "b", "url": b.url},
                        {"name": "loose", "url": loose.url}],
            "routes": [{"path": "/mcp", "servers": ["a", "b", "loose"],
                        "deny_tools": ["b__secret_tool", "loose__delete_*"]}],
        },
        "tenancy": {"header": "x-tenant"},
        "budgets": [{"name": "weather-calls", "tenant": "*", "tool": "b__weather", "unit": "minute", "limit": 2,
                     "cost": "mcp_tool_call"}],
    }
    env = receiver.exporter_env(T_MCP_A_KEY=KEY_A)
    with running_gateway(config, tmp_path_factory.mktemp("mcp"), env=env) as gw:
        yield gw


async def test_aggregated_tools_routed_calls_and_a_hidden_tool(gateway: RunningGateway, servers: Any,
                                                               loose: ServerThread, loose_deleted: list[str]) -> None:
    a, _b, secret_calls = servers
    headers = {"x-tenant": "team-a", "traceparent": TRACEPARENT}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60))
    async with http, streamable_http_client(f"{gateway.url}/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        names = {tool.name for tool in (await session.list_tools()).tools}
        assert {"a__add", "a__echo", "b__weather"} <= names
        assert "b__secret_tool" not in names

        result = await session.call_tool("a__add", {"a": 2, "b": 3})
        assert result.is_error is False and "5" in str(result.content[0])
        call = a.recorder.calls("tools/call")[-1]
        assert call.json()["params"]["name"] == "add"  # the original name, at its own server
        assert call.headers["authorization"] == f"Bearer {KEY_A}"

        weather = await session.call_tool("b__weather", {"city": "Oslo"})
        assert "sunny in Oslo" in str(weather.content[0])

        with pytest.raises(MCPError) as refused:  # a JSON-RPC error: the gateway hides the tool
            await session.call_tool("b__secret_tool", {})
        assert "Unknown tool" in str(refused.value)

        # Names the loose server would take for its denied delete_repo: refused all the same.
        for name in ("loose__DELETE_REPO", "loose___delete_repo", "loose__./delete_repo", "b__SECRET_TOOL"):
            with pytest.raises(MCPError) as refused:
                await session.call_tool(name, {"repo": "prod"})
            assert refused.value.error.code == -32602 and refused.value.error.message == f"Unknown tool: {name}"
        assert (await session.call_tool("loose__list_repos", {})).is_error is False  # the exact name works
    assert secret_calls == [] and loose_deleted == []  # refused at the gateway
    assert [s.json()["params"]["name"] for s in loose.recorder.calls("tools/call")] == ["list_repos"]

    entry = gateway.wait_access_log(lambda e: e.get("mcp_tool_name") == "a__add")
    assert entry["mcp_method"] == "tools/call" and entry["mcp_backend"] == "a" and entry["mcp_request_id"]
    assert entry["tenant"] == "team-a"


def test_tool_span_is_a_child_of_the_agents_span(gateway: RunningGateway, receiver: OtlpReceiver) -> None:
    deadline = time.monotonic() + 20
    while True:
        spans = [s for s in receiver.spans() if s.trace_id == TRACE_ID and s.name.startswith("tools/call a__add")]
        if spans:
            break
        assert time.monotonic() < deadline, f"no TOOL span; have {[s.name for s in receiver.spans()]}"
        time.sleep(0.1)
    span = spans[-1]
    assert span.parent_span_id == AGENT_SPAN
    assert span.attributes["openinference.span.kind"] == "TOOL"
    assert span.attributes["tool.name"] == "a__add"
    assert '"a": 2' in span.attributes["input.value"] or '"a":2' in span.attributes["input.value"]


def _rpc(gateway: RunningGateway, body: dict[str, Any], session: str | None = None,
         tenant: str = "team-b") -> httpx.Response:
    headers = {"content-type": "application/json", "accept": ACCEPT, "x-tenant": tenant,
               "mcp-protocol-version": "2025-06-18"}
    if session:
        headers["mcp-session-id"] = session
    return httpx.post(f"{gateway.url}/mcp", content=orjson.dumps(body), headers=headers, timeout=30)


def _session(gateway: RunningGateway, tenant: str) -> str:
    init = _rpc(gateway, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}},
        tenant=tenant)
    assert init.status_code == 200, init.text
    session = init.headers["mcp-session-id"]
    assert _rpc(gateway, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session, tenant).status_code == 202
    return session


def test_per_tool_call_budget_is_enforced_by_envoy_per_tenant(gateway: RunningGateway) -> None:
    session = _session(gateway, "team-b")
    call = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "b__weather", "arguments": {"city": "Rome"}}}
    statuses = []
    for request_id in range(10, 14):
        statuses.append(_rpc(gateway, {**call, "id": request_id}, session, "team-b").status_code)
        time.sleep(0.05)  # the charge lands when each call's stream ends; keep the calls apart
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]
    # Another tool, and another tenant's calls of the same tool, are not limited.
    other_tool = {**call, "id": 20, "params": {"name": "a__echo", "arguments": {"text": "x"}}}
    assert _rpc(gateway, other_tool, session, "team-b").status_code == 200
    other_session = _session(gateway, "team-c")
    assert _rpc(gateway, {**call, "id": 30}, other_session, "team-c").status_code == 200


def test_bad_json_rpc_gets_a_json_rpc_error(gateway: RunningGateway) -> None:
    response = httpx.post(f"{gateway.url}/mcp", content=b"{not json", timeout=10,
                          headers={"content-type": "application/json", "accept": ACCEPT, "x-tenant": "t"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32700
    batch = _rpc(gateway, [{"jsonrpc": "2.0", "id": 1, "method": "ping"}])  # type: ignore[arg-type]
    assert batch.json()["error"]["code"] == -32600


def test_mcp_metrics_on_the_processor_port(gateway: RunningGateway) -> None:
    text = httpx.get(f"http://127.0.0.1:{gateway.processor_admin_port}/metrics", timeout=10).text
    assert "mcp_requests_total" in text and 'mcp_tool_name="a__add"' in text
    assert "mcp_request_duration_seconds" in text
    assert Path(gateway.config_path).exists()
