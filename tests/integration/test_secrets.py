"""Provider credentials never leave the gateway except towards their own provider.

One gateway (real Envoy + processor, both logging at DEBUG) with an OpenAI, an
Anthropic, an Azure OpenAI and a Bedrock backend, tracing with content recording to an
OTLP receiver and a tenancy API key, is driven through every path: JSON and streamed
chat per provider, provider errors, a prompt that contains key-like text, the gateway's
own errors, and clients that send their own credentials in every credential header.
Then everything the gateway emitted (stdout, stderr, spans, OTLP metrics, /metrics,
responses) is searched for each provider secret and each client credential. The
simulator's recordings prove each provider secret was in play; the redacted header
lines in both debug logs prove the client credentials were.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from extproc.sim import SimServer
from extproc.sim.bedrock_api import (
    SIM_AWS_ACCESS_KEY_ID,
    SIM_AWS_SECRET_ACCESS_KEY,
    SIM_AWS_SESSION_ACCESS_KEY_ID,
    SIM_AWS_SESSION_SECRET_ACCESS_KEY,
    SIM_AWS_SESSION_TOKEN,
)
from tests.integration.harness import RunningGateway, running_gateway
from tests.otlp_receiver import OtlpReceiver

OPENAI_KEY = "sk-proj-secret-openai-K1-4b7e2c9d"
ANTHROPIC_KEY = "sk-ant-api03-secret-K2-8f1a6e3b"
AZURE_KEY = "azure0secret0K3f0c5d2a9e7b41"
# Credentials sent to the provider as a header value (Envoy sees them after the processor adds them).
HEADER_SECRETS = {
    "openai": OPENAI_KEY,
    "anthropic": ANTHROPIC_KEY,
    "azure": AZURE_KEY,
    "aws-session-token": SIM_AWS_SESSION_TOKEN,  # x-amz-security-token; botocore logs it in CanonicalRequest
}
# Credentials that only ever sign (never sent).
SIGNING_SECRETS = {
    "aws-secret": SIM_AWS_SECRET_ACCESS_KEY,
    "aws-session-secret": SIM_AWS_SESSION_SECRET_ACCESS_KEY,
}
PROVIDER_SECRETS = {**HEADER_SECRETS, **SIGNING_SECRETS}
TENANT_KEY = "sk-tenant-key-team-blue-5e6f7a8b"  # a client key the gateway knows (tenancy)
CLIENT_KEY = "sk-client-own-key-0a1b2c3d4e"  # a client key the gateway does not know
CLIENT_X_API_KEY = "client-x-api-key-9z8y7x6w"
# Every request carries a client credential in each header redact.py treats as one; the
# gateway knows none of these values, so only the header name can get them redacted.
CLIENT_HEADER_SECRETS = {
    "x-api-key": CLIENT_X_API_KEY,
    "api-key": "client-api-key-header-7q6r5s4t",
    "proxy-authorization": "client-proxy-credential-3u2v1w0x",
    "cookie": "client-cookie-session-5k4l3m2n",
    "set-cookie": "client-set-cookie-8h7i6j5k",
    "x-amz-security-token": "client-amz-security-token-1f2e3d4c",
    "x-client-secret": "client-secret-header-6b5a4z3y",
}
CLIENT_HEADER_VALUES = {
    **CLIENT_HEADER_SECRETS,
    "proxy-authorization": f"Basic {CLIENT_HEADER_SECRETS['proxy-authorization']}",
    "cookie": f"session={CLIENT_HEADER_SECRETS['cookie']}; theme=dark",
    "set-cookie": f"id={CLIENT_HEADER_SECRETS['set-cookie']}; Path=/; HttpOnly",
}
CLIENT_SECRETS = {"client": CLIENT_KEY, "tenant": TENANT_KEY, **CLIENT_HEADER_SECRETS}
# How a redacted credential header reads: the authorization scheme is kept.
REDACTED_VALUES = {"authorization": "Bearer <redacted>", "proxy-authorization": "Basic <redacted>"}
LOOKALIKE = "sk-proj-LOOKSLIKEAKEY0123456789abcdefABCDEF"  # key-like text in a prompt
BODY_LIMIT = 32 * 1024

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4", "azure": "azure-gpt",
          "bedrock": "anthropic.claude-3-haiku-20240307-v1:0", "bedrock-session": "amazon.nova-lite-v1:0"}
USER = [{"role": "user", "content": "Tell me about the sea"}]


@dataclass
class Exchange:
    """One client request and what the client got back."""

    label: str
    status: int
    headers: list[tuple[str, str]]
    body: str
    trace_id: str


@dataclass
class Observed:
    """Everything the gateway emitted while the traffic ran."""

    gateway: RunningGateway
    sim: SimServer
    receiver: OtlpReceiver
    exchanges: list[Exchange] = field(default_factory=list)
    routed: set[str] = field(default_factory=set)  # trace ids of requests that reached a provider
    metrics_text: str = ""
    config_dump: str = ""


def _variants(secret: str) -> set[str]:
    """The secret as it could appear in text: raw, percent-encoded, JSON-escaped."""
    return {secret, quote(secret, safe=""), orjson.dumps(secret).decode()[1:-1]}


def _leaks(text: str, candidates: dict[str, str]) -> list[str]:
    return sorted(name for name, secret in candidates.items() if any(v in text for v in _variants(secret)))


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


def _config(sim: SimServer) -> dict[str, Any]:
    return {
        "backends": [
            {"name": "openai", "schema": "openai", "base_url": sim.base_url, "api_key": {"env": "T_K1"}},
            {"name": "anthropic", "schema": "anthropic", "base_url": sim.url, "api_key": {"env": "T_K2"}},
            {"name": "azure", "schema": "azure_openai", "base_url": sim.url, "api_key": {"env": "T_K3"},
             "api_version": "2024-10-21"},
            {"name": "bedrock", "schema": "aws_bedrock", "base_url": sim.url,
             "aws": {"region": "us-east-1", "access_key_id": {"env": "T_AWS_AK"},
                     "secret_access_key": {"env": "T_AWS_SK"}}},
            {"name": "bedrock-session", "schema": "aws_bedrock", "base_url": sim.url,
             "aws": {"region": "us-east-1", "access_key_id": {"env": "T_AWS_SESSION_AK"},
                     "secret_access_key": {"env": "T_AWS_SESSION_SK"}, "session_token": {"env": "T_AWS_TOKEN"}}},
        ],
        "routes": [
            {"name": "openai", "match": {"glob": "gpt-*"}, "backends": [{"name": "openai"}]},
            {"name": "anthropic", "match": {"glob": "claude-*"}, "backends": [{"name": "anthropic"}]},
            {"name": "azure", "match": {"model": "azure-gpt"}, "backends": [{"name": "azure"}]},
            {"name": "bedrock", "match": {"prefix": "anthropic."}, "backends": [{"name": "bedrock"}]},
            {"name": "bedrock-session", "match": {"prefix": "amazon."}, "backends": [{"name": "bedrock-session"}]},
        ],
        "limits": {"max_request_body_bytes": BODY_LIMIT},
        "tenancy": {"api_keys": [{"key": {"env": "T_TENANT"}, "tenant": "team-blue"}], "default_tenant": "anyone"},
        "telemetry": {"user_id_header": "x-user-id"},
    }


def _env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "T_K1": OPENAI_KEY, "T_K2": ANTHROPIC_KEY, "T_K3": AZURE_KEY,
        "T_AWS_AK": SIM_AWS_ACCESS_KEY_ID, "T_AWS_SK": SIM_AWS_SECRET_ACCESS_KEY, "T_TENANT": TENANT_KEY,
        "T_AWS_SESSION_AK": SIM_AWS_SESSION_ACCESS_KEY_ID, "T_AWS_SESSION_SK": SIM_AWS_SESSION_SECRET_ACCESS_KEY,
        "T_AWS_TOKEN": SIM_AWS_SESSION_TOKEN,
        "EXTPROC_LOG_LEVEL": "DEBUG",  # the processor's --log-level, inherited from `extproc run`
        **receiver.exporter_env(metric_interval_ms=500),
        "OTEL_SERVICE_NAME": "secrets-under-test",
        # Content recording on (the default, made explicit).
        "OPENINFERENCE_HIDE_INPUTS": "false", "OPENINFERENCE_HIDE_OUTPUTS": "false",
        "OPENINFERENCE_HIDE_INPUT_MESSAGES": "false", "OPENINFERENCE_HIDE_OUTPUT_MESSAGES": "false",
    }


def _client_headers(trace_id: str, *, tenant: bool = False, **extra: str) -> dict[str, str]:
    headers = {
        "authorization": f"Bearer {TENANT_KEY if tenant else CLIENT_KEY}",
        **CLIENT_HEADER_VALUES,
        "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
        "x-user-id": "user-7",
    }
    headers.update(extra)
    return headers


def _send(http: httpx.Client, gateway: RunningGateway, label: str, path: str, *, body: Any = None,
          content: bytes | None = None, tenant: bool = False, **extra: str) -> Exchange:
    trace_id = secrets.token_hex(16)
    headers = _client_headers(trace_id, tenant=tenant, **extra)
    payload = content if content is not None else orjson.dumps(body)
    headers["content-type"] = "application/json"
    with http.stream("POST", f"{gateway.url}{path}", content=payload, headers=headers) as response:
        text = b"".join(response.iter_raw()).decode("utf-8", "replace")
        exchange = Exchange(label, response.status_code, list(response.headers.multi_items()), text, trace_id)
    return exchange


def _chat(model: str, *, stream: bool = False, content: str = "Tell me about the sea") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 12}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _drive(http: httpx.Client, observed: Observed) -> None:
    gateway, sim, out = observed.gateway, observed.sim, observed.exchanges
    received: dict[str, dict[str, str]] = {}
    for provider, model in MODELS.items():
        sim.clear()
        out.append(_send(http, gateway, f"{provider} json", "/v1/chat/completions", body=_chat(model)))
        assert out[-1].status == 200, out[-1]
        received[provider] = sim.requests[-1].headers
        out.append(_send(http, gateway, f"{provider} stream", "/v1/chat/completions", body=_chat(model, stream=True),
                         tenant=True))
        assert out[-1].status == 200 and "[DONE]" in out[-1].body, out[-1]
        for status in ("401", "429", "500"):
            for stream in (False, True):
                out.append(_send(http, gateway, f"{provider} error {status} stream={stream}", "/v1/chat/completions",
                                 body=_chat(model, stream=stream), **{"x-sim-error": status}))
                assert out[-1].status == int(status), out[-1]
        # A prompt holding key-like text: the simulator echoes it, spans record it.
        lookalike = f"my key is {LOOKALIKE}, also Bearer sk-ant-api03-FAKEFAKEFAKE and AKIAIOSFODNN7EXAMPLE"
        out.append(_send(http, gateway, f"{provider} lookalike", "/v1/chat/completions",
                         body=_chat(model, content=lookalike), tenant=True))
        assert out[-1].status == 200, out[-1]

    # The Anthropic API natively, JSON and streamed.
    native = {"model": "claude-haiku", "max_tokens": 10, "messages": USER}
    observed.routed = {e.trace_id for e in out}
    out.append(_send(http, gateway, "native anthropic json", "/anthropic/v1/messages", body=native))
    assert out[-1].status == 200, out[-1]
    out.append(_send(http, gateway, "native anthropic stream", "/anthropic/v1/messages", body={**native, "stream": True}))
    assert out[-1].status == 200, out[-1]
    out.append(_send(http, gateway, "native anthropic 401", "/anthropic/v1/messages", body=native,
                     **{"x-sim-error": "401"}))
    assert out[-1].status == 401, out[-1]

    # The gateway's own errors.
    made = [
        _send(http, gateway, "400 not json", "/v1/chat/completions", content=b"{not json"),
        _send(http, gateway, "400 no model", "/v1/chat/completions", body={"messages": USER}),
        _send(http, gateway, "404 model", "/v1/chat/completions", body=_chat("no-such-model")),
        _send(http, gateway, "404 path", "/v1/fine_tuning/jobs", body={"model": "gpt-4o-mini"}),
        _send(http, gateway, "413", "/v1/chat/completions", body=_chat("gpt-4o-mini", content="x" * (BODY_LIMIT + 1))),
    ]
    assert [e.status for e in made] == [400, 400, 404, 404, 413], made
    out.extend(made)
    models = http.get(f"{gateway.url}/v1/models", headers=_client_headers(secrets.token_hex(16)))
    out.append(Exchange("models", models.status_code, list(models.headers.multi_items()), models.text, ""))

    # Each provider got its own credential, and only it; never a client's key.
    assert received["openai"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert received["anthropic"]["x-api-key"] == ANTHROPIC_KEY
    assert received["azure"]["api-key"] == AZURE_KEY
    assert received["bedrock"]["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={SIM_AWS_ACCESS_KEY_ID}/")
    session = received["bedrock-session"]
    assert session["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={SIM_AWS_SESSION_ACCESS_KEY_ID}/")
    assert session["x-amz-security-token"] == SIM_AWS_SESSION_TOKEN
    for provider, headers in received.items():
        sent = orjson.dumps(headers).decode()
        assert CLIENT_KEY not in sent and CLIENT_X_API_KEY not in sent and TENANT_KEY not in sent, provider
        assert CLIENT_HEADER_SECRETS["api-key"] not in sent, provider
        assert CLIENT_HEADER_SECRETS["proxy-authorization"] not in sent, provider
        own = {"bedrock-session": "aws-session-token"}.get(provider, provider)
        others = {k: v for k, v in PROVIDER_SECRETS.items() if k != own}
        assert _leaks(sent, others) == [], provider  # no provider gets another's key


@pytest.fixture(scope="module")
def observed(sim: SimServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    with running_gateway(_config(sim), tmp_path_factory.mktemp("secrets"), env=_env(receiver),
                         args=["--envoy-log-level", "debug"]) as gateway:
        observed = Observed(gateway, sim, receiver)
        with httpx.Client(timeout=30) as http:
            _drive(http, observed)
            # Every OpenAI-API request a provider saw ends in a span; wait for them (and for a metrics export).
            receiver.wait_for_spans(lambda spans: observed.routed <= {s.trace_id for s in spans}, timeout=20)
            receiver.wait_for_metrics(timeout=20)
            admin = f"http://127.0.0.1:{gateway.processor_admin_port}"
            observed.metrics_text = http.get(f"{admin}/metrics").text
            envoy_admin = f"http://127.0.0.1:{gateway.envoy_admin_port}"
            observed.config_dump = http.get(f"{envoy_admin}/config_dump", params={"include_eds": "true"}).text
        # Envoy flushes its access log about once a second: wait for every request's line.
        deadline = time.monotonic() + 15
        while len(gateway.access_log()) < len(observed.exchanges) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(gateway.access_log()) >= len(observed.exchanges)
        gateway.stop()  # shutdown logs are output too
    gateway.wait_quiet()
    yield observed


# -- the checks ----------------------------------------------------------------------------


def _processor_lines(gateway: RunningGateway) -> list[str]:
    return [line for line in gateway.stderr_lines if not line.startswith("[envoy]")]


def _envoy_lines(gateway: RunningGateway) -> list[str]:
    return [line for line in gateway.stderr_lines if line.startswith("[envoy]")]


def test_debug_logging_was_on(observed: Observed) -> None:
    """The checks below are only meaningful if both logs were at DEBUG."""
    assert any(" DEBUG " in line for line in _processor_lines(observed.gateway))
    assert any("[debug]" in line for line in _envoy_lines(observed.gateway))


def test_access_log_holds_no_secret(observed: Observed) -> None:
    stdout = "\n".join(observed.gateway.stdout_lines)
    assert observed.gateway.access_log(), "no access-log lines"
    assert _leaks(stdout, PROVIDER_SECRETS) == []


def test_processor_log_holds_no_secret(observed: Observed) -> None:
    lines = "\n".join(_processor_lines(observed.gateway))
    assert _leaks(lines, PROVIDER_SECRETS) == []


def test_debug_request_headers_are_logged_with_credentials_redacted(observed: Observed) -> None:
    lines = [line for line in _processor_lines(observed.gateway) if "request headers:" in line]
    assert lines, "the processor ran at DEBUG and logs request headers"
    assert any("'authorization': 'Bearer <redacted>'" in line for line in lines)
    assert _leaks("\n".join(lines), CLIENT_SECRETS) == []


def test_envoy_debug_log_holds_no_signing_secret(observed: Observed) -> None:
    assert _leaks("\n".join(_envoy_lines(observed.gateway)), SIGNING_SECRETS) == []


def test_envoy_debug_log_holds_no_header_credential(observed: Observed) -> None:
    """Envoy at debug level prints the headers the processor injects (ext_proc's mutation
    dump, the router's upstream headers); `extproc run` scrubs every line it forwards."""
    assert _leaks("\n".join(_envoy_lines(observed.gateway)), HEADER_SECRETS) == []


def test_spans_hold_no_secret(observed: Observed) -> None:
    spans = observed.receiver.spans()
    assert observed.routed <= {s.trace_id for s in spans}
    text = orjson.dumps([
        {"name": s.name, "status": s.status_message, "attributes": s.attributes, "resource": s.resource,
         "events": s.events, "scope": s.scope, "trace_state": s.trace_state}
        for s in spans
    ], default=str).decode()
    assert LOOKALIKE in text  # content recording was on: the prompt's text is there
    assert _leaks(text, PROVIDER_SECRETS) == []


def test_otlp_metrics_hold_no_secret(observed: Observed) -> None:
    points = observed.receiver.metric_points()
    assert points
    text = orjson.dumps([{"name": p.name, "attributes": p.attributes, "resource": p.resource} for p in points],
                        default=str).decode()
    exports = orjson.dumps(observed.receiver.requests).decode()
    assert _leaks(text + exports, PROVIDER_SECRETS) == []


def test_metrics_endpoint_holds_no_secret(observed: Observed) -> None:
    assert "gen_ai_client_token_usage" in observed.metrics_text
    assert _leaks(observed.metrics_text, PROVIDER_SECRETS) == []


def test_responses_hold_no_secret(observed: Observed) -> None:
    for exchange in observed.exchanges:
        text = exchange.body + "\n" + "\n".join(f"{k}: {v}" for k, v in exchange.headers)
        assert _leaks(text, PROVIDER_SECRETS) == [], exchange.label


def test_client_credentials_appear_in_no_output(observed: Observed) -> None:
    """The clients' own credentials, in every credential header, known to the gateway
    (tenant key) or not: in no log line (Envoy's debug log included), access-log line,
    response, span attribute or metric."""
    gateway = observed.gateway
    assert _leaks("\n".join(gateway.stdout_lines), CLIENT_SECRETS) == []
    assert _leaks("\n".join(_envoy_lines(gateway)), CLIENT_SECRETS) == []
    assert _leaks("\n".join(_processor_lines(gateway)), CLIENT_SECRETS) == []
    for exchange in observed.exchanges:
        text = exchange.body + "\n" + "\n".join(f"{k}: {v}" for k, v in exchange.headers)
        assert _leaks(text, CLIENT_SECRETS) == [], exchange.label
    attributes = orjson.dumps([s.attributes for s in observed.receiver.spans()], default=str).decode()
    assert _leaks(attributes, CLIENT_SECRETS) == []
    assert _leaks(observed.metrics_text, CLIENT_SECRETS) == []


@pytest.mark.parametrize("header", ["authorization", *CLIENT_HEADER_SECRETS])
def test_envoy_debug_log_shows_client_credential_headers_redacted(observed: Observed, header: str) -> None:
    """Envoy's debug log dumps the client's request headers one per line; the credential
    ones are forwarded with their value redacted (so the check above is not vacuous)."""
    expected = f"[envoy] '{header}', '{REDACTED_VALUES.get(header, '<redacted>')}'"
    assert expected in _envoy_lines(observed.gateway)


@pytest.mark.parametrize("header", ["authorization", *CLIENT_HEADER_SECRETS])
def test_processor_debug_log_shows_client_credential_headers_redacted(observed: Observed, header: str) -> None:
    lines = [line for line in _processor_lines(observed.gateway) if "request headers:" in line]
    expected = f"'{header}': '{REDACTED_VALUES.get(header, '<redacted>')}'"
    assert any(expected in line for line in lines)


def test_envoy_config_dump_holds_no_secret(observed: Observed) -> None:
    """Keys are injected per request by the processor, so Envoy's own config never holds one."""
    assert '"configs"' in observed.config_dump
    assert _leaks(observed.config_dump, {**PROVIDER_SECRETS, "tenant": TENANT_KEY}) == []
