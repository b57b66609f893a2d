"""Who calls: the tenant a request is charged to, how that was established, and its grants.

Precedence (first that applies wins): a key-store key > a `tenancy.api_keys` key > the
tenant header > the default tenant; with none of them the request is refused
(`tenancy.reject_status`). A key the store knows but refuses (revoked, expired) is a 401
and never falls through to a header or the default.
"""

from __future__ import annotations

import re
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.config import Tenancy, key_digest
from extproc.keys import PENDING, KeyRecord, KeyStore, KeyStoreError
from extproc.request_headers import client_api_key, header_text
from extproc.schemas import openai
from extproc.schemas.openai import RequestError

MAX_TENANT = 128
_TENANT_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity a request runs under. `models`/`tools`: the key's (or token's) own grant
    globs; None means the tenant's policy applies. `key_id`: the key-store entry, if any."""

    tenant: str
    via: str  # "jwt" | "key" | "host" | "header" | "default"
    models: tuple[str, ...] | None = None
    tools: tuple[str, ...] | None = None
    key_id: str | None = None


def caller_of(
    headers: dict[str, bytes], tenancy: Tenancy, tenant_keys: Mapping[str, str], key_store: KeyStore | None = None
) -> Caller | Coroutine[Any, Any, Caller]:
    """The caller, or (a key-store key not in memory: Redis) a coroutine the server awaits."""
    key = client_api_key(headers)
    if key:
        digest = key_digest(key)
        if key_store is not None:
            try:
                found = key_store.lookup(digest)
            except KeyStoreError:
                raise _unavailable() from None
            if found is PENDING:
                return _fetched(key_store, digest, headers, tenancy, tenant_keys)
            if isinstance(found, KeyRecord):
                return _from_record(found)
        if (tenant := tenant_keys.get(digest)) is not None:
            return Caller(tenant, "key")
    return _unkeyed(headers, tenancy)


def tenant_of(headers: dict[str, bytes], tenancy: Tenancy, tenant_keys: Mapping[str, str]) -> str:
    """The tenant alone, for callers without a key store (always answered in memory)."""
    found = caller_of(headers, tenancy, tenant_keys)
    assert isinstance(found, Caller)
    return found.tenant


async def _fetched(
    store: KeyStore, digest: str, headers: dict[str, bytes], tenancy: Tenancy, tenant_keys: Mapping[str, str]
) -> Caller:
    try:
        record = await store.fetch(digest)
    except KeyStoreError:
        raise _unavailable() from None
    if record is not None:
        return _from_record(record)
    if (tenant := tenant_keys.get(digest)) is not None:
        return Caller(tenant, "key")
    return _unkeyed(headers, tenancy)


def _unavailable() -> RequestError:
    """Fail closed: an unknown answer is not "no such key" (that could hand out the default tenant)."""
    return RequestError(503, "The gateway cannot check API keys right now; retry shortly.", "server_error",
                        "key_store_unavailable")


def _from_record(record: KeyRecord) -> Caller:
    refusal = record.refusal(time.time())
    if refusal is not None:
        raise RequestError(401, refusal, "invalid_request_error", "invalid_api_key")
    return Caller(record.tenant, "key", record.models, record.tools, record.id)


def _unkeyed(headers: dict[str, bytes], tenancy: Tenancy) -> Caller:
    if tenancy.header is not None and (named := header_text(headers.get(tenancy.header))) is not None:
        if len(named) > MAX_TENANT or not _TENANT_CHARS.match(named):
            raise openai.bad_request(
                f"The {tenancy.header} header must be 1-{MAX_TENANT} characters of letters, digits and _.-"
            )
        return Caller(named, "header")
    if tenancy.default_tenant is not None:
        return Caller(tenancy.default_tenant, "default")
    source = " or ".join(
        ([f"the {tenancy.header} header"] if tenancy.header else [])
        + (["a known API key"] if tenancy.api_keys or tenancy.key_store else [])
    )
    raise openai.no_tenant(tenancy.reject_status, f"This gateway needs to know who is calling: send {source}.")
