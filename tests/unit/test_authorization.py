"""Authorization of models and MCP tools, tenant by host name, and the client's own
provider key: config checks, the policy, and the request and upstream stages driven with
real ext_proc messages."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.authorization import Policy
from extproc.config import Authorization, ConfigError, LoadedConfig, parse_config, resolve_secrets, resolve_tenant_keys
from extproc.exchange import Exchange
from extproc.mcp.access import tool_check
from extproc.runtime import Runtime
from extproc.tenancy import Caller
from extproc.upstream import UpstreamExchange
from tests.unit.test_exchange import body_request, header_values, headers_request, immediate, metadata, removed
from tests.unit.test_upstream import headers_message, mutation

TEAM_KEY = "sk-team-a-narrow-key"
OPENAI_KEY = "sk-configured-openai"
ANTHROPIC_KEY = "sk-configured-anthropic"
CLIENT_KEY = b"sk-client-own-provider-key"


def config_data(**extra: Any) -> dict[str, Any]:
    return {
        "backends": [
            {"name": "oa", "base_url": "https://api.openai.com/v1", "api_key": {"env": "OK"},
             "client_key_header": "x-provider-key", "headers": {"x-team": "search"}},
            {"name": "claude", "schema": "anthropic", "base_url": "https://api.anthropic.com",
             "api_key": {"env": "AK"}, "client_key_header": "X-Provider-Key"},
            {"name": "plain", "base_url": "http://127.0.0.1:8080/v1"},
        ],
        "routes": [
            {"name": "gpt", "match": {"model": ["gpt-4o", "gpt-4o-mini", "o3"]}, "backends": [{"name": "oa"}]},
            {"name": "claude", "match": {"prefix": "claude-"}, "backends": [{"name": "claude"}]},
            {"name": "rest", "default": True, "backends": [{"name": "plain"}]},
        ],
        "tenancy": {
            "header": "x-tenant-id",
            "api_keys": [{"key": {"env": "TEAM_KEY"}, "tenant": "team-a", "models": ["gpt-4o*"], "tools": ["docs__*"]}],
            "hosts": {"Special.Example.org": "special"},
            "host_pattern": "{tenant}.gw.example.com",
        },
        "authorization": {"tenants": {
            "*": {"models": ["gpt-4o-mini"], "tools": []},
            "team-a": {"models": ["gpt-*", "claude-*"], "tools": ["docs__*", "search__web"]},
            "open": {},
        }},
        **extra,
    }


def make_runtime(data: dict[str, Any] | None = None) -> Runtime:
    config = parse_config(data or config_data(), "t.yaml")
    env = {"OK": OPENAI_KEY, "AK": ANTHROPIC_KEY, "TEAM_KEY": TEAM_KEY}
    return Runtime.build(LoadedConfig(config=config, source="t.yaml", secrets=resolve_secrets(config, env, "t.yaml"),
                                      tenant_keys=resolve_tenant_keys(config, env, "t.yaml")))


RUNTIME = make_runtime()


def send(model: str, headers: list[tuple[str, bytes]], path: str = "/v1/chat/completions",
         runtime: Runtime = RUNTIME) -> ep.ProcessingResponse:
    exchange = Exchange(runtime)
    first = exchange.handle(headers_request("POST", path, headers))
    if first.WhichOneof("response") == "immediate_response":
        return first
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    return exchange.handle(body_request(json.dumps(body).encode()))


def get(path: str, headers: list[tuple[str, bytes]]) -> tuple[int, dict[str, Any]]:
    response = Exchange(RUNTIME).handle(headers_request("GET", path, headers, end_of_stream=True))
    status, body, _, _ = immediate(response)
    return status, body


# -- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "words"), [
    (lambda d: d.pop("tenancy"), "authorization is per tenant"),
    (lambda d: d["authorization"]["tenants"].update({"bad name": {}}), "not a tenant name"),
    (lambda d: d["authorization"]["tenants"]["*"].update(models=[""]), "not a glob"),
    (lambda d: d["backends"][0].update(client_key_header="authorization"), "credentials for the gateway"),
    (lambda d: d["backends"][0].update(client_key_header="x-provider"), "must contain 'key'"),
    (lambda d: d["backends"][0].update(client_key_header="x-ai-eg-key"), "not a header name a client may set"),
    (lambda d: d.update(telemetry={"user_id_header": "x-provider-key"}), "never be"),
    (lambda d: d["routes"][0]["backends"].append({"name": "plain", "priority": 1}), "cannot follow fallback"),
    (lambda d: d["tenancy"].update(host_pattern="gw-{tenant}.example.com"), "whole label"),
    (lambda d: d["tenancy"].update(hosts={"host:8080": "x"}), "not a host name"),
])
def test_config_refuses(change: Any, words: str) -> None:
    data = config_data()
    change(data)
    with pytest.raises(ConfigError, match=words):
        parse_config(data, "t.yaml")


@pytest.mark.parametrize("schema", ["aws_bedrock", "gcp_vertex_ai"])
def test_no_client_key_for_signed_backends(schema: str) -> None:
    data = config_data()
    data["backends"].append({"name": "x", "schema": schema, "client_key_header": "x-provider-key",
                             "aws": {"region": "us-east-1"}} if schema == "aws_bedrock" else
                            {"name": "x", "schema": schema, "client_key_header": "x-provider-key",
                             "vertex": {"project": "my-project", "region": "us-east5"}})
    with pytest.raises(ConfigError, match="not for AWS SigV4 or Google access tokens"):
        parse_config(data, "t.yaml")


# -- the policy -------------------------------------------------------------------------


def test_policy_tenant_wildcard_and_own_grants() -> None:
    policy = Policy(Authorization.model_validate(config_data()["authorization"]))
    team = Caller("team-a", "header")
    assert policy.allows_model(team, "gpt-4o") and policy.allows_model(team, "claude-3-haiku")
    assert not policy.allows_model(team, "llama")
    assert policy.allows_model(Caller("anyone", "header"), "gpt-4o-mini")
    assert not policy.allows_model(Caller("anyone", "header"), "gpt-4o")
    assert policy.allows_model(Caller("open", "header"), "anything/at-all")  # no list: everything
    narrowed = Caller("team-a", "key", models=("gpt-4o*",))
    assert policy.allows_model(narrowed, "gpt-4o-mini") and not policy.allows_model(narrowed, "claude-3-haiku")
    # a key's own grant never widens its tenant's
    assert not policy.allows_model(Caller("anyone", "key", models=("*",)), "gpt-4o")
    assert policy.allows_tool("team-a", None, "search__web") and not policy.allows_tool("team-a", None, "search__x")
    assert not policy.allows_tool("team-a", ("docs__*",), "search__web")
    assert not policy.allows_tool("anyone", None, "docs__read")  # '*' has tools: []
    assert not policy.allows_tool(None, None, "docs__read")  # nobody named: nothing
    assert policy.models_for(team, ("gpt-4o", "llama", "o3")) == ("gpt-4o",)


def test_no_wildcard_entry_allows_unlisted_tenants_nothing() -> None:
    policy = Policy(Authorization.model_validate({"tenants": {"team-a": {}}}))
    assert policy.allows_model(Caller("team-a", "header"), "x")
    assert not policy.allows_model(Caller("team-b", "header"), "x")


def test_globs_are_case_sensitive_and_whole_name() -> None:
    policy = Policy(Authorization.model_validate({"tenants": {"*": {"models": ["gpt-4o"]}}}))
    caller = Caller("t", "header")
    assert policy.allows_model(caller, "gpt-4o")
    assert not policy.allows_model(caller, "GPT-4o") and not policy.allows_model(caller, "gpt-4o-mini")


# -- models through the request stage -------------------------------------------------------


def test_refused_model_is_a_403_in_openais_shape_before_routing() -> None:
    response = send("gpt-4o", [("x-tenant-id", b"someone")])
    status, body, _, details = immediate(response)
    assert status == 403 and details == "extproc_model_not_allowed"
    assert metadata(response) == {"tenant": "someone", "request_model": "gpt-4o"}  # for the access log
    assert body["error"] == {"message": "You are not allowed to use the model `gpt-4o`.", "type": "permission_error",
                             "param": "model", "code": "model_not_allowed"}


def test_refused_model_is_a_403_in_anthropics_shape_for_anthropic_clients() -> None:
    status, body, _, _ = immediate(send("claude-3-haiku", [("x-tenant-id", b"someone")], "/anthropic/v1/messages"))
    assert status == 403
    assert body == {"type": "error", "error": {"type": "permission_error",
                                               "message": "You are not allowed to use the model `claude-3-haiku`."}}


def test_allowed_model_is_routed() -> None:
    response = send("gpt-4o", [("x-tenant-id", b"team-a")])
    assert metadata(response)["tenant"] == "team-a" and metadata(response)["backend_name"] == "oa"


def test_a_keys_own_models_narrow_its_tenants() -> None:
    key = [("authorization", f"Bearer {TEAM_KEY}".encode())]
    assert metadata(send("gpt-4o-mini", key))["tenant"] == "team-a"
    status, _, _, _ = immediate(send("claude-3-haiku", key, "/anthropic/v1/messages"))
    assert status == 403
    assert metadata(send("claude-3-haiku", [("x-tenant-id", b"team-a")], "/anthropic/v1/messages"))["tenant"] == "team-a"


def test_models_list_shows_only_the_callers_models() -> None:
    status, listing = get("/v1/models", [("x-tenant-id", b"team-a")])
    assert status == 200 and listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["gpt-4o", "gpt-4o-mini"]  # not o3
    assert [m["id"] for m in get("/v1/models", [("x-tenant-id", b"open")])[1]["data"]] == ["gpt-4o", "gpt-4o-mini", "o3"]
    assert [m["id"] for m in get("/v1/models", [("x-tenant-id", b"someone")])[1]["data"]] == ["gpt-4o-mini"]
    assert [m["id"] for m in get("/v1/models", [("authorization", f"Bearer {TEAM_KEY}".encode())])[1]["data"]] == [
        "gpt-4o", "gpt-4o-mini"]
    assert get("/v1/models/gpt-4o", [("x-tenant-id", b"someone")])[0] == 404
    assert get("/v1/models/gpt-4o", [("x-tenant-id", b"team-a")])[0] == 200


# -- tenant by host name ----------------------------------------------------------------------


@pytest.mark.parametrize(("authority", "extra", "tenant"), [
    (b"team-b.gw.example.com", [], "team-b"),
    (b"TEAM-B.gw.example.com:443", [("x-tenant-id", b"claimed")], "team-b"),  # the host wins over the header
    (b"special.example.org", [], "special"),
    (b"a.b.gw.example.com", [("x-tenant-id", b"claimed")], "claimed"),  # not one label: the header
    (b"team-b.gw.example.com", [("x-api-key", TEAM_KEY.encode())], "team-a"),  # a key wins over the host
])
def test_tenant_by_host(authority: bytes, extra: list[tuple[str, bytes]], tenant: str) -> None:
    exchange = Exchange(RUNTIME)
    message = headers_request("POST", "/v1/chat/completions", extra)
    for header in message.request_headers.headers.headers:
        if header.key == ":authority":
            header.raw_value = authority
    exchange.handle(message)
    assert exchange.caller is not None and exchange.caller.tenant == tenant


# -- bring your own key ------------------------------------------------------------------------


def test_client_key_replaces_the_configured_one_on_the_fast_path() -> None:
    response = send("gpt-4o", [("x-tenant-id", b"team-a"), ("x-provider-key", CLIENT_KEY)])
    values = header_values(response)
    assert values["authorization"] == b"Bearer " + CLIENT_KEY and values["x-team"] == b"search"
    assert "x-provider-key" in removed(response)
    assert CLIENT_KEY not in response.SerializeToString().replace(b"Bearer " + CLIENT_KEY, b"")
    assert all(CLIENT_KEY.decode() not in str(v) for v in metadata(response).values())


def test_without_a_client_key_the_configured_one_is_used() -> None:
    response = send("gpt-4o", [("x-tenant-id", b"team-a")])
    assert header_values(response)["authorization"] == f"Bearer {OPENAI_KEY}".encode()
    assert "x-provider-key" in removed(response)


def test_a_client_key_works_for_a_backend_without_a_key_of_its_own() -> None:
    data = config_data()
    del data["backends"][0]["api_key"]
    response = send("gpt-4o", [("x-tenant-id", b"team-a"), ("x-provider-key", CLIENT_KEY),
                               ("authorization", b"Bearer sk-gateway-key")], runtime=make_runtime(data))
    assert header_values(response)["authorization"] == b"Bearer " + CLIENT_KEY
    assert "authorization" not in removed(response) and "x-provider-key" in removed(response)


def test_a_client_key_never_reaches_a_backend_that_does_not_take_it() -> None:
    response = send("llama", [("x-tenant-id", b"open"), ("x-provider-key", CLIENT_KEY)])
    assert "x-provider-key" in removed(response)
    assert CLIENT_KEY not in response.SerializeToString()


def test_staged_request_keeps_the_client_key_for_the_upstream_stage_only() -> None:
    response = send("claude-3-haiku", [("x-tenant-id", b"team-a"), ("x-provider-key", CLIENT_KEY)],
                    "/anthropic/v1/messages")
    assert "x-provider-key" not in removed(response)  # the upstream stage puts it in place
    assert CLIENT_KEY not in response.SerializeToString()
    upstream = UpstreamExchange(RUNTIME)
    upstream.handle(headers_message("claude", "anthropic.messages", {"x-provider-key": CLIENT_KEY}))
    body = {"model": "claude-3-haiku", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    answer = upstream.handle(body_request(orjson.dumps(body)))
    assert isinstance(answer, ep.ProcessingResponse)
    headers, remove, _ = mutation(answer)
    assert headers["x-api-key"] == CLIENT_KEY and "x-provider-key" in remove


def test_upstream_stage_uses_the_configured_key_without_a_client_key() -> None:
    upstream = UpstreamExchange(RUNTIME)
    upstream.handle(headers_message("claude", "anthropic.messages"))
    body = {"model": "claude-3-haiku", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    answer = upstream.handle(body_request(orjson.dumps(body)))
    assert isinstance(answer, ep.ProcessingResponse)
    assert mutation(answer)[0]["x-api-key"] == ANTHROPIC_KEY.encode()


# -- MCP: the caller for the MCP gateway -----------------------------------------------------


def mcp_runtime() -> Runtime:
    data = config_data(mcp={"port": 1, "servers": [{"name": "docs", "url": "http://127.0.0.1:9/mcp"}],
                            "routes": [{"path": "/mcp", "servers": ["docs"]}]})
    return make_runtime(data)


def mcp_headers(runtime: Runtime, extra: list[tuple[str, bytes]]) -> tuple[dict[str, bytes], list[str]]:
    response = Exchange(runtime).handle(headers_request("POST", "/mcp", extra))
    mutation_ = response.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value for h in mutation_.set_headers}, list(mutation_.remove_headers)


def test_mcp_request_stage_names_the_caller_and_drops_forged_copies() -> None:
    runtime = mcp_runtime()
    values, remove = mcp_headers(runtime, [("x-tenant-id", b"team-b"), ("x-ai-eg-tools", b'["*"]')])
    assert values == {"x-ai-eg-tenant": b"team-b"} and remove == ["x-ai-eg-tools"]
    values, remove = mcp_headers(runtime, [("authorization", f"Bearer {TEAM_KEY}".encode())])
    assert values == {"x-ai-eg-tenant": b"team-a", "x-ai-eg-tools": b'["docs__*"]'} and remove == []


def test_mcp_without_identity_is_a_json_rpc_error() -> None:
    data = config_data(mcp={"port": 1, "servers": [{"name": "docs", "url": "http://127.0.0.1:9/mcp"}],
                            "routes": [{"path": "/mcp", "servers": ["docs"]}]})
    data["tenancy"] = {"header": "x-tenant-id"}
    response = Exchange(make_runtime(data)).handle(headers_request("POST", "/mcp", []))
    status, body, _, _ = immediate(response)
    assert status == 401 and body["jsonrpc"] == "2.0" and body["error"]["code"] == -32052
    assert "x-tenant-id" in body["error"]["message"]


def test_mcp_gateway_tool_check() -> None:
    policy = RUNTIME.authorization
    assert tool_check(None, {}) is None
    check = tool_check(policy, {"x-ai-eg-tenant": "team-a"})
    assert check is not None and check("docs__read") and check("search__web") and not check("search__images")
    narrowed = tool_check(policy, {"x-ai-eg-tenant": "team-a", "x-ai-eg-tools": '["search__*"]'})
    assert narrowed is not None and narrowed("search__web") and not narrowed("docs__read")
    broken = tool_check(policy, {"x-ai-eg-tenant": "team-a", "x-ai-eg-tools": "not json"})
    assert broken is not None and not broken("docs__read")
    nobody = tool_check(policy, {})
    assert nobody is not None and not nobody("docs__read")


def test_a_refused_tool_call_costs_no_call_budget() -> None:
    data = config_data(mcp={"port": 1, "servers": [{"name": "docs", "url": "http://127.0.0.1:9/mcp"}],
                            "routes": [{"path": "/mcp", "servers": ["docs"]}]},
                       budgets=[{"name": "calls", "tool": "docs__read", "cost": "mcp_tool_call", "unit": "hour",
                                 "limit": 10}])
    runtime = make_runtime(data)
    call = orjson.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "docs__read"}})

    def charged(tenant: bytes) -> Any:
        exchange = Exchange(runtime)
        exchange.handle(headers_request("POST", "/mcp", [("x-tenant-id", tenant)]))
        return metadata(exchange.handle(body_request(call)))["mcp_tool_call"]

    assert charged(b"team-a") == 1
    assert charged(b"team-z") == 0  # '*' may call no tool: the MCP gateway refuses it, nothing is charged


@pytest.mark.parametrize(("schema", "extra", "header"), [
    ("azure_openai", {"api_version": "2024-10-21"}, "api-key"),
    ("gemini", {}, "x-goog-api-key"),
    ("anthropic", {}, "x-api-key"),
])
def test_each_key_schema_gets_the_client_key_in_its_own_header(schema: str, extra: dict[str, Any], header: str) -> None:
    data = config_data()
    data["backends"].append({"name": "own", "schema": schema, "base_url": "https://provider.example.com/v1",
                             "api_key": {"env": "OK"}, "client_key_header": "x-provider-key", **extra})
    runtime = make_runtime(data)
    for sent, expected in ((CLIENT_KEY, CLIENT_KEY), (None, OPENAI_KEY.encode())):
        upstream = UpstreamExchange(runtime)
        upstream.handle(headers_message("own", "openai.chat", {"x-provider-key": sent} if sent else {}))
        answer = upstream.handle(body_request(orjson.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]})))
        assert isinstance(answer, ep.ProcessingResponse)
        headers, remove, _ = mutation(answer)
        assert headers[header] == expected and "x-provider-key" in remove
        assert "authorization" not in headers or header == "authorization"


def test_host_names_alone_may_name_tenants() -> None:
    data = config_data()
    data["tenancy"] = {"host_pattern": "{tenant}.GW.example.com", "hosts": {"Api.Example.com": "main"}}
    tenancy = parse_config(data, "t.yaml").tenancy
    assert tenancy is not None and tenancy.host_pattern == "{tenant}.gw.example.com"
    assert tenancy.hosts == {"api.example.com": "main"}
    runtime = make_runtime(data)
    exchange = Exchange(runtime)
    response = exchange.handle(headers_request("POST", "/v1/chat/completions", []))  # :authority gateway.local
    status, body, _, _ = immediate(response)
    assert status == 401 and "a tenant's host name" in body["error"]["message"]
