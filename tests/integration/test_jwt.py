"""JWTs checked by Envoy's jwt_authn filter, the tenant read from the verified payload.

Keys (RSA and EC) are generated here and tokens signed here with PyJWT. One provider
reads its JWKS from a file, another fetches it from a small HTTP server this module runs
(and rotates). Clients are the official openai, anthropic and mcp SDKs; what they see is
asserted: the answer, 401s in their own API's error shape, the tenant in the access log,
in the span and in a budget, and a token that never reaches a backend or a log.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jwt
import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, eventually, free_port, running_gateway
from tests.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.timeout(120)

ISSUER = "https://idp.test"
AUDIENCE = "ai-gateway"
REMOTE_ISSUER = "https://remote-idp.test"
DOWN_ISSUER = "https://down-idp.test"
USER = [{"role": "user", "content": "Tell me a story"}]
BUDGET = 100  # tokens per tenant per hour
ANTHROPIC_KEY = "sk-ant-gateway-jwt-77aa"  # the gateway's own credential for the Anthropic backend
ACCEPT = "application/json, text/event-stream"


# -- keys, JWKS and tokens ------------------------------------------------------------------


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        data["alg"] = "RS256"
    else:
        data = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        data["alg"] = "ES256"
    return {**data, "kid": kid, "use": "sig"}


RSA_KEY, EC_KEY, OTHER_KEY = _rsa(), ec.generate_private_key(ec.SECP256R1()), _rsa()


def token(
    tenant: str | None = "acme",
    *,
    key: Any = RSA_KEY,
    kid: str = "rsa-1",
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    expires_in: int | None = 600,
    **claims: Any,
) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": "user-1", "iat": now, **claims}
    if expires_in is not None:
        payload["exp"] = now + expires_in
    if tenant is not None:
        payload["org"] = {"id": tenant}  # the file provider's tenant claim is nested: org.id
    algorithm = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()


def unsigned_token(signature: str = "", tenant: str = "acme") -> str:
    """`alg: none`: a token anyone can write (no signature, or any). Refused like a forgery."""
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "exp": now + 600, "org": {"id": tenant}}
    return f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': 'rsa-1'})}.{_b64(payload)}.{signature}"


class JwksServer:
    """A local identity provider's JWKS endpoint; `keys` may be replaced (rotation)."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                server.fetches += 1
                body = orjson.dumps({"keys": server.keys})
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.http = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


# -- the gateway ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    remote_key = _rsa()
    server = JwksServer([_jwk(remote_key, "remote-1")])
    server.signing_key = remote_key  # type: ignore[attr-defined]
    yield server
    server.close()


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[Any]:
    pytest.importorskip("mcp.server.mcpserver", reason="needs the official MCP SDK 2.x")
    from tests.integration.test_mcp_gateway import ServerThread, build_a

    with ServerThread(build_a(), json_response=True) as server:
        yield server


def _config(sim: SimServer, jwks_file: Path, jwks_server: JwksServer, mcp_url: str) -> dict[str, Any]:
    return {
        "backends": [
            {"name": "sim", "base_url": sim.base_url},
            {"name": "claude", "schema": "anthropic", "base_url": sim.url, "api_key": {"env": "T_JWT_ANTHROPIC_KEY"}},
        ],
        "routes": [
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
            {"name": "all", "default": True, "backends": [{"name": "sim"}]},
        ],
        "auth": {"jwt": {"providers": [
            {"name": "corp", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks_file),
             "tenant_claim": "org.id"},
            {"name": "remote", "issuer": REMOTE_ISSUER, "audiences": [AUDIENCE], "jwks_uri": jwks_server.url,
             "cache_seconds": 1, "tenant_claim": "sub"},
            # An identity provider whose JWKS host is down.
            {"name": "down", "issuer": DOWN_ISSUER, "jwks_uri": f"http://127.0.0.1:{free_port()}/jwks"},
        ]}},
        # A tenant header too: a verified token outranks it, so a client cannot pick its tenant.
        "tenancy": {"header": "x-tenant-id"},
        "budgets": [{"name": "hourly", "unit": "hour", "limit": BUDGET}],
        # The authenticated tenant as a metric attribute, over the header mapped to the same name.
        "telemetry": {"tenant_attribute": "tenant", "metric_header_attributes": {"x-tenant-id": "tenant"}},
        "mcp": {"port": free_port(), "servers": [{"name": "a", "url": mcp_url}],
                "routes": [{"path": "/mcp", "servers": ["a"]}]},
    }


