"""One stored client API key: its digest (never the key), who it belongs to, what it may do.

A record is one JSON object; the file store keeps one per line (JSON lines), the Redis
store one hash per digest. Fields:

    id          the entry's name for listing, revoking and rotating (rotation keeps it)
    digest      SHA-256 hex of the key (`extproc.config.key_digest`)
    tenant      who the key's requests are charged to
    created_at  Unix seconds
    expires_at  Unix seconds, optional: after it the key is refused (401)
    revoked_at  Unix seconds, optional: a revoked key is refused (401), not forgotten, so
                it can never fall through to a header or default tenant
    models      optional grant globs over client model names (None: the tenant's policy)
    tools       optional grant globs over `<server>__<tool>` names
"""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

from extproc.config import ConfigError

ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TENANT_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DIGEST_PATTERN: Final = re.compile(r"^[0-9a-f]{64}$")
KEY_PREFIX: Final = "sk-gw-"  # generated keys: recognisable in leak scanners, 256 random bits


class KeyStoreError(ConfigError):
    """A store that cannot be read or written, or a record that is not valid (a ConfigError:
    the command line prints it, a reload that meets it is refused)."""


class _Pending:
    """The answer is not in memory: await `KeyStore.fetch` (Redis)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PENDING"


PENDING: Final = _Pending()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    digest: str
    tenant: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    models: tuple[str, ...] | None = None
    tools: tuple[str, ...] | None = None

    def refusal(self, now: float) -> str | None:
        """Why this key may not be used now, or None when it may."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "This API key has been revoked."
        if self.expires_at is not None and self.expires_at <= now:
            return "This API key has expired."
        return None

    def to_json(self) -> dict[str, Any]:
        """The stored form: absent optional fields are left out."""
        out = asdict(self)
        for name in ("models", "tools"):
            if out[name] is not None:
                out[name] = list(out[name])
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, data: Any) -> KeyRecord:
        """Validate one stored record; KeyStoreError names the bad field (never a value)."""
        if not isinstance(data, dict):
            raise KeyStoreError("a record must be a JSON object")
        unknown = set(data) - _FIELDS
        if unknown:
            raise KeyStoreError(f"unknown field(s) {sorted(unknown)}")
        return cls(
            id=_text(data, "id", ID_PATTERN),
            digest=_text(data, "digest", DIGEST_PATTERN),
            tenant=_text(data, "tenant", TENANT_PATTERN),
            created_at=_time(data, "created_at") or 0.0,
            expires_at=_time(data, "expires_at"),
            revoked_at=_time(data, "revoked_at"),
            models=_globs(data, "models"),
            tools=_globs(data, "tools"),
        )


_FIELDS: Final = frozenset(KeyRecord.__dataclass_fields__)


def _text(data: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not pattern.match(value):
        raise KeyStoreError(f"field {name!r} is missing or malformed")
    return value


def _time(data: dict[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KeyStoreError(f"field {name!r} must be Unix seconds")
    return float(value)


def _globs(data: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and 0 < len(v) <= 256 for v in value):
        raise KeyStoreError(f"field {name!r} must be a list of glob strings")
    return tuple(value)


def new_key() -> str:
    """A fresh client API key: 256 bits from the OS's CSPRNG."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


Lookup = KeyRecord | None | _Pending


class KeyStore(Protocol):
    """What the request stage needs from a store: a lookup by digest that answers from memory
    or says PENDING, then `fetch` (awaited) for the rest."""

    def lookup(self, digest: str) -> Lookup: ...
    async def fetch(self, digest: str) -> KeyRecord | None: ...
    def start(self) -> None: ...
    async def close(self) -> None: ...
