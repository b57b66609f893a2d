"""Fleet state in Redis (`state.redis`): what replicas behind one load balancer must agree on.

- Responses API affinity (`RedisAffinityStore`): ``response id -> backend`` as one key per id
  with a TTL, so a follow-up served by any replica reaches the backend holding the response.
- The MCP session key (`shared_session_secret`): drawn once (SET NX) and read by every replica,
  so a session id issued by one replica verifies on the others. `SessionKeyKeeper` puts it
  back when Redis loses it (restarted without persistence), so a replica started later
  reads the key the running ones use instead of drawing another.

Every call is awaited on redis.asyncio with short timeouts: the event loop never blocks.
Redis down is not an error for requests: an affinity lookup answers None (the request goes
where the route's policy sends it, as for an unknown id), a write is dropped, and each failure
is logged and counted in ``errors``. At start, a replica that cannot reach Redis for the MCP
key refuses to start rather than issue sessions its peers cannot verify.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from typing import Any

from extproc.affinity import DEFAULT_TTL_S, MAX_ID_LENGTH
from extproc.redis_pool import redis_client, redis_errors

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "extproc:state:"
SESSION_SECRET_KEY = "mcp:session_secret"  # under the prefix
KEEP_INTERVAL_S = 10.0  # how often a replica checks that Redis still holds the MCP session key


class StateUnavailable(RuntimeError):
    """Redis could not answer a start-up question (the MCP session key)."""


class RedisAffinityStore:
    """``response_id -> backend`` shared by every replica: one key per id, expiring after ``ttl_s``."""

    kind = "redis"

    def __init__(self, client: Any, *, prefix: str = DEFAULT_PREFIX, ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.errors = 0  # Redis failures swallowed so far (for metrics)

    @classmethod
    def from_url(cls, url: str, *, password: str | None = None, **options: Any) -> RedisAffinityStore:
        return cls(redis_client(url, password=password), **options)

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}affinity:{response_id}"

    async def aremember(self, response_id: str, backend: str) -> None:
        """Record that ``backend`` holds ``response_id`` (replacing any earlier answer)."""
        if not response_id or not backend or len(response_id) > MAX_ID_LENGTH:
            return
        try:
            await self._client.set(self._key(response_id), backend, px=int(self.ttl_s * 1000))
        except redis_errors() as exc:
            self._failed("remember", exc)

    async def alookup(self, response_id: str) -> str | None:
        """The backend holding ``response_id``; None if unknown, expired, or Redis cannot answer."""
        if not response_id or len(response_id) > MAX_ID_LENGTH:
            return None
        try:
            raw = await self._client.get(self._key(response_id))
        except redis_errors() as exc:
            self._failed("lookup", exc)
            return None
        if raw is None:
            return None
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    async def aforget(self, response_id: str) -> None:
        """Drop ``response_id`` (e.g. after the client deleted the response)."""
        try:
            await self._client.delete(self._key(response_id))
        except redis_errors() as exc:
            self._failed("forget", exc)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        log.warning("affinity store (redis) %s failed: %s", what, type(exc).__name__)


async def shared_session_secret(client: Any, *, prefix: str = DEFAULT_PREFIX) -> str:
    """The MCP session key every replica uses: the first replica to start draws it (SET NX),
    the others read the same one. Raises StateUnavailable when Redis cannot answer."""
    key = f"{prefix}{SESSION_SECRET_KEY}"
    drawn = base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")
    try:
        await client.set(key, drawn, nx=True)
        raw = await client.get(key)
    except redis_errors() as exc:
        raise StateUnavailable(f"redis state store unavailable: {type(exc).__name__}") from None
    if not raw:
        raise StateUnavailable("redis state store lost the MCP session key")
    return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)


class SessionKeyKeeper:
    """Keeps the fleet's MCP session key in Redis while this replica uses it: every
    `interval_s`, SET NX puts it back if Redis lost it. Without this, a replica started after
    a Redis restart would draw a new key and its sessions would be unknown to the others."""

    def __init__(self, client: Any, secret: str, *, prefix: str = DEFAULT_PREFIX,
                 interval_s: float = KEEP_INTERVAL_S) -> None:
        self._client = client
        self._secret = secret
        self._key = f"{prefix}{SESSION_SECRET_KEY}"
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, secret: str, *, password: str | None = None, **options: Any) -> SessionKeyKeeper:
        return cls(redis_client(url, password=password), secret, **options)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.keep_once()

    async def keep_once(self) -> bool:
        """True when Redis had lost the key and this replica put it back."""
        try:
            restored = bool(await self._client.set(self._key, self._secret, nx=True))
        except redis_errors() as exc:
            log.debug("MCP session key check (redis) failed: %s", type(exc).__name__)
            return False
        if restored:
            log.warning("state.redis had lost the MCP session key (restarted without persistence?): "
                        "put back the one this replica uses")
        return restored

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()