@pytest.fixture(scope="module")
def gateway(
    sim_a: SimServer, receiver: OtlpReceiver, jwks_server: JwksServer, mcp_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("jwt")
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [_jwk(RSA_KEY, "rsa-1"), _jwk(EC_KEY, "ec-1")]}))
    env = receiver.exporter_env(T_JWT_ANTHROPIC_KEY=ANTHROPIC_KEY)
    with running_gateway(_config(sim_a, jwks_file, jwks_server, mcp_server.url), tmp, env=env) as gw:
        yield gw


def _client(gateway: RunningGateway, bearer: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=bearer, max_retries=0, timeout=30,
                         default_headers=headers or None)


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _assert_never_seen(gateway: RunningGateway, sim: SimServer, secret: str) -> None:
    """The token reached no backend request, no access-log line, no processor log line."""
    for request in sim.requests:
        assert all(secret not in value for value in request.headers.values())
    assert all(secret not in line for line in gateway.stdout_lines + gateway.stderr_lines)


# -- valid tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "kid"), [(RSA_KEY, "rsa-1"), (EC_KEY, "ec-1")], ids=["RS256", "ES256"])
def test_a_valid_token_names_the_tenant(
    gateway: RunningGateway, sim_a: SimServer, receiver: OtlpReceiver, key: Any, kid: str
) -> None:
    tenant = _tenant()
    bearer = token(tenant, key=key, kid=kid)
    # The client also claims another tenant by header: the verified claim wins.
    completion = _client(gateway, bearer, **{"x-tenant-id": "someone-else"}).chat.completions.create(
        model="m", messages=USER, max_tokens=5, extra_headers={"x-request-id": f"req-{tenant}"})

    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.total_tokens > 0
    upstream = sim_a.requests[-1].headers
    assert "authorization" not in upstream or bearer not in upstream["authorization"]
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == f"req-{tenant}")
    assert entry["status"] == 200 and entry["tenant"] == tenant
    assert entry["total_tokens"] == completion.usage.total_tokens
    span = receiver.wait_for_span(lambda s: s.attributes.get("tenant.id") == tenant)
    assert span.attributes["llm.token_count.total"] == completion.usage.total_tokens
    assert json.loads(span.attributes["metadata"])["tenant"] == tenant
    metrics = httpx.get(f"http://127.0.0.1:{gateway.processor_admin_port}/metrics", timeout=10).text
    assert f'tenant="{tenant}"' in metrics and 'tenant="someone-else"' not in metrics
    gateway.wait_quiet()
    _assert_never_seen(gateway, sim_a, bearer)


def test_the_anthropic_sdk_with_a_token(gateway: RunningGateway, sim_a: SimServer) -> None:
    tenant = _tenant()
    bearer = token(tenant)
    for client in (
        anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", auth_token=bearer, max_retries=0),  # Bearer
        anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=bearer, max_retries=0),  # x-api-key
    ):
        message = client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[
            {"role": "user", "content": "Hi"}])
        assert message.content[0].type == "text" and message.usage.output_tokens > 0
        upstream = sim_a.requests[-1].headers
        assert upstream["x-api-key"] == ANTHROPIC_KEY  # the gateway's credential, not the client's token
        assert "authorization" not in upstream
    entry = gateway.wait_access_log(lambda e: e.get("tenant") == tenant and e.get("backend_name") == "claude")
    assert entry["status"] == 200
    gateway.wait_quiet()
    _assert_never_seen(gateway, sim_a, bearer)


# -- refused tokens ----------------------------------------------------------------------------

