"""auth.jwt: the config's checks, the jwt_authn filter it renders, and the tenant the
processor reads from the metadata Envoy forwards (through the request stage)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from extproc import envoyconfig, jwt_authn
from extproc.config import ConfigError, LoadedConfig, parse_config
from extproc.exchange import Exchange
from extproc.runtime import Runtime
from tests.unit.test_exchange import body_request, headers_request, immediate, metadata

JWKS = {"keys": [{"kty": "EC", "crv": "P-256", "x": "x", "y": "y", "kid": "k1"}]}


def _data(tmp_path: Path, jwt: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(JWKS))
    provider = {"name": "corp", "issuer": "https://idp", "audiences": ["gw"], "jwks_file": str(jwks),
                "tenant_claim": "org.id"}
    return {
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "a"}]}],
        "auth": {"jwt": {"providers": [provider], **(jwt or {})}},
        **extra,
    }


# -- config ---------------------------------------------------------------------------------


def test_budgets_may_rely_on_jwt_tenants_alone(tmp_path: Path) -> None:
    config = parse_config(_data(tmp_path, budgets=[{"name": "b", "unit": "hour", "limit": 5}]))
    assert config.auth.jwt is not None and config.tenancy is None


def test_authorization_may_rely_on_jwt_tenants_alone(tmp_path: Path) -> None:
    authorization = {"tenants": {"*": {"models": ["gpt-*"]}}}
    config = parse_config(_data(tmp_path, authorization=authorization))
    assert config.authorization is not None and config.tenancy is None
    data = _data(tmp_path, authorization=authorization)
    del data["auth"]
    with pytest.raises(ConfigError, match="authorization is per tenant: add a 'tenancy' section \\(or auth.jwt\\)"):
        parse_config(data)


@pytest.mark.parametrize(("change", "message"), [
    ({"jwks_uri": "https://idp/jwks"}, "set exactly one of 'jwks_file' or 'jwks_uri'"),
    ({"jwks_file": None}, "set exactly one of 'jwks_file' or 'jwks_uri'"),
    ({"jwks_file": None, "jwks_uri": "ftp://idp/jwks"}, "must be an http:// or https:// URL"),
    ({"jwks_file": "/nonexistent/jwks.json"}, "cannot read a JWKS from /nonexistent/jwks.json"),
    ({"tenant_claim": "org..id"}, "a claim name, or up to 8 names joined by dots"),
    ({"models_claim": "scope."}, "a claim name, or up to 8 names joined by dots"),
    ({"name": "has.dot"}, "should match pattern"),
    ({"cache_seconds": 0}, "greater than or equal to 1"),
])
def test_provider_mistakes_are_named(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    data = _data(tmp_path)
    provider = data["auth"]["jwt"]["providers"][0]
    provider.update(change)
    if provider.get("jwks_file") is None:
        provider.pop("jwks_file")
    with pytest.raises(ConfigError, match="auth.jwt.providers") as error:
        parse_config(data)
    assert message in str(error.value)


def test_an_empty_jwks_file_is_refused(tmp_path: Path) -> None:
    data = _data(tmp_path)
    Path(data["auth"]["jwt"]["providers"][0]["jwks_file"]).write_text('{"keys": []}')
    with pytest.raises(ConfigError, match="has no 'keys' list"):
        parse_config(data)


def test_two_providers_for_one_issuer_are_refused(tmp_path: Path) -> None:
    data = _data(tmp_path)
    first = data["auth"]["jwt"]["providers"][0]
    data["auth"]["jwt"]["providers"].append({**first, "name": "again"})
    with pytest.raises(ConfigError, match="share the issuer"):
        parse_config(data)


# -- rendering ------------------------------------------------------------------------------


def test_jwt_authn_runs_before_the_processor_and_strips_the_token(tmp_path: Path) -> None:
    config = parse_config(_data(tmp_path))
    filters = envoyconfig.http_filters(config)
    assert [f["name"] for f in filters[:2]] == [jwt_authn.FILTER_NAME, "envoy.filters.http.ext_proc"]
    provider = filters[0]["typed_config"]["providers"]["corp"]
    assert provider["forward"] is False and provider["require_expiration"] is True
    assert provider["payload_in_metadata"] == "corp"
    assert provider["from_headers"] == [{"name": "authorization", "value_prefix": "Bearer "}, {"name": "x-api-key"}]
    assert "from_params" not in provider  # a token in a URL would land in the access log's path
    assert filters[0]["typed_config"]["rules"] == [{"match": {"prefix": "/"}, "requires": {"provider_name": "corp"}}]
    forwarded = filters[1]["typed_config"]["metadata_options"]["forwarding_namespaces"]["untyped"]
    assert forwarded == [jwt_authn.NAMESPACE]


def test_optional_tokens_let_missing_and_failed_ones_through_to_the_processor(tmp_path: Path) -> None:
    config = parse_config(_data(tmp_path, {"required": False}))
    rules = envoyconfig.http_filters(config)[0]["typed_config"]["rules"]
    assert rules[0]["requires"] == {"requires_any": {"requirements": [
        {"provider_name": "corp"}, {"allow_missing_or_failed": {}}]}}


def test_a_remote_jwks_gets_its_own_tls_cluster(tmp_path: Path) -> None:
    data = _data(tmp_path)
    provider = data["auth"]["jwt"]["providers"][0]
    del provider["jwks_file"]
    provider.update(jwks_uri="https://login.example.com:8443/keys", cache_seconds=60)
    config = parse_config(data)
    remote = envoyconfig.http_filters(config)[0]["typed_config"]["providers"]["corp"]["remote_jwks"]
    assert remote["http_uri"] == {"uri": "https://login.example.com:8443/keys", "cluster": "jwks-corp",
                                  "timeout": "5s"}
    assert remote["cache_duration"] == "60s" and "async_fetch" in remote
    (cluster,) = [c for c in envoyconfig.clusters(config) if c["name"] == "jwks-corp"]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "login.example.com", "port_value": 8443}
    assert cluster["transport_socket"]["typed_config"]["sni"] == "login.example.com"


def test_refusals_are_401_in_each_clients_shape(tmp_path: Path) -> None:
    data = _data(tmp_path, mcp={"servers": [{"name": "s", "url": "http://127.0.0.1:2/mcp"}],
                                "routes": [{"path": "/mcp", "servers": ["s"]}]})
    mappers = envoyconfig.fragment(parse_config(data))["local_reply_config"]["mappers"]
    for unavailable in mappers[:3]:
        assert unavailable["status_code"] == 503
        assert "Jwks_remote_fetch_is_failed" in unavailable["filter"]["extension_filter"]["typed_config"]["expression"]
    mcp, anthropic, openai = mappers[3:6]
    for mapper in (mcp, anthropic, openai):
        assert mapper["status_code"] == 401  # Envoy's own 403 for a wrong audience too
        assert "jwt_authn_access_denied" in mapper["filter"]["extension_filter"]["typed_config"]["expression"]
    assert "['/mcp']" in mcp["filter"]["extension_filter"]["typed_config"]["expression"]
    assert mcp["body_format_override"]["json_format"]["error"]["code"] == -32052
    assert "'/anthropic/v1/messages'" in anthropic["filter"]["extension_filter"]["typed_config"]["expression"]
    assert anthropic["body_format_override"]["json_format"]["error"]["type"] == "authentication_error"
    assert openai["body_format_override"]["json_format"]["error"]["code"] == "invalid_api_key"


def test_no_jwt_renders_nothing_new(tmp_path: Path) -> None:
    data = _data(tmp_path)
    del data["auth"]
    config = parse_config(data)
    assert envoyconfig.http_filters(config)[0]["name"] == "envoy.filters.http.ext_proc"
    assert "forwarding_namespaces" not in envoyconfig.http_filters(config)[0]["typed_config"]["metadata_options"]


# -- the processor: the tenant from the verified payload ---------------------------------------


def _payloads(**by_key: dict[str, Any]) -> base_pb2.Metadata:
    struct = struct_pb2.Struct()
    struct.update(by_key)
    out = base_pb2.Metadata()
    out.filter_metadata[jwt_authn.NAMESPACE].CopyFrom(struct)
    return out


def _runtime(tmp_path: Path, **jwt: Any) -> Runtime:
    data = _data(tmp_path, jwt, tenancy={"header": "x-tenant-id", "default_tenant": "anonymous"})
    return Runtime.build(LoadedConfig(config=parse_config(data), source="test"))


def _run(rt: Runtime, verified: base_pb2.Metadata | None, headers: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
         path: str = "/v1/chat/completions") -> ep.ProcessingResponse:
    exchange = Exchange(rt)
    request = headers_request("POST", path, headers)
    if verified is not None:
        request.metadata_context.CopyFrom(verified)
    first = exchange.handle(request)
    if first.WhichOneof("response") == "immediate_response":
        return first
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if path.startswith("/anthropic"):
        body["max_tokens"] = 5
    return exchange.handle(body_request(json.dumps(body).encode()))


@pytest.mark.parametrize(("claim", "tenant"), [
    ({"id": "acme"}, "acme"), ({"id": 4217}, "4217"), ({"id": ["team-x", "team-y"]}, "team-x"),
    ({"id": "ops@example.com"}, "ops@example.com"),
])
def test_the_verified_claim_names_the_tenant_over_a_header(tmp_path: Path, claim: Any, tenant: str) -> None:
    response = _run(_runtime(tmp_path), _payloads(corp={"iss": "https://idp", "org": claim}),
                    [("x-tenant-id", b"forged")])
    assert metadata(response)["tenant"] == tenant


@pytest.mark.parametrize("org", [None, {"id": True}, {"id": "two words"}, {"id": "x" * 129}, {"name": "acme"}])
def test_a_valid_token_without_a_tenant_claim_is_403(tmp_path: Path, org: Any) -> None:
    payload: dict[str, Any] = {"iss": "https://idp"}
    if org is not None:
        payload["org"] = org
    status, body, _, details = immediate(_run(_runtime(tmp_path), _payloads(corp=payload)))
    assert status == 403 and details == "extproc_tenant_required"
    assert body["error"]["message"].startswith("The token is valid but its 'org.id' claim does not name a tenant")


def test_required_tokens_never_fall_back_without_a_verified_payload(tmp_path: Path) -> None:
    # Envoy refuses these itself; should a request still arrive unverified, so does the processor.
    status, body, _, _ = immediate(_run(_runtime(tmp_path), None, [("x-tenant-id", b"forged")]))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def _jwt_shaped() -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":"k"}').rstrip(b"=").decode()
    return f"{header}.eyJzdWIiOiJ4In0.c2ln"


def test_optional_tokens_fall_back_unless_a_jwt_failed(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, required=False)
    failed = _payloads(**{"corp.failed": {"code": 16, "message": "Jwt is expired"}})
    assert metadata(_run(rt, None))["tenant"] == "anonymous"
    # An opaque API key is not a JWT: Envoy's failure does not matter, the header decides.
    opaque = [("authorization", b"Bearer sk-opaque-key"), ("x-tenant-id", b"team-h")]
    assert metadata(_run(rt, failed, opaque))["tenant"] == "team-h"
    jwt_headers = [("authorization", f"Bearer {_jwt_shaped()}".encode()), ("x-tenant-id", b"team-h")]
    status, body, _, _ = immediate(_run(rt, failed, jwt_headers))
    assert status == 401 and body["error"]["message"] == (
        "The gateway did not accept the request's bearer token: Jwt is expired.")
    status, body, _, _ = immediate(_run(rt, failed, [("x-api-key", _jwt_shaped().encode())],
                                        path="/anthropic/v1/messages"))
    assert status == 401 and body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(("value", "jwt"), [
    (_jwt_shaped(), True), ("sk-abc.def.ghi", False), ("a.b", False), ("sk-proj-123", False), ("e30.e30.", True),
])
def test_looks_like_jwt(value: str, jwt: bool) -> None:
    assert jwt_authn.looks_like_jwt(value) is jwt


def test_an_mcp_caller_is_refused_with_a_json_rpc_error(tmp_path: Path) -> None:
    data = _data(tmp_path, {"required": False}, tenancy={"header": "x-tenant-id"},
                 mcp={"servers": [{"name": "s", "url": "http://127.0.0.1:2/mcp"}],
                      "routes": [{"path": "/mcp", "servers": ["s"]}]})
    rt = Runtime.build(LoadedConfig(config=parse_config(data), source="test"))
    failed = _payloads(**{"corp.failed": {"code": 16, "message": "Jwt is expired"}})
    request = headers_request("POST", "/mcp", [("authorization", f"Bearer {_jwt_shaped()}".encode())])
    request.metadata_context.CopyFrom(failed)
    status, body, _, details = immediate(Exchange(rt).handle(request))
    assert status == 401 and details == "extproc_invalid_api_key"
    assert body == {"jsonrpc": "2.0", "id": None, "error": {
        "code": -32052, "message": "The gateway did not accept the request's bearer token: Jwt is expired."}}


def test_the_caller_says_how_the_gateway_knows(tmp_path: Path) -> None:
    from extproc.config import Tenancy, key_digest
    from extproc.tenancy import Caller, caller_of

    tenancy = Tenancy(header="x-tenant-id", default_tenant="anonymous")
    keys = {key_digest("sk-team"): Caller("team-k", "key")}
    verified = jwt_authn.read(_payloads(corp={"org": {"id": "acme"}}).filter_metadata[jwt_authn.NAMESPACE],
                              {"corp": ("org", "id")}, required=False)
    nothing = jwt_authn.read(None, {"corp": ("org", "id")}, required=False)
    headers = {"authorization": b"Bearer sk-team", "x-tenant-id": b"team-h"}
    assert caller_of(headers, tenancy, keys, token=verified) == Caller("acme", "jwt")
    assert caller_of(headers, tenancy, keys, token=nothing) == Caller("team-k", "key")
    assert caller_of({"x-tenant-id": b"team-h"}, tenancy, keys, token=nothing) == Caller("team-h", "header")
    assert caller_of({}, tenancy, keys, token=nothing) == Caller("anonymous", "default")
    assert caller_of({}, None, {}, token=nothing) is None  # no tenancy section and no token: no tenant


def test_grant_claims_limit_the_token(tmp_path: Path) -> None:
    """models_claim / tools_claim: the token's own grants (a list, or a scope-style string);
    a token without the claim keeps its tenant's grants; a malformed one grants nothing."""
    from extproc.tenancy import Caller, caller_of

    grants = {"corp": (("models",), ("ext", "tools"))}
    payload = {"sub": "acme", "models": ["gpt-4o*", "claude-*"], "ext": {"tools": "search__* files__read"}}
    verified = jwt_authn.read(_payloads(corp=payload).filter_metadata[jwt_authn.NAMESPACE],
                              {"corp": ("sub",)}, required=True, grants=grants)
    assert caller_of({}, None, {}, token=verified) == Caller(
        "acme", "jwt", ("gpt-4o*", "claude-*"), ("search__*", "files__read"))
    bare = jwt_authn.read(_payloads(corp={"sub": "acme"}).filter_metadata[jwt_authn.NAMESPACE],
                          {"corp": ("sub",)}, required=True, grants=grants)
    assert caller_of({}, None, {}, token=bare) == Caller("acme", "jwt")
    odd = jwt_authn.read(_payloads(corp={"sub": "acme", "models": 5, "ext": {"tools": {"a": 1}}}).filter_metadata[
        jwt_authn.NAMESPACE], {"corp": ("sub",)}, required=True, grants=grants)
    assert caller_of({}, None, {}, token=odd) == Caller("acme", "jwt", (), ())
    ungranted = jwt_authn.read(_payloads(corp=payload).filter_metadata[jwt_authn.NAMESPACE],
                               {"corp": ("sub",)}, required=True)
    assert caller_of({}, None, {}, token=ungranted) == Caller("acme", "jwt")
