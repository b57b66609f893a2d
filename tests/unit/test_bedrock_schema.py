"""extproc.translators.chat_to_bedrock(_stream) and extproc.sigv4: OpenAI <-> Bedrock Converse
translation, streams, errors, SigV4.

botocore is the oracle wherever it has an opinion: the request path its serializer
renders, the event-stream frames its decoder accepts, the signatures its signer makes.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import botocore.session
import orjson
import pytest
from botocore.eventstream import EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.schemas.openai import RequestError, usage_object
from extproc.sigv4 import sign
from extproc.sim.bedrock_api import (
    SIM_AWS_ACCESS_KEY_ID,
    SIM_AWS_SECRET_ACCESS_KEY,
    SIM_AWS_SESSION_ACCESS_KEY_ID,
    SIM_AWS_SESSION_SECRET_ACCESS_KEY,
    SIM_AWS_SESSION_TOKEN,
    BedrockError,
    encode_frame,
    event_frame,
    exception_frame,
    verify_sigv4,
)
from extproc.translators.chat_to_bedrock import (
    chat_to_converse,
    converse_path,
    converse_to_chat,
    error_to_openai,
    usage_from_bedrock,
)
from extproc.translators.chat_to_bedrock_stream import ConverseStreamTranslator
from extproc.usage import TokenUsage

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(32))).decode()
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}


# -- converse_path --------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        HAIKU,
        "amazon.nova-lite-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-20241022-v2:0",
        "my model+with spaces/and~tilde",
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_converse_path_matches_botocore_serializer(model: str, stream: bool) -> None:
    """The path is exactly the one botocore's rest-json serializer renders for the operation."""
    from botocore.serialize import create_serializer

    service = botocore.session.get_session().get_service_model("bedrock-runtime")
    operation = service.operation_model("ConverseStream" if stream else "Converse")
    serialized = create_serializer("rest-json").serialize_to_request({"modelId": model, "messages": []}, operation)
    assert converse_path(model, stream) == serialized["url_path"]


def test_converse_path_examples() -> None:
    assert converse_path(HAIKU, False) == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    assert converse_path(HAIKU, True) == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream"
    assert converse_path("arn:aws:bedrock:us-east-1:1:inference-profile/x", False) == (
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fx/converse"
    )


# -- chat_to_converse ----------------------------------------------------------------


def test_system_and_developer_messages_become_system_blocks() -> None:
    out = chat_to_converse({
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hi"},
        ],
    })
    assert out == {
        "system": [{"text": "You are terse."}, {"text": "Answer in French."}],
        "messages": [{"role": "user", "content": [{"text": "Hi"}]}],
    }
    assert "model" not in out


def test_multi_turn_and_merging_of_same_role_messages() -> None:
    out = chat_to_converse({
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "three"}]},
            {"role": "assistant", "content": "reply"},
            {"role": "assistant", "content": ""},  # empty turns are dropped, not sent blank
            {"role": "user", "content": "four"},
        ]
    })
    assert out["messages"] == [
        {"role": "user", "content": [{"text": "one"}, {"text": "two"}, {"text": "three"}]},
        {"role": "assistant", "content": [{"text": "reply"}]},
        {"role": "user", "content": [{"text": "four"}]},
    ]


@pytest.mark.parametrize(
    ("mime", "fmt"), [("image/png", "png"), ("image/jpeg", "jpeg"), ("image/jpg", "jpeg"), ("image/gif", "gif"),
                      ("image/webp", "webp")]
)
def test_data_url_images(mime: str, fmt: str) -> None:
    out = chat_to_converse({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{PNG}", "detail": "high"}},
    ]}]})
    assert out["messages"][0]["content"] == [
        {"text": "What is this?"},
        {"image": {"format": fmt, "source": {"bytes": PNG}}},
    ]


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.png",
        f"data:image/bmp;base64,{PNG}",
        "data:image/png,rawbytes",
        "data:image/png;base64,not base64!!",
    ],
)
def test_unsupported_images_are_400(url: str) -> None:
    with pytest.raises(RequestError) as info:
        chat_to_converse({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert info.value.status == 400
    assert info.value.error_type == "invalid_request_error"


def test_tool_calls_tool_results_and_tools() -> None:
    out = chat_to_converse({
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"Rome"}'}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24C"}]},
            {"role": "user", "content": "Which is warmer?"},
        ],
        "tools": [WEATHER_TOOL],
    })
    assert out["messages"] == [
        {"role": "user", "content": [{"text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"text": "Checking."},
            {"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"location": "Paris"}}},
            {"toolUse": {"toolUseId": "call_2", "name": "get_weather", "input": {"location": "Rome"}}},
        ]},
        {"role": "user", "content": [
            {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18C"}]}},
            {"toolResult": {"toolUseId": "call_2", "content": [{"text": "24C"}]}},
            {"text": "Which is warmer?"},
        ]},
    ]
    assert out["toolConfig"] == {"tools": [{"toolSpec": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]},
    }}]}


