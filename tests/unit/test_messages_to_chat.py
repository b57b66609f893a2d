"""Anthropic Messages clients on OpenAI-chat backends: the request, the reply, the stream, errors.

Streams are checked against the anthropic SDK's own accumulator (the code that builds
``get_final_message()``), in any chunking, and must equal the whole reply translated.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import Schema
from extproc.contract import ClientApi
from extproc.schemas.anthropic import AnthropicRequestError, StreamUsage, usage_from_message
from extproc.schemas.openai import usage_from_openai
from extproc.sim.bedrock_api import event_frame, exception_frame
from extproc.sse import SSEDecoder
from extproc.translators import Attempt, translator_for
from extproc.translators.messages_to_chat import (
    ChatToMessagesStream,
    chat_to_message,
    error_to_anthropic,
    messages_to_chat,
)
from tests.unit.test_translators import TARGETS

BASE = {"model": "client-model", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
PNG = "iVBORw0KGgo="


def _chat(**extra: Any) -> dict[str, Any]:
    return messages_to_chat({**BASE, **extra}, "backend-model")


# -- request -------------------------------------------------------------------------------------


def test_a_plain_request() -> None:
    assert _chat() == {"model": "backend-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


def test_the_limit_goes_where_the_backend_wants_it() -> None:
    chat = messages_to_chat(BASE, "m", "max_completion_tokens")
    assert chat["max_completion_tokens"] == 100 and "max_tokens" not in chat


def test_system_sampling_stops_user_and_stream() -> None:
    chat = _chat(system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                         {"type": "text", "text": "Be kind."}],
                 temperature=0.5, top_p=0.9, stop_sequences=["END", ""], metadata={"user_id": "u-1"}, stream=True)
    assert chat["messages"][0] == {"role": "system", "content": "Be brief.\n\nBe kind."}
    assert (chat["temperature"], chat["top_p"], chat["stop"], chat["user"]) == (0.5, 0.9, ["END"], "u-1")
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert _chat(system="S")["messages"][0] == {"role": "system", "content": "S"}


def test_images_become_image_url_parts() -> None:
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
               {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]
    (user,) = _chat(messages=[{"role": "user", "content": content}])["messages"]
    assert user == {"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}


def test_a_tool_round_trip() -> None:
    tool = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Lyon"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "no data"}]},
            {"type": "text", "text": "And tomorrow?"},
        ]},
    ]
    chat = _chat(messages=messages, tools=[tool], tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}}}]
    assert chat["tool_choice"] == "auto" and chat["parallel_tool_calls"] is False
    assert chat["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Lyon"}'}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no data"},
        {"role": "user", "content": "And tomorrow?"},
    ]


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"),
    ({"type": "any"}, "required"),
    ({"type": "none"}, "none"),
    ({"type": "tool", "name": "t"}, {"type": "function", "function": {"name": "t"}}),
])
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    tools = [{"name": "t", "input_schema": {"type": "object"}}]
    assert _chat(tools=tools, tool_choice=choice)["tool_choice"] == expected


@pytest.mark.parametrize(("extra", "words"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"top_k": 5}, "top_k"),
    ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
    ({"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]}, "document"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]}, "file"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]}]}]},
     "only text blocks"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 7}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
    ({"tools": [{"name": "t"}]}, "input_schema"),
    ({"tool_choice": {"type": "any"}}, "requires `tools`"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"stop_sequences": "END"}, "stop_sequences"),
    ({"temperature": "hot"}, "temperature"),
    ({"system": 5}, "system"),
])
def test_what_cannot_be_expressed_is_anthropics_400(extra: dict[str, Any], words: str) -> None:
    with pytest.raises(AnthropicRequestError) as raised:
        _chat(**extra)
    assert raised.value.status == 400 and raised.value.error_type == "invalid_request_error"
    assert words in raised.value.message
    assert json.loads(raised.value.body)["type"] == "error"


def test_disabled_thinking_and_history_thinking_are_fine() -> None:
    assert _chat(thinking={"type": "disabled"})["messages"] == [{"role": "user", "content": "hi"}]


# -- whole replies -------------------------------------------------------------------------------

REPLY = {
    "id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me check.",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}}],
    "usage": {"prompt_tokens": 50, "completion_tokens": 12, "total_tokens": 62,
              "prompt_tokens_details": {"cached_tokens": 20},
              "completion_tokens_details": {"reasoning_tokens": 4}},
}


def test_a_whole_reply_is_an_anthropic_message() -> None:
    message = chat_to_message(REPLY, "backend-model", [])
    Message.model_validate(message)  # the anthropic SDK reads it
    assert message == {
        "id": "msg_abc", "type": "message", "role": "assistant", "model": "gpt-4o-2024",
        "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 30, "output_tokens": 12, "cache_read_input_tokens": 20,
                  "output_tokens_details": {"thinking_tokens": 4}},
    }


def test_usage_stays_exact_for_the_gateway() -> None:
    """Read back as the gateway reads an Anthropic reply: the same figures OpenAI reported."""
    assert usage_from_message(chat_to_message(REPLY, "m", [])) == usage_from_openai(REPLY["usage"])
    bedrock = {**REPLY, "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51,
                                  "prompt_tokens_details": {"cached_tokens": 20, "cache_creation_tokens": 5}}}
    message = chat_to_message(bedrock, "m", [])
    assert message["usage"]["input_tokens"] == 25 and message["usage"]["cache_creation_input_tokens"] == 5
    assert usage_from_message(message) == usage_from_openai(bedrock["usage"])


@pytest.mark.parametrize(("finish", "matched", "expected"), [
    ("stop", None, ("end_turn", None)),
    ("stop", "END", ("stop_sequence", "END")),  # vLLM names the stop that matched
    ("stop", "OTHER", ("end_turn", None)),
    ("length", None, ("max_tokens", None)),
    ("content_filter", None, ("refusal", None)),
    ("tool_calls", None, ("tool_use", None)),
    (None, None, ("end_turn", None)),
])
def test_stop_reasons(finish: Any, matched: Any, expected: tuple[str, str | None]) -> None:
    reply = {"choices": [{"finish_reason": finish, "stop_reason": matched, "message": {"content": "x"}}]}
    message = chat_to_message(reply, "m", ["END"])
    assert (message["stop_reason"], message["stop_sequence"]) == expected


def test_junk_never_crashes() -> None:
    for junk in (None, [], {"choices": "x"}, {"choices": [None]}, {"choices": [{"message": {"tool_calls": [7]}}]}):
        message = chat_to_message(junk, "fallback-model", [])
        assert message["model"] == "fallback-model" and message["content"] == []
    bad_json = {"choices": [{"message": {"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}}]}
    assert chat_to_message(bad_json, "m", [])["content"][0]["input"] == {"raw_arguments": "{"}


@pytest.mark.parametrize(("status", "body", "expected"), [
    (429, b'{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}',
     {"type": "rate_limit_error", "message": "slow down"}),
    (401, b'{"error":{"message":"bad key","type":"invalid_request_error"}}',
     {"type": "authentication_error", "message": "bad key"}),
    (503, b"<html>down</html>", {"type": "api_error", "message": "<html>down</html>"}),
    (400, b"", {"type": "invalid_request_error", "message": "The backend answered with HTTP status 400."}),
    (529, b'{"message":"busy"}', {"type": "overloaded_error", "message": "busy"}),
])
def test_errors_in_anthropics_shape(status: int, body: bytes, expected: dict[str, str]) -> None:
    assert json.loads(error_to_anthropic(status, body)) == {"type": "error", "error": expected}


# -- streams -------------------------------------------------------------------------------------


def _sse(*chunks: Any) -> bytes:
    return b"".join(b"data: " + (c if isinstance(c, bytes) else orjson.dumps(c)) + b"\n\n" for c in chunks)


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "model": "gpt-4o-2024", "choices": choices,
            **extra}


STREAM = _sse(
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Let "}), _chunk({"content": "me check."}),
    _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    _chunk({}, "tool_calls"),
    _chunk(None, usage=REPLY["usage"]),
    b"[DONE]",
)


def _events(out: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    return [(e.event, json.loads(e.data)) for e in SSEDecoder().feed(out) if e.has_data]


def _final(out: bytes) -> dict[str, Any]:
    """The message the anthropic SDK builds from these events (its get_final_message())."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for name, data in _events(out):
        assert name == data["type"]
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=json_bufs)  # type: ignore[arg-type]
    assert snapshot is not None
    return snapshot.model_dump(exclude_none=True)


