"""Processes: start them in their own process group, read their CPU and memory from /proc,
and stop them (and anything they started) for sure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


# --- /proc ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state, 1 = ppid)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    """Clock ticks after boot when `pid` started: tells a process from a reused pid."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid`, in clock ticks."""
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else None


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return 0  # kernel threads / zombies have no VmRSS line


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or fields[0] in ("Z", "X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Live descendants of `pid`, parents before children."""
    children = _children_map()
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def is_processor(argv: Sequence[str]) -> bool:
    """`python -m extproc [...] serve ...` (the processor or one of its workers)."""
    return "serve" in argv and any(a == "extproc" or a.endswith("/extproc") for a in argv[:4])


def processor_pids(run_pid: int) -> list[int]:
    """Every process of the processor under `extproc run`: each `extproc serve` and what
    it started (its workers). Envoy and the demo backend are not part of it."""
    tree = descendants(run_pid)
    roots = [pid for pid in tree if is_processor(cmdline(pid))]
    found: list[int] = []
    for root in roots:
        if root not in found:
            found.append(root)
        found.extend(p for p in descendants(root) if p not in found)
    return found


def cpu_snapshot(pids: Iterable[int]) -> dict[int, tuple[int | None, int]]:
    """{pid: (start time, cpu ticks)} for the pids still alive."""
    out = {}
    for pid in pids:
        started, ticks = start_time(pid), cpu_ticks(pid)
        if ticks is not None:
            out[pid] = (started, ticks)
    return out


def cpu_seconds_between(before: Mapping[int, tuple[int | None, int]], after: Mapping[int, tuple[int | None, int]]) -> float:
    """CPU time used between two snapshots; a process that appeared in between counts whole."""
    ticks = 0
    for pid, (started, now) in after.items():
        earlier = before.get(pid)
        ticks += now - earlier[1] if earlier is not None and earlier[0] == started else now
    return ticks / CLOCK_TICKS


def system_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    values = [int(v) for v in fields]  # user nice system idle iowait irq softirq steal
    total = sum(values)
    return total - values[3] - values[4], total


def tree_pids(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_range(count: int, avoid: Iterable[int] = ()) -> int:
    """A port p such that p .. p+count-1 are all free now (and not in `avoid`)."""
    taken = set(avoid)
    for _ in range(200):
        base = free_port()
        ports = range(base, base + count)
        if base + count <= 65535 and not taken.intersection(ports) and all(_port_free(p) for p in ports[1:]):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports on 127.0.0.1")


# --- processes we start ----------------------------------------------------------------


def _die_with_parent() -> None:
    """Pre-exec hook: if this script dies (even by SIGKILL) the kernel SIGTERMs the child."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Managed:
    """A child in its own process group, its output in files, its descendants remembered."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    seen: dict[int, int | None] = field(default_factory=dict)  # pid -> start time

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def remember_descendants(self) -> None:
        for pid in descendants(self.pid):
            self.seen.setdefault(pid, start_time(pid))

    def stderr_tail(self, lines: int = 15) -> str:
        return tail(self.stderr_path, lines)


def tail(path: Path, lines: int = 15, max_bytes: int = 64 * 1024) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class ProcessSet:
    """Everything the benchmark started; `stop_all` leaves nothing behind."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.items: list[Managed] = []
        self.leftovers: list[dict[str, object]] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Managed:
        stdout_path = self.log_dir / f"{name}.stdout"
        stderr_path = self.log_dir / f"{name}.stderr"
        # Append mode, so the file can be truncated while the child writes to it.
        with stdout_path.open("ab") as out, stderr_path.open("ab") as err:
            popen = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group: a terminal's Ctrl-C reaches only us
                preexec_fn=_die_with_parent,
            )
        managed = Managed(name, popen, stdout_path, stderr_path)
        self.items.append(managed)
        return managed

    def stop(self, managed: Managed, timeout: float = 20) -> list[int]:
        """SIGTERM the group, SIGKILL it after `timeout`; then SIGKILL any descendant still
        alive. Returns the pids that had to be killed that way."""
        managed.remember_descendants()
        if managed.running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(managed.pid, signal.SIGTERM)
            try:
                managed.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(managed.pid, signal.SIGKILL)
                managed.popen.wait()
        else:
            managed.popen.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(self._same(p, s) for p, s in managed.seen.items()):
            time.sleep(0.05)
        killed = []
        for pid, started in managed.seen.items():
            if self._same(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        if killed:
            self.leftovers.append({"name": managed.name, "pids": killed})
        if managed in self.items:
            self.items.remove(managed)
        return killed

    @staticmethod
    def _same(pid: int, started: int | None) -> bool:
        return alive(pid) and start_time(pid) == started

    def stop_all(self) -> None:
        for managed in reversed(list(self.items)):
            self.stop(managed)
        # Anything still below us (there should be nothing) is killed too.
        for pid in descendants(os.getpid()):
            argv = cmdline(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.leftovers.append({"name": "descendant", "pids": [pid], "argv": argv})