def test_assistant_with_only_tool_calls_and_null_content() -> None:
    out = chat_to_converse({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c", "content": "done"},
    ], "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert out["messages"][1]["content"] == [{"toolUse": {"toolUseId": "c", "name": "f", "input": {}}}]
    assert out["toolConfig"]["tools"][0]["toolSpec"] == {
        "name": "f", "inputSchema": {"json": {"type": "object", "properties": {}}}
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", None),
        ("required", {"any": {}}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"tool": {"name": "get_weather"}}),
    ],
)
def test_tool_choice(choice: Any, expected: Any) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    config = chat_to_converse(body)["toolConfig"]
    assert config.get("toolChoice") == expected


def test_tool_choice_none_drops_tools_unless_history_needs_them() -> None:
    plain = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL], "tool_choice": "none"}
    assert "toolConfig" not in chat_to_converse(plain)
    with_history = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "sunny"},
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": "none",
    }
    config = chat_to_converse(with_history)["toolConfig"]
    assert "toolChoice" not in config and len(config["tools"]) == 1


def test_inference_config() -> None:
    out = chat_to_converse({
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 100, "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "stop": "END",
        "seed": 7, "presence_penalty": 0.1,  # no Converse field: dropped
    })
    assert out["inferenceConfig"] == {"maxTokens": 100, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]}
    out = chat_to_converse({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stop": ["a", "b"]})
    assert out["inferenceConfig"] == {"maxTokens": 5, "stopSequences": ["a", "b"]}
    assert "inferenceConfig" not in chat_to_converse({"messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"role": "system", "content": "only a system prompt"}]},
        {"messages": ["not an object"]},
        {"messages": [{"role": "function", "content": "x", "name": "f"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
        {"messages": [{"role": "tool", "content": "no id"}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "retrieval"}]},
        {"messages": [{"role": "user", "content": "hi"}], "tools": "x"},
        {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL], "tool_choice": "sometimes"},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL],
         "tool_choice": {"type": "function", "function": {"name": "other"}}},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "10"},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        {"messages": [{"role": "user", "content": "hi"}], "top_p": True},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 1.5},
        {"messages": [{"role": "user", "content": "hi"}], "top_p": -0.1},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ""},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]},
        {"messages": [{"role": "user", "content": "hi"}], "stop": [1]},
        {"messages": [{"role": "user", "content": "hi"}], "n": 2},
    ],
)
def test_invalid_requests_are_400(body: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as info:
        chat_to_converse(body)
    assert info.value.status == 400
    assert info.value.error_type == "invalid_request_error"


# -- converse_to_chat --------------------------------------------------------------------


def converse_response(content: list[dict[str, Any]], stop: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": stop,
        "usage": usage or {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15},
        "metrics": {"latencyMs": 120},
    }


def test_text_response() -> None:
    out = converse_to_chat(converse_response([{"text": "Hello"}, {"text": " world"}], "end_turn"), "claude")
    ChatCompletion.model_validate(out)
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion" and out["model"] == "claude"
    assert out["choices"] == [{
        "index": 0, "logprobs": None, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "Hello world", "refusal": None},
    }]
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                            "prompt_tokens_details": {"cached_tokens": 0}}


