"""Which backend holds response X: affinity for stateful APIs (OpenAI Responses).

A follow-up request with ``previous_response_id`` only works on the backend that
issued that id, so the gateway remembers ``response id -> backend`` when a response
passes through and looks it up when a follow-up arrives.

All processor worker processes of one host share one small SQLite file (WAL mode,
so readers never wait for the writer; ``synchronous=OFF``, since losing the last
writes to an OS crash only costs affinity, never correctness of anything else;
``busy_timeout`` so concurrent writers from several processes wait their turn
instead of failing). Rows expire after ``ttl_s`` (30 days by default, like stored
responses at OpenAI): lookups ignore expired rows, and every ``prune_every`` writes
a prune deletes them and keeps the table at most ``max_rows`` rows (oldest first).

Each call takes microseconds but is blocking I/O, so the event loop should use the
async wrappers (``aremember``, ``alookup``, ``aforget``), which run the calls on one
thread owned by the store; the sync methods may be called from any thread (a lock
guards the single connection). The store is best-effort: a SQLite error is logged
and counted in ``errors``, ``lookup`` then answers None and ``remember`` does nothing,
so a broken store degrades to no affinity rather than failing requests.

Create the store in the process that uses it: after a fork the store notices the new
pid and opens its own connection and thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_TTL_S = 30 * 24 * 3600.0
DEFAULT_MAX_ROWS = 1_000_000
DEFAULT_PRUNE_EVERY = 1000
DEFAULT_BUSY_TIMEOUT_MS = 5000
MAX_ID_LENGTH = 512  # longer ids are not remembered (the caller validates them anyway)

_INHERITED: list[sqlite3.Connection] = []  # connections a forked child got from its parent, kept unclosed

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS affinity ("
    " response_id TEXT PRIMARY KEY, backend TEXT NOT NULL, created REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS affinity_created ON affinity (created)",
)


def default_path(address: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """A per-host store path derived from the processor's gRPC address (one file per processor).

    ``unix:/run/x.sock`` and ``127.0.0.1:50051`` both become a safe file name in
    ``directory`` (default: the system temp directory).
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", address).strip("._-") or "default"
    base = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    return base / f"extproc-affinity-{name[:100]}.sqlite3"


class Affinity(Protocol):
    """What the request stage needs: this host's SQLite store or the fleet's Redis one (extproc.state)."""

    errors: int  # failures swallowed so far (for metrics)
    kind: str  # "sqlite" or "redis" (a metric label)

    async def aremember(self, response_id: str, backend: str) -> None: ...
    async def alookup(self, response_id: str) -> str | None: ...
    async def aforget(self, response_id: str) -> None: ...
    async def aclose(self) -> None: ...


