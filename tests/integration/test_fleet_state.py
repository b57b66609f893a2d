"""Two gateways (each real Envoy + processor) sharing one real Redis through `state.redis`.

A Responses chain whose turns alternate between the gateways stays on the backend holding
its state: the route splits 50/50 and the simulators answer a follow-up for an id they did
not issue with 400 `previous_response_not_found`, so each gateway must learn where the other
sent the chain (each has its own per-host SQLite file, which the Redis store replaces). An
MCP session opened on one gateway continues on the other: both sign ids with the key the
first one drew in Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

pytest.importorskip("mcp.server.mcpserver", reason="needs the official MCP SDK 2.x")

from extproc.sim import SimServer  # noqa: E402
from tests.integration.harness import RunningGateway, free_port, running_gateway  # noqa: E402
from tests.integration.test_mcp_gateway import ServerThread, build_a  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ACCEPT = "application/json, text/event-stream"
BUDGET = 100  # tokens per hour for tenant "capped" (an hour, so the test never straddles a window)


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[ServerThread]:
    with ServerThread(build_a(), json_response=True) as server:
        yield server


@pytest.fixture(scope="module")
def fleet(sim_a: SimServer, sim_b: SimServer, shared_redis: RedisServer, mcp_server: ServerThread,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningGateway]]:
    def config() -> dict[str, Any]:
        return {
            "backends": [{"name": "a", "base_url": sim_a.base_url}, {"name": "b", "base_url": sim_b.base_url}],
            "routes": [{"name": "split", "default": True,
                        "backends": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}],
            "mcp": {"port": free_port(), "servers": [{"name": "a", "url": mcp_server.url}],
                    "routes": [{"path": "/mcp", "servers": ["a"]}]},
            "tenancy": {"header": "x-tenant-id", "default_tenant": "anyone"},
            "budgets": [{"name": "capped", "tenant": "capped", "unit": "hour", "limit": BUDGET}],
            "state": {"redis": shared_redis.url},  # budgets count there too (ratelimit.store unset)
        }

    with running_gateway(config(), tmp_path_factory.mktemp("fleet-1")) as one, \
            running_gateway(config(), tmp_path_factory.mktemp("fleet-2")) as two:
        yield [one, two]


def _client(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="client-key", max_retries=0, timeout=30)


def test_a_responses_chain_sticks_to_its_backend_across_gateways(
    fleet: list[RunningGateway], shared_redis: RedisServer
) -> None:
    clients = [_client(gw) for gw in fleet]
    for conversation in range(3):
        first = clients[0].responses.create(model="resp-model", input=f"Conversation {conversation}",
                                            extra_headers={"x-request-id": f"fleet-root-{conversation}"})
        served_by = fleet[0].wait_access_log(
            lambda e, c=conversation: e.get("request_id") == f"fleet-root-{c}")["backend_name"]
        previous = first.id
        for turn in range(4):  # turns alternate: 1, 0, 1, 0 (a wrong pick is a 400 from the other backend)
            gateway = fleet[(turn + 1) % 2]
            request_id = f"fleet-turn-{conversation}-{turn}"
            follow = clients[(turn + 1) % 2].responses.create(
                model="resp-model", input=f"turn {turn}", previous_response_id=previous,
                extra_headers={"x-request-id": request_id})
            assert follow.output_text
            entry = gateway.wait_access_log(lambda e, r=request_id: e.get("request_id") == r)
            assert entry["backend_name"] == served_by
            previous = follow.id
    stored = redis.Redis.from_url(shared_redis.url)
    try:
        assert len(stored.keys("extproc:state:affinity:*")) == 3 * 5  # every response id, once
    finally:
        stored.close()


def _rpc(gateway: RunningGateway, body: dict[str, Any], session: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/json", "accept": ACCEPT, "mcp-protocol-version": "2025-06-18"}
    if session:
        headers["mcp-session-id"] = session
    return httpx.post(f"{gateway.url}/mcp", content=orjson.dumps(body), headers=headers, timeout=30)


def test_an_mcp_session_opened_on_one_gateway_continues_on_the_other(
    fleet: list[RunningGateway], mcp_server: ServerThread
) -> None:
    one, two = fleet
    init = _rpc(one, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
    assert init.status_code == 200, init.text
    session = init.headers["mcp-session-id"]
    assert _rpc(two, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session).status_code == 202
    listed = _rpc(two, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
    assert listed.status_code == 200, listed.text
    assert "a__add" in {tool["name"] for tool in listed.json()["result"]["tools"]}
    called = _rpc(one, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                        "params": {"name": "a__add", "arguments": {"a": 2, "b": 3}}}, session)
    assert called.status_code == 200, called.text
    assert "5" in orjson.dumps(called.json()["result"]["content"]).decode()
    assert mcp_server.recorder.calls("tools/call")[-1].json()["params"]["name"] == "add"
    foreign = _rpc(two, {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, session[:-4] + "AAAA")
    assert foreign.status_code == 404  # a tampered id is still unknown on every gateway


def test_a_budget_spent_on_one_gateway_is_spent_on_the_other(fleet: list[RunningGateway]) -> None:
    one, two = (openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=30,
                              default_headers={"x-tenant-id": "capped"}) for gw in fleet)
    user = [{"role": "user", "content": "Tell me a story"}]
    spent = one.chat.completions.create(model="m", messages=user, max_tokens=BUDGET)  # type: ignore[arg-type]
    assert spent.usage is not None and spent.usage.total_tokens > BUDGET

    probed = 0  # tokens gateway two served the tenant itself: far below the budget

    def refused() -> bool:
        nonlocal probed
        try:
            probe = two.chat.completions.create(model="m", messages=user, max_tokens=1)  # type: ignore[arg-type]
        except openai.RateLimitError:
            return True
        probed += probe.usage.total_tokens if probe.usage is not None else BUDGET
        return False

    # The charge lands a few ms after the response ends (Envoy calls the rate limit service then).
    for _ in range(60):
        if refused():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the budget spent on gateway one was not seen by gateway two")
    assert probed < BUDGET // 2  # refused for what gateway one served, not for the probes
    other = openai.OpenAI(base_url=fleet[1].base_url, api_key="k", max_retries=0, timeout=30)
    assert other.chat.completions.create(model="m", messages=user, max_tokens=3).choices  # type: ignore[arg-type]
