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
from pathlib import Path
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
import h11
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from envoy.service.ratelimit.v3 import rls_pb2_grpc

from extproc import admin
from extproc.admin import AdminRequest, AdminResponse, AdminServer
from extproc.budgets import descriptor_config
from extproc.config import GatewayConfig, LoadedConfig
from extproc.ratelimit import RateLimitServicer, load_rules, store_from_url
from extproc.affinity import Affinity, AffinityStore
from extproc.exchange import Exchange
from extproc.protocol import PROCESSOR_SERVICE
from extproc.redact import install_secret_scrubber
from extproc.reload import ConfigWatcher
from extproc.upstream import UpstreamExchange, is_upstream_stream
from extproc.runtime import Runtime
from extproc.telemetry import Telemetry
from extproc.telemetry import exemplars
from extproc.telemetry.merge import OPENMETRICS_CONTENT_TYPE, merge_expositions, merge_openmetrics
from extproc.workers import WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAME = PROCESSOR_SERVICE
_CLOSING: set[asyncio.Future[None]] = set()  # replaced key stores closing in the background


class ListenError(OSError):
    """An address the processor was told to use is not available."""


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    """One `Process` stream per HTTP request (or per upstream attempt); each stream is
    self-contained, and the processor ends it itself as soon as Envoy needs nothing more."""

    def __init__(
        self, runtime: Runtime, telemetry: Telemetry | None = None, affinity: Affinity | None = None
    ) -> None:
        self.runtime = runtime
        self.telemetry = telemetry
        self.affinity = affinity
        self.in_flight = 0
        self.messages: dict[tuple[str, str], int] = {}  # (stage, phase) -> messages answered
        if telemetry is not None:
            telemetry.metrics.watch_processor_messages(self.messages)

    async def Process(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        clock = time.perf_counter
        stage: Exchange | UpstreamExchange | None = None
        upstream: UpstreamExchange | None = None  # an attempt, whose span ends with the stream
        exchange: Exchange | None = None  # the request stage, which also keeps the request's record
        messages = self.messages
        stage_name = "request"
        self.in_flight += 1
        try:
            async for request in request_iterator:
                began = clock()
                if stage is None:  # the first message says which stage this stream serves
                    if is_upstream_stream(request):
                        stage = upstream = UpstreamExchange(self.runtime, self.telemetry)
                        stage_name = "upstream"
                    else:
                        stage = exchange = Exchange(self.runtime, self.telemetry, self.affinity)
                key = (stage_name, request.WhichOneof("request") or "none")
                messages[key] = messages.get(key, 0) + 1
                answer = stage.handle(request)
                if not isinstance(answer, ep.ProcessingResponse):
                    answer = await answer
                if exchange is not None:
                    exchange.processor_seconds += clock() - began
                yield answer
                if stage.done or answer.WhichOneof("response") == "immediate_response":
                    # Envoy needs nothing more: returning sends the stream's OK status, and
                    # Envoy takes the request as processed (see envoyconfig.RUNTIME_FLAGS).
                    return
        finally:
            self.in_flight -= 1
            if exchange is not None:
                exchange.close()
            if upstream is not None:
                upstream.close()


@dataclass(slots=True)
class ServeOptions:
    grpc_address: str
    admin_host: str
    admin_port: int
    grace_period_seconds: float
    worker_index: int = 0
    peer_admin_ports: list[int] = field(default_factory=list)  # worker 0 merges their /metrics
    config_path: str | None = None  # watched and reloaded on change/SIGHUP; None: built from the environment
    prepare_config: Callable[[LoadedConfig], LoadedConfig] | None = None  # command-line overrides, reapplied
    affinity_path: str | None = None  # shared by every worker: which backend holds a stored response


class ProcessorServer:
    """Owns the gRPC server, the health service and the admin HTTP server."""

    def __init__(self, loaded: LoadedConfig, options: ServeOptions) -> None:
        self.options = options
        self.loaded = loaded
        self.telemetry = Telemetry(loaded.config.telemetry)
        self.affinity = self._affinity_store(loaded, options)
        runtime = Runtime.build(loaded)  # opens the key store, if any (a file is read here)
        self.key_store = runtime.key_store
        self.processor = ExternalProcessor(runtime, self.telemetry, self.affinity)
        # One process owns the rate limit counters (a memory store must be one budget).
        self.ratelimit = builtin_rate_limit_service(loaded) if options.worker_index == 0 else None
        if self.ratelimit is not None:
            self.telemetry.metrics.watch_rate_limit_service(self.ratelimit)
        if self.affinity is not None:
            self.telemetry.metrics.watch_affinity_store(self.affinity)
        self.health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._admin: AdminServer | None = None
        self._stopping = asyncio.Event()
        self.draining = False
        self.watcher: ConfigWatcher | None = None
        if options.config_path is not None:
            self.watcher = ConfigWatcher(Path(options.config_path), loaded, self.apply_config, options.prepare_config,
                                         poll=loaded.config.processor.watch_config)
        self.grpc_port: int | None = None
        self.admin_port: int | None = None
        self._mcp: Any = None  # extproc.mcp.McpGateway in worker 0 when `mcp` is configured
        self._session_key_keeper: Any = None  # extproc.state.SessionKeyKeeper with state.redis and no session_secret
        self.mcp_port: int | None = None

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
            await self._start_mcp()
        except BaseException:  # ListenError, or the MCP credentials not resolvable
            if self._admin is not None:
                await self._admin.close()
            await server.stop(None)  # leave nothing running for the event loop to trip over
            raise
        if self.watcher is not None:
            self.watcher.start()
        if self.key_store is not None:
            self.key_store.start()  # the file store's poll; Redis is read live
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
        server = AdminServer({"/healthz": self._healthz, "/metrics": self._metrics})
        try:
            self.admin_port = await server.start(self.options.admin_host, self.options.admin_port)
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {self.options.admin_host}:{self.options.admin_port} (admin): {exc.strerror}"
            ) from None
        self._admin = server

    @staticmethod
    def _affinity_store(loaded: LoadedConfig, options: ServeOptions) -> Affinity | None:
        """state.redis: one store for the fleet; else this host's SQLite file (if a path is given)."""
        state = loaded.config.state
        if state.redis is not None:
            from extproc.state import RedisAffinityStore

            return RedisAffinityStore.from_url(state.redis, password=loaded.redis_password(state.redis),
                                               ttl_s=state.affinity_ttl_seconds)
        return AffinityStore(Path(options.affinity_path)) if options.affinity_path else None

    async def _start_mcp(self) -> None:
        """Worker 0 runs the MCP gateway (its own HTTP port) when the config has `mcp`."""
        settings = getattr(self.loaded.config, "mcp", None)
        if settings is None or self.options.worker_index != 0:
            return
        from extproc.mcp import McpGateway, resolve_mcp_secrets  # aiohttp only in this process
        from extproc.mcp.config import SESSION_SECRET_KEY

        secrets = resolve_mcp_secrets(settings, os.environ)
        state_url = self.loaded.config.state.redis
        if state_url is not None and SESSION_SECRET_KEY not in secrets:
            from extproc.state import SessionKeyKeeper

            password = self.loaded.redis_password(state_url)
            secrets[SESSION_SECRET_KEY] = await _shared_session_secret(state_url, password)
            self._session_key_keeper = SessionKeyKeeper.from_url(state_url, secrets[SESSION_SECRET_KEY],
                                                                 password=password)
            self._session_key_keeper.start()
        gateway = McpGateway(settings, secrets, self.telemetry, self.processor.runtime.authorization)
        try:
            self.mcp_port = await gateway.start(
                self.options.admin_host, settings.port, shutdown_timeout=self.options.grace_period_seconds
            )
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {self.options.admin_host}:{settings.port} (MCP gateway): {exc.strerror}"
            ) from None
        self._mcp = gateway

    async def _healthz(self, _request: AdminRequest) -> AdminResponse:
        status = "draining" if self.draining else "ok"
        return AdminResponse(503 if self.draining else 200, orjson.dumps(self._health_body(status)))

    def _health_body(self, status: str) -> dict[str, object]:
        return {
            "status": status,
            "in_flight": self.processor.in_flight,
            "worker": self.options.worker_index,
            "pid": os.getpid(),
            "ppid": os.getppid(),
        }

    async def _metrics(self, request: AdminRequest) -> AdminResponse:
        metrics = self.telemetry.metrics
        if request.query.get("exemplars"):  # worker 0 asking for this worker's exemplars
            return AdminResponse(200, exemplars.to_json(metrics.exemplars()))
        body, content_type = metrics.render_prometheus()
        openmetrics = "application/openmetrics-text" in request.accept
        local = request.query.get("local") or not self.options.peer_admin_ports
        if local and not openmetrics:
            return AdminResponse(200, body, content_type)
        texts = [body.decode()]
        found = [metrics.exemplars()]
        if not local:
            # Worker 0 answers for all workers: fetch theirs and add the series up.
            peers = await asyncio.gather(*(self._peer_metrics(port) for port in self.options.peer_admin_ports))
            texts += [text for text in peers if text is not None]
            if openmetrics:
                found += await asyncio.gather(*(self._peer_exemplars(port) for port in self.options.peer_admin_ports))
        if openmetrics:
            text = merge_openmetrics(texts, exemplars.newest(found))
            return AdminResponse(200, text.encode(), OPENMETRICS_CONTENT_TYPE)
        return AdminResponse(200, merge_expositions(texts).encode(), "text/plain; version=0.0.4")

    async def _peer_metrics(self, port: int) -> str | None:
        try:
            status, body = await admin.fetch(self.options.admin_host, port, "/metrics?local=1", timeout=2)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            log.warning("metrics of the worker on admin port %d not included: %r", port, exc)
            return None
        return body.decode() if status == 200 else None

    async def _peer_exemplars(self, port: int) -> dict[exemplars.Key, exemplars.Exemplar]:
        try:
            status, body = await admin.fetch(self.options.admin_host, port, "/metrics?local=1&exemplars=1", timeout=2)
            return exemplars.from_json(body) if status == 200 else {}
        except (OSError, TimeoutError, h11.ProtocolError, ValueError, TypeError) as exc:
            log.warning("exemplars of the worker on admin port %d not included: %r", port, exc)
            return {}

    def apply_config(self, loaded: LoadedConfig) -> None:
        """Swap in a reloaded config: new requests use it, requests in flight keep theirs.
        Raises ConfigError (nothing applied) when the MCP servers' keys cannot be read."""
        mcp_secrets = None
        if self._mcp is not None and loaded.config.mcp is not None:
            from extproc.mcp import resolve_mcp_secrets

            mcp_secrets = resolve_mcp_secrets(loaded.config.mcp, os.environ)  # first: may refuse the reload
        self.processor.runtime = self._runtime_with_keys(loaded)
        if self.ratelimit is not None:
            # Budget amounts live in the service's rules (Envoy only knows the descriptors).
            self.ratelimit.rules = load_rules(descriptor_config(loaded.config), "<budgets>")
        if loaded.config.telemetry != self.loaded.config.telemetry:
            log.warning("telemetry settings changed: they apply when the processor restarts")
        install_secret_scrubber(loaded)  # new keys are scrubbed from logs too
        if mcp_secrets is not None and self._mcp is not None and loaded.config.mcp is not None:
            self._mcp.update(loaded.config.mcp, mcp_secrets, self.processor.runtime.authorization)
        self.loaded = loaded

    def _runtime_with_keys(self, loaded: LoadedConfig) -> Runtime:
        """The new runtime keeps the running key store while its settings are unchanged
        (keys change in the store itself, not through the config)."""
        def settings(config: GatewayConfig) -> object:
            return config.tenancy.key_store if config.tenancy is not None else None

        if settings(loaded.config) == settings(self.loaded.config):
            return Runtime.build(loaded, self.key_store)
        runtime = Runtime.build(loaded)  # KeyStoreError, a ConfigError (a file that does not parse): nothing applied
        old, self.key_store = self.key_store, runtime.key_store
        if self.key_store is not None:
            self.key_store.start()
        if old is not None:
            task = asyncio.ensure_future(old.close())
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)
        return runtime

    def reload_config(self) -> None:
        """SIGHUP: reload the config file now."""
        if self.watcher is None:
            log.warning("SIGHUP ignored: the config did not come from a file")
            return
        self.watcher.request()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop_requested(self) -> None:
        await self._stopping.wait()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()
        await self.drain_and_stop()

    async def drain_and_stop(self) -> None:
        """Refuse new streams, let in-flight ones finish within the grace period, then close."""
        self.draining = True
        if self.watcher is not None:
            await self.watcher.stop()
        grace = self.options.grace_period_seconds
        log.info("draining: %d stream(s) in flight, grace %.1fs", self.processor.in_flight, grace)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # The MCP gateway drains its streams alongside the gRPC ones.
        mcp_stopped = asyncio.ensure_future(self._mcp.stop()) if self._mcp is not None else None
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if mcp_stopped is not None:
            await mcp_stopped
        if self._session_key_keeper is not None:
            await self._session_key_keeper.aclose()
        if self._admin is not None:
            await self._admin.close()
        if self.ratelimit is not None:
            await self.ratelimit.store.close()
        if self.affinity is not None:
            await self.affinity.aclose()
        if self.key_store is not None:
            await self.key_store.close()
        # Flush what the exporters still hold, off the event loop (it may touch the network).
        await asyncio.to_thread(self.telemetry.shutdown)
        log.info("processor stopped")


