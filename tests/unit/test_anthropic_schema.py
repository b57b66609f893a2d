"""extproc.translators.chat_to_anthropic: OpenAI <-> Anthropic translation, checked against the openai SDK;
and extproc.schemas.anthropic: native requests, usage and errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.schemas.anthropic import (
    AnthropicRequestError,
    StreamUsage,
    error_body,
    parse_request,
    usage_from_anthropic,
    usage_from_message,
)
from extproc.schemas.openai import RequestError, usage_object
from extproc.sse import SSEDecoder
from extproc.translators.chat_to_anthropic import (
    DEFAULT_MAX_TOKENS,
    AnthropicStreamTranslator,
    chat_to_messages,
    error_to_openai,
    messages_to_chat,
)
from extproc.usage import TokenUsage

MODEL = "claude-test"
USER = {"role": "user", "content": "Hi"}


def convert(**body: Any) -> dict[str, Any]:
    return chat_to_messages({"model": "gpt-alias", "messages": [USER], **body}, MODEL)


def rejects(body: dict[str, Any], fragment: str) -> RequestError:
    with pytest.raises(RequestError) as info:
        chat_to_messages(body, MODEL)
    assert info.value.status == 400 and info.value.error_type == "invalid_request_error"
    assert fragment in info.value.message, info.value.message
    return info.value


# -- request mapping ---------------------------------------------------------------------------------


def test_minimal_request_gets_the_required_max_tokens() -> None:
    assert chat_to_messages({"model": "alias", "messages": [USER]}, MODEL) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }


def test_system_and_developer_messages_become_top_level_system() -> None:
    one = chat_to_messages({"messages": [{"role": "system", "content": "Be terse."}, USER]}, MODEL)
    assert one["system"] == "Be terse." and one["messages"] == [{"role": "user", "content": "Hi"}]
    several = chat_to_messages(
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
                USER,
                {"role": "system", "content": "Late rule."},
            ]
        },
        MODEL,
    )
    assert several["system"] == [
        {"type": "text", "text": "Be terse."},
        {"type": "text", "text": "Use metric units."},
        {"type": "text", "text": "Late rule."},
    ]


def test_multi_turn_conversation_keeps_order_and_merges_same_role_turns() -> None:
    out = chat_to_messages(
        {
            "messages": [
                {"role": "user", "content": "One"},
                {"role": "user", "content": [{"type": "text", "text": "Two"}]},
                {"role": "assistant", "content": "Three"},
                {"role": "assistant", "content": None},  # empty: says nothing, dropped
                {"role": "user", "content": "Four"},
            ]
        },
        MODEL,
    )
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "One"}, {"type": "text", "text": "Two"}]},
        {"role": "assistant", "content": "Three"},
        {"role": "user", "content": "Four"},
    ]


def test_images_data_urls_and_http_urls() -> None:
    out = convert(messages=[{
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ],
    }])
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/a.png", "http(s) URL or a base64 data: URL"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:image/tiff;base64,AAAA", "'image/tiff' is not supported"),
        ("", "non-empty string"),
    ],
)
def test_bad_images_are_400(url: str, fragment: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    error = rejects({"messages": [{"role": "user", "content": [part]}]}, fragment)
    assert error.param == "messages[0].content[0].image_url"


def test_unsupported_content_part_is_400() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    rejects({"messages": [{"role": "user", "content": [part]}]}, "'input_audio' is not supported")


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_map_to_input_schema() -> None:
    bare = {"type": "function", "function": {"name": "now"}}
    no_type = {"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}
    assert convert(tools=[WEATHER_TOOL, bare, no_type])["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
        {"name": "f", "input_schema": {"type": "object", "properties": {}}},
    ]
    rejects({"messages": [USER], "tools": [{"type": "web_search"}]}, "only function tools")
    rejects({"messages": [USER], "tools": [{"type": "function", "function": {"name": ""}}]}, "name must be")


def test_tool_calls_and_tool_results_round_trip() -> None:
    out = chat_to_messages(
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}},
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
                {"role": "user", "content": "Thanks, and tomorrow?"},
            ],
            "tools": [WEATHER_TOOL],
        },
        MODEL,
    )
    assert out["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
            ],
        },
        {
            "role": "user",  # consecutive tool results (and the next user turn) merged into one message
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
                {"type": "text", "text": "Thanks, and tomorrow?"},
            ],
        },
    ]


def test_tool_results_go_before_user_text_in_a_merged_turn() -> None:
    out = chat_to_messages(
        {
            "messages": [
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "user", "content": "Here you go"},
                {"role": "tool", "tool_call_id": "c", "content": ""},
            ]
        },
        MODEL,
    )
    assert out["messages"][1]["content"] == [
        {"type": "tool_result", "tool_use_id": "c"},
        {"type": "text", "text": "Here you go"},
    ]


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [("{not json", "is not valid JSON"), ("[1, 2]", "must encode a JSON object"), ("42", "must encode a JSON object")],
)
def test_unparsable_tool_arguments_are_400(arguments: str, fragment: str) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    error = rejects({"messages": [USER, {"role": "assistant", "tool_calls": [call]}]}, fragment)
    assert error.param == "messages[1].tool_calls[0]"


def test_tool_message_needs_its_call_id() -> None:
    rejects({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id must be a non-empty string")


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, True, None),
        (None, None, None),
    ],
)
def test_tool_choice(choice: Any, parallel: Any, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert convert(**body).get("tool_choice") == expected


def test_tool_choice_without_tools() -> None:
    assert "tool_choice" not in convert(tool_choice="auto")
    assert "tool_choice" not in convert(tool_choice="none", parallel_tool_calls=False)
    rejects({"messages": [USER], "tool_choice": "required"}, "requires 'tools'")
    rejects({"messages": [USER], "tool_choice": "sometimes", "tools": [WEATHER_TOOL]}, "'tool_choice' must be")
    rejects({"messages": [USER], "tool_choice": {"type": "function"}, "tools": [WEATHER_TOOL]}, "function.name")


def test_sampling_stop_stream_and_user() -> None:
    out = convert(temperature=0.2, top_p=0.9, stop="END", stream=True, user="u-42", max_tokens=50,
                  stream_options={"include_usage": True})
    assert out == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "stream": True,
        "metadata": {"user_id": "u-42"},
    }
    assert convert(stop=["a", "b"])["stop_sequences"] == ["a", "b"]
    assert "stop_sequences" not in convert(stop=[])
    assert "stream" not in convert(stream=False)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert convert(max_completion_tokens=10, max_tokens=99)["max_tokens"] == 10
    assert convert(max_tokens=99)["max_tokens"] == 99


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "'messages' must be a non-empty array"),
        ({"messages": []}, "'messages' must be a non-empty array"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role must be"),
        ({"messages": [{"role": "system", "content": "only system"}]}, "must contain a user or assistant"),
        ({"messages": [{"role": "user", "content": 42}]}, "must be a string or an array"),
        ({"messages": [USER], "max_tokens": 0}, "'max_tokens' must be a positive integer"),
        ({"messages": [USER], "max_completion_tokens": True}, "'max_completion_tokens' must be a positive"),
        ({"messages": [USER], "n": 2}, "'n' must be 1"),
        ({"messages": [USER], "temperature": "hot"}, "'temperature' must be a number"),
        ({"messages": [USER], "stop": [1]}, "'stop' must be a string or an array of strings"),
        ({"messages": [USER], "tools": {}}, "'tools' must be an array"),
    ],
)
def test_invalid_requests_are_400(body: dict[str, Any], fragment: str) -> None:
    rejects(body, fragment)


# -- response mapping --------------------------------------------------------------------------------

TEXT_RESPONSE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20,
              "output_tokens": 5},
}
TOOL_RESPONSE = {
    **TEXT_RESPONSE,
    "content": [
        {"type": "thinking", "thinking": "The user wants weather.", "signature": "sig"},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
    ],
    "stop_reason": "tool_use",
}


def test_text_response() -> None:
    out = messages_to_chat(TEXT_RESPONSE, "alias")
    completion = ChatCompletion.model_validate(out)
    assert completion.id == "chatcmpl-msg_01" and completion.object == "chat.completion"
    assert completion.model == "claude-sonnet-4-5-20250929" and isinstance(out["created"], int)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hello there"
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert out["usage"] == {
        "prompt_tokens": 130,
        "completion_tokens": 5,
        "total_tokens": 135,
        "prompt_tokens_details": {"cached_tokens": 100, "cache_creation_tokens": 20},
    }


def test_tool_use_response() -> None:
    out = messages_to_chat(TOOL_RESPONSE)
    completion = ChatCompletion.model_validate(out)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    calls = message.tool_calls or []
    assert [(c.id, c.type, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        ("toolu_1", "function", "get_weather", {"city": "Paris"}),
        ("toolu_2", "function", "now", {}),
    ]
    assert out["choices"][0]["message"]["reasoning_content"] == "The user wants weather."


def test_tool_only_response_has_null_content_and_model_falls_back() -> None:
    response = {**TOOL_RESPONSE, "content": TOOL_RESPONSE["content"][2:3], "model": None, "id": None}
    out = messages_to_chat(response, "alias")
    assert out["choices"][0]["message"]["content"] is None
    assert out["model"] == "alias" and out["id"].startswith("chatcmpl-")
    ChatCompletion.model_validate(out)


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"), ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"), ("tool_use", "tool_calls"), ("refusal", "content_filter"),
        ("something_new", "stop"), (None, "stop"),
    ],
)
def test_finish_reasons(stop_reason: str | None, finish: str) -> None:
    out = messages_to_chat({**TEXT_RESPONSE, "stop_reason": stop_reason})
    assert out["choices"][0]["finish_reason"] == finish
    ChatCompletion.model_validate(out)


def test_response_without_usage_has_none() -> None:
    response = {k: v for k, v in TEXT_RESPONSE.items() if k != "usage"}
    assert "usage" not in messages_to_chat(response)
    junk = messages_to_chat([1, 2], "alias")  # type: ignore[arg-type]
    assert junk["model"] == "alias" and junk["choices"][0]["message"]["content"] is None
    ChatCompletion.model_validate(junk)


# -- usage -------------------------------------------------------------------------------------------


def test_usage_counts_the_whole_prompt() -> None:
    assert usage_from_anthropic(TEXT_RESPONSE["usage"]) == TokenUsage(
        input_tokens=130, output_tokens=5, total_tokens=135, cached_input_tokens=100, cache_creation_input_tokens=20
    )
    # cache creation unknown stays None (not 0): nothing to charge, nothing reported
    plain = usage_from_anthropic({"input_tokens": 7, "output_tokens": 3})
    assert plain == TokenUsage(input_tokens=7, output_tokens=3, total_tokens=10)
    assert plain is not None and plain.cache_creation_input_tokens is None
    assert usage_object(plain) == {
        "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0},
    }
    zero = usage_from_anthropic({"input_tokens": 7, "cache_creation_input_tokens": 0, "output_tokens": 3})
    assert zero is not None and zero.cache_creation_input_tokens == 0
    assert usage_object(zero)["prompt_tokens_details"] == {"cached_tokens": 0, "cache_creation_tokens": 0}


def test_usage_ignores_junk() -> None:
    assert usage_from_anthropic(None) is None and usage_from_anthropic([1]) is None
    junk = usage_from_anthropic({"input_tokens": "7", "output_tokens": -3, "cache_read_input_tokens": True})
    assert junk == TokenUsage()
    assert usage_from_message({"usage": {"input_tokens": 2, "output_tokens": 1}}) == TokenUsage(2, 1, 3)
    assert usage_from_message({"content": []}) is None and usage_from_message("x") is None


def test_thinking_tokens_become_reasoning_tokens() -> None:
    raw = {"input_tokens": 1, "output_tokens": 9, "output_tokens_details": {"thinking_tokens": 4}}
    usage = usage_from_anthropic(raw)
    assert usage is not None and usage.reasoning_tokens == 4
    assert usage_object(usage)["completion_tokens_details"] == {"reasoning_tokens": 4}


# -- streams -----------------------------------------------------------------------------------------


def sse(*events: tuple[str, dict[str, Any]], crlf: bool = False) -> bytes:
    end = b"\r\n" if crlf else b"\n"
    return b"".join(
        b"event: " + name.encode() + end + b"data: " + orjson.dumps(data) + end + end for name, data in events
    )


def message_start(usage: dict[str, Any], model: str = "claude-sonnet-4-5") -> tuple[str, dict[str, Any]]:
    message = {"id": "msg_abc", "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": usage}
    return "message_start", {"type": "message_start", "message": message}


def block_start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}


def delta(index: int, value: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": value}


def text(index: int, value: str) -> tuple[str, dict[str, Any]]:
    return delta(index, {"type": "text_delta", "text": value})


def block_stop(index: int) -> tuple[str, dict[str, Any]]:
    return "content_block_stop", {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str, usage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                             "usage": usage}


PING = ("ping", {"type": "ping"})
STOP = ("message_stop", {"type": "message_stop"})

TEXT_PIECES = ["Hello", ", wor", "ld! ", "Ünïcødé ✓ 🎉", ""]
TEXT_EVENTS = [
    message_start({"input_tokens": 25, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 100,
                   "output_tokens": 1}),
    block_start(0, {"type": "text", "text": ""}),
    PING,
    *(text(0, p) for p in TEXT_PIECES),
    block_stop(0),
    message_delta("end_turn", {"output_tokens": 12}),
    STOP,
]
TEXT_STREAM = sse(*TEXT_EVENTS)
TEXT_USAGE = TokenUsage(input_tokens=135, output_tokens=12, total_tokens=147, cached_input_tokens=100,
                        cache_creation_input_tokens=10)

TOOL_STREAM = sse(
    message_start({"input_tokens": 30, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                   "output_tokens": 1}),
    block_start(0, {"type": "text", "text": ""}),
    PING,
    text(0, "Let me check."),
    block_stop(0),
    block_start(1, {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}}),
    delta(1, {"type": "input_json_delta", "partial_json": ""}),
    delta(1, {"type": "input_json_delta", "partial_json": '{"ci'}),
    delta(1, {"type": "input_json_delta", "partial_json": 'ty": "Par'}),
    delta(1, {"type": "input_json_delta", "partial_json": 'is"}'}),
    block_stop(1),
    block_start(2, {"type": "tool_use", "id": "toolu_B", "name": "now", "input": {}}),
    delta(2, {"type": "input_json_delta", "partial_json": ""}),
    block_stop(2),
    # message_delta repeats the input counts (newer API versions do): the latest non-null wins
    message_delta("tool_use", {"input_tokens": 31, "cache_creation_input_tokens": None, "cache_read_input_tokens": 2,
                               "output_tokens": 40}),
    STOP,
)
TOOL_USAGE = TokenUsage(input_tokens=33, output_tokens=40, total_tokens=73, cached_input_tokens=2,
                        cache_creation_input_tokens=0)

THINKING_STREAM = sse(
    message_start({"input_tokens": 8, "output_tokens": 1}),
    block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
    PING,
    delta(0, {"type": "thinking_delta", "thinking": "Hmm, "}),
    delta(0, {"type": "thinking_delta", "thinking": "think."}),
    delta(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}),
    block_stop(0),
    block_start(1, {"type": "text", "text": ""}),
    text(1, "Answer"),
    block_stop(1),
    message_delta("max_tokens", {"output_tokens": 20}),
    STOP,
)
ERROR_STREAM = sse(
    message_start({"input_tokens": 8, "output_tokens": 1}),
    block_start(0, {"type": "text", "text": ""}),
    text(0, "Partial"),
    ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
)

# (name, bytes, text, reasoning, final usage, stream ends with [DONE])
STREAMS = [
    ("text", TEXT_STREAM, "".join(TEXT_PIECES), "", TEXT_USAGE, True),
    ("text-crlf", sse(*TEXT_EVENTS, crlf=True), "".join(TEXT_PIECES), "", TEXT_USAGE, True),
    ("tool", TOOL_STREAM, "Let me check.", "", TOOL_USAGE, True),
    ("thinking", THINKING_STREAM, "Answer", "Hmm, think.", TokenUsage(8, 20, 28), True),
    ("error", ERROR_STREAM, "Partial", "", TokenUsage(8, 1, 9), False),
]


def translate(chunks: list[bytes], include_usage: bool = True) -> tuple[bytes, AnthropicStreamTranslator]:
    translator = AnthropicStreamTranslator("alias", include_usage, created=1_700_000_000)
    out = b"".join(translator.feed(c) for c in chunks) + translator.finish()
    return out, translator


def payloads(out: bytes) -> list[Any]:
    """The SSE data payloads (JSON, or the literal [DONE]) of translated output."""
    events = [e for e in SSEDecoder().feed(out) if e.has_data]
    assert all(e.event is None for e in events)  # OpenAI streams are data-only
    return ["[DONE]" if e.data == b"[DONE]" else orjson.loads(e.data) for e in events]


def collect(items: list[Any]) -> dict[str, Any]:
    """What an OpenAI client assembles from the chunks."""
    content, reasoning, finish, usage = [], [], [], None
    calls: dict[int, dict[str, str]] = {}
    for item in items:
        if item == "[DONE]" or "error" in item:
            continue
        if item["choices"] == []:
            usage = item["usage"]
        for choice in item["choices"]:
            d = choice["delta"]
            content.append(d.get("content") or "")
            reasoning.append(d.get("reasoning_content") or "")
            if choice["finish_reason"]:
                finish.append(choice["finish_reason"])
            for call in d.get("tool_calls") or ():
                entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.get("id") or ""
                entry["name"] += call["function"].get("name") or ""
                entry["arguments"] += call["function"].get("arguments") or ""
    return {"content": "".join(content), "reasoning": "".join(reasoning), "finish": finish, "calls": calls,
            "usage": usage}


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(raw), *cuts})
    return [raw[a:b] for a, b in zip(points, points[1:])]


@pytest.mark.parametrize("case", STREAMS, ids=[s[0] for s in STREAMS])
def test_translated_chunks_are_valid_openai_chunks(case: tuple[Any, ...]) -> None:
    _, raw, expected_text, reasoning, usage, done = case
    out, translator = translate([raw])
    items = payloads(out)
    assert translator.usage == usage
    chunks = [i for i in items if i != "[DONE]" and "error" not in i]
    for chunk in chunks:
        parsed = ChatCompletionChunk.model_validate(chunk)
        assert parsed.id == "chatcmpl-msg_abc" and parsed.created == 1_700_000_000
        assert parsed.model == "claude-sonnet-4-5" and parsed.object == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    got = collect(items)
    assert got["content"] == expected_text and got["reasoning"] == reasoning
    if done:
        assert items[-1] == "[DONE]" and items.count("[DONE]") == 1
        assert items[-2]["choices"] == [] and items[-2]["usage"] == usage_object(usage)
        assert got["usage"] == usage_object(usage)
        assert len(got["finish"]) == 1
    else:
        assert "[DONE]" not in items and "error" in items[-1]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), include_usage=st.booleans())
def test_any_split_gives_the_same_output(data: st.DataObject, include_usage: bool) -> None:
    _, raw, expected_text, _, usage, done = data.draw(st.sampled_from(STREAMS), label="stream")
    whole, _ = translate([raw], include_usage)
    chunks = data.draw(
        st.one_of(
            st.lists(st.integers(0, len(raw)), max_size=30).map(lambda c: split(raw, c)),
            st.just([raw[i : i + 1] for i in range(len(raw))]),
        ),
        label="chunks",
    )
    out, translator = translate(chunks, include_usage)
    assert out == whole
    assert translator.usage == usage
    items = payloads(out)
    assert collect(items)["content"] == expected_text
    assert (items[-1] == "[DONE]") is done
    has_usage_chunk = any(i != "[DONE]" and i.get("choices") == [] for i in items)
    assert has_usage_chunk is (include_usage and done)


def test_feed_returns_output_as_soon_as_an_event_completes() -> None:
    translator = AnthropicStreamTranslator(None, include_usage=False)
    first_event_end = TEXT_STREAM.index(b"\n\n") + 2
    assert translator.feed(TEXT_STREAM[: first_event_end - 1]) == b""
    assert payloads(translator.feed(TEXT_STREAM[first_event_end - 1 : first_event_end]))[0]["choices"][0]["delta"] == {
        "role": "assistant", "content": ""}
    assert translator.model == "claude-sonnet-4-5"
    assert translator.usage == TokenUsage(135, 1, 136, 100, 10)  # message_start's counts, before any delta


def test_tool_call_indexes_count_tool_calls_only() -> None:
    got = collect(payloads(translate([TOOL_STREAM])[0]))
    assert got["calls"] == {
        0: {"id": "toolu_A", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "toolu_B", "name": "now", "arguments": "{}"},  # no argument text: "{}" so clients can parse it
    }
    assert got["finish"] == ["tool_calls"]


def test_error_event_becomes_openai_error_and_ends_the_stream() -> None:
    out, translator = translate([ERROR_STREAM + sse(STOP)])  # nothing after an error is translated
    assert payloads(out)[-1] == {
        "error": {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded"}
    }
    assert translator.done


def test_stream_cut_after_the_stop_reason_still_ends_with_done() -> None:
    cut = TEXT_STREAM[: TEXT_STREAM.index(b"event: message_stop")]
    items = payloads(translate([cut])[0])
    assert items[-1] == "[DONE]" and items[-2]["choices"][0]["finish_reason"] == "stop"
    assert not any(i != "[DONE]" and i["choices"] == [] for i in items)  # nothing extra but [DONE]


def test_stream_cut_before_the_stop_reason_gets_no_done() -> None:
    cut = TEXT_STREAM[: TEXT_STREAM.index(b"event: message_delta")]
    items = payloads(translate([cut])[0])
    assert "[DONE]" not in items and collect(items)["content"] == "".join(TEXT_PIECES)


def test_last_event_without_blank_line_is_flushed_at_finish() -> None:
    items = payloads(translate([TEXT_STREAM.rstrip(b"\n")])[0])
    assert items[-1] == "[DONE]" and items[-2]["usage"] == usage_object(TEXT_USAGE)


def test_junk_events_are_skipped() -> None:
    junk = b": keep-alive\n\nevent: ping\ndata: not json\n\ndata: [1, 2]\n\nevent: mystery\ndata: {}\n\n"
    assert translate([junk + TEXT_STREAM])[0] == translate([TEXT_STREAM])[0]


def test_model_and_id_fall_back_without_message_start() -> None:
    raw = sse(text(0, "x"), message_delta("end_turn", {"output_tokens": 1}), STOP)
    out, translator = translate([raw], include_usage=True)
    items = payloads(out)
    assert items[0]["model"] == "alias" and items[0]["id"].startswith("chatcmpl-")
    assert translator.usage == TokenUsage(0, 1, 1)


# -- the openai SDK as the oracle ----------------------------------------------------------------


def sdk(handler: Callable[[httpx2.Request], httpx2.Response]) -> openai.OpenAI:
    transport = httpx2.MockTransport(handler)
    return openai.OpenAI(api_key="x", base_url="http://gateway/v1", max_retries=0,
                         http_client=httpx2.Client(transport=transport))


def sse_response(body: bytes) -> Callable[[httpx2.Request], httpx2.Response]:
    return lambda _: httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)


MESSAGES: list[Any] = [{"role": "user", "content": "Weather?"}]


def test_openai_sdk_assembles_the_translated_tool_stream() -> None:
    client = sdk(sse_response(translate([TOOL_STREAM])[0]))
    with client.chat.completions.stream(model="alias", messages=MESSAGES) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Let me check." and final.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("toolu_A", "get_weather", '{"city": "Paris"}'),
        ("toolu_B", "now", "{}"),
    ]
    assert final.usage is not None and final.usage.prompt_tokens == 33 and final.usage.completion_tokens == 40


def test_openai_sdk_raises_on_the_translated_error_event() -> None:
    client = sdk(sse_response(translate([ERROR_STREAM])[0]))
    stream = client.chat.completions.create(model="alias", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="Overloaded"):
        for _ in stream:
            pass


def test_openai_sdk_reads_the_translated_json_response() -> None:
    body = orjson.dumps(messages_to_chat(TOOL_RESPONSE, "alias"))
    client = sdk(lambda _: httpx2.Response(200, headers={"content-type": "application/json"}, content=body))
    completion = client.chat.completions.create(model="alias", messages=MESSAGES)
    assert completion.usage is not None and completion.usage.total_tokens == 135
    assert completion.usage.prompt_tokens_details and completion.usage.prompt_tokens_details.cached_tokens == 100


# -- errors ------------------------------------------------------------------------------------------


def anthropic_error(error_type: str, message: str = "boom") -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_1"})


@pytest.mark.parametrize(
    ("status", "error_type", "openai_type", "code", "exception"),
    [
        (400, "invalid_request_error", "invalid_request_error", None, openai.BadRequestError),
        (401, "authentication_error", "invalid_request_error", "invalid_api_key", openai.AuthenticationError),
        (403, "permission_error", "permission_error", None, openai.PermissionDeniedError),
        (404, "not_found_error", "invalid_request_error", "not_found", openai.NotFoundError),
        (413, "request_too_large", "invalid_request_error", "request_too_large", openai.APIStatusError),
        (429, "rate_limit_error", "rate_limit_error", "rate_limit_exceeded", openai.RateLimitError),
        (500, "api_error", "server_error", None, openai.InternalServerError),
        (529, "overloaded_error", "server_error", "overloaded", openai.InternalServerError),
    ],
)
def test_error_to_openai(
    status: int, error_type: str, openai_type: str, code: str | None, exception: type[openai.APIStatusError]
) -> None:
    body = error_to_openai(status, anthropic_error(error_type))
    assert orjson.loads(body) == {"error": {"message": "boom", "type": openai_type, "param": None, "code": code}}
    client = sdk(lambda _: httpx2.Response(status, headers={"content-type": "application/json"}, content=body))
    with pytest.raises(exception) as info:
        client.chat.completions.create(model="alias", messages=MESSAGES)
    assert info.value.status_code == status and info.value.code == code
    assert info.value.message.endswith("boom") or "boom" in info.value.message


@pytest.mark.parametrize(
    ("status", "body", "message", "openai_type"),
    [
        (502, b"<html>Bad gateway</html>", "<html>Bad gateway</html>", "server_error"),
        (503, b"", "The Anthropic backend answered with HTTP status 503.", "server_error"),
        (429, b'{"message": "slow down"}', "slow down", "rate_limit_error"),
        (400, b'{"type": "error", "error": {"type": "brand_new_error"}}',
         "The Anthropic backend answered with HTTP status 400.", "invalid_request_error"),
        (418, b'{"type": "error", "error": {"type": "teapot_error", "message": "short and stout"}}',
         "short and stout", "teapot_error"),
        (400, b"[1, 2]", "The Anthropic backend answered with HTTP status 400.", "invalid_request_error"),
    ],
)
def test_error_to_openai_unusual_bodies(status: int, body: bytes, message: str, openai_type: str) -> None:
    error = orjson.loads(error_to_openai(status, body))["error"]
    assert error["message"] == message and error["type"] == openai_type


@settings(max_examples=200, deadline=None)
@given(status=st.integers(0, 999), body=st.binary(max_size=200))
def test_error_to_openai_never_raises(status: int, body: bytes) -> None:
    error = orjson.loads(error_to_openai(status, body))["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


def test_error_body() -> None:
    assert orjson.loads(error_body("nope", "rate_limit_error")) == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "nope"}}
    assert orjson.loads(AnthropicRequestError(413, "too big", "request_too_large").body)["error"]["type"] == (
        "request_too_large")


# -- native requests and streams -----------------------------------------------------------------


def test_parse_request() -> None:
    body = {"model": "claude-x", "max_tokens": 5, "messages": [USER], "stream": True}
    parsed = parse_request(orjson.dumps(body))
    assert (parsed.body, parsed.model, parsed.stream) == (body, "claude-x", True)
    assert parse_request(orjson.dumps({**body, "stream": False})).stream is False


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "The request body is empty"),
        (b"{", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"max_tokens": 1, "messages": []}', "model: Field required"),
        (b'{"model": 5, "max_tokens": 1, "messages": []}', "model: Input should be a valid string"),
        (b'{"model": "m\\n", "max_tokens": 1, "messages": []}', "printable"),
        (b'{"model": "m", "max_tokens": 1}', "messages: Field required"),
        (b'{"model": "m", "max_tokens": 1, "messages": {}}', "messages: Input should be a valid list"),
        (b'{"model": "m", "max_tokens": 1, "messages": []}', "at least one message"),
        (b'{"model": "m", "messages": [{}]}', "max_tokens: Field required"),
        (b'{"model": "m", "max_tokens": "5", "messages": [{}]}', "max_tokens: Input should be a valid integer"),
        (b'{"model": "m", "max_tokens": true, "messages": [{}]}', "max_tokens: Input should be a valid integer"),
        (b'{"model": "m", "max_tokens": 0, "messages": [{}]}', "greater than or equal to 1"),
        (b'{"model": "m", "max_tokens": 1, "messages": [{}], "stream": "yes"}', "stream: Input should be a valid"),
    ],
)
def test_parse_request_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(AnthropicRequestError) as info:
        parse_request(raw)
    assert info.value.status == 400 and info.value.error_type == "invalid_request_error"
    assert message in info.value.message
    assert orjson.loads(info.value.body)["error"]["message"] == info.value.message


def events_of(raw: bytes) -> Iterator[tuple[str | None, dict[str, Any]]]:
    for event in SSEDecoder().feed(raw):
        yield event.event, orjson.loads(event.data)


def test_stream_usage_follows_a_native_stream() -> None:
    watcher = StreamUsage()
    outputs = []
    for name, data in events_of(TOOL_STREAM):
        watcher.on_event(name, data)
        outputs.append((name, watcher.has_output))
        if name == "message_start":
            assert watcher.usage == TokenUsage(30, 1, 31, 0, 0) and watcher.response_model == "claude-sonnet-4-5"
            assert not watcher.output_seen
    assert watcher.usage == TOOL_USAGE and watcher.complete and watcher.error_type is None and watcher.output_seen
    assert [n for n, has in outputs if has] == [
        "content_block_delta", "content_block_start", *["content_block_delta"] * 4, "content_block_start",
        "content_block_delta",
    ]


def test_stream_usage_sees_errors_and_takes_names_from_the_data() -> None:
    watcher = StreamUsage()
    for _, data in events_of(ERROR_STREAM):
        watcher.on_event(None, data)  # no event: field; the payload's type is enough
    assert watcher.error_type == "overloaded_error" and not watcher.complete
    assert watcher.usage == TokenUsage(8, 1, 9) and watcher.output_seen and not watcher.has_output
