"""OpenInference spans from RequestRecords: names, parentage, attributes, masking, bounds, export."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import pytest
from openinference.instrumentation import REDACTED_VALUE
from openinference.semconv.trace import (
    ChoiceAttributes,
    EmbeddingAttributes,
    ImageAttributes,
    MessageAttributes,
    MessageContentAttributes,
    OpenInferenceLLMProviderValues,
    OpenInferenceLLMSystemValues,
    OpenInferenceMimeTypeValues,
    OpenInferenceSpanKindValues,
    PromptAttributes,
    SpanAttributes,
    ToolAttributes,
    ToolCallAttributes,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from extproc.config import TelemetrySettings
from extproc.telemetry import span_attributes
from extproc.telemetry import tracing as tracing_module
from extproc.telemetry.record import OutputMessage, RequestRecord, ToolCall
from extproc.telemetry.tracing import SpanHandle, Tracing
from extproc.usage import TokenUsage
from tests.otlp_receiver import OtlpReceiver

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()
TRACESTATE = b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"

IN = SpanAttributes.LLM_INPUT_MESSAGES
OUT = SpanAttributes.LLM_OUTPUT_MESSAGES
ROLE = MessageAttributes.MESSAGE_ROLE
CONTENT = MessageAttributes.MESSAGE_CONTENT
CONTENTS = MessageAttributes.MESSAGE_CONTENTS
TOOL_CALLS = MessageAttributes.MESSAGE_TOOL_CALLS
CONTENT_TYPE = MessageContentAttributes.MESSAGE_CONTENT_TYPE
CONTENT_TEXT = MessageContentAttributes.MESSAGE_CONTENT_TEXT
IMAGE_URL = f"{MessageContentAttributes.MESSAGE_CONTENT_IMAGE}.{ImageAttributes.IMAGE_URL}"
JSON = OpenInferenceMimeTypeValues.JSON.value
TEXT = OpenInferenceMimeTypeValues.TEXT.value

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CHAT_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "stream": False,
    "temperature": 0.2,
    "max_tokens": 256,
    "tools": [TOOL],
    "tool_choice": "auto",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    ],
}


def make_record(**overrides: Any) -> RequestRecord:
    values: dict[str, Any] = dict(
        operation="chat",
        provider="openai",
        request_model="gpt-4o-mini",
        backend_model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18",
        backend="openai-main",
        route="default",
        server_address="api.openai.com",
        server_port=443,
        stream=False,
        status=200,
        error_type=None,
        usage=TokenUsage(input_tokens=120, output_tokens=30, total_tokens=150),
        start_time_ns=time.time_ns(),
        started_at=100.0,
        ended_at=100.75,
        first_output_at=None,
        last_output_at=None,
        complete=True,
        processor_seconds=0.002,
        request_body=json.loads(json.dumps(CHAT_BODY)),
        output=[OutputMessage(content="It is a cat; Paris is 18C and sunny.", finish_reason="stop")],
    )
    values.update(overrides)
    return RequestRecord(**values)


class Harness:
    def __init__(self, environ: dict[str, str] | None = None, **settings: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracing = Tracing(
            TelemetrySettings(**settings), environ={} if environ is None else environ,
            span_processor=SimpleSpanProcessor(self.exporter),
        )

    def start(self, operation: str = "chat", headers: dict[str, bytes] | None = None) -> SpanHandle:
        handle = self.tracing.start(operation, headers or {}, time.time_ns())
        assert handle is not None
        return handle

    def span(self, record: RequestRecord, headers: dict[str, bytes] | None = None) -> ReadableSpan:
        handle = self.start(record.operation, headers)
        self.tracing.finish(handle, record)
        spans = self.exporter.get_finished_spans()
        assert len(spans) == 1
        return spans[0]

    def attributes(self, record: RequestRecord, **kw: Any) -> dict[str, Any]:
        return dict(self.span(record, **kw).attributes or {})


@pytest.fixture
def harness() -> Harness:
    h = Harness()
    yield h
    h.tracing.shutdown()


def keys_under(attributes: dict[str, Any], prefix: str) -> list[str]:
    return [k for k in attributes if k.startswith(prefix)]


# -- names, kinds, parentage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "name", "kind"),
    [
        ("chat", "ChatCompletion", OpenInferenceSpanKindValues.LLM.value),
        ("text_completion", "Completion", OpenInferenceSpanKindValues.LLM.value),
        ("embeddings", "CreateEmbeddings", OpenInferenceSpanKindValues.EMBEDDING.value),
    ],
)
def test_span_name_and_kinds_per_operation(harness: Harness, operation: str, name: str, kind: str) -> None:
    span = harness.span(make_record(operation=operation, request_body=None, output=None))
    assert span.name == name
    assert span.kind is SpanKind.INTERNAL
    assert span.attributes[SpanAttributes.OPENINFERENCE_SPAN_KIND] == kind


def test_span_is_child_of_client_traceparent_and_injected_upstream(harness: Harness) -> None:
    handle = harness.start("chat", {"traceparent": TRACEPARENT, "tracestate": TRACESTATE})
    injected = dict(harness.tracing.inject(handle))
    harness.tracing.finish(handle, make_record())
    (span,) = harness.exporter.get_finished_spans()

    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.parent.is_remote
    version, trace_id, span_id, flags = injected["traceparent"].decode().split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id == format(span.context.span_id, "016x") != PARENT_ID
    assert injected["tracestate"] == TRACESTATE
    assert set(injected) == {"traceparent", "tracestate"}
    assert all(isinstance(v, bytes) for v in injected.values())


def test_no_traceparent_starts_a_new_root_trace(harness: Harness) -> None:
    handle = harness.start("chat", {"baggage": b"k=v"})
    injected = dict(harness.tracing.inject(handle))
    harness.tracing.finish(handle, make_record())
    (span,) = harness.exporter.get_finished_spans()
    assert span.parent is None
    assert set(injected) == {"traceparent"}
    _, trace_id, span_id, flags = injected["traceparent"].decode().split("-")
    assert trace_id == format(span.context.trace_id, "032x") != "0" * 32
    assert span_id == format(span.context.span_id, "016x")
    assert flags == "01"


def test_malformed_traceparent_starts_a_new_root_trace(harness: Harness) -> None:
    span = harness.span(make_record(), headers={"traceparent": b"00-zzzz-not-a-trace"})
    assert span.parent is None


def test_sampled_out_parent_is_propagated_but_not_recorded(harness: Harness) -> None:
    handle = harness.start("chat", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00".encode()})
    assert not handle.is_recording
    injected = dict(harness.tracing.inject(handle))
    assert injected["traceparent"].decode().startswith(f"00-{TRACE_ID}-")
    assert injected["traceparent"].decode().endswith("-00")
    harness.tracing.finish(handle, make_record())
    assert harness.exporter.get_finished_spans() == ()


def test_span_times_come_from_start_and_record_duration(harness: Harness) -> None:
    span = harness.span(make_record(started_at=10.0, ended_at=12.5))
    assert span.end_time - span.start_time == 2_500_000_000


# -- attributes --------------------------------------------------------------------------------------


def test_chat_with_tool_calls_records_input_output_and_tools(harness: Harness) -> None:
    record = make_record(
        output=[
            OutputMessage(
                content="",
                tool_calls=[
                    ToolCall(id="call_2", name="get_weather", arguments='{"city":"Rome"}'),
                    ToolCall(id="call_3", name="get_weather", arguments='{"city":"Oslo"}'),
                ],
                finish_reason="tool_calls",
            )
        ],
        session_id="session-42",
        user_id="user-7",
        attributes={"tenant": "acme"},
    )
    a = harness.attributes(record)

    assert a[SpanAttributes.OPENINFERENCE_SPAN_KIND] == "LLM"
    assert a[SpanAttributes.LLM_MODEL_NAME] == "gpt-4o-mini-2024-07-18"
    assert a[SpanAttributes.LLM_REQUEST_MODEL_NAME] == "gpt-4o-mini"
    assert a[SpanAttributes.LLM_RESPONSE_MODEL_NAME] == "gpt-4o-mini-2024-07-18"
    assert a[SpanAttributes.LLM_PROVIDER] == OpenInferenceLLMProviderValues.OPENAI.value
    assert a[SpanAttributes.LLM_SYSTEM] == OpenInferenceLLMSystemValues.OPENAI.value
    assert json.loads(a[SpanAttributes.LLM_INVOCATION_PARAMETERS]) == {
        "temperature": 0.2,
        "max_tokens": 256,
        "tool_choice": "auto",
    }
    assert json.loads(a[f"{SpanAttributes.LLM_TOOLS}.0.{ToolAttributes.TOOL_JSON_SCHEMA}"]) == TOOL

    # input messages
    assert a[f"{IN}.0.{ROLE}"] == "system"
    assert a[f"{IN}.0.{CONTENT}"] == "You are terse."
    assert a[f"{IN}.1.{ROLE}"] == "user"
    assert f"{IN}.1.{CONTENT}" not in a
    assert a[f"{IN}.1.{CONTENTS}.0.{CONTENT_TYPE}"] == "text"
    assert a[f"{IN}.1.{CONTENTS}.0.{CONTENT_TEXT}"] == "What is in this picture, and the weather in Paris?"
    assert a[f"{IN}.1.{CONTENTS}.1.{CONTENT_TYPE}"] == "image"
    assert a[f"{IN}.1.{CONTENTS}.1.{IMAGE_URL}"] == "https://example.com/cat.png"
    assert a[f"{IN}.2.{ROLE}"] == "assistant"
    assert f"{IN}.2.{CONTENT}" not in a
    assert a[f"{IN}.2.{TOOL_CALLS}.0.{ToolCallAttributes.TOOL_CALL_ID}"] == "call_1"
    assert a[f"{IN}.2.{TOOL_CALLS}.0.{ToolCallAttributes.TOOL_CALL_FUNCTION_NAME}"] == "get_weather"
    assert a[f"{IN}.2.{TOOL_CALLS}.0.{ToolCallAttributes.TOOL_CALL_FUNCTION_ARGUMENTS_JSON}"] == '{"city":"Paris"}'
    assert a[f"{IN}.3.{ROLE}"] == "tool"
    assert a[f"{IN}.3.{MessageAttributes.MESSAGE_TOOL_CALL_ID}"] == "call_1"
    assert a[f"{IN}.3.{CONTENT}"] == "18C, sunny"

    # output messages
    assert a[f"{OUT}.0.{ROLE}"] == "assistant"
    assert f"{OUT}.0.{CONTENT}" not in a
    for k, (call_id, city) in enumerate([("call_2", "Rome"), ("call_3", "Oslo")]):
        assert a[f"{OUT}.0.{TOOL_CALLS}.{k}.{ToolCallAttributes.TOOL_CALL_ID}"] == call_id
        assert a[f"{OUT}.0.{TOOL_CALLS}.{k}.{ToolCallAttributes.TOOL_CALL_FUNCTION_NAME}"] == "get_weather"
        assert a[f"{OUT}.0.{TOOL_CALLS}.{k}.{ToolCallAttributes.TOOL_CALL_FUNCTION_ARGUMENTS_JSON}"] == (
            f'{{"city":"{city}"}}'
        )
    assert a[SpanAttributes.LLM_FINISH_REASON] == "tool_calls"

    # input / output values
    assert json.loads(a[SpanAttributes.INPUT_VALUE]) == CHAT_BODY
    assert a[SpanAttributes.INPUT_MIME_TYPE] == JSON
    output = json.loads(a[SpanAttributes.OUTPUT_VALUE])
    assert output["role"] == "assistant"
    assert [c["function"]["arguments"] for c in output["tool_calls"]] == ['{"city":"Rome"}', '{"city":"Oslo"}']
    assert [c["id"] for c in output["tool_calls"]] == ["call_2", "call_3"]
    assert a[SpanAttributes.OUTPUT_MIME_TYPE] == JSON

    # request facts
    assert a[SpanAttributes.LLM_TOKEN_COUNT_PROMPT] == 120
    assert a[SpanAttributes.LLM_TOKEN_COUNT_COMPLETION] == 30
    assert a[SpanAttributes.LLM_TOKEN_COUNT_TOTAL] == 150
    assert a[SpanAttributes.SESSION_ID] == "session-42"
    assert a[SpanAttributes.USER_ID] == "user-7"
    assert a["http.response.status_code"] == 200
    assert a["server.address"] == "api.openai.com"
    assert "error.type" not in a
    metadata = json.loads(a[SpanAttributes.METADATA])
    assert metadata["tenant"] == "acme"
    assert metadata["backend"] == "openai-main"
    assert metadata["route"] == "default"
    assert metadata["request_model"] == metadata["backend_model"] == "gpt-4o-mini"
    assert "usage_estimated" not in metadata
    assert "input_messages_omitted" not in metadata


def test_status_ok_for_success(harness: Harness) -> None:
    span = harness.span(make_record())
    assert span.status.status_code is StatusCode.OK


def test_streaming_assembled_output_is_text(harness: Harness) -> None:
    record = make_record(
        stream=True,
        started_at=1.0,
        first_output_at=1.2,
        last_output_at=1.8,
        ended_at=1.9,
        usage=TokenUsage(input_tokens=12, output_tokens=5, total_tokens=17),
        output=[OutputMessage(content="Hello there, friend.", finish_reason="stop")],
    )
    a = harness.attributes(record)
    assert a[SpanAttributes.OUTPUT_VALUE] == "Hello there, friend."
    assert a[SpanAttributes.OUTPUT_MIME_TYPE] == TEXT
    assert a[f"{OUT}.0.{ROLE}"] == "assistant"
    assert a[f"{OUT}.0.{CONTENT}"] == "Hello there, friend."
    assert a[SpanAttributes.LLM_FINISH_REASON] == "stop"
    metadata = json.loads(a[SpanAttributes.METADATA])
    assert metadata["stream"] is True
    assert metadata["time_to_first_token_ms"] == pytest.approx(200.0)
    assert metadata["time_per_output_token_ms"] == pytest.approx(150.0)


def test_several_choices_are_indexed(harness: Harness) -> None:
    record = make_record(output=[OutputMessage(content="one"), OutputMessage(content="two")])
    a = harness.attributes(record)
    assert a[f"{OUT}.0.{CONTENT}"] == "one"
    assert a[f"{OUT}.1.{CONTENT}"] == "two"
    assert [m["content"] for m in json.loads(a[SpanAttributes.OUTPUT_VALUE])] == ["one", "two"]


def test_embeddings_record_texts_but_no_vectors_or_llm_system(harness: Harness) -> None:
    body = {"model": "text-embedding-3-small", "input": ["hello", "world"], "encoding_format": "float", "dimensions": 8}
    record = make_record(
        operation="embeddings",
        request_model="text-embedding-3-small",
        backend_model="text-embedding-3-small",
        response_model="text-embedding-3-small",
        usage=TokenUsage(input_tokens=2, output_tokens=0, total_tokens=2),
        request_body=body,
        output=None,
    )
    a = harness.attributes(record)
    assert a[SpanAttributes.OPENINFERENCE_SPAN_KIND] == "EMBEDDING"
    assert a[SpanAttributes.EMBEDDING_MODEL_NAME] == "text-embedding-3-small"
    assert a[f"{SpanAttributes.EMBEDDING_EMBEDDINGS}.0.{EmbeddingAttributes.EMBEDDING_TEXT}"] == "hello"
    assert a[f"{SpanAttributes.EMBEDDING_EMBEDDINGS}.1.{EmbeddingAttributes.EMBEDDING_TEXT}"] == "world"
    assert json.loads(a[SpanAttributes.EMBEDDING_INVOCATION_PARAMETERS]) == {"encoding_format": "float", "dimensions": 8}
    assert json.loads(a[SpanAttributes.INPUT_VALUE]) == body
    assert a[SpanAttributes.LLM_TOKEN_COUNT_PROMPT] == 2
    assert a[SpanAttributes.LLM_TOKEN_COUNT_TOTAL] == 2
    assert SpanAttributes.LLM_TOKEN_COUNT_COMPLETION not in a
    assert not any(k.endswith(EmbeddingAttributes.EMBEDDING_VECTOR) for k in a)
    for absent in (SpanAttributes.LLM_SYSTEM, SpanAttributes.LLM_PROVIDER, SpanAttributes.LLM_MODEL_NAME,
                   SpanAttributes.LLM_INVOCATION_PARAMETERS, SpanAttributes.OUTPUT_VALUE):
        assert absent not in a


def test_embeddings_token_inputs_are_not_decoded(harness: Harness) -> None:
    record = make_record(operation="embeddings", request_body={"model": "e", "input": [[1, 2], [3]]}, output=None)
    a = harness.attributes(record)
    assert keys_under(a, SpanAttributes.EMBEDDING_EMBEDDINGS) == []


def test_completions_record_prompts_and_choices(harness: Harness) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["Say hi", "Say bye"], "max_tokens": 5, "stream": True}
    record = make_record(
        operation="text_completion",
        request_body=body,
        stream=True,
        output=[OutputMessage(content="hi!", finish_reason="stop"), OutputMessage(content="bye!", finish_reason="length")],
    )
    span = harness.span(record)
    a = dict(span.attributes)
    assert span.name == "Completion"
    assert a[f"{SpanAttributes.LLM_PROMPTS}.0.{PromptAttributes.PROMPT_TEXT}"] == "Say hi"
    assert a[f"{SpanAttributes.LLM_PROMPTS}.1.{PromptAttributes.PROMPT_TEXT}"] == "Say bye"
    assert a[f"{SpanAttributes.LLM_CHOICES}.0.{ChoiceAttributes.COMPLETION_TEXT}"] == "hi!"
    assert a[f"{SpanAttributes.LLM_CHOICES}.1.{ChoiceAttributes.COMPLETION_TEXT}"] == "bye!"
    assert json.loads(a[SpanAttributes.LLM_INVOCATION_PARAMETERS]) == {"max_tokens": 5}
    assert [c["text"] for c in json.loads(a[SpanAttributes.OUTPUT_VALUE])] == ["hi!", "bye!"]
    assert keys_under(a, OUT) == []


def test_single_completion_output_is_text(harness: Harness) -> None:
    record = make_record(operation="text_completion", request_body={"model": "m", "prompt": "Say hi"},
                         output=[OutputMessage(content="hi!")])
    a = harness.attributes(record)
    assert a[SpanAttributes.OUTPUT_VALUE] == "hi!"
    assert a[SpanAttributes.OUTPUT_MIME_TYPE] == TEXT
    assert a[f"{SpanAttributes.LLM_PROMPTS}.0.{PromptAttributes.PROMPT_TEXT}"] == "Say hi"


def test_token_counts_with_cache_and_reasoning(harness: Harness) -> None:
    usage = TokenUsage(input_tokens=1387, output_tokens=203, total_tokens=1590, cached_input_tokens=1280,
                       cache_creation_input_tokens=64, reasoning_tokens=192, estimated=True)
    a = harness.attributes(make_record(usage=usage))
    assert a[SpanAttributes.LLM_TOKEN_COUNT_PROMPT] == 1387
    assert a[SpanAttributes.LLM_TOKEN_COUNT_COMPLETION] == 203
    assert a[SpanAttributes.LLM_TOKEN_COUNT_TOTAL] == 1590
    assert a[SpanAttributes.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ] == 1280
    assert a[SpanAttributes.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_WRITE] == 64
    assert a[SpanAttributes.LLM_TOKEN_COUNT_COMPLETION_DETAILS_REASONING] == 192
    assert json.loads(a[SpanAttributes.METADATA])["usage_estimated"] is True


def test_zero_details_and_missing_usage_are_left_out(harness: Harness) -> None:
    a = harness.attributes(make_record(usage=TokenUsage(1, 2, 3)))
    assert SpanAttributes.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ not in a
    assert SpanAttributes.LLM_TOKEN_COUNT_COMPLETION_DETAILS_REASONING not in a
    harness.exporter.clear()
    a = harness.attributes(make_record(usage=None, session_id=None, user_id=None))
    assert not keys_under(a, "llm.token_count")
    assert SpanAttributes.SESSION_ID not in a and SpanAttributes.USER_ID not in a


def test_user_id_from_configured_header() -> None:
    h = Harness(user_id_header="X-User")
    a = h.attributes(make_record(user_id=None), headers={"x-user": b"alice"})
    assert a[SpanAttributes.USER_ID] == "alice"
    h.exporter.clear()
    a = h.attributes(make_record(user_id="bob"), headers={"x-user": b"alice"})
    assert a[SpanAttributes.USER_ID] == "bob"


def test_provider_names_map_to_openinference_values(harness: Harness) -> None:
    a = harness.attributes(make_record(provider="azure.ai.openai"))
    assert a[SpanAttributes.LLM_PROVIDER] == OpenInferenceLLMProviderValues.AZURE.value
    assert a[SpanAttributes.LLM_SYSTEM] == OpenInferenceLLMSystemValues.OPENAI.value


@pytest.mark.parametrize(
    ("status", "error_type", "complete", "expected"),
    [
        (502, "502", True, "upstream status 502"),
        (0, "timeout", False, "no response from upstream"),
        (200, "incomplete", False, "response cut off"),
    ],
)
def test_failures_set_error_status(harness: Harness, status: int, error_type: str, complete: bool, expected: str) -> None:
    span = harness.span(make_record(status=status, error_type=error_type, complete=complete, output=None))
    assert span.status.status_code is StatusCode.ERROR
    assert expected in span.status.description
    assert error_type in span.status.description
    assert span.attributes["error.type"] == error_type
    if status:
        assert span.attributes["http.response.status_code"] == status
    else:
        assert "http.response.status_code" not in span.attributes


# -- masking (the library's TraceConfig, read from the given environ) -------------------------------


def test_hide_inputs_redacts_input_value_and_drops_input_messages() -> None:
    h = Harness({"OPENINFERENCE_HIDE_INPUTS": "true"})
    assert h.tracing.records_content
    a = h.attributes(make_record())
    assert a[SpanAttributes.INPUT_VALUE] == REDACTED_VALUE
    assert SpanAttributes.INPUT_MIME_TYPE not in a
    assert keys_under(a, IN) == []
    assert keys_under(a, SpanAttributes.LLM_TOOLS) == []
    assert a[f"{OUT}.0.{CONTENT}"] == "It is a cat; Paris is 18C and sunny."  # outputs still recorded
    assert SpanAttributes.LLM_INVOCATION_PARAMETERS in a


def test_hide_inputs_also_hides_prompts_and_embedding_text() -> None:
    h = Harness({"OPENINFERENCE_HIDE_INPUTS": "TRUE"})
    a = h.attributes(make_record(operation="embeddings", request_body={"model": "e", "input": "secret"}, output=None))
    assert a[f"{SpanAttributes.EMBEDDING_EMBEDDINGS}.0.{EmbeddingAttributes.EMBEDDING_TEXT}"] == REDACTED_VALUE
    h.exporter.clear()
    a = h.attributes(make_record(operation="text_completion", request_body={"model": "m", "prompt": "secret"}))
    assert a[f"{SpanAttributes.LLM_PROMPTS}.0.{PromptAttributes.PROMPT_TEXT}"] == REDACTED_VALUE


def test_hide_output_messages_keeps_output_value() -> None:
    h = Harness({"OPENINFERENCE_HIDE_OUTPUT_MESSAGES": "true"})
    a = h.attributes(make_record())
    assert keys_under(a, OUT) == []
    assert a[SpanAttributes.OUTPUT_VALUE] == "It is a cat; Paris is 18C and sunny."
    assert keys_under(a, IN)


def test_hide_outputs_redacts_output_value() -> None:
    h = Harness({"OPENINFERENCE_HIDE_OUTPUTS": "true"})
    a = h.attributes(make_record())
    assert a[SpanAttributes.OUTPUT_VALUE] == REDACTED_VALUE
    assert SpanAttributes.OUTPUT_MIME_TYPE not in a
    assert keys_under(a, OUT) == []


def test_hide_input_text_redacts_message_text_only() -> None:
    h = Harness({"OPENINFERENCE_HIDE_INPUT_TEXT": "true"})
    a = h.attributes(make_record())
    assert a[f"{IN}.0.{CONTENT}"] == REDACTED_VALUE
    assert a[f"{IN}.1.{CONTENTS}.0.{CONTENT_TEXT}"] == REDACTED_VALUE
    assert a[f"{IN}.0.{ROLE}"] == "system"
    assert a[f"{IN}.1.{CONTENTS}.1.{IMAGE_URL}"] == "https://example.com/cat.png"


def test_hide_invocation_parameters() -> None:
    h = Harness({"OPENINFERENCE_HIDE_LLM_INVOCATION_PARAMETERS": "true"})
    a = h.attributes(make_record())
    assert SpanAttributes.LLM_INVOCATION_PARAMETERS not in a
    assert SpanAttributes.INPUT_VALUE in a


def test_long_base64_image_is_redacted_short_one_kept() -> None:
    h = Harness({"OPENINFERENCE_BASE64_IMAGE_MAX_LENGTH": "100"})
    short = "data:image/png;base64," + "A" * 50
    long = "data:image/png;base64," + "B" * 500
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": short}},
                    {"type": "image_url", "image_url": {"url": long}},
                ],
            }
        ],
    }
    a = h.attributes(make_record(request_body=body))
    assert a[f"{IN}.0.{CONTENTS}.0.{IMAGE_URL}"] == short
    assert a[f"{IN}.0.{CONTENTS}.1.{IMAGE_URL}"] == REDACTED_VALUE


def test_environ_argument_not_process_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENINFERENCE_HIDE_INPUTS", "true")
    h = Harness({})
    a = h.attributes(make_record())
    assert a[SpanAttributes.INPUT_VALUE] != REDACTED_VALUE
    assert keys_under(a, IN)


def test_records_content_false_when_everything_is_hidden() -> None:
    hidden = {
        "OPENINFERENCE_HIDE_INPUTS": "true",
        "OPENINFERENCE_HIDE_OUTPUTS": "true",
        "OPENINFERENCE_HIDE_LLM_INVOCATION_PARAMETERS": "true",
    }
    assert not Harness(hidden).tracing.records_content
    assert Harness({**hidden, "OPENINFERENCE_HIDE_OUTPUTS": "false"}).tracing.records_content


# -- bounds ----------------------------------------------------------------------------------------------


def test_huge_message_is_truncated_to_max_content_chars() -> None:
    limit = 4096
    h = Harness(max_content_chars=limit)
    huge = "x" * (5 * 1024 * 1024)
    body = {"model": "m", "messages": [{"role": "user", "content": huge}]}
    a = h.attributes(make_record(request_body=body, output=[OutputMessage(content=huge)]))
    content = a[f"{IN}.0.{CONTENT}"]
    assert len(content) <= limit
    assert content.startswith("xxxx") and "truncated" in content
    assert len(a[SpanAttributes.INPUT_VALUE]) <= limit
    assert a[SpanAttributes.INPUT_MIME_TYPE] == TEXT  # a cut JSON document is no longer JSON
    assert len(a[SpanAttributes.OUTPUT_VALUE]) <= limit
    assert len(a[f"{OUT}.0.{CONTENT}"]) <= limit
    assert all(len(v) <= limit for v in a.values() if isinstance(v, str))
    assert json.loads(a[SpanAttributes.METADATA])["values_truncated"] >= 4


def test_oldest_messages_are_left_out_when_the_span_budget_runs_out() -> None:
    limit = 1000
    h = Harness(max_content_chars=limit)
    messages = [{"role": "user", "content": f"{i:03d}" + "y" * 600} for i in range(20)]
    a = h.attributes(make_record(request_body={"model": "m", "messages": messages}))
    recorded = sorted(int(k.split(".")[2]) for k in keys_under(a, IN) if k.endswith(ROLE))
    assert recorded, "the newest messages are kept"
    assert recorded == list(range(20 - len(recorded), 20))  # a contiguous, newest suffix
    assert len(recorded) < 20
    assert json.loads(a[SpanAttributes.METADATA])["input_messages_omitted"] == 20 - len(recorded)
    content_chars = sum(len(v) for k, v in a.items() if k.startswith(IN) and isinstance(v, str))
    assert content_chars <= limit * span_attributes.SPAN_CONTENT_BUDGET_FACTOR


def test_attribute_count_stays_within_the_sdk_limit(harness: Harness) -> None:
    messages = [{"role": "user", "content": f"m{i}"} for i in range(300)]
    span = harness.span(make_record(request_body={"model": "m", "messages": messages}))
    a = dict(span.attributes)
    assert span.dropped_attributes == 0
    assert len(a) <= 128
    assert a[f"{IN}.299.{CONTENT}"] == "m299"
    assert SpanAttributes.OPENINFERENCE_SPAN_KIND in a and SpanAttributes.METADATA in a
    assert SpanAttributes.INPUT_VALUE in a and SpanAttributes.LLM_MODEL_NAME in a


def test_message_count_is_capped() -> None:
    h = Harness({"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "100000"})
    messages = [{"role": "user", "content": str(i)} for i in range(span_attributes.MAX_MESSAGES + 100)]
    a = h.attributes(make_record(request_body={"model": "m", "messages": messages}))
    indexes = sorted(int(k.split(".")[2]) for k in keys_under(a, IN) if k.endswith(ROLE))
    assert indexes == list(range(100, span_attributes.MAX_MESSAGES + 100))
    assert json.loads(a[SpanAttributes.METADATA])["input_messages_omitted"] == 100


# -- robustness --------------------------------------------------------------------------------------------


def test_finish_never_raises_and_ends_the_span_once(harness: Harness) -> None:
    odd_body = {
        "model": "m",
        "messages": ["not a message", {"role": 5, "content": {"weird": object()}, "tool_calls": "nope"}, None],
        "tools": "nope",
        "temperature": object(),
    }
    handle = harness.start("chat")
    harness.tracing.finish(handle, make_record(request_body=odd_body, output=[OutputMessage(role="", content="x")]))
    harness.tracing.finish(handle, make_record())
    assert len(harness.exporter.get_finished_spans()) == 1

    handle = harness.start("chat")
    harness.tracing.finish(handle, None)  # type: ignore[arg-type]
    assert len(harness.exporter.get_finished_spans()) == 2


def test_unknown_operation_still_gets_a_span(harness: Harness) -> None:
    span = harness.span(make_record(operation="responses", request_body=None, output=None))
    assert span.name == "responses"
    assert span.attributes[SpanAttributes.OPENINFERENCE_SPAN_KIND] == "LLM"


# -- enabling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
    ],
)
def test_disabled_without_endpoint_or_when_turned_off(environ: dict[str, str]) -> None:
    tracing = Tracing(TelemetrySettings(), environ=environ)
    assert not tracing.enabled
    assert not tracing.records_content
    assert tracing.start("chat", {"traceparent": TRACEPARENT}, time.time_ns()) is None
    tracing.shutdown()


def test_sdk_disabled_wins_over_a_span_processor() -> None:
    h = Harness({"OTEL_SDK_DISABLED": "true"})
    assert not h.tracing.enabled
    assert h.tracing.start("chat", {}, time.time_ns()) is None


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_enabled_by_an_otlp_endpoint(variable: str) -> None:
    tracing = Tracing(TelemetrySettings(), environ={variable: "http://127.0.0.1:1"})
    try:
        assert tracing.enabled and tracing.records_content
    finally:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("environ", "module", "endpoint"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http", "http://collector:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"}, "http", "http://c:4318/custom"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc", None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
          "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "grpc", None),
    ],
)
def test_exporter_follows_the_otlp_protocol(environ: dict[str, str], module: str, endpoint: str | None) -> None:
    processor = tracing_module._batch_processor(environ, process_env=False)
    try:
        exporter = processor.span_exporter
        assert f"opentelemetry.exporter.otlp.proto.{module}." in type(exporter).__module__
        if endpoint is not None:
            assert exporter._endpoint == endpoint
    finally:
        processor.shutdown()


# -- real export ------------------------------------------------------------------------------------------------


def test_exports_over_otlp_http_to_a_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    with OtlpReceiver() as receiver:
        tracing = Tracing(TelemetrySettings(), environ={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
        assert tracing.enabled
        handle = tracing.start("chat", {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}, time.time_ns())
        assert handle is not None
        injected = dict(tracing.inject(handle))
        tracing.finish(handle, make_record(session_id="s-1", usage=TokenUsage(3, 4, 7, reasoning_tokens=2)))
        tracing.finish(tracing.start("embeddings", {}, time.time_ns()),
                       make_record(operation="embeddings", request_body={"model": "e", "input": "hi"}, output=None))
        tracing.shutdown()  # flushes the batch processor

        spans = receiver.wait_for_spans(lambda spans: len(spans) >= 2, timeout=5)
        assert receiver.errors == []
        assert any(headers.get("content-encoding") == "gzip" for _, headers in receiver.requests)
        chat = next(s for s in spans if s.name == "ChatCompletion")
        assert chat.kind == "INTERNAL"
        assert chat.trace_id == TRACE_ID
        assert chat.parent_span_id == PARENT_ID
        assert injected["traceparent"].decode().split("-")[2] == chat.span_id
        assert chat.trace_state == TRACESTATE.decode()
        assert chat.status_code == "OK"
        assert chat.resource["service.name"] == "extproc"
        assert chat.attributes[SpanAttributes.OPENINFERENCE_SPAN_KIND] == "LLM"
        assert chat.attributes[SpanAttributes.LLM_MODEL_NAME] == "gpt-4o-mini-2024-07-18"
        assert chat.attributes[SpanAttributes.LLM_TOKEN_COUNT_TOTAL] == 7
        assert chat.attributes[SpanAttributes.LLM_TOKEN_COUNT_COMPLETION_DETAILS_REASONING] == 2
        assert chat.attributes[SpanAttributes.SESSION_ID] == "s-1"
        assert chat.attributes[f"{IN}.3.{MessageAttributes.MESSAGE_TOOL_CALL_ID}"] == "call_1"
        assert chat.attributes[f"{OUT}.0.{CONTENT}"] == "It is a cat; Paris is 18C and sunny."
        embeddings = next(s for s in spans if s.name == "CreateEmbeddings")
        assert embeddings.attributes[SpanAttributes.OPENINFERENCE_SPAN_KIND] == "EMBEDDING"
        assert embeddings.parent_span_id == ""


def test_service_name_comes_from_environ() -> None:
    h = Harness({"OTEL_SERVICE_NAME": "my-gateway"})
    span = h.span(make_record())
    assert span.resource.attributes["service.name"] == "my-gateway"


def test_record_is_not_modified(harness: Harness) -> None:
    record = make_record()
    before = replace(record, request_body=json.loads(json.dumps(record.request_body)))
    harness.span(record)
    assert record == before
