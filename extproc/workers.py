"""Several processor processes, one per core: Python's GIL keeps one process on one core.

Each ext_proc stream is self-contained, so any worker can take it: Envoy's `extproc`
cluster lists every worker as an endpoint and spreads streams across them. Worker 0
also serves the admin port the operator sees (`/healthz`, and `/metrics` merged from
all workers) and, when it runs in the processor, the rate limit service (a memory store
must live in one process to be one budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.config import ConfigError, ProcessorSettings
from extproc.launcher import die_with_parent
from extproc.liveness import MISSED_PROBES_BEFORE_RESTART, wait_until_hung

log = logging.getLogger(__name__)


def worker_count(settings: ProcessorSettings) -> int:
    """`workers: 0` means one per core this process may use."""
    if settings.workers:
        return settings.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class WorkerAddress:
    index: int
    grpc_address: str  # host:port or unix:/path
    admin_port: int


# Worker i listens on the configured ports + 10*i: the defaults (gRPC 1063, admin 1064)
# then never collide (1063, 1073, ... and 1064, 1074, ...).
PORT_STRIDE = 10


def worker_addresses(settings: ProcessorSettings, count: int) -> list[WorkerAddress]:
    """Worker i: gRPC port + 10*i (or socket path + '.i'), admin port + 10*i."""
    out = []
    for index in range(count):
        address = settings.grpc_address
        if index:
            if address.startswith("unix:"):
                address = f"{address}.{index}"
            else:
                host, _, port = address.rpartition(":")
                address = f"{host}:{int(port) + PORT_STRIDE * index}"
        admin = settings.admin_port + PORT_STRIDE * index if settings.admin_port else 0
        out.append(WorkerAddress(index, address, admin))
    grpc_ports = {int(w.grpc_address.rpartition(":")[2]) for w in out if not w.grpc_address.startswith("unix:")}
    clash = sorted(grpc_ports & {w.admin_port for w in out})
    if clash:
        raise ConfigError(
            f"processor ports collide for {count} workers (gRPC port + 10*i and admin port + 10*i both give "
            f"{', '.join(map(str, clash))}): pick processor.grpc_address and processor.admin_port further apart"
        )
    return out


class WorkerPool:
    """Workers 1..N-1, started by worker 0 (which runs in the parent process: a separate
    supervisor would cost a whole interpreter's memory and do nothing else).

    A worker that exits on its own is reported through `died`, so worker 0 stops the
    rest and whoever supervises the processor sees the failure. A worker that stops
    answering its health check (hung, stopped) is killed and replaced on the same ports
    (see `extproc.liveness`); Envoy has already stopped sending it streams by then. On
    shutdown SIGTERM goes to every worker (each drains its own streams)."""

    def __init__(self, argv: Sequence[str], grpc_addresses: Sequence[str]) -> None:
        self.argv = list(argv)
        self.grpc_addresses = list(grpc_addresses)  # worker i listens on grpc_addresses[i]
        self.children: dict[int, asyncio.subprocess.Process] = {}  # by worker index
        self.died: asyncio.Future[asyncio.subprocess.Process] | None = None
        self._killed: set[int] = set()  # pids of hung workers we killed: their exit is no failure
        self._watchdogs: list[asyncio.Task[None]] = []  # one per worker: replaces it when hung

    async def start(self) -> None:
        self.died = asyncio.get_running_loop().create_future()
        for index in range(1, len(self.grpc_addresses)):
            await self._spawn(index)
        self._watchdogs = [asyncio.ensure_future(self._keep_answering(i)) for i in range(1, len(self.grpc_addresses))]

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extproc", *self.argv,
            "--worker-index", str(index), "--workers", str(len(self.grpc_addresses)),
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # a killed worker 0 leaves no worker behind
        )
        self.children[index] = child
        asyncio.ensure_future(self._watch(child))
        return child

    async def _watch(self, child: asyncio.subprocess.Process) -> None:
        await child.wait()
        if child.pid in self._killed:
            return
        if self.died is not None and not self.died.done():
            self.died.set_result(child)

    async def _keep_answering(self, index: int) -> None:
        """Replace worker `index` whenever it stops answering its health check."""
        while True:
            await wait_until_hung(self.grpc_addresses[index])
            if self.children[index].returncode is not None:
                return  # it exited on its own: `died` reports that
            await self._replace(index)

    async def _replace(self, index: int) -> None:
        """SIGKILL (a stopped process takes no other signal) and start a new worker on its ports."""
        hung = self.children[index]
        self._killed.add(hung.pid)
        with contextlib.suppress(ProcessLookupError):
            hung.kill()
        await hung.wait()  # its ports are free once it is gone
        child = await self._spawn(index)
        log.error(
            "processor worker %d (pid %d) did not answer %d health checks in a row: killed it; "
            "pid %d replaces it on the same ports", index, hung.pid, MISSED_PROBES_BEFORE_RESTART, child.pid,
        )

    def signal(self, sig: int) -> None:
        for child in self.children.values():
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(sig)

    async def stop(self, grace_seconds: float) -> int:
        """SIGTERM every worker, wait for them (killing stragglers), return the worst exit code."""
        for watchdog in self._watchdogs:
            watchdog.cancel()  # a draining worker stops answering: never replace it for that
        await asyncio.gather(*self._watchdogs, return_exceptions=True)
        if self.died is not None and not self.died.done():
            self.died.cancel()  # exits from now on are the ones we asked for
        children = list(self.children.values())
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(child.wait() for child in children)), grace_seconds + 10)
        except TimeoutError:
            for child in children:
                if child.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.kill()
            await asyncio.gather(*(child.wait() for child in children))
        return max((abs(child.returncode or 0) for child in children), default=0)
