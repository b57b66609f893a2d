"""The one way the gateway connects to Redis (budgets, the key store, fleet state).

A redis.asyncio client over a bounded pool with short timeouts: a call that Redis cannot
answer fails within `timeout` (connecting, waiting for a pooled connection, or reading),
so a request never waits long on it, and one immediate reconnect covers a stale pooled
connection. redis-py is imported on first use: only processes that use Redis load it.
"""

from __future__ import annotations

from typing import Any


def redis_client(url: str, *, timeout: float = 0.5, max_connections: int = 32, password: str | None = None) -> Any:
    """A client for `redis://` / `rediss://` / `unix://` `url`; `password` (state.redis_password)
    applies when the URL carries none. Nothing connects until the first call."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),  # one reconnect for a stale pooled connection, no backoff
        **({"password": password} if password is not None else {}),
    )
    return aioredis.Redis.from_pool(pool)


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a failed call raises: Redis' own errors, and socket errors and timeouts."""
    from redis import exceptions as rex

    return (rex.RedisError, OSError, TimeoutError)
