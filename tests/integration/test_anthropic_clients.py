"""The anthropic SDK against models served by OpenAI and Bedrock backends, through real Envoy.

The client is the official anthropic SDK (base URL: the gateway's /anthropic); the
upstream is extproc.sim speaking OpenAI's chat API and Bedrock's Converse (SigV4
checked). Expected replies and token counts come from asking the simulator directly
with the provider's own client (openai SDK, boto3), so "exact" means what the provider
reported, as Anthropic would count it: input_tokens without the cache reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import boto3
import openai
import pytest
from google import genai
from google.genai import types

from extproc.sim import SimServer
from extproc.sim.bedrock_api import SIM_AWS_ACCESS_KEY_ID, SIM_AWS_SECRET_ACCESS_KEY
from tests.integration.harness import RunningGateway, running_gateway

OPENAI_KEY = "sk-openai-backend-31cd"
CLIENT_KEY = "sk-client-of-the-gateway"
GEMINI_KEY = "AIza-gemini-backend-77"
BEDROCK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
USER = [{"role": "user", "content": "Tell me about the sea"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = {
        "backends": [
            {"name": "oa", "schema": "openai", "base_url": sim.base_url, "api_key": {"env": "T_OPENAI_KEY"}},
            {"name": "bedrock", "schema": "aws_bedrock", "base_url": sim.url,
             "aws": {"region": "us-east-1", "access_key_id": {"env": "T_AWS_AK"},
                     "secret_access_key": {"env": "T_AWS_SK"}}},
            {"name": "gem", "schema": "gemini", "base_url": f"{sim.url}/v1beta", "api_key": {"env": "T_GEMINI_KEY"}},
            # Always 503 (the simulator fails models named sim-error-NNN): a backend that is down.
            {"name": "failing", "schema": "openai", "base_url": sim.base_url, "model_name_override": "sim-error-503"},
        ],
        "routes": [
            {"name": "gpt", "match": {"glob": "gpt-*"}, "backends": [{"name": "oa"}]},
            {"name": "bedrock", "match": {"prefix": "anthropic."}, "backends": [{"name": "bedrock"}]},
            {"name": "gemini", "match": {"glob": "gemini-*"}, "backends": [{"name": "gem"}]},
            {"name": "resilient", "match": {"model": "resilient-any"},
             "backends": [{"name": "failing"}, {"name": "bedrock", "priority": 1}]},
        ],
    }
    env = {"T_GEMINI_KEY": GEMINI_KEY, "T_OPENAI_KEY": OPENAI_KEY, "T_AWS_AK": SIM_AWS_ACCESS_KEY_ID, "T_AWS_SK": SIM_AWS_SECRET_ACCESS_KEY}
    with running_gateway(config, tmp_path_factory.mktemp("anthropic-clients"), env=env) as running:
        yield running


@pytest.fixture
def client(gateway: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=CLIENT_KEY, max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def _fresh(sim: SimServer) -> None:
    sim.clear()


def _entry(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    return gateway.wait_access_log(lambda e: e.get("request_id") == request_id)


def _tokens(entry: dict[str, Any]) -> tuple[int, int, int]:
    return int(entry["input_tokens"]), int(entry["output_tokens"]), int(entry["total_tokens"])


def _direct_chat(sim: SimServer, model: str, **kwargs: Any) -> openai.types.chat.ChatCompletion:
    """What the OpenAI-shaped provider itself reports (the simulator is deterministic)."""
    direct = openai.OpenAI(base_url=sim.base_url, api_key="direct", max_retries=0)
    return direct.chat.completions.create(model=model, **kwargs)


def _direct_bedrock(sim: SimServer, text: str, max_tokens: int) -> dict[str, Any]:
    runtime = boto3.client(
        "bedrock-runtime", endpoint_url=sim.url, region_name="us-east-1",
        aws_access_key_id=SIM_AWS_ACCESS_KEY_ID, aws_secret_access_key=SIM_AWS_SECRET_ACCESS_KEY,
    )
    return runtime.converse(modelId=BEDROCK_MODEL, messages=[{"role": "user", "content": [{"text": text}]}],
                            inferenceConfig={"maxTokens": max_tokens})




def _texts(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# -- an OpenAI backend ---------------------------------------------------------------------------


def test_message_from_an_openai_backend_with_exact_usage(
    client: anthropic.Anthropic, gateway: RunningGateway, sim: SimServer
) -> None:
    raw = client.messages.with_raw_response.create(
        model="gpt-json", system="Be brief.", messages=USER, max_tokens=12, stop_sequences=["\n\n\n"],
        metadata={"user_id": "user-7"},
        extra_headers={"x-request-id": "oa-json-1", "x-sim-cached-tokens": "3"},
    )
    message = raw.parse()
    assert "x-ai-eg-backend" not in raw.headers

    sent = sim.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}" and "x-api-key" not in sent.headers
    assert sent.json["messages"] == [{"role": "system", "content": "Be brief."}, *USER]
    assert sent.json["max_tokens"] == 12 and sent.json["stop"] == ["\n\n\n"] and sent.json["user"] == "user-7"

    direct = _direct_chat(sim, "gpt-json", messages=[{"role": "system", "content": "Be brief."}, *USER],
                          max_tokens=12, extra_headers={"x-sim-cached-tokens": "3"})
    assert direct.usage is not None
    assert message.type == "message" and message.role == "assistant" and message.model == "gpt-json"
    assert _texts(message) == direct.choices[0].message.content
    assert message.stop_reason == "max_tokens"  # the simulator's "length"
    # Anthropic's counting: input_tokens without the cache reads, which are reported apart.
    assert message.usage.input_tokens == direct.usage.prompt_tokens - 3
    assert message.usage.cache_read_input_tokens == 3
    assert message.usage.output_tokens == direct.usage.completion_tokens

    entry = _entry(gateway, "oa-json-1")
    prompt, completion = direct.usage.prompt_tokens, direct.usage.completion_tokens
    assert _tokens(entry) == (prompt, completion, prompt + completion)  # the gateway's: the whole prompt
    assert int(entry["cached_input_tokens"]) == 3
    assert entry["backend_name"] == "oa" and entry["status"] == 200
    assert gateway.metric_sum("gen_ai_client_token_usage", "_sum", gen_ai_request_model="gpt-json",
                       gen_ai_provider_name="openai", gen_ai_token_type="input") == prompt
    assert gateway.metric_sum("gen_ai_client_token_usage", "_sum", gen_ai_request_model="gpt-json",
                       gen_ai_provider_name="openai", gen_ai_token_type="output") == completion


def test_stream_from_an_openai_backend_with_exact_usage(
    client: anthropic.Anthropic, gateway: RunningGateway, sim: SimServer
) -> None:
    with client.messages.stream(model="gpt-stream", max_tokens=20, messages=USER,
                                extra_headers={"x-request-id": "oa-stream-1", "x-sim-chunks": "5"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    sent = sim.requests[-1]
    assert sent.json["stream"] is True and sent.json["stream_options"] == {"include_usage": True}

    direct = _direct_chat(sim, "gpt-stream", messages=USER, max_tokens=20)
    assert direct.usage is not None
    assert text == direct.choices[0].message.content == _texts(final)
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        direct.usage.prompt_tokens, direct.usage.completion_tokens)
    entry = _entry(gateway, "oa-stream-1")
    assert _tokens(entry)[:2] == (direct.usage.prompt_tokens, direct.usage.completion_tokens)
    assert float(entry["ttft_ms"]) > 0


def test_openai_backend_error_is_the_anthropic_sdks_own_exception(
    client: anthropic.Anthropic, gateway: RunningGateway
) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="gpt-json", max_tokens=8, messages=USER,
                               extra_headers={"x-sim-error": "429", "x-request-id": "oa-429"})
    assert info.value.status_code == 429
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["message"]
    entry = _entry(gateway, "oa-429")
    assert entry["status"] == 429 and entry["input_tokens"] in (None, "-", "")

    with pytest.raises(anthropic.RateLimitError), client.messages.stream(
            model="gpt-stream", max_tokens=8, messages=USER, extra_headers={"x-sim-error": "429"}) as stream:
        stream.get_final_message()

    with pytest.raises(anthropic.InternalServerError) as server_error:
        client.messages.create(model="gpt-json", max_tokens=8, messages=USER, extra_headers={"x-sim-error": "500"})
    assert server_error.value.status_code == 500 and server_error.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_what_the_backend_cannot_express_is_an_anthropic_400(
    client: anthropic.Anthropic, gateway: RunningGateway, sim: SimServer
) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="gpt-json", max_tokens=64, messages=USER,
                               thinking={"type": "enabled", "budget_tokens": 32},
                               extra_headers={"x-request-id": "oa-400"})
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "thinking" in body["error"]["message"]
    assert sim.requests == []  # refused before it cost a backend call
    assert _entry(gateway, "oa-400")["status"] == 400


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_round_trip_on_an_openai_backend(
    client: anthropic.Anthropic, gateway: RunningGateway, sim: SimServer, stream: bool
) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    request_id = f"oa-tool-{stream}"
    kwargs: Any = {"model": "gpt-tools", "max_tokens": 64, "messages": [question], "tools": [WEATHER_TOOL],
                   "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
                   "extra_headers": {"x-request-id": request_id}}
    if stream:
        with client.messages.stream(**kwargs) as events:
            first = events.get_final_message()
    else:
        first = client.messages.create(**kwargs)
    sent = sim.requests[-1].json
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER_TOOL["input_schema"]}}]
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False
    assert first.stop_reason == "tool_use" and first.content[0].type == "text"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("call_")
    entry = _entry(gateway, request_id)
    assert (int(entry["input_tokens"]), int(entry["output_tokens"])) == (
        first.usage.input_tokens, first.usage.output_tokens)

    answer = client.messages.create(
        model="gpt-tools", max_tokens=32, tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=[question, {"role": "assistant", "content": [b.model_dump() for b in first.content]},  # type: ignore[misc]
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]}],
    )
    assert answer.stop_reason == "max_tokens" and _texts(answer)  # the simulator caps at max_tokens
    sent = sim.requests[-1].json["messages"]
    assert sent[1]["tool_calls"] == [{"id": use.id, "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert sent[2] == {"role": "tool", "tool_call_id": use.id, "content": "Sunny"}


# -- a Bedrock backend -----------------------------------------------------------------------------


def test_message_and_stream_from_bedrock_with_exact_usage(
    client: anthropic.Anthropic, gateway: RunningGateway, sim: SimServer
) -> None:
    message = client.messages.create(model=BEDROCK_MODEL, max_tokens=12, messages=USER,
                                     extra_headers={"x-request-id": "br-json-1"})
    sent = sim.requests[-1]
    assert sent.path.endswith("/converse") and sent.headers["authorization"].startswith("AWS4-HMAC-SHA256 ")
    direct = _direct_bedrock(sim, USER[0]["content"], 12)
    assert _texts(message) == direct["output"]["message"]["content"][0]["text"]
    assert message.stop_reason == direct["stopReason"]  # both end_turn / max_tokens
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        direct["usage"]["inputTokens"], direct["usage"]["outputTokens"])
    entry = _entry(gateway, "br-json-1")
    assert _tokens(entry)[:2] == (direct["usage"]["inputTokens"], direct["usage"]["outputTokens"])
    assert entry["backend_name"] == "bedrock"

    with client.messages.stream(model=BEDROCK_MODEL, max_tokens=12, messages=USER,
                                extra_headers={"x-request-id": "br-stream-1", "x-sim-chunks": "4",
                                               "x-sim-cached-tokens": "2"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert sim.requests[-1].path.endswith("/converse-stream")
    assert text == _texts(final) == direct["output"]["message"]["content"][0]["text"]
    assert final.usage.cache_read_input_tokens == 2
    assert final.usage.input_tokens == direct["usage"]["inputTokens"] - 2
    assert final.usage.output_tokens == direct["usage"]["outputTokens"]
    entry = _entry(gateway, "br-stream-1")
    assert _tokens(entry)[:2] == (direct["usage"]["inputTokens"], direct["usage"]["outputTokens"])
    assert int(entry["cached_input_tokens"]) == 2
    assert gateway.metric_sum("gen_ai_client_token_usage", "_sum", gen_ai_request_model=BEDROCK_MODEL,
                       gen_ai_provider_name="aws.bedrock", gen_ai_token_type="output") == 2 * direct["usage"][
                           "outputTokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_round_trip_on_bedrock(client: anthropic.Anthropic, sim: SimServer, stream: bool) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    if stream:
        with client.messages.stream(model=BEDROCK_MODEL, max_tokens=64, messages=[question],
                                    tools=[WEATHER_TOOL]) as events:  # type: ignore[list-item]
            first = events.get_final_message()
    else:
        first = client.messages.create(model=BEDROCK_MODEL, max_tokens=64, messages=[question],
                                       tools=[WEATHER_TOOL])  # type: ignore[list-item]
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input, dict) and use.id
    assert sim.requests[-1].json["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"

    answer = client.messages.create(
        model=BEDROCK_MODEL, max_tokens=32, tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=[question, {"role": "assistant", "content": [b.model_dump() for b in first.content]},  # type: ignore[misc]
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21C"}]}],
    )
    assert answer.stop_reason in ("end_turn", "max_tokens") and _texts(answer)
    sent = sim.requests[-1].json["messages"]
    assert sent[1]["content"][-1]["toolUse"] == {"toolUseId": use.id, "name": "get_weather", "input": use.input}
    result = sent[2]["content"][0]["toolResult"]
    assert result["toolUseId"] == use.id and result["content"] == [{"text": "Sunny, 21C"}]


def test_bedrock_error_is_the_anthropic_sdks_own_exception(client: anthropic.Anthropic, gateway: RunningGateway) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model=BEDROCK_MODEL, max_tokens=8, messages=USER,
                               extra_headers={"x-sim-error": "429", "x-request-id": "br-429"})
    body = info.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "rate_limit_error" and body["error"]["message"]
    assert _entry(gateway, "br-429")["status"] == 429


# -- fallback across schemas ---------------------------------------------------------------------


def test_fallback_from_an_openai_backend_to_bedrock_translates_each_attempt(
    client: anthropic.Anthropic, gateway: RunningGateway, sim: SimServer
) -> None:
    message = client.messages.create(model="resilient-any", max_tokens=9, messages=USER,
                                     extra_headers={"x-request-id": "fb-any-1"})
    first, second = sim.requests[-2], sim.requests[-1]
    assert first.path == "/v1/chat/completions" and first.json["model"] == "sim-error-503"
    assert first.json["messages"] == USER and first.headers.get("authorization") is None  # no key configured
    assert second.path.endswith("/converse") and second.headers["authorization"].startswith("AWS4-HMAC-SHA256 ")
    assert message.content[0].type == "text" and message.content[0].text
    entry = _entry(gateway, "fb-any-1")
    assert entry["backend_name"] == "bedrock" and entry["status"] == 200
    assert (int(entry["input_tokens"]), int(entry["output_tokens"])) == (
        message.usage.input_tokens, message.usage.output_tokens)


# -- a Gemini backend (the same chat translator OpenAI clients use, composed) -----------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_message_and_stream_from_gemini_with_exact_usage(
    client: anthropic.Anthropic, gateway: RunningGateway, sim: SimServer, stream: bool
) -> None:
    request_id = f"gemini-{'stream' if stream else 'json'}"
    kwargs: dict[str, Any] = {"model": "gemini-2.5-flash", "messages": USER, "max_tokens": 40,
                              "extra_headers": {"x-request-id": request_id}}
    if stream:
        with client.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**kwargs)

    sent = sim.requests[-1]
    suffix = ":streamGenerateContent" if stream else ":generateContent"
    assert sent.path == f"/v1beta/models/gemini-2.5-flash{suffix}"
    assert sent.headers["x-goog-api-key"] == GEMINI_KEY and CLIENT_KEY not in str(sent.headers)

    direct = genai.Client(api_key="direct", http_options=types.HttpOptions(base_url=sim.url, api_version="v1beta"))
    expected = direct.models.generate_content(
        model="gemini-2.5-flash", contents=USER[0]["content"], config=types.GenerateContentConfig(max_output_tokens=40))
    usage = expected.usage_metadata
    assert usage is not None and usage.prompt_token_count and usage.candidates_token_count
    assert _texts(message) == expected.text
    assert message.usage.input_tokens == usage.prompt_token_count
    output = usage.candidates_token_count + (usage.thoughts_token_count or 0)
    assert message.usage.output_tokens == output
    entry = _entry(gateway, request_id)
    assert entry["backend_name"] == "gem" and entry["status"] == 200
    assert _tokens(entry) == (usage.prompt_token_count, output, usage.prompt_token_count + output)


def test_gemini_error_is_the_anthropic_sdks_own_exception(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="gemini-2.5-flash", messages=USER, max_tokens=10,
                               extra_headers={"x-sim-error": "429"})
    assert info.value.status_code == 429 and info.value.body["type"] == "error"
