"""extproc.sim checked against the official openai SDK (the wire-format oracle)."""

from __future__ import annotations

import base64
import math
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.sim import RecordedRequest, SimServer
from extproc.sim import text as simtext

ROOT = Path(__file__).resolve().parents[2]
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me, briefly, why the sky is blue?"},
]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    server = SimServer().start_in_thread()
    try:
        yield server
    finally:
        server.stop_in_thread()


@pytest.fixture
def client(sim: SimServer) -> Iterator[openai.OpenAI]:
    sim.clear()
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, timeout=10) as c:
        yield c


def sse_events(sim: SimServer, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[Any]:
    """Raw SSE payloads, to check keys the SDK models would hide (e.g. ``usage: null``)."""
    with httpx.stream("POST", sim.url + path, json=body, headers=headers, timeout=10) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [orjson.loads(e[6:]) for e in events[:-1]]


# --- chat completions ---------------------------------------------------------------------------


def test_chat_non_streaming_usage_is_consistent(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="demo-model", messages=MESSAGES)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "demo-model"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    content = choice.message.content or ""
    assert content.startswith("This is a simulated reply to: Tell me, briefly, why")
    assert r.usage is not None
    assert r.usage.completion_tokens == simtext.count_tokens(content) == simtext.DEFAULT_REPLY_TOKENS
    assert r.usage.prompt_tokens == simtext.count_message_tokens(MESSAGES)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details and r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.completion_tokens_details and r.usage.completion_tokens_details.reasoning_tokens == 0
    again = client.chat.completions.create(model="demo-model", messages=MESSAGES)
    assert again.choices[0].message.content == content  # deterministic


def test_prompt_tokens_depend_on_input_and_parts(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    parts = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi there, friend"}]}],
    )
    assert short.usage and parts.usage
    assert short.usage.prompt_tokens == simtext.MESSAGE_OVERHEAD + 1
    assert parts.usage.prompt_tokens == simtext.MESSAGE_OVERHEAD + 4
    assert (parts.choices[0].message.content or "").startswith("This is a simulated reply to: hi there, friend.")


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_caps_with_finish_reason_length(client: openai.OpenAI, key: str) -> None:
    r = client.chat.completions.create(model="m", messages=MESSAGES, **{key: 5})  # type: ignore[call-overload]
    assert r.choices[0].finish_reason == "length"
    assert r.usage and r.usage.completion_tokens == 5
    assert simtext.count_tokens(r.choices[0].message.content or "") == 5
    long = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40)
    assert long.usage and long.usage.completion_tokens == 40


def test_chat_streaming_without_usage(client: openai.OpenAI, sim: SimServer) -> None:
    full = client.chat.completions.create(model="demo-model", messages=MESSAGES)
    chunks = list(client.chat.completions.create(model="demo-model", messages=MESSAGES, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].delta.content is None
    content = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert len(content) == sim.chunks == 8
    assert "".join(c or "" for c in content) == full.choices[0].message.content
    raw = sse_events(sim, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True})
    assert len(raw) == 10 and all("usage" not in e for e in raw)


def test_chat_streaming_with_usage(client: openai.OpenAI, sim: SimServer) -> None:
    full = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=12)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=12, stream=True, stream_options={"include_usage": True},
            extra_headers={"x-sim-chunks": "3"},
        )
    )
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage == full.usage
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert body[-1].choices[0].finish_reason == "length"
    assert len(body) == 1 + 3 + 1
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content
    raw = sse_events(
        sim, "/v1/chat/completions",
        {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert all("usage" in e and e["usage"] is None for e in raw[:-1])
    assert raw[-1]["choices"] == [] and raw[-1]["usage"]["total_tokens"] > 0


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_chat_tool_calls_json_and_stream_agree(client: openai.OpenAI) -> None:
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    full = client.chat.completions.create(model="m", messages=asked, tools=[WEATHER])
    (call,) = full.choices[0].message.tool_calls or []
    assert full.choices[0].finish_reason == "tool_calls" and full.choices[0].message.content
    assert call.function.name == "get_weather" and orjson.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model="m", messages=asked, tools=[WEATHER], stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id == call.id and deltas[0].function and deltas[0].function.name == "get_weather"
    assert "".join(t.function.arguments or "" for t in deltas if t.function) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage == full.usage
    answered = [*asked, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}]
    after = client.chat.completions.create(model="m", messages=answered, tools=[WEATHER])
    assert after.choices[0].message.tool_calls is None and after.choices[0].finish_reason == "stop"
    plain = client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER])
    assert plain.choices[0].message.tool_calls is None
    forced = client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER], tool_choice="required")
    assert forced.choices[0].message.tool_calls


