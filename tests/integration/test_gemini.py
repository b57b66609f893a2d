"""Gemini API backends through real Envoy, with the openai SDK as the client.

The upstream is extproc.sim's Gemini API, which checks the key and validates requests
as the real API does. Expected tokens come from asking the simulator directly with the
official google-genai SDK, so "exact" means what the provider reported.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from google import genai
from google.genai import types

from extproc.sim import SimServer
from extproc.sim import text as simtext
from tests.integration.harness import RunningGateway, running_gateway
from tests.otlp_receiver import OtlpReceiver

GEMINI_KEY = "AIza-gemini-backend-key-31ff"
OPENAI_KEY = "sk-openai-backend-key-9911"
CLIENT_KEY = "sk-client-of-the-gateway"
USER = [{"role": "user", "content": "Tell me about the sea"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def gateway(
    sim: SimServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    config = {
        "backends": [
            {"name": "gemini", "schema": "gemini", "base_url": f"{sim.url}/v1beta",
             "api_key": {"env": "T_GEMINI_KEY"}},
            # Always 503 (the simulator fails models named sim-error-NNN), with a bearer key of its own.
            {"name": "failing", "schema": "openai", "base_url": sim.base_url, "model_name_override": "sim-error-503",
             "api_key": {"env": "T_OPENAI_KEY"}},
            {"name": "gemini-fallback", "schema": "gemini", "base_url": f"{sim.url}/v1beta",
             "api_key": {"env": "T_GEMINI_KEY"}, "model_name_override": "gemini-2.0-flash"},
        ],
        "routes": [
            {"name": "gemini", "match": {"prefix": "gemini-"}, "backends": [{"name": "gemini"}]},
            {"name": "embeddings", "match": {"model": "text-embedding-004"}, "backends": [{"name": "gemini"}]},
            {"name": "fallback", "match": {"model": "resilient"},
             "backends": [{"name": "failing"}, {"name": "gemini-fallback", "priority": 1}]},
        ],
        "usage": {"estimate_when_missing": True},  # embeddings: Gemini reports no tokens
    }
    env = receiver.exporter_env(T_GEMINI_KEY=GEMINI_KEY, T_OPENAI_KEY=OPENAI_KEY)
    with running_gateway(config, tmp_path_factory.mktemp("gemini"), env=env) as running:
        yield running


@pytest.fixture
def client(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def _fresh(sim: SimServer) -> None:
    sim.clear()


def _direct(sim: SimServer, model: str, text: str, max_tokens: int | None = None,
            **headers: str) -> types.GenerateContentResponse:
    """What the provider itself reports for this request (the simulator is deterministic)."""
    direct = genai.Client(api_key="direct", http_options=types.HttpOptions(base_url=sim.url, api_version="v1beta"))
    config = types.GenerateContentConfig(max_output_tokens=max_tokens, http_options=types.HttpOptions(headers=headers))
    return direct.models.generate_content(model=model, contents=text, config=config)


def _entry(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    return gateway.wait_access_log(lambda e: e.get("request_id") == request_id)


def _tokens(entry: dict[str, Any]) -> tuple[int, int, int]:
    return int(entry["input_tokens"]), int(entry["output_tokens"]), int(entry["total_tokens"])




def test_json_reply_with_exact_usage_in_response_log_and_metrics(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gemini-json", messages=[{"role": "system", "content": "Be brief."}, *USER], max_tokens=12,
        extra_headers={"x-request-id": "gem-json-1", "x-sim-cached-tokens": "3", "x-sim-reasoning-tokens": "4",
                       "x-goog-api-key": "client-google-key"},
    )
    completion = raw.parse()
    sent = sim.requests[-1]
    assert sent.path == "/v1beta/models/gemini-json:generateContent"
    assert sent.headers["x-goog-api-key"] == GEMINI_KEY  # the backend's key, not the client's
    assert "authorization" not in sent.headers  # the client's own key stays at the gateway
    assert sent.json["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert sent.json["generationConfig"] == {"maxOutputTokens": 12}
    assert "x-ai-eg-backend" not in raw.headers

    direct = _direct(sim, "gemini-json", USER[0]["content"], 12,
                     **{"x-sim-cached-tokens": "3", "x-sim-reasoning-tokens": "4"})
    meta = direct.usage_metadata
    assert meta is not None and meta.prompt_token_count and meta.candidates_token_count
    prompt = meta.prompt_token_count + 3  # the system instruction ("Be brief.") is 3 tokens more
    output = meta.candidates_token_count + 4
    assert completion.choices[0].message.content == direct.text
    assert completion.choices[0].finish_reason == "length"
    assert completion.model == "gemini-json"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, output, prompt + output)
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == 3
    assert usage.completion_tokens_details and usage.completion_tokens_details.reasoning_tokens == 4
    entry = _entry(gateway, "gem-json-1")
    assert _tokens(entry) == (prompt, output, prompt + output)
    assert int(entry["cached_input_tokens"]) == 3 and int(entry["reasoning_tokens"]) == 4
    assert entry["backend_name"] == "gemini" and entry["status"] == 200
    labels = {"gen_ai_request_model": "gemini-json", "gen_ai_provider_name": "gcp.gemini"}
    assert gateway.metric_sum("gen_ai_client_token_usage", "_sum", gen_ai_token_type="input", **labels) == prompt
    assert gateway.metric_sum("gen_ai_client_token_usage", "_sum", gen_ai_token_type="output", **labels) == output


def test_span_names_google_and_carries_the_exact_usage(client: openai.OpenAI, receiver: OtlpReceiver) -> None:
    trace_id = secrets.token_hex(16)
    completion = client.chat.completions.create(
        model="gemini-traced", messages=USER, max_tokens=8,
        extra_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    attributes = receiver.wait_for_request_span(trace_id).attributes
    assert attributes["llm.provider"] == "google"
    assert attributes["llm.model_name"] == "gemini-traced"
    assert attributes["llm.output_messages.0.message.content"] == completion.choices[0].message.content
    usage = completion.usage
    assert usage is not None
    assert attributes["llm.token_count.prompt"] == usage.prompt_tokens
    assert attributes["llm.token_count.completion"] == usage.completion_tokens


def test_stream_with_usage(client: openai.OpenAI, gateway: RunningGateway, sim: SimServer) -> None:
    chunks = list(client.chat.completions.create(
        model="gemini-stream", messages=USER, max_tokens=20, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-request-id": "gem-stream-1", "x-sim-chunks": "5"},
    ))
    assert sim.requests[-1].path == "/v1beta/models/gemini-stream:streamGenerateContent"
    assert sim.requests[-1].query == "alt=sse"
    direct = _direct(sim, "gemini-stream", USER[0]["content"], 20)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    meta = direct.usage_metadata
    assert meta is not None
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (meta.prompt_token_count, meta.candidates_token_count)
    entry = _entry(gateway, "gem-stream-1")
    assert _tokens(entry) == (meta.prompt_token_count, meta.candidates_token_count, meta.total_token_count)
    assert float(entry["ttft_ms"]) > 0


def test_stream_without_usage_asked_still_accounts_and_hides_usage(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer
) -> None:
    chunks = list(client.chat.completions.create(
        model="gemini-quiet", messages=USER, max_tokens=10, stream=True,
        extra_headers={"x-request-id": "gem-stream-2"},
    ))
    assert chunks and all(c.usage is None for c in chunks)  # the client did not ask for usage
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    meta = _direct(sim, "gemini-quiet", USER[0]["content"], 10).usage_metadata
    assert meta is not None
    assert _tokens(_entry(gateway, "gem-stream-2"))[:2] == (meta.prompt_token_count, meta.candidates_token_count)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-3-pro"])  # Gemini 3 signs its calls
def test_tool_call_round_trip(client: openai.OpenAI, sim: SimServer, stream: bool, model: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    if stream:
        chunks = list(client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], stream=True))
        calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
        assert len(calls) == 1 and calls[0].id and calls[0].function
        call_id, name, arguments = calls[0].id, calls[0].function.name, calls[0].function.arguments or ""
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "tool_calls"]
    else:
        completion = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL],
                                                    tool_choice="required")
        assert completion.choices[0].finish_reason == "tool_calls"
        call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    declaration = sim.requests[-1].json["tools"][0]["functionDeclarations"][0]
    assert "additionalProperties" not in declaration["parameters"]  # Gemini would refuse it
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}

    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"forecast": "sunny"}'},
    ]
    # The simulator refuses a Gemini 3 call that comes back without the signature it gave.
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL])
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    sent = sim.requests[-1].json["contents"]
    assert sent[1]["parts"][0]["functionCall"] == {"name": "get_weather", "args": {"city": "Paris"}}
    assert ("thoughtSignature" in sent[1]["parts"][0]) == (model == "gemini-3-pro")
    assert sent[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"forecast": "sunny"}}}]}


def test_embeddings(client: openai.OpenAI, gateway: RunningGateway, sim: SimServer) -> None:
    result = client.embeddings.create(model="text-embedding-004", input=["alpha", "beta"], dimensions=8,
                                      extra_headers={"x-request-id": "gem-emb-1"})
    sent = sim.requests[-1]
    assert sent.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert sent.headers["x-goog-api-key"] == GEMINI_KEY
    # The openai SDK asks for base64 and decodes it: the floats arrive intact.
    assert [d.embedding for d in result.data] == [simtext.embedding_vector(t, 8) for t in ("alpha", "beta")]
    assert result.usage is None  # Gemini reports no tokens for embeddings
    entry = _entry(gateway, "gem-emb-1")
    assert entry["status"] == 200 and entry["backend_name"] == "gemini"
    assert entry["usage_estimated"] is True and int(entry["input_tokens"]) > 0  # the gateway's own estimate


@pytest.mark.parametrize(("status", "error", "code"), [
    (429, openai.RateLimitError, "rate_limit_exceeded"),
    (400, openai.BadRequestError, None),
    (503, openai.InternalServerError, "service_unavailable"),
])
def test_backend_errors_in_openai_shape(
    client: openai.OpenAI, gateway: RunningGateway, status: int, error: type[openai.APIStatusError], code: str | None
) -> None:
    request_id = f"gem-err-{status}"
    with pytest.raises(error) as info:
        client.chat.completions.create(model="gemini-err", messages=USER,
                                       extra_headers={"x-sim-error": str(status), "x-request-id": request_id})
    assert info.value.status_code == status
    body = info.value.body
    assert isinstance(body, dict) and body.get("code") == code and "Simulated error" in str(body.get("message"))
    entry = _entry(gateway, request_id)
    assert entry["status"] == status and entry["input_tokens"] in (None, "-", "")
    output = "\n".join(gateway.stdout_lines + gateway.stderr_lines) + str(body)
    assert GEMINI_KEY not in output


def test_errors_of_streams_before_and_after_the_start(client: openai.OpenAI, gateway: RunningGateway) -> None:
    with pytest.raises(openai.RateLimitError) as info:  # before any byte: the whole error, translated
        client.chat.completions.create(model="gemini-err", messages=USER, stream=True,
                                       extra_headers={"x-sim-error": "429", "x-request-id": "gem-err-stream"})
    assert isinstance(info.value.body, dict) and info.value.body.get("code") == "rate_limit_exceeded"
    assert _entry(gateway, "gem-err-stream")["status"] == 429
    received: list[str] = []
    with pytest.raises(openai.APIError) as midway:  # after the 200: an error event ends the stream
        for chunk in client.chat.completions.create(model="gemini-err", messages=USER, stream=True,
                                                    extra_headers={"x-sim-stream-error": "503"}):
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(received) and "x-sim-stream-error" in str(midway.value)


def test_bad_request_is_refused_before_the_backend(client: openai.OpenAI, sim: SimServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemini-x", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/picture"}}]}])
    assert "cannot be told from the URL" in str(info.value.body)
    assert not sim.requests
    with pytest.raises(openai.BadRequestError) as unserved:
        client.completions.create(model="gemini-x", prompt="hi")
    assert "does not offer legacy completions" in str(unserved.value.body)


def test_fallback_to_gemini_swaps_the_credentials(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer
) -> None:
    completion = client.chat.completions.create(
        model="resilient", messages=USER, max_tokens=9,
        extra_headers={"x-request-id": "gem-fb-1", "x-goog-api-key": "client-google-key"})
    assert completion.choices[0].message.content
    first, second = sim.requests[-2], sim.requests[-1]
    assert first.path == "/v1/chat/completions" and first.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "x-goog-api-key" not in first.headers  # the client's Google key is never forwarded
    assert second.path == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert second.headers["x-goog-api-key"] == GEMINI_KEY
    assert "authorization" not in second.headers  # the first attempt's bearer key is gone
    entry = _entry(gateway, "gem-fb-1")
    assert entry["backend_name"] == "gemini-fallback" and entry["status"] == 200
    assert int(entry["output_tokens"]) == completion.usage.completion_tokens  # type: ignore[union-attr]
