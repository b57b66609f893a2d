"""Vertex AI (`gcp_vertex_ai`) through real Envoy: Claude for the anthropic and openai SDKs.

The gateway's credentials are a service-account key generated here whose `token_uri`
is the simulator's token endpoint; the simulator checks the key's JWT signature against
the public key registered with it, and its Vertex paths accept only tokens it issued.
So "authenticated" means the processor really ran google-auth's flow with the configured
key. Expected token counts come from asking the simulator directly with the anthropic
SDK's AnthropicVertex client: what the provider reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import secrets

import anthropic
import openai
import orjson
import pytest
from google import genai
from google.auth.transport.requests import Request
from google.genai import types as genai_types
from google.oauth2 import service_account

from extproc.sim import SimServer
from extproc.sim.google_auth import service_account_key
from tests.integration.harness import RunningGateway, free_port, running_gateway
from tests.otlp_receiver import OtlpReceiver

PROJECT = "sim-project"
REGION = "us-east5"
MODEL = "claude-sonnet-4@20250514"
EMAIL = "gateway@sim-project.iam.gserviceaccount.com"
CLIENT_KEY = "sk-client-of-the-gateway-vx"
USER = [{"role": "user", "content": "Tell me about the sea"}]
GEMINI = "gemini-2.0-flash"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.fixture(scope="module")
def key(sim: SimServer) -> dict[str, Any]:
    info, public_pem = service_account_key(EMAIL, f"{sim.url}/token", PROJECT)
    sim.google.register(EMAIL, public_pem)
    return info


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def vertex(sim: SimServer, key: dict[str, Any], receiver: OtlpReceiver,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("vertex")
    key_file = tmp / "sa.json"
    key_file.write_text(orjson.dumps(key, option=orjson.OPT_INDENT_2).decode())
    unknown, _ = service_account_key("stranger@sim-project.iam.gserviceaccount.com", f"{sim.url}/token")
    unreachable, _ = service_account_key(EMAIL, f"http://127.0.0.1:{free_port()}/token")
    settings = {"project": PROJECT, "region": REGION}
    config = {
        "backends": [
            {"name": "vertex", "schema": "gcp_vertex_ai", "base_url": sim.url,
             "vertex": {**settings, "credentials_file": str(key_file)}},
            # Always 503 (the simulator fails models named sim-error-NNN): an OpenAI backend that is down.
            {"name": "failing", "schema": "openai", "base_url": sim.base_url, "model_name_override": "sim-error-503"},
            {"name": "vertex-fallback", "schema": "gcp_vertex_ai", "base_url": sim.url, "model_name_override": MODEL,
             "vertex": {**settings, "credentials_file": str(key_file)}},
            # Keys the token endpoint refuses (not registered), or cannot be reached for.
            {"name": "vertex-refused", "schema": "gcp_vertex_ai", "base_url": sim.url,
             "vertex": {**settings, "credentials": {"env": "T_REFUSED_KEY"}}},
            {"name": "vertex-no-endpoint", "schema": "gcp_vertex_ai", "base_url": sim.url,
             "vertex": {**settings, "credentials": {"env": "T_UNREACHABLE_KEY"}}},
        ],
        "routes": [
            {"name": "refused", "match": {"model": "claude-refused"}, "backends": [{"name": "vertex-refused"}]},
            {"name": "no-endpoint", "match": {"model": "claude-no-endpoint"},
             "backends": [{"name": "vertex-no-endpoint"}]},
            {"name": "resilient", "match": {"model": "resilient"},
             "backends": [{"name": "failing"}, {"name": "vertex-fallback", "priority": 1}]},
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "vertex"}]},
            {"name": "gemini", "match": {"glob": "gemini-*"}, "backends": [{"name": "vertex"}]},
        ],
    }
    env = receiver.exporter_env(T_REFUSED_KEY=orjson.dumps(unknown).decode(),
                                T_UNREACHABLE_KEY=orjson.dumps(unreachable).decode())
    with running_gateway(config, tmp, env=env) as gateway:
        yield gateway


@pytest.fixture
def client(vertex: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=vertex.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


@pytest.fixture
def claude(vertex: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{vertex.url}/anthropic", api_key=CLIENT_KEY, max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def _fresh(sim: SimServer) -> None:
    sim.clear()


def _direct(sim: SimServer, key: dict[str, Any], **kwargs: Any) -> anthropic.types.Message:
    """What Vertex itself reports for this request (the simulator is deterministic)."""
    credentials = service_account.Credentials.from_service_account_info(
        key, scopes=["https://www.googleapis.com/auth/cloud-platform"])
    credentials.refresh(Request())
    direct = anthropic.AnthropicVertex(region=REGION, project_id=PROJECT, access_token=credentials.token,
                                       base_url=f"{sim.url}/v1", max_retries=0)
    return direct.messages.create(model=MODEL, **kwargs)


def _entry(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    return gateway.wait_access_log(lambda e: e.get("request_id") == request_id)


def _tokens(entry: dict[str, Any]) -> tuple[int, int, int]:
    return int(entry["input_tokens"]), int(entry["output_tokens"]), int(entry["total_tokens"])




def _assert_issued_bearer(sim: SimServer) -> None:
    """The last request reached Vertex with a token the endpoint issued for the key, and
    none of the client's credentials."""
    sent = sim.requests[-1]
    scheme, _, token = sent.headers["authorization"].partition(" ")
    assert scheme == "Bearer" and sim.google.issued[token].client_email == EMAIL
    assert CLIENT_KEY not in str(sent.headers) and "x-api-key" not in sent.headers


