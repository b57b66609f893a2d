"""Per-tenant authorization, the client's own provider key and tenant by host name, through
real Envoy and the processor: the official openai, anthropic and mcp SDKs as clients, the
simulator and two MCP servers built with the mcp SDK as upstreams. Keys also live in a
Redis key store, whose entries' own grants narrow their tenant's like a config key's."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

pytest.importorskip("mcp.server.mcpserver", reason="needs the official MCP SDK 2.x")

import httpx2  # noqa: E402 (the mcp SDK's HTTP client)
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from extproc.keys import manage  # noqa: E402
from extproc.keys.redis_store import RedisKeyEditor  # noqa: E402
from extproc.sim import SimServer  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.integration.harness import RunningGateway, free_port, running_gateway  # noqa: E402
from tests.integration.test_mcp_gateway import ServerThread, build_a, build_b  # noqa: E402

pytestmark = pytest.mark.timeout(90)

OPENAI_KEY = "sk-configured-openai-3c3c"
ANTHROPIC_KEY = "sk-ant-configured-4d4d"
TEAM_KEY = "sk-gw-team-a-narrow-5e5e"  # a gateway key of team-a limited to gpt-4o-mini and a__* tools
STORED_KEY = "sk-gw-stored-team-a-7a7a"  # a key-store key of team-a limited to gpt-4o-mini and b__weather
REVOKED_KEY = "sk-gw-stored-revoked-8b8b"
OWN_KEY = "sk-clients-own-provider-key-6f6f"  # bring your own key: must reach only its backend
USER: Any = [{"role": "user", "content": "Tell me about the sea"}]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ServerThread, ServerThread]]:
    with ServerThread(build_a(), json_response=True) as a, ServerThread(build_b([]), False) as b:
        yield a, b


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis key store (every first use of a key is an asynchronous lookup) with a narrow key and a revoked one."""
    with RedisServer() as redis:
        editor = RedisKeyEditor(redis.url)
        now = time.time()
        manage.add(editor, "team-a", now, entry_id="narrow", key=STORED_KEY, models=("gpt-4o-mini",),
                   tools=("b__weather",))
        manage.add(editor, "team-a", now, entry_id="gone", key=REVOKED_KEY)
        manage.revoke(editor, "gone", now)
        editor.close()
        yield redis.url


@pytest.fixture(scope="module")
def gateway(sim: SimServer, servers: tuple[ServerThread, ServerThread], redis_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    a, b = servers
    config = {
        "backends": [
            {"name": "oa", "base_url": sim.base_url, "api_key": {"env": "T_OPENAI_KEY"},
             "client_key_header": "x-provider-key"},
            {"name": "claude", "schema": "anthropic", "base_url": sim.url, "api_key": {"env": "T_ANTHROPIC_KEY"},
             "client_key_header": "x-provider-key"},
        ],
        "routes": [
            {"name": "gpt", "match": {"model": ["gpt-4o", "gpt-4o-mini", "o3"]}, "backends": [{"name": "oa"}]},
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
        ],
        "tenancy": {
            "header": "x-tenant-id",
            "api_keys": [{"key": {"env": "T_TEAM_KEY"}, "tenant": "team-a", "models": ["gpt-4o-mini"],
                          "tools": ["a__*"]}],
            "host_pattern": "{tenant}.gw.example.com",
            "key_store": {"redis": {"url": redis_url}},
        },
        "authorization": {"tenants": {
            "team-a": {"models": ["gpt-*", "claude-*"], "tools": ["a__*", "b__weather"]},
            "*": {"models": ["gpt-4o-mini"], "tools": ["a__echo"]},
        }},
        "mcp": {
            "port": free_port(),
            "servers": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}],
            "routes": [{"path": "/mcp", "servers": ["a", "b"]}],
        },
    }
    env = {"T_OPENAI_KEY": OPENAI_KEY, "T_ANTHROPIC_KEY": ANTHROPIC_KEY, "T_TEAM_KEY": TEAM_KEY,
           "EXTPROC_LOG_LEVEL": "DEBUG"}  # the processor dumps request headers: the own key must not show
    with running_gateway(config, tmp_path_factory.mktemp("authz"), env=env) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _clear(sim: SimServer) -> None:
    sim.clear()


