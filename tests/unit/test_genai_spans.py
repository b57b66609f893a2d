"""OpenTelemetry GenAI semantic-convention spans (`telemetry.span_conventions`), the response
id and the embeddings summary they record, under the OpenInference masking variables."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pydantic
import pytest
from openinference.instrumentation import REDACTED_VALUE
from openinference.semconv.trace import SpanAttributes
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as G
from opentelemetry.trace import SpanKind

from extproc.config import TelemetrySettings
from extproc.response import ResponseObserver, ResponseShape
from extproc.telemetry.record import OutputMessage, ToolCall
from extproc.usage import TokenUsage
from tests.unit.test_tracing import CHAT_BODY, Harness, make_record

BOTH = ["openinference", "gen_ai"]


def genai(**settings: Any) -> Harness:
    return Harness(**settings)


def test_default_is_openinference_only() -> None:
    assert TelemetrySettings().span_conventions == ["openinference"]
    h = Harness()
    span = h.span(make_record())
    assert span.name == "ChatCompletion"
    assert not [k for k in span.attributes or {} if k.startswith("gen_ai.")]


@pytest.mark.parametrize("value", [[], ["gen_ai", "gen_ai"], ["otel"], "gen_ai"])
def test_invalid_conventions_are_refused(value: Any) -> None:
    with pytest.raises(pydantic.ValidationError):
        TelemetrySettings(span_conventions=value)


def test_chat_span_carries_both_conventions() -> None:
    record = make_record(response_id="chatcmpl-123")
    span = Harness(span_conventions=BOTH).span(record)
    a = dict(span.attributes or {})
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == SpanKind.INTERNAL  # as the OpenInference instrumentations emit
    # OpenInference as before
    assert a[SpanAttributes.OPENINFERENCE_SPAN_KIND] == "LLM"
    assert a[SpanAttributes.LLM_TOKEN_COUNT_PROMPT] == 120
    # GenAI conventions
    assert a[G.GEN_AI_OPERATION_NAME] == "chat"
    assert a[G.GEN_AI_PROVIDER_NAME] == "openai"
    assert a[G.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert a[G.GEN_AI_RESPONSE_MODEL] == "gpt-4o-mini-2024-07-18"
    assert a[G.GEN_AI_RESPONSE_ID] == "chatcmpl-123"
    assert a[G.GEN_AI_REQUEST_TEMPERATURE] == 0.2
    assert a[G.GEN_AI_REQUEST_MAX_TOKENS] == 256
    assert a[G.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
    assert a[G.GEN_AI_USAGE_INPUT_TOKENS] == 120
    assert a[G.GEN_AI_USAGE_OUTPUT_TOKENS] == 30
    assert a["server.address"] == "api.openai.com"
    assert json.loads(a[G.GEN_AI_INPUT_MESSAGES]) == [
        {"role": "system", "parts": [{"type": "text", "content": "You are terse."}]},
        {"role": "user", "parts": [
            {"type": "text", "content": "What is in this picture, and the weather in Paris?"},
            {"type": "uri", "modality": "image", "uri": "https://example.com/cat.png"},
        ]},
        {"role": "assistant", "parts": [
            {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},
        ]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "18C, sunny"}]},
    ]
    assert json.loads(a[G.GEN_AI_OUTPUT_MESSAGES]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "It is a cat; Paris is 18C and sunny."}],
         "finish_reason": "stop"},
    ]
    tools = json.loads(a[G.GEN_AI_TOOL_DEFINITIONS])
    assert [t.get("name") or t.get("function", {}).get("name") for t in tools] == ["get_weather"]


def test_gen_ai_only_leaves_openinference_out() -> None:
    span = Harness(span_conventions=["gen_ai"]).span(make_record(session_id="s-1", user_id="u-1", tenant="acme"))
    a = dict(span.attributes or {})
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == SpanKind.CLIENT  # a call to a model elsewhere, as the GenAI conventions ask
    for key in a:
        assert not key.startswith(("llm.", "input.", "output.", "openinference.", "metadata", "session.")), key
    assert a[G.GEN_AI_OPERATION_NAME] == "chat"
    assert a[G.GEN_AI_CONVERSATION_ID] == "s-1"
    assert a["user.id"] == "u-1"
    assert a["tenant.id"] == "acme"
    assert a["http.response.status_code"] == 200
    assert json.loads(a[G.GEN_AI_OUTPUT_MESSAGES])[0]["parts"][0]["content"].startswith("It is a cat")


def test_tool_call_output_and_all_finish_reasons() -> None:
    output = [
        OutputMessage(tool_calls=[ToolCall(id="c1", name="get_weather", arguments='{"city":"Oslo"}')],
                      finish_reason="tool_calls"),
        OutputMessage(content="Later.", finish_reason="length"),
    ]
    a = dict(Harness(span_conventions=["gen_ai"]).span(make_record(output=output)).attributes or {})
    assert a[G.GEN_AI_RESPONSE_FINISH_REASONS] == ("tool_call", "length")
    first = json.loads(a[G.GEN_AI_OUTPUT_MESSAGES])[0]
    assert first["parts"] == [{"type": "tool_call", "id": "c1", "name": "get_weather", "arguments": {"city": "Oslo"}}]


def test_anthropic_system_goes_to_system_instructions() -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hi"}]}
    record = make_record(client_api="anthropic.messages", provider="anthropic", request_model="claude-sonnet-4-5",
                         request_body=body, output=[OutputMessage(content="Hello", finish_reason="end_turn")])
    a = dict(Harness(span_conventions=["gen_ai"]).span(record).attributes or {})
    assert json.loads(a[G.GEN_AI_SYSTEM_INSTRUCTIONS]) == [{"type": "text", "content": "Be brief."}]
    assert json.loads(a[G.GEN_AI_INPUT_MESSAGES]) == [{"role": "user", "parts": [{"type": "text", "content": "Hi"}]}]
    assert a[G.GEN_AI_RESPONSE_FINISH_REASONS] == ("end_turn",)
    assert a[G.GEN_AI_REQUEST_MAX_TOKENS] == 100


def test_usage_details_cache_and_reasoning() -> None:
    usage = TokenUsage(input_tokens=100, output_tokens=40, total_tokens=140, cached_input_tokens=60,
                       cache_creation_input_tokens=10, reasoning_tokens=25)
    a = dict(Harness(span_conventions=["gen_ai"]).span(make_record(usage=usage)).attributes or {})
    assert a[G.GEN_AI_USAGE_INPUT_TOKENS] == 100
    assert a[G.GEN_AI_USAGE_OUTPUT_TOKENS] == 40
    assert a[G.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 60
    assert a[G.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] == 10
    assert a[G.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == 25


def test_hide_inputs_drops_gen_ai_input_messages() -> None:
    h = Harness({"OPENINFERENCE_HIDE_INPUTS": "true"}, span_conventions=BOTH)
    a = dict(h.span(make_record()).attributes or {})
    assert G.GEN_AI_INPUT_MESSAGES not in a
    assert a[SpanAttributes.INPUT_VALUE] == REDACTED_VALUE
    assert G.GEN_AI_OUTPUT_MESSAGES in a


def test_hide_output_text_redacts_gen_ai_output_text() -> None:
    h = Harness({"OPENINFERENCE_HIDE_OUTPUT_TEXT": "true"}, span_conventions=["gen_ai"])
    a = dict(h.span(make_record()).attributes or {})
    assert json.loads(a[G.GEN_AI_OUTPUT_MESSAGES])[0]["parts"] == [{"type": "text", "content": REDACTED_VALUE}]
    assert "It is a cat" not in json.dumps(a)
    assert "Paris" in a[G.GEN_AI_INPUT_MESSAGES]


def test_hide_input_text_and_parameters() -> None:
    h = Harness({"OPENINFERENCE_HIDE_INPUT_TEXT": "true", "OPENINFERENCE_HIDE_LLM_INVOCATION_PARAMETERS": "true"},
                span_conventions=["gen_ai"])
    a = dict(h.span(make_record()).attributes or {})
    assert "You are terse" not in a[G.GEN_AI_INPUT_MESSAGES]
    assert G.GEN_AI_REQUEST_TEMPERATURE not in a
    assert G.GEN_AI_REQUEST_MAX_TOKENS not in a


def test_completions_prompts_and_choices_as_gen_ai_messages() -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["Say hi", "Say bye"], "max_tokens": 5}
    record = make_record(operation="text_completion", request_model="gpt-3.5-turbo-instruct", request_body=body,
                         output=[OutputMessage(content="hi!", finish_reason="stop"),
                                 OutputMessage(content="bye!", finish_reason="length")])
    span = Harness(span_conventions=BOTH).span(record)
    a = dict(span.attributes or {})
    assert span.name == "text_completion gpt-3.5-turbo-instruct"
    assert a[f"{SpanAttributes.LLM_PROMPTS}.1.prompt.text"] == "Say bye"
    assert a[G.GEN_AI_OPERATION_NAME] == "text_completion"
    assert [m["parts"][0]["content"] for m in json.loads(a[G.GEN_AI_INPUT_MESSAGES])] == ["Say hi", "Say bye"]
    assert [m["parts"][0]["content"] for m in json.loads(a[G.GEN_AI_OUTPUT_MESSAGES])] == ["hi!", "bye!"]
    assert a[G.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop", "length")
    assert a[G.GEN_AI_REQUEST_MAX_TOKENS] == 5


def test_embeddings_span_has_a_vector_summary_not_vectors() -> None:
    body = {"model": "text-embedding-3-small", "input": ["hello", "world"], "encoding_format": "float"}
    record = make_record(operation="embeddings", request_model="text-embedding-3-small", request_body=body,
                         usage=TokenUsage(input_tokens=2, output_tokens=0, total_tokens=2), output=None,
                         embeddings=(2, 1536))
    span = Harness(span_conventions=BOTH).span(record)
    a = dict(span.attributes or {})
    assert span.name == "embeddings text-embedding-3-small"
    assert a["embedding.embeddings.0.embedding.text"] == "hello"
    assert json.loads(a[SpanAttributes.METADATA])["embeddings"] == {"count": 2, "dimensions": 1536}
    assert not [k for k in a if k.endswith("embedding.vector")]
    assert a[G.GEN_AI_OPERATION_NAME] == "embeddings"
    assert a[G.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] == 1536
    assert a[G.GEN_AI_REQUEST_ENCODING_FORMATS] == ("float",)
    assert a[G.GEN_AI_USAGE_INPUT_TOKENS] == 2
    assert G.GEN_AI_USAGE_OUTPUT_TOKENS not in a


def test_hide_embeddings_text_under_hide_inputs() -> None:
    body = {"model": "e", "input": ["secret text"]}
    record = make_record(operation="embeddings", request_body=body, output=None, embeddings=(1, 3))
    a = dict(Harness({"OPENINFERENCE_HIDE_INPUTS": "true"}, span_conventions=BOTH).span(record).attributes or {})
    assert "secret text" not in json.dumps(a)
    assert json.loads(a[SpanAttributes.METADATA])["embeddings"] == {"count": 1, "dimensions": 3}


# -- what the response observer learns for these spans ------------------------------------------


def _observe(raw: bytes, content_type: str, shape: ResponseShape = ResponseShape.openai) -> ResponseObserver:
    observer = ResponseObserver(strip_usage=False, collect_text=False, max_json_bytes=1 << 20, shape=shape)
    observer.on_headers(200, content_type, "")
    pieces = [raw[i:i + 5] for i in range(0, len(raw), 5)]
    for i, piece in enumerate(pieces):
        observer.on_chunk(piece, i == len(pieces) - 1, float(i))
    return observer


def test_response_id_of_json_and_streams() -> None:
    body = {"id": "chatcmpl-9", "object": "chat.completion", "model": "m", "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    assert _observe(json.dumps(body).encode(), "application/json").output_id == "chatcmpl-9"
    chunk = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x"}}]}
    stream = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
    assert _observe(stream, "text/event-stream").output_id == "chatcmpl-7"
    start = {"type": "message_start", "message": {"id": "msg_01", "model": "claude", "role": "assistant",
                                                   "usage": {"input_tokens": 3, "output_tokens": 1}}}
    events = f"event: message_start\ndata: {json.dumps(start)}\n\n".encode()
    assert _observe(events, "text/event-stream", ResponseShape.anthropic).output_id == "msg_01"


def test_embeddings_summary_of_float_and_base64_vectors() -> None:
    floats = {"object": "list", "model": "e", "usage": {"prompt_tokens": 2, "total_tokens": 2},
              "data": [{"object": "embedding", "index": i, "embedding": [0.5] * 12} for i in range(3)]}
    assert _observe(json.dumps(floats).encode(), "application/json").embeddings == (3, 12)
    packed = base64.b64encode(struct.pack("<7f", *([0.25] * 7))).decode()
    b64 = {"object": "list", "model": "e", "usage": {"prompt_tokens": 1, "total_tokens": 1},
           "data": [{"object": "embedding", "index": 0, "embedding": packed}]}
    assert _observe(json.dumps(b64).encode(), "application/json").embeddings == (1, 7)


def test_chat_body_fixture_unchanged() -> None:
    """The span never modifies the request body it records from."""
    record = make_record()
    before = json.dumps(record.request_body, sort_keys=True)
    Harness(span_conventions=["gen_ai"]).span(record)
    assert json.dumps(record.request_body, sort_keys=True) == before == json.dumps(CHAT_BODY, sort_keys=True)


def test_responses_instructions_go_to_system_instructions() -> None:
    body = {"model": "gpt-4.1", "instructions": "Reply in French.", "input": "Hello", "max_output_tokens": 50}
    record = make_record(client_api="openai.responses", request_model="gpt-4.1", request_body=body,
                         response_id="resp_1", output=[OutputMessage(content="Bonjour", finish_reason="completed")])
    a = dict(Harness(span_conventions=["gen_ai"]).span(record).attributes or {})
    assert json.loads(a[G.GEN_AI_SYSTEM_INSTRUCTIONS]) == [{"type": "text", "content": "Reply in French."}]
    assert json.loads(a[G.GEN_AI_INPUT_MESSAGES]) == [{"role": "user", "parts": [{"type": "text", "content": "Hello"}]}]
    assert a[G.GEN_AI_RESPONSE_ID] == "resp_1"
    assert a[G.GEN_AI_REQUEST_MAX_TOKENS] == 50


def test_chat_system_message_stays_in_the_conversation() -> None:
    """OpenAI chat has no separate instructions: its system message is part of the history."""
    a = dict(Harness(span_conventions=["gen_ai"]).span(make_record()).attributes or {})
    assert G.GEN_AI_SYSTEM_INSTRUCTIONS not in a
    assert json.loads(a[G.GEN_AI_INPUT_MESSAGES])[0]["role"] == "system"