def test_tool_use_response() -> None:
    response = converse_response([
        {"text": "Let me check."},
        {"toolUse": {"toolUseId": "tooluse_abc", "name": "get_weather", "input": {"location": "Paris", "days": 2}}},
    ], "tool_use")
    out = converse_to_chat(response, "claude")
    completion = ChatCompletion.model_validate(out)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == ("tooluse_abc", "function", "get_weather")
    assert orjson.loads(call.function.arguments) == {"location": "Paris", "days": 2}
    only_tool = converse_to_chat(converse_response(response["output"]["message"]["content"][1:], "tool_use"), "m")
    assert only_tool["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("guardrail_intervened", "content_filter"), ("content_filtered", "content_filter"),
     ("model_context_window_exceeded", "length"), ("something_new", "stop")],
)
def test_stop_reasons(stop: str, finish: str) -> None:
    out = converse_to_chat(converse_response([{"text": "x"}], stop), "m")
    assert out["choices"][0]["finish_reason"] == finish
    ChatCompletion.model_validate(out)


def test_reasoning_content_and_missing_usage() -> None:
    response = converse_response([
        {"reasoningContent": {"reasoningText": {"text": "thinking...", "signature": "sig"}}}, {"text": "42"}
    ], "end_turn")
    del response["usage"]
    out = converse_to_chat(response, "m")
    assert out["choices"][0]["message"]["reasoning_content"] == "thinking..."
    assert out["choices"][0]["message"]["content"] == "42"
    assert "usage" not in out
    ChatCompletion.model_validate(out)


# -- usage -------------------------------------------------------------------------------


def test_usage_plain() -> None:
    assert usage_from_bedrock({"inputTokens": 100, "outputTokens": 20, "totalTokens": 120}) == TokenUsage(
        input_tokens=100, output_tokens=20, total_tokens=120, cached_input_tokens=0, cache_creation_input_tokens=None
    )


def test_usage_with_cache_read_and_write() -> None:
    """Bedrock's inputTokens excludes cache reads and writes; OpenAI's prompt_tokens is the whole prompt."""
    usage = usage_from_bedrock({
        "inputTokens": 4, "outputTokens": 136, "totalTokens": 1338,
        "cacheReadInputTokens": 100, "cacheWriteInputTokens": 1098,
    })
    assert usage == TokenUsage(
        input_tokens=1202, output_tokens=136, total_tokens=1338, cached_input_tokens=100,
        cache_creation_input_tokens=1098,
    )
    assert usage_object(usage) == {
        "prompt_tokens": 1202, "completion_tokens": 136, "total_tokens": 1338,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_creation_tokens": 1098},
    }
    zero_write = usage_from_bedrock({"inputTokens": 1, "outputTokens": 1, "cacheWriteInputTokens": 0})
    assert zero_write is not None and zero_write.cache_creation_input_tokens == 0


def test_usage_garbage() -> None:
    assert usage_from_bedrock(None) is None
    assert usage_from_bedrock("x") is None
    usage = usage_from_bedrock({"inputTokens": -3, "outputTokens": True, "cacheReadInputTokens": "7"})
    assert usage == TokenUsage()


# -- error_to_openai ------------------------------------------------------------------------

_NS = ":http://internal.amazon.com/coral/com.amazon.bedrock/"