def _translate(pieces: list[bytes], stops: list[str] | None = None) -> bytes:
    translator = ChatToMessagesStream("backend-model", stops or [])
    return b"".join(translator.feed(p) for p in pieces) + translator.finish()


def test_a_stream_builds_the_same_message_as_the_whole_reply() -> None:
    out = _translate([STREAM])
    names = [name for name, _ in _events(out)]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    whole = Message.model_validate(chat_to_message(REPLY, "backend-model", [])).model_dump(exclude_none=True)
    assert _final(out) == whole
    reader = StreamUsage()  # the gateway's own reading of the translated stream
    for name, data in _events(out):
        reader.on_event(name, data)
    assert reader.usage == usage_from_openai(REPLY["usage"]) and reader.complete


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=30))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(STREAM)]
    pieces = [STREAM[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert _events(_translate(pieces)) == _events(_translate([STREAM]))


def test_usage_in_the_finishing_chunk_and_a_matched_stop() -> None:
    stream = _sse(_chunk({"content": "abc"}), {**_chunk({}, "stop"), "usage": REPLY["usage"]})
    stream = stream.replace(b'"finish_reason":"stop"', b'"finish_reason":"stop","stop_reason":"END"')
    out = _translate([stream], ["END"])  # no [DONE]: finished by the usage already
    final = _final(out)
    assert (final["stop_reason"], final["stop_sequence"]) == ("stop_sequence", "END")
    assert final["usage"]["output_tokens"] == 12


def test_a_stream_error_event_is_anthropics_error_event() -> None:
    stream = _sse(_chunk({"content": "a"}), {"error": {"message": "overloaded", "type": "server_error",
                                                       "code": "overloaded"}}, _chunk({"content": "ignored"}))
    events = _events(_translate([stream]))
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "overloaded"}})


