"""`extproc run`: start the demo backend (if used), the processor and Envoy; stop them all.

Each part is a child process: a crash in one is visible and never takes the others'
state with it, and the kernel ends the children if this supervisor is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

from extproc import envoyconfig
from extproc.config import LoadedConfig
from extproc.config_defaults import DEMO_PORT, is_demo
from extproc.launcher import Child, envoy_command
from extproc.liveness import MISSED_PROBES_BEFORE_RESTART, wait_until_hung
from extproc.redact import LineScrubber, SecretScrubber, config_secrets
from extproc.workers import worker_addresses, worker_count

READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# A processor that crashes is started again, unless it keeps crashing: more than this many
# restarts within the window means something is wrong that restarting will not fix.
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0


class StartupError(Exception):
    """A part could not start; the message is what the operator needs to read."""


@dataclass(slots=True)
class RunOptions:
    config_path: Path | None
    envoy_log_level: str = "warn"
    demo_port: int = DEMO_PORT


async def _wait_http(url: str, child: Child, accept: Callable[[str], bool] = lambda _body: True) -> None:
    """Poll `url` until it answers 200 with a body `accept` likes, failing fast if `child` dies."""
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_SECONDS
    timeout = aiohttp.ClientTimeout(total=1)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            if not child.running:
                await child.wait()
                raise StartupError(f"{child.name} exited with code {child.process.returncode}:\n{child.failure_reason()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(url) as response:
                    text = await response.text()
                    if response.status == 200 and accept(text):
                        return
            if asyncio.get_running_loop().time() > deadline:
                raise StartupError(f"{child.name} was not ready at {url} after {READY_TIMEOUT_SECONDS:.0f}s")
            await asyncio.sleep(0.05)


async def _wait_file(path: Path, child: Child) -> None:
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_SECONDS
    while not (path.exists() and path.read_text().strip()):
        if not child.running:
            await child.wait()
            raise StartupError(f"{child.name} exited with code {child.process.returncode}:\n{child.failure_reason()}")
        if asyncio.get_running_loop().time() > deadline:
            raise StartupError(f"{child.name} did not start within {READY_TIMEOUT_SECONDS:.0f}s")
        await asyncio.sleep(0.05)


def _example_model(loaded: LoadedConfig) -> str:
    models = [m for r in loaded.config.routes if r.match for m in r.match.exact_models]
    if models:
        return models[0]
    return "gpt-4o-mini"


def ready_banner(loaded: LoadedConfig, via: str) -> str:
    envoy = loaded.config.envoy
    base = f"http://{envoy.listen_address}:{envoy.listen_port}"
    body = '{"model":"%s","messages":[{"role":"user","content":"Hello!"}]}' % _example_model(loaded)
    curl = f"curl -s {base}/v1/chat/completions -H 'content-type: application/json' -d {shlex.quote(body)}"
    processor = loaded.config.processor
    return "\n".join(
        [
            f"extproc gateway ready ({loaded.source}; Envoy via {via})",
            f"  OpenAI base URL:  {base}/v1",
            f"  processor admin:  http://{processor.admin_address}:{processor.admin_port}/healthz",
            f"  Envoy admin:      http://127.0.0.1:{envoy.admin_port}",
            "Try:",
            f"  {curl}",
            "Stop with Ctrl-C.",
        ]
    )


class Gateway:
    """The running set of children; `stop` always leaves no process behind."""

    def __init__(self, loaded: LoadedConfig, options: RunOptions, run_dir: Path) -> None:
        self.loaded = loaded
        self.options = options
        self.run_dir = run_dir
        self.children: list[Child] = []
        self.processor_argv: list[str] = []
        self.restarts: list[float] = []
        self.scrubber = SecretScrubber(config_secrets(loaded))
        self._liveness: asyncio.Task[None] | None = None  # watches the running processor's worker 0

    async def start(self) -> str:
        config = self.loaded.config
        python = sys.executable
        if is_demo(self.loaded):
            sim_argv = [python, "-m", "extproc.sim", "--host", "127.0.0.1", "--port", str(self.options.demo_port)]
            sim = await self._spawn("demo-backend", sim_argv, quiet_stdout=True)
            await _wait_http(f"http://127.0.0.1:{self.options.demo_port}/v1/models", sim)

        config_path = self.options.config_path
        if config_path is None:  # built from the environment: secrets stay referenced, never written
            config_path = self.run_dir / "gateway.yaml"
            config_path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True)))
        self.processor_argv = [python, "-m", "extproc", "serve", "--config", str(config_path)]
        await self.start_processor()

        envoy_path = self.run_dir / "envoy.yaml"
        envoy_path.write_text(envoyconfig.to_yaml(envoyconfig.render(config)))
        admin_file = self.run_dir / "envoy-admin-address"
        command = envoy_command(
            envoy_path, ["--log-level", self.options.envoy_log_level, "--admin-address-path", str(admin_file)]
        )
        envoy = await self._spawn("envoy", command.argv, command.env)
        try:
            # Envoy writes its admin address only once *it* has bound it, so a stale Envoy
            # on the same port cannot pass for ours.
            await _wait_file(admin_file, envoy)
            await _wait_http(f"http://{admin_file.read_text().strip()}/ready", envoy, accept=lambda body: "LIVE" in body)
        except StartupError as exc:
            raise StartupError(f"Envoy could not start: {exc}") from None
        return command.via

    async def start_processor(self) -> Child:
        """Start `extproc serve` and wait until every worker answers as ours (itself the
        child, or a child of it), not a processor left over on the port."""
        processor = await self._spawn("processor", self.processor_argv)
        admin = self.loaded.config.processor
        ours = {processor.process.pid}

        def is_ours(body: str) -> bool:
            health = json.loads(body)
            return health.get("pid") in ours or health.get("ppid") in ours

        for worker in worker_addresses(admin, worker_count(admin)):
            await _wait_http(f"http://{admin.admin_address}:{worker.admin_port}/healthz", processor, accept=is_ours)
        self._liveness = asyncio.ensure_future(self._watch_liveness(processor))
        return processor

    async def _watch_liveness(self, processor: Child) -> None:
        """Kill the processor when worker 0 stops answering its health check; the crash
        path (`restart`) then starts a new one. Worker 0 watches workers 1..N-1 itself."""
        await wait_until_hung(self.loaded.config.processor.grpc_address)
        if not processor.running:
            return  # it exited: the crash path has it
        print(f"extproc: processor worker 0 (pid {processor.process.pid}) did not answer "
              f"{MISSED_PROBES_BEFORE_RESTART} health checks in a row; killing the processor to restart it",
              file=sys.stderr, flush=True)
        kill_process_group(processor)

    async def stop_watching(self) -> None:
        if self._liveness is not None:
            self._liveness.cancel()
            await asyncio.gather(self._liveness, return_exceptions=True)
            self._liveness = None

    async def restart(self, crashed: Child) -> None:
        """Start the processor again; Envoy keeps running and reconnects on its own."""
        await self.stop_watching()
        self.children.remove(crashed)
        now = asyncio.get_running_loop().time()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_SECONDS] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            raise StartupError(f"the processor crashed {len(self.restarts)} times within {RESTART_WINDOW_SECONDS:.0f}s")
        await self.start_processor()

    def signal_processor(self, sig: int) -> None:
        for child in self.children:
            if child.name == "processor" and child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(sig)

    async def drain_envoy(self, grace_seconds: float) -> None:
        """Stop taking new connections, then give open requests up to `grace_seconds`."""
        admin_file = self.run_dir / "envoy-admin-address"
        if not admin_file.exists():
            return
        base = f"http://{admin_file.read_text().strip()}"
        stat = "http.ai_gateway.downstream_rq_active"
        timeout = aiohttp.ClientTimeout(total=2)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(f"{base}/drain_listeners?inboundonly") as response:
                    await response.read()
                while loop.time() < deadline:
                    async with session.get(f"{base}/stats?filter=^{stat}$") as response:
                        text = await response.text()
                    active = int(text.rpartition(":")[2].strip() or 0) if stat in text else 0
                    if active == 0:
                        return
                    await asyncio.sleep(0.1)

    async def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, *, quiet_stdout: bool = False
    ) -> Child:
        environ = env if env is not None else dict(os.environ)
        # One LineScrubber per child: it follows that child's lines (a header Envoy prints
        # over two of them).
        child = await Child.start(name, argv, environ, quiet_stdout=quiet_stdout, scrub=LineScrubber(self.scrubber))
        self.children.append(child)
        return child

    async def wait_for_exit(self) -> Child:
        """Return the first child that exits on its own."""
        waits = {asyncio.ensure_future(c.wait()): c for c in self.children}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self) -> None:
        # Envoy first (after letting open requests finish) so no new requests arrive, then
        # the processor drains what is left, then the demo backend.
        grace = self.loaded.config.processor.grace_period_seconds
        await self.stop_watching()  # a draining processor stops answering: never kill it for that
        if any(c.name == "envoy" and c.running for c in self.children):
            await self.drain_envoy(grace)
        for child in sorted(self.children, key=lambda c: {"envoy": 0, "processor": 1}.get(c.name, 2)):
            await child.stop(STOP_TIMEOUT_SECONDS + (grace if child.name == "processor" else 0))


def kill_process_group(processor: Child) -> None:
    """SIGKILL the processor and its workers (its own process group: it runs in its own
    session). Workers left behind would drain while holding the ports the new processor
    must bind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(processor.process.pid, signal.SIGKILL)


