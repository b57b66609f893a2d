"""Vertex AI (`gcp_vertex_ai`): the config, the simulator checked against the anthropic
SDK's AnthropicVertex client (the wire-format oracle), and the upstream stage's attempts
with real Google tokens from the simulator's token endpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google import genai
from google.auth.transport.requests import Request
from google.genai import types as genai_types
from google.oauth2 import service_account

from extproc.config import ConfigError, LoadedConfig, parse_config, resolve_secrets
from extproc.runtime import Runtime
from extproc.sim import text as simtext
from extproc.sim.google_auth import service_account_key
from extproc.sim.server import SimServer
from extproc.upstream import UpstreamExchange
from tests.unit.test_upstream import headers_message, mutation

PROJECT = "sim-project"
REGION = "us-east5"
MODEL = "claude-sonnet-4@20250514"
EMAIL = "gateway@sim-project.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me, briefly, why the sky is blue?"}]
PROMPT_TOKENS = 4 + 11  # message overhead + its text (the Anthropic simulator's rule)


def vertex_backend(**vertex: Any) -> dict[str, Any]:
    return {"name": "vx", "schema": "gcp_vertex_ai", "vertex": {"project": PROJECT, "region": REGION, **vertex}}


def config_of(*backends: dict[str, Any]) -> Any:
    return parse_config({"backends": list(backends),
                         "routes": [{"name": "r", "default": True, "backends": [{"name": backends[0]["name"]}]}]})


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("region", "url"), [
    ("us-east5", "https://us-east5-aiplatform.googleapis.com"),
    ("global", "https://aiplatform.googleapis.com"),
    ("eu", "https://aiplatform.eu.rep.googleapis.com"),
])
def test_the_base_url_follows_the_region(region: str, url: str) -> None:
    backend = config_of(vertex_backend(region=region)).backends[0]
    assert backend.base_url == url and backend.vertex.region == region


@pytest.mark.parametrize(("backend", "words"), [
    ({"name": "vx", "schema": "gcp_vertex_ai", "base_url": "http://127.0.0.1:1"},
     "needs 'vertex: {project: ..., region: ...}'"),
    ({**vertex_backend(), "api_key": {"env": "K"}}, "not 'api_key'"),
    ({"name": "oa", "base_url": "https://api.openai.com/v1", "vertex": {"project": PROJECT, "region": REGION}},
     "'vertex' is only for gcp_vertex_ai"),
    (vertex_backend(credentials_file="/a.json", credentials={"env": "X"}), "not both"),
    (vertex_backend(region="US East"), "region"),
])
def test_bad_vertex_settings_are_named(backend: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_of(backend)
    assert words in str(raised.value)


def test_credentials_are_read_and_checked_at_load(tmp_path: Path) -> None:
    info, _ = service_account_key(EMAIL, "https://oauth2.googleapis.com/token")
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(info, indent=2))  # a key file spans lines
    config = config_of(vertex_backend(credentials_file=str(key_file)))
    secrets = resolve_secrets(config, {}, "t")
    assert json.loads(secrets["vx/vertex.credentials"].get_secret_value()) == info

    missing = config_of(vertex_backend(credentials_file=str(tmp_path / "nope.json")))
    with pytest.raises(ConfigError, match=r"backends\[0\].vertex.credentials_file: cannot read"):
        resolve_secrets(missing, {}, "t")
    not_a_key = config_of(vertex_backend(credentials={"env": "SA"}))
    with pytest.raises(ConfigError, match="lack private_key") as raised:
        resolve_secrets(not_a_key, {"SA": json.dumps({**info, "private_key": None})}, "t")
    assert info["client_email"] not in str(raised.value)
    with pytest.raises(ConfigError, match="not JSON"):
        resolve_secrets(not_a_key, {"SA": "not json at all"}, "t")


# -- the simulator, checked with the anthropic SDK ----------------------------------------------


def issue_token(sim: SimServer) -> str:
    """A token from the simulator's endpoint, by google-auth's own service-account flow."""
    info, public_pem = service_account_key(EMAIL, f"{sim.url}/token")
    sim.google.register(EMAIL, public_pem)
    credentials = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
    credentials.refresh(Request())
    token = credentials.token
    assert isinstance(token, str)
    return token


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(chunks=4) as server:
        yield server


def vertex_client(sim: SimServer, token: str) -> anthropic.AnthropicVertex:
    return anthropic.AnthropicVertex(region=REGION, project_id=PROJECT, access_token=token,
                                     base_url=f"{sim.url}/v1", max_retries=0)


def test_sdk_json_reply_with_exact_usage(sim: SimServer) -> None:
    client = vertex_client(sim, issue_token(sim))
    message = client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert message.content[0].type == "text" and "sky" in message.content[0].text
    assert (message.usage.input_tokens, message.usage.output_tokens) == (PROMPT_TOKENS, simtext.DEFAULT_REPLY_TOKENS)
    assert message.model == MODEL
    sent = sim.requests[-1]
    assert sent.path == f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/{MODEL}:rawPredict"
    assert sent.json["anthropic_version"] == anthropic._constants.ANTHROPIC_API_VERSION and "model" not in sent.json


def test_sdk_stream_with_exact_usage(sim: SimServer) -> None:
    client = vertex_client(sim, issue_token(sim))
    with client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "sky" in text and final.content[0].text == text  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, simtext.DEFAULT_REPLY_TOKENS)
    assert sim.requests[-1].path.endswith(f"/models/{MODEL}:streamRawPredict")


def test_sdk_count_tokens(sim: SimServer) -> None:
    count = vertex_client(sim, issue_token(sim)).messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert count.input_tokens == PROMPT_TOKENS
    sent = sim.requests[-1]
    assert sent.path == f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/count-tokens:rawPredict"
    assert sent.json["model"] == MODEL


def test_only_tokens_the_endpoint_issued_are_accepted(sim: SimServer) -> None:
    issue_token(sim)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        vertex_client(sim, "ya29.made-up").messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert raised.value.status_code == 401
    assert raised.value.body["error"]["status"] == "UNAUTHENTICATED"  # type: ignore[index]  # Google's shape


def test_vertex_body_conventions_are_checked(sim: SimServer) -> None:
    token = issue_token(sim)
    url = f"{sim.url}/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/{MODEL}:rawPredict"
    headers = {"authorization": f"Bearer {token}"}
    base = {"max_tokens": 10, "messages": MESSAGES}
    with_model = httpx.post(url, json={**base, "model": MODEL, "anthropic_version": "vertex-2023-10-16"},
                            headers=headers)
    assert with_model.status_code == 400 and "model" in with_model.json()["error"]["message"]
    no_version = httpx.post(url, json=base, headers=headers)
    assert no_version.status_code == 400 and "anthropic_version" in no_version.json()["error"]["message"]
    stream_on_raw = httpx.post(url, json={**base, "anthropic_version": "vertex-2023-10-16", "stream": True},
                               headers=headers)
    assert stream_on_raw.status_code == 400 and "streamRawPredict" in stream_on_raw.json()["error"]["message"]


# -- the upstream stage ---------------------------------------------------------------------------


def vertex_runtime(sim: SimServer, info: dict[str, Any]) -> Runtime:
    config = config_of({**vertex_backend(credentials={"env": "SA"}), "base_url": sim.url})
    secrets = resolve_secrets(config, {"SA": json.dumps(info, indent=2)}, "t")
    return Runtime.build(LoadedConfig(config=config, source="t", secrets=secrets))


def start_attempt(runtime: Runtime, body: dict[str, Any], client_api: str) -> Any:
    exchange = UpstreamExchange(runtime)
    assert exchange.handle(headers_message("vx", client_api)).WhichOneof("response") == "request_headers"
    return exchange.handle(ep.ProcessingRequest(request_body=ep.HttpBody(body=orjson.dumps(body), end_of_stream=True)))


CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 7}


async def test_an_attempt_waits_for_the_token_then_sends_it_as_bearer() -> None:
    async with SimServer() as sim:
        info, public_pem = service_account_key(EMAIL, f"{sim.url}/token")
        sim.google.register(EMAIL, public_pem)
        runtime = vertex_runtime(sim, info)
        answer = start_attempt(runtime, CHAT, "openai.chat")
        assert not isinstance(answer, ep.ProcessingResponse)  # the token is fetched off the loop first
        headers, removed, body = mutation(await answer)
        token = headers["authorization"].removeprefix(b"Bearer ").decode()
        assert sim.google.issued[token].client_email == EMAIL
        assert headers[":path"] == (f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/"
                                    f"{MODEL}:rawPredict").encode()
        assert "x-api-key" in removed and "anthropic-version" in removed
        assert body is not None and json.loads(body)["anthropic_version"] == "vertex-2023-10-16"

        again = start_attempt(runtime, {**CHAT, "stream": True}, "anthropic.messages")
        assert isinstance(again, ep.ProcessingResponse)  # from memory now
        headers, _, body = mutation(again)
        assert headers["authorization"] == f"Bearer {token}".encode() and sim.google.token_requests == 1
        assert headers[":path"].endswith(b":streamRawPredict")
        assert body is not None and "model" not in json.loads(body)


@pytest.mark.parametrize(("client_api", "shape"), [("openai.chat", "openai"), ("anthropic.messages", "anthropic")])
async def test_no_token_is_a_503_in_the_clients_shape(client_api: str, shape: str) -> None:
    async with SimServer() as sim:
        info, public_pem = service_account_key(EMAIL, f"{sim.url}/token")
        sim.google.register(EMAIL, public_pem)
        sim.google.fail_status = 503
        answer = start_attempt(vertex_runtime(sim, info), CHAT, client_api)
        assert not isinstance(answer, ep.ProcessingResponse)
        reply = (await answer).immediate_response
        assert reply.status.code == 503
        body = json.loads(reply.body)
        if shape == "openai":
            assert body["error"]["code"] == "backend_credentials_missing"
            assert "Google Cloud access token" in body["error"]["message"] and "vx" in body["error"]["message"]
        else:
            assert body["type"] == "error" and "Google Cloud access token" in body["error"]["message"]
        assert info["private_key"] not in reply.body.decode()


def test_the_keys_inside_a_credential_json_are_scrubbed_from_logs() -> None:
    from extproc.redact import config_secrets

    info, _ = service_account_key(EMAIL, "https://oauth2.googleapis.com/token")
    config = config_of(vertex_backend(credentials={"env": "SA"}))
    loaded = LoadedConfig(config=config, source="t", secrets=resolve_secrets(config, {"SA": json.dumps(info)}, "t"))
    secrets = config_secrets(loaded, {})
    assert info["private_key"] in secrets and info["private_key_id"] in secrets


def _response_headers(status: int) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")])))


GOOGLE_429 = orjson.dumps({"error": {"code": 429, "message": "Quota exceeded for aiplatform.googleapis.com.",
                                     "status": "RESOURCE_EXHAUSTED"}})


async def test_anthropic_replies_pass_and_googles_own_errors_come_in_anthropics_shape() -> None:
    async with SimServer() as sim:
        info, public_pem = service_account_key(EMAIL, f"{sim.url}/token")
        sim.google.register(EMAIL, public_pem)
        runtime = vertex_runtime(sim, info)
        for client_api in ("anthropic.messages", "openai.chat"):
            answer = start_attempt(runtime, CHAT, client_api)
            if not isinstance(answer, ep.ProcessingResponse):
                answer = await answer
            assert (b"accept-encoding", b"identity") in [
                (h.header.key.encode(), h.header.raw_value) for h in answer.request_body.response.header_mutation.set_headers]

        ok = UpstreamExchange(runtime)
        ok.handle(headers_message("vx", "anthropic.messages"))
        ok.handle(ep.ProcessingRequest(request_body=ep.HttpBody(body=orjson.dumps(CHAT), end_of_stream=True)))
        passed = ok.handle(_response_headers(200))
        assert ok.done and not passed.HasField("mode_override")  # a success is not read

        for client_api in ("anthropic.messages", "openai.chat"):
            failed = UpstreamExchange(runtime)
            failed.handle(headers_message("vx", client_api))
            failed.handle(ep.ProcessingRequest(request_body=ep.HttpBody(body=orjson.dumps(CHAT), end_of_stream=True)))
            assert failed.handle(_response_headers(429)).mode_override.response_body_mode == (
                processing_mode_pb2.ProcessingMode.BUFFERED)
            out = failed.handle(ep.ProcessingRequest(response_body=ep.HttpBody(body=GOOGLE_429, end_of_stream=True)))
            error = orjson.loads(out.response_body.response.body_mutation.body)
            if client_api == "anthropic.messages":
                assert error == {"type": "error", "error": {"type": "rate_limit_error",
                                                            "message": "Quota exceeded for aiplatform.googleapis.com."}}
            else:
                assert error["error"]["code"] == "rate_limit_exceeded" and "Quota exceeded" in error["error"]["message"]


def test_anthropics_own_errors_pass_as_they_are() -> None:
    from extproc.translators.vertex import google_error_to_anthropic

    own = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    assert google_error_to_anthropic(529, own) is own
    assert orjson.loads(google_error_to_anthropic(502, b"<html>bad gateway</html>"))["error"]["type"] == "api_error"


# -- Gemini on Vertex -----------------------------------------------------------------------------

GEMINI = "gemini-2.0-flash"
GEMINI_PROMPT = "Why is the sky blue?"
GEMINI_PROMPT_TOKENS = 10  # 4 overhead + "Why is the sky blue ?" (the Gemini simulator's rule)


def vertex_genai(sim: SimServer) -> genai.Client:
    """google-genai's Vertex client with service-account credentials whose token the simulator issues."""
    info, public_pem = service_account_key(EMAIL, f"{sim.url}/token")
    sim.google.register(EMAIL, public_pem)
    credentials = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
    return genai.Client(vertexai=True, project=PROJECT, location=REGION, credentials=credentials,
                        http_options=genai_types.HttpOptions(base_url=sim.url))


