"""Who a request is charged to: API key, tenant header, default, or a refusal."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.config import LoadedConfig, load_config, parse_config
from extproc.exchange import Exchange
from extproc.runtime import Runtime
from tests.unit.test_exchange import body_request, headers_request, immediate, metadata

TEAM_KEY = "sk-team-a-123456"


def runtime(tenancy: dict[str, Any], tmp_path: Any) -> Runtime:
    import yaml

    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "a"}]}],
        "tenancy": tenancy,
        "budgets": [{"name": "tpm", "unit": "minute", "limit": 100}],
        "ratelimit": {"reserve": True},
    }))
    return Runtime.build(load_config(path, {"TEAM_KEY": TEAM_KEY}))


def run(rt: Runtime, headers: list[tuple[str, bytes]], body: dict[str, Any] | None = None) -> ep.ProcessingResponse:
    raw = json.dumps(body or {"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    exchange = Exchange(rt)
    first = exchange.handle(headers_request("POST", "/v1/chat/completions", headers))
    if first.WhichOneof("response") == "immediate_response":
        return first
    return exchange.handle(body_request(raw))


def test_known_api_key_wins_over_a_claimed_header(tmp_path: Any) -> None:
    rt = runtime({"header": "x-tenant-id", "api_keys": [{"key": {"env": "TEAM_KEY"}, "tenant": "team-a"}]}, tmp_path)
    response = run(rt, [("authorization", f"Bearer {TEAM_KEY}".encode()), ("x-tenant-id", b"someone-else")])
    assert metadata(response)["tenant"] == "team-a"
    assert metadata(run(rt, [("x-api-key", TEAM_KEY.encode())]))["tenant"] == "team-a"


def test_header_names_the_tenant_when_no_key_matches(tmp_path: Any) -> None:
    rt = runtime({"header": "x-tenant-id", "api_keys": [{"key": {"env": "TEAM_KEY"}, "tenant": "team-a"}]}, tmp_path)
    assert metadata(run(rt, [("authorization", b"Bearer sk-other"), ("x-tenant-id", b"team-b")]))["tenant"] == "team-b"


def test_default_tenant(tmp_path: Any) -> None:
    rt = runtime({"header": "x-tenant-id", "default_tenant": "anonymous"}, tmp_path)
    assert metadata(run(rt, []))["tenant"] == "anonymous"


@pytest.mark.parametrize(("status", "code"), [(401, "invalid_api_key"), (403, "tenant_required")])
def test_no_tenant_is_refused_as_configured(tmp_path: Any, status: int, code: str) -> None:
    rt = runtime({"header": "x-tenant-id", "reject_status": status}, tmp_path)
    got, body, _, _ = immediate(run(rt, []))
    assert got == status
    assert body["error"]["code"] == code and "x-tenant-id" in body["error"]["message"]


@pytest.mark.parametrize("value", [b"a" * 200, b"bad tenant", b"../x", "t\u00e9".encode()])
def test_malformed_tenant_header_is_400(tmp_path: Any, value: bytes) -> None:
    rt = runtime({"header": "x-tenant-id"}, tmp_path)
    got, body, _, _ = immediate(run(rt, [("x-tenant-id", value)]))
    assert got == 400 and body["error"]["type"] == "invalid_request_error"


def test_key_table_holds_digests_not_keys(tmp_path: Any) -> None:
    rt = runtime({"api_keys": [{"key": {"env": "TEAM_KEY"}, "tenant": "team-a"}]}, tmp_path)
    assert TEAM_KEY not in repr(rt.tenant_keys) and TEAM_KEY not in repr(rt.loaded)


def test_reserve_estimate_is_in_the_request_metadata(tmp_path: Any) -> None:
    rt = runtime({"header": "x-tenant-id"}, tmp_path)
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    reserved = metadata(run(rt, [("x-tenant-id", b"t")], body))["ratelimit_reserve"]
    assert reserved == len(json.dumps(body)) // 4 + 50
