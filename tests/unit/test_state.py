"""extproc.state: fleet state in a real redis-server (Responses affinity, the MCP session key)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from extproc.config import ConfigError, LoadedConfig, load_config, parse_config
from extproc.mcp.sessions import GatewaySession, InvalidSession, ServerSession, SessionCodec
from extproc.redact import config_secrets
from extproc.redis_pool import redis_client
from extproc.server import (
    ListenError,
    ProcessorServer,
    ServeOptions,
    _shared_session_secret,
    builtin_rate_limit_service,
)
from extproc.state import (
    DEFAULT_PREFIX,
    RedisAffinityStore,
    SessionKeyKeeper,
    StateUnavailable,
    shared_session_secret,
)
from tests.redis_server import RedisServer, free_port




def config(**extra: Any) -> dict[str, Any]:
    return {
        "backends": [{"name": "a", "base_url": "https://api.example.com/v1"}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        **extra,
    }


# -- Responses affinity ----------------------------------------------------------------------------


async def test_two_replicas_share_affinity(redis_server: RedisServer, raw_redis: aioredis.Redis) -> None:
    one, two = RedisAffinityStore.from_url(redis_server.url), RedisAffinityStore.from_url(redis_server.url)
    try:
        assert await two.alookup("resp_1") is None
        await one.aremember("resp_1", "backend-a")
        assert await two.alookup("resp_1") == "backend-a"  # written on one replica, read on the other
        await two.aremember("resp_1", "backend-b")  # a later answer wins
        assert await one.alookup("resp_1") == "backend-b"
        await one.aforget("resp_1")
        assert await two.alookup("resp_1") is None
        await one.aremember("", "x")
        await one.aremember("resp_2", "")
        await one.aremember("r" * 10_000, "x")
        assert await one.alookup("") is None and await one.alookup("r" * 10_000) is None
        assert await raw_redis.keys("*") == [] and one.errors == two.errors == 0
    finally:
        await one.aclose()
        await two.aclose()


async def test_affinity_keys_expire(redis_server: RedisServer, raw_redis: aioredis.Redis) -> None:
    store = RedisAffinityStore.from_url(redis_server.url, ttl_s=3600)
    try:
        await store.aremember("resp_1", "backend-a")
        key = f"{DEFAULT_PREFIX}affinity:resp_1"
        assert await raw_redis.get(key) == b"backend-a"
        assert 0 < await raw_redis.pttl(key) <= 3600 * 1000
        await raw_redis.pexpire(key, 1)  # as if the TTL had run out
        while await raw_redis.exists(key):
            pass
        assert await store.alookup("resp_1") is None
    finally:
        await store.aclose()
    with pytest.raises(ValueError):
        RedisAffinityStore.from_url(redis_server.url, ttl_s=0)


async def test_affinity_with_redis_down_degrades_and_recovers() -> None:
    """Redis down: no affinity (lookups answer None, writes are dropped, both counted), no
    exception; once Redis is back the pooled client reconnects."""
    server = RedisServer().start()
    store = RedisAffinityStore.from_url(server.url)
    try:
        await store.aremember("resp_1", "backend-a")
        server.stop()
        assert await store.alookup("resp_1") is None
        await store.aremember("resp_2", "backend-b")
        await store.aforget("resp_1")
        assert store.errors == 3
        restarted = RedisServer(port=server.port).start()
        try:
            await store.aremember("resp_3", "backend-c")
            assert await store.alookup("resp_3") == "backend-c" and store.errors == 3
        finally:
            restarted.stop()
    finally:
        server.stop()
        await store.aclose()


# -- MCP session key -------------------------------------------------------------------------------


async def test_replicas_agree_on_the_mcp_session_key(redis_server: RedisServer, raw_redis: aioredis.Redis) -> None:
    first, second = redis_client(redis_server.url), redis_client(redis_server.url)
    try:
        key_one = await shared_session_secret(first)
        key_two = await shared_session_secret(second)
    finally:
        await first.aclose()
        await second.aclose()
    assert key_one == key_two and len(key_one) >= 40
    assert await _shared_session_secret(redis_server.url) == key_one  # what the server uses at start
    session = GatewaySession("/mcp", "2025-06-18", {"tools": ServerSession("s-1", "2025-06-18")})
    token = SessionCodec(key_one).encode(session)
    assert SessionCodec(key_two).decode(token) == session  # issued on one replica, valid on the other
    with pytest.raises(InvalidSession):
        SessionCodec(None).decode(token)  # a replica with its own random key would refuse it
    await raw_redis.flushall()
    assert await _shared_session_secret(redis_server.url) != key_one  # a new fleet draws a new key


async def test_a_running_replica_puts_the_session_key_back_after_redis_lost_it(
    redis_server: RedisServer, raw_redis: aioredis.Redis
) -> None:
    """Redis restarted empty: the running replicas put their key back, so a replica started
    afterwards reads it instead of drawing a new one (its sessions would be unknown to them)."""
    key = await _shared_session_secret(redis_server.url)
    keeper = SessionKeyKeeper.from_url(redis_server.url, key, interval_s=0.05)
    keeper.start()
    try:
        assert await keeper.keep_once() is False  # Redis holds it: nothing to do
        await raw_redis.flushall()  # Redis lost everything
        for _ in range(100):
            if await raw_redis.get(f"{DEFAULT_PREFIX}mcp:session_secret"):
                break
            await asyncio.sleep(0.02)
        assert await _shared_session_secret(redis_server.url) == key  # a new replica gets the fleet's key
    finally:
        await keeper.aclose()
    down = SessionKeyKeeper.from_url(f"redis://127.0.0.1:{free_port()}/0", key)
    assert await down.keep_once() is False  # Redis down: nothing raised, tried again later
    await down.aclose()


async def test_mcp_session_key_with_redis_down_is_a_start_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    client = redis_client(url)
    try:
        with pytest.raises(StateUnavailable):
            await shared_session_secret(client)
    finally:
        await client.aclose()
    with pytest.raises(ListenError, match="state.redis"):
        await _shared_session_secret(url)


# -- config and wiring -----------------------------------------------------------------------------


def test_state_redis_config() -> None:
    assert parse_config(config()).state.redis is None
    assert parse_config(config()).ratelimit.store == "memory"
    shared = parse_config(config(state={"redis": "redis://10.0.0.5:6379/0"}))
    assert shared.state.redis == "redis://10.0.0.5:6379/0"
    assert shared.ratelimit.store == "redis://10.0.0.5:6379/0"  # budgets follow state.redis
    kept = parse_config(config(state={"redis": "redis://a:6379/0"}, ratelimit={"store": "redis://b:6379/1"}))
    assert kept.ratelimit.store == "redis://b:6379/1"
    local = parse_config(config(state={"redis": "redis://a:6379/0"}, ratelimit={"store": "memory"}))
    assert local.ratelimit.store == "memory"  # an explicit choice wins
    with pytest.raises(ConfigError, match="state.redis"):
        parse_config(config(state={"redis": "http://a:6379"}))
    with pytest.raises(ConfigError, match="affinity_ttl_seconds"):
        parse_config(config(state={"redis": "redis://a:6379/0", "affinity_ttl_seconds": 0}))


async def test_processor_uses_the_redis_affinity_store(redis_server: RedisServer, tmp_path: Any) -> None:
    options = ServeOptions("127.0.0.1:0", "127.0.0.1", 0, 0, affinity_path=str(tmp_path / "a.sqlite3"))
    fleet = parse_config(config(state={"redis": redis_server.url, "affinity_ttl_seconds": 60}))
    store = ProcessorServer._affinity_store(LoadedConfig(config=fleet, source="t"), options)
    assert isinstance(store, RedisAffinityStore) and store.ttl_s == 60
    await store.aclose()
    local = ProcessorServer._affinity_store(LoadedConfig(config=parse_config(config()), source="t"), options)
    assert local is not None and not isinstance(local, RedisAffinityStore)
    await local.aclose()


async def test_a_password_protected_redis_takes_state_redis_password(tmp_path: Any) -> None:
    """The password comes from the environment (a Kubernetes Secret), not the URL: affinity,
    the MCP key and budgets following state.redis all log in with it."""
    with RedisServer(password="s3cret-state-pass") as protected:
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config(
            state={"redis": protected.url, "redis_password": {"env": "T_REDIS_PASSWORD"}},
            budgets=[{"name": "b", "unit": "hour", "limit": 10}], tenancy={"header": "x-tenant-id"})))
        loaded = load_config(path, {"T_REDIS_PASSWORD": "s3cret-state-pass"})
        assert loaded.redis_password(protected.url) == "s3cret-state-pass"
        assert loaded.redis_password("redis://elsewhere:6379/0") is None  # only for state.redis
        assert "s3cret-state-pass" in config_secrets(loaded, {})  # scrubbed from logs

        options = ServeOptions("127.0.0.1:0", "127.0.0.1", 0, 0)
        store = ProcessorServer._affinity_store(loaded, options)
        assert store is not None
        await store.aremember("resp_1", "a")
        assert await store.alookup("resp_1") == "a" and store.errors == 0
        await store.aclose()
        assert await _shared_session_secret(protected.url, loaded.redis_password(protected.url))
        service = builtin_rate_limit_service(loaded)
        assert service is not None
        assert await service.store.add("k", 3, 3600, 0.0) == 3
        await service.store.close()

        anonymous = RedisAffinityStore.from_url(protected.url)
        await anonymous.aremember("resp_2", "a")
        assert await anonymous.alookup("resp_2") is None and anonymous.errors == 2  # refused, counted
        await anonymous.aclose()
        with pytest.raises(ConfigError, match="T_REDIS_PASSWORD"):
            load_config(path, {})
    with pytest.raises(ConfigError, match="redis_password needs redis"):
        parse_config(config(state={"redis_password": {"env": "X"}}))
