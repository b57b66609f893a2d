"""extproc.schemas.responses: usage, JSON fields and the stream reader, over the simulator's real bytes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.schemas.responses import (
    ENDPOINT_PATH,
    StreamReader,
    previous_response_id,
    response_fields,
    usage_from_response,
)
from extproc.sim.server import SimServer
from extproc.sse import SSEDecoder
from extproc.usage import TokenUsage

QUESTION = "Tell me, briefly, why the sky is blue?"
WEATHER_TOOL = {"type": "function", "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

# name -> (request body, x-sim-* headers)
CASES: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "text": ({"input": QUESTION}, {"x-sim-cached-tokens": "5", "x-sim-reasoning-tokens": "3"}),
    "tool": ({"input": "weather in Paris?", "tools": [WEATHER_TOOL]}, {}),
    "incomplete": ({"input": QUESTION, "max_output_tokens": 16}, {"x-sim-reply-tokens": "30"}),
    "failed": ({"input": QUESTION}, {"x-sim-stream-failure": "server_error"}),
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(chunks=5) as server:
        yield server


def post(sim: SimServer, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    response = httpx.post(sim.url + ENDPOINT_PATH, json={"model": "sim-model", **body}, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def streams(sim: SimServer) -> dict[str, bytes]:
    return {name: post(sim, {**body, "stream": True}, headers).content for name, (body, headers) in CASES.items()}


@pytest.fixture(scope="module")
def replies(sim: SimServer) -> dict[str, dict[str, Any]]:
    return {name: post(sim, body, headers).json() for name, (body, headers) in CASES.items() if name != "failed"}


# -- usage -------------------------------------------------------------------------------------------


def test_usage_mapping() -> None:
    usage = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 40}, "output_tokens": 30,
             "output_tokens_details": {"reasoning_tokens": 12}, "total_tokens": 130}
    assert usage_from_response(usage) == TokenUsage(
        input_tokens=100, output_tokens=30, total_tokens=130, cached_input_tokens=40, reasoning_tokens=12
    )


def test_usage_tolerates_missing_and_bad_values() -> None:
    assert usage_from_response(None) is None and usage_from_response([1]) is None
    assert usage_from_response({"input_tokens": 7, "output_tokens": 3}) == TokenUsage(7, 3, 10)
    assert usage_from_response({}) == TokenUsage()
    bad = {"input_tokens": "7", "output_tokens": -3, "total_tokens": True, "input_tokens_details": None,
           "output_tokens_details": {"reasoning_tokens": 1.5}}
    assert usage_from_response(bad) == TokenUsage()


# -- JSON replies ------------------------------------------------------------------------------------


def test_response_fields_of_real_replies(replies: dict[str, dict[str, Any]]) -> None:
    for body in replies.values():
        response_id, model, usage = response_fields(body)
        assert response_id == body["id"] and response_id.startswith("resp_") and model == "sim-model"
        assert usage == usage_from_response(body["usage"]) and usage is not None and usage.total_tokens > 0
    _, _, usage = response_fields(replies["text"])
    assert usage is not None and usage.cached_input_tokens == 5 and usage.reasoning_tokens == 3


def test_response_fields_of_odd_bodies() -> None:
    assert response_fields(None) == (None, None, None)
    assert response_fields({"id": 3, "model": "", "usage": "x"}) == (None, None, None)
    assert response_fields({"error": {"message": "no"}}) == (None, None, None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("resp_abc123", "resp_abc123"),
        ("r" * 256, "r" * 256),
        ("r" * 257, None),
        ("", None),
        (None, None),
        (12, None),
        (["resp_1"], None),
        ("resp_\n1", None),
        ("resp_\x00", None),
        ("resp_é", None),
        ("with space", "with space"),  # printable ASCII
    ],
)
def test_previous_response_id(value: Any, expected: str | None) -> None:
    assert previous_response_id({"previous_response_id": value}) == expected


def test_previous_response_id_absent() -> None:
    assert previous_response_id({}) is None and previous_response_id(None) is None  # type: ignore[arg-type]


# -- the stream reader -------------------------------------------------------------------------------


def read(chunks: list[bytes]) -> tuple[StreamReader, list[bool], int]:
    """Feed the chunks through the SSE decoder into a reader: (reader, has_output per event, events)."""
    decoder = SSEDecoder()
    reader = StreamReader()
    outputs: list[bool] = []
    for chunk in chunks:
        for event in decoder.feed(chunk):
            if event.has_data:
                reader.on_event(event.event, orjson.loads(event.data))
                outputs.append(reader.has_output)
    for event in decoder.flush():
        if event.has_data:
            reader.on_event(event.event, orjson.loads(event.data))
            outputs.append(reader.has_output)
    return reader, outputs, len(outputs)


def summary(reader: StreamReader) -> tuple[Any, ...]:
    return (reader.usage, reader.response_id, reader.response_model, reader.complete, reader.status,
            reader.error_type, reader.output_seen)


def test_reader_over_whole_streams(streams: dict[str, bytes], replies: dict[str, dict[str, Any]]) -> None:
    text, outputs, _ = read([streams["text"]])
    assert text.complete and text.status == "completed" and text.error_type is None
    assert text.response_id is not None and text.response_id.startswith("resp_") and text.response_model == "sim-model"
    assert text.usage == usage_from_response(replies["text"]["usage"])  # same numbers as the JSON reply
    assert sum(outputs) == 5 and text.output_seen  # one per delta
    assert not text.has_output  # the last event, response.completed, is not output

    tool, outputs, _ = read([streams["tool"]])
    assert tool.complete and tool.usage == usage_from_response(replies["tool"]["usage"])
    assert sum(outputs) == 1 + 5  # the call's start (its name) and its argument deltas

    incomplete, _, _ = read([streams["incomplete"]])
    assert incomplete.complete and incomplete.status == "incomplete" and incomplete.error_type is None
    assert incomplete.usage is not None and incomplete.usage.output_tokens == 16

    failed, outputs, _ = read([streams["failed"]])
    assert failed.complete and failed.status == "failed" and failed.error_type == "server_error"
    assert failed.usage is None and sum(outputs) == 1


def test_reader_before_the_end() -> None:
    reader = StreamReader()
    reader.on_event("response.created", {"type": "response.created", "sequence_number": 0, "response": {
        "id": "resp_1", "model": "m", "status": "in_progress", "usage": None}})
    assert (reader.response_id, reader.response_model, reader.usage, reader.complete) == ("resp_1", "m", None, False)
    reader.on_event("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"})
    assert reader.has_output and not reader.complete


@pytest.mark.parametrize(
    "kind",
    ["response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta",
     "response.reasoning_text.delta", "response.reasoning_summary_text.delta", "response.audio.delta",
     "response.custom_tool_call_input.delta"],
)
def test_output_deltas(kind: str) -> None:
    reader = StreamReader()
    reader.on_event(kind, {"type": kind, "delta": "x"})
    assert reader.has_output and reader.output_seen
    reader.on_event("response.output_text.done", {"type": "response.output_text.done", "text": "x"})
    assert not reader.has_output and reader.output_seen


def test_event_names_or_data_types() -> None:
    reader = StreamReader()  # no event: lines (data-only streams): the data's type decides
    reader.on_event(None, {"type": "response.completed", "response": {"id": "resp_2", "usage": {"input_tokens": 1}}})
    assert reader.complete and reader.usage == TokenUsage(1, 0, 1) and reader.response_id == "resp_2"
    named = StreamReader()  # a data without type: the event name decides
    named.on_event("response.output_text.delta", {"delta": "x"})
    assert named.has_output
    odd = StreamReader()
    odd.on_event(None, {})
    odd.on_event(None, {"type": "response.completed", "response": "nope"})
    assert odd.complete and odd.response_id is None and odd.usage is None


def test_error_events() -> None:
    reader = StreamReader()
    reader.on_event("error", {"type": "error", "code": "rate_limit_exceeded", "message": "slow down", "param": None})
    assert reader.error_type == "rate_limit_exceeded" and not reader.complete
    nested = StreamReader()
    nested.on_event("error", {"type": "error", "error": {"type": "server_error", "message": "boom"}})
    assert nested.error_type == "server_error"
    bare = StreamReader()
    bare.on_event("error", {"type": "error", "code": None, "message": "?"})
    assert bare.error_type == "error"
    failed = StreamReader()
    failed.on_event("response.failed", {"type": "response.failed", "response": {"id": "r", "status": "failed",
                                                                                "error": None}})
    assert failed.complete and failed.error_type == "error"


@st.composite
def splits(draw: st.DrawFn, raw: bytes) -> list[bytes]:
    """``raw`` cut at arbitrary points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=40)))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(CASES)))
def test_any_split_reads_the_same(streams: dict[str, bytes], data: st.DataObject, name: str) -> None:
    raw = streams[name]
    whole, whole_outputs, count = read([raw])
    chunks = data.draw(splits(raw))
    assert b"".join(chunks) == raw
    split, split_outputs, split_count = read(chunks)
    assert summary(split) == summary(whole) and split_outputs == whole_outputs and split_count == count


def test_byte_by_byte_reads_the_same(streams: dict[str, bytes]) -> None:
    for raw in streams.values():
        whole, whole_outputs, _ = read([raw])
        split, outputs, _ = read([raw[i : i + 1] for i in range(len(raw))])
        assert summary(split) == summary(whole) and outputs == whole_outputs
