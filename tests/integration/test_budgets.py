"""Token budgets per tenant, enforced by Envoy's own rate-limit filters.

The processor sets the tenant and the request's cost as dynamic metadata; Envoy's
global rate-limit filter checks the budget before the request goes upstream and
charges the actual cost after the response; the rate limit service keeps the counts
(in memory, or in a real Redis shared by several gateways).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, free_port, running_gateway
from tests.redis_server import RedisServer

USER = [{"role": "user", "content": "Tell me a story"}]
BUDGET = 100  # tokens per tenant per hour (an hour, so a test never straddles a window)


def _config(sim: SimServer, **ratelimit: Any) -> dict[str, Any]:
    return {
        "backends": [{"name": "sim", "base_url": sim.base_url}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "sim"}]}],
        "tenancy": {"header": "x-tenant-id"},
        "budgets": [{"name": "hourly", "unit": "hour", "limit": BUDGET}],
        "ratelimit": ratelimit,
    }


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _client(gateway: RunningGateway, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url, api_key="k", max_retries=0, timeout=30, default_headers={"x-tenant-id": tenant}
    )


def _eventually(check: Callable[[], bool], attempts: int = 60) -> bool:
    """The charge lands a few ms after a response ends (Envoy calls the service then)."""
    for _ in range(attempts):
        if check():
            return True
        time.sleep(0.1)
    return False


def _rejected(client: openai.OpenAI) -> bool:
    try:
        client.chat.completions.create(model="m", messages=USER, max_tokens=1)
    except openai.RateLimitError:
        return True
    return False


@pytest.fixture(scope="module")
def budget_gateway(sim_a: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(_config(sim_a), tmp_path_factory.mktemp("budgets")) as gateway:
        yield gateway


def test_spent_tenant_is_refused_while_another_is_served(budget_gateway: RunningGateway) -> None:
    spender, other = _tenant(), _tenant()
    spent = _client(budget_gateway, spender).chat.completions.create(model="m", messages=USER, max_tokens=BUDGET)
    assert spent.usage is not None and spent.usage.total_tokens > BUDGET  # admitted: the budget was not spent yet

    assert _eventually(lambda: _rejected(_client(budget_gateway, spender)))
    assert _client(budget_gateway, other).chat.completions.create(model="m", messages=USER, max_tokens=3).choices


def test_refusal_is_an_openai_429_with_rate_limit_headers(budget_gateway: RunningGateway) -> None:
    tenant = _tenant()
    _client(budget_gateway, tenant).chat.completions.create(model="m", messages=USER, max_tokens=BUDGET)
    assert _eventually(lambda: _rejected(_client(budget_gateway, tenant)))

    response = httpx.post(
        f"{budget_gateway.base_url}/chat/completions", json={"model": "m", "messages": USER},
        headers={"x-tenant-id": tenant}, timeout=30,
    )
    assert response.status_code == 429
    error = orjson.loads(response.content)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-limit"].startswith(str(BUDGET))
    assert response.headers["x-ratelimit-remaining"] == "0"


def test_refused_and_failed_requests_log_nothing_unusual(budget_gateway: RunningGateway) -> None:
    """A refusal is routine: Envoy must not warn about it (it used to log "Invalid hits_addend"
    for every 429 and every backend error, whose usage keys are absent)."""
    logged_before = len(budget_gateway.stderr_lines)
    tenant = _tenant()
    client = _client(budget_gateway, tenant)
    client.chat.completions.create(model="m", messages=USER, max_tokens=BUDGET)
    assert _eventually(lambda: _rejected(client))
    for _ in range(4):
        assert _rejected(client)
    with pytest.raises(openai.InternalServerError):  # a provider's own error: charged nothing
        _client(budget_gateway, _tenant()).chat.completions.create(
            model="m", messages=USER, extra_headers={"x-sim-error": "500"})
    entry = budget_gateway.wait_access_log(lambda e: e["tenant"] == tenant and e["status"] == 429)
    assert entry["error_type"] == "gateway_rate_limited" and entry["total_tokens"] is None
    time.sleep(1)  # Envoy charges (and would warn) just after each response ends
    unusual = [line for line in budget_gateway.stderr_lines[logged_before:] if "[warning]" in line or "[error]" in line
               or "hits_addend" in line]
    assert unusual == []


def test_streams_are_charged_their_actual_tokens(budget_gateway: RunningGateway) -> None:
    """A stream the client asked no usage for: the gateway gets it and Envoy charges it."""
    tenant = _tenant()
    client = _client(budget_gateway, tenant)
    chunks = list(client.chat.completions.create(model="m", messages=USER, max_tokens=BUDGET, stream=True))
    assert all(chunk.usage is None for chunk in chunks)
    assert _eventually(lambda: _rejected(client))


def test_small_spenders_stay_within_budget(budget_gateway: RunningGateway) -> None:
    tenant = _tenant()
    client = _client(budget_gateway, tenant)
    for _ in range(3):  # ~3 x 10 tokens: well under the budget
        assert client.chat.completions.create(model="m", messages=USER, max_tokens=2).choices
    time.sleep(0.3)
    assert not _rejected(client)


def test_request_without_tenant_is_refused(budget_gateway: RunningGateway, sim_a: SimServer) -> None:
    response = httpx.post(f"{budget_gateway.base_url}/chat/completions", json={"model": "m", "messages": USER}, timeout=30)
    assert response.status_code == 401
    assert orjson.loads(response.content)["error"]["code"] == "invalid_api_key"


def test_tenant_from_api_key(sim_a: SimServer, tmp_path: Path) -> None:
    config = _config(sim_a)
    config["tenancy"] = {"api_keys": [{"key": {"env": "TEAM_KEY"}, "tenant": "team-key"}]}
    with running_gateway(config, tmp_path, env={"TEAM_KEY": "sk-team-123"}) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-team-123", max_retries=0)
        request_id = str(uuid.uuid4())
        client.chat.completions.create(model="m", messages=USER, extra_headers={"x-request-id": request_id})
        entry = gateway.wait_access_log(lambda e: e.get("request_id") == request_id)
        assert entry["tenant"] == "team-key"
        stranger = openai.OpenAI(base_url=gateway.base_url, api_key="sk-unknown", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.chat.completions.create(model="m", messages=USER)
        assert "sk-team-123" not in "\n".join(gateway.stdout_lines + gateway.stderr_lines)


def test_two_gateways_sharing_redis_enforce_one_budget(sim_a: SimServer, tmp_path: Path) -> None:
    with RedisServer() as redis:
        config = _config(sim_a, store=redis.url)
        with running_gateway(config, tmp_path / "one") as first, running_gateway(config, tmp_path / "two") as second:
            tenant, other = _tenant(), _tenant()
            _client(first, tenant).chat.completions.create(model="m", messages=USER, max_tokens=BUDGET)
            # spent through the first gateway, refused by the second
            assert _eventually(lambda: _rejected(_client(second, tenant)))
            assert _client(second, other).chat.completions.create(model="m", messages=USER, max_tokens=2).choices


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_store_down_follows_the_failure_mode(sim_a: SimServer, tmp_path: Path, mode: str) -> None:
    config = _config(sim_a, store=f"redis://127.0.0.1:{free_port()}/0", failure_mode=mode)
    with running_gateway(config, tmp_path) as gateway:
        response = httpx.post(
            f"{gateway.base_url}/chat/completions", json={"model": "m", "messages": USER},
            headers={"x-tenant-id": _tenant()}, timeout=30,
        )
        if mode == "open":
            assert response.status_code == 200
        else:
            assert response.status_code == 503
            error = orjson.loads(response.content)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "ratelimit_unavailable" and error["type"] == "server_error"
            assert "rate limit service is unavailable" in error["message"] and "failure_mode: closed" in error["message"]
        gateway.wait_stderr(lambda line: "rate limit store" in line.lower())
        metrics = httpx.get(f"http://127.0.0.1:{gateway.processor_admin_port}/metrics", timeout=10).text
        errors = [line for line in metrics.splitlines() if line.startswith("extproc_ratelimit_store_errors")]
        assert errors and float(errors[0].rsplit(" ", 1)[1]) >= 1


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_external_service_down_follows_the_failure_mode(sim_a: SimServer, tmp_path: Path, mode: str) -> None:
    config = _config(sim_a, address=f"127.0.0.1:{free_port()}", failure_mode=mode)
    with running_gateway(config, tmp_path) as gateway:
        response = httpx.post(
            f"{gateway.base_url}/chat/completions", json={"model": "m", "messages": USER},
            headers={"x-tenant-id": _tenant()}, timeout=30,
        )
        assert response.status_code == (200 if mode == "open" else 503), response.text


def _limited_config(sim: SimServer, unit: str, requests: int) -> dict[str, Any]:
    return {
        "backends": [{"name": "sim", "base_url": sim.base_url}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "sim"}]}],
        "tenancy": {"header": "x-tenant-id"},
        "request_limits": [{"unit": unit, "requests": requests}],
    }


def _refusal(client: openai.OpenAI) -> httpx.Response:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=USER, max_tokens=1)
    assert caught.value.code == "rate_limit_exceeded"
    return caught.value.response


def test_request_limits_need_no_service(sim_a: SimServer, tmp_path: Path) -> None:
    """A burst of N, then one request per unit/N: the 429's headers agree with each other."""
    with running_gateway(_limited_config(sim_a, "hour", 3), tmp_path) as gateway:
        client = _client(gateway, _tenant())
        for _ in range(3):
            client.chat.completions.create(model="m", messages=USER, max_tokens=1)
        headers = _refusal(client).headers
        assert headers["retry-after"] == headers["x-ratelimit-reset"]
        assert 0 < int(headers["retry-after"]) <= 3600 // 3  # the next token, not the end of an hour
        assert (headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]) == ("3", "0")
        assert _client(gateway, _tenant()).chat.completions.create(model="m", messages=USER, max_tokens=1).choices


