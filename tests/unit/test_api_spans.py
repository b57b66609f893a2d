"""Spans of Anthropic Messages and OpenAI Responses calls: input messages from each API's
request shape, output assembled from its response shape (JSON and streamed), llm.system
naming the client's API and llm.provider the backend. Shapes are the APIs' documented ones."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from openinference.semconv.trace import (
    MessageAttributes,
    SpanAttributes,
    ToolAttributes,
    ToolCallAttributes,
)

from extproc.client_apis import ResponseShape
from extproc.response import ResponseObserver
from extproc.telemetry import inputs
from extproc.telemetry.outputs import AnthropicOutput, ResponsesOutput
from extproc.telemetry.record import OutputMessage, ToolCall
from extproc.usage import TokenUsage
from tests.unit.test_tracing import (
    CONTENT,
    CONTENT_TEXT,
    CONTENT_TYPE,
    CONTENTS,
    IMAGE_URL,
    IN,
    OUT,
    ROLE,
    TOOL_CALLS,
    Harness,
    make_record,
)

TOOL_CALL_ID = MessageAttributes.MESSAGE_TOOL_CALL_ID
CALL_ID = ToolCallAttributes.TOOL_CALL_ID
CALL_NAME = ToolCallAttributes.TOOL_CALL_FUNCTION_NAME
CALL_ARGS = ToolCallAttributes.TOOL_CALL_FUNCTION_ARGUMENTS_JSON
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="

# -- Anthropic Messages: a request, a JSON message and a stream, as the API documents them ------

ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
}
ANTHROPIC_BODY: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "temperature": 0.3,
    "system": [{"type": "text", "text": "You are a weather bot.", "cache_control": {"type": "ephemeral"}}],
    "tools": [ANTHROPIC_TOOL],
    "tool_choice": {"type": "auto"},
    "messages": [
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "text", "text": "Where is this, and what is the weather there?"},
        ]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "It is Paris.", "signature": "EqQBCgIYAhIM"},
            {"type": "text", "text": "That is Paris; let me check."},
            {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"location": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18C, sunny"},
            {"type": "text", "text": "And in Rome?"},
        ]},
    ],
}
ANTHROPIC_MESSAGE: dict[str, Any] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "text", "text": "I'll check Rome."},
        {"type": "tool_use", "id": "toolu_01B", "name": "get_weather", "input": {"location": "Rome"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 472, "output_tokens": 89, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
}


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n" for name, data in events)


def _event(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return data["type"], data


ANTHROPIC_STREAM_EVENTS = [
    _event({"type": "message_start", "message": {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 472, "output_tokens": 2}}}),
    _event({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
    _event({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Rome, then."}}),
    _event({"type": "content_block_stop", "index": 0}),
    _event({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    _event({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "I'll check "}}),
    _event({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Rome."}}),
    _event({"type": "content_block_stop", "index": 1}),
    _event({"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_01B", "name": "get_weather", "input": {}}}),
    _event({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}}),
    _event({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"location":'}}),
    _event({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ' "Rome"}'}}),
    _event({"type": "content_block_stop", "index": 2}),
    _event({"type": "content_block_start", "index": 3, "content_block": {
        "type": "tool_use", "id": "toolu_01C", "name": "now", "input": {}}}),
    _event({"type": "content_block_stop", "index": 3}),
    _event({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 89}}),
    _event({"type": "message_stop"}),
]
ANTHROPIC_STREAM = sse(*ANTHROPIC_STREAM_EVENTS)

# -- OpenAI Responses ----------------------------------------------------------------------------

RESPONSES_TOOL = {
    "type": "function", "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
RESPONSES_BODY: dict[str, Any] = {
    "model": "gpt-4.1",
    "instructions": "Answer like a pirate.",
    "temperature": 0.7,
    "max_output_tokens": 200,
    "store": False,
    "tools": [RESPONSES_TOOL],
    "input": [
        {"role": "user", "content": "What is the weather in Paris?"},  # the SDK's easy message
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city":"Paris"}', "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C, sunny"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "And what is in this picture?"},
            {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "auto"},
        ]},
    ],
}


def responses_object(output: list[dict[str, Any]], status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {
        "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b", "object": "response", "created_at": 1741476542,
        "status": status, "error": None, "incomplete_details": None, "instructions": "Answer like a pirate.",
        "model": "gpt-4.1-2025-04-14", "output": output, "parallel_tool_calls": True,
        "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 87,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 123},
        **extra,
    }


TEXT_ITEM = {"type": "message", "id": "msg_67cc", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "Arr, 'tis a cat.", "annotations": []}]}
CALL_ITEM = {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "get_weather",
             "arguments": '{"city":"Rome"}', "status": "completed"}
REASONING_ITEM = {"type": "reasoning", "id": "rs_2", "summary": []}


def responses_stream(*, completed: bool = True) -> bytes:
    created = responses_object([], status="in_progress", usage=None)
    events = [
        {"type": "response.created", "sequence_number": 0, "response": created},
        {"type": "response.in_progress", "sequence_number": 1, "response": created},
        {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
         "item": {**REASONING_ITEM, "status": "in_progress"}},
        {"type": "response.output_item.done", "sequence_number": 3, "output_index": 0, "item": REASONING_ITEM},
        {"type": "response.output_item.added", "sequence_number": 4, "output_index": 1,
         "item": {"type": "message", "id": "msg_67cc", "status": "in_progress", "role": "assistant", "content": []}},
        {"type": "response.content_part.added", "sequence_number": 5, "item_id": "msg_67cc", "output_index": 1,
         "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}},
        {"type": "response.output_text.delta", "sequence_number": 6, "item_id": "msg_67cc", "output_index": 1,
         "content_index": 0, "delta": "Arr, 'tis ", "logprobs": []},
        {"type": "response.output_text.delta", "sequence_number": 7, "item_id": "msg_67cc", "output_index": 1,
         "content_index": 0, "delta": "a cat.", "logprobs": []},
        {"type": "response.output_item.added", "sequence_number": 8, "output_index": 2,
         "item": {**CALL_ITEM, "arguments": "", "status": "in_progress"}},
        {"type": "response.function_call_arguments.delta", "sequence_number": 9, "item_id": "fc_2",
         "output_index": 2, "delta": '{"city":'},
        {"type": "response.function_call_arguments.delta", "sequence_number": 10, "item_id": "fc_2",
         "output_index": 2, "delta": '"Rome"}'},
    ]
    if completed:
        events += [
            {"type": "response.output_text.done", "sequence_number": 11, "item_id": "msg_67cc", "output_index": 1,
             "content_index": 0, "text": "Arr, 'tis a cat."},
            {"type": "response.output_item.done", "sequence_number": 12, "output_index": 1, "item": TEXT_ITEM},
            {"type": "response.output_item.done", "sequence_number": 13, "output_index": 2, "item": CALL_ITEM},
            {"type": "response.completed", "sequence_number": 14,
             "response": responses_object([REASONING_ITEM, TEXT_ITEM, CALL_ITEM])},
        ]
    return sse(*(_event(e) for e in events))


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.tracing.shutdown()


def observe(raw: bytes, *, content_type: str = "text/event-stream", chunk: int = 7, max_chars: int | None = 10_000,
            shape: ResponseShape = ResponseShape.openai) -> ResponseObserver:
    observer = ResponseObserver(strip_usage=False, collect_text=False, max_json_bytes=1 << 20,
                                collect_output_chars=max_chars, shape=shape)
    observer.on_headers(200, content_type, "")
    pieces = [raw[i:i + chunk] for i in range(0, len(raw), chunk)] or [b""]
    for i, piece in enumerate(pieces):
        observer.on_chunk(piece, i == len(pieces) - 1, float(i))
    return observer


# -- input messages --------------------------------------------------------------------------------


def test_anthropic_request_reads_as_messages() -> None:
    body = copy.deepcopy(ANTHROPIC_BODY)
    messages, unread = inputs.input_messages("anthropic.messages", body)  # type: ignore[misc]
    assert unread == 0
    assert body == ANTHROPIC_BODY  # read, never changed
    assert messages == [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "text", "text": "Where is this, and what is the weather there?"},
        ]},
        {"role": "assistant", "content": "That is Paris; let me check.",  # thinking is left to input.value
         "tool_calls": [{"id": "toolu_01A", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C, sunny"},
        {"role": "user", "content": "And in Rome?"},
    ]


def test_anthropic_plain_shapes() -> None:
    body = {"system": "Be brief.", "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": True,
                                      "content": [{"type": "text", "text": "boom"}]},
                                     {"type": "tool_result", "tool_use_id": "t2", "content": [
                                         {"type": "text", "text": "a"},
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]},
        {"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "doc"}}]},
    ]}
    messages, _ = inputs.input_messages("anthropic.messages", body)  # type: ignore[misc]
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "tool", "tool_call_id": "t1", "content": "boom"},
        {"role": "tool", "tool_call_id": "t2", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        {"role": "user", "content": None},  # a document only: in input.value
    ]


def test_responses_request_reads_as_messages() -> None:
    messages, unread = inputs.input_messages("openai.responses", RESPONSES_BODY)  # type: ignore[misc]
    assert unread == 0
    assert messages == [
        {"role": "system", "content": "Answer like a pirate."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "user", "content": [
            {"type": "text", "text": "And what is in this picture?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]},
    ]
    assert inputs.input_messages("openai.responses", {"input": "Say hello"}) == (
        [{"role": "user", "content": "Say hello"}], 0)
    assert inputs.input_messages("openai.responses", {"model": "m"}) is None


def test_very_long_inputs_say_how_many_were_not_read() -> None:
    items = [{"role": "user", "content": str(i)} for i in range(inputs.MAX_ITEMS + 5)]
    messages, unread = inputs.input_messages("openai.responses", {"input": items})  # type: ignore[misc]
    assert unread == 5 and len(messages) == inputs.MAX_ITEMS and messages[0]["content"] == "5"
    messages, unread = inputs.input_messages("anthropic.messages", {"messages": items})  # type: ignore[misc]
    assert unread == 5 and len(messages) == inputs.MAX_ITEMS


# -- output assembly ---------------------------------------------------------------------------


EXPECTED_ANTHROPIC_OUTPUT = OutputMessage(
    role="assistant", content="I'll check Rome.", finish_reason="tool_use",
    tool_calls=[ToolCall(id="toolu_01B", name="get_weather", arguments='{"location":"Rome"}')],
)


def test_anthropic_json_message_output() -> None:
    out = AnthropicOutput(1000)
    out.on_body(ANTHROPIC_MESSAGE)
    assert out.output == [EXPECTED_ANTHROPIC_OUTPUT]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_anthropic_stream_output_through_the_observer(chunk: int) -> None:
    observer = observe(ANTHROPIC_STREAM, chunk=chunk, shape=ResponseShape.anthropic)
    assert observer.complete and observer.usage == TokenUsage(472, 89, 561)
    (message,) = observer.output  # type: ignore[misc]
    assert message.content == "I'll check Rome." and message.finish_reason == "tool_use"
    assert [(c.id, c.name, json.loads(c.arguments)) for c in message.tool_calls] == [
        ("toolu_01B", "get_weather", {"location": "Rome"}), ("toolu_01C", "now", {})]


def test_anthropic_json_through_the_observer_and_nothing_kept_without_tracing() -> None:
    raw = orjson.dumps(ANTHROPIC_MESSAGE)
    assert observe(raw, content_type="application/json", shape=ResponseShape.anthropic).output == [EXPECTED_ANTHROPIC_OUTPUT]
    hidden = observe(raw, content_type="application/json", shape=ResponseShape.anthropic, max_chars=None)
    assert hidden.output is None and hidden.usage is not None


def test_anthropic_stream_cut_short_keeps_what_was_said() -> None:
    cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b'"Rome."')]
    (message,) = observe(cut, shape=ResponseShape.anthropic).output  # type: ignore[misc]
    assert message.content == "I'll check " and message.finish_reason is None and not message.tool_calls


def test_anthropic_output_is_bounded() -> None:
    observer = observe(ANTHROPIC_STREAM, shape=ResponseShape.anthropic, max_chars=5)
    (message,) = observer.output  # type: ignore[misc]
    assert message.content == "I'll " and message.tool_calls[0].arguments == '{"loc'


EXPECTED_RESPONSES_OUTPUT = OutputMessage(
    role="assistant", content="Arr, 'tis a cat.", finish_reason="completed",
    tool_calls=[ToolCall(id="call_2", name="get_weather", arguments='{"city":"Rome"}')],
)


def test_responses_json_output() -> None:
    out = ResponsesOutput(1000)
    out.on_body(responses_object([REASONING_ITEM, TEXT_ITEM, CALL_ITEM]))
    assert out.output == [EXPECTED_RESPONSES_OUTPUT]
    observer = observe(orjson.dumps(responses_object([TEXT_ITEM])), content_type="application/json",
                       shape=ResponseShape.responses)
    assert observer.output == [OutputMessage(content="Arr, 'tis a cat.", finish_reason="completed")]


def test_responses_incomplete_says_why() -> None:
    out = ResponsesOutput(1000)
    out.on_body(responses_object([TEXT_ITEM], status="incomplete",
                                 incomplete_details={"reason": "max_output_tokens"}))
    assert out.output[0].finish_reason == "max_output_tokens"


@pytest.mark.parametrize("chunk", [1, 13, 1 << 16])
def test_responses_stream_output_through_the_observer(chunk: int) -> None:
    observer = observe(responses_stream(), chunk=chunk, shape=ResponseShape.responses)
    assert observer.complete and observer.usage == TokenUsage(36, 87, 123)
    assert observer.output == [EXPECTED_RESPONSES_OUTPUT]


def test_responses_stream_cut_short_keeps_the_deltas() -> None:
    observer = observe(responses_stream(completed=False), shape=ResponseShape.responses)
    assert not observer.complete
    assert observer.output == [OutputMessage(
        content="Arr, 'tis a cat.", tool_calls=[ToolCall(id="call_2", name="get_weather", arguments='{"city":"Rome"}')])]


# -- span attributes -------------------------------------------------------------------------------


def anthropic_record(**overrides: Any) -> Any:
    values: dict[str, Any] = dict(
        client_api="anthropic.messages", provider="anthropic", request_model="claude-sonnet-4-5",
        backend_model="claude-sonnet-4-5", response_model="claude-sonnet-4-5-20250929", server_address="api.anthropic.com",
        usage=TokenUsage(input_tokens=472, output_tokens=89, total_tokens=561, cached_input_tokens=100,
                         cache_creation_input_tokens=20),
        request_body=copy.deepcopy(ANTHROPIC_BODY), output=[copy.deepcopy(EXPECTED_ANTHROPIC_OUTPUT)],
    )
    values.update(overrides)
    return make_record(**values)


def responses_record(**overrides: Any) -> Any:
    values: dict[str, Any] = dict(
        client_api="openai.responses", request_model="gpt-4.1", backend_model="gpt-4.1",
        response_model="gpt-4.1-2025-04-14", usage=TokenUsage(input_tokens=36, output_tokens=87, total_tokens=123),
        request_body=copy.deepcopy(RESPONSES_BODY), output=[copy.deepcopy(EXPECTED_RESPONSES_OUTPUT)],
    )
    values.update(overrides)
    return make_record(**values)


def test_anthropic_span(harness: Harness) -> None:
    handle = harness.tracing.start("chat", {}, 0, "anthropic.messages")
    assert handle is not None
    harness.tracing.finish(handle, anthropic_record())
    (span,) = harness.exporter.get_finished_spans()
    a = dict(span.attributes or {})

    assert span.name == "Messages"
    assert a[SpanAttributes.LLM_SYSTEM] == "anthropic"
    assert a[SpanAttributes.LLM_PROVIDER] == "anthropic"
    assert a[SpanAttributes.LLM_MODEL_NAME] == "claude-sonnet-4-5-20250929"
    assert json.loads(a[SpanAttributes.LLM_INVOCATION_PARAMETERS]) == {
        "max_tokens": 1024, "temperature": 0.3, "tool_choice": {"type": "auto"}}
    assert json.loads(a[f"{SpanAttributes.LLM_TOOLS}.0.{ToolAttributes.TOOL_JSON_SCHEMA}"]) == ANTHROPIC_TOOL
    assert json.loads(a[SpanAttributes.INPUT_VALUE]) == ANTHROPIC_BODY

    assert a[f"{IN}.0.{ROLE}"] == "system" and a[f"{IN}.0.{CONTENT}"] == "You are a weather bot."
    assert a[f"{IN}.1.{ROLE}"] == "user"
    assert a[f"{IN}.1.{CONTENTS}.0.{CONTENT_TYPE}"] == "image"
    assert a[f"{IN}.1.{CONTENTS}.0.{IMAGE_URL}"] == f"data:image/png;base64,{PNG}"
    assert a[f"{IN}.1.{CONTENTS}.1.{CONTENT_TEXT}"] == "Where is this, and what is the weather there?"
    assert a[f"{IN}.2.{ROLE}"] == "assistant" and a[f"{IN}.2.{CONTENT}"] == "That is Paris; let me check."
    assert a[f"{IN}.2.{TOOL_CALLS}.0.{CALL_ID}"] == "toolu_01A"
    assert json.loads(a[f"{IN}.2.{TOOL_CALLS}.0.{CALL_ARGS}"]) == {"location": "Paris"}
    assert a[f"{IN}.3.{ROLE}"] == "tool" and a[f"{IN}.3.{TOOL_CALL_ID}"] == "toolu_01A"
    assert a[f"{IN}.3.{CONTENT}"] == "18C, sunny"
    assert a[f"{IN}.4.{ROLE}"] == "user" and a[f"{IN}.4.{CONTENT}"] == "And in Rome?"

    assert a[f"{OUT}.0.{ROLE}"] == "assistant" and a[f"{OUT}.0.{CONTENT}"] == "I'll check Rome."
    assert a[f"{OUT}.0.{TOOL_CALLS}.0.{CALL_NAME}"] == "get_weather"
    assert a[f"{OUT}.0.{TOOL_CALLS}.0.{CALL_ARGS}"] == '{"location":"Rome"}'
    assert a[SpanAttributes.LLM_FINISH_REASON] == "tool_use"
    assert json.loads(a[SpanAttributes.OUTPUT_VALUE]) == {  # the answer in the client's own shape
        "role": "assistant", "stop_reason": "tool_use", "content": [
            {"type": "text", "text": "I'll check Rome."},
            {"type": "tool_use", "id": "toolu_01B", "name": "get_weather", "input": {"location": "Rome"}}]}

    assert a[SpanAttributes.LLM_TOKEN_COUNT_PROMPT] == 472
    assert a[SpanAttributes.LLM_TOKEN_COUNT_COMPLETION] == 89
    assert a[SpanAttributes.LLM_TOKEN_COUNT_TOTAL] == 561
    assert a[SpanAttributes.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ] == 100
    assert a[SpanAttributes.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_WRITE] == 20
    assert json.loads(a[SpanAttributes.METADATA])["client_api"] == "anthropic.messages"


def test_responses_span(harness: Harness) -> None:
    handle = harness.tracing.start("chat", {}, 0, "openai.responses")
    assert handle is not None
    harness.tracing.finish(handle, responses_record())
    (span,) = harness.exporter.get_finished_spans()
    a = dict(span.attributes or {})

    assert span.name == "Response"
    assert a[SpanAttributes.LLM_SYSTEM] == "openai" and a[SpanAttributes.LLM_PROVIDER] == "openai"
    assert json.loads(a[SpanAttributes.LLM_INVOCATION_PARAMETERS]) == {
        "temperature": 0.7, "max_output_tokens": 200, "store": False}
    assert json.loads(a[f"{SpanAttributes.LLM_TOOLS}.0.{ToolAttributes.TOOL_JSON_SCHEMA}"]) == RESPONSES_TOOL
    assert a[f"{IN}.0.{ROLE}"] == "system" and a[f"{IN}.0.{CONTENT}"] == "Answer like a pirate."
    assert a[f"{IN}.1.{CONTENT}"] == "What is the weather in Paris?"
    assert a[f"{IN}.2.{ROLE}"] == "assistant" and a[f"{IN}.2.{TOOL_CALLS}.0.{CALL_ARGS}"] == '{"city":"Paris"}'
    assert a[f"{IN}.3.{ROLE}"] == "tool" and a[f"{IN}.3.{TOOL_CALL_ID}"] == "call_1"
    assert a[f"{IN}.4.{CONTENTS}.0.{CONTENT_TEXT}"] == "And what is in this picture?"
    assert a[f"{IN}.4.{CONTENTS}.1.{IMAGE_URL}"] == "https://example.com/cat.png"
    assert f"{IN}.5.{ROLE}" not in a  # the reasoning item is in input.value only

    assert a[f"{OUT}.0.{CONTENT}"] == "Arr, 'tis a cat."
    assert a[f"{OUT}.0.{TOOL_CALLS}.0.{CALL_ID}"] == "call_2"
    assert json.loads(a[SpanAttributes.OUTPUT_VALUE]) == [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Arr, 'tis a cat."}]},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome"}'}]
    assert a[SpanAttributes.LLM_TOKEN_COUNT_TOTAL] == 123


def test_plain_answers_are_text_in_every_api(harness: Harness) -> None:
    for record in (anthropic_record(output=[OutputMessage(content="Hello.", finish_reason="end_turn")]),
                   responses_record(output=[OutputMessage(content="Hello.", finish_reason="completed")])):
        a = harness.attributes(record)
        assert a[SpanAttributes.OUTPUT_VALUE] == "Hello." and a[SpanAttributes.OUTPUT_MIME_TYPE] == "text/plain"
        harness.exporter.clear()


@pytest.mark.parametrize(("client_api", "provider", "system", "llm_provider"), [
    ("anthropic.messages", "anthropic", "anthropic", "anthropic"),
    ("anthropic.messages", "aws.bedrock", "anthropic", "aws"),  # the API the client spoke, whoever served it
    ("openai.chat", "anthropic", "openai", "anthropic"),
    ("openai.responses", "azure.ai.openai", "openai", "azure"),
    ("openai.completions", "openai", "openai", "openai"),
])
def test_system_is_the_client_api_and_provider_the_backend(
    harness: Harness, client_api: str, provider: str, system: str, llm_provider: str
) -> None:
    a = harness.attributes(make_record(client_api=client_api, provider=provider, request_body=None, output=None))
    assert (a[SpanAttributes.LLM_SYSTEM], a[SpanAttributes.LLM_PROVIDER]) == (system, llm_provider)


def test_hidden_inputs_and_outputs_for_other_apis() -> None:
    h = Harness({"OPENINFERENCE_HIDE_INPUTS": "true", "OPENINFERENCE_HIDE_OUTPUTS": "true"})
    try:
        for record in (anthropic_record(), responses_record()):
            a = h.attributes(record)
            assert not [k for k in a if k.startswith((IN, OUT))]
            assert a[SpanAttributes.INPUT_VALUE] == a[SpanAttributes.OUTPUT_VALUE] == "__REDACTED__"
            for secret in ("weather bot", "Paris", "pirate", "Rome", "a cat"):
                assert secret not in json.dumps({k: v for k, v in a.items() if k != SpanAttributes.METADATA})
            assert a[SpanAttributes.LLM_TOKEN_COUNT_TOTAL] > 0
            h.exporter.clear()
    finally:
        h.tracing.shutdown()


def test_hidden_input_text_keeps_the_anthropic_messages_shape() -> None:
    h = Harness({"OPENINFERENCE_HIDE_INPUT_TEXT": "true"})
    try:
        a = h.attributes(anthropic_record())
        assert a[f"{IN}.0.{ROLE}"] == "system" and a[f"{IN}.0.{CONTENT}"] == "__REDACTED__"
        assert a[f"{IN}.1.{CONTENTS}.1.{CONTENT_TEXT}"] == "__REDACTED__"
        assert a[f"{IN}.3.{CONTENT}"] == "__REDACTED__"
        assert a[f"{OUT}.0.{CONTENT}"] == "I'll check Rome."
    finally:
        h.tracing.shutdown()


def test_max_content_chars_cuts_texts_of_other_apis() -> None:
    h = Harness(max_content_chars=256)
    try:
        long = "wave " * 200
        body = {"model": "m", "max_tokens": 5, "system": long, "messages": [{"role": "user", "content": long}]}
        a = h.attributes(anthropic_record(request_body=body, output=[OutputMessage(content=long)]))
        for key in (f"{IN}.0.{CONTENT}", f"{IN}.1.{CONTENT}", f"{OUT}.0.{CONTENT}", SpanAttributes.OUTPUT_VALUE):
            assert len(a[key]) == 256 and a[key].endswith("[truncated: 1000 chars]")
    finally:
        h.tracing.shutdown()
