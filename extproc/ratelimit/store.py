"""Fixed-window counters for the rate limit service: in memory (one node) or in Redis (shared).

A window is `window_seconds` long and aligned to the Unix epoch the way envoyproxy/ratelimit
aligns it (start = now - now % window, on whole seconds), so every replica, and an
envoyproxy/ratelimit peer, agrees on which window a hit belongs to. A counter lives only as
long as its window: memory is bounded by the number of keys active in current windows.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

__all__ = [
    "Store",
    "MemoryStore",
    "RedisStore",
    "StoreUnavailable",
    "store_from_url",
    "window_start",
    "REDIS_KEY_PREFIX",
]

REDIS_KEY_PREFIX = "extproc:rl:"


class StoreUnavailable(Exception):
    """The counter store could not answer; `reason` is "connection", "timeout" or "error"."""

    def __init__(self, message: str, reason: str = "connection") -> None:
        super().__init__(message)
        self.reason = reason


@runtime_checkable
class Store(Protocol):
    """Counters per (key, fixed window)."""

    async def add(self, key: str, hits: int, window_seconds: int, now: float) -> int:
        """Add `hits` (0 = just read) to the current window's counter; return the new total."""
        ...

    async def subtract(self, key: str, hits: int, window_seconds: int, now: float) -> int:
        """Refund `hits` from the current window's counter, never below 0; return the new total."""
        ...

    async def close(self) -> None: ...


def window_start(now: float, window_seconds: int) -> int:
    """Start of the epoch-aligned window holding `now` (whole seconds, like envoyproxy/ratelimit)."""
    seconds = math.floor(now)
    return seconds - seconds % window_seconds


def _check(hits: int, window_seconds: int) -> None:
    if hits < 0:
        raise ValueError(f"hits must be >= 0, got {hits}")
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be > 0, got {window_seconds}")


class MemoryStore:
    """Single-process counters. Every call is synchronous under the hood, hence atomic in asyncio.

    Expired windows are dropped lazily on each call (a heap ordered by window end), so many
    short-lived tenants do not make the dict grow without bound.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int, int], int] = {}  # (key, window length, window start)
        self._expiry: list[tuple[int, str, int, int]] = []  # (window end, key, window length, window start)

    def __len__(self) -> int:
        """Counters currently held (expired ones are gone after the next call)."""
        return len(self._counts)

    def _sweep(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, key, window_seconds, start = heapq.heappop(self._expiry)
            self._counts.pop((key, window_seconds, start), None)

    async def add(self, key: str, hits: int, window_seconds: int, now: float) -> int:
        _check(hits, window_seconds)
        self._sweep(now)
        start = window_start(now, window_seconds)
        slot = (key, window_seconds, start)
        current = self._counts.get(slot)
        if hits == 0:
            return current or 0
        if current is None:
            current = 0
            heapq.heappush(self._expiry, (start + window_seconds, key, window_seconds, start))
        total = current + hits
        self._counts[slot] = total
        return total

    async def subtract(self, key: str, hits: int, window_seconds: int, now: float) -> int:
        _check(hits, window_seconds)
        self._sweep(now)
        slot = (key, window_seconds, window_start(now, window_seconds))
        current = self._counts.get(slot)
        if current is None:
            return 0
        total = max(0, current - hits)
        self._counts[slot] = total
        return total

    async def close(self) -> None:
        self._counts.clear()
        self._expiry.clear()


# KEYS[1] = counter, ARGV[1] = hits (>= 0), ARGV[2] = TTL seconds for a new counter.
# A read (hits 0) must not create the key. The TTL is set only when the key has none (new).
_ADD_SCRIPT = """
if ARGV[1] == '0' then
  return redis.call('GET', KEYS[1]) or 0
end
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('TTL', KEYS[1]) == -1 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return total
"""

# KEYS[1] = counter, ARGV[1] = hits to refund. Floors at 0; a missing key stays missing.
# DECRBY and SET ... KEEPTTL keep the key's TTL (KEEPTTL needs Redis >= 6.0). The arithmetic
# stays in Redis integers: Lua numbers are doubles.
_SUBTRACT_SCRIPT = """
if not redis.call('GET', KEYS[1]) then
  return 0