def test_openai_sdk_json_with_exact_usage(client: openai.OpenAI, vertex: RunningGateway, sim: SimServer,
                                          key: dict[str, Any]) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *USER], max_tokens=12,
        extra_headers={"x-request-id": "vx-json-1", "x-sim-cached-tokens": "3"},
    )
    assert completion.choices[0].message.content and completion.model == MODEL
    _assert_issued_bearer(sim)
    sent = sim.requests[-1]
    assert sent.path == f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/{MODEL}:rawPredict"
    assert sent.json["anthropic_version"] == "vertex-2023-10-16" and "model" not in sent.json
    assert sent.json["system"] == "Be brief." and sent.json["max_tokens"] == 12

    direct = _direct(sim, key, system="Be brief.", messages=USER, max_tokens=12,
                     extra_headers={"x-sim-cached-tokens": "3"})
    prompt = direct.usage.input_tokens + 3
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt, direct.usage.output_tokens)
    entry = _entry(vertex, "vx-json-1")
    assert _tokens(entry) == (prompt, direct.usage.output_tokens, prompt + direct.usage.output_tokens)
    assert int(entry["cached_input_tokens"]) == 3
    assert entry["backend_name"] == "vertex" and entry["status"] == 200
    assert vertex.metric_sum("gen_ai_client_token_usage", "_sum", gen_ai_provider_name="gcp.vertex_ai",
                       gen_ai_request_model=MODEL, gen_ai_token_type="output") >= direct.usage.output_tokens


def test_openai_sdk_stream_with_exact_usage(client: openai.OpenAI, vertex: RunningGateway, sim: SimServer,
                                            key: dict[str, Any]) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=20, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-request-id": "vx-stream-1", "x-sim-chunks": "5"},
    ))
    _assert_issued_bearer(sim)
    assert sim.requests[-1].path.endswith(f"/models/{MODEL}:streamRawPredict")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    direct = _direct(sim, key, messages=USER, max_tokens=20)
    assert text == "".join(b.text for b in direct.content if b.type == "text")
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (direct.usage.input_tokens, direct.usage.output_tokens)
    entry = _entry(vertex, "vx-stream-1")
    assert _tokens(entry)[:2] == (direct.usage.input_tokens, direct.usage.output_tokens)
    assert entry["backend_name"] == "vertex"