class AffinityStore:
    """``response_id -> backend`` in a SQLite file shared by the processes of one host."""

    kind = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        ttl_s: float = DEFAULT_TTL_S,
        max_rows: int = DEFAULT_MAX_ROWS,
        prune_every: int = DEFAULT_PRUNE_EVERY,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0 or max_rows < 1 or prune_every < 1 or busy_timeout_ms < 0:
            raise ValueError("ttl_s, max_rows and prune_every must be positive, busy_timeout_ms not negative")
        self.path = Path(path)
        self.ttl_s = float(ttl_s)
        self.max_rows = int(max_rows)
        self.prune_every = int(prune_every)
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.errors = 0  # SQLite errors swallowed so far (for metrics)
        self._clock = clock
        self._lock = threading.Lock()  # guards the connection
        self._executor_lock = threading.Lock()
        self._executor_pid = -1
        self._writes = 0
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        with self._lock:
            self._connection()  # open now, so a bad path is a start-up error
            self._prune_locked()

    # -- sync API (any thread) ---------------------------------------------------------------------

    def remember(self, response_id: str, backend: str) -> None:
        """Record that ``backend`` holds ``response_id`` (replacing any earlier answer)."""
        if not response_id or not backend or len(response_id) > MAX_ID_LENGTH:
            return
        with self._lock:
            if self._closed:
                return
            try:
                conn = self._connection()
                conn.execute(
                    "INSERT OR REPLACE INTO affinity (response_id, backend, created) VALUES (?, ?, ?)",
                    (response_id, backend, self._clock()),
                )
                self._writes += 1
                if self._writes % self.prune_every == 0:
                    self._prune_locked()
            except sqlite3.Error as exc:
                self._failed("remember", exc)

    def lookup(self, response_id: str) -> str | None:
        """The backend holding ``response_id``, or None if unknown or expired."""
        if not response_id or len(response_id) > MAX_ID_LENGTH:
            return None
        with self._lock:
            if self._closed:
                return None
            try:
                row = self._connection().execute(
                    "SELECT backend FROM affinity WHERE response_id = ? AND created >= ?",
                    (response_id, self._clock() - self.ttl_s),
                ).fetchone()
            except sqlite3.Error as exc:
                self._failed("lookup", exc)
                return None
        return row[0] if row is not None else None

    def forget(self, response_id: str) -> None:
        """Drop ``response_id`` (e.g. after the client deleted the response)."""
        with self._lock:
            if self._closed:
                return
            try:
                self._connection().execute("DELETE FROM affinity WHERE response_id = ?", (response_id,))
            except sqlite3.Error as exc:
                self._failed("forget", exc)

    def prune(self) -> int:
        """Delete expired rows and the oldest beyond ``max_rows``; returns how many went."""
        with self._lock:
            if self._closed:
                return 0
            try:
                return self._prune_locked()
            except sqlite3.Error as exc:
                self._failed("prune", exc)
                return 0

    def count(self) -> int:
        """Rows in the table, expired or not (for tests and metrics; scans the table)."""
        with self._lock:
            if self._closed:
                return 0
            try:
                return int(self._connection().execute("SELECT COUNT(*) FROM affinity").fetchone()[0])
            except sqlite3.Error as exc:
                self._failed("count", exc)
                return 0

    def close(self) -> None:
        """Close the connection and stop the thread; idempotent. Later calls do nothing (lookups
        answer None), so requests racing a shutdown are not failed by it."""
        with self._executor_lock:
            self._closed = True
            executor, self._executor = self._executor, None
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            conn.close()
        if executor is not None and self._executor_pid == os.getpid():
            executor.shutdown(wait=False)

    def __enter__(self) -> AffinityStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- async API (event loop) ----------------------------------------------------------------------

    async def aremember(self, response_id: str, backend: str) -> None:
        await self._run(self.remember, response_id, backend)

    async def alookup(self, response_id: str) -> str | None:
        return await self._run(self.lookup, response_id)

    async def aforget(self, response_id: str) -> None:
        await self._run(self.forget, response_id)

    async def aclose(self) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------

    async def _run(self, call: Callable[..., _T], *args: str) -> _T | None:
        executor = self._thread()
        if executor is None:
            return None
        try:
            future = asyncio.get_running_loop().run_in_executor(executor, call, *args)
        except RuntimeError:  # shut down by a close() racing this call
            return None
        return await future

    def _thread(self) -> ThreadPoolExecutor | None:
        """The store's one thread (None once closed: calls racing a shutdown do nothing).

        Never waits for the connection lock, which a call blocked on another process's
        write may hold for up to busy_timeout: the event loop must not wait with it.
        """
        executor = self._executor
        if executor is not None and self._executor_pid == os.getpid():
            return executor
        with self._executor_lock:
            if self._closed:
                return None
            if self._executor is None or self._executor_pid != os.getpid():
                # first use, or a forked child: the parent's thread does not exist here
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extproc-affinity")
                self._executor_pid = os.getpid()
            return self._executor

    def _connection(self) -> sqlite3.Connection:
        """The process's connection, opened on first use and again after a fork (lock held)."""
        if self._closed:
            raise sqlite3.ProgrammingError("AffinityStore is closed")
        pid = os.getpid()
        if self._conn is not None and self._pid == pid:
            return self._conn
        # After a fork the parent's connection is not ours: never touch it, not even by closing
        # it (closing its file would drop this process's POSIX locks on the database).
        if self._conn is not None:
            _INHERITED.append(self._conn)
        self._conn = None
        self._writes = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_ms / 1000.0, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = OFF")
            for statement in _SCHEMA:
                conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, pid
        return conn

    def _prune_locked(self) -> int:
        conn = self._connection()
        removed = conn.execute("DELETE FROM affinity WHERE created < ?", (self._clock() - self.ttl_s,)).rowcount
        # The newest max_rows rows by insertion: rowids only grow (a replaced row gets a new one),
        # so this needs no count over the table.
        removed += conn.execute(
            "DELETE FROM affinity WHERE rowid <= (SELECT MAX(rowid) FROM affinity) - ?", (self.max_rows,)
        ).rowcount
        return removed

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        self.errors += 1
        log.warning("affinity store %s %s failed: %s", self.path, what, exc)