end
local total = redis.call('DECRBY', KEYS[1], ARGV[1])
if total < 0 then
  redis.call('SET', KEYS[1], 0, 'KEEPTTL')
  return 0
end
return total
"""


class _Script:
    """A Lua script run with EVALSHA, falling back to EVAL (which also caches it) when unknown."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Any, key: str, *args: int) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await client.evalsha(self.sha, 1, key, *args)
        except NoScriptError:
            return await client.eval(self.source, 1, key, *args)


class RedisStore:
    """Counters in Redis, shared by every replica: one round trip (one Lua script) per call.

    Keys are `extproc:rl:{key}:{window_seconds}:{window_start}` (the window length keeps a
    minute and an hour counter apart when both start at the same second, e.g. after a rule's
    unit changes on reload); each expires by the end of its window.
    Connection problems, timeouts and Redis errors raise StoreUnavailable; the client does
    at most one immediate reconnect attempt, so a dead Redis fails fast instead of stalling
    Envoy's rate limit call.
    """

    _add = _Script(_ADD_SCRIPT)
    _subtract = _Script(_SUBTRACT_SCRIPT)

    def __init__(self, client: Any, *, prefix: str = REDIS_KEY_PREFIX, owns_client: bool = False) -> None:
        self._client = client
        self._prefix = prefix
        self._owns_client = owns_client

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = 0.5, max_connections: int = 64, prefix: str = REDIS_KEY_PREFIX,
        password: str | None = None,
    ) -> RedisStore:
        """Connect lazily to `redis://host:port/db` (or rediss://, unix://) with short timeouts.

        The pool holds at most `max_connections`; extra concurrent calls wait up to `timeout`
        for a free connection instead of failing at once. `password` applies when the URL
        carries none (state.redis_password).
        """
        from extproc.redis_pool import redis_client

        client = redis_client(url, timeout=timeout, max_connections=max_connections, password=password)
        return cls(client, prefix=prefix, owns_client=True)

    def _redis_key(self, key: str, window_seconds: int, start: int) -> str:
        return f"{self._prefix}{key}:{window_seconds}:{start}"

    async def _run(self, script: _Script, key: str, *args: int) -> int:
        from redis import exceptions as rex

        try:
            result = await script(self._client, key, *args)
        except rex.TimeoutError as exc:
            raise StoreUnavailable(f"redis timed out: {exc}", reason="timeout") from exc
        except rex.ConnectionError as exc:
            raise StoreUnavailable(f"redis unreachable: {exc}", reason="connection") from exc
        except rex.RedisError as exc:
            raise StoreUnavailable(f"redis error: {exc}", reason="error") from exc
        except TimeoutError as exc:
            raise StoreUnavailable("redis timed out", reason="timeout") from exc
        except OSError as exc:
            raise StoreUnavailable(f"redis unreachable: {exc}", reason="connection") from exc
        return int(result)

    async def add(self, key: str, hits: int, window_seconds: int, now: float) -> int:
        _check(hits, window_seconds)
        start = window_start(now, window_seconds)
        # Live until the window ends (plus a second for clock skew between replicas), never
        # longer than one window.
        ttl = max(1, min(window_seconds, math.ceil(start + window_seconds - now) + 1))
        return await self._run(self._add, self._redis_key(key, window_seconds, start), hits, ttl)

    async def subtract(self, key: str, hits: int, window_seconds: int, now: float) -> int:
        _check(hits, window_seconds)
        start = window_start(now, window_seconds)
        return await self._run(self._subtract, self._redis_key(key, window_seconds, start), hits)

    async def ping(self) -> bool:
        """True when Redis answers (for readiness checks)."""
        try:
            return bool(await self._client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def store_from_url(url: str, **options: Any) -> Store:
    """`memory` -> MemoryStore; `redis://host:port/db`, `rediss://...`, `unix://...` -> RedisStore."""
    if url in ("memory", "memory://"):
        return MemoryStore()
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore.from_url(url, **options)
    # The URL may carry a password: name only its scheme.
    raise ValueError(
        f"unsupported rate limit store (scheme {scheme!r}): use 'memory' or redis://host:port/db (rediss:// for TLS)"
    )
