"""extproc.sim.responses_api checked against the official openai SDK (the wire-format oracle).

The simulator runs in-process on 127.0.0.1:0 (``SimServer``, so the ``create_app`` hook is
exercised too); the SDK talks to it over HTTP as it would to api.openai.com.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from extproc.sim import responses_api
from extproc.sim import text as simtext
from extproc.sim.server import SimServer
from extproc.sse import SSEDecoder

INSTRUCTIONS = "You are terse."  # 4 tokens
QUESTION = "Tell me, briefly, why the sky is blue?"  # 11 tokens
PROMPT_TOKENS = 4 + simtext.MESSAGE_OVERHEAD + 11
REPLY = simtext.DEFAULT_REPLY_TOKENS
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TEXT_EVENTS = [
    "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
    *["response.output_text.delta"] * 4,
    "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed",
]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(chunks=4) as server:
        yield server


@pytest.fixture(scope="module")
def other_sim() -> Iterator[SimServer]:
    with SimServer(chunks=4) as server:
        yield server


@pytest.fixture(scope="module")
def client(sim: SimServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key="k", base_url=sim.base_url, max_retries=0, timeout=10) as c:
        yield c


def create(client: openai.OpenAI, **kwargs: Any) -> openai.types.responses.Response:
    return client.responses.create(**{"model": "sim-model", "input": QUESTION, **kwargs})


def raw_events(sim: SimServer, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[tuple[str, Any]]:
    response = httpx.post(sim.base_url + "/responses", json={"model": "sim-model", **body, "stream": True},
                          headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for event in SSEDecoder().feed(response.content):
        data = orjson.loads(event.data)
        assert event.event == data["type"]  # every event names itself twice, as the API does
        out.append((event.event, data))
    return out


def test_matches() -> None:
    assert responses_api.matches("/v1/responses") and responses_api.matches("/openai/v1/responses/")
    assert responses_api.matches("/v1/responses/resp_123")
    assert not responses_api.matches("/v1/chat/completions") and not responses_api.matches("/v1/responses/r/x")
    assert not responses_api.matches("/v1/responsesx")


# -- JSON --------------------------------------------------------------------------------------------


def test_json_reply_and_exact_usage(client: openai.OpenAI) -> None:
    response = create(client, instructions=INSTRUCTIONS)
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.model == "sim-model" and response.instructions == INSTRUCTIONS
    assert response.created_at > 1_700_000_000 and response.error is None and response.incomplete_details is None
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_")
    [part] = message.content
    assert part.type == "output_text" and part.annotations == []
    assert response.output_text == part.text
    assert part.text.startswith("This is a simulated reply to: Tell me, briefly, why")
    assert simtext.count_tokens(part.text) == REPLY
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (PROMPT_TOKENS, REPLY)
    assert usage.total_tokens == PROMPT_TOKENS + REPLY
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    again = create(client, instructions=INSTRUCTIONS)
    assert again.id != response.id and again.output_text == response.output_text  # deterministic
    assert again.usage == usage


def test_message_list_input_and_content_parts(client: openai.OpenAI) -> None:
    response = create(client, input=[
        {"role": "developer", "content": "Be brief."},  # 3 tokens
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                     {"type": "input_image", "image_url": "https://x/y.png"}]},  # 1 token
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},  # 2
        {"role": "user", "content": QUESTION},
    ])
    assert response.usage is not None
    assert response.usage.input_tokens == 4 * simtext.MESSAGE_OVERHEAD + 3 + 1 + 2 + 11
    assert response.output_text.startswith("This is a simulated reply to: Tell me")


def test_cached_and_reasoning_tokens(client: openai.OpenAI) -> None:
    response = create(client, extra_headers={"x-sim-cached-tokens": "8", "x-sim-reasoning-tokens": "10"})
    usage = response.usage
    assert usage is not None
    assert usage.input_tokens_details.cached_tokens == 8 and usage.output_tokens_details.reasoning_tokens == 10
    assert usage.output_tokens == REPLY + 10 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert message.type == "message"
    capped = create(client, extra_headers={"x-sim-cached-tokens": "999"}).usage
    assert capped is not None and capped.input_tokens_details.cached_tokens == capped.input_tokens


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    response = create(client, max_output_tokens=16, extra_headers={"x-sim-reply-tokens": "40"})
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.usage is not None and response.usage.output_tokens == 16
    assert create(client, max_output_tokens=50, extra_headers={"x-sim-reply-tokens": "40"}).status == "completed"
    with pytest.raises(openai.BadRequestError) as info:
        create(client, max_output_tokens=5)
    assert info.value.code == "integer_below_min_value" and info.value.param == "max_output_tokens"


def test_no_usage_knob(client: openai.OpenAI) -> None:
    assert create(client, extra_headers={"x-sim-no-usage": "1"}).usage is None


# -- streaming ---------------------------------------------------------------------------------------


def test_stream_event_sequence_and_usage(client: openai.OpenAI, sim: SimServer) -> None:
    expected = create(client, instructions=INSTRUCTIONS)
    events = list(create(client, instructions=INSTRUCTIONS, stream=True))
    assert [e.type for e in events] == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, in_progress, added = events[0], events[1], events[2]
    assert created.response.status == "in_progress" and created.response.output == []
    assert created.response.usage is None and in_progress.response.id == created.response.id
    assert added.item.type == "message" and added.item.status == "in_progress" and added.item.content == []
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert all(e.item_id == added.item.id for e in events if e.type == "response.output_text.delta")
    assert "".join(deltas) == expected.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == expected.output_text
    completed = events[-1]
    assert completed.response.id == created.response.id and completed.response.status == "completed"
    assert completed.response.output_text == expected.output_text
    assert completed.response.usage == expected.usage
    # the raw bytes: event names, no [DONE], obfuscation padding on deltas unless turned off
    raw = raw_events(sim, {"input": QUESTION})
    assert [name for name, _ in raw] == TEXT_EVENTS
    assert all("obfuscation" in data for name, data in raw if name.endswith(".delta"))
    plain = raw_events(sim, {"input": QUESTION, "stream_options": {"include_obfuscation": False}})
    assert not any("obfuscation" in data for _, data in plain)


def test_stream_chunks_knob(client: openai.OpenAI) -> None:
    events = list(create(client, stream=True, extra_headers={"x-sim-chunks": "7"}))
    assert sum(e.type == "response.output_text.delta" for e in events) == 7


def test_stream_helper(client: openai.OpenAI) -> None:
    expected = create(client)
    with client.responses.stream(model="sim-model", input=QUESTION) as stream:
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert seen == TEXT_EVENTS
    assert final.output_text == expected.output_text and final.usage == expected.usage
    with client.responses.stream(model="sim-model", input=QUESTION,
                                 extra_headers={"x-sim-reasoning-tokens": "6"}) as stream:
        reasoning = list(stream)
        final = stream.get_final_response()
    assert [e.type for e in reasoning][2:4] == ["response.output_item.added", "response.output_item.done"]
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 6


def test_incomplete_stream_ends_with_response_incomplete(client: openai.OpenAI) -> None:
    events = list(create(client, stream=True, max_output_tokens=16, extra_headers={"x-sim-reply-tokens": "20"}))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.usage is not None and events[-1].response.usage.output_tokens == 16


def test_stream_failure_knob(client: openai.OpenAI) -> None:
    events = list(create(client, stream=True, extra_headers={"x-sim-stream-failure": "server_error"}))
    assert [e.type for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"


def test_hold_pauses_after_the_first_delta(client: openai.OpenAI, sim: SimServer) -> None:
    stream = create(client, stream=True, extra_headers={"x-sim-hold": "responses-hold"})
    types = []
    for event in stream:
        types.append(event.type)
        if event.type == "response.output_text.delta":
            break
    assert sim.hold_outcome("responses-hold") is None  # the stream is waiting
    threading.Timer(0.05, sim.release, ("responses-hold",)).start()
    types.extend(e.type for e in stream)
    assert types == TEXT_EVENTS and sim.hold_outcome("responses-hold") == "released"


# -- state: previous_response_id -----------------------------------------------------------------------


def test_previous_response_id_continuity(client: openai.OpenAI) -> None:
    first = create(client, instructions=INSTRUCTIONS)
    assert first.usage is not None
    second = create(client, input="And the sunset?", previous_response_id=first.id)  # 4 tokens
    assert second.previous_response_id == first.id and second.usage is not None
    assert second.usage.input_tokens == first.usage.total_tokens + simtext.MESSAGE_OVERHEAD + 4
    third = create(client, input="Thanks", previous_response_id=second.id, stream=True)
    completed = list(third)[-1]
    assert completed.type == "response.completed" and completed.response.usage is not None
    assert completed.response.usage.input_tokens == second.usage.total_tokens + simtext.MESSAGE_OVERHEAD + 1
    fourth = create(client, input="Bye", previous_response_id=completed.response.id)  # a streamed one is stored too
    assert fourth.status == "completed"


def test_unknown_previous_response_is_a_400(client: openai.OpenAI, sim: SimServer, other_sim: SimServer) -> None:
    first = create(client)
    with openai.OpenAI(api_key="k", base_url=other_sim.base_url, max_retries=0, timeout=10) as other:
        with pytest.raises(openai.BadRequestError) as info:
            create(other, input="again", previous_response_id=first.id)
        with pytest.raises(openai.BadRequestError):  # streaming requests fail before the stream starts
            create(other, input="again", previous_response_id=first.id, stream=True)
    error = info.value
    assert error.status_code == 400 and error.code == "previous_response_not_found"
    assert error.param == "previous_response_id" and error.type == "invalid_request_error"
    assert error.body == {"message": f"Previous response with id '{first.id}' not found.",
                          "type": "invalid_request_error", "param": "previous_response_id",
                          "code": "previous_response_not_found"}
    assert first.id in responses_api.stored_ids(sim.settings)
    assert first.id not in responses_api.stored_ids(other_sim.settings)


def test_store_false_is_not_remembered(client: openai.OpenAI) -> None:
    unstored = create(client, store=False)
    with pytest.raises(openai.BadRequestError) as info:
        create(client, input="again", previous_response_id=unstored.id)
    assert info.value.code == "previous_response_not_found"


def test_retrieve_and_delete(client: openai.OpenAI) -> None:
    response = create(client)
    assert client.responses.retrieve(response.id) == response
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError):
        create(client, input="again", previous_response_id=response.id)


# -- tools -------------------------------------------------------------------------------------------


def test_function_call_and_its_output(client: openai.OpenAI) -> None:
    response = create(client, input="What is the weather in Paris?", tools=[WEATHER_TOOL])
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")
    assert orjson.loads(call.arguments) == {"city": "Paris"}
    assert response.tools[0].type == "function" and response.tools[0].name == "get_weather"
    assert response.usage is not None
    assert response.usage.output_tokens == simtext.count_tokens("get_weather") + simtext.count_tokens(call.arguments)
    # the follow-up must answer the call
    with pytest.raises(openai.BadRequestError) as info:
        create(client, input="go on", previous_response_id=response.id, tools=[WEATHER_TOOL])
    assert info.value.message.endswith(f"No tool output found for function call {call.call_id}.")
    with pytest.raises(openai.BadRequestError):
        create(client, input=[{"type": "function_call_output", "call_id": "call_other", "output": "x"}],
               previous_response_id=response.id, tools=[WEATHER_TOOL])
    answer = create(client, input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21C"}],
                    previous_response_id=response.id, tools=[WEATHER_TOOL])
    assert answer.output[0].type == "message" and answer.output_text.startswith("This is a simulated reply to: Sunny")
    # stateless: the whole history in the input
    stateless = create(client, tools=[WEATHER_TOOL], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ])
    assert stateless.output[0].type == "message"


def test_tool_choice(client: openai.OpenAI) -> None:
    assert create(client, tools=[WEATHER_TOOL]).output[0].type == "message"
    assert create(client, tools=[WEATHER_TOOL], tool_choice="required").output[0].type == "function_call"
    forced = create(client, tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"})
    assert forced.output[0].type == "function_call"
    assert create(client, input="weather?", tools=[WEATHER_TOOL], tool_choice="none").output[0].type == "message"


def test_streamed_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(model="sim-model", input="weather in Paris?", tools=[WEATHER_TOOL]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) == 4 and orjson.loads("".join(deltas)) == {"city": "Paris"}
    [call] = final.output
    assert call.type == "function_call" and call.arguments == "".join(deltas)


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exception"),
    [(400, openai.BadRequestError), (401, openai.AuthenticationError), (404, openai.NotFoundError),
     (429, openai.RateLimitError), (500, openai.InternalServerError), (503, openai.InternalServerError)],
)
def test_error_knob_is_the_sdks_typed_exception(client: openai.OpenAI, status: int, exception: type) -> None:
    with pytest.raises(exception) as info:
        create(client, extra_headers={"x-sim-error": str(status)})
    assert info.value.status_code == status
    with pytest.raises(exception):
        create(client, stream=True, extra_headers={"x-sim-error": str(status)})


def test_error_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="sim-error-429", input="x")


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"input": "x", "stream": True, "stream_options": {"include_usage": True}}, "unknown_parameter",
         "stream_options.include_usage"),
        ({"input": "x", "messages": []}, "unknown_parameter", "messages"),
        ({}, "missing_required_parameter", "input"),
        ({"input": []}, "empty_array", "input"),
        ({"input": 7}, "invalid_type", "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "invalid_value", "input[0].role"),
        ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "invalid_value", "tools[0].name"),
        ({"input": "x", "tool_choice": "required"}, "invalid_value", "tool_choice"),
    ],
)
def test_validation(client: openai.OpenAI, body: dict[str, Any], code: str, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="sim-model", extra_body=body)  # type: ignore[call-overload]
    assert (info.value.code, info.value.param) == (code, param)


def test_missing_model(sim: SimServer) -> None:
    response = httpx.post(sim.base_url + "/responses", json={"input": "x"}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "missing_required_parameter"


def test_method_not_allowed(sim: SimServer) -> None:
    assert httpx.get(sim.base_url + "/responses", timeout=10).status_code == 405


async def test_async_client_and_compression(sim: SimServer) -> None:
    async with openai.AsyncOpenAI(api_key="k", base_url=sim.base_url, max_retries=0, timeout=10) as client:
        response = await client.responses.create(model="sim-model", input=QUESTION,
                                                 extra_headers={"x-sim-compress": "gzip"})
        assert response.usage is not None and response.usage.output_tokens == REPLY
        stream = await client.responses.create(model="sim-model", input=QUESTION, stream=True,
                                               extra_headers={"x-sim-compress": "br"})
        events = [event async for event in stream]
    assert [e.type for e in events] == TEXT_EVENTS
    assert events[-1].response.output_text == response.output_text