@pytest.mark.parametrize(
    ("status", "header", "etype", "code"),
    [
        (429, "ThrottlingException", "requests", "rate_limit_exceeded"),
        (400, "ValidationException", "invalid_request_error", None),
        (403, "AccessDeniedException", "permission_error", "permission_denied"),
        (403, "UnrecognizedClientException", "invalid_request_error", "invalid_api_key"),
        (403, "InvalidSignatureException", "invalid_request_error", "invalid_api_key"),
        (404, "ResourceNotFoundException", "invalid_request_error", "not_found"),
        (408, "ModelTimeoutException", "server_error", "timeout"),
        (503, "ServiceUnavailableException", "server_error", "service_unavailable"),
        (500, "InternalServerException", "server_error", None),
        (424, "ModelErrorException", "server_error", "model_error"),
        (429, None, "requests", "rate_limit_exceeded"),
        (502, None, "server_error", None),
        (418, "SomethingNewException", "invalid_request_error", None),
    ],
)
def test_error_mapping(status: int, header: str | None, etype: str, code: str | None) -> None:
    out = orjson.loads(error_to_openai(status, b'{"message":"Too many requests, please wait."}',
                                       f"{header}{_NS}" if header else None))
    assert out == {"error": {"message": "Too many requests, please wait.", "type": etype, "param": None, "code": code}}


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"", None, "Bedrock returned HTTP 503"),
        (b"upstream connect error", None, "upstream connect error"),
        (b'{"Message":"capital"}', "ThrottlingException", "capital"),
        (b'{"__type":"com.amazon.coral#ThrottlingException","message":"typed"}', None, "typed"),
        (b"[1,2]", "ThrottlingException", "Bedrock returned HTTP 503 (ThrottlingException)"),
        (b"\xff\xfe garbage", "", "\ufffd\ufffd garbage"),
    ],
)
def test_error_bodies_never_raise(body: bytes, header: str | None, message: str) -> None:
    out = orjson.loads(error_to_openai(503, body, header))
    assert out["error"]["message"] == message
    if b"Throttling" in body or header == "ThrottlingException":
        assert out["error"]["code"] == "rate_limit_exceeded"


# -- ConverseStreamTranslator --------------------------------------------------------------

METADATA = {"usage": {"inputTokens": 12, "outputTokens": 7, "totalTokens": 119, "cacheReadInputTokens": 100},
            "metrics": {"latencyMs": 321}}
TEXT_PIECES = ["Hel", "lo, ", "wörld ", "🙂", "!"]
TOOL_INPUT = ['{"loc', 'ation": "Pa', 'ris"}']


def text_stream() -> bytes:
    frames = [event_frame("messageStart", {"role": "assistant", "p": "abc"})]
    frames += [event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": t}, "p": "ab"})
               for t in TEXT_PIECES]
    frames += [event_frame("contentBlockStop", {"contentBlockIndex": 0}),
               event_frame("messageStop", {"stopReason": "end_turn"}), event_frame("metadata", METADATA)]
    return b"".join(frames)


def tool_stream() -> bytes:
    frames = [event_frame("messageStart", {"role": "assistant"}),
              event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Checking."}}),
              event_frame("contentBlockStop", {"contentBlockIndex": 0})]
    for block, call_id in ((1, "tooluse_A"), (2, "tooluse_B")):
        frames.append(event_frame("contentBlockStart", {
            "contentBlockIndex": block, "start": {"toolUse": {"toolUseId": call_id, "name": "get_weather"}}}))
        frames += [event_frame("contentBlockDelta", {"contentBlockIndex": block, "delta": {"toolUse": {"input": p}}})
                   for p in TOOL_INPUT]
        frames.append(event_frame("contentBlockStop", {"contentBlockIndex": block}))
    frames += [event_frame("messageStop", {"stopReason": "tool_use"}), event_frame("metadata", METADATA)]
    return b"".join(frames)


def exception_stream() -> bytes:
    return b"".join([
        event_frame("messageStart", {"role": "assistant"}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "partial"}}),
        exception_frame("throttlingException", "Too many tokens, please wait before trying again."),
    ])


STREAMS = {"text": text_stream(), "tool": tool_stream(), "exception": exception_stream()}


def sse_payloads(raw: bytes) -> list[Any]:
    assert raw.endswith(b"\n\n") or not raw
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    return [e[6:].decode() if e == b"data: [DONE]" else orjson.loads(e[6:]) for e in events]


def translate(data: bytes, cuts: list[int], include_usage: bool = True) -> tuple[ConverseStreamTranslator, bytes]:
    translator = ConverseStreamTranslator("claude-haiku", include_usage)
    bounds = [0, *sorted(set(cuts)), len(data)]
    out = b"".join(translator.feed(data[a:b]) for a, b in zip(bounds, bounds[1:]))
    return translator, out + translator.finish()


def normalized(raw: bytes) -> list[Any]:
    """Chunks without the per-translator id and timestamp."""
    out = []
    for chunk in sse_payloads(raw):
        if isinstance(chunk, dict):
            chunk = {k: v for k, v in chunk.items() if k not in ("id", "created")}
        out.append(chunk)
    return out


