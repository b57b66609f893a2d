"""``SimServer``: runs the simulator app and records what it was sent.

Recording lives here, in a middleware, so the API handlers stay free of test
concerns; tests read ``server.requests`` to see what a gateway forwarded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from aiohttp import web

from extproc.sim import (
    anthropic_api,
    bedrock_api,
    gemini_api,
    google_auth,
    media_api,
    rerank_api,
    responses_api,
    vertex_api,
)
from extproc.sim.openai_api import dispatch, error_response
from extproc.sim.google_auth import GoogleAccounts
from extproc.sim.wire import SETTINGS, SimSettings

MAX_RECORDED = 1000
MAX_BODY_BYTES = 64 * 1024 * 1024  # long prompts in benchmarks exceed aiohttp's 1 MiB default
SHUTDOWN_TIMEOUT_S = 0.5  # a simulator need not wait long for in-flight streams

Recorder = Callable[["RecordedRequest"], None]
T = TypeVar("T")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the simulator received it (header names lower-cased)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any | None


def _headers(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _recording_middleware(record: Recorder) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPException as exc:  # body over client_max_size
            record(RecordedRequest(request.method, request.path, request.query_string, _headers(request), b"", None))
            return error_response(exc.status, exc.reason)
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        record(RecordedRequest(request.method, request.path, request.query_string, _headers(request), body, parsed))
        return await handler(request)

    return middleware


def create_app(settings: SimSettings, record: Recorder | None = None) -> web.Application:
    """The simulator as an aiohttp app: one catch-all route that routes by path suffix
    (OpenAI, Anthropic Messages, Bedrock Converse, Gemini, Vertex AI with Google's token endpoint,
    the Responses API, OpenAI's images and audio, Cohere-style rerank, each in its own module)."""
    middlewares = [_recording_middleware(record)] if record is not None else []
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings

    async def handle(request: web.Request) -> web.StreamResponse:
        # One simulator speaks every provider's API, told apart by path as the real ones are.
        if vertex_api.matches(request.path):
            return await vertex_api.dispatch(request, settings)
        if request.path == google_auth.TOKEN_PATH:
            return await google_auth.token_endpoint(request, settings.google)
        if anthropic_api.matches(request.path):
            return await anthropic_api.dispatch(request, settings)
        if bedrock_api.matches(request.path):
            return await bedrock_api.dispatch(request, settings)
        if gemini_api.matches(request.path, request.headers):
            return await gemini_api.dispatch(request, settings)
        if responses_api.matches(request.path):
            return await responses_api.dispatch(request, settings)
        if media_api.matches(request.path):
            return await media_api.dispatch(request, settings)
        if rerank_api.matches(request.path):
            return await rerank_api.dispatch(request, settings)
        return await dispatch(request, settings)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app


class _Setting(Generic[T]):
    """A ``SimServer`` attribute kept on its ``SimSettings``, so setting it reaches the
    running handlers (e.g. ``server.chunks = 3`` between test cases)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, server: SimServer, owner: type | None = None) -> T:
        value: T = getattr(server.settings, self._name)
        return value

    def __set__(self, server: SimServer, value: T) -> None:
        setattr(server.settings, self._name, value)


class SimServer:
    """A local OpenAI-compatible upstream for demos, integration tests and benchmarks."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, chunks: int = 8, chunk_delay_ms: float = 0.0) -> None:
        self.host = host
        self.port = port
        self.settings = SimSettings(chunks=chunks, chunk_delay_ms=chunk_delay_ms)
        self.requests: list[RecordedRequest] = []
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    chunks = _Setting[int]()
    chunk_delay_ms = _Setting[float]()
    google = _Setting[GoogleAccounts]()  # Google service accounts and the tokens issued to them

    @property
    def url(self) -> str:
        """Origin without a base path, e.g. ``http://127.0.0.1:PORT``."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI SDK base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    def _record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        if len(self.requests) > MAX_RECORDED:
            del self.requests[0]

    def release(self, name: str) -> None:
        """Let streams held with `x-sim-hold: NAME` continue (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.settings.hold(name).set)
        else:
            self.settings.hold(name).set()

    def hold_outcome(self, name: str) -> str | None:
        """'released' when a held stream went on because of `release`, 'timed_out' otherwise."""
        return self.settings.hold_outcomes.get(name)

    def clear(self) -> None:
        """Forget recorded requests (e.g. between test cases)."""
        self.requests.clear()

    async def start(self) -> None:
        """Bind and serve; with port 0 the OS picks a port, stored in ``self.port``."""
        if self._runner is not None:
            raise RuntimeError("SimServer already started")
        runner = web.AppRunner(
            create_app(self.settings, self._record), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop serving; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self, timeout: float = 10.0) -> SimServer:
        """Serve from a daemon thread with its own loop; returns once bound (for sync tests)."""
        if self._thread is not None:
            raise RuntimeError("SimServer already running in a thread")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # report bind errors to the caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        thread = threading.Thread(target=run, name="extproc-sim", daemon=True)
        thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("SimServer did not start in time")
        if failure:
            thread.join()
            raise failure[0]
        self._loop, self._thread = loop, thread
        return self

    def stop_in_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with ``start_in_thread``; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def __enter__(self) -> SimServer:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_in_thread()