def test_anthropic_sdk_json_and_stream(claude: anthropic.Anthropic, vertex: RunningGateway, sim: SimServer,
                                       key: dict[str, Any]) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=16, messages=USER,
                                     extra_headers={"x-request-id": "vx-native-1", "x-sim-cached-tokens": "4"})
    assert message.type == "message" and message.content[0].type == "text"
    _assert_issued_bearer(sim)
    sent = sim.requests[-1]
    assert sent.path.endswith(f"/models/{MODEL}:rawPredict") and "anthropic-version" not in sent.headers
    assert sent.json == {"max_tokens": 16, "messages": USER, "anthropic_version": "vertex-2023-10-16"}
    direct = _direct(sim, key, messages=USER, max_tokens=16, extra_headers={"x-sim-cached-tokens": "4"})
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        direct.usage.input_tokens, direct.usage.output_tokens)
    entry = _entry(vertex, "vx-native-1")
    assert int(entry["input_tokens"]) == direct.usage.input_tokens + 4
    assert int(entry["cached_input_tokens"]) == 4 and int(entry["output_tokens"]) == direct.usage.output_tokens

    with claude.messages.stream(model=MODEL, max_tokens=16, messages=USER,
                                extra_headers={"x-request-id": "vx-native-2"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    _assert_issued_bearer(sim)
    assert sim.requests[-1].path.endswith(f"/models/{MODEL}:streamRawPredict")
    assert text and text == "".join(b.text for b in final.content if b.type == "text")
    entry = _entry(vertex, "vx-native-2")
    assert (int(entry["input_tokens"]), int(entry["output_tokens"])) == (
        final.usage.input_tokens, final.usage.output_tokens)


def test_anthropic_sdk_count_tokens(claude: anthropic.Anthropic, sim: SimServer, key: dict[str, Any]) -> None:
    count = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=USER)
    _assert_issued_bearer(sim)
    sent = sim.requests[-1]
    assert sent.path.endswith("/publishers/anthropic/models/count-tokens:rawPredict")
    assert sent.json["model"] == MODEL and sent.json["anthropic_version"] == "vertex-2023-10-16"
    direct = _direct(sim, key, system="Be brief.", messages=USER, max_tokens=1)
    assert count.input_tokens == direct.usage.input_tokens


def test_errors_come_in_each_clients_shape(client: openai.OpenAI, claude: anthropic.Anthropic,
                                           vertex: RunningGateway) -> None:
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=MODEL, messages=USER,
                                       extra_headers={"x-sim-error": "429", "x-request-id": "vx-429"})
    body = limited.value.body
    assert isinstance(body, dict) and body.get("code") == "rate_limit_exceeded" and body.get("message")
    assert _entry(vertex, "vx-429")["status"] == 429
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=MODEL, max_tokens=0, messages=USER)
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    # Google's front end answering itself (a project's quota), in Google's shape upstream.
    with pytest.raises(openai.RateLimitError) as quota:
        client.chat.completions.create(model=MODEL, messages=USER, extra_headers={"x-sim-vertex-error": "429"})
    assert isinstance(quota.value.body, dict) and "Quota exceeded" in quota.value.body["message"]
    with pytest.raises(anthropic.RateLimitError) as native_quota:
        claude.messages.create(model=MODEL, max_tokens=8, messages=USER,
                               extra_headers={"x-sim-vertex-error": "429", "x-request-id": "vx-quota"})
    assert native_quota.value.body["type"] == "error"
    assert native_quota.value.body["error"]["type"] == "rate_limit_error"
    assert "Quota exceeded" in native_quota.value.body["error"]["message"]
    assert _entry(vertex, "vx-quota")["status"] == 429
    with pytest.raises(openai.BadRequestError) as gemini_error:  # Gemini's own validation, in OpenAI's shape
        client.chat.completions.create(model=GEMINI, messages=USER, extra_headers={"x-sim-error": "400"})
    assert isinstance(gemini_error.value.body, dict) and gemini_error.value.body.get("message")
    with pytest.raises(anthropic.RateLimitError) as gemini_quota:  # Google's error on Gemini, in Anthropic's shape
        claude.messages.create(model=GEMINI, max_tokens=8, messages=USER, extra_headers={"x-sim-vertex-error": "429"})
    assert gemini_quota.value.body["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("model", ["claude-refused", "claude-no-endpoint"])
def test_a_token_failure_is_a_clear_503_and_the_gateway_keeps_serving(
    client: openai.OpenAI, claude: anthropic.Anthropic, vertex: RunningGateway, sim: SimServer, model: str
) -> None:
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model=model, messages=USER, extra_headers={"x-request-id": f"vx-{model}"})
    assert failed.value.status_code == 503
    body = failed.value.body
    assert isinstance(body, dict) and body["code"] == "backend_credentials_missing"
    assert "Google Cloud access token" in body["message"]
    with pytest.raises(anthropic.InternalServerError) as native:
        claude.messages.create(model=model, max_tokens=8, messages=USER)
    assert native.value.status_code == 503 and native.value.body["type"] == "error"
    assert not any(r.path.startswith("/v1/projects") for r in sim.requests)  # nothing went to Vertex
    vertex.wait_stderr(lambda line: "could not be obtained" in line)
    logs = "\n".join(vertex.stdout_lines + vertex.stderr_lines)
    assert "BEGIN PRIVATE KEY" not in logs and "ya29." not in logs

    ok = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5)  # still serving
    assert ok.choices[0].message.content


