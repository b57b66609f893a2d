"""Requests that last minutes, through real Envoy: each completes, is accounted, and Envoy
is still the same process afterwards.

Envoy 1.40 with the runtime flag `ext_proc_graceful_grpc_close` crashed (SIGSEGV) right
after any request whose ext_proc stream outlived the gRPC client cache's idle time (50 s,
README "Long requests"). These tests recreate exactly that state: long requests started
together on a gateway that gets no other traffic meanwhile, so the cache goes idle.

The 70-second cases (OpenAI JSON and streams, streams translated to and from Anthropic and
Gemini, an MCP tool call, a client hanging up) run in `make test`, all at once (~75 s); the
5-minute ones are marked `long` and run with `make test-long`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

pytest.importorskip("mcp.server.mcpserver", reason="needs the official MCP SDK 2.x")

import httpx2  # noqa: E402 (the mcp SDK's HTTP client)
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.server.mcpserver import MCPServer  # noqa: E402

from extproc.sim import SimServer  # noqa: E402
from tests.integration.harness import RunningGateway, descendants, free_port, running_gateway  # noqa: E402
from tests.integration.test_mcp_gateway import ServerThread  # noqa: E402

USER = [{"role": "user", "content": "Think about it for a while."}]
SEVENTY_S = 70_000  # ms: past the 50 s after which Envoy 1.40 crashed with the graceful close
FIVE_MIN = 300_000  # ms


def build_slow_tools() -> MCPServer:
    server = MCPServer("slow-tools", log_level="WARNING")

    @server.tool()
    async def ponder(seconds: float) -> str:
        """Answers after `seconds` (an agent's long-running tool)."""
        await asyncio.sleep(seconds)
        return f"pondered for {seconds:g}s"

    return server


@pytest.fixture(scope="module")
def slow_tools() -> Iterator[ServerThread]:
    with ServerThread(build_slow_tools(), json_response=False) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(sim_a: SimServer, slow_tools: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """Defaults everywhere (timeouts included): what a new user runs. Translated backends
    (Anthropic, Gemini) add the upstream ext_proc stage: a second processor stream per request."""
    config = {
        "backends": [{"name": "thinker", "base_url": sim_a.base_url},
                     {"name": "claude", "schema": "anthropic", "base_url": sim_a.url, "api_key": {"env": "T_LONG_KEY"}},
                     {"name": "gemini", "schema": "gemini", "base_url": f"{sim_a.url}/v1beta",
                      "api_key": {"env": "T_LONG_KEY"}}],
        "routes": [{"name": "claude", "match": {"prefix": "claude-"}, "backends": [{"name": "claude"}]},
                   {"name": "gemini", "match": {"prefix": "gemini-"}, "backends": [{"name": "gemini"}]},
                   {"name": "all", "default": True, "backends": [{"name": "thinker"}]}],
        "mcp": {"port": free_port(), "servers": [{"name": "slow", "url": slow_tools.url}],
                "routes": [{"path": "/mcp", "servers": ["slow"]}]},
    }
    with running_gateway(config, tmp_path_factory.mktemp("long"), env={"T_LONG_KEY": "long-test-key"}) as gw:
        yield gw


def envoy_pid(gateway: RunningGateway) -> int:
    assert gateway.process is not None
    pids = [pid for pid in descendants(gateway.process.pid)
            if b"envoy" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]]
    assert len(pids) == 1, pids
    return pids[0]


class LongRequests:
    """Long requests started at once; each test reads the outcome of its own."""

    def __init__(self, gateway: RunningGateway) -> None:
        self.gateway = gateway
        self.envoy_before = envoy_pid(gateway)
        self._pool = ThreadPoolExecutor(max_workers=8)
        self.results: dict[str, Future[Any]] = {}
        self.request_ids: dict[str, str] = {}

    def start(self, name: str, call: Callable[[dict[str, str]], Any]) -> None:
        request_id = f"long-{name}-{uuid.uuid4().hex[:8]}"
        self.request_ids[name] = request_id
        self.results[name] = self._pool.submit(call, {"x-request-id": request_id})

    def result(self, name: str) -> Any:
        return self.results[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def sdk(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=420)


def json_answer_after(gateway: RunningGateway, delay_ms: int) -> Callable[[dict[str, str]], Any]:
    def call(headers: dict[str, str]) -> Any:
        return sdk(gateway).chat.completions.create(
            model="reasoner", messages=USER, extra_headers={**headers, "x-sim-first-byte-delay-ms": str(delay_ms)})
    return call


def stream_paced(gateway: RunningGateway, pieces: int, pause_ms: int, model: str = "reasoner"
                 ) -> Callable[[dict[str, str]], Any]:
    """A stream of `pieces` content chunks with `pause_ms` of silence between them."""
    def call(headers: dict[str, str]) -> Any:
        stream = sdk(gateway).chat.completions.create(
            model=model, messages=USER, stream=True, stream_options={"include_usage": True}, max_tokens=64,
            extra_headers={**headers, "x-sim-chunks": str(pieces), "x-sim-chunk-delay-ms": str(pause_ms)})
        return list(stream)
    return call


def anthropic_stream_paced(gateway: RunningGateway, pause_ms: int) -> Callable[[dict[str, str]], Any]:
    """The anthropic SDK streaming from the OpenAI backend (Messages translated to chat and
    back in the upstream stage), with `pause_ms` of silence between its two content pieces."""
    def call(headers: dict[str, str]) -> Any:
        client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key="unused", max_retries=0,
                                     timeout=420)
        with client.messages.stream(
            model="reasoner", max_tokens=64, messages=[{"role": "user", "content": USER[0]["content"]}],
            extra_headers={**headers, "x-sim-chunks": "2", "x-sim-chunk-delay-ms": str(pause_ms)},
        ) as stream:
            return stream.get_final_message()
    return call


def stream_abandoned(gateway: RunningGateway, pause_ms: int, hang_up_after_s: float) -> Callable[[dict[str, str]], Any]:
    """A client that reads the first event of a stream that pauses, then hangs up during the
    pause: Envoy ends the request while the processor's stream is still open."""
    def call(headers: dict[str, str]) -> Any:
        stream = sdk(gateway).chat.completions.create(
            model="reasoner", messages=USER, stream=True,
            extra_headers={**headers, "x-sim-chunks": "2", "x-sim-chunk-delay-ms": str(pause_ms)})
        first = next(iter(stream))
        time.sleep(hang_up_after_s)
        stream.close()
        return first
    return call


def mcp_call(gateway: RunningGateway, seconds: float) -> Callable[[dict[str, str]], Any]:
    async def session_call(headers: dict[str, str]) -> Any:
        http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=seconds + 60))
        async with http, streamable_http_client(f"{gateway.url}/mcp", http_client=http) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            return await session.call_tool("slow__ponder", {"seconds": seconds})

    return lambda headers: asyncio.run(session_call(headers))