def test_delay_headers_are_accepted_and_chunks_all_arrive(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True,
        extra_headers={"x-sim-chunks": "4", "x-sim-chunk-delay-ms": "5", "x-sim-first-byte-delay-ms": "5"},
    )
    chunks = list(stream)
    assert [c.choices[0].delta.content is not None for c in chunks].count(True) == 1 + 4
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_bad_knob_header_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="x-sim-chunks"):
        client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-sim-chunks": "zero"})


# --- legacy completions, embeddings, models ------------------------------------------------------


def test_completions(client: openai.OpenAI, sim: SimServer) -> None:
    r = client.completions.create(model="demo-model", prompt="Say hello to the gateway", max_tokens=9)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 9
    assert simtext.count_tokens(r.choices[0].text) == 9
    many = client.completions.create(model="demo-model", prompt=["one", "two words"])
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].finish_reason == "stop"
    assert many.usage and many.usage.prompt_tokens == 3 and many.usage.completion_tokens == 32
    chunks = list(
        client.completions.create(
            model="demo-model", prompt="Say hello to the gateway", max_tokens=9, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    assert "".join(c.choices[0].text for c in chunks[:-1]) == r.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    raw = sse_events(sim, "/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    assert len(raw) == 8 + 1 and all("usage" not in e for e in raw)


def test_embeddings_base64_default_and_float(client: openai.OpenAI, sim: SimServer) -> None:
    b64 = client.embeddings.create(model="demo-embedding", input=["alpha", "beta gamma"])
    assert sim.requests[-1].json["encoding_format"] == "base64"  # the SDK's default
    floats = client.embeddings.create(model="demo-embedding", input=["alpha", "beta gamma"], encoding_format="float")
    assert b64.model == "demo-embedding" and b64.object == "list"
    assert [d.index for d in b64.data] == [0, 1]
    assert [d.embedding for d in b64.data] == [d.embedding for d in floats.data]
    first, second = (d.embedding for d in floats.data)
    assert len(first) == 8 and first != second
    assert math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-5)
    assert b64.usage.prompt_tokens == b64.usage.total_tokens == 3
    wide = client.embeddings.create(model="e", input="alpha", dimensions=64)
    assert len(wide.data[0].embedding) == 64
    ids = client.embeddings.create(model="e", input=[[1, 2, 3], [4]], encoding_format="float")
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 4


def test_embeddings_base64_wire_format(sim: SimServer) -> None:
    body = {"model": "e", "input": "alpha", "encoding_format": "base64", "dimensions": 4}
    data = httpx.post(sim.url + "/v1/embeddings", json=body).json()["data"][0]["embedding"]
    assert isinstance(data, str)
    assert list(struct.unpack("<4f", base64.b64decode(data))) == simtext.embedding_vector("alpha", 4)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "demo-model" in ids and "demo-embedding" in ids
    assert all(m.owned_by == "extproc-sim" and m.object == "model" for m in models.data)
    assert client.models.retrieve("demo-model").id == "demo-model"


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
        (401, openai.AuthenticationError),
    ],
)
def test_errors_on_demand_by_header(client: openai.OpenAI, status: int, exc: type[openai.APIStatusError]) -> None:
    with pytest.raises(exc, match=f"Simulated error {status}") as info:
        client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-sim-error": str(status)})
    assert info.value.status_code == status
    assert (info.value.response.headers.get("retry-after") == "1") == (status == 429)