def openai_client(gateway: RunningGateway, tenant: str | None = None, key: str = "sk-anything",
                  **headers: str) -> openai.OpenAI:
    extra = {"x-tenant-id": tenant} if tenant else {}
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=30,
                         default_headers={**extra, **headers})


def anthropic_client(gateway: RunningGateway, tenant: str, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key="sk-anything", max_retries=0,
                               timeout=30, default_headers={"x-tenant-id": tenant, **headers})


def entry(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    return gateway.wait_access_log(lambda e: e.get("request_id") == request_id)


# -- models -------------------------------------------------------------------------------


def test_refused_model_is_a_403_for_the_openai_sdk_and_nothing_reaches_the_backend(
        gateway: RunningGateway, sim: SimServer) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        openai_client(gateway, "team-z").chat.completions.create(
            model="gpt-4o", messages=USER, max_tokens=5, extra_headers={"x-request-id": "authz-refused-1"})
    assert refused.value.status_code == 403
    assert refused.value.body == {"message": "You are not allowed to use the model `gpt-4o`.",
                                  "type": "permission_error", "param": "model", "code": "model_not_allowed"}
    assert sim.requests == []
    logged = entry(gateway, "authz-refused-1")
    assert logged["status"] == 403 and logged["upstream_host"] is None
    assert logged["tenant"] == "team-z" and logged["request_model"] == "gpt-4o"
    # the same tenant's allowed model works
    done = openai_client(gateway, "team-z").chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=5)
    assert done.choices[0].message.content and len(sim.requests) == 1


def test_refused_model_is_a_403_for_the_anthropic_sdk(gateway: RunningGateway, sim: SimServer) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        anthropic_client(gateway, "team-z").messages.create(model="claude-sonnet-4", messages=USER,
                                                             max_tokens=5)
    assert refused.value.status_code == 403
    assert refused.value.body == {"type": "error", "error": {
        "type": "permission_error", "message": "You are not allowed to use the model `claude-sonnet-4`."}}
    assert sim.requests == []
    message = anthropic_client(gateway, "team-a").messages.create(model="claude-sonnet-4", messages=USER,
                                                                  max_tokens=5)
    assert message.content and len(sim.requests) == 1


def test_a_keys_own_grants_narrow_its_tenants(gateway: RunningGateway, sim: SimServer) -> None:
    narrow = openai_client(gateway, key=TEAM_KEY)
    with pytest.raises(openai.PermissionDeniedError):
        narrow.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=5)
    assert sim.requests == []
    raw = narrow.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=USER, max_tokens=5, extra_headers={"x-request-id": "authz-key-1"})
    assert raw.parse().choices[0].message.content
    assert entry(gateway, "authz-key-1")["tenant"] == "team-a"


def test_models_list_shows_each_caller_its_models(gateway: RunningGateway) -> None:
    assert [m.id for m in openai_client(gateway, "team-a").models.list()] == ["gpt-4o", "gpt-4o-mini"]  # not o3
    assert [m.id for m in openai_client(gateway, "team-z").models.list()] == ["gpt-4o-mini"]
    assert [m.id for m in openai_client(gateway, key=TEAM_KEY).models.list()] == ["gpt-4o-mini"]
    with pytest.raises(openai.NotFoundError):
        openai_client(gateway, "team-z").models.retrieve("gpt-4o")
    assert openai_client(gateway, "team-a").models.retrieve("gpt-4o").id == "gpt-4o"


def test_a_stored_keys_own_models_narrow_its_tenants(gateway: RunningGateway, sim: SimServer) -> None:
    stored = openai_client(gateway, key=STORED_KEY)
    with pytest.raises(openai.PermissionDeniedError) as refused:  # team-a may use gpt-4o, this key may not
        stored.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=5,
                                       extra_headers={"x-request-id": "authz-stored-1"})
    assert refused.value.status_code == 403 and refused.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    assert sim.requests == []
    logged = entry(gateway, "authz-stored-1")
    assert logged["tenant"] == "team-a" and logged["upstream_host"] is None
    done = stored.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=5)
    assert done.choices[0].message.content and len(sim.requests) == 1
    assert [m.id for m in stored.models.list()] == ["gpt-4o-mini"]
    with pytest.raises(openai.NotFoundError):
        stored.models.retrieve("gpt-4o")
    with pytest.raises(openai.AuthenticationError) as revoked:  # never the header's tenant
        openai_client(gateway, "team-a", key=REVOKED_KEY).chat.completions.create(
            model="gpt-4o-mini", messages=USER, max_tokens=5)
    assert revoked.value.body["message"] == "This API key has been revoked."  # type: ignore[index]
    assert len(sim.requests) == 1


