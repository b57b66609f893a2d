"""Fixtures the unit tests that talk to a real Redis share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from tests.redis_server import RedisServer, redis_server_binary


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One throwaway redis-server per test module (`make test` installs it)."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture()
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on an emptied server."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()
