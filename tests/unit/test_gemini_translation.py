"""OpenAI chat and embeddings to the Gemini API and back: request mapping (and refusals in
OpenAI's shape), whole replies, streams in any chunking, errors. Translated requests are
sent to the Gemini simulator, which validates them as the real API does, and what comes
back is parsed with the openai SDK's own types."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import CreateEmbeddingResponse, Embedding
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.schemas.openai import RequestError
from extproc.sim import SimServer
from extproc.sim import text as simtext
from extproc.sse import SSEDecoder
from extproc.translators import chat_to_gemini as chat_to_gemini_module
from extproc.translators.chat_to_gemini import (
    chat_to_gemini,
    error_to_openai,
    gemini_schema,
    gemini_to_chat,
    model_path,
    usage_from_gemini,
)
from extproc.translators.embeddings_to_gemini import (
    embeddings_to_gemini,
    gemini_to_embeddings,
)
from extproc.translators.gemini_stream import GeminiStreamTranslator

PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"},
}}
USER = [{"role": "user", "content": "Why is the sky blue?"}]


def _chat(**body: Any) -> dict[str, Any]:
    return chat_to_gemini({"model": "m", "messages": USER, **body})


def _refused(body: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as info:
        chat_to_gemini({"model": "m", **body})
    assert info.value.status == 400 and info.value.error_type == "invalid_request_error"
    return info.value


# -- requests ----------------------------------------------------------------------------------


def test_system_and_developer_become_the_system_instruction_and_turns_merge() -> None:
    out = chat_to_gemini({"model": "m", "messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": [{"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": ""},  # empty: dropped
        {"role": "user", "content": "Bye"},
    ]})
    assert out["systemInstruction"] == {"parts": [{"text": "Be terse."}, {"text": "Answer in English."}]}
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "Hi"}, {"text": "there"}]},
        {"role": "model", "parts": [{"text": "Hello!"}]},
        {"role": "user", "parts": [{"text": "Bye"}]},
    ]


def test_images_inline_and_by_url() -> None:
    out = chat_to_gemini({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.JPG?size=2"}},
    ]}]})
    assert out["contents"][0]["parts"][1:] == [
        {"inlineData": {"mimeType": "image/png", "data": PIXEL}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.JPG?size=2"}},
    ]


@pytest.mark.parametrize(("part", "words"), [
    ({"type": "image_url", "image_url": {"url": "https://example.com/image"}}, "cannot be told from the URL"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}, "must be base64-encoded"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "not valid base64"),
    ({"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}, "not supported for Gemini"),
])
def test_unusable_parts_are_refused(part: dict[str, Any], words: str) -> None:
    assert words in _refused({"messages": [{"role": "user", "content": [part]}]}).message


def test_tool_round_trip_maps_calls_and_responses_by_id() -> None:
    out = chat_to_gemini({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "rainy"},
    ]})
    assert out["contents"][1] == {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
        {"functionCall": {"name": "get_weather", "args": {}}},
    ]}
    assert out["contents"][2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
        {"functionResponse": {"name": "get_weather", "response": {"content": "rainy"}}},
    ]}
    declaration = out["tools"][0]["functionDeclarations"][0]
    assert declaration == {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "OBJECT", "properties": {"city": {"type": "STRING"}}, "required": ["city"]}}


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}),
    ("required", {"mode": "ANY"}),
    ("none", {"mode": "NONE"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
])
def test_tool_choice(choice: Any, config: dict[str, Any]) -> None:
    assert _chat(tools=[WEATHER], tool_choice=choice)["toolConfig"] == {"functionCallingConfig": config}


def test_schemas_lose_what_gemini_rejects() -> None:
    schema = gemini_schema({
        "type": "object", "additionalProperties": False, "properties": {
            "unit": {"type": ["string", "null"], "enum": ["c", "f"]},
            "tags": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "kind": {"const": "x"},
        }}, "p")
    assert schema == {"type": "OBJECT", "properties": {
        "unit": {"type": "STRING", "nullable": True, "enum": ["c", "f"]},
        "tags": {"type": "ARRAY", "items": {"type": "STRING", "minLength": 1}},
        "kind": {"enum": ["x"], "type": "STRING"},
    }}


def test_generation_config_and_response_format() -> None:
    out = _chat(temperature=0.2, top_p=0.9, max_completion_tokens=30, max_tokens=99, stop=["END"], n=2, seed=7,
                presence_penalty=0.5, response_format={"type": "json_schema", "json_schema": {
                    "name": "a", "schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}})
    assert out["generationConfig"] == {
        "temperature": 0.2, "topP": 0.9, "presencePenalty": 0.5, "maxOutputTokens": 30, "stopSequences": ["END"],
        "candidateCount": 2, "seed": 7, "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "properties": {"x": {"type": "INTEGER"}}},
    }
    assert _chat(response_format={"type": "json_object"})["generationConfig"] == {
        "responseMimeType": "application/json"}
    assert "generationConfig" not in _chat(stream=True, stream_options={"include_usage": True})


@pytest.mark.parametrize(("body", "words"), [
    ({"messages": []}, "non-empty array"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "user or assistant message"),
    ({"messages": USER, "n": 0}, "'n'"),
    ({"messages": USER, "stop": 5}, "'stop'"),
    ({"messages": USER, "temperature": "hot"}, "'temperature'"),
    ({"messages": USER, "max_tokens": -1}, "'max_tokens'"),
    ({"messages": USER, "tool_choice": "required"}, "requires 'tools'"),
    ({"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "not in 'tools'"),
    ({"messages": USER, "tools": [{"type": "code_interpreter"}]}, "only function tools"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "$ref": "#/$defs/a"}}}]}, "$ref"),
    ({"messages": USER, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [*USER, {"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "answers no tool call"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}, "JSON object"),
])
def test_bad_requests_are_400s_in_openais_shape(body: dict[str, Any], words: str) -> None:
    assert words in _refused(body).message


def test_paths() -> None:
    assert model_path("/v1beta", "models/gemini-2.0-flash", "generateContent") == \
        "/v1beta/models/gemini-2.0-flash:generateContent"
    assert model_path("", "a/../b", "x") == "/models/a%2F..%2Fb:x"  # one path segment, whatever the name


# -- against the simulator (which validates like the API) --------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(chunks=5) as server:
        yield server


def _send(sim: SimServer, body: dict[str, Any], stream: bool = False, **headers: str) -> httpx.Response:
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return httpx.post(f"{sim.url}{model_path('/v1beta', 'gemini-2.0-flash', method)}", content=orjson.dumps(body),
                      headers={"x-goog-api-key": "k", "content-type": "application/json", **headers})


def test_translated_requests_are_accepted_and_replies_read_as_openai(sim: SimServer) -> None:
    body = _chat(tools=[WEATHER], temperature=0.5, max_tokens=40, stop=["zzz"])
    reply = _send(sim, {**body, "contents": [{"role": "user", "parts": [{"text": "weather in Paris?"}]}]})
    assert reply.status_code == 200, reply.text
    completion = ChatCompletion.model_validate(gemini_to_chat(reply.json(), "m"))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and orjson.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    # The round trip: the call and its result go back, and the model answers in text.
    follow = chat_to_gemini({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "weather in Paris?"},
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]})
    answer = _send(sim, follow)
    assert answer.status_code == 200, answer.text
    final = ChatCompletion.model_validate(gemini_to_chat(answer.json(), "m"))
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content


def test_whole_reply_usage_and_model(sim: SimServer) -> None:
    reply = _send(sim, _chat(max_tokens=50), **{"x-sim-cached-tokens": "3", "x-sim-reasoning-tokens": "5"})
    completion = ChatCompletion.model_validate(gemini_to_chat(reply.json(), "m"))
    meta = reply.json()["usageMetadata"]
    assert completion.model == "gemini-2.0-flash" and completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == simtext.reply_text(USER[0]["content"], simtext.DEFAULT_REPLY_TOKENS)
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == meta["promptTokenCount"]
    assert usage.completion_tokens == meta["candidatesTokenCount"] + 5
    assert usage.total_tokens == meta["totalTokenCount"] == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == 3
    assert usage.completion_tokens_details and usage.completion_tokens_details.reasoning_tokens == 5


def test_several_candidates_are_several_choices(sim: SimServer) -> None:
    reply = _send(sim, _chat(n=2, max_tokens=3))
    completion = ChatCompletion.model_validate(gemini_to_chat(reply.json(), "m"))
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in completion.choices)


@pytest.mark.parametrize(("reason", "expected"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("PROHIBITED_CONTENT", "content_filter"), ("OTHER", "stop"),
])
def test_finish_reasons(reason: str, expected: str) -> None:
    response = {"candidates": [{"content": {"role": "model", "parts": [{"text": "x"}]}, "finishReason": reason}]}
    assert gemini_to_chat(response, "m")["choices"][0]["finish_reason"] == expected


def test_blocked_prompt_and_thoughts() -> None:
    blocked = gemini_to_chat({"promptFeedback": {"blockReason": "SAFETY"},
                              "usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 4}}, "m")
    assert blocked["choices"][0]["finish_reason"] == "content_filter" and blocked["usage"]["prompt_tokens"] == 4
    thinking = gemini_to_chat({"candidates": [{"content": {"parts": [
        {"text": "Let me think.", "thought": True}, {"text": "42"}]}, "finishReason": "STOP"}]}, "m")
    message = thinking["choices"][0]["message"]
    assert message["content"] == "42" and message["reasoning_content"] == "Let me think."


def test_usage_without_a_total_adds_up() -> None:
    usage = usage_from_gemini({"promptTokenCount": 10, "candidatesTokenCount": 4, "thoughtsTokenCount": 2,
                               "toolUsePromptTokenCount": 3})
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens, usage.reasoning_tokens) == (13, 6, 19, 2)
    assert usage_from_gemini(None) is None


# -- streams -----------------------------------------------------------------------------------


def _translate(raw: bytes, pieces: list[int], include_usage: bool = True, candidates: int = 1) -> bytes:
    translator = GeminiStreamTranslator("m", include_usage, candidates)
    out, start = b"", 0
    for size in pieces:
        out += translator.feed(raw[start:start + size])
        start += size
    out += translator.feed(raw[start:])
    return out + translator.finish()


def _events(raw: bytes) -> list[Any]:
    events = SSEDecoder().feed(raw)
    assert events[-1].data == b"[DONE]"
    return [orjson.loads(e.data) for e in events[:-1]]


def _normalized(raw: bytes) -> list[Any]:
    """Chunks without the ids and times that differ between two translations."""
    chunks = _events(raw)
    for chunk in chunks:
        chunk.pop("id"), chunk.pop("created")
        for choice in chunk["choices"]:
            for call in choice["delta"].get("tool_calls") or ():
                call.pop("id", None)
    return chunks


@pytest.fixture(scope="module")
def text_stream(sim: SimServer) -> bytes:
    return _send(sim, _chat(), stream=True, **{"x-sim-reasoning-tokens": "2"}).content


def test_stream_translates_to_openai_chunks_with_usage(sim: SimServer, text_stream: bytes) -> None:
    chunks = [ChatCompletionChunk.model_validate(c) for c in _events(_translate(text_stream, []))]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == simtext.reply_text(USER[0]["content"], simtext.DEFAULT_REPLY_TOKENS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert usage.completion_tokens == simtext.DEFAULT_REPLY_TOKENS + 2
    assert usage.completion_tokens_details and usage.completion_tokens_details.reasoning_tokens == 2
    assert chunks[-1].model == "gemini-2.0-flash"
    assert all(c.get("usage") is None for c in _events(_translate(text_stream, [], include_usage=False)))


def test_stream_byte_by_byte_equals_whole(text_stream: bytes) -> None:
    assert _normalized(_translate(text_stream, [1] * len(text_stream))) == _normalized(_translate(text_stream, []))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_stream_any_chunking_equals_whole(text_stream: bytes, data: st.DataObject) -> None:
    pieces = data.draw(st.lists(st.integers(min_value=0, max_value=len(text_stream)), max_size=12))
    assert _normalized(_translate(text_stream, pieces)) == _normalized(_translate(text_stream, []))


def test_streamed_tool_call(sim: SimServer) -> None:
    raw = _send(sim, {**_chat(tools=[WEATHER]), "contents": [{"role": "user", "parts": [{"text": "weather?"}]}]},
                stream=True).content
    chunks = [ChatCompletionChunk.model_validate(c) for c in _events(_translate(raw, [7, 3]))]
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id
    assert calls[0].function and calls[0].function.name == "get_weather"
    assert orjson.loads(calls[0].function.arguments or "") == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_stream_of_two_candidates_ends_when_both_finished(sim: SimServer) -> None:
    raw = _send(sim, _chat(n=2), stream=True).content
    chunks = _events(_translate(raw, [], candidates=2))
    finishes = sorted(c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert finishes == [0, 1]


def test_stream_error_event_and_truncation() -> None:
    error = b'data: {"error": {"code": 429, "message": "Quota", "status": "RESOURCE_EXHAUSTED"}}\r\n\r\n'
    out = SSEDecoder().feed(_translate(error, []))
    assert len(out) == 1 and orjson.loads(out[0].data)["error"] == {
        "message": "Quota", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    partial = b'data: {"candidates": [{"content": {"parts": [{"text": "Hel"}]}}]}\r\n\r\n'
    events = SSEDecoder().feed(_translate(partial, []))
    assert orjson.loads(events[-1].data)["error"]["code"] == "stream_truncated"
    assert all(e.data != b"[DONE]" for e in events)


def test_stream_ending_without_usage_still_ends_with_done() -> None:
    raw = b'data: {"candidates": [{"content": {"parts": [{"text": "Hi"}]}, "finishReason": "STOP"}]}\n\n'
    translator = GeminiStreamTranslator("m", True)
    assert b"[DONE]" not in translator.feed(raw)  # usage may still come
    assert translator.finish() == b"data: [DONE]\n\n"


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "name", "error_type", "code"), [
    (400, "INVALID_ARGUMENT", "invalid_request_error", None),
    (401, "UNAUTHENTICATED", "authentication_error", "invalid_api_key"),
    (403, "PERMISSION_DENIED", "permission_error", "permission_denied"),
    (404, "NOT_FOUND", "invalid_request_error", "not_found"),
    (429, "RESOURCE_EXHAUSTED", "rate_limit_error", "rate_limit_exceeded"),
    (500, "INTERNAL", "server_error", None),
    (503, "UNAVAILABLE", "server_error", "service_unavailable"),
])
def test_errors_keep_status_and_message(status: int, name: str, error_type: str, code: str | None) -> None:
    body = orjson.dumps({"error": {"code": status, "message": "why", "status": name}})
    assert orjson.loads(error_to_openai(status, body)) == {
        "error": {"message": "why", "type": error_type, "param": None, "code": code}}


def test_error_bodies_of_other_shapes() -> None:
    listed = orjson.dumps([{"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT",
                                      "details": [{"reason": "API_KEY_INVALID"}]}}])
    assert orjson.loads(error_to_openai(400, listed))["error"]["code"] == "invalid_api_key"
    html = orjson.loads(error_to_openai(502, b"<html>Bad Gateway</html>"))["error"]
    assert html["message"] == "<html>Bad Gateway</html>" and html["type"] == "server_error"
    assert orjson.loads(error_to_openai(504, b""))["error"]["message"].endswith("HTTP status 504.")


# -- embeddings --------------------------------------------------------------------------------


def test_embeddings_request_and_reply(sim: SimServer) -> None:
    body = embeddings_to_gemini({"model": "e", "input": ["alpha", "beta"], "dimensions": 6}, "models/text-embedding-004")
    assert body == {"requests": [
        {"model": "models/text-embedding-004", "content": {"parts": [{"text": t}]}, "outputDimensionality": 6}
        for t in ("alpha", "beta")]}
    reply = httpx.post(f"{sim.url}/v1beta/models/text-embedding-004:batchEmbedContents", json=body,
                       headers={"x-goog-api-key": "k"})
    assert reply.status_code == 200, reply.text
    floats = gemini_to_embeddings(reply.json(), "e", False)
    assert floats["object"] == "list" and floats["model"] == "e"
    data = [Embedding.model_validate(d) for d in floats["data"]]
    assert [d.embedding for d in data] == [simtext.embedding_vector(t, 6) for t in ("alpha", "beta")]
    assert [d.index for d in data] == [0, 1]
    packed = gemini_to_embeddings(reply.json(), "e", True)["data"][1]["embedding"]
    assert list(struct.unpack("<6f", base64.b64decode(packed))) == simtext.embedding_vector("beta", 6)
    assert "usage" not in gemini_to_embeddings(reply.json(), "e", False)  # Gemini reports none
    counted = gemini_to_embeddings({"embeddings": [], "usageMetadata": {"promptTokenCount": 9}}, "e", False)
    usage = CreateEmbeddingResponse.model_validate(counted).usage
    assert usage.prompt_tokens == usage.total_tokens == 9


@pytest.mark.parametrize(("body", "words"), [
    ({"input": [1, 2, 3]}, "text only"),
    ({"input": []}, "non-empty"),
    ({"input": "x", "dimensions": 0}, "'dimensions'"),
    ({"input": "x", "encoding_format": "int8"}, "'encoding_format'"),
    ({"input": ["x"] * 101}, "at most 100"),
])
def test_bad_embeddings_requests(body: dict[str, Any], words: str) -> None:
    with pytest.raises(RequestError) as info:
        embeddings_to_gemini({"model": "e", **body}, "e")
    assert info.value.status == 400 and words in info.value.message


# -- thought signatures ------------------------------------------------------------------------


def test_the_tool_call_id_carries_the_thought_signature() -> None:
    signature = base64.b64encode(bytes(range(250, 256)) + b"\xfb\xff" * 40).decode()  # has + and /
    assert "+" in signature or "/" in signature
    call_id = chat_to_gemini_module.call_id(signature)
    assert call_id.startswith("call_") and all(c.isalnum() or c in "_-" for c in call_id)
    assert chat_to_gemini_module.signature_of(call_id) == signature
    plain = chat_to_gemini_module.call_id(None)
    assert len(plain) == 29 and chat_to_gemini_module.signature_of(plain) is None
    assert chat_to_gemini_module.signature_of("toolu_01abc") is None


def _history(call_ids: list[str]) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}} for i in call_ids]},
        *({"role": "tool", "tool_call_id": i, "content": "sunny"} for i in call_ids),
    ]


def test_signatures_go_back_on_their_calls_and_gemini_3_gets_the_skip_value() -> None:
    signed = chat_to_gemini_module.call_id(base64.b64encode(b"opaque").decode())
    parts = chat_to_gemini({"model": "m", "messages": _history([signed, "call_b"])}, "gemini-3-pro")["contents"][1]
    assert parts["parts"][0]["thoughtSignature"] == base64.b64encode(b"opaque").decode()
    assert "thoughtSignature" not in parts["parts"][1]  # only a parallel call's first part is signed
    foreign = chat_to_gemini({"model": "m", "messages": _history(["toolu_1", "toolu_2"])}, "gemini-3-flash")
    assert [p.get("thoughtSignature") for p in foreign["contents"][1]["parts"]] == [
        chat_to_gemini_module.SKIP_SIGNATURE, None]
    older = chat_to_gemini({"model": "m", "messages": _history(["toolu_1"])}, "gemini-2.5-pro")
    assert "thoughtSignature" not in older["contents"][1]["parts"][0]


def test_signed_round_trip_through_the_simulator(sim: SimServer) -> None:
    ask = [{"role": "user", "content": "weather in Paris?"}]
    path = model_path("/v1beta", "gemini-3-pro", "generateContent")

    def send(messages: list[Any]) -> dict[str, Any]:
        body = chat_to_gemini({"model": "m", "messages": messages, "tools": [WEATHER]}, "gemini-3-pro")
        reply = httpx.post(f"{sim.url}{path}", json=body, headers={"x-goog-api-key": "k"})
        assert reply.status_code == 200, reply.text
        return gemini_to_chat(reply.json(), "m")

    message = send(ask)["choices"][0]["message"]
    assert chat_to_gemini_module.signature_of(message["tool_calls"][0]["id"])
    call = message["tool_calls"][0]
    answer = send([*ask, message, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}])
    assert answer["choices"][0]["message"]["content"]
    tampered = {**message, "tool_calls": [{**call, "id": call["id"][:-4] + "AAAA"}]}
    body = chat_to_gemini({"model": "m", "tools": [WEATHER], "messages": [
        *ask, tampered, {"role": "tool", "tool_call_id": tampered["tool_calls"][0]["id"], "content": "x"}]},
        "gemini-3-pro")
    refused = httpx.post(f"{sim.url}{path}", json=body, headers={"x-goog-api-key": "k"})
    assert refused.status_code == 400 and "Corrupted thought signature" in refused.json()["error"]["message"]


@pytest.mark.parametrize(("model", "effort", "thinking"), [
    ("gemini-2.5-flash", "none", {"thinkingBudget": 0}),
    ("gemini-2.5-pro", "medium", {"thinkingBudget": 8192}),
    ("gemini-3-pro-preview", "low", {"thinkingLevel": "LOW"}),
    ("models/gemini-3-flash", "minimal", {"thinkingLevel": "MINIMAL"}),
])
def test_reasoning_effort_becomes_the_thinking_config(model: str, effort: str, thinking: dict[str, Any]) -> None:
    body = {"model": "m", "messages": USER, "reasoning_effort": effort}
    assert chat_to_gemini(body, model)["generationConfig"] == {"thinkingConfig": thinking}


@pytest.mark.parametrize(("extra", "words"), [
    ({"reasoning_effort": "extreme"}, "'reasoning_effort'"),
    ({"functions": [{"name": "f"}]}, "use 'tools'"),
    ({"function_call": "auto"}, "use 'tools'"),
    ({"logprobs": True}, "logprobs"),
])
def test_what_gemini_cannot_take_is_refused(extra: dict[str, Any], words: str) -> None:
    assert words in _refused({"messages": USER, **extra}).message


def test_stream_waits_for_the_usage_that_counts_the_output() -> None:
    translator = GeminiStreamTranslator("m", True)
    finished = (b'data: {"candidates": [{"content": {"parts": [{"text": "Hi"}]}, "finishReason": "STOP"}], '
                b'"usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}}\r\n\r\n')
    assert b"[DONE]" not in translator.feed(finished)  # the prompt's count only: the output's may follow
    usage = b'data: {"usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1, "totalTokenCount": 6}}\r\n\r\n'
    out = translator.feed(usage)
    assert out.endswith(b"data: [DONE]\n\n") and translator.finish() == b""
    last = orjson.loads(SSEDecoder().feed(out)[0].data)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 1


def test_a_stream_failing_midway_ends_in_an_openai_error_event(sim: SimServer) -> None:
    raw = _send(sim, _chat(), stream=True, **{"x-sim-stream-error": "503"}).content
    events = SSEDecoder().feed(_translate(raw, [5] * (len(raw) // 5)))
    payloads = [orjson.loads(e.data) for e in events]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["error"]["type"] == "server_error" and payloads[-1]["error"]["code"] == "service_unavailable"
    assert "x-sim-stream-error" in payloads[-1]["error"]["message"]
    assert all(e.data != b"[DONE]" for e in events)