def test_botocore_decodes_the_sim_encoder() -> None:
    """The simulator's frames are what botocore's own decoder expects (headers, payload, CRCs)."""
    buffer = EventStreamBuffer()
    buffer.add_data(text_stream() + exception_stream())
    messages = list(buffer)
    assert len(messages) == (1 + len(TEXT_PIECES) + 3) + 3
    assert messages[1].headers == {":event-type": "contentBlockDelta", ":content-type": "application/json",
                                   ":message-type": "event"}
    assert orjson.loads(messages[1].payload)["delta"] == {"text": "Hel"}
    assert messages[-1].headers[":message-type"] == "exception"
    assert messages[-1].headers[":exception-type"] == "throttlingException"
    assert encode_frame({}, b"")[:8] == b"\x00\x00\x00\x10\x00\x00\x00\x00"


def test_text_stream_translation() -> None:
    translator, raw = translate(STREAMS["text"], [])
    chunks = sse_payloads(raw)
    assert chunks[-1] == "[DONE]"
    for chunk in chunks[:-1]:
        ChatCompletionChunk.model_validate(chunk)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-3]) == "".join(TEXT_PIECES)
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"] == {
        "prompt_tokens": 112, "completion_tokens": 7, "total_tokens": 119, "prompt_tokens_details": {"cached_tokens": 100}
    }
    assert {c["id"] for c in chunks[:-1]} == {translator.id}
    assert {c["model"] for c in chunks[:-1]} == {"claude-haiku"} == {translator.model}
    assert translator.usage == TokenUsage(112, 7, 119, 100, None)
    assert translator.latency_ms == 321 and translator.stop_reason == "end_turn"


def test_usage_chunk_only_when_asked() -> None:
    translator, raw = translate(STREAMS["text"], [], include_usage=False)
    chunks = sse_payloads(raw)
    assert chunks[-1] == "[DONE]" and all(c["choices"] for c in chunks[:-1])
    assert translator.usage is not None and translator.usage.output_tokens == 7


def test_tool_stream_translation() -> None:
    _, raw = translate(STREAMS["tool"], [])
    chunks = sse_payloads(raw)
    for chunk in chunks[:-1]:
        ChatCompletionChunk.model_validate(chunk)
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[:-1] if c["choices"]
             and "tool_calls" in c["choices"][0]["delta"]]
    starts = [c for c in calls if "id" in c]
    assert starts == [
        {"index": 0, "id": "tooluse_A", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "tooluse_B", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
    ]
    for index in (0, 1):
        arguments = "".join(c["function"].get("arguments", "") for c in calls if c["index"] == index)
        assert orjson.loads(arguments) == {"location": "Paris"}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]][-1] == "tool_calls"


def test_exception_frame_becomes_error_event() -> None:
    translator, raw = translate(STREAMS["exception"], [])
    chunks = sse_payloads(raw)
    assert chunks[-1] == {"error": {"message": "Too many tokens, please wait before trying again.",
                                    "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    assert "[DONE]" not in chunks
    assert translator.done and translator.feed(event_frame("metadata", METADATA)) == b""
    assert translator.finish() == b""


@pytest.mark.parametrize(
    ("name", "code"), [("modelStreamErrorException", "model_error"), ("validationException", None),
                       ("internalServerException", None), ("serviceUnavailableException", "service_unavailable")]
)
def test_other_stream_exceptions(name: str, code: str | None) -> None:
    _, raw = translate(exception_frame(name, "boom"), [])
    (error,) = sse_payloads(raw)
    assert error["error"]["code"] == code and error["error"]["message"] == "boom"


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(STREAMS)), data=st.data())
def test_any_split_gives_the_same_output(kind: str, data: st.DataObject) -> None:
    stream = STREAMS[kind]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    whole_translator, whole = translate(stream, [])
    split_translator, split = translate(stream, cuts)
    assert normalized(split) == normalized(whole)
    assert split_translator.usage == whole_translator.usage
    chunks = sse_payloads(split)
    if kind == "exception":
        assert "error" in chunks[-1]
    else:
        assert chunks[-1] == "[DONE]"
        assert chunks[-2]["usage"]["completion_tokens"] == 7
        assert split_translator.usage == TokenUsage(112, 7, 119, 100, None)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if isinstance(c, dict) and c.get("choices"))
    assert text == {"text": "".join(TEXT_PIECES), "tool": "Checking.", "exception": "partial"}[kind]


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, len(STREAMS["text"]) - 1), bit=st.integers(0, 7), data=st.data())
def test_any_corrupted_byte_gives_an_error_event_not_an_exception(position: int, bit: int, data: st.DataObject) -> None:
    stream = bytearray(STREAMS["text"])
    stream[position] ^= 1 << bit
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    translator, raw = translate(bytes(stream), cuts)
    chunks = sse_payloads(raw)
    assert chunks[-1] == "[DONE]" or "error" in chunks[-1]
    assert sum(1 for c in chunks if isinstance(c, dict) and "error" in c) <= 1
    if "error" in chunks[-1]:
        assert translator.error is not None and translator.done