REFUSED: dict[str, tuple[Callable[[], str], str]] = {
    "expired": (lambda: token(expires_in=-600), "Jwt is expired"),
    "no expiry": (lambda: token(expires_in=None), "Jwt verification fails"),  # require_expiration
    "wrong audience": (lambda: token(audience="another-service"), "Audiences in Jwt are not allowed"),
    "wrong issuer": (lambda: token(issuer="https://evil.test"), "Jwt issuer is not configured"),
    "bad signature": (lambda: token(key=OTHER_KEY), "Jwt verification fails"),
    "alg none": (unsigned_token, "Jwt is not in the form of Header.Payload.Signature"),
    "alg none with a signature": (lambda: unsigned_token("c2lnbmVk"), "Jwt header [alg] is not supported"),
    "unknown kid": (lambda: token(key=OTHER_KEY, kid="rsa-9"), "Jwks doesn't have key to match kid or alg from Jwt"),
    "not a jwt": (lambda: "sk-plain-api-key", "Jwt is not in the form of Header.Payload.Signature"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_token_gets_401_in_openai_shape(gateway: RunningGateway, sim_a: SimServer, case: str) -> None:
    make, reason = REFUSED[case]
    bearer = make()
    before = len(sim_a.requests)
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(gateway, bearer).chat.completions.create(model="m", messages=USER, max_tokens=5)

    assert refused.value.status_code == 401
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"The gateway did not accept the request's bearer token: {reason}")
    assert refused.value.response.headers["www-authenticate"].startswith("Bearer")
    assert len(sim_a.requests) == before  # nothing went upstream
    gateway.wait_quiet()
    _assert_never_seen(gateway, sim_a, bearer)


def test_no_token_gets_401(gateway: RunningGateway) -> None:
    response = httpx.post(f"{gateway.base_url}/chat/completions", json={"model": "m", "messages": USER},
                          headers={"x-tenant-id": "forged"}, timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["message"].startswith(
        "The gateway did not accept the request's bearer token: Jwt is missing")
    entry = gateway.wait_access_log(lambda e: e["status"] == 401 and e["path"] == "/v1/chat/completions"
                                    and e["response_code_details"].startswith("jwt_authn_access_denied"))
    assert entry["tenant"] is None and entry["upstream_cluster"] is None


def test_a_bad_token_gets_401_in_anthropic_shape(gateway: RunningGateway) -> None:
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", auth_token=token(expires_in=-600), max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.status_code == 401
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert "Jwt is expired" in body["error"]["message"]


# -- remote JWKS and rotation --------------------------------------------------------------------


def _accepted(gateway: RunningGateway, bearer: str) -> bool:
    try:
        _client(gateway, bearer).chat.completions.create(model="m", messages=USER, max_tokens=2)
    except openai.AuthenticationError:
        return False
    except openai.RateLimitError:  # the token passed; its tenant's budget is spent (polling charges it)
        return True
    return True


def test_remote_jwks_key_rotation_is_picked_up(gateway: RunningGateway, jwks_server: JwksServer) -> None:
    old_key = jwks_server.signing_key  # type: ignore[attr-defined]
    old_team, new_team = _tenant(), _tenant()
    old = token(None, key=old_key, kid="remote-1", issuer=REMOTE_ISSUER, sub=old_team)
    assert _accepted(gateway, old)
    entry = gateway.wait_access_log(lambda e: e.get("tenant") == old_team)  # the remote provider's claim: sub
    assert entry["status"] == 200

    new_key = _rsa()
    new = token(None, key=new_key, kid="remote-2", issuer=REMOTE_ISSUER, sub=new_team)
    assert not _accepted(gateway, new)  # not published yet
    fetches = jwks_server.fetches
    jwks_server.keys = [_jwk(new_key, "remote-2")]  # the provider rotates: the old key is withdrawn
    assert eventually(lambda: _accepted(gateway, new), timeout=20, interval=0.2), "the rotated key was never picked up"
    assert jwks_server.fetches > fetches
    assert eventually(lambda: not _accepted(gateway, old), timeout=20, interval=0.2), "the withdrawn key is still accepted"


def test_an_unreachable_jwks_is_a_retryable_503(gateway: RunningGateway) -> None:
    bearer = token(issuer=DOWN_ISSUER)
    with pytest.raises(openai.InternalServerError) as failed:
        _client(gateway, bearer).chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert failed.value.status_code == 503
    error = failed.value.body
    assert isinstance(error, dict) and error["code"] == "identity_provider_unavailable"
    assert error["message"].startswith("The gateway could not check the request's bearer token")
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=bearer, max_retries=0)
    with pytest.raises(anthropic.InternalServerError) as failed_anthropic:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert failed_anthropic.value.status_code == 503
    body = failed_anthropic.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "api_error"


# -- budgets ---------------------------------------------------------------------------------------


def test_the_claims_tenant_is_charged_in_its_budget(gateway: RunningGateway) -> None:
    spender, other = _tenant(), _tenant()
    client = _client(gateway, token(spender))
    spent = client.chat.completions.create(model="m", messages=USER, max_tokens=BUDGET)
    assert spent.usage is not None and spent.usage.total_tokens > BUDGET

    def refused() -> bool:
        try:
            client.chat.completions.create(model="m", messages=USER, max_tokens=1)
        except openai.RateLimitError:
            return True
        return False

    assert eventually(refused, timeout=20, interval=0.2)
    # Another tenant's token is served; naming the spent tenant in a header changes nothing.
    fresh = _client(gateway, token(other), **{"x-tenant-id": spender})
    assert fresh.chat.completions.create(model="m", messages=USER, max_tokens=3).choices


# -- MCP -----------------------------------------------------------------------------------------


def _mcp_initialize(gateway: RunningGateway, headers: dict[str, str]) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    return httpx.post(f"{gateway.url}/mcp", content=orjson.dumps(body), timeout=30, headers={
        "content-type": "application/json", "accept": ACCEPT, "mcp-protocol-version": "2025-06-18", **headers})


async def test_mcp_with_a_token(gateway: RunningGateway, mcp_server: Any) -> None:
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    tenant = _tenant()
    bearer = token(tenant)
    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {bearer}"}, timeout=httpx2.Timeout(30, read=60))
    async with http, streamable_http_client(f"{gateway.url}/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        assert "a__add" in {tool.name for tool in (await session.list_tools()).tools}
        result = await session.call_tool("a__add", {"a": 2, "b": 3})
        assert result.is_error is False and "5" in str(result.content[0])
    entry = gateway.wait_access_log(lambda e: e.get("mcp_tool_name") == "a__add" and e.get("tenant") == tenant)
    assert entry["status"] == 200
    assert all("authorization" not in seen.headers for seen in mcp_server.recorder.seen)  # the token stopped at Envoy

    refused = _mcp_initialize(gateway, {"authorization": f"Bearer {token(tenant, expires_in=-600)}"})
    assert refused.status_code == 401
    error = refused.json()
    assert error["jsonrpc"] == "2.0" and error["id"] is None and error["error"]["code"] == -32052
    assert "Jwt is expired" in error["error"]["message"]


# -- required: false: a token when there is one, the other tenant sources otherwise ---------------

TEAM_KEY = "sk-team-key-3c4d"  # an opaque client API key (tenancy.api_keys), sent as a bearer too


@pytest.fixture(scope="module")
def optional_gateway(sim_a: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("jwt-optional")
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [_jwk(EC_KEY, "ec-1")]}))
    config = {
        "backends": [
            {"name": "sim", "base_url": sim_a.base_url},
            {"name": "claude", "schema": "anthropic", "base_url": sim_a.url, "api_key": {"env": "T_JWT_ANTHROPIC_KEY"}},
        ],
        "routes": [
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
            {"name": "all", "default": True, "backends": [{"name": "sim"}]},
        ],
        "auth": {"jwt": {"required": False, "providers": [
            {"name": "corp", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks_file),
             "tenant_claim": "org.id"}]}},
        "tenancy": {"header": "x-tenant-id", "api_keys": [{"key": {"env": "T_JWT_TEAM_KEY"}, "tenant": "keyed-team"}],
                    "default_tenant": "anonymous"},
    }
    env = {"T_JWT_ANTHROPIC_KEY": ANTHROPIC_KEY, "T_JWT_TEAM_KEY": TEAM_KEY}
    with running_gateway(config, tmp, env=env) as gw:
        yield gw


