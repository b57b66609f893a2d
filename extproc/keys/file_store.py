"""Keys in a JSON-lines file: one dict lookup per request, reloaded whole when the file changes.

Why JSON lines: 100,000 records load in well under a second with orjson (YAML would take
tens of seconds), a bad line is reported by its line number, and `extproc keys` rewrites
the file atomically (temp file + rename), so the gateway's poll always reads either the
old file or the new one, never half of one. The poll stats the file off the event loop
and a changed file is parsed in a thread; the new table replaces the old in one
assignment, so a lookup never sees a table being built.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from extproc.file_state import file_state
from extproc.keys.records import KeyRecord, KeyStoreError, Lookup

log = logging.getLogger(__name__)

def read_items(path: Path) -> list[dict[str, Any]]:
    """Every record as decoded JSON, in file order, each with a digest; a missing file holds
    none. One orjson call for the whole file (100,000 lines in ~0.1 s); the fields are
    checked when a record is used (`KeyRecord.from_json`), so a reload costs little CPU."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read the key store: {exc.strerror}") from None
    numbered = [(n, line) for n, line in enumerate(data.splitlines(), 1) if line.strip()]
    try:
        items = orjson.loads(b"[" + b",".join(line for _, line in numbered) + b"]")
    except orjson.JSONDecodeError:
        items = None
    if items is not None and len(items) == len(numbered) and all(
        type(item) is dict and type(item.get("digest")) is str for item in items
    ):
        return items
    for number, line in numbered:  # name the first bad line
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise KeyStoreError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(item, dict):
            raise KeyStoreError(f"{path}:{number}: a record must be a JSON object")
        if not isinstance(item.get("digest"), str):
            raise KeyStoreError(f"{path}:{number}: field 'digest' is missing or malformed")
    raise KeyStoreError(f"{path}: not JSON lines")  # pragma: no cover - a line above is bad


def read_records(path: Path) -> list[KeyRecord]:
    """Every record, fully checked (listing, editing); KeyStoreError names the line."""
    records = []
    for number, item in enumerate(read_items(path), 1):
        try:
            records.append(KeyRecord.from_json(item))
        except KeyStoreError as exc:
            raise KeyStoreError(f"{path}: record {number}: {exc}") from None
    return records


def write_items(path: Path, items: Iterable[dict[str, Any]]) -> None:
    """Replace the file atomically: a reader sees the old or the new file, never a mix."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(b"".join(orjson.dumps(item) + b"\n" for item in items))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o600)  # digests only, but nobody else needs to read who has keys
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise writers (two `extproc keys` at once must not lose each other's change)."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def index(items: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Digest -> stored record (a digest listed twice: the later line wins)."""
    return {item["digest"]: item for item in items}


class FileKeyStore:
    """The table the request stage reads; `watch()` keeps it in step with the file."""

    def __init__(self, path: Path, poll_seconds: float = 1.0) -> None:
        self.path = path
        self.poll_seconds = poll_seconds
        self._state = file_state(path)
        if self._state is None:
            log.warning("key store %s does not exist yet: no key is known until it is created", path)
        # (digest -> stored record, digest -> checked record): swapped together on reload.
        self._tables: tuple[dict[str, dict[str, Any]], dict[str, KeyRecord]] = (index(read_items(path)), {})
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._tables[0])

    def lookup(self, digest: str) -> Lookup:
        """One dict lookup; a record is checked the first time it is used (KeyStoreError if
        it is not valid: the request is refused, not handed to a default tenant)."""
        stored, checked = self._tables
        record = checked.get(digest)
        if record is not None:
            return record
        item = stored.get(digest)
        if item is None:
            return None
        try:
            record = KeyRecord.from_json(item)
        except KeyStoreError as exc:
            log.error("key store %s: the record of digest %s... is not valid: %s", self.path, digest[:12], exc)
            raise
        checked[digest] = record
        return record

    async def fetch(self, digest: str) -> KeyRecord | None:
        found = self.lookup(digest)
        return found if isinstance(found, KeyRecord) else None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await self.refresh()

    async def refresh(self) -> bool:
        """Reload if the file changed; True when a new table now serves. A file that does not
        parse leaves the old table serving (logged), so a bad hand edit locks nobody out."""
        state = await asyncio.to_thread(file_state, self.path)
        if state == self._state:
            return False
        try:
            table = await asyncio.to_thread(lambda: index(read_items(self.path)))
        except KeyStoreError as exc:
            log.error("key store reload rejected, the previous keys keep serving: %s", exc)
            self._state = state  # retried when the file changes again
            return False
        self._state = state
        self._tables = (table, {})
        log.info("key store reloaded from %s: %d key(s)", self.path, len(table))
        return True
