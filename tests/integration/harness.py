"""Start the real gateway (`extproc run`: real Envoy + real processor) for tests.

Ports are picked at run time on 127.0.0.1; every process started here is stopped
at teardown, and the test fails if the gateway leaves one behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.workers import PORT_STRIDE

READY_LINE = "extproc gateway ready"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_HANDED_OUT: set[int] = set()  # ports given out by free_port_block in this test run


def free_port_block(size: int) -> int:
    """A port p such that p + 10*i is free for every worker i < size (see extproc.workers).

    Drawn below the kernel's ephemeral range, where outgoing connections never take a
    port between our check and the server's bind."""
    low, _high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        base = random.randrange(10_000, max(low - PORT_STRIDE * size, 10_001))
        wanted = {base + PORT_STRIDE * index for index in range(size)}
        if wanted & _HANDED_OUT:  # free now, but promised to an earlier caller
            continue
        sockets = []
        try:
            for index in range(size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + PORT_STRIDE * index))
            _HANDED_OUT.update(wanted)
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {size} free ports found")


TEST_WORKERS = 2  # processor workers per test gateway: exercises spreading and merged metrics


def descendants(pid: int) -> set[int]:
    """All live descendants of `pid`, read from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def eventually(check: Any, timeout: float = 15, interval: float = 0.1) -> bool:
    """Whether `check()` turns true within `timeout` seconds (e.g. a changed key file that
    each worker polls)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