def test_genai_vertex_client_text_and_stream_with_exact_usage(sim: SimServer) -> None:
    client = vertex_genai(sim)
    response = client.models.generate_content(model=GEMINI, contents=GEMINI_PROMPT)
    assert response.text == simtext.reply_text(GEMINI_PROMPT, simtext.DEFAULT_REPLY_TOKENS)
    usage = response.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count) == (
        GEMINI_PROMPT_TOKENS, simtext.DEFAULT_REPLY_TOKENS)
    sent = sim.requests[-1]
    assert f"/projects/{PROJECT}/locations/{REGION}/publishers/google/models/{GEMINI}:generateContent" in sent.path
    token = sent.headers["authorization"].removeprefix("Bearer ")
    assert sim.google.issued[token].client_email == EMAIL and "x-goog-api-key" not in sent.headers

    chunks = list(client.models.generate_content_stream(model=GEMINI, contents=GEMINI_PROMPT))
    assert "".join(c.text or "" for c in chunks) == response.text
    last = chunks[-1].usage_metadata
    assert last is not None and last.candidates_token_count == simtext.DEFAULT_REPLY_TOKENS
    assert sim.requests[-1].path.endswith(f"/models/{GEMINI}:streamGenerateContent")
    assert sim.requests[-1].query == "alt=sse"


