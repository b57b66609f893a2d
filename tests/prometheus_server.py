"""A real Prometheus (the Debian `prometheus` package) for tests, on a free port.

It scrapes what the test's config says and evaluates the rule files it lists; queries go
through its HTTP API (`query`), as Grafana's would."""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from tests.processes import terminate
from tests.redis_server import free_port

__all__ = ["PrometheusServer", "prometheus_binary", "promtool_binary"]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    return shutil.which("promtool")


class PrometheusServer:
    """Context manager running one `prometheus` with the given config text (YAML)."""

    def __init__(self, config: str, startup_timeout: float = 30.0, flags: tuple[str, ...] = ()) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed (make system-deps, or apt-get install prometheus)")
        self._binary = binary
        self._config = config
        self._flags = flags  # e.g. --enable-feature=exemplar-storage
        self._startup_timeout = startup_timeout
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._log: BinaryIO | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrometheusServer:
        self._workdir = tempfile.TemporaryDirectory(prefix="prometheus-test-")
        work = Path(self._workdir.name)
        (work / "prometheus.yml").write_text(self._config)
        self._log = open(work / "prometheus.log", "w+b")  # noqa: SIM115 - closed in __exit__
        self.port = free_port()
        self._process = subprocess.Popen(
            [self._binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn", *self._flags],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        log = self.log()
        self.__exit__(None, None, None)
        raise RuntimeError(f"prometheus did not start: {log}")

    def __exit__(self, *exc: object) -> None:
        process, self._process = self._process, None
        if process is not None:
            terminate(process, timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-3000:].decode(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer (raises on an error answer)."""
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        if answer.get("status") != "success":
            raise ValueError(f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{metric: labels, value: [t, "v"]}], finite values only."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise ValueError(f"{expr}: a {data['resultType']}, not a vector")
        return [s for s in data["result"] if math.isfinite(float(s["value"][1]))]