class RunningGateway:
    """`extproc run` as a child process, with its stdout (banner + access log) collected."""

    def __init__(self, config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.listen_port = free_port()
        self.envoy_admin_port = free_port()
        config = dict(config)
        config.setdefault("envoy", {}).update(listen_port=self.listen_port, admin_port=self.envoy_admin_port)
        processor = dict(config.get("processor", {}))
        processor.setdefault("workers", TEST_WORKERS)
        self.processor_admin_port = free_port_block(processor["workers"])
        processor.setdefault("grpc_address", f"127.0.0.1:{free_port_block(processor['workers'])}")
        processor.update(admin_port=self.processor_admin_port)
        config["processor"] = processor
        self.config = config
        tmp.mkdir(parents=True, exist_ok=True)
        self.config_path = tmp / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, **(env or {})}
        self.args = args or []
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}/v1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self, timeout: float = 60) -> RunningGateway:
        argv = [sys.executable, "-m", "extproc", "run", "--config", str(self.config_path), *self.args]
        self._ready.clear()  # a killed gateway starts again on the same ports
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=self.env
        )
        threading.Thread(target=self._pump, args=(self.process.stdout, self.stdout_lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr_lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("gateway did not start:\n" + "\n".join(self.stderr_lines[-30:]))
        return self

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if line.startswith(READY_LINE):
                self._ready.set()

    def access_log(self) -> list[dict[str, Any]]:
        """Envoy's JSON access-log lines printed so far."""
        entries = []
        for line in list(self.stdout_lines):
            if line.startswith("{"):
                entries.append(orjson.loads(line))
        return entries

    def metric_sum(self, family: str, suffix: str, **labels: str) -> float:
        """The sum of the processor's `/metrics` samples of metric families named `family...`
        whose sample name ends in `suffix` (e.g. `_sum`) and whose labels include `labels`."""
        text = httpx.get(f"http://127.0.0.1:{self.processor_admin_port}/metrics", timeout=10).text
        return sum(
            sample.value
            for metric in text_string_to_metric_families(text) if metric.name.startswith(family)
            for sample in metric.samples
            if sample.name.endswith(suffix) and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def wait_access_log(self, predicate: Any, timeout: float = 15) -> dict[str, Any]:
        """Envoy flushes its access log about once a second: wait for a matching entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.access_log():
                if predicate(entry):
                    return entry
            time.sleep(0.1)
        raise AssertionError(f"no access-log entry matched; have: {self.access_log()[-5:]}")

    def wait_stderr(self, predicate: Any, timeout: float = 15) -> str:
        """Wait for a line on the gateway's stderr (processor and Envoy logs) matching `predicate`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stderr_lines):
                if predicate(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no stderr line matched; last lines: {self.stderr_lines[-10:]}")

    def wait_quiet(self, quiet: float = 0.3, timeout: float = 5) -> None:
        """After `stop`: let the reader threads take in the last lines of the pipes."""
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:
            now = len(self.stdout_lines) + len(self.stderr_lines)
            if now == seen:
                return
            seen = now
            time.sleep(quiet)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM `extproc run`; assert it exits and leaves no process behind."""
        assert self.process is not None
        children = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        deadline = time.monotonic() + 10
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = [p for p in children if alive(p)]
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        assert not leftover, f"extproc run left processes behind: {leftover}"
        return code


    def kill(self) -> None:
        """SIGKILL `extproc run`, its Envoy and every processor worker at once, as when a
        node is lost: nothing drains, open connections are cut. `start` runs it again on the
        same ports."""
        assert self.process is not None
        pids = [self.process.pid, *descendants(self.process.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)], "a killed replica left processes behind"


class AttachedGateway:
    """`extproc serve` plus a separately started Envoy: the "attach to your Envoy" set-up.

    Unlike `extproc run`, nothing restarts the processor here: tests stop and start it
    (`stop_processor` / `start_processor`) while Envoy keeps running."""

    def __init__(self, tmp: Path, sim: Any, grace: float, **processor: Any) -> None:
        # One worker: its admin port then shows the drain (a second, idle worker would just exit).
        self.tmp = tmp
        self.grpc_port, self.admin_port = free_port_block(1), free_port_block(1)
        self.listen_port = free_port()
        data = {
            "backends": [{"name": "a", "base_url": sim.base_url}],
            "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
            "processor": {"grpc_address": f"127.0.0.1:{self.grpc_port}", "admin_port": self.admin_port,
                          "grace_period_seconds": grace, "workers": 1, **processor},
            "envoy": {"listen_port": self.listen_port, "admin_port": free_port()},
        }
        self.envoy_admin_port = data["envoy"]["admin_port"]
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(data))
        from extproc import envoyconfig
        from extproc.config import parse_config
        from extproc.launcher import envoy_command

        (tmp / "envoy.yaml").write_text(envoyconfig.to_yaml(envoyconfig.render(parse_config(data))))
        self.processor = self.start_processor()
        command = envoy_command(tmp / "envoy.yaml", ["--log-level", "error"])
        self.envoy_lines: list[str] = []
        self.envoy = subprocess.Popen(command.argv, env=command.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True)
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self._wait_ready()
        except BaseException:
            self.close()  # never leave a processor or Envoy behind
            raise

    def _pump(self) -> None:
        assert self.envoy.stdout is not None
        for line in self.envoy.stdout:
            self.envoy_lines.append(line.rstrip("\n"))

    def start_processor(self) -> subprocess.Popen[str]:
        self.processor = subprocess.Popen(
            [sys.executable, "-m", "extproc", "serve", "--config", str(self.tmp / "gateway.yaml")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        return self.processor

    def wait_processor_healthy(self, timeout: float = 30) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.admin_port}/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("processor did not become healthy")

    def _wait_ready(self) -> None:
        import httpx

        self.wait_processor_healthy()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{self.listen_port}/v1/models").raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("serve + envoy did not become ready")

    def access_log(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in list(self.envoy_lines) if line.startswith("{")]

    def wait_access_log(self, predicate: Any, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.access_log():
                if predicate(entry):
                    return entry
            time.sleep(0.05)
        raise AssertionError(f"no access-log entry matched; have: {self.access_log()[-5:]}")

    def close(self) -> None:
        for process in (self.envoy, self.processor):
            if process.poll() is None:
                process.kill()
            process.wait(10)


@contextmanager
def running_gateway(config: dict[str, Any], tmp: Path, **kwargs: Any) -> Iterator[RunningGateway]:
    gateway = RunningGateway(config, tmp, **kwargs).start()
    try:
        yield gateway
    finally:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()
