"""The rate limit service over a real grpc.aio server, called with Envoy's generated stub."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import ratelimit_unit_pb2
from google.protobuf import wrappers_pb2

from extproc.ratelimit import MemoryStore, RateLimitServicer, RedisStore, RuleSet, Store, load_rules
from tests.redis_server import RedisServer, free_port

T0 = 1_700_006_400.0  # a whole day since the epoch
OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
MINUTE = rls_pb2.RateLimitResponse.RateLimit.MINUTE
HOUR = rls_pb2.RateLimitResponse.RateLimit.HOUR

RULES: dict[str, Any] = {
    "domain": "ai-gateway",
    "descriptors": [
        {
            "key": "budget",
            "value": "tpm",
            "descriptors": [
                {"key": "tenant", "rate_limit": {"unit": "minute", "requests_per_unit": 100}},
                {"key": "tenant", "value": "team-a", "rate_limit": {"unit": "hour", "requests_per_unit": 1000}},
                {"key": "tenant", "value": "vip", "rate_limit": {"unlimited": True}},
                {
                    "key": "tenant",
                    "value": "trial",
                    "shadow_mode": True,
                    "rate_limit": {"unit": "minute", "requests_per_unit": 10},
                },
            ],
        },
        {"key": "quota", "quota_mode": True, "rate_limit": {"unit": "minute", "requests_per_unit": 5}},
        {"key": "global", "rate_limit": {"unit": "minute", "requests_per_unit": 1, "name": "global"}},
        {"key": "premium", "rate_limit": {"unit": "minute", "requests_per_unit": 50, "replaces": [{"name": "global"}]}},
    ],
}


class Clock:
    """A settable clock, so windows and reset times are exact."""

    def __init__(self, now: float = T0 + 10) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rules() -> RuleSet:
    return load_rules(RULES, "test")


def descriptor(*entries: tuple[str, str], hits: int | None = None, **kw: Any) -> ratelimit_pb2.RateLimitDescriptor:
    """hits=None leaves the per-descriptor hits_addend wrapper unset (absent, not 0)."""
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries], **kw
    )
    if hits is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return d


def tenant(name: str, hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    return descriptor(("budget", "tpm"), ("tenant", name), hits=hits)


def refund(name: str, hits: int) -> ratelimit_pb2.RateLimitDescriptor:
    return descriptor(("budget", "tpm"), ("tenant", name), ("settle", "refund"), hits=hits)


def request(
    *descriptors: ratelimit_pb2.RateLimitDescriptor, domain: str = "ai-gateway", hits: int = 0
) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits)


@asynccontextmanager
async def serving(servicer: RateLimitServicer) -> AsyncIterator[rls_pb2_grpc.RateLimitServiceStub]:
    """A real gRPC server on a free port and a client channel to it."""
    server = grpc.aio.server()
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield rls_pb2_grpc.RateLimitServiceStub(channel)
    finally:
        await server.stop(None)


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def servicer(clock: Clock) -> RateLimitServicer:
    return RateLimitServicer(rules(), MemoryStore(), clock=clock)


@pytest.fixture()
async def stub(servicer: RateLimitServicer) -> AsyncIterator[rls_pb2_grpc.RateLimitServiceStub]:
    async with serving(servicer) as client:
        yield client



def headers(response: rls_pb2.RateLimitResponse) -> dict[str, str]:
    return {h.key: h.value for h in response.response_headers_to_add}


# -- check and charge ------------------------------------------------------------------------


async def test_check_only_reads_and_charge_adds(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """hits_addend 0 checks without charging; a charge adds and reports what is left."""
    check = await stub.ShouldRateLimit(request(tenant("t1", hits=0)))
    assert check.overall_code == OK
    (status,) = check.statuses
    assert status.code == OK and status.limit_remaining == 100
    assert (status.current_limit.requests_per_unit, status.current_limit.unit) == (100, MINUTE)
    assert status.duration_until_reset.seconds == 50  # clock is 10 s into the minute

    charge = await stub.ShouldRateLimit(request(tenant("t1", hits=60)))
    assert charge.overall_code == OK and charge.statuses[0].limit_remaining == 40
    again = await stub.ShouldRateLimit(request(tenant("t1", hits=0)))
    assert again.overall_code == OK and again.statuses[0].limit_remaining == 40  # the check charged nothing


async def test_budget_spent_exactly_blocks_the_next_check(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """A charge up to the limit is OK (total > limit is over); the next check sees nothing left."""
    charge = await stub.ShouldRateLimit(request(tenant("t1", hits=100)))
    assert charge.overall_code == OK and charge.statuses[0].limit_remaining == 0
    check = await stub.ShouldRateLimit(request(tenant("t1", hits=0)))
    assert check.overall_code == OVER
    assert check.statuses[0].code == OVER and check.statuses[0].limit_remaining == 0
    assert headers(check) == {"retry-after": "50"}


async def test_over_limit_charge_and_then_checks(stub: rls_pb2_grpc.RateLimitServiceStub, clock: Clock) -> None:
    await stub.ShouldRateLimit(request(tenant("t1", hits=90)))
    over = await stub.ShouldRateLimit(request(tenant("t1", hits=20)))  # 110 > 100
    assert over.overall_code == OVER
    (status,) = over.statuses
    assert status.code == OVER and status.limit_remaining == 0
    assert status.current_limit.requests_per_unit == 100 and status.duration_until_reset.seconds == 50
    assert headers(over) == {"retry-after": "50"}

    clock.now = T0 + 59.2  # 0.8 s left: rounded up
    check = await stub.ShouldRateLimit(request(tenant("t1", hits=0)))
    assert check.overall_code == OVER and headers(check) == {"retry-after": "1"}

    clock.now = T0 + 60  # the next window
    fresh = await stub.ShouldRateLimit(request(tenant("t1", hits=0)))
    assert fresh.overall_code == OK and fresh.statuses[0].limit_remaining == 100
    assert fresh.statuses[0].duration_until_reset.seconds == 60 and not headers(fresh)


async def test_each_tenant_has_its_own_counter_and_specific_rules_win(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    await stub.ShouldRateLimit(request(tenant("t1", hits=100)))
    other = await stub.ShouldRateLimit(request(tenant("t2", hits=0)))
    assert other.overall_code == OK and other.statuses[0].limit_remaining == 100
    team = await stub.ShouldRateLimit(request(tenant("team-a", hits=500)))
    assert team.overall_code == OK
    assert (team.statuses[0].current_limit.unit, team.statuses[0].limit_remaining) == (HOUR, 500)
    assert team.statuses[0].duration_until_reset.seconds == 3590


# -- hits_addend --------------------------------------------------------------------------------


async def test_per_descriptor_hits_addend_wrapper_present_or_absent(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """Present wrapper (even 0) wins; absent falls back to the request's hits_addend, then 1."""
    await stub.ShouldRateLimit(request(tenant("t1", hits=None)))  # absent, request 0 -> 1
    await stub.ShouldRateLimit(request(tenant("t1", hits=None), hits=7))  # absent -> request's 7
    await stub.ShouldRateLimit(request(tenant("t1", hits=3), hits=7))  # present 3 wins
    checked = await stub.ShouldRateLimit(request(tenant("t1", hits=0), hits=7))  # present 0 = check
    assert checked.statuses[0].limit_remaining == 100 - (1 + 7 + 3)