def test_fallback_from_a_failing_openai_backend_to_vertex(client: openai.OpenAI, vertex: RunningGateway,
                                                         sim: SimServer) -> None:
    completion = client.chat.completions.create(model="resilient", messages=USER, max_tokens=10,
                                                extra_headers={"x-request-id": "vx-fallback"})
    assert completion.choices[0].message.content
    failed, served = [r for r in sim.requests if r.path != "/token"][-2:]  # a worker may fetch its token between
    assert failed.path == "/v1/chat/completions" and failed.json["model"] == "sim-error-503"
    assert served.path.endswith(f"/models/{MODEL}:rawPredict")
    _assert_issued_bearer(sim)
    entry = _entry(vertex, "vx-fallback")
    assert entry["backend_name"] == "vertex-fallback" and entry["status"] == 200
    assert int(entry["output_tokens"]) == completion.usage.completion_tokens  # type: ignore[union-attr]


# -- Gemini on Vertex -----------------------------------------------------------------------------


def _direct_gemini(sim: SimServer, key: dict[str, Any], text: str, max_tokens: int) -> Any:
    """What Vertex itself reports, asked with google-genai's Vertex client."""
    credentials = service_account.Credentials.from_service_account_info(
        key, scopes=["https://www.googleapis.com/auth/cloud-platform"])
    direct = genai.Client(vertexai=True, project=PROJECT, location=REGION, credentials=credentials,
                          http_options=genai_types.HttpOptions(base_url=sim.url))
    return direct.models.generate_content(
        model=GEMINI, contents=text, config=genai_types.GenerateContentConfig(max_output_tokens=max_tokens))


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_served_by_gemini_on_vertex_with_exact_usage(
    client: openai.OpenAI, vertex: RunningGateway, sim: SimServer, key: dict[str, Any], stream: bool
) -> None:
    request_id = f"vx-gemini-{stream}"
    if stream:
        chunks = list(client.chat.completions.create(
            model=GEMINI, messages=USER, max_tokens=20, stream=True, stream_options={"include_usage": True},
            extra_headers={"x-request-id": request_id}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        completion = client.chat.completions.create(model=GEMINI, messages=USER, max_tokens=20,
                                                     extra_headers={"x-request-id": request_id})
        text, usage = completion.choices[0].message.content or "", completion.usage
    _assert_issued_bearer(sim)
    method = "streamGenerateContent" if stream else "generateContent"
    sent = sim.requests[-1]
    assert sent.path == f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/google/models/{GEMINI}:{method}"
    assert "x-goog-api-key" not in sent.headers
    direct = _direct_gemini(sim, key, USER[0]["content"], 20)
    assert text == direct.text
    expected = (direct.usage_metadata.prompt_token_count, direct.usage_metadata.candidates_token_count)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == expected
    entry = _entry(vertex, request_id)
    assert _tokens(entry)[:2] == expected and entry["backend_name"] == "vertex"


def test_anthropic_sdk_served_by_gemini_on_vertex_through_chat(
    claude: anthropic.Anthropic, vertex: RunningGateway, sim: SimServer, key: dict[str, Any]
) -> None:
    message = claude.messages.create(model=GEMINI, max_tokens=20, messages=USER,
                                     extra_headers={"x-request-id": "vx-gemini-native"})
    _assert_issued_bearer(sim)
    assert sim.requests[-1].path.endswith(f"/publishers/google/models/{GEMINI}:generateContent")
    direct = _direct_gemini(sim, key, USER[0]["content"], 20)
    assert message.content[0].type == "text" and message.content[0].text == direct.text
    expected = (direct.usage_metadata.prompt_token_count, direct.usage_metadata.candidates_token_count)
    assert (message.usage.input_tokens, message.usage.output_tokens) == expected
    assert _tokens(_entry(vertex, "vx-gemini-native"))[:2] == expected


@pytest.mark.parametrize("model", [MODEL, GEMINI], ids=["claude", "gemini"])
def test_span_names_google_and_carries_the_exact_usage(
    claude: anthropic.Anthropic, receiver: OtlpReceiver, model: str
) -> None:
    """The anthropic SDK's request to either publisher is one OpenInference span with
    Google as the provider, the client's input and output, and the provider's usage."""
    trace_id = secrets.token_hex(16)
    message = claude.messages.create(
        model=model, max_tokens=16, messages=USER,
        extra_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    attributes = receiver.wait_for_request_span(trace_id).attributes
    assert attributes["llm.provider"] == "google"
    assert attributes["llm.model_name"] == model
    assert attributes["llm.input_messages.0.message.content"] == USER[0]["content"]
    assert attributes["llm.output_messages.0.message.content"] == "".join(
        b.text for b in message.content if b.type == "text")
    assert attributes["llm.token_count.prompt"] == message.usage.input_tokens
    assert attributes["llm.token_count.completion"] == message.usage.output_tokens
