"""The translator registry: every (client API, backend schema) pair the gateway serves,
and the client's error, in its own API's shape, for a pair nobody serves."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from extproc.client_apis import SPECS
from extproc.config import LoadedConfig, Schema, parse_config, resolve_secrets
from extproc.contract import ClientApi
from extproc.routing import BackendTarget
from extproc.runtime import Runtime
from extproc.schemas.forms import FormRequest, parse_form
from extproc.schemas.openai import RequestError
from extproc.schemas.anthropic import AnthropicRequestError
from extproc.translators import REGISTRY, Attempt, translator_for, unserved


def _targets() -> dict[Schema, BackendTarget]:
    config = parse_config({
        "backends": [
            {"name": "oa", "schema": "openai", "base_url": "https://api.openai.com/v1"},
            {"name": "az", "schema": "azure_openai", "base_url": "https://res.openai.azure.com",
             "api_version": "2024-10-21", "deployment": "gpt4o-prod"},
            {"name": "claude", "schema": "anthropic", "base_url": "https://api.anthropic.com/prefix"},
            {"name": "br", "schema": "aws_bedrock", "base_url": "https://bedrock-runtime.us-east-1.amazonaws.com",
             "aws": {"region": "us-east-1"}},
            {"name": "gem", "schema": "gemini", "base_url": "https://generativelanguage.googleapis.com/v1beta"},
            {"name": "vx", "schema": "gcp_vertex_ai", "vertex": {"project": "my-proj", "region": "us-east5"}},
        ],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "oa"}]}],
    })
    runtime = Runtime.build(LoadedConfig(config=config, source="t", secrets=resolve_secrets(config, {}, "t")))
    return {target.backend.schema_: target for target in runtime.router.targets.values()}


TARGETS = _targets()
CHAT = {"model": "client-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
BODIES: dict[ClientApi, dict[str, Any]] = {
    ClientApi.OPENAI_CHAT: CHAT,
    ClientApi.OPENAI_COMPLETIONS: {"model": "client-model", "prompt": "hi"},
    ClientApi.OPENAI_EMBEDDINGS: {"model": "client-model", "input": "hi"},
    ClientApi.OPENAI_RESPONSES: {"model": "client-model", "input": "hi"},
    ClientApi.ANTHROPIC_MESSAGES: CHAT,
    ClientApi.ANTHROPIC_COUNT_TOKENS: {"model": "client-model", "messages": [{"role": "user", "content": "hi"}]},
    ClientApi.OPENAI_IMAGES: {"model": "client-model", "prompt": "a cat"},
    ClientApi.OPENAI_SPEECH: {"model": "client-model", "input": "hi", "voice": "alloy"},
    ClientApi.RERANK: {"model": "client-model", "query": "q", "documents": ["a", "b"]},
    ClientApi.OPENAI_INPUT_TOKENS: {"model": "client-model", "input": "hi"},
}
FORM_APIS = (ClientApi.OPENAI_TRANSCRIPTIONS, ClientApi.OPENAI_TRANSLATIONS)
AZURE = "/openai/deployments/gpt4o-prod"
# (pair) -> (path, what the body must hold for the backend)
EXPECTED_PATHS = {
    (ClientApi.OPENAI_CHAT, Schema.openai): "/v1/chat/completions",
    (ClientApi.OPENAI_COMPLETIONS, Schema.openai): "/v1/completions",
    (ClientApi.OPENAI_EMBEDDINGS, Schema.openai): "/v1/embeddings",
    (ClientApi.OPENAI_RESPONSES, Schema.openai): "/v1/responses",
    (ClientApi.OPENAI_CHAT, Schema.azure_openai): "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
    (ClientApi.OPENAI_COMPLETIONS, Schema.azure_openai): "/openai/deployments/gpt4o-prod/completions?api-version=2024-10-21",
    (ClientApi.OPENAI_EMBEDDINGS, Schema.azure_openai): "/openai/deployments/gpt4o-prod/embeddings?api-version=2024-10-21",
    (ClientApi.ANTHROPIC_MESSAGES, Schema.anthropic): "/prefix/v1/messages",
    (ClientApi.OPENAI_CHAT, Schema.anthropic): "/prefix/v1/messages",
    (ClientApi.OPENAI_CHAT, Schema.aws_bedrock): "/model/backend-model/converse",
    (ClientApi.ANTHROPIC_MESSAGES, Schema.openai): "/v1/chat/completions",
    (ClientApi.ANTHROPIC_MESSAGES, Schema.azure_openai):
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
    (ClientApi.ANTHROPIC_MESSAGES, Schema.aws_bedrock): "/model/backend-model/converse",
    (ClientApi.OPENAI_CHAT, Schema.gemini): "/v1beta/models/backend-model:generateContent",
    (ClientApi.OPENAI_EMBEDDINGS, Schema.gemini): "/v1beta/models/backend-model:batchEmbedContents",
    (ClientApi.ANTHROPIC_MESSAGES, Schema.gemini): "/v1beta/models/backend-model:generateContent",
    (ClientApi.OPENAI_IMAGES, Schema.openai): "/v1/images/generations",
    (ClientApi.OPENAI_TRANSCRIPTIONS, Schema.openai): "/v1/audio/transcriptions",
    (ClientApi.OPENAI_TRANSLATIONS, Schema.openai): "/v1/audio/translations",
    (ClientApi.OPENAI_SPEECH, Schema.openai): "/v1/audio/speech",
    (ClientApi.RERANK, Schema.openai): "/v1/rerank",
    (ClientApi.OPENAI_INPUT_TOKENS, Schema.openai): "/v1/responses/input_tokens",
    (ClientApi.OPENAI_IMAGES, Schema.azure_openai): AZURE + "/images/generations?api-version=2024-10-21",
    (ClientApi.OPENAI_TRANSCRIPTIONS, Schema.azure_openai): AZURE + "/audio/transcriptions?api-version=2024-10-21",
    (ClientApi.OPENAI_TRANSLATIONS, Schema.azure_openai): AZURE + "/audio/translations?api-version=2024-10-21",
    (ClientApi.OPENAI_SPEECH, Schema.azure_openai): AZURE + "/audio/speech?api-version=2024-10-21",
    (ClientApi.ANTHROPIC_COUNT_TOKENS, Schema.anthropic): "/prefix/v1/messages/count_tokens",
    (ClientApi.ANTHROPIC_MESSAGES, Schema.gcp_vertex_ai):
        "/v1/projects/my-proj/locations/us-east5/publishers/anthropic/models/claude-backend@2025:rawPredict",
    (ClientApi.OPENAI_CHAT, Schema.gcp_vertex_ai):
        "/v1/projects/my-proj/locations/us-east5/publishers/anthropic/models/claude-backend@2025:rawPredict",
    (ClientApi.ANTHROPIC_COUNT_TOKENS, Schema.gcp_vertex_ai):
        "/v1/projects/my-proj/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict",
}
# The model each backend is asked for (Vertex serves Claude models as Anthropic's).
MODELS = {Schema.gcp_vertex_ai: "claude-backend@2025"}
# Same-API pairs whose backend takes the body in its own convention.
SENT_BODIES = {
    (ClientApi.ANTHROPIC_COUNT_TOKENS, Schema.gcp_vertex_ai): {
        **BODIES[ClientApi.ANTHROPIC_COUNT_TOKENS], "model": "claude-backend@2025",
        "anthropic_version": "vertex-2023-10-16"},
    (ClientApi.ANTHROPIC_MESSAGES, Schema.gcp_vertex_ai): {
        **{k: v for k, v in CHAT.items() if k != "model"}, "anthropic_version": "vertex-2023-10-16"},
}
FORM = (b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nclient-model\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        b'RIFF\x00\xff model \r\n--XyZ--\r\n')


def _attempt(client_api: ClientApi, schema: Schema, stream: bool = False, form: FormRequest | None = None,
             model: str | None = None) -> Attempt:
    return Attempt(TARGETS[schema], client_api, model or MODELS.get(schema, "backend-model"), stream,
                   include_usage=False, form=form)


def test_every_registered_pair_is_checked_here() -> None:
    assert set(REGISTRY) == set(EXPECTED_PATHS)


@pytest.mark.parametrize(("client_api", "schema"), sorted(p for p in EXPECTED_PATHS if p[0] not in FORM_APIS))
def test_each_pair_builds_the_backends_request(client_api: ClientApi, schema: Schema) -> None:
    body = BODIES[client_api]
    raw = orjson.dumps(body)
    translator = translator_for(_attempt(client_api, schema), body["model"])
    request = translator.request(body, raw)
    assert request.path == EXPECTED_PATHS[(client_api, schema)]
    sent = json.loads(request.body)
    if translator.translates_response:  # another API: a translated body, and the answer read back
        assert sent != body
        assert (translator.stream_translator() is not None) == SPECS[client_api].streams
    else:  # the same API: the client's body, with the backend's model name
        assert sent == SENT_BODIES.get((client_api, schema), {**body, "model": "backend-model"})
    assert ("content-type", b"application/json") in request.headers
    assert not any(name in ("authorization", "x-api-key", "api-key", "x-goog-api-key") for name, _ in request.headers)  # backend_auth's job


@pytest.mark.parametrize(("client_api", "schema"), sorted(p for p in EXPECTED_PATHS if p[0] in FORM_APIS))
def test_a_form_pair_replaces_only_the_model_value(client_api: ClientApi, schema: Schema) -> None:
    form = parse_form(FORM, "multipart/form-data; boundary=XyZ")
    translator = translator_for(_attempt(client_api, schema, form=form), form.model)
    request = translator.request(form.body, FORM)
    assert request.path == EXPECTED_PATHS[(client_api, schema)]
    assert request.body == FORM.replace(b"client-model", b"backend-model")
    assert request.headers == []  # the client's content-type (its boundary) goes on unchanged


def test_a_same_api_pair_sends_the_clients_bytes_when_the_model_is_unchanged() -> None:
    raw = b'{"model": "backend-model",  "input": "spacing kept"}'
    translator = translator_for(_attempt(ClientApi.OPENAI_EMBEDDINGS, Schema.openai), "backend-model")
    assert translator.request(json.loads(raw), raw).body is raw


def test_bedrock_streams_ask_for_the_event_stream() -> None:
    request = translator_for(_attempt(ClientApi.OPENAI_CHAT, Schema.aws_bedrock, stream=True), "m").request(CHAT, b"{}")
    assert request.path == "/model/backend-model/converse-stream"
    assert ("accept", b"application/vnd.amazon.eventstream") in request.headers


@pytest.mark.parametrize(("client_api", "schema", "error", "words"), [
    (ClientApi.OPENAI_EMBEDDINGS, Schema.anthropic, RequestError, "does not offer embeddings"),
    (ClientApi.OPENAI_RESPONSES, Schema.aws_bedrock, RequestError, "does not offer the Responses API"),
    (ClientApi.OPENAI_COMPLETIONS, Schema.aws_bedrock, RequestError, "does not offer legacy completions"),
    (ClientApi.OPENAI_COMPLETIONS, Schema.gemini, RequestError, "does not offer legacy completions; it serves chat"),
    (ClientApi.OPENAI_RESPONSES, Schema.azure_openai, RequestError, "does not offer the Responses API"),
    (ClientApi.RERANK, Schema.azure_openai, RequestError, "does not offer rerank"),
    (ClientApi.OPENAI_IMAGES, Schema.anthropic, RequestError, "does not offer image generation"),
    (ClientApi.OPENAI_TRANSCRIPTIONS, Schema.aws_bedrock, RequestError, "does not offer audio transcriptions"),
    (ClientApi.ANTHROPIC_COUNT_TOKENS, Schema.openai, AnthropicRequestError, "does not count tokens"),
    (ClientApi.OPENAI_EMBEDDINGS, Schema.gcp_vertex_ai, RequestError, "does not offer embeddings"),
])
def test_a_pair_nobody_serves_is_a_400_in_the_clients_api(
    client_api: ClientApi, schema: Schema, error: type[Exception], words: str
) -> None:
    with pytest.raises(error) as raised:
        translator_for(_attempt(client_api, schema), "client-model")
    assert raised.value.status == 400 and words in raised.value.message  # type: ignore[attr-defined]


def test_gemini_streams_ask_for_sse() -> None:
    request = translator_for(_attempt(ClientApi.OPENAI_CHAT, Schema.gemini, stream=True), "m").request(CHAT, b"{}")
    assert request.path == "/v1beta/models/backend-model:streamGenerateContent?alt=sse"


def test_translated_errors_come_back_in_openais_shape() -> None:
    translator = translator_for(_attempt(ClientApi.OPENAI_CHAT, Schema.anthropic), "m")
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
    error = json.loads(translator.whole_response(529, body, None))["error"]
    assert error["message"] == "busy" and error["type"] and "code" in error


def test_an_anthropic_client_on_a_schema_nobody_serves_gets_anthropics_400() -> None:
    error = unserved(ClientApi.ANTHROPIC_MESSAGES, TARGETS[Schema.openai], "client-model")
    assert isinstance(error, AnthropicRequestError)
    assert error.status == 400 and error.error_type == "invalid_request_error"


def test_anthropic_clients_reach_openai_backends_through_a_chat_request() -> None:
    body = {**CHAT, "stream": True, "stop_sequences": ["END"]}
    translator = translator_for(_attempt(ClientApi.ANTHROPIC_MESSAGES, Schema.openai, stream=True), "m")
    sent = json.loads(translator.request(body, orjson.dumps(body)).body)
    assert sent["model"] == "backend-model" and sent["messages"] == [{"role": "user", "content": "hi"}]
    # OpenAI's own API: max_completion_tokens (its reasoning models refuse max_tokens)
    assert sent["max_completion_tokens"] == 5 and "max_tokens" not in sent
    assert sent["stream_options"] == {"include_usage": True} and sent["stop"] == ["END"]


def test_anthropic_clients_on_bedrock_get_converse_and_anthropic_errors_back() -> None:
    translator = translator_for(_attempt(ClientApi.ANTHROPIC_MESSAGES, Schema.aws_bedrock), "m")
    sent = json.loads(translator.request(CHAT, orjson.dumps(CHAT)).body)
    assert sent["messages"] == [{"role": "user", "content": [{"text": "hi"}]}]
    assert sent["inferenceConfig"]["maxTokens"] == 5
    error = json.loads(translator.whole_response(429, b'{"message":"slow down"}', "ThrottlingException:http://x"))
    assert error == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}


def test_vertex_streams_use_stream_raw_predict() -> None:
    for client_api in (ClientApi.ANTHROPIC_MESSAGES, ClientApi.OPENAI_CHAT):
        body = {**CHAT, "stream": True}
        request = translator_for(_attempt(client_api, Schema.gcp_vertex_ai, stream=True), "m").request(body, b"{}")
        assert request.path.endswith("/publishers/anthropic/models/claude-backend@2025:streamRawPredict")
        sent = json.loads(request.body)
        assert sent["stream"] is True and "model" not in sent and sent["anthropic_version"] == "vertex-2023-10-16"


def test_anthropic_clients_reach_gemini_on_vertex_through_chat() -> None:
    attempt = _attempt(ClientApi.ANTHROPIC_MESSAGES, Schema.gcp_vertex_ai, model="gemini-2.5-flash")
    translator = translator_for(attempt, "m")
    request = translator.request(CHAT, orjson.dumps(CHAT))
    assert request.path.endswith("/publishers/google/models/gemini-2.5-flash:generateContent")
    assert json.loads(request.body)["generationConfig"]["maxOutputTokens"] == 5
    error = json.loads(translator.whole_response(
        429, b'{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}', None))
    assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"


def test_vertex_serves_other_models_as_googles_gemini() -> None:
    attempt = _attempt(ClientApi.OPENAI_CHAT, Schema.gcp_vertex_ai, stream=True, model="gemini-2.5-flash")
    request = translator_for(attempt, "m").request(CHAT, b"{}")
    assert request.path == ("/v1/projects/my-proj/locations/us-east5/publishers/google/models/"
                            "gemini-2.5-flash:streamGenerateContent?alt=sse")
    assert json.loads(request.body)["contents"][0]["role"] == "user"


def test_vertex_counts_tokens_for_claude_models_only() -> None:
    with pytest.raises(AnthropicRequestError) as raised:
        translator_for(_attempt(ClientApi.ANTHROPIC_COUNT_TOKENS, Schema.gcp_vertex_ai, model="gemini-2.5-flash"), "m")
    assert raised.value.status == 400 and "Claude models only" in raised.value.message
