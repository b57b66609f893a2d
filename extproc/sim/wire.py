"""What every simulated API shares: server settings, the ``x-sim-*`` knobs, and the
plumbing that carries replies (compression, paced and held streams, JSON replies).

Each API module (OpenAI, Anthropic Messages, Bedrock Converse, Responses) speaks its own
wire format but reads the same knobs, so a test drives any of them the same way through a
gateway. The knobs, as headers:

* ``x-sim-chunks`` / ``x-sim-chunk-delay-ms`` / ``x-sim-first-byte-delay-ms``: stream
  shape and pacing (content pieces, pause between them, pause before anything);
* ``x-sim-error: STATUS``: answer with the API's error of that status (400-599);
* ``x-sim-cached-tokens``, ``x-sim-reasoning-tokens``, ``x-sim-usage-in-last-choice: 1``,
  ``x-sim-no-usage: 1``: how usage is reported;
* ``x-sim-compress: gzip|deflate|br``: compress the body;
* ``x-sim-hold: NAME``: pause a stream after its first content chunk until
  ``SimServer.release(NAME)``;
* ``x-sim-reset-after-chunks``, ``x-sim-garbage``, ``x-sim-content-type``: faults, read
  here for every API but acted on by the OpenAI API only (see ``openai_api``).

A malformed knob raises ``KnobError``; each API answers it as its own 400.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import brotli
import orjson
from aiohttp import web

from extproc.sim.google_auth import GoogleAccounts

T = TypeVar("T")

MAX_CHUNKS = 10_000
MAX_DELAY_MS = 600_000.0
MAX_TOKENS_LIMIT = 1_000_000
GARBAGE_KINDS = ("json", "sse", "html", "truncated-json", "truncated-sse")
_ERROR_MODEL_RE = re.compile(r"^sim-error-(\d{3})$")


@dataclass
class SimSettings:
    """Server-wide defaults; shared with the handlers so changes apply live."""

    chunks: int = 8
    chunk_delay_ms: float = 0.0
    first_byte_delay_ms: float = 0.0
    # Streams sent with `x-sim-hold: NAME` pause after their first content chunk until a
    # test calls `SimServer.release(NAME)`: proof by causality (not timing) that a
    # gateway forwards chunks as they come rather than at the end.
    holds: dict[str, asyncio.Event] = field(default_factory=dict)
    hold_outcomes: dict[str, str] = field(default_factory=dict)
    hold_timeout_s: float = 10.0
    google: GoogleAccounts = field(default_factory=GoogleAccounts)  # Google's token endpoint and tokens

    def hold(self, name: str) -> asyncio.Event:
        return self.holds.setdefault(name, asyncio.Event())


SETTINGS = web.AppKey("settings", SimSettings)


@dataclass(frozen=True)
class Knobs:
    """Effective per-request behaviour: server defaults overridden by headers."""

    chunks: int
    chunk_delay: float
    first_byte_delay: float
    error_status: int | None
    usage: UsageShape = field(default_factory=lambda: UsageShape())
    compress: str | None = None  # gzip, deflate or br
    reset_after: int | None = None  # abort the connection after this many events (0: before the reply)
    garbage: str | None = None  # one of GARBAGE_KINDS
    content_type: str | None = None  # sent instead of the real Content-Type


@dataclass(frozen=True)
class UsageShape:
    """How the simulator reports usage, so a gateway's accounting can be exercised."""

    cached_tokens: int = 0  # reported in prompt_tokens_details (capped at prompt_tokens)
    reasoning_tokens: int = 0  # reported in completion_tokens_details
    in_last_choice: bool = False  # put usage on the finish chunk instead of a separate one
    omit: bool = False  # never report usage, even when asked


class KnobError(Exception):
    """A malformed ``x-sim-*`` header; every API answers it as a 400 in its own shape."""