def _tenant_of_request(gateway: RunningGateway, bearer: str | None, **headers: str) -> str:
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    headers["x-request-id"] = request_id
    if bearer is None:  # the openai SDK always sends a credential
        response = httpx.post(f"{gateway.base_url}/chat/completions", json={"model": "m", "messages": USER},
                              headers=headers, timeout=30)
        assert response.status_code == 200, response.text
    else:
        _client(gateway, bearer, **headers).chat.completions.create(model="m", messages=USER, max_tokens=2)
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == request_id)
    assert entry["status"] == 200
    return str(entry["tenant"])


def test_optional_tokens_rank_above_keys_headers_and_the_default(
    optional_gateway: RunningGateway, sim_a: SimServer
) -> None:
    tenant = _tenant()
    bearer = token(tenant, key=EC_KEY, kid="ec-1")
    assert _tenant_of_request(optional_gateway, bearer, **{"x-tenant-id": "claimed"}) == tenant
    assert _tenant_of_request(optional_gateway, TEAM_KEY, **{"x-tenant-id": "claimed"}) == "keyed-team"
    assert _tenant_of_request(optional_gateway, "sk-unknown-key", **{"x-tenant-id": "claimed"}) == "claimed"
    assert _tenant_of_request(optional_gateway, None) == "anonymous"
    optional_gateway.wait_quiet()
    for secret in (bearer, TEAM_KEY):
        _assert_never_seen(optional_gateway, sim_a, secret)


OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())
OPTIONAL_REFUSED: dict[str, tuple[Callable[[], str], str]] = {
    "expired": (lambda: token(key=EC_KEY, kid="ec-1", expires_in=-600), "Jwt is expired"),
    "wrong audience": (lambda: token(key=EC_KEY, kid="ec-1", audience="other"), "Audiences in Jwt are not allowed"),
    "bad signature": (lambda: token(key=OTHER_EC_KEY, kid="ec-1"), "Jwt verification fails"),
    "alg none with a signature": REFUSED["alg none with a signature"],
}