def assert_gateway_unharmed(gateway: RunningGateway, envoy_before: int) -> None:
    """Same Envoy process, no crash in any log, and it still serves."""
    assert envoy_pid(gateway) == envoy_before
    crashes = [line for line in gateway.stderr_lines if "Segmentation fault" in line or "exited unexpectedly" in line]
    assert crashes == []
    reply = sdk(gateway).chat.completions.create(model="quick", messages=USER)
    assert reply.choices[0].message.content


def assert_accounted(gateway: RunningGateway, request_id: str, usage: Any, *, stream: bool = False) -> None:
    """Counted exactly and not recorded as an error. The openai SDK closes a stream's
    connection as soon as it reads `[DONE]`, without waiting for the end of the body, so
    Envoy may log that as a downstream close (DC) racing the upstream's end of stream;
    the answer was whole either way."""
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == request_id)
    assert entry["status"] == 200 and entry["error_type"] in (None, "-", "")
    assert entry["response_flags"] in (("-", "DC") if stream else ("-",))
    assert (entry["input_tokens"], entry["output_tokens"], entry["total_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


@pytest.fixture(scope="module")
def seventy_seconds(gateway: RunningGateway) -> Iterator[LongRequests]:
    """A JSON answer after 70 s, a stream with a 70 s pause, and a 70 s MCP tool call, all at once."""
    requests = LongRequests(gateway)
    requests.start("json", json_answer_after(gateway, SEVENTY_S))
    requests.start("paused-stream", stream_paced(gateway, pieces=2, pause_ms=SEVENTY_S))
    requests.start("mcp", mcp_call(gateway, SEVENTY_S / 1000))
    requests.start("abandoned", stream_abandoned(gateway, pause_ms=SEVENTY_S, hang_up_after_s=60))
    requests.start("to-anthropic", stream_paced(gateway, pieces=2, pause_ms=SEVENTY_S, model="claude-thinker"))
    requests.start("to-gemini", stream_paced(gateway, pieces=2, pause_ms=SEVENTY_S, model="gemini-2.5-pro"))
    requests.start("from-anthropic", anthropic_stream_paced(gateway, pause_ms=SEVENTY_S))
    yield requests
    requests.close()


@pytest.fixture(scope="module")
def five_minutes(gateway: RunningGateway) -> Iterator[LongRequests]:
    """A JSON answer after 5 minutes and a stream lasting 5 minutes, at once."""
    requests = LongRequests(gateway)
    requests.start("json", json_answer_after(gateway, FIVE_MIN))
    requests.start("stream", stream_paced(gateway, pieces=31, pause_ms=FIVE_MIN // 30))
    yield requests
    requests.close()


@pytest.mark.timeout(240)
def test_json_answered_after_70_seconds(gateway: RunningGateway, seventy_seconds: LongRequests) -> None:
    reply = seventy_seconds.result("json")
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    assert_accounted(gateway, seventy_seconds.request_ids["json"], reply.usage)
    assert_gateway_unharmed(gateway, seventy_seconds.envoy_before)


@pytest.mark.timeout(240)
def test_stream_with_a_70_second_pause(gateway: RunningGateway, seventy_seconds: LongRequests) -> None:
    chunks = seventy_seconds.result("paused-stream")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    assert_accounted(gateway, seventy_seconds.request_ids["paused-stream"], chunks[-1].usage, stream=True)
    assert_gateway_unharmed(gateway, seventy_seconds.envoy_before)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("name", "backend"), [("to-anthropic", "claude"), ("to-gemini", "gemini")])
def test_translated_stream_with_a_70_second_pause(
    gateway: RunningGateway, seventy_seconds: LongRequests, name: str, backend: str
) -> None:
    """An OpenAI stream from an Anthropic or Gemini backend: both processor streams (request
    and upstream stage) stay open through the pause."""
    chunks = seventy_seconds.result(name)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == seventy_seconds.request_ids[name])
    assert entry["backend_name"] == backend
    assert_accounted(gateway, seventy_seconds.request_ids[name], chunks[-1].usage, stream=True)
    assert_gateway_unharmed(gateway, seventy_seconds.envoy_before)


@pytest.mark.timeout(240)
def test_anthropic_client_stream_from_an_openai_backend_with_a_70_second_pause(
    gateway: RunningGateway, seventy_seconds: LongRequests
) -> None:
    message = seventy_seconds.result("from-anthropic")
    assert message.content[0].text and message.usage.output_tokens > 0
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == seventy_seconds.request_ids["from-anthropic"])
    assert entry["status"] == 200 and entry["backend_name"] == "thinker"
    assert (entry["input_tokens"], entry["output_tokens"]) == (message.usage.input_tokens, message.usage.output_tokens)
    assert_gateway_unharmed(gateway, seventy_seconds.envoy_before)


@pytest.mark.timeout(240)
def test_mcp_tool_call_of_70_seconds(gateway: RunningGateway, seventy_seconds: LongRequests) -> None:
    result = seventy_seconds.result("mcp")
    assert result.is_error is False and "pondered for 70s" in str(result.content[0])
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == seventy_seconds.request_ids["mcp"]
                                    and e.get("mcp_method") == "tools/call")
    assert entry["status"] == 200 and entry["mcp_tool_name"] == "slow__ponder" and entry["mcp_backend"] == "slow"
    assert_gateway_unharmed(gateway, seventy_seconds.envoy_before)


