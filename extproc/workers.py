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


async def supervise_workers(argv: Sequence[str], count: int, grace_seconds: float) -> int:
    """Run `count` copies of `extproc serve ... --worker-index i`; forward SIGTERM/SIGINT to
    all of them (each drains its own streams) and exit when they have; a worker that dies
    on its own stops the rest, so whoever supervises us sees the failure."""
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "extproc", *argv, "--worker-index", str(index), "--workers", str(count),
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # a killed supervisor leaves no worker behind
        )
        for index in range(count)
    ]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    waits = {asyncio.ensure_future(child.wait()): child for child in children}
    stop = asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait({*waits, stop}, return_when=asyncio.FIRST_COMPLETED)
    failed = stop not in done
    if failed:
        died = next(waits[task] for task in done if task in waits)
        log.error("processor worker %s exited with code %s; stopping the others", died.pid, died.returncode)
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
    stop.cancel()
    return 1 if failed else max((child.returncode or 0) for child in children)
