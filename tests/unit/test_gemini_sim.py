"""extproc.sim.gemini_api checked against the official google-genai SDK (the wire-format
oracle): the paths, key header and bodies the SDK sends are accepted, and what the
simulator answers parses into the SDK's own types and exceptions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types

from extproc.sim import SimServer, gemini_api
from extproc.sim import text as simtext

PROMPT = "Why is the sky blue?"
# 4 overhead + "Why is the sky blue ?" (6) = 10; the system instruction "Be terse" adds 2
PROMPT_TOKENS = 10


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(chunks=4) as server:
        yield server


@pytest.fixture
def client(sim: SimServer) -> genai.Client:
    sim.clear()
    return genai.Client(api_key="sim-key", http_options=types.HttpOptions(base_url=sim.url))


def _headers(**headers: str) -> types.HttpOptions:
    return types.HttpOptions(headers=headers)


def test_text_reply_with_exact_usage(client: genai.Client, sim: SimServer) -> None:
    response = client.models.generate_content(
        model="gemini-2.0-flash", contents=PROMPT,
        config=types.GenerateContentConfig(system_instruction="Be terse", max_output_tokens=50),
    )
    assert response.text == simtext.reply_text(PROMPT, simtext.DEFAULT_REPLY_TOKENS)
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == PROMPT_TOKENS + 2
    assert usage.candidates_token_count == simtext.DEFAULT_REPLY_TOKENS
    assert usage.total_token_count == PROMPT_TOKENS + 2 + simtext.DEFAULT_REPLY_TOKENS
    assert response.model_version == "gemini-2.0-flash"
    sent = sim.requests[-1]
    assert sent.path.endswith("/models/gemini-2.0-flash:generateContent")
    assert sent.headers["x-goog-api-key"] == "sim-key"


def test_max_output_tokens_cuts_with_max_tokens(client: genai.Client) -> None:
    response = client.models.generate_content(
        model="gemini-2.0-flash", contents=PROMPT, config=types.GenerateContentConfig(max_output_tokens=5))
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.usage_metadata and response.usage_metadata.candidates_token_count == 5


def test_cached_and_thinking_knobs(client: genai.Client) -> None:
    response = client.models.generate_content(
        model="gemini-2.5-flash", contents=PROMPT,
        config=types.GenerateContentConfig(http_options=_headers(**{"x-sim-cached-tokens": "4",
                                                                    "x-sim-reasoning-tokens": "7"})))
    usage = response.usage_metadata
    assert usage is not None
    assert usage.cached_content_token_count == 4 and usage.thoughts_token_count == 7
    assert usage.total_token_count == PROMPT_TOKENS + simtext.DEFAULT_REPLY_TOKENS + 7


def test_stream_pieces_join_to_the_json_reply(client: genai.Client, sim: SimServer) -> None:
    chunks = list(client.models.generate_content_stream(model="gemini-2.0-flash", contents=PROMPT))
    assert len(chunks) == 4
    assert "".join(c.text or "" for c in chunks) == simtext.reply_text(PROMPT, simtext.DEFAULT_REPLY_TOKENS)
    assert sim.requests[-1].path.endswith(":streamGenerateContent") and sim.requests[-1].query == "alt=sse"
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata and last.usage_metadata.candidates_token_count == simtext.DEFAULT_REPLY_TOKENS
    assert all(c.candidates and c.candidates[0].finish_reason is None for c in chunks[:-1])


def get_weather(city: str) -> str:
    """Weather for a city."""
    return f"sunny in {city}"


def test_function_call_and_its_response(client: genai.Client) -> None:
    config = types.GenerateContentConfig(
        tools=[get_weather], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
    response = client.models.generate_content(model="gemini-2.0-flash", contents="weather in Paris?", config=config)
    assert response.function_calls and response.function_calls[0].name == "get_weather"
    assert response.function_calls[0].args == {"city": "Paris"}
    # The SDK's own loop sends the result back; the reply is then text.
    auto = client.models.generate_content(
        model="gemini-2.0-flash", contents="weather in Paris?", config=types.GenerateContentConfig(tools=[get_weather]))
    assert auto.text and not auto.function_calls


def test_forced_call_names_the_allowed_function(client: genai.Client) -> None:
    tool = types.Tool(function_declarations=[
        types.FunctionDeclaration(name="a", description="first", parameters=types.Schema(
            type=types.Type.OBJECT, properties={"n": types.Schema(type=types.Type.INTEGER)})),
        types.FunctionDeclaration(name="b", description="second"),
    ])
    config = types.GenerateContentConfig(tools=[tool], tool_config=types.ToolConfig(
        function_calling_config=types.FunctionCallingConfig(mode=types.FunctionCallingConfigMode.ANY,
                                                            allowed_function_names=["a"])))
    response = client.models.generate_content(model="gemini-2.0-flash", contents="hello", config=config)
    assert response.function_calls and response.function_calls[0].name == "a"
    assert response.function_calls[0].args == {"n": 1}


def test_embeddings_batch_and_dimensions(client: genai.Client, sim: SimServer) -> None:
    result = client.models.embed_content(model="text-embedding-004", contents=["alpha", "beta"],
                                         config=types.EmbedContentConfig(output_dimensionality=8))
    assert result.embeddings and len(result.embeddings) == 2
    assert result.embeddings[0].values == simtext.embedding_vector("alpha", 8)
    assert sim.requests[-1].path.endswith("/models/text-embedding-004:batchEmbedContents")


def test_count_tokens_and_models(client: genai.Client) -> None:
    assert client.models.count_tokens(model="gemini-2.0-flash", contents=PROMPT).total_tokens == PROMPT_TOKENS
    assert "models/gemini-2.0-flash" in [m.name for m in client.models.list()]


@pytest.mark.parametrize(("status", "exception", "name"), [
    (400, errors.ClientError, "INVALID_ARGUMENT"),
    (429, errors.ClientError, "RESOURCE_EXHAUSTED"),
    (503, errors.ServerError, "UNAVAILABLE"),
])
def test_errors_are_the_sdks_exceptions(client: genai.Client, status: int, exception: type[Exception], name: str) -> None:
    config = types.GenerateContentConfig(http_options=types.HttpOptions(
        headers={"x-sim-error": str(status)}, retry_options=types.HttpRetryOptions(attempts=1)))
    with pytest.raises(exception) as info:
        client.models.generate_content(model="gemini-2.0-flash", contents="x", config=config)
    error: Any = info.value
    assert error.code == status and error.status == name and "Simulated error" in error.message


def test_keys_are_checked(sim: SimServer) -> None:
    url = f"{sim.url}/v1beta/models/gemini-2.0-flash:generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    missing = httpx.post(url, json=body)
    assert missing.status_code == 403 and missing.json()["error"]["status"] == "PERMISSION_DENIED"
    bad = genai.Client(api_key="invalid-key", http_options=types.HttpOptions(base_url=sim.url))
    with pytest.raises(errors.ClientError) as info:
        bad.models.generate_content(model="gemini-2.0-flash", contents="x")
    assert info.value.code == 400 and "API key not valid" in (info.value.message or "")
    assert httpx.post(url + "?key=k", json=body).status_code == 200


@pytest.mark.parametrize(("body", "words"), [
    ({"contents": []}, "contents is not specified"),
    ({"contents": [{"role": "user", "parts": [{"text": "x"}]}], "generationConfig": {"topQ": 1}}, "Unknown name"),
    ({"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}]},
     "function response turn comes immediately after a function call turn"),
    ({"contents": [{"role": "user", "parts": [{"text": "x"}]}],
      "tools": [{"functionDeclarations": [{"name": "f", "parameters": {
          "type": "OBJECT", "properties": {"a": {"type": "STRING"}}, "additionalProperties": False}}]}]},
     'Unknown name "additionalProperties"'),
    ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "valid role"),
])
def test_validation_errors(sim: SimServer, body: dict[str, Any], words: str) -> None:
    reply = httpx.post(f"{sim.url}/v1beta/models/gemini-2.0-flash:generateContent", json=body,
                       headers={"x-goog-api-key": "k"})
    assert reply.status_code == 400 and words in reply.json()["error"]["message"]


def test_matches_only_gemini_paths() -> None:
    assert gemini_api.matches("/v1beta/models/gemini-2.0-flash:generateContent")
    assert gemini_api.matches("/prefix/v1/projects/p/locations/l/publishers/google/models/m:streamGenerateContent")
    assert gemini_api.matches("/v1beta/models")
    assert gemini_api.matches("/v1/models", {"x-goog-api-key": "k"})
    assert not gemini_api.matches("/v1/models")  # OpenAI's models list
    assert not gemini_api.matches("/v1/models/demo-model")
    assert not gemini_api.matches("/model/anthropic.claude-3:0/converse")


def test_gemini_3_signs_calls_and_wants_the_signature_back(client: genai.Client) -> None:
    config = types.GenerateContentConfig(tools=[get_weather])
    # The SDK's own loop replays the model's parts verbatim, signature included.
    assert client.models.generate_content(model="gemini-3-pro", contents="weather in Rome?", config=config).text
    call = types.Part(function_call=types.FunctionCall(name="get_weather", args={"city": "Rome"}))
    history = [
        types.Content(role="user", parts=[types.Part(text="weather in Rome?")]),
        types.Content(role="model", parts=[call]),
        types.Content(role="user", parts=[types.Part(function_response=types.FunctionResponse(
            name="get_weather", response={"result": "sunny"}))]),
    ]
    manual = types.GenerateContentConfig(tools=[get_weather], http_options=types.HttpOptions(
        retry_options=types.HttpRetryOptions(attempts=1)))
    with pytest.raises(errors.ClientError) as info:
        client.models.generate_content(model="gemini-3-pro", contents=history, config=manual)
    assert "missing a thought_signature" in (info.value.message or "")
    assert client.models.generate_content(model="gemini-2.5-flash", contents=history, config=manual).text
