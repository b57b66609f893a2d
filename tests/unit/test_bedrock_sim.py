"""extproc.sim.bedrock_api checked against boto3 (the wire-format oracle), and the Bedrock
translation (extproc.translators.chat_to_bedrock*) checked against the simulator's real wire bytes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import boto3
import botocore.config
import botocore.exceptions
import httpx
import orjson
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.sigv4 import sign
from extproc.sim import bedrock_api
from extproc.sim import text as simtext
from extproc.sim.bedrock_api import (
    SIM_AWS_ACCESS_KEY_ID,
    SIM_AWS_SECRET_ACCESS_KEY,
    SIM_AWS_SESSION_ACCESS_KEY_ID,
    SIM_AWS_SESSION_SECRET_ACCESS_KEY,
    SIM_AWS_SESSION_TOKEN,
)
from extproc.sim.wire import SimSettings
from extproc.translators.chat_to_bedrock import (
    chat_to_converse,
    converse_path,
    converse_to_chat,
    error_to_openai,
)
from extproc.translators.chat_to_bedrock_stream import ConverseStreamTranslator

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
USER = [{"role": "user", "content": [{"text": "Tell me, briefly, why the sky is blue?"}]}]
WEATHER = [{"role": "user", "content": [{"text": "What is the weather in Paris?"}]}]
TOOLS = {"tools": [{"toolSpec": {
    "name": "get_weather",
    "description": "Current weather",
    "inputSchema": {"json": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}},
}}]}


class BedrockSim:
    """The Bedrock handlers on 127.0.0.1:0, served from a daemon thread (as SimServer does)."""

    def __init__(self) -> None:
        self.settings = SimSettings(chunks=4)
        self.paths: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.thread: threading.Thread | None = None

    async def _start(self) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.paths.append(request.raw_path)
            if not bedrock_api.matches(request.raw_path):
                return web.Response(status=404)
            return await bedrock_api.dispatch(request, self.settings)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    def start(self) -> BedrockSim:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="bedrock-sim", daemon=True)
        self.thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        assert self.runner is not None and self.thread is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def release(self, name: str) -> None:
        self.loop.call_soon_threadsafe(self.settings.hold(name).set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def sim() -> Iterator[BedrockSim]:
    server = BedrockSim().start()
    try:
        yield server
    finally:
        server.stop()


def make_client(
    sim: BedrockSim, key: str = SIM_AWS_ACCESS_KEY_ID, secret: str = SIM_AWS_SECRET_ACCESS_KEY,
    token: str | None = None, headers: dict[str, str] | None = None,
) -> Any:
    client = boto3.client(
        "bedrock-runtime", endpoint_url=sim.url, region_name="us-east-1",
        aws_access_key_id=key, aws_secret_access_key=secret, aws_session_token=token,
        config=botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=10, connect_timeout=5),
    )
    if headers:
        def add_headers(request: Any, **_: Any) -> None:
            for name, value in headers.items():
                request.headers[name] = value

        client.meta.events.register("before-sign.bedrock-runtime.*", add_headers)
    return client


@pytest.fixture
def client(sim: BedrockSim) -> Any:
    sim.paths.clear()
    return make_client(sim)


def prompt_tokens(messages: list[dict[str, Any]], system: tuple[str, ...] = ()) -> int:
    return bedrock_api.prompt_tokens(list(system), messages)


# -- Converse via boto3 ------------------------------------------------------------------


def test_converse_text(sim: BedrockSim, client: Any) -> None:
    response = client.converse(modelId=HAIKU, messages=USER, system=[{"text": "Be terse."}])
    assert sim.paths == [converse_path(HAIKU, False)]
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert response["stopReason"] == "end_turn"
    (block,) = response["output"]["message"]["content"]
    assert block["text"] == simtext.reply_text(USER[0]["content"][0]["text"], simtext.DEFAULT_REPLY_TOKENS)
    expected_input = 2 * simtext.MESSAGE_OVERHEAD + simtext.count_tokens("Be terse.") + simtext.count_tokens(
        USER[0]["content"][0]["text"])
    assert response["usage"] == {"inputTokens": expected_input, "outputTokens": simtext.DEFAULT_REPLY_TOKENS,
                                 "totalTokens": expected_input + simtext.DEFAULT_REPLY_TOKENS}
    assert isinstance(response["metrics"]["latencyMs"], int)


def test_converse_max_tokens_and_arn_model(sim: BedrockSim, client: Any) -> None:
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-haiku-20240307-v1:0"
    response = client.converse(modelId=arn, messages=USER, inferenceConfig={"maxTokens": 5, "temperature": 0.2})
    assert sim.paths == [converse_path(arn, False)]
    assert response["stopReason"] == "max_tokens"
    assert response["usage"]["outputTokens"] == 5


def test_converse_tool_use_and_result(client: Any) -> None:
    response = client.converse(modelId=HAIKU, messages=WEATHER, toolConfig=TOOLS)
    assert response["stopReason"] == "tool_use"
    text_block, tool_block = response["output"]["message"]["content"]
    use = tool_block["toolUse"]
    assert use["name"] == "get_weather" and use["input"] == {"location": "Paris"}
    assert use["toolUseId"].startswith("tooluse_")
    assert response["usage"]["outputTokens"] == simtext.count_tokens(text_block["text"]) + simtext.count_tokens(
        "get_weather") + simtext.count_tokens('{"location":"Paris"}')
    follow_up = [*WEATHER, response["output"]["message"], {"role": "user", "content": [
        {"toolResult": {"toolUseId": use["toolUseId"], "content": [{"text": "18 degrees and sunny"}]}}]}]
    answer = client.converse(modelId=HAIKU, messages=follow_up, toolConfig=TOOLS)
    assert answer["stopReason"] == "end_turn"
    assert "18 degrees" in answer["output"]["message"]["content"][0]["text"]
    assert answer["usage"]["inputTokens"] == prompt_tokens(follow_up)


def test_tool_choice_and_knob_force_a_tool_call(sim: BedrockSim, client: Any) -> None:
    forced = client.converse(modelId=HAIKU, messages=USER, toolConfig={**TOOLS, "toolChoice": {"any": {}}})
    assert forced["stopReason"] == "tool_use"
    knob = make_client(sim, headers={"x-sim-tool-call": "1"}).converse(modelId=HAIKU, messages=USER, toolConfig=TOOLS)
    assert knob["stopReason"] == "tool_use"
    assert client.converse(modelId=HAIKU, messages=USER, toolConfig=TOOLS)["stopReason"] == "end_turn"


def test_cache_knobs(sim: BedrockSim) -> None:
    total = prompt_tokens(USER)
    client = make_client(sim, headers={"x-sim-cached-tokens": "5", "x-sim-cache-write-tokens": "3"})
    usage = client.converse(modelId=HAIKU, messages=USER)["usage"]
    assert usage == {"inputTokens": total - 8, "outputTokens": 16, "totalTokens": total + 16,
                     "cacheReadInputTokens": 5, "cacheWriteInputTokens": 3}


# -- ConverseStream via boto3 ------------------------------------------------------------------


def test_converse_stream_text(sim: BedrockSim, client: Any) -> None:
    whole = client.converse(modelId=HAIKU, messages=USER)
    response = client.converse_stream(modelId=HAIKU, messages=USER)
    assert sim.paths[-1] == converse_path(HAIKU, True)
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/vnd.amazon.eventstream"
    events = list(response["stream"])
    names = [next(iter(e)) for e in events]
    assert names[0] == "messageStart" and names[-3:] == ["contentBlockStop", "messageStop", "metadata"]
    deltas = [e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e]
    assert len(deltas) == sim.settings.chunks
    assert "".join(deltas) == whole["output"]["message"]["content"][0]["text"]
    assert events[-2]["messageStop"]["stopReason"] == "end_turn"
    assert events[-1]["metadata"]["usage"] == whole["usage"]
    assert "latencyMs" in events[-1]["metadata"]["metrics"]


def test_converse_stream_tool_use(client: Any) -> None:
    events = list(client.converse_stream(modelId=HAIKU, messages=WEATHER, toolConfig=TOOLS)["stream"])
    (start,) = [e["contentBlockStart"] for e in events if "contentBlockStart" in e]
    assert start["contentBlockIndex"] == 1 and start["start"]["toolUse"]["name"] == "get_weather"
    fragments = [e["contentBlockDelta"]["delta"]["toolUse"]["input"] for e in events
                 if "contentBlockDelta" in e and "toolUse" in e["contentBlockDelta"]["delta"]]
    assert len(fragments) > 1 and orjson.loads("".join(fragments)) == {"location": "Paris"}
    assert [e["messageStop"]["stopReason"] for e in events if "messageStop" in e] == ["tool_use"]


def test_mid_stream_exception_raises_the_modeled_error(sim: BedrockSim) -> None:
    client = make_client(sim, headers={"x-sim-stream-exception": "throttlingException"})
    stream = client.converse_stream(modelId=HAIKU, messages=USER)["stream"]
    received: list[Any] = []
    with pytest.raises(botocore.exceptions.EventStreamError) as info:
        for event in stream:
            received.append(event)
    assert info.value.response["Error"]["Code"] == "throttlingException"
    assert "Simulated throttlingException" in info.value.response["Error"]["Message"]
    assert [next(iter(e)) for e in received] == ["messageStart", "contentBlockDelta"]


# -- errors and authentication ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [(429, "ThrottlingException"), (400, "ValidationException"), (403, "AccessDeniedException"),
     (404, "ResourceNotFoundException"), (408, "ModelTimeoutException"), (424, "ModelErrorException"),
     (500, "InternalServerException"), (503, "ServiceUnavailableException")],
)
def test_error_status_is_a_client_error_with_the_right_code(sim: BedrockSim, status: int, code: str) -> None:
    client = make_client(sim, headers={"x-sim-error": str(status)})
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.converse(modelId=HAIKU, messages=USER)
    assert info.value.response["Error"]["Code"] == code
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    modeled = getattr(client.exceptions, code, None)
    if modeled is not None:
        assert isinstance(info.value, modeled)


def test_error_model_and_error_type_knob(sim: BedrockSim, client: Any) -> None:
    with pytest.raises(client.exceptions.ServiceUnavailableException):
        client.converse(modelId="sim-error-503", messages=USER)
    quota = make_client(sim, headers={"x-sim-error": "429", "x-sim-error-type": "ModelNotReadyException"})
    with pytest.raises(quota.exceptions.ModelNotReadyException):
        quota.converse(modelId=HAIKU, messages=USER)


def test_wrong_secret_is_invalid_signature(sim: BedrockSim) -> None:
    client = make_client(sim, secret="not-the-secret")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.converse(modelId=HAIKU, messages=USER)
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert info.value.response["Error"]["Message"].startswith("The request signature we calculated does not match")


def test_unknown_key_and_session_token(sim: BedrockSim) -> None:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        make_client(sim, key="AKIDNOBODY").converse(modelId=HAIKU, messages=USER)
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"
    temporary = make_client(sim, SIM_AWS_SESSION_ACCESS_KEY_ID, SIM_AWS_SESSION_SECRET_ACCESS_KEY, SIM_AWS_SESSION_TOKEN)
    assert temporary.converse(modelId=HAIKU, messages=USER)["stopReason"] == "end_turn"
    with pytest.raises(botocore.exceptions.ClientError) as info:
        make_client(sim, SIM_AWS_SESSION_ACCESS_KEY_ID, SIM_AWS_SESSION_SECRET_ACCESS_KEY, "forged").converse(
            modelId=HAIKU, messages=USER)
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_stale_signature_is_rejected(sim: BedrockSim) -> None:
    then = (datetime.now(UTC) - timedelta(minutes=20)).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=then):
        with pytest.raises(botocore.exceptions.ClientError) as info:
            make_client(sim).converse(modelId=HAIKU, messages=USER)
    assert info.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert "Signature expired" in info.value.response["Error"]["Message"]


@pytest.mark.parametrize(
    ("messages", "extra", "needle"),
    [
        ([{"role": "assistant", "content": [{"text": "hi"}]}], {}, "start with a user message"),
        ([*USER, *USER], {}, "alternate"),
        ([{"role": "user", "content": [{"text": "  "}]}], {}, "blank"),
        ([*WEATHER, {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t", "name": "get_weather",
                                                                    "input": {}}}]}], {}, "toolConfig"),
        (USER, {"inferenceConfig": {"temperature": 1.5}}, "temperature"),
    ],
)
def test_sim_rejects_what_bedrock_rejects(client: Any, messages: list[Any], extra: dict[str, Any], needle: str) -> None:
    with pytest.raises(client.exceptions.ValidationException) as info:
        client.converse(modelId=HAIKU, messages=messages, **extra)
    assert needle in info.value.response["Error"]["Message"]


# -- our signer and translator against the sim's wire bytes ---------------------------------------


def post(sim: BedrockSim, path: str, body: bytes, extra: dict[str, str] | None = None,
         secret: str = SIM_AWS_SECRET_ACCESS_KEY) -> httpx.Response:
    url = sim.url + path
    headers = {"content-type": "application/json"}
    headers |= sign("POST", url, headers, body, "us-west-2", SIM_AWS_ACCESS_KEY_ID, secret)
    return httpx.post(url, content=body, headers=headers | (extra or {}), timeout=10)


CHAT = {
    "model": "claude-haiku",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ],
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                                              "required": ["location"]}}}],
    "max_tokens": 50,
}


def test_sign_then_converse_then_translate(sim: BedrockSim) -> None:
    body = orjson.dumps(chat_to_converse(CHAT))
    response = post(sim, converse_path(HAIKU, False), body)
    assert response.status_code == 200, response.text
    completion = ChatCompletion.model_validate(converse_to_chat(response.json(), "claude-haiku"))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == "get_weather"
    assert orjson.loads(choice.message.tool_calls[0].function.arguments) == {"location": "Paris"}
    assert completion.usage is not None and completion.usage.prompt_tokens == response.json()["usage"]["inputTokens"]


def test_multi_turn_translation_is_accepted_by_the_sim(sim: BedrockSim) -> None:
    first = post(sim, converse_path(HAIKU, False), orjson.dumps(chat_to_converse(CHAT))).json()
    chat = converse_to_chat(first, "claude-haiku")
    call = chat["choices"][0]["message"]["tool_calls"][0]
    follow_up = {**CHAT, "messages": [
        *CHAT["messages"], chat["choices"][0]["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees"},
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ]}
    answer = post(sim, converse_path(HAIKU, False), orjson.dumps(chat_to_converse(follow_up)))
    assert answer.status_code == 200, answer.text
    assert converse_to_chat(answer.json(), "m")["choices"][0]["finish_reason"] == "length"  # max_tokens: 50


def test_tampered_request_is_403(sim: BedrockSim) -> None:
    body = orjson.dumps(chat_to_converse(CHAT))
    url = sim.url + converse_path(HAIKU, False)
    headers = {"content-type": "application/json"}
    headers |= sign("POST", url, headers, body, "us-west-2", SIM_AWS_ACCESS_KEY_ID, SIM_AWS_SECRET_ACCESS_KEY)
    response = httpx.post(url, content=body + b" ", headers=headers, timeout=10)
    assert response.status_code == 403
    assert response.headers["x-amzn-errortype"].startswith("InvalidSignatureException:")
    missing = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=10)
    assert missing.status_code == 403
    assert missing.headers["x-amzn-errortype"].startswith("MissingAuthenticationTokenException:")
    assert orjson.loads(error_to_openai(403, missing.content, missing.headers["x-amzn-errortype"]))["error"][
        "code"] == "invalid_api_key"


def test_sim_error_through_error_to_openai(sim: BedrockSim) -> None:
    response = post(sim, converse_path(HAIKU, False), orjson.dumps(chat_to_converse(CHAT)), {"x-sim-error": "429"})
    assert response.status_code == 429
    error = orjson.loads(error_to_openai(429, response.content, response.headers.get("x-amzn-errortype")))
    assert error == {"error": {"message": "Simulated error 429 (requested via x-sim-error header)", "type": "requests",
                               "param": None, "code": "rate_limit_exceeded"}}


def stream_through_translator(
    sim: BedrockSim, chat: dict[str, Any], extra: dict[str, str] | None = None,
    chunking: Callable[[bytes], list[bytes]] | None = None,
) -> tuple[ConverseStreamTranslator, list[Any]]:
    body = orjson.dumps(chat_to_converse(chat))
    url = sim.url + converse_path(HAIKU, True)
    headers = {"content-type": "application/json"}
    headers |= sign("POST", url, headers, body, "us-east-1", SIM_AWS_ACCESS_KEY_ID, SIM_AWS_SECRET_ACCESS_KEY)
    translator = ConverseStreamTranslator("claude-haiku", include_usage=True)
    out = b""
    with httpx.stream("POST", url, content=body, headers=headers | (extra or {}), timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/vnd.amazon.eventstream"
        for raw in response.iter_raw():
            for piece in chunking(raw) if chunking else [raw]:
                out += translator.feed(piece)
    out += translator.finish()
    events = [e for e in out.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    return translator, [e[6:].decode() if e == b"data: [DONE]" else orjson.loads(e[6:]) for e in events]


@pytest.mark.parametrize("chunking", [None, lambda raw: [raw[i:i + 1] for i in range(len(raw))]])
def test_sim_stream_through_translator_is_valid_openai(sim: BedrockSim, chunking: Any) -> None:
    plain = {**CHAT, "tools": None, "max_tokens": None}
    json_reply = post(sim, converse_path(HAIKU, False), orjson.dumps(chat_to_converse(plain))).json()
    translator, chunks = stream_through_translator(sim, plain, chunking=chunking)
    assert chunks[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    assert text == json_reply["output"]["message"]["content"][0]["text"]
    assert parsed[-2].choices[0].finish_reason == "stop"
    assert parsed[-1].choices == [] and parsed[-1].usage is not None
    assert parsed[-1].usage.prompt_tokens == json_reply["usage"]["inputTokens"]
    assert parsed[-1].usage.completion_tokens == json_reply["usage"]["outputTokens"]
    assert translator.usage is not None and translator.usage.total_tokens == json_reply["usage"]["totalTokens"]


def test_sim_tool_stream_through_translator(sim: BedrockSim) -> None:
    _, chunks = stream_through_translator(sim, CHAT, {"x-sim-cached-tokens": "4"})
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks[:-1]]
    calls = [call for c in parsed if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert calls[0].id and calls[0].function and calls[0].function.name == "get_weather"
    assert {call.index for call in calls} == {0}
    assert orjson.loads("".join(call.function.arguments or "" for call in calls if call.function)) == {
        "location": "Paris"}
    assert [c.choices[0].finish_reason for c in parsed if c.choices][-1] == "tool_calls"
    usage = parsed[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 4


def test_sim_mid_stream_exception_through_translator(sim: BedrockSim) -> None:
    translator, chunks = stream_through_translator(sim, {**CHAT, "tools": None}, {
        "x-sim-stream-exception": "modelStreamErrorException"})
    assert chunks[-1]["error"]["code"] == "model_error" and "[DONE]" not in chunks
    for chunk in chunks[:-1]:
        ChatCompletionChunk.model_validate(chunk)
    assert translator.usage is None


def test_hold_pauses_the_stream_until_released(sim: BedrockSim) -> None:
    client = make_client(sim, headers={"x-sim-hold": "bedrock-hold"})
    stream = iter(client.converse_stream(modelId=HAIKU, messages=USER)["stream"])
    assert "messageStart" in next(stream)
    assert "contentBlockDelta" in next(stream)
    sim.release("bedrock-hold")
    rest = list(stream)
    assert "metadata" in rest[-1]
    assert sim.settings.hold_outcomes["bedrock-hold"] == "released"