def test_crc_mismatch_in_payload() -> None:
    stream = bytearray(STREAMS["text"])
    first = int.from_bytes(stream[:4], "big")
    stream[first + 40] ^= 0x01  # inside the second frame's headers/payload
    translator, raw = translate(bytes(stream), [first + 3])
    chunks = sse_payloads(raw)
    assert len(chunks) == 2  # the role chunk, then the error
    assert chunks[1]["error"]["code"] == "corrupt_stream" and "Checksum" in chunks[1]["error"]["message"]
    assert translator.feed(b"more") == b""


def test_absurd_frame_length_is_an_error_at_once() -> None:
    translator = ConverseStreamTranslator("m", True)
    (error,) = sse_payloads(translator.feed(b"\xff\xff\xff\xff" + bytes(8)))
    assert error["error"]["code"] == "corrupt_stream"


def test_truncated_streams() -> None:
    stream = STREAMS["text"]
    translator, raw = translate(stream[:-5], [])
    assert sse_payloads(raw)[-1]["error"]["code"] == "stream_truncated"
    # messageStop seen but no metadata: the stream is complete, usage unknown
    without_metadata = stream[: len(stream) - len(event_frame("metadata", METADATA))]
    translator, raw = translate(without_metadata, [])
    assert sse_payloads(raw)[-1] == "[DONE]" and translator.usage is None
    empty = ConverseStreamTranslator("m", False)
    assert sse_payloads(empty.finish())[0]["error"]["code"] == "stream_truncated"


def test_unknown_events_and_message_types_are_ignored() -> None:
    stream = (encode_frame({":message-type": "event", ":event-type": "futureEvent"}, b"{}")
              + encode_frame({":message-type": "event", ":event-type": "contentBlockDelta"}, b"not json")
              + encode_frame({":message-type": "something"}, b"")
              + STREAMS["text"])
    _, raw = translate(stream, [])
    assert normalized(raw) == normalized(translate(STREAMS["text"], [])[1])


def test_error_message_type() -> None:
    frame = encode_frame({":message-type": "error", ":error-code": "InternalFailure", ":error-message": "oops"}, b"")
    _, raw = translate(frame, [])
    assert sse_payloads(raw) == [{"error": {"message": "oops", "type": "server_error", "param": None, "code": None}}]


def test_large_frame_in_tiny_chunks() -> None:
    """A frame bigger than any chunk is assembled once, not re-copied on every feed."""
    big = "x" * 200_000
    stream = event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": big}})
    translator = ConverseStreamTranslator("m", False)
    out = [translator.feed(stream[i:i + 7]) for i in range(0, len(stream), 7)]
    assert all(not o for o in out[:-1])
    assert orjson.loads(out[-1][6:])["choices"][0]["delta"]["content"] == big


# -- SigV4 -----------------------------------------------------------------------------------

URL = "http://127.0.0.1:8123" + converse_path(HAIKU, False)
BODY = orjson.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})


def signed(url: str = URL, body: bytes = BODY, **kwargs: Any) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    args: dict[str, Any] = {"access_key": SIM_AWS_ACCESS_KEY_ID, "secret_key": SIM_AWS_SECRET_ACCESS_KEY} | kwargs
    return headers | sign("POST", url, headers, body, "us-east-1", **args)