async def test_descriptors_are_charged_independently(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """Envoy's after-response call: request-level 0, one addend per descriptor."""
    response = await stub.ShouldRateLimit(request(tenant("t1", hits=30), tenant("team-a", hits=400), hits=0))
    assert [s.limit_remaining for s in response.statuses] == [70, 600]


async def test_one_over_limit_descriptor_makes_the_request_over(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    await stub.ShouldRateLimit(request(tenant("t1", hits=100)))
    response = await stub.ShouldRateLimit(request(tenant("team-a", hits=0), tenant("t1", hits=0)))
    assert response.overall_code == OVER
    assert [s.code for s in response.statuses] == [OK, OVER]
    assert headers(response) == {"retry-after": "50"}  # from the over-limit minute, not the hour


# -- refund, shadow, unlimited, unknown ------------------------------------------------------------


async def test_refund_entry_gives_tokens_back(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    await stub.ShouldRateLimit(request(tenant("t1", hits=80)))
    refunded = await stub.ShouldRateLimit(request(refund("t1", 30)))
    assert refunded.overall_code == OK and refunded.statuses[0].code == OK
    assert refunded.statuses[0].limit_remaining == 50
    check = await stub.ShouldRateLimit(request(tenant("t1", hits=0)))
    assert check.statuses[0].limit_remaining == 50
    await stub.ShouldRateLimit(request(refund("t1", 1000)))  # never below zero
    check = await stub.ShouldRateLimit(request(tenant("t1", hits=0)))
    assert check.statuses[0].limit_remaining == 100
    nothing = await stub.ShouldRateLimit(request(descriptor(("settle", "refund"), hits=5)))
    assert nothing.overall_code == OK


async def test_refund_brings_a_spent_budget_back(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    await stub.ShouldRateLimit(request(tenant("t1", hits=120)))
    assert (await stub.ShouldRateLimit(request(tenant("t1", hits=0)))).overall_code == OVER
    await stub.ShouldRateLimit(request(refund("t1", 40)))
    assert (await stub.ShouldRateLimit(request(tenant("t1", hits=0)))).overall_code == OK


async def test_shadow_mode_counts_but_never_limits(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    first = await stub.ShouldRateLimit(request(tenant("trial", hits=25)))
    second = await stub.ShouldRateLimit(request(tenant("trial", hits=0)))
    for response in (first, second):
        assert response.overall_code == OK and response.statuses[0].code == OK
        assert response.statuses[0].limit_remaining == 0  # it is over; it just does not say no
        assert not headers(response)


async def test_unlimited_and_unmatched_descriptors_are_ok_without_limit_info(
    stub: rls_pb2_grpc.RateLimitServiceStub,
) -> None:
    response = await stub.ShouldRateLimit(
        request(tenant("vip", hits=10**9), descriptor(("nothing", "here"), hits=5), descriptor(hits=3))
    )
    assert response.overall_code == OK
    assert all(s.code == OK and not s.HasField("current_limit") for s in response.statuses)
    assert response.statuses[0].limit_remaining == 2**32 - 1  # unlimited, as envoyproxy/ratelimit says


async def test_unknown_domain_is_ok_and_touches_nothing(servicer: RateLimitServicer, stub: Any) -> None:
    response = await stub.ShouldRateLimit(request(tenant("t1", hits=1000), domain="other"))
    assert response.overall_code == OK and len(response.statuses) == 1
    assert not response.statuses[0].HasField("current_limit")
    assert isinstance(servicer.store, MemoryStore) and len(servicer.store) == 0


async def test_rules_can_be_swapped_live(servicer: RateLimitServicer, stub: Any) -> None:
    await stub.ShouldRateLimit(request(tenant("t1", hits=50)))
    tighter = dict(RULES)
    tighter["descriptors"] = [
        {
            "key": "budget",
            "value": "tpm",
            "descriptors": [{"key": "tenant", "rate_limit": {"unit": "minute", "requests_per_unit": 40}}],
        }
    ]
    servicer.rules = load_rules(tighter, "reloaded")
    response = await stub.ShouldRateLimit(request(tenant("t1", hits=0)))
    assert response.overall_code == OVER and response.statuses[0].current_limit.requests_per_unit == 40


# -- envoyproxy/ratelimit extras: replaces, quota mode, descriptor limit override --------------


async def test_replaces_drops_the_named_limit(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    await stub.ShouldRateLimit(request(descriptor(("global", "x"), hits=5)))
    alone = await stub.ShouldRateLimit(request(descriptor(("global", "x"), hits=0)))
    assert alone.overall_code == OVER
    both = request(descriptor(("global", "x"), hits=0), descriptor(("premium", "p"), hits=0))
    replaced = await stub.ShouldRateLimit(both)
    assert replaced.overall_code == OK
    assert not replaced.statuses[0].HasField("current_limit")


async def test_quota_mode_limits_only_when_every_quota_is_over(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    await stub.ShouldRateLimit(request(descriptor(("quota", "a"), hits=10)))
    check_both = request(descriptor(("quota", "a"), hits=0), descriptor(("quota", "b"), hits=0))
    one_left = await stub.ShouldRateLimit(check_both)
    assert one_left.overall_code == OK and one_left.statuses[0].code == OVER
    await stub.ShouldRateLimit(request(descriptor(("quota", "b"), hits=10)))
    none_left = await stub.ShouldRateLimit(check_both)
    assert none_left.overall_code == OVER


async def test_descriptor_limit_override(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    """Envoy's per-descriptor `limit` replaces the configured one, like envoyproxy/ratelimit."""
    override = ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(requests_per_unit=3, unit=ratelimit_unit_pb2.HOUR)
    overridden = descriptor(("budget", "tpm"), ("tenant", "t9"), hits=4, limit=override)
    response = await stub.ShouldRateLimit(request(overridden))
    assert response.overall_code == OVER
    assert (response.statuses[0].current_limit.requests_per_unit, response.statuses[0].current_limit.unit) == (3, HOUR)


# -- odd input ----------------------------------------------------------------------------------


async def test_odd_input_is_answered_or_rejected_cleanly(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    for bad in (request(), request(tenant("t1"), domain="")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ShouldRateLimit(bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    huge = await stub.ShouldRateLimit(request(tenant("t1", hits=2**64 - 1)))
    assert huge.overall_code == OVER and huge.statuses[0].limit_remaining == 0
    again = await stub.ShouldRateLimit(request(tenant("t1", hits=2**64 - 1)))
    assert again.overall_code == OVER
    # Addends are capped at 2**32 (above any uint32 limit): two huge charges, two huge refunds.
    for _ in range(2):
        await stub.ShouldRateLimit(request(refund("t1", 2**64 - 1)))
    assert (await stub.ShouldRateLimit(request(tenant("t1", hits=0)))).statuses[0].limit_remaining == 100
    strange = (descriptor(("", ""), ("budget", "tpm"), hits=1), descriptor(("\x00é", "☃")))
    odd = await stub.ShouldRateLimit(request(*strange))
    assert odd.overall_code == OK


# -- store failures -------------------------------------------------------------------------------


async def test_store_down_answers_unavailable_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    """Envoy sees UNAVAILABLE and applies failure_mode_deny; one warning, not one per request."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    servicer = RateLimitServicer(rules(), store, clock=Clock())
    try:
        async with serving(servicer) as client:
            with caplog.at_level(logging.WARNING, logger="extproc.ratelimit.service"):
                for _ in range(5):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await client.ShouldRateLimit(request(tenant("t1", hits=0)))
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                # No store call, no failure: an unknown domain is still answered.
                ok = await client.ShouldRateLimit(request(tenant("t1"), domain="other"))
                assert ok.overall_code == OK
    finally:
        await store.close()
    assert servicer.store_errors == 5 and servicer.failures == {"connection": 5}
    assert len([r for r in caplog.records if "rate limit store failed" in r.message]) == 1


class SlowStore(MemoryStore):
    """A store that hangs, like a Redis that accepted the connection and stopped answering."""

    async def add(self, key: str, hits: int, window_seconds: int, now: float) -> int:
        await asyncio.sleep(10)
        return 0


async def test_slow_store_times_out_as_unavailable() -> None:
    servicer = RateLimitServicer(rules(), SlowStore(), clock=Clock(), store_timeout=0.05)
    async with serving(servicer) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.ShouldRateLimit(request(tenant("t1", hits=0)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.store_errors == 1 and servicer.failures == {"timeout": 1}


# -- shared budget across replicas -------------------------------------------------------------


async def test_two_servicers_sharing_redis_enforce_one_budget(redis_server: RedisServer) -> None:
    flush = aioredis.Redis.from_url(redis_server.url)
    await flush.flushdb()
    await flush.aclose()
    clock = Clock()
    stores: list[Store] = [RedisStore.from_url(redis_server.url), RedisStore.from_url(redis_server.url)]
    try:
        async with (
            serving(RateLimitServicer(rules(), stores[0], clock=clock)) as one,
            serving(RateLimitServicer(rules(), stores[1], clock=clock)) as two,
        ):
            remaining = []
            for client in (one, two, one, two):
                response = await client.ShouldRateLimit(request(tenant("t1", hits=25)))
                assert response.overall_code == OK
                remaining.append(response.statuses[0].limit_remaining)
            assert remaining == [75, 50, 25, 0]
            assert (await two.ShouldRateLimit(request(tenant("t1", hits=0)))).overall_code == OVER
            assert (await one.ShouldRateLimit(request(tenant("t1", hits=0)))).overall_code == OVER
            await one.ShouldRateLimit(request(refund("t1", 10)))
            check = await two.ShouldRateLimit(request(tenant("t1", hits=0)))
            assert check.overall_code == OK and check.statuses[0].limit_remaining == 10
            # Concurrent charges from both replicas are all counted.
            await asyncio.gather(*(c.ShouldRateLimit(request(tenant("t2", hits=1))) for c in (one, two) * 50))
            assert (await one.ShouldRateLimit(request(tenant("t2", hits=0)))).overall_code == OVER
    finally:
        for store in stores:
            await store.close()