def test_request_limit_admits_again_when_its_retry_after_says(sim_a: SimServer, tmp_path: Path) -> None:
    """What retry-after promises holds: admitted once it has passed (Envoy rounds the time to
    the next token up to whole seconds, so it is never early)."""
    with running_gateway(_limited_config(sim_a, "minute", 20), tmp_path) as gateway:  # a token every 3 s
        client = _client(gateway, _tenant())
        for _ in range(20):
            client.chat.completions.create(model="m", messages=USER, max_tokens=1)
        headers = _refusal(client).headers
        wait = int(headers["retry-after"])
        assert wait == int(headers["x-ratelimit-reset"]) and 1 <= wait <= 3
        time.sleep(wait)
        assert client.chat.completions.create(model="m", messages=USER, max_tokens=1).choices


def test_reserve_refuses_what_cannot_fit_and_refunds_the_unused(sim_a: SimServer, tmp_path: Path) -> None:
    config = _config(sim_a, reserve=True)
    config["budgets"] = [{"name": "hourly", "unit": "hour", "limit": 300}]
    with running_gateway(config, tmp_path) as gateway:
        # More than the whole budget may be generated: refused before any upstream cost.
        sim_a.clear()
        client = _client(gateway, _tenant())
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=USER, max_tokens=400)
        assert sim_a.requests == []
        # The refused reservation is given back (the processor sees Envoy's 429 and
        # settles it as a response that cost nothing), so the tenant can still work.
        time.sleep(0.3)
        # A long one-word prompt: the estimate (~4 bytes/token) reserves far more than it costs.
        wordy = [{"role": "user", "content": "x" * 400}]
        for _ in range(4):  # without refunds, 4 reservations of ~115 tokens would not fit in 300
            client.chat.completions.create(model="m", messages=wordy, max_tokens=10)
            time.sleep(0.3)  # let Envoy settle the previous reservation