def received(headers: dict[str, str], host: str = "127.0.0.1:8123") -> list[tuple[str, str]]:
    """What the server sees: the signed headers plus ones added on the way."""
    return [("Host", host), *headers.items(), ("User-Agent", "curl/8"), ("Content-Length", str(len(BODY)))]


def test_sign_is_verified() -> None:
    headers = signed()
    assert set(headers) == {"content-type", "authorization", "x-amz-date"}
    assert "SignedHeaders=content-type;host;x-amz-date," in headers["authorization"]
    assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={SIM_AWS_ACCESS_KEY_ID}/")
    assert "/us-east-1/bedrock/aws4_request" in headers["authorization"]
    assert verify_sigv4("POST", URL, received(headers), BODY) == SIM_AWS_ACCESS_KEY_ID


def test_sign_returns_only_added_headers_and_defaults_content_type() -> None:
    added = sign("POST", URL, {}, BODY, "eu-west-1", SIM_AWS_ACCESS_KEY_ID, SIM_AWS_SECRET_ACCESS_KEY)
    assert added["content-type"] == "application/json"
    assert "x-amz-content-sha256" not in added and "x-amz-security-token" not in added
    kept = sign("POST", URL, {"Content-Type": "application/json", "Accept": "application/json"}, BODY, "eu-west-1",
                SIM_AWS_ACCESS_KEY_ID, SIM_AWS_SECRET_ACCESS_KEY)
    assert set(kept) == {"authorization", "x-amz-date"}
    assert "SignedHeaders=accept;content-type;host;x-amz-date," in kept["authorization"]


def test_session_token() -> None:
    headers = signed(access_key=SIM_AWS_SESSION_ACCESS_KEY_ID, secret_key=SIM_AWS_SESSION_SECRET_ACCESS_KEY,
                     session_token=SIM_AWS_SESSION_TOKEN)
    assert headers["x-amz-security-token"] == SIM_AWS_SESSION_TOKEN
    assert "x-amz-security-token" in headers["authorization"].split("SignedHeaders=")[1].split(",")[0]
    assert verify_sigv4("POST", URL, received(headers), BODY) == SIM_AWS_SESSION_ACCESS_KEY_ID
    without = {k: v for k, v in headers.items() if k != "x-amz-security-token"}
    with pytest.raises(BedrockError):
        verify_sigv4("POST", URL, received(without), BODY)


