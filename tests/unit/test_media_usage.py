"""Usage of image, audio, rerank and token-count answers, as ResponseObserver reads them
(bodies shaped as the providers document them), in any chunking."""

from __future__ import annotations

import orjson
import pytest

from extproc.client_apis import ResponseShape
from extproc.response import BodyKind, ResponseObserver
from extproc.usage import TokenUsage


def observe(shape: ResponseShape, body: bytes, content_type: str = "application/json", status: int = 200,
            chunk: int = 7) -> ResponseObserver:
    observer = ResponseObserver(strip_usage=False, collect_text=False, max_json_bytes=64 << 20, shape=shape)
    kind = observer.on_headers(status, content_type, "")
    assert kind is not BodyKind.none
    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    for i, piece in enumerate(pieces):
        assert observer.on_chunk(piece, i == len(pieces) - 1, float(i)) is None  # never rewritten
    return observer


GPT_IMAGE = {
    "created": 1, "data": [{"b64_json": "iVBO"}],
    "usage": {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
              "input_tokens_details": {"text_tokens": 40, "image_tokens": 10}},
}
TRANSCRIBE = {"text": "hi", "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 45, "total_tokens": 59,
                                      "input_token_details": {"text_tokens": 0, "audio_tokens": 14}}}


@pytest.mark.parametrize(("body", "usage"), [
    (GPT_IMAGE, TokenUsage(50, 4160, 4210)),
    (TRANSCRIBE, TokenUsage(14, 45, 59)),
    ({"created": 1, "data": [{"url": "https://x"}]}, None),  # dall-e
    ({"text": "hi", "usage": {"type": "duration", "seconds": 9}}, None),  # whisper
    ({"text": "hi"}, None),  # translations
])
def test_media_json(body: dict[str, object], usage: TokenUsage | None) -> None:
    observer = observe(ResponseShape.media, orjson.dumps(body))
    assert observer.complete and observer.usage == usage


def test_transcription_stream_usage_comes_from_its_last_event() -> None:
    events = [{"type": "transcript.text.delta", "delta": "Hel"}, {"type": "transcript.text.delta", "delta": "lo"},
              {"type": "transcript.text.done", "text": "Hello", "usage": TRANSCRIBE["usage"]}]
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    observer = observe(ResponseShape.media, body, "text/event-stream", chunk=5)
    assert observer.usage == TokenUsage(14, 45, 59) and observer.complete
    assert observer.first_output_at is not None and observer.first_output_at < (observer.last_output_at or 0)


def test_image_stream_usage_comes_from_the_completed_event() -> None:
    body = (b"event: image_generation.partial_image\ndata: "
            + orjson.dumps({"type": "image_generation.partial_image", "b64_json": "x", "partial_image_index": 0})
            + b"\n\nevent: image_generation.completed\ndata: "
            + orjson.dumps({"type": "image_generation.completed", "b64_json": "y", "usage": GPT_IMAGE["usage"]})
            + b"\n\n")
    observer = observe(ResponseShape.media, body, "text/event-stream")
    assert observer.usage == TokenUsage(50, 4160, 4210) and observer.complete


@pytest.mark.parametrize(("body", "usage"), [
    ({"id": "r", "results": [], "meta": {"billed_units": {"search_units": 1}, "tokens": {"input_tokens": 37,
                                                                                        "output_tokens": 0}}},
     TokenUsage(37, 0, 37)),
    ({"id": "r", "results": [], "meta": {"billed_units": {"input_tokens": 12}}}, TokenUsage(12, 0, 12)),
    ({"id": "r", "results": [], "usage": {"total_tokens": 21}}, TokenUsage(21, 0, 21)),  # vLLM, Jina
    ({"id": "r", "results": [], "meta": {"billed_units": {"search_units": 1}}}, None),  # search units are not tokens
])
def test_rerank(body: dict[str, object], usage: TokenUsage | None) -> None:
    assert observe(ResponseShape.rerank, orjson.dumps(body)).usage == usage


@pytest.mark.parametrize("body", [
    {"input_tokens": 42},  # Anthropic count_tokens
    {"object": "response.input_tokens", "input_tokens": 42},  # OpenAI Responses input_tokens
])
def test_token_counts_are_not_usage(body: dict[str, object]) -> None:
    observer = observe(ResponseShape.unmetered, orjson.dumps(body))
    assert observer.complete and observer.usage is None


@pytest.mark.parametrize(("shape", "body", "error_type"), [
    (ResponseShape.media, {"error": {"message": "bad", "type": "invalid_request_error"}}, "invalid_request_error"),
    (ResponseShape.unmetered, {"type": "error", "error": {"type": "not_found_error", "message": "x"}}, "not_found_error"),
])
def test_errors_are_named(shape: ResponseShape, body: dict[str, object], error_type: str) -> None:
    observer = observe(shape, orjson.dumps(body), status=400)
    assert observer.error_type == error_type and observer.usage is None


def test_audio_bodies_are_not_read() -> None:
    observer = ResponseObserver(strip_usage=False, collect_text=False, max_json_bytes=1024, shape=ResponseShape.media)
    assert observer.on_headers(200, "audio/mpeg", "") is BodyKind.none
    assert observer.on_headers(200, "text/plain; charset=utf-8", "") is BodyKind.none  # text, srt


BIG_IMAGE = "A" * (2 * 1024 * 1024)  # base64 of a large image


def test_a_large_image_answer_is_read_for_usage_from_its_end_alone() -> None:
    body = orjson.dumps({"created": 1, "data": [{"b64_json": BIG_IMAGE}], "usage": GPT_IMAGE["usage"]})
    assert observe(ResponseShape.media, body, chunk=1 << 16).usage == TokenUsage(50, 4160, 4210)
    # Not JSON before the tail, so only the end can have been read.
    broken = b'{"created": 1, "data": [' + b"x" * len(BIG_IMAGE) + body[body.index(b"]"):]
    assert observe(ResponseShape.media, broken, chunk=1 << 16).usage == TokenUsage(50, 4160, 4210)


@pytest.mark.parametrize("body", [
    {"usage": GPT_IMAGE["usage"], "created": 1, "data": [{"b64_json": BIG_IMAGE}]},  # usage first
    # after the usage, a text that quotes a usage object: not mistaken for it
    {"created": 1, "data": [{"b64_json": BIG_IMAGE}], "usage": GPT_IMAGE["usage"],
     "revised_prompt": 'a sign reading "usage": {"input_tokens": 1}'},
])
def test_a_large_image_answer_without_a_plain_usage_at_its_end_is_parsed_whole(body: dict[str, object]) -> None:
    assert observe(ResponseShape.media, orjson.dumps(body), chunk=1 << 16).usage == TokenUsage(50, 4160, 4210)