# -- MCP tools --------------------------------------------------------------------------------


async def tools_of(gateway: RunningGateway, headers: dict[str, str]) -> set[str]:
    """The tool names `tools/list` shows a client sending these headers (the mcp SDK)."""
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60))
    async with http, streamable_http_client(f"{gateway.url}/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        return {tool.name for tool in (await session.list_tools()).tools}


async def test_tools_list_is_filtered_per_caller(gateway: RunningGateway) -> None:
    team_a = await tools_of(gateway, {"x-tenant-id": "team-a"})
    assert team_a == {"a__add", "a__echo", "b__weather"}
    other = await tools_of(gateway, {"x-tenant-id": "team-z"})
    assert other == {"a__echo"}
    narrow = await tools_of(gateway, {"authorization": f"Bearer {TEAM_KEY}"})
    assert narrow == {"a__add", "a__echo"}
    # a client's own copies of the gateway's caller headers count for nothing
    forged = await tools_of(gateway, {"x-tenant-id": "team-z", "x-ai-eg-tenant": "team-a",
                                         "x-ai-eg-tools": '["*"]'})
    assert forged == {"a__echo"}


async def test_a_refused_tool_call_is_an_unknown_tool_and_never_reaches_the_server(
        gateway: RunningGateway, servers: tuple[ServerThread, ServerThread]) -> None:
    a, b = servers
    before_a, before_b = len(a.recorder.calls("tools/call")), len(b.recorder.calls("tools/call"))
    http = httpx2.AsyncClient(headers={"x-tenant-id": "team-z"}, timeout=httpx2.Timeout(30, read=60))
    async with http, streamable_http_client(f"{gateway.url}/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        for name in ("a__add", "b__weather"):
            with pytest.raises(MCPError) as refused:
                await session.call_tool(name, {"a": 1, "b": 2} if name == "a__add" else {"city": "Oslo"})
            assert refused.value.error.code == -32602 and refused.value.error.message == f"Unknown tool: {name}"
        with pytest.raises(MCPError) as missing:  # exactly as a tool that does not exist
            await session.call_tool("a__no_such_tool", {})
        assert missing.value.error.code == -32602
        echoed = await session.call_tool("a__echo", {"text": "hi"})
        assert echoed.is_error is False
    assert len(b.recorder.calls("tools/call")) == before_b
    assert [c.json()["params"]["name"] for c in a.recorder.calls("tools/call")[before_a:]] == ["echo"]


async def test_a_stored_keys_own_tools_narrow_its_tenants(
        gateway: RunningGateway, servers: tuple[ServerThread, ServerThread]) -> None:
    a, b = servers
    before_a, before_b = len(a.recorder.calls("tools/call")), len(b.recorder.calls("tools/call"))
    headers = {"authorization": f"Bearer {STORED_KEY}", "x-ai-eg-tools": '["*"]'}
    assert await tools_of(gateway, headers) == {"b__weather"}  # team-a's a__* are not this key's
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60))
    async with http, streamable_http_client(f"{gateway.url}/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        with pytest.raises(MCPError) as refused:
            await session.call_tool("a__echo", {"text": "hi"})
        assert refused.value.error.code == -32602 and refused.value.error.message == "Unknown tool: a__echo"
        assert (await session.call_tool("b__weather", {"city": "Oslo"})).is_error is False
    assert len(a.recorder.calls("tools/call")) == before_a
    assert len(b.recorder.calls("tools/call")) == before_b + 1


def test_a_revoked_stored_key_is_a_json_rpc_401_on_mcp(gateway: RunningGateway) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    response = httpx.post(f"{gateway.url}/mcp", json=initialize, timeout=30, headers={
        "authorization": f"Bearer {REVOKED_KEY}", "x-tenant-id": "team-a",
        "accept": "application/json, text/event-stream"})
    assert response.status_code == 401
    assert response.json() == {"jsonrpc": "2.0", "id": None,
                               "error": {"code": -32052, "message": "This API key has been revoked."}}


# -- bring your own key ---------------------------------------------------------------------------


def test_the_clients_own_key_reaches_its_backend_and_nothing_else(gateway: RunningGateway, sim: SimServer) -> None:
    own = openai_client(gateway, "team-a", **{"x-provider-key": OWN_KEY})
    raw = own.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=USER, max_tokens=5, extra_headers={"x-request-id": "byok-fast-1"})
    assert raw.parse().choices[0].message.content
    sent = sim.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {OWN_KEY}" and "x-provider-key" not in sent.headers

    openai_client(gateway, "team-a").chat.completions.create(model="gpt-4o", messages=USER, max_tokens=5)
    assert sim.requests[-1].headers["authorization"] == f"Bearer {OPENAI_KEY}"

    # Anthropic's API through the upstream stage: native, and translated from an OpenAI client.
    message = anthropic_client(gateway, "team-a", **{"x-provider-key": OWN_KEY}).messages.create(
        model="claude-sonnet-4", messages=USER, max_tokens=5, extra_headers={"x-request-id": "byok-staged-1"})
    assert message.content
    sent = sim.requests[-1]
    assert sent.headers["x-api-key"] == OWN_KEY and "x-provider-key" not in sent.headers
    own.chat.completions.create(model="claude-sonnet-4", messages=USER, max_tokens=5)
    sent = sim.requests[-1]
    assert sent.headers["x-api-key"] == OWN_KEY and "x-provider-key" not in sent.headers
    anthropic_client(gateway, "team-a").messages.create(model="claude-sonnet-4", messages=USER, max_tokens=5)
    assert sim.requests[-1].headers["x-api-key"] == ANTHROPIC_KEY

    for request_id in ("byok-fast-1", "byok-staged-1"):
        logged = entry(gateway, request_id)
        assert logged["status"] == 200 and logged["tenant"] == "team-a"
    gateway.wait_stderr(lambda line: "request headers" in line and "x-provider-key" in line)
    printed = "\n".join(gateway.stdout_lines + gateway.stderr_lines)
    assert OWN_KEY not in printed and TEAM_KEY not in printed and STORED_KEY not in printed


