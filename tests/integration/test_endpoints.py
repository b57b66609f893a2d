"""Images, audio, speech, rerank and token counts through real Envoy and the processor.

Clients are the official SDKs (openai, cohere, anthropic); the upstream is extproc.sim.
Each test checks what the user sees, what the provider was sent (its credentials, the
route's model, for multipart bodies the untouched file bytes), and the accounting:
exact tokens in the access log and metrics where the provider reports them, none
where it does not (whisper's seconds, dall-e, speech) or where the call is not
generation (token counts).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from typing import Any

import anthropic
import cohere
import httpx
import openai
import pytest

from extproc.sim import SimServer
from extproc.sim import media_api
from tests.integration.harness import RunningGateway, running_gateway
from tests.otlp_receiver import OtlpReceiver

OPENAI_KEY = "sk-media-backend-31c0"
COHERE_KEY = "co-rerank-backend-77d1"
ANTHROPIC_KEY = "sk-ant-count-backend-4b2e"
CLIENT_KEY = "sk-client-of-the-gateway"
UPLOAD_LIMIT = 26 * 1024 * 1024  # OpenAI's 25 MB audio limit, plus the form around the file
AUDIO = bytes(range(256)) * 64  # 16 KiB, every byte value


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(chunks=3) as server:
        yield server


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture(scope="module")
def gateway(sim: SimServer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    key = {"env": "T_OPENAI_KEY"}
    config = {
        "backends": [
            {"name": "openai", "base_url": sim.base_url, "api_key": key},
            {"name": "image-renamed", "base_url": sim.base_url, "api_key": key, "model_name_override": "gpt-image-1"},
            {"name": "transcriber", "base_url": sim.base_url, "api_key": key,
             "model_name_override": "gpt-4o-transcribe"},
            {"name": "failing", "base_url": sim.base_url, "model_name_override": "sim-error-503"},
            # A Cohere-compatible server: the path is the base URL + /rerank (Cohere's /v2/rerank).
            {"name": "cohere", "base_url": f"{sim.url}/v2", "api_key": {"env": "T_COHERE_KEY"}},
            {"name": "claude", "schema": "anthropic", "base_url": sim.url, "api_key": {"env": "T_ANTHROPIC_KEY"}},
            {"name": "azure", "schema": "azure_openai", "base_url": sim.url, "api_key": key,
             "api_version": "2025-04-01-preview"},
        ],
        "routes": [
            {"name": "renamed-image", "match": {"model": "house-image"}, "backends": [{"name": "image-renamed"}]},
            {"name": "renamed-transcriber", "match": {"model": "house-transcriber"},
             "backends": [{"name": "transcriber"}]},
            {"name": "resilient-transcriber", "match": {"model": "resilient-transcriber"},
             "backends": [{"name": "failing"}, {"name": "transcriber", "priority": 1}]},
            {"name": "rerank", "match": {"prefix": "rerank-"}, "backends": [{"name": "cohere"}]},
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
            {"name": "azure", "match": {"model": "azure-image"}, "backends": [{"name": "azure"}]},
            {"name": "openai", "default": True, "backends": [{"name": "openai"}]},
        ],
        "limits": {"max_request_body_bytes": UPLOAD_LIMIT},
    }
    env = receiver.exporter_env(T_OPENAI_KEY=OPENAI_KEY, T_COHERE_KEY=COHERE_KEY, T_ANTHROPIC_KEY=ANTHROPIC_KEY)
    with running_gateway(config, tmp_path_factory.mktemp("endpoints"), env=env) as gw:
        yield gw


@pytest.fixture
def sent() -> list[bytes]:
    """The request bodies the client sent, as it sent them."""
    return []


@pytest.fixture
def client(gateway: RunningGateway, sent: list[bytes]) -> Iterator[openai.OpenAI]:
    def keep(request: httpx.Request) -> None:
        sent.append(request.read())

    http = httpx.Client(event_hooks={"request": [keep]}, timeout=60)
    yield openai.OpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0, http_client=http)
    http.close()


@pytest.fixture(autouse=True)
def _fresh(sim: SimServer) -> None:
    sim.clear()


def _entry(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    return gateway.wait_access_log(lambda e: e.get("request_id") == request_id)


def _tokens(entry: dict[str, Any]) -> tuple[Any, Any, Any]:
    return entry["input_tokens"], entry["output_tokens"], entry["total_tokens"]




def _rid() -> str:
    return "ep-" + secrets.token_hex(6)


def _traced() -> tuple[str, dict[str, str]]:
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


def _backend_saw_its_key(sim: SimServer, key: str = OPENAI_KEY) -> None:
    headers = sim.requests[-1].headers
    assert headers["authorization"] == f"Bearer {key}" and CLIENT_KEY not in json.dumps(headers)


# -- images ------------------------------------------------------------------------------------


def test_gpt_image_usage_is_accounted_exactly(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer, receiver: OtlpReceiver
) -> None:
    rid, (trace_id, traceparent) = _rid(), _traced()
    result = client.images.generate(model="gpt-image-1", prompt="A lighthouse at dawn", n=2,
                                    extra_headers={"x-request-id": rid, **traceparent})
    assert result.data is not None and len(result.data) == 2 and result.usage is not None
    assert sim.requests[-1].path == "/v1/images/generations"
    _backend_saw_its_key(sim)
    usage = result.usage
    entry = _entry(gateway, rid)
    assert entry["status"] == 200 and entry["route_name"] == "openai"
    assert _tokens(entry) == (usage.input_tokens, usage.output_tokens, usage.total_tokens)
    labels = {"gen_ai_request_model": "gpt-image-1", "gen_ai_operation_name": "generate_content"}
    assert gateway.metric_sum("gen_ai_client_token_usage", "_sum", gen_ai_token_type="output", **labels) >= (
        usage.output_tokens)
    span = receiver.wait_for_request_span(trace_id)
    assert span.name == "ImagesResponse" and span.attributes["openinference.span.kind"] == "LLM"
    assert span.attributes["llm.token_count.completion"] == usage.output_tokens


def test_dall_e_has_no_usage_to_account(client: openai.OpenAI, gateway: RunningGateway) -> None:
    rid = _rid()
    result = client.images.generate(model="dall-e-3", prompt="A lighthouse", response_format="url",
                                    extra_headers={"x-request-id": rid})
    assert result.usage is None and result.data is not None and result.data[0].url
    entry = _entry(gateway, rid)
    assert entry["status"] == 200 and _tokens(entry) == (None, None, None)


def test_image_model_override_and_stream(client: openai.OpenAI, gateway: RunningGateway, sim: SimServer) -> None:
    rid = _rid()
    events = list(client.images.generate(model="house-image", prompt="A lighthouse", stream=True, partial_images=1,
                                         extra_headers={"x-request-id": rid}))
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert sim.requests[-1].json["model"] == "gpt-image-1"
    usage = events[-1].usage  # type: ignore[union-attr]
    entry = _entry(gateway, rid)
    assert entry["model_name_override"] == "gpt-image-1" and entry["backend_name"] == "image-renamed"
    assert _tokens(entry) == (usage.input_tokens, usage.output_tokens, usage.total_tokens)


def test_azure_serves_images_under_its_deployment(client: openai.OpenAI, sim: SimServer) -> None:
    client.images.generate(model="azure-image", prompt="A lighthouse")
    request = sim.requests[-1]
    assert request.path == "/openai/deployments/azure-image/images/generations"
    assert request.query == "api-version=2025-04-01-preview" and request.headers["api-key"] == OPENAI_KEY


def test_a_backend_without_images_is_a_400_in_openais_shape(client: openai.OpenAI, sim: SimServer) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="claude-image", prompt="A lighthouse")
    assert "does not offer image generation" in raised.value.message
    assert raised.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert sim.requests == []


# -- audio in: transcriptions and translations ------------------------------------------------


def test_transcription_tokens_and_the_clients_exact_bytes(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer, sent: list[bytes]
) -> None:
    rid = _rid()
    result = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("talk.wav", AUDIO, "audio/wav"),
                                                prompt="A talk", extra_headers={"x-request-id": rid})
    assert result.text == f"Transcribed {len(AUDIO)} bytes of talk.wav ({hashlib.sha256(AUDIO).hexdigest()[:16]})."
    upstream = sim.requests[-1]
    assert upstream.path == "/v1/audio/transcriptions"
    assert upstream.body == sent[-1]  # byte for byte: not re-encoded
    _backend_saw_its_key(sim)
    usage = result.usage
    assert usage is not None and usage.type == "tokens"
    entry = _entry(gateway, rid)
    assert _tokens(entry) == (usage.input_tokens, usage.output_tokens, usage.total_tokens)
    assert int(entry["bytes_received"]) == len(sent[-1])


def test_transcription_model_override_rewrites_only_the_model_field(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer, sent: list[bytes]
) -> None:
    rid = _rid()
    result = client.audio.transcriptions.create(model="house-transcriber", file=("talk.wav", AUDIO),
                                                extra_headers={"x-request-id": rid})
    assert result.usage is not None and result.usage.type == "tokens"  # the backend's model reports tokens
    field = b'name="model"\r\n\r\n'
    assert sim.requests[-1].body == sent[-1].replace(field + b"house-transcriber", field + b"gpt-4o-transcribe")
    assert sim.requests[-1].headers["content-length"] == str(len(sim.requests[-1].body))
    entry = _entry(gateway, rid)
    assert entry["model_name_override"] == "gpt-4o-transcribe"
    assert _tokens(entry) == (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens)


def test_whisper_seconds_and_text_formats_are_not_tokens(client: openai.OpenAI, gateway: RunningGateway) -> None:
    rid = _rid()
    result = client.audio.transcriptions.create(model="whisper-1", file=("talk.wav", AUDIO),
                                                extra_headers={"x-request-id": rid})
    assert result.usage is not None and result.usage.type == "duration"
    assert _tokens(_entry(gateway, rid)) == (None, None, None)
    rid = _rid()
    srt = client.audio.transcriptions.create(model="whisper-1", file=("talk.wav", AUDIO), response_format="srt",
                                             extra_headers={"x-request-id": rid})
    assert f"Transcribed {len(AUDIO)} bytes" in srt
    entry = _entry(gateway, rid)
    assert entry["status"] == 200 and _tokens(entry) == (None, None, None)


def test_transcription_stream_is_accounted_from_its_last_event(
    client: openai.OpenAI, gateway: RunningGateway
) -> None:
    rid = _rid()
    events = list(client.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("talk.wav", AUDIO),
                                                     stream=True, extra_headers={"x-request-id": rid}))
    done = events[-1]
    assert done.type == "transcript.text.done" and done.usage is not None
    assert "".join(e.delta for e in events[:-1]) == done.text  # type: ignore[union-attr]
    entry = _entry(gateway, rid)
    assert _tokens(entry) == (done.usage.input_tokens, done.usage.output_tokens,  # type: ignore[union-attr]
                              done.usage.total_tokens)  # type: ignore[union-attr]


def test_translation(client: openai.OpenAI, gateway: RunningGateway, sim: SimServer, sent: list[bytes]) -> None:
    rid = _rid()
    result = client.audio.translations.create(model="whisper-1", file=("talk.mp3", AUDIO),
                                              extra_headers={"x-request-id": rid})
    assert result.text.startswith(f"Translated {len(AUDIO)} bytes of talk.mp3")
    assert sim.requests[-1].path == "/v1/audio/translations" and sim.requests[-1].body == sent[-1]
    entry = _entry(gateway, rid)
    assert entry["status"] == 200 and entry["request_model"] == "whisper-1"


@pytest.mark.parametrize("model", ["house-transcriber", "resilient-transcriber"])
def test_a_25_mb_upload_with_the_model_overridden(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer, model: str
) -> None:
    """OpenAI's limit is 25 MB; with limits.max_request_body_bytes above it the whole
    upload goes through Envoy's buffer and the processor (and, on a route with fallback,
    the upstream stage of each attempt), and the backend gets every byte."""
    audio = hashlib.sha256(b"seed").digest() * (25 * 1024 * 1024 // 32)
    rid = _rid()
    result = client.audio.transcriptions.create(model=model, file=("long.wav", audio),
                                                extra_headers={"x-request-id": rid})
    assert result.text == f"Transcribed {len(audio)} bytes of long.wav ({hashlib.sha256(audio).hexdigest()[:16]})."
    assert result.usage is not None and result.usage.type == "tokens"
    entry = _entry(gateway, rid)
    assert entry["status"] == 200 and int(entry["input_tokens"]) == result.usage.input_tokens


def test_an_upload_over_the_limit_is_a_413_in_openais_shape(client: openai.OpenAI, sim: SimServer) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        client.audio.transcriptions.create(model="whisper-1", file=("huge.wav", b"\0" * (UPLOAD_LIMIT + 1)))
    assert raised.value.status_code == 413
    assert raised.value.body["code"] == "request_too_large"  # type: ignore[index]
    assert sim.requests == []


def test_a_multipart_fallback_sends_the_form_to_each_backend(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer, sent: list[bytes]
) -> None:
    rid = _rid()
    result = client.audio.transcriptions.create(model="resilient-transcriber", file=("talk.wav", AUDIO),
                                                extra_headers={"x-request-id": rid})
    assert result.usage is not None
    first, second = sim.requests[-2], sim.requests[-1]
    field = b'name="model"\r\n\r\n'
    assert first.body == sent[-1].replace(field + b"resilient-transcriber", field + b"sim-error-503")
    assert second.body == sent[-1].replace(field + b"resilient-transcriber", field + b"gpt-4o-transcribe")
    entry = _entry(gateway, rid)
    assert entry["backend_name"] == "transcriber" and int(entry["output_tokens"]) == result.usage.output_tokens


@pytest.mark.parametrize(("content_type", "body", "words"), [
    ("multipart/form-data; boundary=abc", b"--abc\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1",
     "closing boundary is missing"),
    ("multipart/form-data; boundary=abc", b"--abc\r\nContent-Disposition: form-data; name=\"file\"; "
     b"filename=\"a.wav\"\r\n\r\nRIFF\r\n--abc--\r\n", "you must provide a model parameter"),
    ("application/json", b'{"model": "whisper-1"}', "multipart/form-data"),
])
def test_a_bad_multipart_body_is_a_400_in_openais_shape(
    gateway: RunningGateway, sim: SimServer, content_type: str, body: bytes, words: str
) -> None:
    reply = httpx.post(f"{gateway.base_url}/audio/transcriptions", content=body,
                       headers={"content-type": content_type, "authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]
    assert sim.requests == []


# -- audio out: speech -------------------------------------------------------------------------


def test_speech_streams_the_audio_through_untouched(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer
) -> None:
    rid = _rid()
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Hello from the gateway", extra_headers={"x-request-id": rid},
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        audio = b"".join(response.iter_bytes())
    assert audio == media_api.speech_bytes("Hello from the gateway")
    assert sim.requests[-1].path == "/v1/audio/speech"
    _backend_saw_its_key(sim)
    entry = _entry(gateway, rid)
    assert entry["status"] == 200 and entry["backend_name"] == "openai" and _tokens(entry) == (None, None, None)
    assert int(entry["bytes_sent"]) >= len(audio)


def test_speech_as_events_is_accounted_from_its_last_event(
    client: openai.OpenAI, gateway: RunningGateway
) -> None:
    rid = _rid()
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input="Hello from the gateway", stream_format="sse",
        extra_headers={"x-request-id": rid},
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert _tokens(_entry(gateway, rid)) == (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"])


# -- rerank --------------------------------------------------------------------------------------


def test_rerank_with_the_cohere_sdk_is_accounted_and_traced(
    gateway: RunningGateway, sim: SimServer, receiver: OtlpReceiver
) -> None:
    rid, (trace_id, traceparent) = _rid(), _traced()
    co = cohere.ClientV2(api_key=CLIENT_KEY, base_url=gateway.url)
    docs = ["the sky is blue", "grass is green", "blue sky and blue sea"]
    result = co.rerank(model="rerank-v3.5", query="blue sky", documents=docs, top_n=2,
                       request_options={"additional_headers": {"x-request-id": rid, **traceparent}})
    direct = cohere.ClientV2(api_key="direct", base_url=sim.url).rerank(
        model="rerank-v3.5", query="blue sky", documents=docs, top_n=2)
    assert [(r.index, r.relevance_score) for r in result.results] == [
        (r.index, r.relevance_score) for r in direct.results]
    upstream = sim.requests[-2]
    assert upstream.path == "/v2/rerank" and upstream.headers["authorization"] == f"Bearer {COHERE_KEY}"
    tokens = result.meta.tokens.input_tokens  # type: ignore[union-attr]
    assert tokens
    entry = _entry(gateway, rid)
    assert entry["route_name"] == "rerank" and _tokens(entry) == (tokens, 0, tokens)
    assert gateway.metric_sum("gen_ai_client_token_usage", "_sum", gen_ai_operation_name="rerank",
                       gen_ai_token_type="input", gen_ai_request_model="rerank-v3.5") >= tokens
    span = receiver.wait_for_request_span(trace_id)
    assert span.name == "Rerank" and span.attributes["openinference.span.kind"] == "RERANKER"
    assert span.attributes["reranker.model_name"] == "rerank-v3.5" and span.attributes["reranker.top_k"] == 2


def test_rerank_on_the_v1_path(gateway: RunningGateway, sim: SimServer) -> None:
    """vLLM and Jina serve /v1/rerank; the gateway takes the same call there."""
    reply = httpx.post(f"{gateway.base_url}/rerank", json={"model": "rerank-v3.5", "query": "q", "documents": ["q"]},
                       headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30)
    assert reply.status_code == 200 and reply.json()["results"] == [{"index": 0, "relevance_score": 1.0}]
    assert sim.requests[-1].path == "/v2/rerank"


# -- token counts --------------------------------------------------------------------------------


def test_anthropic_count_tokens_is_routed_but_not_charged(gateway: RunningGateway, sim: SimServer) -> None:
    rid = _rid()
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=CLIENT_KEY, max_retries=0)
    count = client.messages.count_tokens(model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi there"}],
                                         extra_headers={"x-request-id": rid})
    assert count.input_tokens > 0
    upstream = sim.requests[-1]
    assert upstream.path == "/v1/messages/count_tokens" and upstream.headers["x-api-key"] == ANTHROPIC_KEY
    entry = _entry(gateway, rid)
    assert entry["status"] == 200 and entry["backend_name"] == "claude" and _tokens(entry) == (None, None, None)


def test_anthropic_count_tokens_on_a_backend_without_it_is_an_anthropic_400(gateway: RunningGateway) -> None:
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.count_tokens(model="gpt-x", messages=[{"role": "user", "content": "Hi"}])
    assert raised.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "does not count tokens" in raised.value.message


def test_responses_input_tokens_is_routed_but_not_charged(
    client: openai.OpenAI, gateway: RunningGateway, sim: SimServer
) -> None:
    rid = _rid()
    count = client.responses.input_tokens.count(model="gpt-x", input="Hello there",
                                                extra_headers={"x-request-id": rid})
    assert count.object == "response.input_tokens" and count.input_tokens > 0
    assert sim.requests[-1].path == "/v1/responses/input_tokens"
    _backend_saw_its_key(sim)
    entry = _entry(gateway, rid)
    assert entry["status"] == 200 and _tokens(entry) == (None, None, None)
