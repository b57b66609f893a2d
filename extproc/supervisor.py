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
from extproc.config import DEMO_PORT, LoadedConfig, is_demo
from extproc.launcher import Child, envoy_command
from extproc.workers import worker_addresses, worker_count

READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


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
        processor = await self._spawn("processor", [python, "-m", "extproc", "serve", "--config", str(config_path)])
        admin = config.processor
        # Every worker must answer, and be ours (itself the child, or a child of it),
        # not a processor left over on the port.
        ours = {processor.process.pid}

        def is_ours(body: str) -> bool:
            health = json.loads(body)
            return health.get("pid") in ours or health.get("ppid") in ours

        for worker in worker_addresses(admin, worker_count(admin)):
            await _wait_http(f"http://{admin.admin_address}:{worker.admin_port}/healthz", processor, accept=is_ours)

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

    async def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, *, quiet_stdout: bool = False
    ) -> Child:
        environ = env if env is not None else dict(os.environ)
        child = await Child.start(name, argv, environ, quiet_stdout=quiet_stdout)
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
        # Envoy first so no new requests arrive, then the processor drains, then the backend.
        for child in reversed(self.children):
            await child.stop(STOP_TIMEOUT_SECONDS)


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
            exited = asyncio.ensure_future(gateway.wait_for_exit())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                child = exited.result()
                print(
                    f"extproc: {child.name} exited unexpectedly (code {child.process.returncode}):\n"
                    f"{child.failure_reason()}",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            exited.cancel()
            print("extproc: stopping", file=sys.stderr, flush=True)
            return 0
        except StartupError as exc:
            print(f"extproc: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            await gateway.stop()
