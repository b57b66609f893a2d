"""The simulator's image, audio, rerank and token-count APIs, checked against the official
SDKs (openai, cohere, anthropic) talking to it directly over HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator

import anthropic
import cohere
import openai
import pytest

from extproc.sim import media_api
from extproc.sim import text as simtext
from extproc.sim.server import SimServer

AUDIO = bytes(range(256)) * 40  # 10240 bytes, every byte value (binary-safe upload)
DIGEST = hashlib.sha256(AUDIO).hexdigest()[:16]
PROMPT = "A cat in a hat"  # 5 tokens


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(chunks=4) as server:
        yield server


@pytest.fixture
def client(sim: SimServer) -> openai.OpenAI:
    sim.clear()
    return openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)


def test_gpt_image_reports_token_usage(client: openai.OpenAI) -> None:
    result = client.images.generate(model="gpt-image-1", prompt=PROMPT, n=2)
    assert result.data is not None and len(result.data) == 2
    assert base64.b64decode(result.data[0].b64_json or "").startswith(b"\x89PNG")
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens) == (5, 2 * media_api.IMAGE_TOKENS)
    assert result.usage.total_tokens == 5 + 2 * media_api.IMAGE_TOKENS
    assert result.usage.input_tokens_details.text_tokens == 5


def test_dall_e_reports_no_usage(client: openai.OpenAI) -> None:
    result = client.images.generate(model="dall-e-3", prompt=PROMPT, response_format="url")
    assert result.usage is None and result.data is not None and result.data[0].url


def test_image_stream_ends_with_the_usage(client: openai.OpenAI) -> None:
    events = list(client.images.generate(model="gpt-image-1", prompt=PROMPT, stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert events[-1].usage.output_tokens == media_api.IMAGE_TOKENS  # type: ignore[union-attr]


def test_transcription_reports_tokens_and_sees_the_exact_file(client: openai.OpenAI, sim: SimServer) -> None:
    result = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", AUDIO, "audio/wav"))
    assert result.text == f"Transcribed {len(AUDIO)} bytes of a.wav ({DIGEST})."
    assert result.usage is not None and result.usage.type == "tokens"
    assert result.usage.input_tokens == len(AUDIO) // media_api.AUDIO_BYTES_PER_TOKEN
    assert result.usage.output_tokens == simtext.count_tokens(result.text)
    assert sim.requests[-1].headers["content-type"].startswith("multipart/form-data; boundary=")


def test_whisper_reports_duration_and_text_formats_are_plain(client: openai.OpenAI) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO))
    assert result.usage is not None and result.usage.type == "duration"
    srt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO), response_format="srt")
    assert isinstance(srt, str) and DIGEST in srt


def test_transcription_stream_ends_with_the_usage(client: openai.OpenAI) -> None:
    events = list(client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=("a.wav", AUDIO), stream=True))
    assert {e.type for e in events[:-1]} == {"transcript.text.delta"}
    done = events[-1]
    assert done.type == "transcript.text.done" and done.usage is not None
    assert "".join(e.delta for e in events[:-1]) == done.text  # type: ignore[union-attr]


def test_translation_answers_text_only(client: openai.OpenAI) -> None:
    result = client.audio.translations.create(model="whisper-1", file=("b.mp3", AUDIO))
    assert result.text == f"Translated {len(AUDIO)} bytes of b.mp3 ({DIGEST})."


def test_speech_streams_audio_bytes(client: openai.OpenAI) -> None:
    whole = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="Hello there")
    assert whole.content == media_api.speech_bytes("Hello there")
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="Hello there") as r:
        assert r.headers["content-type"] == "audio/mpeg"
        assert b"".join(r.iter_bytes()) == media_api.speech_bytes("Hello there")


def test_speech_as_events_ends_with_the_usage(client: openai.OpenAI) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input="Hello there", stream_format="sse") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert audio == media_api.speech_bytes("Hello there")
    assert events[-1] == {"type": "speech.audio.done", "usage": {
        "input_tokens": 2, "output_tokens": len(audio) // media_api.SPEECH_BYTES_PER_TOKEN,
        "total_tokens": 2 + len(audio) // media_api.SPEECH_BYTES_PER_TOKEN}}


def test_media_errors_are_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="gpt-image-1", prompt="")
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="sim-error-404", file=("a.wav", AUDIO))


def test_rerank_with_the_cohere_sdk(sim: SimServer) -> None:
    co = cohere.ClientV2(api_key="co-test", base_url=sim.url)
    docs = ["the sky is blue", "grass is green", "blue sky and blue sea"]
    result = co.rerank(model="rerank-v3.5", query="blue sky", documents=docs, top_n=2)
    assert [r.index for r in result.results] == [0, 2]
    assert result.results[0].relevance_score == 1.0
    assert result.meta is not None and result.meta.tokens is not None
    query = simtext.count_tokens("blue sky")
    assert result.meta.tokens.input_tokens == sum(query + simtext.count_tokens(d) for d in docs)
    assert sim.requests[-1].path == "/v2/rerank"


def test_rerank_errors_are_cohere_errors(sim: SimServer) -> None:
    co = cohere.ClientV2(api_key="co-test", base_url=sim.url)
    with pytest.raises(cohere.errors.BadRequestError):
        co.rerank(model="rerank-v3.5", query="", documents=["a"])


def test_anthropic_count_tokens(sim: SimServer) -> None:
    client = anthropic.Anthropic(base_url=sim.url, api_key="sk-ant-test", max_retries=0)
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hello there, friend"}]
    count = client.messages.count_tokens(model="claude-x", messages=messages)
    assert count.input_tokens == simtext.MESSAGE_OVERHEAD + simtext.count_tokens("Hello there, friend")


def test_responses_input_tokens(client: openai.OpenAI) -> None:
    count = client.responses.input_tokens.count(model="gpt-x", input="Hello there, friend")
    assert count.object == "response.input_tokens"
    assert count.input_tokens == simtext.MESSAGE_OVERHEAD + simtext.count_tokens("Hello there, friend")