def test_a_cut_stream_says_so_and_a_stream_cut_after_its_finish_completes() -> None:
    cut = _translate([_sse(_chunk({"content": "a"}))])
    assert _events(cut)[-1][0] == "error"
    finished = _translate([_sse(_chunk({"content": "a"}), _chunk({}, "length"))])
    assert _final(finished)["stop_reason"] == "max_tokens"


def test_refusals_and_garbage() -> None:
    stream = _sse(b"{not json", _chunk({"refusal": "I can't."}), _chunk({}, "content_filter"), b"[DONE]")
    final = _final(_translate([stream]))
    assert final["content"] == [{"type": "text", "text": "I can't."}] and final["stop_reason"] == "refusal"


# -- Bedrock, chained: ConverseStream -> OpenAI chunks -> Anthropic events -----------------------

CONVERSE = b"".join([
    event_frame("messageStart", {"role": "assistant"}),
    event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Checking."}}),
    event_frame("contentBlockStop", {"contentBlockIndex": 0}),
    event_frame("contentBlockStart", {"contentBlockIndex": 1, "start": {
        "toolUse": {"toolUseId": "tooluse_1", "name": "get_weather"}}}),
    event_frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"city":"Paris"}'}}}),
    event_frame("contentBlockStop", {"contentBlockIndex": 1}),
    event_frame("messageStop", {"stopReason": "tool_use"}),
    event_frame("metadata", {"usage": {"inputTokens": 10, "outputTokens": 7, "totalTokens": 25,
                                       "cacheReadInputTokens": 5, "cacheWriteInputTokens": 3},
                             "metrics": {"latencyMs": 12}}),
])


def _bedrock_translator() -> Any:
    attempt = Attempt(TARGETS[Schema.aws_bedrock], ClientApi.ANTHROPIC_MESSAGES, "anthropic.claude", True, False)
    translator = translator_for(attempt, "anthropic.claude")
    translator.request(BASE, orjson.dumps(BASE))
    return translator.stream_translator()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(CONVERSE) - 1), max_size=20))
def test_a_bedrock_stream_reaches_anthropic_clients_whole_in_any_chunking(cuts: list[int]) -> None:
    points = [0, *sorted(set(cuts)), len(CONVERSE)]
    translator = _bedrock_translator()
    out = b"".join(translator.feed(CONVERSE[a:b]) for a, b in zip(points, points[1:], strict=False))
    out += translator.finish()
    final = _final(out)
    assert final["content"] == [{"type": "text", "text": "Checking."},
                                {"type": "tool_use", "id": "tooluse_1", "name": "get_weather", "input": {"city": "Paris"}}]
    assert final["stop_reason"] == "tool_use"
    assert final["usage"] == {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 5,
                              "cache_creation_input_tokens": 3}


def test_a_bedrock_exception_frame_is_anthropics_error_event() -> None:
    translator = _bedrock_translator()
    out = translator.feed(event_frame("messageStart", {"role": "assistant"}) +
                          exception_frame("throttlingException", "Too many tokens"))
    out += translator.finish()
    assert _events(out)[-1] == ("error", {"type": "error", "error": {"type": "rate_limit_error",
                                                                     "message": "Too many tokens"}})