def test_genai_vertex_client_without_a_token_is_refused(sim: SimServer) -> None:
    vertex_genai(sim)
    url = f"{sim.url}/v1/projects/{PROJECT}/locations/{REGION}/publishers/google/models/{GEMINI}:generateContent"
    refused = httpx.post(url, json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                         headers={"x-goog-api-key": "an-ai-studio-key"})  # Vertex takes no API key here
    assert refused.status_code == 401 and refused.json()["error"]["status"] == "UNAUTHENTICATED"


async def test_a_gemini_attempt_goes_to_googles_publisher_path() -> None:
    async with SimServer() as sim:
        info, public_pem = service_account_key(EMAIL, f"{sim.url}/token")
        sim.google.register(EMAIL, public_pem)
        runtime = vertex_runtime(sim, info)
        answer = start_attempt(runtime, {**CHAT, "model": GEMINI, "stream": True}, "openai.chat")
        if not isinstance(answer, ep.ProcessingResponse):
            answer = await answer
        headers, _, body = mutation(answer)
        assert headers[":path"] == (f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/google/models/"
                                    f"{GEMINI}:streamGenerateContent?alt=sse").encode()
        assert headers["authorization"].startswith(b"Bearer ya29.")
        assert body is not None and json.loads(body)["contents"][0]["parts"][0]["text"] == MESSAGES[0]["content"]
