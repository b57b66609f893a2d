"""Keys in Redis, shared by every gateway: one GET per unknown key, then a short cache.

Layout under `prefix` (default `extproc:keys:`):
    {prefix}d:{digest}   the record as JSON (one per key)
    {prefix}id:{id}      set of the digests an entry id has had (revoke/rotate by id)
    {prefix}ids          set of every entry id (listing)

A lookup answers from the cache when it can (hits and misses alike, for `cache_seconds`,
at most `cache_entries` digests), else the request stage awaits one GET: the event loop
never blocks, and concurrent requests with the same unknown key share one GET. A change
in Redis (add, revoke, rotate) is seen by every gateway within `cache_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import orjson

from extproc.keys.records import PENDING, KeyRecord, KeyStoreError, Lookup
from extproc.redis_pool import redis_client, redis_errors

DEFAULT_PREFIX = "extproc:keys:"


def record_key(prefix: str, digest: str) -> str:
    return f"{prefix}d:{digest}"


def id_key(prefix: str, entry_id: str) -> str:
    return f"{prefix}id:{entry_id}"


def ids_key(prefix: str) -> str:
    return f"{prefix}ids"


def decode(raw: bytes | str | None) -> KeyRecord | None:
    if raw is None:
        return None
    try:
        return KeyRecord.from_json(orjson.loads(raw))
    except (orjson.JSONDecodeError, KeyStoreError) as exc:
        raise KeyStoreError(f"a stored key record is not valid: {exc}") from None


def _text(member: bytes | str) -> str:
    return member.decode() if isinstance(member, bytes) else member


class RedisKeyStore:
    """The request stage's view of the Redis keys (redis.asyncio, short timeouts)."""

    def __init__(
        self, client: Any, *, prefix: str = DEFAULT_PREFIX, cache_seconds: float = 2.0, cache_entries: int = 10_000
    ) -> None:
        self._client = client
        self.prefix = prefix
        self.cache_seconds = cache_seconds
        self.cache_entries = cache_entries
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}  # digest -> (valid until, record)
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.5, **options: Any) -> RedisKeyStore:
        return cls(redis_client(url, timeout=timeout), **options)

    def lookup(self, digest: str) -> Lookup:
        """The cached answer, or PENDING: then await `fetch`."""
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        return PENDING

    async def fetch(self, digest: str) -> KeyRecord | None:
        """One GET (shared by concurrent callers); KeyStoreError when Redis cannot answer."""
        if (waiting := self._inflight.get(digest)) is not None:
            return await asyncio.shield(waiting)
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            record = await self._get(digest)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, KeyStoreError) else KeyStoreError("lookup interrupted"))
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._inflight[digest]
        future.set_result(record)
        self._remember(digest, record)
        return record

    async def _get(self, digest: str) -> KeyRecord | None:
        try:
            raw = await self._client.get(record_key(self.prefix, digest))
        except redis_errors() as exc:
            raise KeyStoreError(f"redis key store unavailable: {type(exc).__name__}") from None
        return decode(raw)

    def _remember(self, digest: str, record: KeyRecord | None) -> None:
        cache = self._cache
        if len(cache) >= self.cache_entries and digest not in cache:
            # Oldest first (insertion order); expired ones are as good as gone anyway.
            for stale in list(cache)[: max(1, self.cache_entries // 10)]:
                del cache[stale]
        cache.pop(digest, None)
        cache[digest] = (time.monotonic() + self.cache_seconds, record)

    def start(self) -> None:
        """Nothing to watch: Redis is read live."""

    async def close(self) -> None:
        await self._client.aclose()


class RedisKeyEditor:
    """`extproc keys --redis`: the same records, written with a blocking client (a CLI)."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.prefix = prefix

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Each save is one MULTI/EXEC; two editors racing on one id is the operator's to avoid."""
        return contextlib.nullcontext()

    def has_digest(self, digest: str) -> bool:
        return bool(self._client.exists(record_key(self.prefix, digest)))

    def records(self) -> list[KeyRecord]:
        ids = sorted(_text(m) for m in self._client.smembers(ids_key(self.prefix)))
        out: list[KeyRecord] = []
        for entry_id in ids:
            out += self.records_of(entry_id)
        return out

    def records_of(self, entry_id: str) -> list[KeyRecord]:
        digests = sorted(_text(m) for m in self._client.smembers(id_key(self.prefix, entry_id)))
        if not digests:
            return []
        raws = self._client.mget([record_key(self.prefix, d) for d in digests])
        records = [r for r in (decode(raw) for raw in raws) if r is not None]
        return sorted(records, key=lambda r: r.created_at)

    def save(self, records: Iterable[KeyRecord]) -> None:
        """Write (or overwrite) these records in one transaction."""
        pipe = self._client.pipeline(transaction=True)
        for record in records:
            pipe.set(record_key(self.prefix, record.digest), orjson.dumps(record.to_json()))
            pipe.sadd(id_key(self.prefix, record.id), record.digest)
            pipe.sadd(ids_key(self.prefix), record.id)
        pipe.execute()

    def close(self) -> None:
        self._client.close()