async def run_gateway(loaded: LoadedConfig, options: RunOptions) -> int:
    """Start everything, print how to use it, and run until Ctrl-C/SIGTERM or a crash."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="extproc-run-") as tmp:
        gateway = Gateway(loaded, options, Path(tmp))
        try:
            starting = asyncio.ensure_future(gateway.start())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, StartupError):
                    await starting
                return 130
            stopping.cancel()
            via = starting.result()
            print(ready_banner(loaded, via), flush=True)
            # SIGHUP: the processor reloads its config file (it also notices changes itself).
            loop.add_signal_handler(signal.SIGHUP, gateway.signal_processor, signal.SIGHUP)
            while True:
                exited = asyncio.ensure_future(gateway.wait_for_exit())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not exited.done():
                    exited.cancel()
                    print("extproc: stopping", file=sys.stderr, flush=True)
                    return 0
                stopping.cancel()
                child = exited.result()
                reason = f"{child.name} exited unexpectedly (code {child.process.returncode})"
                if child.name != "processor":
                    print(f"extproc: {reason}:\n{child.failure_reason()}", file=sys.stderr, flush=True)
                    return 1
                print(f"extproc: {reason}; restarting it (Envoy keeps running)", file=sys.stderr, flush=True)
                await gateway.restart(child)
                print("extproc: processor restarted", file=sys.stderr, flush=True)
        except StartupError as exc:
            print(f"extproc: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            await gateway.stop()