def builtin_rate_limit_service(loaded: LoadedConfig) -> RateLimitServicer | None:
    """The rate limit service Envoy's budget filter calls, when it runs in this process."""
    config = loaded.config
    if not config.budgets or config.ratelimit.address != "builtin":
        return None
    rules = load_rules(descriptor_config(config), "<budgets>")
    # Answer (or fail) before Envoy's own timeout, so its failure mode is what applies.
    store_timeout = config.ratelimit.timeout_ms / 1000 * 0.8
    url = config.ratelimit.store
    password = loaded.redis_password(url)
    store = store_from_url(url, timeout=store_timeout, **({"password": password} if password is not None else {}))
    return RateLimitServicer(rules, store, store_timeout=store_timeout)


def install_signal_handlers(server: ProcessorServer, pool: WorkerPool | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, server.request_stop)

    def hangup() -> None:
        server.reload_config()
        if pool is not None:
            pool.signal(signal.SIGHUP)  # every worker reloads its own copy

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, hangup)


async def serve(loaded: LoadedConfig, options: ServeOptions, pool: WorkerPool | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT; worker 0 may also own the other workers' processes.
    Returns the exit code: 1 when a worker died on its own (the whole processor stops)."""
    server = ProcessorServer(loaded, options)
    if pool is not None:
        await pool.start()  # they boot while this worker binds its ports
    try:
        await server.start()
    except BaseException:
        if pool is not None:
            await pool.stop(0)
        raise
    install_signal_handlers(server, pool)
    failed = False
    if pool is not None:
        assert pool.died is not None
        stop = asyncio.ensure_future(server.stop_requested())
        either: set[asyncio.Future[Any]] = {stop, pool.died}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if pool.died.done() and not pool.died.cancelled():
            child = pool.died.result()
            log.error("processor worker %s exited with code %s; stopping the others", child.pid, child.returncode)
            failed = True
        stop.cancel()
        server.request_stop()
        results = await asyncio.gather(server.wait_stopped(), pool.stop(options.grace_period_seconds))
        return 1 if failed else (1 if results[1] else 0)
    await server.wait_stopped()
    return 0


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when available (grpc.aio supports it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(main)
    return uvloop.run(main)


async def _shared_session_secret(url: str, password: str | None = None) -> str:
    """The fleet's MCP session key from Redis (drawn by the first replica). Redis down at start:
    a start-up error, since a random key would make this replica's sessions unknown to the others."""
    from extproc.redis_pool import redis_client
    from extproc.state import StateUnavailable, shared_session_secret

    client = redis_client(url, timeout=2.0, password=password)
    try:
        return await shared_session_secret(client)
    except StateUnavailable as exc:
        raise ListenError(f"state.redis: cannot read the shared MCP session key: {exc}") from None
    finally:
        await client.aclose()