@pytest.mark.timeout(240)
def test_client_hanging_up_after_60_seconds(gateway: RunningGateway, seventy_seconds: LongRequests) -> None:
    """The request ends while the processor's stream is open: Envoy closes it (gracefully)
    and the processor records the cut-off response."""
    first = seventy_seconds.result("abandoned")
    assert first.choices[0].delta.role == "assistant"
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == seventy_seconds.request_ids["abandoned"])
    assert entry["status"] == 200 and "DC" in entry["response_flags"]
    gateway.wait_stderr(lambda line: "response cut off before completion" in line and "output_seen=True" in line)
    assert_gateway_unharmed(gateway, seventy_seconds.envoy_before)


@pytest.mark.long
@pytest.mark.timeout(480)
def test_json_answered_after_5_minutes(gateway: RunningGateway, five_minutes: LongRequests) -> None:
    reply = five_minutes.result("json")
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    assert_accounted(gateway, five_minutes.request_ids["json"], reply.usage)
    assert_gateway_unharmed(gateway, five_minutes.envoy_before)


@pytest.mark.long
@pytest.mark.timeout(480)
def test_stream_lasting_5_minutes(gateway: RunningGateway, five_minutes: LongRequests) -> None:
    chunks = five_minutes.result("stream")
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 31 and chunks[-1].usage is not None
    assert_accounted(gateway, five_minutes.request_ids["stream"], chunks[-1].usage, stream=True)
    assert_gateway_unharmed(gateway, five_minutes.envoy_before)
