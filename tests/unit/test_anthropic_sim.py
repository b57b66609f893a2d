"""extproc.sim.anthropic_api checked against the official anthropic SDK (the wire-format oracle),
and its real streams fed through the gateway's translation, checked against the openai SDK."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.schemas.anthropic import StreamUsage, usage_from_anthropic
from extproc.schemas.openai import usage_object
from extproc.sim import anthropic_api
from extproc.sim import text as simtext
from extproc.sim.wire import SimSettings
from extproc.sse import SSEDecoder
from extproc.translators.chat_to_anthropic import (
    AnthropicStreamTranslator,
    chat_to_messages,
    messages_to_chat,
)
from extproc.usage import TokenUsage

SYSTEM = "You are terse."
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me, briefly, why the sky is blue?"}]
# "You are terse." is 4 tokens; the message is 4 overhead + 11 tokens
PROMPT_TOKENS = 19
WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather now",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                     "required": ["city"]},
}
HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


class Sim:
    """The Anthropic simulator on 127.0.0.1:0, served from a thread (the SDK client is sync)."""

    def __init__(self) -> None:
        self.settings = SimSettings(chunks=4)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _start(self) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            if anthropic_api.matches(request.path):
                return await anthropic_api.dispatch(request, self.settings)
            return web.Response(status=404)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> Sim:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def release(self, name: str) -> None:
        self._loop.call_soon_threadsafe(self.settings.hold(name).set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    server = Sim().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(sim: Sim) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="k", base_url=sim.url, max_retries=0, timeout=10) as c:
        yield c


def post(sim: Sim, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(sim.url + "/v1/messages", json=body, headers={**HEADERS, **(headers or {})}, timeout=10)


def raw_stream(sim: Sim, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    response = post(sim, {**body, "stream": True}, headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response.content


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in SSEDecoder().feed(raw):
        data = orjson.loads(event.data)
        assert event.event == data["type"]  # every event names itself twice, as the API does
        out.append((event.event, data))
    return out


def test_matches() -> None:
    assert anthropic_api.matches("/v1/messages") and anthropic_api.matches("/anthropic/v1/messages/")
    assert not anthropic_api.matches("/v1/chat/completions") and not anthropic_api.matches("/v1/messages/batches")


# -- JSON ------------------------------------------------------------------------------------------


def test_json_reply_and_exact_usage(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="claude-sim", max_tokens=100, system=SYSTEM, messages=MESSAGES)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-sim" and message.stop_reason == "end_turn" and message.stop_sequence is None
    [block] = message.content
    assert block.type == "text" and block.text.startswith("This is a simulated reply to: Tell me, briefly, why")
    assert simtext.count_tokens(block.text) == simtext.DEFAULT_REPLY_TOKENS
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (PROMPT_TOKENS, simtext.DEFAULT_REPLY_TOKENS)
    assert usage.cache_read_input_tokens == 0 and usage.cache_creation_input_tokens == 0
    again = client.messages.create(model="claude-sim", max_tokens=100, system=SYSTEM, messages=MESSAGES)
    assert again.content == message.content  # deterministic


def test_cache_knobs_split_the_prompt(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="claude-sim", max_tokens=100, system=SYSTEM, messages=MESSAGES,
        extra_headers={"x-sim-cached-tokens": "5", "x-sim-cache-creation-tokens": "4"},
    )
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (10, 5, 4)
    assert usage.cache_creation and usage.cache_creation.ephemeral_5m_input_tokens == 4
    assert usage_from_anthropic(usage.model_dump()) == TokenUsage(
        input_tokens=PROMPT_TOKENS, output_tokens=16, total_tokens=PROMPT_TOKENS + 16, cached_input_tokens=5,
        cache_creation_input_tokens=4,
    )
    capped = client.messages.create(
        model="claude-sim", max_tokens=100, system=SYSTEM, messages=MESSAGES,
        extra_headers={"x-sim-cached-tokens": "15", "x-sim-cache-creation-tokens": "15"},
    ).usage
    assert (capped.input_tokens, capped.cache_read_input_tokens, capped.cache_creation_input_tokens) == (0, 15, 4)


def test_max_tokens_cuts_the_reply(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="claude-sim", max_tokens=5, messages=MESSAGES)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 5
    longer = client.messages.create(model="claude-sim", max_tokens=50, messages=MESSAGES,
                                    extra_headers={"x-sim-reply-tokens": "40"})
    assert longer.stop_reason == "end_turn" and longer.usage.output_tokens == 40


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="claude-sim", max_tokens=100, messages=MESSAGES,
                                     stop_sequences=["never", "briefly"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "briefly"
    [block] = message.content
    assert block.type == "text" and block.text == "This is a simulated reply to: Tell me, "
    assert message.usage.output_tokens == simtext.count_tokens(block.text)


def test_prompt_counts_blocks_tools_and_tool_results(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"},
                                     {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "Sunny, 21C"}]},
    ]
    message = client.messages.create(model="claude-sim", max_tokens=100, tools=[WEATHER_TOOL], messages=messages)
    # tool: get_weather(1) + Weather now(2); messages: 3 x 4 overhead + "Weather in Paris?"(4)
    # + get_weather(1) + {"city":"Paris"}(9: { " city " : " Paris " }) + "Sunny, 21C"(3)
    assert message.usage.input_tokens == 3 + 12 + 4 + 1 + 9 + 3
    assert message.stop_reason == "end_turn"  # the last user turn holds only a tool result: answer in text


# -- streaming -------------------------------------------------------------------------------------


def test_stream_event_order_and_cumulative_usage(sim: Sim) -> None:
    body = {"model": "claude-sim", "max_tokens": 100, "system": SYSTEM, "messages": MESSAGES}
    got = events(raw_stream(sim, body, {"x-sim-chunks": "3"}))
    assert [name for name, _ in got] == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * 3, "content_block_stop",
        "message_delta", "message_stop",
    ]
    start = got[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == PROMPT_TOKENS and start["usage"]["output_tokens"] == 1
    assert got[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    final = got[-2][1]
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == 16 and final["usage"]["input_tokens"] == PROMPT_TOKENS
    streamed = "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta")
    json_reply = post(sim, body).json()
    assert streamed == json_reply["content"][0]["text"]


def test_sdk_stream_matches_the_json_reply(client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": "claude-sim", "max_tokens": 100, "system": SYSTEM, "messages": MESSAGES}
    with client.messages.stream(**kwargs, extra_headers={"x-sim-cached-tokens": "3"}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) == 4
    message = client.messages.create(**kwargs, extra_headers={"x-sim-cached-tokens": "3"})
    assert "".join(pieces) == final.content[0].text == message.content[0].text  # type: ignore[union-attr]
    assert final.usage.input_tokens == message.usage.input_tokens == PROMPT_TOKENS - 3
    assert final.usage.cache_read_input_tokens == 3 and final.usage.output_tokens == 16
    assert final.stop_reason == "end_turn"


def test_stream_true_yields_typed_events(client: anthropic.Anthropic) -> None:
    stream = client.messages.create(model="claude-sim", max_tokens=100, messages=MESSAGES, stream=True)
    kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]


@settings(max_examples=25, deadline=None)
@given(chunks=st.integers(1, 40), max_tokens=st.integers(1, 30), reply_tokens=st.integers(1, 30))
def test_stream_and_json_agree(sim: Sim, chunks: int, max_tokens: int, reply_tokens: int) -> None:
    body = {"model": "claude-sim", "max_tokens": max_tokens, "messages": MESSAGES}
    headers = {"x-sim-chunks": str(chunks), "x-sim-reply-tokens": str(reply_tokens)}
    message = post(sim, body, headers).json()
    got = events(raw_stream(sim, body, headers))
    deltas = [d["delta"]["text"] for n, d in got if n == "content_block_delta"]
    assert "".join(deltas) == message["content"][0]["text"]
    assert len(deltas) == min(chunks, message["usage"]["output_tokens"])
    assert got[-2][1]["delta"]["stop_reason"] == message["stop_reason"]
    assert got[-2][1]["usage"]["output_tokens"] == message["usage"]["output_tokens"] == min(max_tokens, reply_tokens)
    assert message["stop_reason"] == ("max_tokens" if max_tokens < reply_tokens else "end_turn")


def test_hold_pauses_after_the_first_delta(sim: Sim) -> None:
    body = {"model": "claude-sim", "max_tokens": 100, "messages": MESSAGES, "stream": True}
    seen: list[str] = []
    with httpx.stream("POST", sim.url + "/v1/messages", json=body, timeout=10,
                      headers={**HEADERS, "x-sim-hold": "anthropic-hold"}) as response:
        decoder = SSEDecoder()
        for chunk in response.iter_raw():
            for event in decoder.feed(chunk):
                seen.append(str(event.event))
                if event.event == "content_block_delta" and seen.count("content_block_delta") == 1:
                    assert "message_stop" not in seen
                    sim.release("anthropic-hold")
    assert seen.count("content_block_delta") == 4 and seen[-1] == "message_stop"
    assert sim.settings.hold_outcomes["anthropic-hold"] == "released"


def test_compressed_replies(client: anthropic.Anthropic) -> None:
    for encoding in ("gzip", "br"):
        headers = {"x-sim-compress": encoding}
        message = client.messages.create(model="claude-sim", max_tokens=100, messages=MESSAGES, extra_headers=headers)
        with client.messages.stream(model="claude-sim", max_tokens=100, messages=MESSAGES,
                                    extra_headers=headers) as stream:
            final = stream.get_final_message()
        assert final.content[0].text == message.content[0].text  # type: ignore[union-attr]
        assert final.usage.output_tokens == message.usage.output_tokens == 16


# -- tool use and thinking ---------------------------------------------------------------------------


def test_tool_use_json(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]
    message = client.messages.create(model="claude-sim", max_tokens=100, tools=[WEATHER_TOOL], messages=messages)
    assert message.stop_reason == "tool_use"
    preamble, call = message.content
    assert preamble.type == "text" and call.type == "tool_use"
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id.startswith("toolu_")
    assert message.usage.output_tokens == simtext.count_tokens(preamble.text) + 1 + 9

    # the tool result goes back; the model answers in text
    follow_up = [
        *messages,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
    ]
    answer = client.messages.create(model="claude-sim", max_tokens=100, tools=[WEATHER_TOOL], messages=follow_up)
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"


def test_tool_use_stream_assembles_in_the_sdk(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Rome?"}]
    with client.messages.stream(model="claude-sim", max_tokens=100, tools=[WEATHER_TOOL], messages=messages,
                                extra_headers={"x-sim-chunks": "5"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    call = final.content[1]
    assert call.type == "tool_use" and call.input == {"city": "Paris"}


@pytest.mark.parametrize(
    ("choice", "headers", "prompt", "expected"),
    [
        (None, {"x-sim-tool-call": "1"}, "Hello", ["text", "tool_use"]),
        ({"type": "none"}, {}, "Weather?", ["text"]),
        ({"type": "any"}, {}, "Hello", ["tool_use"]),
        ({"type": "tool", "name": "now"}, {}, "Hello", ["tool_use"]),
        (None, {}, "Hello", ["text"]),
    ],
)
def test_tool_choice(
    client: anthropic.Anthropic, choice: Any, headers: dict[str, str], prompt: str, expected: list[str]
) -> None:
    now = {"name": "now", "input_schema": {"type": "object", "properties": {}}}
    kwargs: dict[str, Any] = {"tool_choice": choice} if choice else {}
    message = client.messages.create(model="claude-sim", max_tokens=100, tools=[WEATHER_TOOL, now],
                                     messages=[{"role": "user", "content": prompt}], extra_headers=headers, **kwargs)
    assert [b.type for b in message.content] == expected
    if choice and choice["type"] == "tool":
        assert message.content[0].name == "now" and message.content[0].input == {}  # type: ignore[union-attr]


def test_thinking_block_comes_first(client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": "claude-sim", "max_tokens": 2000, "messages": MESSAGES,
                              "thinking": {"type": "enabled", "budget_tokens": 1024}}
    message = client.messages.create(**kwargs)
    assert [b.type for b in message.content] == ["thinking", "text"]
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == message.content[0].thinking  # type: ignore[union-attr]
    assert final.content[0].signature  # type: ignore[union-attr]
    assert final.usage.output_tokens == message.usage.output_tokens


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exception", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_simulated_errors_are_typed_sdk_exceptions(
    client: anthropic.Anthropic, status: int, exception: type[anthropic.APIStatusError], error_type: str
) -> None:
    with pytest.raises(exception) as info:
        client.messages.create(model="claude-sim", max_tokens=10, messages=MESSAGES,
                               extra_headers={"x-sim-error": str(status)})
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == error_type
    assert info.value.request_id and info.value.request_id.startswith("req_")
    if status == 429:
        assert info.value.response.headers["retry-after"] == "1"


def test_error_model_name(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.ServiceUnavailableError):
        client.messages.create(model="sim-error-503", max_tokens=10, messages=MESSAGES)


def test_missing_credentials_is_an_authentication_error(sim: Sim) -> None:
    no_auth: Any = {"Authorization": anthropic.Omit()}  # the SDK sends the key as a Bearer token: drop it
    with anthropic.Anthropic(api_key="k", base_url=sim.url, max_retries=0, default_headers=no_auth) as c:
        with pytest.raises(anthropic.AuthenticationError) as info:
            c.messages.create(model="claude-sim", max_tokens=10, messages=MESSAGES)
    assert "x-api-key" in info.value.message
    response = httpx.post(sim.url + "/v1/messages", json={}, headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_missing_version_is_400(sim: Sim) -> None:
    response = httpx.post(sim.url + "/v1/messages", json={}, headers={"x-api-key": "k"})
    assert response.status_code == 400
    assert response.json()["error"] == {"type": "invalid_request_error",
                                        "message": "anthropic-version: header is required"}
    response = httpx.post(sim.url + "/v1/messages", json={}, headers={"x-api-key": "k", "anthropic-version": "v1"})
    assert response.status_code == 400 and "not a valid version" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": 5, "messages": MESSAGES}, "model: Field required"),
        ({"model": "m", "messages": MESSAGES}, "max_tokens: Field required"),
        ({"model": "m", "max_tokens": "5", "messages": MESSAGES}, "max_tokens: Input should be a valid integer"),
        ({"model": "m", "max_tokens": 5}, "messages: Field required"),
        ({"model": "m", "max_tokens": 5, "messages": []}, "at least one message is required"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
         "messages.0.role: Input should be 'user' or 'assistant'"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": ""}]},
         "all messages must have non-empty content"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
         "text content blocks must be non-empty"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "Input tag 'image_url'"),
        ({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": "and?"},
        ]}, "`tool_use` ids were found without `tool_result` blocks immediately after: t1"),
        ({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9", "content": "x"}]},
        ]}, "unexpected `tool_use_id` found in `tool_result` blocks: t9"),
        ({"model": "m", "max_tokens": 5, "messages": MESSAGES, "temperature": 1.5}, "temperature"),
        ({"model": "m", "max_tokens": 5, "messages": MESSAGES, "tools": [{"name": "f"}]},
         "tools.0.input_schema: Field required"),
        ({"model": "m", "max_tokens": 5, "messages": MESSAGES, "tool_choice": {"type": "any"}},
         "tool_choice: may only be specified while providing tools"),
        ({"model": "m", "max_tokens": 2000, "messages": MESSAGES, "thinking": {"type": "enabled", "budget_tokens": 10}},
         "thinking.budget_tokens"),
        ({"model": "m", "max_tokens": 1024, "messages": MESSAGES,
          "thinking": {"type": "enabled", "budget_tokens": 1024}}, "must be greater than `thinking.budget_tokens`"),
    ],
)
def test_validation_errors(sim: Sim, body: dict[str, Any], message: str) -> None:
    response = post(sim, body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert message in error["error"]["message"], error["error"]["message"]
    assert response.headers["request-id"] == error["request_id"]


def test_bad_knob_and_bad_json_are_anthropic_shaped(sim: Sim) -> None:
    response = post(sim, {"model": "m", "max_tokens": 5, "messages": MESSAGES}, {"x-sim-chunks": "zero"})
    assert response.status_code == 400 and "x-sim-chunks" in response.json()["error"]["message"]
    response = httpx.post(sim.url + "/v1/messages", content=b"{", headers=HEADERS)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.get(sim.url + "/v1/messages", headers=HEADERS)
    assert response.status_code == 405 and response.json()["type"] == "error"


def test_sdk_bad_request(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model="claude-sim", max_tokens=0, messages=MESSAGES)


# -- the gateway's translation, against the simulator's real bytes ----------------------------------

OPENAI_REQUEST: dict[str, Any] = {
    "model": "gpt-alias",
    "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [
            {"type": "text", "text": "What's the weather where this photo was taken?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                 "parameters": WEATHER_TOOL["input_schema"]}}],
    "max_completion_tokens": 200,
}


def test_translated_request_is_accepted_and_the_reply_reads_as_openai(client: anthropic.Anthropic) -> None:
    request = chat_to_messages(OPENAI_REQUEST, "claude-sim")
    message = client.messages.create(**request)
    completion = ChatCompletion.model_validate(messages_to_chat(message.model_dump(), "gpt-alias"))
    assert completion.model == "claude-sim" and completion.choices[0].finish_reason == "tool_calls"
    [call] = completion.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and orjson.loads(call.function.arguments) == {"city": "Paris"}

    # second turn, in OpenAI terms: the assistant's tool call and the tool's answer
    follow_up = {
        **OPENAI_REQUEST,
        "messages": [
            *OPENAI_REQUEST["messages"],
            completion.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21C"},
        ],
        "stop": ["never-matches"],
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "user": "u-1",
    }
    answer = client.messages.create(**chat_to_messages(follow_up, "claude-sim"))
    final = ChatCompletion.model_validate(messages_to_chat(answer.model_dump()))
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    assert final.usage is not None and final.usage.prompt_tokens == answer.usage.input_tokens


def translate(raw: bytes, include_usage: bool = True) -> tuple[list[Any], AnthropicStreamTranslator]:
    translator = AnthropicStreamTranslator("gpt-alias", include_usage)
    out = b"".join(translator.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)) + translator.finish()
    items = []
    for event in SSEDecoder().feed(out):
        items.append("[DONE]" if event.data == b"[DONE]" else orjson.loads(event.data))
    return items, translator


def test_translated_text_stream_parses_as_openai_chunks(sim: Sim) -> None:
    headers = {"x-sim-cached-tokens": "5", "x-sim-cache-creation-tokens": "4"}
    body = {"model": "claude-sim", "max_tokens": 100, "system": SYSTEM, "messages": MESSAGES}
    items, translator = translate(raw_stream(sim, body, headers))
    assert items[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(i) for i in items[:-1]]
    assert all(c.model == "claude-sim" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == post(sim, body, headers).json()["content"][0]["text"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (PROMPT_TOKENS, 16, PROMPT_TOKENS + 16)
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == 5
    assert items[-2]["usage"]["prompt_tokens_details"]["cache_creation_tokens"] == 4
    assert translator.usage == TokenUsage(PROMPT_TOKENS, 16, PROMPT_TOKENS + 16, 5, 4)


def test_translated_tool_stream_parses_as_openai_chunks(sim: Sim) -> None:
    request = chat_to_messages({**OPENAI_REQUEST, "stream": True}, "claude-sim")
    items, translator = translate(raw_stream(sim, request, {"x-sim-chunks": "6"}), include_usage=False)
    chunks = [ChatCompletionChunk.model_validate(i) for i in items[:-1]]
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert {t.index for t in calls} == {0}  # the text block before it does not count
    assert calls[0].id and calls[0].function and calls[0].function.name == "get_weather"
    arguments = "".join(t.function.arguments or "" for t in calls if t.function)
    assert orjson.loads(arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices for c in chunks)  # include_usage off: no usage chunk
    assert translator.usage is not None and translator.usage.output_tokens > 0


def test_native_stream_usage_matches_the_sdk(client: anthropic.Anthropic, sim: Sim) -> None:
    body = {"model": "claude-sim", "max_tokens": 100, "system": SYSTEM, "messages": MESSAGES,
            "thinking": {"type": "enabled", "budget_tokens": 1024}}
    body["max_tokens"] = 2000
    watcher = StreamUsage()
    for name, data in events(raw_stream(sim, body, {"x-sim-cached-tokens": "2"})):
        watcher.on_event(name, data)
    assert watcher.complete and watcher.output_seen and watcher.response_model == "claude-sim"
    message = client.messages.create(**body, extra_headers={"x-sim-cached-tokens": "2"})
    assert watcher.usage == usage_from_anthropic(message.usage.model_dump())
    assert watcher.usage is not None and watcher.usage.input_tokens == PROMPT_TOKENS
    assert usage_object(watcher.usage)["prompt_tokens_details"] == {"cached_tokens": 2, "cache_creation_tokens": 0}