@pytest.mark.parametrize("case", list(OPTIONAL_REFUSED))
def test_optional_tokens_that_fail_are_still_refused(
    optional_gateway: RunningGateway, sim_a: SimServer, case: str
) -> None:
    make, reason = OPTIONAL_REFUSED[case]
    before = len(sim_a.requests)
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(optional_gateway, make(), **{"x-tenant-id": "claimed"}).chat.completions.create(
            model="m", messages=USER, max_tokens=2)
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_api_key"
    assert error["message"].startswith(f"The gateway did not accept the request's bearer token: {reason}")
    assert len(sim_a.requests) == before

    client = anthropic.Anthropic(base_url=f"{optional_gateway.url}/anthropic", api_key=make(), max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused_anthropic:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    body = refused_anthropic.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "authentication_error"
    assert reason in body["error"]["message"]


def test_every_path_needs_the_token_the_model_list_too(gateway: RunningGateway) -> None:
    assert httpx.get(f"{gateway.base_url}/models", timeout=10).status_code == 401
    listed = httpx.get(f"{gateway.base_url}/models", headers={"authorization": f"Bearer {token()}"}, timeout=10)
    assert listed.status_code == 200 and listed.json()["object"] == "list"


# -- authorization by the token's tenant -----------------------------------------------------------


@pytest.fixture(scope="module")
def authorized_gateway(sim_a: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """auth.jwt alone names tenants (no tenancy section); the authorization policy applies to
    them, and a token's own `models` claim narrows its tenant's grants."""
    tmp = tmp_path_factory.mktemp("jwt-authz")
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [_jwk(RSA_KEY, "rsa-1")]}))
    config = {
        "backends": [{"name": "sim", "base_url": sim_a.base_url}],
        "routes": [{"name": "listed", "match": {"model": ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5"]},
                    "backends": [{"name": "sim"}]}],
        "auth": {"jwt": {"providers": [
            {"name": "corp", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks_file),
             "tenant_claim": "org.id", "models_claim": "models"}]}},
        "authorization": {"tenants": {"acme": {"models": ["gpt-*"]}, "*": {"models": ["gpt-4o-mini"]}}},
    }
    with running_gateway(config, tmp) as gw:
        yield gw


def test_a_tokens_tenant_is_authorized_by_the_policy(authorized_gateway: RunningGateway, sim_a: SimServer) -> None:
    def refused(bearer: str, model: str) -> dict[str, Any]:
        request_id = f"req-{uuid.uuid4().hex[:12]}"
        before = len(sim_a.requests)
        with pytest.raises(openai.PermissionDeniedError) as denied:
            _client(authorized_gateway, bearer).chat.completions.create(
                model=model, messages=USER, max_tokens=2, extra_headers={"x-request-id": request_id})
        assert denied.value.status_code == 403
        assert denied.value.body == {"message": f"You are not allowed to use the model `{model}`.",
                                     "type": "permission_error", "param": "model", "code": "model_not_allowed"}
        assert len(sim_a.requests) == before  # nothing upstream
        return authorized_gateway.wait_access_log(lambda e: e.get("request_id") == request_id)

    other = token(_tenant())  # a tenant the policy only grants gpt-4o-mini
    logged = refused(other, "gpt-4o")
    assert logged["status"] == 403 and logged["upstream_host"] is None and logged["tenant"] != "acme"
    done = _client(authorized_gateway, other).chat.completions.create(model="gpt-4o-mini", messages=USER,
                                                                      max_tokens=2)
    assert done.choices[0].message.content

    acme = token("acme")  # acme may use gpt-*, and nothing else
    assert _client(authorized_gateway, acme).chat.completions.create(
        model="gpt-4o", messages=USER, max_tokens=2).choices[0].message.content
    assert refused(acme, "claude-sonnet-4-5")["tenant"] == "acme"
    # The token's own models claim narrows acme's grants: gpt-4o-mini only.
    narrow = token("acme", models=["gpt-4o-mini"])
    assert refused(narrow, "gpt-4o")["tenant"] == "acme"
    listed = httpx.get(f"{authorized_gateway.base_url}/models", headers={"authorization": f"Bearer {narrow}"},
                       timeout=10)
    assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == ["gpt-4o-mini"]
    authorized_gateway.wait_quiet()
    for secret in (other, acme, narrow):
        _assert_never_seen(authorized_gateway, sim_a, secret)