# -- tenant by host name -----------------------------------------------------------------------------


def test_the_host_name_names_the_tenant(gateway: RunningGateway, sim: SimServer) -> None:
    response = httpx.post(
        f"{gateway.base_url}/chat/completions", timeout=30,
        json={"model": "gpt-4o", "messages": USER, "max_tokens": 5},
        headers={"host": "team-a.gw.example.com", "x-tenant-id": "team-z", "x-request-id": "host-1"})
    assert response.status_code == 200, response.text  # team-a may use gpt-4o; team-z may not
    assert entry(gateway, "host-1")["tenant"] == "team-a"
    refused = httpx.post(
        f"{gateway.base_url}/chat/completions", timeout=30,
        json={"model": "gpt-4o", "messages": USER, "max_tokens": 5},
        headers={"host": "team-q.gw.example.com:1975", "x-request-id": "host-2"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"


# -- a policy change needs no restart --------------------------------------------------------------


async def test_a_changed_policy_applies_on_reload(gateway: RunningGateway) -> None:
    original = gateway.config_path.read_text()
    data = yaml.safe_load(original)
    data["authorization"]["tenants"]["*"] = {"models": ["gpt-4o-mini", "gpt-4o"], "tools": ["a__*"]}
    try:
        gateway.config_path.write_text(yaml.safe_dump(data))
        gateway.wait_stderr(lambda line: "config reloaded" in line, timeout=30)
        deadline = time.monotonic() + 20
        # every worker swaps in turn; the MCP gateway (worker 0) too
        while ([m.id for m in openai_client(gateway, "team-z").models.list()] != ["gpt-4o", "gpt-4o-mini"]
               or await tools_of(gateway, {"x-tenant-id": "team-z"}) != {"a__add", "a__echo"}):
            assert time.monotonic() < deadline, "the new policy never applied"
            time.sleep(0.2)
    finally:
        gateway.config_path.write_text(original)