def test_errors_on_demand_by_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError, match="sim-error-429"):
        client.chat.completions.create(model="sim-error-429", messages=MESSAGES)
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="sim-error-500", input="x")


def test_404_and_400_in_openai_shape(sim: SimServer, client: openai.OpenAI) -> None:
    r = httpx.get(sim.url + "/v1/nope")
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    bad = httpx.post(sim.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert sim.requests[-1].body == b"{not json" and sim.requests[-1].json is None
    no_model = httpx.post(sim.url + "/v1/chat/completions", json={"messages": MESSAGES})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[])


# --- paths, recording, process ------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/openai/v1", "/x/y", ""])
def test_any_base_path_prefix(sim: SimServer, prefix: str) -> None:
    with openai.OpenAI(base_url=sim.url + prefix, api_key="x", max_retries=0) as c:
        r = c.chat.completions.create(model="m", messages=MESSAGES)
    assert r.choices[0].message.content
    assert sim.requests[-1].path == f"{prefix}/chat/completions"


def test_recording(sim: SimServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model="demo-model", messages=MESSAGES, extra_headers={"X-Custom-Thing": "yes"}, extra_query={"a": "1"}
    )
    rec = sim.requests[-1]
    assert isinstance(rec, RecordedRequest)
    assert rec.method == "POST" and rec.path == "/v1/chat/completions" and rec.query == "a=1"
    assert rec.headers["x-custom-thing"] == "yes" and rec.headers["authorization"] == "Bearer x"
    assert rec.json == {"model": "demo-model", "messages": MESSAGES}
    assert orjson.loads(rec.body) == rec.json
    sim.clear()
    assert len(sim.requests) == 0


def test_recording_keeps_last_1000() -> None:
    server = SimServer()
    for i in range(1005):
        server._record(RecordedRequest("GET", f"/{i}", "", {}, b"", None))
    assert len(server.requests) == 1000 and server.requests[0].path == "/5"


async def test_async_start_stop_picks_free_port() -> None:
    async with SimServer(chunks=2) as server:
        assert server.port != 0
        async with httpx.AsyncClient() as c:
            r = await c.post(server.base_url + "/chat/completions", json={"model": "m", "messages": MESSAGES})
        assert r.json()["usage"]["completion_tokens"] == simtext.DEFAULT_REPLY_TOKENS
    assert server.requests[-1].json["model"] == "m"


def test_module_entry_point_serves_and_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.sim", "--host", "127.0.0.1", "--port", "0", "--chunks", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "no ready line"
        line = proc.stdout.readline().strip()
        assert line.startswith("extproc.sim listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        events = sse_events_from(url, {"model": "m", "messages": MESSAGES, "stream": True})
        assert len(events) == 1 + 2 + 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sse_events_from(url: str, body: dict[str, Any]) -> list[str]:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
    return [e for e in r.text.split("\n\n") if e and e != "data: [DONE]"]


def test_start_in_thread_reports_bind_errors(sim: SimServer) -> None:
    with pytest.raises(OSError):
        SimServer(port=sim.port).start_in_thread()


# --- pure text functions ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(prompt=st.text(max_size=80), tokens=st.integers(1, 60), chunks=st.integers(1, 12))
def test_reply_has_exact_length_and_splits_losslessly(prompt: str, tokens: int, chunks: int) -> None:
    reply = simtext.reply_text(prompt, tokens)
    assert simtext.count_tokens(reply) == tokens
    assert reply == simtext.reply_text(prompt, tokens)
    parts = simtext.split_chunks(reply, chunks)
    assert "".join(parts) == reply and len(parts) == min(chunks, tokens)
    assert all(simtext.count_tokens(p) >= 1 for p in parts)


def test_tokenizer_rule() -> None:
    assert simtext.count_tokens("Hello, world!") == 4
    assert simtext.count_tokens("  ") == 0
    assert simtext.count_tokens("don't") == 3
    start = time.monotonic()
    assert simtext.count_tokens(simtext.reply_text("x", 20_000)) == 20_000
    assert time.monotonic() - start < 2
