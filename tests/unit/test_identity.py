"""The key store and authorization together: a stored key's grants narrow its tenant's,
the order of identity sources, and every caller-dependent answer of the request headers
phase (/v1/models, the MCP gateway's caller headers, the client's own provider key)
built only once a Redis lookup has answered."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.config import LoadedConfig, parse_config, resolve_secrets, resolve_tenant_keys
from extproc.exchange import Exchange
from extproc.keys import manage
from extproc.keys.manage import FileKeyEditor
from extproc.keys.redis_store import RedisKeyEditor
from extproc.runtime import Runtime
from extproc.schemas.openai import RequestError
from extproc.tenancy import caller_of
from tests.redis_server import free_port
from tests.unit.test_authorization import CLIENT_KEY, TEAM_KEY, config_data
from tests.unit.test_exchange import body_request, header_values, headers_request, immediate, metadata

MCP = {"port": 1, "servers": [{"name": "docs", "url": "http://127.0.0.1:9/mcp"}],
       "routes": [{"path": "/mcp", "servers": ["docs"]}]}


def build(key_store: dict[str, Any], **tenancy: Any) -> Runtime:
    data = config_data(mcp=MCP)
    data["tenancy"].update(key_store=key_store, **tenancy)
    config = parse_config(data, "t.yaml")
    env = {"OK": "sk-configured-openai", "AK": "sk-configured-anthropic", "TEAM_KEY": TEAM_KEY}
    return Runtime.build(LoadedConfig(config=config, source="t.yaml", secrets=resolve_secrets(config, env, "t.yaml"),
                                      tenant_keys=resolve_tenant_keys(config, env, "t.yaml")))


def bearer(key: str) -> tuple[str, bytes]:
    return ("authorization", f"Bearer {key}".encode())


async def answer_of(exchange: Exchange, message: ep.ProcessingRequest) -> ep.ProcessingResponse:
    answer = exchange.handle(message)
    return answer if isinstance(answer, ep.ProcessingResponse) else await answer


def with_authority(message: ep.ProcessingRequest, authority: bytes) -> ep.ProcessingRequest:
    for header in message.request_headers.headers.headers:
        if header.key == ":authority":
            header.raw_value = authority
    return message


def chat(model: str) -> ep.ProcessingRequest:
    return body_request(orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}))


@pytest.fixture()
def filed(tmp_path: Path) -> tuple[Runtime, FileKeyEditor]:
    editor = FileKeyEditor(tmp_path / "keys.jsonl")
    editor.save([])
    return build({"file": str(editor.path)}), editor


def test_precedence_store_key_then_config_key_then_host_then_header(filed: tuple[Runtime, FileKeyEditor]) -> None:
    rt, editor = filed
    manage.add(editor, "stored", time.time(), entry_id="ci", key=TEAM_KEY, models=("o3",))  # also in api_keys
    asyncio.run(rt.key_store.refresh())  # type: ignore[union-attr]
    assert rt.tenancy is not None

    def caller(*headers: tuple[str, bytes], host: bytes = b"team-h.gw.example.com") -> tuple[str, str]:
        found = caller_of({":authority": host, **dict(headers)}, rt.tenancy, rt.tenant_keys,  # type: ignore[arg-type]
                          rt.key_store, rt.host_pattern)
        assert not asyncio.iscoroutine(found)  # a file store answers in memory
        return found.tenant, found.via  # type: ignore[union-attr]

    assert caller(bearer(TEAM_KEY), ("x-tenant-id", b"claimed")) == ("stored", "key")
    manage.revoke(editor, "ci", time.time())
    asyncio.run(rt.key_store.refresh())  # type: ignore[union-attr]
    with pytest.raises(RequestError, match="revoked"):  # never the same key from api_keys, the host or the header
        caller(bearer(TEAM_KEY), ("x-tenant-id", b"claimed"))
    other = build({"file": str(editor.path.parent / "none.jsonl")})
    found = caller_of({":authority": b"team-h.gw.example.com", "authorization": f"Bearer {TEAM_KEY}".encode()},
                      other.tenancy, other.tenant_keys, other.key_store, other.host_pattern)  # type: ignore[arg-type]
    assert (found.tenant, found.via, found.models) == ("team-a", "key", ("gpt-4o*",))  # type: ignore[union-attr]
    assert caller(bearer("sk-unknown"), ("x-tenant-id", b"claimed")) == ("team-h", "host")
    assert caller(("x-tenant-id", b"claimed"), host=b"gw.example.com") == ("claimed", "header")


def test_a_stored_keys_models_narrow_its_tenants(filed: tuple[Runtime, FileKeyEditor]) -> None:
    rt, editor = filed
    made = manage.add(editor, "team-a", time.time(), entry_id="ci", models=("gpt-4o-mini",))
    asyncio.run(rt.key_store.refresh())  # type: ignore[union-attr]
    exchange = Exchange(rt)
    exchange.handle(headers_request("POST", "/v1/chat/completions", [bearer(made.key)]))
    status, body, _, _ = immediate(exchange.handle(chat("gpt-4o")))  # team-a may, this key may not
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    exchange = Exchange(rt)
    exchange.handle(headers_request("POST", "/v1/chat/completions", [bearer(made.key)]))
    assert metadata(exchange.handle(chat("gpt-4o-mini")))["tenant"] == "team-a"


# -- Redis: the caller known only after an await -------------------------------------------------


async def test_models_list_waits_for_the_stored_keys_grants(redis_url: str) -> None:
    editor = RedisKeyEditor(redis_url, prefix="i1:")
    made = manage.add(editor, "team-a", time.time(), entry_id="ci", models=("gpt-4o-mini",))
    rt = build({"redis": {"url": redis_url, "prefix": "i1:"}})
    pending = Exchange(rt).handle(headers_request("GET", "/v1/models", [bearer(made.key)], end_of_stream=True))
    assert not isinstance(pending, ep.ProcessingResponse)  # the first use of a key waits for Redis
    status, listing, _, _ = immediate(await pending)
    assert status == 200 and [m["id"] for m in listing["data"]] == ["gpt-4o-mini"]
    other = build({"redis": {"url": redis_url, "prefix": "i1:"}})
    pending = Exchange(other).handle(headers_request("GET", "/v1/models/gpt-4o", [bearer(made.key)],
                                                     end_of_stream=True))
    assert not isinstance(pending, ep.ProcessingResponse)
    assert immediate(await pending)[0] == 404  # its tenant may use gpt-4o, the key may not
    await rt.key_store.close()  # type: ignore[union-attr]
    await other.key_store.close()  # type: ignore[union-attr]
    editor.close()


async def test_mcp_caller_headers_wait_for_the_stored_keys_tools(redis_url: str) -> None:
    editor = RedisKeyEditor(redis_url, prefix="i2:")
    made = manage.add(editor, "team-a", time.time(), entry_id="agent", tools=("docs__read",))
    rt = build({"redis": {"url": redis_url, "prefix": "i2:"}})
    forged = [bearer(made.key), ("x-ai-eg-tenant", b"open"), ("x-ai-eg-tools", b'["*"]')]
    pending = Exchange(rt).handle(headers_request("POST", "/mcp", forged))
    assert not isinstance(pending, ep.ProcessingResponse)
    mutation = (await pending).request_headers.response.header_mutation
    assert {h.header.key: h.header.raw_value for h in mutation.set_headers} == {
        "x-ai-eg-tenant": b"team-a", "x-ai-eg-tools": b'["docs__read"]'}
    manage.revoke(editor, "agent", time.time())
    rt.key_store._cache.clear()  # type: ignore[union-attr]  # as when cache_seconds have passed
    status, body, _, _ = immediate(await answer_of(Exchange(rt), headers_request("POST", "/mcp", [bearer(made.key)])))
    assert status == 401 and body["jsonrpc"] == "2.0" and body["error"]["code"] == -32052
    assert body["error"]["message"] == "This API key has been revoked."
    await rt.key_store.close()  # type: ignore[union-attr]
    editor.close()


async def test_mcp_with_redis_down_is_a_json_rpc_503() -> None:
    rt = build({"redis": {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_ms": 200}})
    response = await answer_of(Exchange(rt), headers_request("POST", "/mcp", [bearer("sk-someone-0123456789")]))
    status, body, _, details = immediate(response)
    assert status == 503 and body["jsonrpc"] == "2.0" and details == "extproc_key_store_unavailable"
    assert body["error"]["code"] == -32050  # the gateway cannot check the caller now, as for an unreachable JWKS
    assert "sk-someone" not in orjson.dumps(body).decode()
    await rt.key_store.close()  # type: ignore[union-attr]


async def test_client_key_kept_after_the_lookup(redis_url: str) -> None:
    editor = RedisKeyEditor(redis_url, prefix="i3:")
    made = manage.add(editor, "team-a", time.time(), entry_id="ci")
    rt = build({"redis": {"url": redis_url, "prefix": "i3:"}})
    exchange = Exchange(rt)
    first = exchange.handle(headers_request("POST", "/v1/chat/completions",
                                            [bearer(made.key), ("x-provider-key", CLIENT_KEY)]))
    assert not isinstance(first, ep.ProcessingResponse)
    await first
    response = exchange.handle(chat("gpt-4o"))
    assert isinstance(response, ep.ProcessingResponse)
    assert header_values(response)["authorization"] == b"Bearer " + CLIENT_KEY
    assert metadata(response)["tenant"] == "team-a"
    await rt.key_store.close()  # type: ignore[union-attr]
    editor.close()


def test_tenancy_with_only_hosts_or_a_key_store_is_valid(tmp_path: Path) -> None:
    data = config_data()
    data["tenancy"] = {"key_store": {"file": str(tmp_path / "k.jsonl")}}
    parse_config(data, "t.yaml")
    data["tenancy"] = {"host_pattern": "{tenant}.gw.example.com"}
    parse_config(data, "t.yaml")
