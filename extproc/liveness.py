"""Is a processor worker still answering? Asked the way Envoy asks: its gRPC health service.

Envoy takes a worker that stops answering out of its rotation (the `extproc` cluster's
health check, see envoyconfig); this is the other half. Whoever started a worker probes
it once a second and, after a few probes in a row go unanswered, kills it and starts a
new one: worker 0 does it for workers 1..N-1, `extproc run` for worker 0. A probe is one
health call on a kept-open HTTP/2 connection (about half a millisecond of CPU, both
ends together, measured), never on a request's path.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.protocol import PROCESSOR_SERVICE

PROBE_INTERVAL_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 1.0
# Three missed probes (about six seconds): longer than Envoy takes to stop sending the
# worker streams (about four), so when it is killed it holds only the streams it hung on.
MISSED_PROBES_BEFORE_RESTART = 3
# A worker that has not answered yet is starting (imports, binding its ports), not hung,
# until it has had as long as `extproc run` gives a processor to become ready.
STARTUP_SECONDS = 30.0

_NO_ANSWER = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE})
_CHANNEL_OPTIONS = [
    # Reconnect at once: gRPC's default backoff (1 s, growing to 120 s) would make a live
    # worker miss probes after its connection broke, and a new one be seen late.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.use_local_subchannel_pool", 1),  # this probe's own connection, never a shared one
]


async def wait_until_hung(grpc_address: str) -> None:
    """Probe the worker at `grpc_address` until it misses MISSED_PROBES_BEFORE_RESTART
    probes in a row, then return. Misses count once it has answered (or had STARTUP_SECONDS
    to). Any answer counts as one, NOT_SERVING too: a draining worker is finishing its
    streams. Until the first answer a probe is always waiting, so that answer is seen at once."""
    loop = asyncio.get_running_loop()
    starting_until = loop.time() + STARTUP_SECONDS
    answered, missed = False, 0
    async with grpc.aio.insecure_channel(grpc_address, options=_CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while missed < MISSED_PROBES_BEFORE_RESTART:
            if await _answers(stub):
                answered, missed = True, 0
            elif answered or loop.time() > starting_until:
                missed += 1
            await asyncio.sleep(PROBE_INTERVAL_SECONDS if answered else 0.05)


async def _answers(stub: health_pb2_grpc.HealthStub) -> bool:
    request = health_pb2.HealthCheckRequest(service=PROCESSOR_SERVICE)
    try:
        # types-grpcio-health-checking's HealthStub omits the methods its generated __init__ sets.
        await stub.Check(request, timeout=PROBE_TIMEOUT_SECONDS, wait_for_ready=True)  # type: ignore[attr-defined]
    except grpc.aio.AioRpcError as exc:
        return exc.code() not in _NO_ANSWER
    return True
