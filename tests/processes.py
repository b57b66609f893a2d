"""Stopping the servers tests start (redis-server, Prometheus, a front Envoy)."""

from __future__ import annotations

import subprocess
from typing import Any


def terminate(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL: no server outlives its test."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