def test_arn_model_path_signature() -> None:
    url = "https://bedrock-runtime.us-east-1.amazonaws.com" + converse_path(
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-haiku-20240307-v1:0", True)
    headers = signed(url=url)
    verify_sigv4("POST", url, received(headers, host="bedrock-runtime.us-east-1.amazonaws.com"), BODY)


@pytest.mark.parametrize(
    "tamper",
    ["body", "content-type", "path", "host", "secret", "date-header", "query"],
)
def test_tampering_fails(tamper: str) -> None:
    headers = signed(secret_key="wrong") if tamper == "secret" else signed()
    url, body, host = URL, BODY, "127.0.0.1:8123"
    if tamper == "body":
        body = BODY.replace(b"hi", b"ho")
    elif tamper == "content-type":
        headers["content-type"] = "text/plain"
    elif tamper == "path":
        url = URL.replace("%3A", ":")
    elif tamper == "host":
        host = "127.0.0.1:9999"
    elif tamper == "date-header":
        stamp = headers["x-amz-date"]  # a different second, whatever the clock said
        headers["x-amz-date"] = stamp[:-3] + ("58Z" if stamp.endswith("59Z") else "59Z")
    elif tamper == "query":
        url += "?x=1"
    with pytest.raises(BedrockError) as info:
        verify_sigv4("POST", url, received(headers, host=host), body)
    assert info.value.status == 403
    assert info.value.error_type == "InvalidSignatureException"
    assert info.value.message.startswith("The request signature we calculated does not match")


def test_missing_and_malformed_authorization() -> None:
    with pytest.raises(BedrockError) as info:
        verify_sigv4("POST", URL, [("Host", "127.0.0.1:8123")], BODY)
    assert (info.value.status, info.value.error_type) == (403, "MissingAuthenticationTokenException")
    with pytest.raises(BedrockError) as info:
        verify_sigv4("POST", URL, [("Authorization", "AWS4-HMAC-SHA256 Credential=x")], BODY)
    assert info.value.error_type == "IncompleteSignatureException"
    headers = signed(access_key="AKIDUNKNOWN")
    with pytest.raises(BedrockError) as info:
        verify_sigv4("POST", URL, received(headers), BODY)
    assert info.value.error_type == "UnrecognizedClientException"
    headers = signed(service="s3")
    with pytest.raises(BedrockError) as info:
        verify_sigv4("POST", URL, received(headers), BODY)
    assert info.value.error_type == "InvalidSignatureException"


@pytest.mark.parametrize(("skew", "ok"), [(-14, True), (14, True), (-16, False), (16, False)])
def test_clock_skew(skew: int, ok: bool) -> None:
    then = datetime.now(UTC) + timedelta(minutes=skew)
    with mock.patch("botocore.auth.get_current_datetime", return_value=then.replace(tzinfo=None)):
        headers = signed()
    if ok:
        verify_sigv4("POST", URL, received(headers), BODY)
        return
    with pytest.raises(BedrockError) as info:
        verify_sigv4("POST", URL, received(headers), BODY)
    assert info.value.status == 403 and "Signature" in info.value.message


def test_the_server_does_not_import_botocore() -> None:
    """botocore (~5 MiB a worker) loads with the first Bedrock request or signature, so
    workers without a Bedrock backend never load it."""
    code = ("import sys, extproc.server; loaded = [m for m in sys.modules if m.startswith('botocore')]; "
            "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["delta", "text", "toolUse", "input", "start", "toolUseId", "name", "contentBlockIndex",
                         "stopReason", "usage", "inputTokens", "metrics", "latencyMs", "reasoningContent", "message"]),
        inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.tuples(
    st.sampled_from(["messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop", "messageStop",
                     "metadata", "exception"]), _JSON), max_size=6))
def test_odd_payloads_never_raise(frames: list[tuple[str, Any]]) -> None:
    """Well-framed events with unexpected JSON shapes are skipped or mapped, never an exception."""
    stream = b"".join(
        encode_frame({":message-type": "exception", ":exception-type": "throttlingException"}, orjson.dumps(payload))
        if kind == "exception" else encode_frame({":message-type": "event", ":event-type": kind}, orjson.dumps(payload))
        for kind, payload in frames
    )
    _, raw = translate(stream, [])
    for chunk in sse_payloads(raw):
        if isinstance(chunk, dict) and "choices" in chunk:
            ChatCompletionChunk.model_validate(chunk)


_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "other"])},
    optional={
        "content": _JSON | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "refusal"])},
                                                          optional={"text": _JSON, "image_url": _JSON}), max_size=3),
        "tool_calls": _JSON | st.lists(st.fixed_dictionaries(
            {"id": _JSON, "function": st.fixed_dictionaries({"name": _JSON, "arguments": _JSON})}), max_size=2),
        "tool_call_id": _JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(body=st.fixed_dictionaries({"messages": st.lists(_MESSAGE, max_size=4)}, optional={
    "tools": _JSON, "tool_choice": _JSON, "max_tokens": _JSON, "temperature": _JSON, "stop": _JSON, "n": _JSON}))
def test_any_request_translates_or_is_a_400(body: dict[str, Any]) -> None:
    try:
        out = chat_to_converse(body)
    except RequestError as exc:
        assert exc.status == 400
        return
    orjson.dumps(out)
    roles = [m["role"] for m in out["messages"]]
    assert all(a != b for a, b in zip(roles, roles[1:]))


def test_non_ascii_signature_is_a_mismatch_not_a_crash() -> None:
    headers = signed()
    headers["authorization"] = headers["authorization"][:-4] + "éééé"
    with pytest.raises(BedrockError) as info:
        verify_sigv4("POST", URL, received(headers), BODY)
    assert info.value.error_type == "InvalidSignatureException"
