"""Client API keys kept hashed, in a file or in Redis, looked up per request by digest.

`records` is the entry format, `file_store` the JSON-lines file (watched, swapped whole),
`redis_store` the shared store (read live through a small TTL cache), `manage` the
`extproc keys` command. See the README's "Identity and access" section.
"""

from __future__ import annotations

from pathlib import Path

from extproc.config import KeyStoreSettings
from extproc.keys.records import PENDING, KeyRecord, KeyStore, KeyStoreError, Lookup

__all__ = ["KeyRecord", "KeyStore", "KeyStoreError", "Lookup", "PENDING", "open_key_store"]


def open_key_store(settings: KeyStoreSettings) -> KeyStore:
    """The store the settings name; a file is read now (KeyStoreError if it does not parse)."""
    if settings.file is not None:
        from extproc.keys.file_store import FileKeyStore

        return FileKeyStore(Path(settings.file), settings.poll_seconds)
    assert settings.redis is not None
    from extproc.keys.redis_store import RedisKeyStore

    redis = settings.redis
    return RedisKeyStore.from_url(redis.url, timeout=redis.timeout_ms / 1000, prefix=redis.prefix,
                                  cache_seconds=redis.cache_seconds, cache_entries=redis.cache_entries)
