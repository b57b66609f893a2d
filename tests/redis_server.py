"""A real, throwaway `redis-server` for tests.

    with RedisServer() as server:
        store = RedisStore.from_url(server.url)

Listens on 127.0.0.1 on a free port, persists nothing (`--save '' --appendonly no`, working
directory in a temporary folder), and is terminated (then killed if need be) on exit, so no
process or file outlives the test.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import BinaryIO

from tests.processes import terminate

__all__ = ["RedisServer", "redis_server_binary", "free_port"]


def redis_server_binary() -> str | None:
    """Path of `redis-server`, or None when it is not installed."""
    return shutil.which("redis-server") or shutil.which("/usr/bin/redis-server")


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            if password:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """Context manager running one redis-server; `.url` is `redis://127.0.0.1:PORT/0`."""

    def __init__(self, *, port: int | None = None, startup_timeout: float = 10.0, password: str | None = None) -> None:
        """`port`: listen there (e.g. to restart a server in place); default: a free port.
        `password`: clients must AUTH with it (`requirepass`); `.url` does not carry it."""
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._log: BinaryIO | None = None
        self._requested_port = port
        self._password = password
        self.port = port or 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._workdir = tempfile.TemporaryDirectory(prefix="redis-test-")
        self._log = open(f"{self._workdir.name}/redis.log", "w+b")  # noqa: SIM115 - closed in _cleanup_dir
        error = ""
        for _attempt in range(1 if self._requested_port else 3):  # a free port may be taken meanwhile
            self.port = self._requested_port or free_port()
            self._process = subprocess.Popen(
                [
                    self._binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", self._workdir.name,
                    "--daemonize", "no",
                    "--loglevel", "warning",
                    *(["--requirepass", self._password] if self._password else []),
                ],
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + self._startup_timeout
            while time.monotonic() < deadline and self._process.poll() is None:
                if _answers_ping(self.port, self._password):
                    return self
                time.sleep(0.02)
            error = self._stop_process()
            if time.monotonic() >= deadline:
                break
        self._cleanup_dir()
        raise RuntimeError(f"redis-server did not start: {error}")

    def _stop_process(self) -> str:
        """Terminate (or kill) the process; return the end of its log."""
        process, self._process = self._process, None
        if process is None:
            return ""
        terminate(process, timeout=5)
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace").strip()

    def _cleanup_dir(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def stop(self) -> None:
        self._stop_process()
        self._cleanup_dir()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Redis hung (SIGSTOP) for the duration: connections open but nothing answers, so
        clients meet their timeouts; the data is intact when it resumes (SIGCONT)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
