"""The processor process: grpc.aio ExternalProcessor, gRPC health, admin HTTP, shutdown.

SIGTERM flips health to NOT_SERVING (so Envoy and orchestrators stop sending new
work), lets in-flight streams finish for the grace period, then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import aiohttp
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from envoy.service.ratelimit.v3 import rls_pb2_grpc

from extproc.budgets import descriptor_config
from extproc.config import GatewayConfig, LoadedConfig
from extproc.ratelimit import RateLimitServicer, load_rules, store_from_url
from extproc.exchange import Exchange
from extproc.runtime import Runtime
from extproc.telemetry import Telemetry
from extproc.telemetry.merge import merge_expositions

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ListenError(OSError):
    """An address the processor was told to use is not available."""


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    """One `Process` stream per HTTP request; each stream is self-contained."""

    def __init__(self, runtime: Runtime, telemetry: Telemetry | None = None) -> None:
        self.runtime = runtime
        self.telemetry = telemetry
        self.in_flight = 0

    async def Process(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        exchange = Exchange(self.runtime, self.telemetry)
        self.in_flight += 1
        clock = time.perf_counter
        try:
            async for request in request_iterator:
                began = clock()
                answer = exchange.handle(request)
                if not isinstance(answer, ep.ProcessingResponse):
                    answer = await answer
                exchange.processor_seconds += clock() - began
                yield answer
        finally:
            self.in_flight -= 1
            exchange.close()


@dataclass(slots=True)
class ServeOptions:
    grpc_address: str
    admin_host: str
    admin_port: int
    grace_period_seconds: float
    worker_index: int = 0
    peer_admin_ports: list[int] = field(default_factory=list)  # worker 0 merges their /metrics


class ProcessorServer:
    """Owns the gRPC server, the health service and the admin HTTP server."""

    def __init__(self, loaded: LoadedConfig, options: ServeOptions) -> None:
        self.options = options
        self.telemetry = Telemetry(loaded.config.telemetry)
        self.processor = ExternalProcessor(Runtime.build(loaded), self.telemetry)
        # One process owns the rate limit counters (a memory store must be one budget).
        self.ratelimit = builtin_rate_limit_service(loaded.config) if options.worker_index == 0 else None
        if self.ratelimit is not None:
            self.telemetry.metrics.watch_rate_limit_service(self.ratelimit)
        self.health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.draining = False
        self.grpc_port: int | None = None
        self.admin_port: int | None = None

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 128 * 1024 * 1024),
                ("grpc.max_send_message_length", 128 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ]
        )
        ep_grpc.add_ExternalProcessorServicer_to_server(self.processor, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.ratelimit is not None:
            rls_pb2_grpc.add_RateLimitServiceServicer_to_server(self.ratelimit, server)
        try:
            port = server.add_insecure_port(self.options.grpc_address)
        except RuntimeError:
            raise ListenError(f"cannot listen on {self.options.grpc_address} (address in use?)") from None
        self.grpc_port = port
        await server.start()
        self._grpc = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        try:
            await self._start_admin()
        except ListenError:
            await server.stop(None)  # leave nothing running for the event loop to trip over
            raise
        log.info(
            "processor listening: grpc=%s admin=http://%s:%s",
            self.options.grpc_address,
            self.options.admin_host,
            self.admin_port,
        )

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _start_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.options.admin_host, self.options.admin_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {self.options.admin_host}:{self.options.admin_port} (admin): {exc.strerror}"
            ) from None
        self._admin = runner
        sockets = site._server.sockets if site._server else []  # noqa: SLF001 (aiohttp has no public accessor)
        self.admin_port = sockets[0].getsockname()[1] if sockets else self.options.admin_port

    async def _healthz(self, _request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response(self._health_body("draining"), status=503)
        return web.json_response(self._health_body("ok"))

    def _health_body(self, status: str) -> dict[str, object]:
        return {
            "status": status,
            "in_flight": self.processor.in_flight,
            "worker": self.options.worker_index,
            "pid": os.getpid(),
            "ppid": os.getppid(),
        }

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.telemetry.metrics.render_prometheus()
        if request.query.get("local") or not self.options.peer_admin_ports:
            return web.Response(body=body, headers={"content-type": content_type})
        # Worker 0 answers for all workers: fetch theirs and add the series up.
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            peers = await asyncio.gather(
                *(self._peer_metrics(session, port) for port in self.options.peer_admin_ports)
            )
        texts = [body.decode(), *(text for text in peers if text is not None)]
        return web.Response(text=merge_expositions(texts), headers={"content-type": "text/plain; version=0.0.4"})

    async def _peer_metrics(self, session: aiohttp.ClientSession, port: int) -> str | None:
        url = f"http://{self.options.admin_host}:{port}/metrics?local=1"
        try:
            async with session.get(url) as response:
                return await response.text() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("metrics of the worker on admin port %d not included: %s", port, exc)
            return None

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()
        await self.drain_and_stop()

    async def drain_and_stop(self) -> None:
        """Refuse new streams, let in-flight ones finish within the grace period, then close."""
        self.draining = True
        grace = self.options.grace_period_seconds
        log.info("draining: %d stream(s) in flight, grace %.1fs", self.processor.in_flight, grace)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._admin is not None:
            await self._admin.cleanup()
        if self.ratelimit is not None:
            await self.ratelimit.store.close()
        # Flush what the exporters still hold, off the event loop (it may touch the network).
        await asyncio.to_thread(self.telemetry.shutdown)
        log.info("processor stopped")


def builtin_rate_limit_service(config: GatewayConfig) -> RateLimitServicer | None:
    """The rate limit service Envoy's budget filter calls, when it runs in this process."""
    if not config.budgets or config.ratelimit.address != "builtin":
        return None
    rules = load_rules(descriptor_config(config), "<budgets>")
    # Answer (or fail) before Envoy's own timeout, so its failure mode is what applies.
    store_timeout = config.ratelimit.timeout_ms / 1000 * 0.8
    store = store_from_url(config.ratelimit.store, timeout=store_timeout)
    return RateLimitServicer(rules, store, store_timeout=store_timeout)


def install_signal_handlers(server: ProcessorServer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, server.request_stop)


async def serve(loaded: LoadedConfig, options: ServeOptions) -> None:
    server = ProcessorServer(loaded, options)
    await server.start()
    install_signal_handlers(server)
    await server.wait_stopped()


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when available: grpc.aio and aiohttp both support it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        asyncio.run(main)
        return
    uvloop.run(main)