def _header_number(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise KnobError(f"invalid {name} header: {raw!r}") from None
    if not lo <= value <= hi:
        raise KnobError(f"{name} must be between {lo:g} and {hi:g}, got {raw!r}")
    return value


def header_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """An API's own integer knob (header ``name``), ``default`` when absent."""
    raw = request.headers.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or not lo <= int(raw) <= hi:
        raise KnobError(f"{name} must be an integer between {lo} and {hi}, got {raw!r}")
    return int(raw)


def read_knobs(request: web.Request, settings: SimSettings) -> Knobs:
    """Merge ``x-sim-*`` headers over the server defaults (KnobError on bad values)."""
    chunks = _header_number(request, "x-sim-chunks", settings.chunks, 1, MAX_CHUNKS)
    delay = _header_number(request, "x-sim-chunk-delay-ms", settings.chunk_delay_ms, 0, MAX_DELAY_MS)
    first = _header_number(request, "x-sim-first-byte-delay-ms", settings.first_byte_delay_ms, 0, MAX_DELAY_MS)
    status = request.headers.get("x-sim-error")
    error_status: int | None = None
    if status is not None:
        if not status.strip().isdigit() or not 400 <= int(status) <= 599:
            raise KnobError(f"x-sim-error must be an HTTP status 400-599, got {status!r}")
        error_status = int(status)
    usage = UsageShape(
        cached_tokens=int(_header_number(request, "x-sim-cached-tokens", 0, 0, MAX_TOKENS_LIMIT)),
        reasoning_tokens=int(_header_number(request, "x-sim-reasoning-tokens", 0, 0, MAX_TOKENS_LIMIT)),
        in_last_choice=request.headers.get("x-sim-usage-in-last-choice") == "1",
        omit=request.headers.get("x-sim-no-usage") == "1",
    )
    compress = request.headers.get("x-sim-compress")
    if compress is not None and compress not in COMPRESSORS:
        raise KnobError(f"x-sim-compress must be one of {', '.join(COMPRESSORS)}, got {compress!r}")
    reset = request.headers.get("x-sim-reset-after-chunks")
    reset_after = None if reset is None else int(
        _header_number(request, "x-sim-reset-after-chunks", 0, 0, MAX_CHUNKS)
    )
    garbage = request.headers.get("x-sim-garbage")
    if garbage is not None and garbage not in GARBAGE_KINDS:
        raise KnobError(f"x-sim-garbage must be one of {', '.join(GARBAGE_KINDS)}, got {garbage!r}")
    return Knobs(
        int(chunks), delay / 1000.0, first / 1000.0, error_status, usage, compress,
        reset_after=reset_after, garbage=garbage, content_type=request.headers.get("x-sim-content-type"),
    )


async def wait_first_byte(knobs: Knobs) -> None:
    """Hold back the whole reply for ``x-sim-first-byte-delay-ms``."""
    if knobs.first_byte_delay > 0:
        await asyncio.sleep(knobs.first_byte_delay)


def model_error(model: str) -> int | None:
    """The status (400-599) a model id ``sim-error-NNN`` asks every API to fail with."""
    match = _ERROR_MODEL_RE.match(model)
    status = int(match.group(1)) if match else 0
    return status if 400 <= status <= 599 else None


def simulated_error(status: int, how: str) -> str:
    """The message of an error asked for by ``x-sim-error`` or a ``sim-error-NNN`` model,
    the same in every API so tests can tell it from a real failure."""
    return f"Simulated error {status} (requested via {how})"


# -- compression ---------------------------------------------------------------------------------


class Compressor(Protocol):
    """Compresses a body piece by piece (``x-sim-compress``), each piece decodable on arrival."""

    def write(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class _GzipStream:
    """Compresses each write so it can be decoded on arrival (sync flush per event)."""

    def __init__(self, wbits: int) -> None:
        self._inner = zlib.compressobj(wbits=wbits)

    def write(self, data: bytes) -> bytes:
        return self._inner.compress(data) + self._inner.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return self._inner.flush(zlib.Z_FINISH)


class _BrotliStream:
    def __init__(self) -> None:
        self._inner = brotli.Compressor()

    def write(self, data: bytes) -> bytes:
        return self._inner.process(data) + self._inner.flush()

    def end(self) -> bytes:
        return self._inner.finish()


COMPRESSORS: dict[str, Callable[[], Compressor]] = {
    "gzip": lambda: _GzipStream(16 + zlib.MAX_WBITS),
    "deflate": lambda: _GzipStream(zlib.MAX_WBITS),
    "br": _BrotliStream,
}


def json_reply(
    body: bytes, compress: str | None, headers: dict[str, str] | None = None, status: int = 200
) -> web.Response:
    """A JSON reply, compressed whole when ``x-sim-compress`` asks for it."""
    headers = dict(headers or {})
    if compress:
        compressor = COMPRESSORS[compress]()
        body = compressor.write(body) + compressor.end()
        headers["Content-Encoding"] = compress
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


# -- streams -------------------------------------------------------------------------------------


async def wait_hold(settings: SimSettings, name: str) -> None:
    """Wait for ``SimServer.release(name)`` (or the hold timeout) and record which came first."""
    try:
        await asyncio.wait_for(settings.hold(name).wait(), settings.hold_timeout_s)
        settings.hold_outcomes[name] = "released"
    except TimeoutError:
        settings.hold_outcomes[name] = "timed_out"


async def paced(
    events: Iterable[T | None], request: web.Request, settings: SimSettings, delay: float
) -> AsyncIterator[T]:
    """``events`` without their ``None`` pause points, pausing at each one: ``delay``
    seconds, and at the first also until the request's ``x-sim-hold`` is released. One
    loop for every API, so holds and chunk delays mean the same everywhere."""
    hold = request.headers.get("x-sim-hold")
    for event in events:
        if event is None:
            if hold:
                await wait_hold(settings, hold)
                hold = None
            if delay > 0:
                await asyncio.sleep(delay)
            continue
        yield event


async def open_stream(
    request: web.Request, compress: str | None, headers: dict[str, str]
) -> tuple[web.StreamResponse, Compressor | None]:
    """Send a streamed reply's status and headers; the compressor its body must go
    through (``x-sim-compress``), if any."""
    compressor = COMPRESSORS[compress]() if compress else None
    if compress:
        headers = {**headers, "Content-Encoding": compress}
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    return resp, compressor


async def write_named_events(
    request: web.Request,
    knobs: Knobs,
    settings: SimSettings,
    events: Iterable[tuple[str, dict[str, Any]] | None],
    headers: dict[str, str],
) -> web.StreamResponse:
    """A stream of named SSE events (``event:`` and ``data:`` lines, as the Anthropic and
    Responses APIs send them), each written as it comes so clients see them arrive over time."""
    sse_headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", **headers}
    resp, compressor = await open_stream(request, knobs.compress, sse_headers)
    try:
        async for name, data in paced(events, request, settings, knobs.chunk_delay):
            chunk = b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
            await resp.write(compressor.write(chunk) if compressor else chunk)
        if compressor:
            await resp.write(compressor.end())
        await resp.write_eof()
    except ConnectionError:
        pass  # the client went away mid-stream
    return resp
