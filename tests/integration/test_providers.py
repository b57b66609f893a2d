"""Anthropic, Bedrock and Azure OpenAI backends, and fallback, through real Envoy.

Clients are the official SDKs; the upstreams are extproc.sim speaking each provider's
wire format (the Bedrock simulator verifies every SigV4 signature and refuses a bad
one). Expected token counts come from asking the simulator directly with the
provider's own client, so "exact" means: what the provider reported, not what the
gateway's translation happened to produce.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import boto3
import openai
import pytest

from extproc.sim import SimServer
from extproc.sim.bedrock_api import SIM_AWS_ACCESS_KEY_ID, SIM_AWS_SECRET_ACCESS_KEY
from tests.integration.harness import RunningGateway, free_port, running_gateway

ANTHROPIC_KEY = "sk-ant-backend-77aa"
AZURE_KEY = "azure-backend-key-55cc"
CLIENT_KEY = "sk-client-of-the-gateway"
USER = [{"role": "user", "content": "Tell me about the sea"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.fixture(scope="module")
def providers(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = {
        "backends": [
            # The anthropic SDK convention: no /v1 in the base URL; a path prefix is kept.
            {"name": "claude", "schema": "anthropic", "base_url": f"{sim.url}/anthropic-proxy",
             "api_key": {"env": "T_ANTHROPIC_KEY"}},
            {"name": "bedrock", "schema": "aws_bedrock", "base_url": sim.url,
             "aws": {"region": "us-east-1", "access_key_id": {"env": "T_AWS_AK"},
                     "secret_access_key": {"env": "T_AWS_SK"}}},
            {"name": "azure", "schema": "azure_openai", "base_url": sim.url, "api_key": {"env": "T_AZURE_KEY"},
             "api_version": "2024-10-21"},
            # Always 503 (the simulator fails models named sim-error-NNN): a backend that is down.
            {"name": "failing", "schema": "openai", "base_url": sim.base_url, "model_name_override": "sim-error-503"},
            {"name": "closed-port", "schema": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1"},
            {"name": "claude-for-fallback", "schema": "anthropic", "base_url": sim.url,
             "api_key": {"env": "T_ANTHROPIC_KEY"}, "model_name_override": "claude-fallback-target"},
        ],
        "routes": [
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
            {"name": "bedrock", "match": {"prefix": "anthropic."}, "backends": [{"name": "bedrock"}]},
            {"name": "azure", "match": {"model": "azure-gpt"}, "backends": [{"name": "azure"}]},
            {"name": "fallback-5xx", "match": {"model": "resilient"},
             "backends": [{"name": "failing"}, {"name": "claude-for-fallback", "priority": 1}]},
            {"name": "fallback-down", "match": {"model": "resilient-bedrock"},
             "backends": [{"name": "closed-port"}, {"name": "bedrock", "priority": 1}]},
        ],
    }
    env = {"T_ANTHROPIC_KEY": ANTHROPIC_KEY, "T_AZURE_KEY": AZURE_KEY, "T_AWS_AK": SIM_AWS_ACCESS_KEY_ID,
           "T_AWS_SK": SIM_AWS_SECRET_ACCESS_KEY}
    with running_gateway(config, tmp_path_factory.mktemp("providers"), env=env) as gateway:
        yield gateway


@pytest.fixture
def client(providers: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=providers.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def _fresh(sim: SimServer) -> None:
    sim.clear()


def _entry(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    return gateway.wait_access_log(lambda e: e.get("request_id") == request_id)


def _tokens(entry: dict[str, Any]) -> tuple[int, int, int]:
    return int(entry["input_tokens"]), int(entry["output_tokens"]), int(entry["total_tokens"])


def _direct_anthropic(sim: SimServer, **kwargs: Any) -> anthropic.types.Message:
    """What the provider itself reports for this request (the simulator is deterministic)."""
    direct = anthropic.Anthropic(base_url=sim.url, api_key="direct", max_retries=0)
    return direct.messages.create(**kwargs)


def _direct_bedrock(sim: SimServer, model: str, text: str, max_tokens: int) -> dict[str, Any]:
    runtime = boto3.client(
        "bedrock-runtime", endpoint_url=sim.url, region_name="us-east-1",
        aws_access_key_id=SIM_AWS_ACCESS_KEY_ID, aws_secret_access_key=SIM_AWS_SECRET_ACCESS_KEY,
    )
    return runtime.converse(modelId=model, messages=[{"role": "user", "content": [{"text": text}]}],
                            inferenceConfig={"maxTokens": max_tokens})




# -- OpenAI clients served by Anthropic -------------------------------------------------


def test_openai_sdk_json_served_by_anthropic_with_exact_usage(
    client: openai.OpenAI, providers: RunningGateway, sim: SimServer
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="claude-sonnet-4", messages=[{"role": "system", "content": "Be brief."}, *USER], max_tokens=12,
        extra_headers={"x-request-id": "ant-json-1", "x-sim-cached-tokens": "3", "x-sim-cache-creation-tokens": "2"},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert "x-ai-eg-backend" not in raw.headers  # the internal header never reaches the client

    sent = sim.requests[-1]
    assert sent.path == "/anthropic-proxy/v1/messages"
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY and sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers  # the client's own key stays at the gateway
    assert sent.json["system"] and sent.json["max_tokens"] == 12 and sent.json["model"] == "claude-sonnet-4"

    direct = _direct_anthropic(
        sim, model="claude-sonnet-4", system="Be brief.", messages=USER, max_tokens=12,
        extra_headers={"x-sim-cached-tokens": "3", "x-sim-cache-creation-tokens": "2"},
    )
    whole_prompt = direct.usage.input_tokens + 3 + 2
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == whole_prompt
    assert completion.usage.completion_tokens == direct.usage.output_tokens
    entry = _entry(providers, "ant-json-1")
    assert _tokens(entry) == (whole_prompt, direct.usage.output_tokens, whole_prompt + direct.usage.output_tokens)
    assert int(entry["cached_input_tokens"]) == 3 and int(entry["cache_creation_input_tokens"]) == 2
    assert entry["backend_name"] == "claude" and entry["status"] == 200


def test_openai_sdk_stream_served_by_anthropic(client: openai.OpenAI, providers: RunningGateway, sim: SimServer) -> None:
    chunks = list(client.chat.completions.create(
        model="claude-haiku", messages=USER, max_tokens=20, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-request-id": "ant-stream-1", "x-sim-chunks": "5"},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    direct = _direct_anthropic(sim, model="claude-haiku", messages=USER, max_tokens=20)
    assert text == "".join(b.text for b in direct.content if b.type == "text")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == direct.usage.output_tokens
    entry = _entry(providers, "ant-stream-1")
    assert _tokens(entry)[:2] == (direct.usage.input_tokens, direct.usage.output_tokens)
    assert float(entry["ttft_ms"]) > 0


def test_stream_without_usage_asked_still_accounts_and_hides_usage(
    client: openai.OpenAI, providers: RunningGateway
) -> None:
    chunks = list(client.chat.completions.create(
        model="claude-haiku", messages=USER, max_tokens=10, stream=True, extra_headers={"x-request-id": "ant-stream-2"},
    ))
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    entry = _entry(providers, "ant-stream-2")
    assert int(entry["output_tokens"]) > 0


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_through_anthropic(client: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    if stream:
        chunks = list(client.chat.completions.create(
            model="claude-sonnet-4", messages=messages, tools=[WEATHER_TOOL], max_tokens=64, stream=True))
        calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
        name = next(t.function.name for t in calls if t.function and t.function.name)
        arguments = "".join(t.function.arguments or "" for t in calls if t.function)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["tool_calls"]
    else:
        completion = client.chat.completions.create(
            model="claude-sonnet-4", messages=messages, tools=[WEATHER_TOOL], max_tokens=64)
        call = completion.choices[0].message.tool_calls[0]
        name, arguments = call.function.name, call.function.arguments
        assert completion.choices[0].finish_reason == "tool_calls"
    assert name == "get_weather"
    assert isinstance(json.loads(arguments), dict)


def test_anthropic_error_is_translated_to_openai_shape(client: openai.OpenAI, providers: RunningGateway) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="claude-haiku", messages=USER,
                                       extra_headers={"x-sim-error": "429", "x-request-id": "ant-429"})
    body = info.value.body
    assert isinstance(body, dict) and body.get("code") == "rate_limit_exceeded" and body.get("message")
    entry = _entry(providers, "ant-429")
    assert entry["status"] == 429 and entry["input_tokens"] in (None, "-", "")


# -- Anthropic clients, natively -----------------------------------------------------------


def test_anthropic_sdk_native_json_and_stream(providers: RunningGateway, sim: SimServer) -> None:
    gateway = anthropic.Anthropic(base_url=f"{providers.url}/anthropic", api_key=CLIENT_KEY, max_retries=0)
    message = gateway.messages.create(
        model="claude-opus", max_tokens=16, messages=USER,
        extra_headers={"x-request-id": "native-1", "x-sim-cached-tokens": "4"},
    )
    assert message.type == "message" and message.content[0].type == "text"
    sent = sim.requests[-1]
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY and "authorization" not in sent.headers
    entry = _entry(providers, "native-1")
    usage = message.usage
    assert int(entry["input_tokens"]) == usage.input_tokens + 4
    assert int(entry["cached_input_tokens"]) == 4 and int(entry["output_tokens"]) == usage.output_tokens

    with gateway.messages.stream(model="claude-opus", max_tokens=16, messages=USER,
                                 extra_headers={"x-request-id": "native-2"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(b.text for b in final.content if b.type == "text")
    entry = _entry(providers, "native-2")
    assert (int(entry["input_tokens"]), int(entry["output_tokens"])) == (
        final.usage.input_tokens, final.usage.output_tokens)


def test_anthropic_sdk_errors_come_in_anthropic_shape(providers: RunningGateway) -> None:
    gateway = anthropic.Anthropic(base_url=f"{providers.url}/anthropic", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:  # an Azure model, translated: no extended thinking
        gateway.messages.create(model="azure-gpt", max_tokens=64, messages=USER,
                                thinking={"type": "enabled", "budget_tokens": 32})
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        gateway.messages.create(model="no-such-model", max_tokens=8, messages=USER)
    with pytest.raises(anthropic.BadRequestError):
        gateway.messages.create(model="claude-opus", max_tokens=8, messages="not a list")  # type: ignore[arg-type]


# -- Bedrock --------------------------------------------------------------------------------


def test_openai_sdk_served_by_bedrock_signed_and_exact(
    client: openai.OpenAI, providers: RunningGateway, sim: SimServer
) -> None:
    model = "anthropic.claude-3-haiku-20240307-v1:0"
    completion = client.chat.completions.create(
        model=model, messages=USER, max_tokens=12, extra_headers={"x-request-id": "br-json-1"})
    sent = sim.requests[-1]
    assert sent.path.endswith("/converse") and sent.headers["authorization"].startswith("AWS4-HMAC-SHA256 ")
    direct = _direct_bedrock(sim, model, USER[0]["content"], 12)
    assert completion.choices[0].message.content == direct["output"]["message"]["content"][0]["text"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == direct["usage"]["inputTokens"]
    assert completion.usage.completion_tokens == direct["usage"]["outputTokens"]
    entry = _entry(providers, "br-json-1")
    assert _tokens(entry)[:2] == (direct["usage"]["inputTokens"], direct["usage"]["outputTokens"])
    assert entry["backend_name"] == "bedrock"


def test_bedrock_stream_and_tool_call(client: openai.OpenAI, providers: RunningGateway, sim: SimServer) -> None:
    model = "anthropic.claude-3-haiku-20240307-v1:0"
    chunks = list(client.chat.completions.create(
        model=model, messages=USER, max_tokens=12, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-request-id": "br-stream-1"}))
    assert sim.requests[-1].path.endswith("/converse-stream")
    direct = _direct_bedrock(sim, model, USER[0]["content"], 12)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct["output"]["message"]["content"][0]["text"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == direct["usage"]["outputTokens"]
    entry = _entry(providers, "br-stream-1")
    assert _tokens(entry)[:2] == (direct["usage"]["inputTokens"], direct["usage"]["outputTokens"])

    tool_chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "weather in Oslo?"}], tools=[WEATHER_TOOL],
        max_tokens=64, stream=True))
    calls = [t for c in tool_chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert any(t.function and t.function.name == "get_weather" for t in calls)
    assert json.loads("".join(t.function.arguments or "" for t in calls if t.function))


def test_bedrock_mid_stream_exception_reaches_the_client_as_an_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(
            model="anthropic.claude-3-haiku-20240307-v1:0", messages=USER, max_tokens=12, stream=True,
            extra_headers={"x-sim-stream-exception": "throttlingException"}))


# -- Azure ---------------------------------------------------------------------------------


def test_azure_deployment_path_and_api_key(client: openai.OpenAI, providers: RunningGateway, sim: SimServer) -> None:
    completion = client.chat.completions.create(model="azure-gpt", messages=USER, max_tokens=5,
                                                extra_headers={"x-request-id": "az-1"})
    sent = sim.requests[-1]
    assert sent.path == "/openai/deployments/azure-gpt/chat/completions"
    assert sent.query == "api-version=2024-10-21"
    assert sent.headers["api-key"] == AZURE_KEY and "authorization" not in sent.headers
    entry = _entry(providers, "az-1")
    assert completion.usage is not None and int(entry["output_tokens"]) == completion.usage.completion_tokens


# -- fallback ------------------------------------------------------------------------------


def test_fallback_from_a_failing_openai_backend_to_anthropic(
    client: openai.OpenAI, providers: RunningGateway, sim: SimServer
) -> None:
    completion = client.chat.completions.create(model="resilient", messages=USER, max_tokens=9,
                                                extra_headers={"x-request-id": "fb-1"})
    assert completion.choices[0].message.content
    first, second = sim.requests[-2], sim.requests[-1]
    assert first.path.endswith("/chat/completions") and first.json["model"] == "sim-error-503"
    assert second.path == "/v1/messages" and second.json["model"] == "claude-fallback-target"
    assert second.headers["x-api-key"] == ANTHROPIC_KEY
    entry = _entry(providers, "fb-1")
    assert entry["backend_name"] == "claude-for-fallback" and entry["status"] == 200
    assert entry["model_name_override"] == "claude-fallback-target"
    assert int(entry["output_tokens"]) == completion.usage.completion_tokens  # type: ignore[union-attr]
    served = providers.metric_sum("gen_ai_client_token_usage", "_count", gen_ai_request_model="claude-fallback-target",
                         gen_ai_provider_name="anthropic", gen_ai_token_type="output")
    assert served >= 1


def test_fallback_from_a_closed_port_to_bedrock_streaming(client: openai.OpenAI, providers: RunningGateway) -> None:
    chunks = list(client.chat.completions.create(
        model="resilient-bedrock", messages=USER, max_tokens=8, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-request-id": "fb-2"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entry = _entry(providers, "fb-2")
    assert entry["backend_name"] == "bedrock"
    assert int(entry["output_tokens"]) == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]


def test_provider_credentials_never_reach_the_client_or_the_log(
    client: openai.OpenAI, providers: RunningGateway
) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="claude-haiku", messages=USER, extra_headers={"x-sim-error": "401"})
    output = "\n".join(providers.stdout_lines + providers.stderr_lines) + str(info.value.body)
    for secret in (ANTHROPIC_KEY, AZURE_KEY, SIM_AWS_SECRET_ACCESS_KEY):
        assert secret not in output


def test_unsupported_api_for_a_translated_backend_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="claude-embed", input="hi")
    assert "embeddings" in str(info.value)



def test_anthropic_sdk_on_azure_openai(providers: RunningGateway, sim: SimServer) -> None:
    gateway = anthropic.Anthropic(base_url=f"{providers.url}/anthropic", api_key=CLIENT_KEY, max_retries=0)
    message = gateway.messages.create(model="azure-gpt", max_tokens=10, messages=USER,
                                      extra_headers={"x-request-id": "az-anthropic-1"})
    sent = sim.requests[-1]
    assert sent.path == "/openai/deployments/azure-gpt/chat/completions"
    assert sent.query == "api-version=2024-10-21" and sent.headers["api-key"] == AZURE_KEY
    assert sent.json["max_completion_tokens"] == 10  # Azure: the field its reasoning models take
    assert message.content[0].type == "text" and message.content[0].text
    entry = _entry(providers, "az-anthropic-1")
    assert (int(entry["input_tokens"]), int(entry["output_tokens"])) == (
        message.usage.input_tokens, message.usage.output_tokens)
    assert entry["backend_name"] == "azure"
