"""`extproc keys add | revoke | rotate | list`: the operations, over a file or Redis.

A key is printed once, when it is made; only its digest is stored. Revoking keeps the
record (marked `revoked_at`), so a revoked key is refused by name instead of falling
through to a header or default tenant. Rotating gives the entry a new key and revokes
the old one now, or at the end of a grace period (`revoked_at` in the future), so
clients can switch over without a failed request.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import orjson

from extproc.config import key_digest
from extproc.keys.file_store import locked, read_items, read_records, write_items
from extproc.keys.records import ID_PATTERN, TENANT_PATTERN, KeyRecord, KeyStoreError, new_key


class Editor(Protocol):
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def records(self) -> list[KeyRecord]: ...
    def records_of(self, entry_id: str) -> list[KeyRecord]: ...
    def has_digest(self, digest: str) -> bool: ...
    def save(self, records: list[KeyRecord]) -> None: ...


class FileKeyEditor:
    """Each change rewrites the file atomically, under a lock file against concurrent writers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._items: list[dict[str, Any]] | None = None  # read once per transaction

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with locked(self.path):
            self._items = read_items(self.path)
            try:
                yield
            finally:
                self._items = None

    def _current(self) -> list[dict[str, Any]]:
        return self._items if self._items is not None else read_items(self.path)

    def records(self) -> list[KeyRecord]:
        return read_records(self.path)

    def records_of(self, entry_id: str) -> list[KeyRecord]:
        return [KeyRecord.from_json(item) for item in self._current() if item.get("id") == entry_id]

    def has_digest(self, digest: str) -> bool:
        return any(item["digest"] == digest for item in self._current())

    def save(self, records: list[KeyRecord]) -> None:
        """Upsert by digest; the other records are copied as they are (no per-record check:
        editing a 100,000-key file takes well under a second)."""
        changed = {r.digest: r.to_json() for r in records}
        kept = [changed.pop(item["digest"], item) for item in self._current()]  # updated in place, in file order
        items = [*kept, *changed.values()]
        write_items(self.path, items)
        if self._items is not None:
            self._items = items


@dataclass(frozen=True, slots=True)
class Made:
    record: KeyRecord
    key: str  # shown once, never stored


def add(editor: Editor, tenant: str, now: float, *, entry_id: str | None = None, key: str | None = None,
        expires_at: float | None = None, models: tuple[str, ...] | None = None,
        tools: tuple[str, ...] | None = None) -> Made:
    """A new entry with a new key (or the given one)."""
    if not TENANT_PATTERN.match(tenant):
        raise KeyStoreError("the tenant must be 1-128 letters, digits and _.- (starting with a letter or digit)")
    entry_id = entry_id or f"key-{secrets.token_hex(4)}"
    if not ID_PATTERN.match(entry_id):
        raise KeyStoreError("the id must be 1-64 letters, digits and _.- (starting with a letter or digit)")
    if expires_at is not None and expires_at <= now:
        raise KeyStoreError("the expiry is in the past")
    key = new_key() if key is None else _checked_key(key)
    record = KeyRecord(id=entry_id, digest=key_digest(key), tenant=tenant, created_at=round(now, 3),
                       expires_at=expires_at, models=models, tools=tools)
    with editor.transaction():
        if editor.records_of(entry_id):
            raise KeyStoreError(f"an entry with id {entry_id!r} exists: rotate or revoke it, or pick another id")
        if editor.has_digest(record.digest):
            raise KeyStoreError("this key is already stored (under another id)")
        editor.save([record])
    return Made(record, key)


def _checked_key(key: str) -> str:
    key = key.strip()
    if len(key) < 20 or not key.isascii() or not key.isprintable() or " " in key:
        raise KeyStoreError("a key must be at least 20 printable ASCII characters without spaces")
    return key


def revoke(editor: Editor, entry_id: str, now: float) -> int:
    """Refuse every key of the entry from now on; returns how many were still usable."""
    with editor.transaction():
        live = [r for r in _known(editor, entry_id) if r.revoked_at is None or r.revoked_at > now]
        editor.save([replace(r, revoked_at=round(now, 3)) for r in live])
    return len(live)


def rotate(editor: Editor, entry_id: str, now: float, grace_seconds: float = 0.0) -> Made:
    """A new key for the entry (same tenant, grants, expiry); the old ones stop after `grace_seconds`."""
    if grace_seconds < 0:
        raise KeyStoreError("the grace period must be >= 0 seconds")
    with editor.transaction():
        records = _known(editor, entry_id)
        live = [r for r in records if r.refusal(now) is None]
        if not live:
            raise KeyStoreError(f"entry {entry_id!r} has no usable key to rotate (revoked or expired): add a new one")
        latest = max(live, key=lambda r: r.created_at)
        key = new_key()
        fresh = replace(latest, digest=key_digest(key), created_at=round(now, 3), revoked_at=None)
        until = round(now + grace_seconds, 3)
        old = [replace(r, revoked_at=until if r.revoked_at is None else min(r.revoked_at, until)) for r in live]
        editor.save([*old, fresh])
    return Made(fresh, key)


def _known(editor: Editor, entry_id: str) -> list[KeyRecord]:
    records = editor.records_of(entry_id)
    if not records:
        raise KeyStoreError(f"no entry with id {entry_id!r}")
    return records


def state(record: KeyRecord, now: float) -> str:
    if record.revoked_at is not None:
        return "revoked" if record.revoked_at <= now else "revoking"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    return "active"


def listing(records: list[KeyRecord], now: float) -> list[dict[str, object]]:
    """What `list` shows: never a key, and only a digest's first 12 hex digits (to tell rows apart)."""
    return [
        {
            "id": r.id, "tenant": r.tenant, "state": state(r, now), "digest": r.digest[:12],
            "created_at": r.created_at, "expires_at": r.expires_at, "revoked_at": r.revoked_at,
            "models": list(r.models) if r.models is not None else None,
            "tools": list(r.tools) if r.tools is not None else None,
        }
        for r in records
    ]


def listing_json(records: list[KeyRecord], now: float) -> bytes:
    return b"".join(orjson.dumps(row) + b"\n" for row in listing(records, now))
