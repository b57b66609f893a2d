"""Who calls: the tenant a request is charged to, how that was established, and its grants.

Precedence (first that applies wins), strongest proof first: a JWT Envoy verified (its
tenant claim, `auth.jwt`) > a key-store key > a `tenancy.api_keys` key > the host name the
request was sent to (`tenancy.hosts`, `tenancy.host_pattern`) > the tenant header > the
default tenant; with none of them the request is refused (`tenancy.reject_status`).
A JWT Envoy did not verify, and a key the store knows but refuses (revoked, expired), are
401s and never fall through to another source. With `auth.jwt.required: false` a bearer
credential that is not a JWT (an opaque API key) goes on to the key lookups.
"""

from __future__ import annotations

import re
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from extproc.config import ApiKeyTenant, Tenancy, key_digest
from extproc.jwt_authn import Verified, looks_like_jwt
from extproc.keys import PENDING, KeyRecord, KeyStore, KeyStoreError
from extproc.request_headers import client_api_key, header_text
from extproc.schemas import openai
from extproc.schemas.openai import RequestError

MAX_TENANT = 128
_TENANT_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A verified claim is the issuer's word, not a client's: wider (e-mail subjects, "auth0|id"),
# but still one bounded printable word, as it becomes a metric label and a rate-limit key.
_CLAIM_CHARS = re.compile(r"^[^\s\x00-\x1f\x7f]{1,128}$")


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity a request runs under. `models` / `tools`: globs the caller's own credential
    is limited to (a key's, a token's), within its tenant's grants; None: the tenant's apply.
    `key_id`: the key-store entry, if any."""

    tenant: str
    via: Literal["jwt", "key", "host", "header", "default"]
    models: tuple[str, ...] | None = None
    tools: tuple[str, ...] | None = None
    key_id: str | None = None


def key_callers(entries: Mapping[str, ApiKeyTenant]) -> dict[str, Caller]:
    """The caller each `tenancy.api_keys` digest stands for, built once per config."""
    return {
        digest: Caller(entry.tenant, "key", tuple(entry.models) if entry.models is not None else None,
                       tuple(entry.tools) if entry.tools is not None else None)
        for digest, entry in entries.items()
    }


def host_matcher(tenancy: Tenancy) -> re.Pattern[str] | None:
    """`host_pattern` ('{tenant}.gw.example.com') as a regex whose group names the tenant."""
    if tenancy.host_pattern is None:
        return None
    before, _, after = tenancy.host_pattern.partition("{tenant}")
    return re.compile(f"{re.escape(before)}(?P<tenant>[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?){re.escape(after)}")


def caller_of(
    headers: dict[str, bytes], tenancy: Tenancy | None, tenant_keys: Mapping[str, Caller],
    key_store: KeyStore | None = None, host_pattern: re.Pattern[str] | None = None, token: Verified | None = None,
) -> Caller | Coroutine[Any, Any, Caller] | None:
    """The caller (see the module's docstring for the order), or, when a key-store lookup
    has to wait (Redis, not cached), a coroutine the exchange awaits. None: no tenancy
    configured and no token to name one.

    `tenant_keys`: the caller by the SHA-256 digest of each `tenancy.api_keys` key. `token`:
    what Envoy's jwt_authn filter verified (None when no JWT provider is configured)."""
    key = client_api_key(headers)
    if token is not None and (caller := _token_caller(token, key)) is not None:
        return caller
    if tenancy is None:
        return None
    if key:
        digest = key_digest(key)
        if key_store is not None:
            try:
                found = key_store.lookup(digest)
            except KeyStoreError:
                raise _unavailable() from None
            if found is PENDING:
                return _fetched(key_store, digest, headers, tenancy, tenant_keys, host_pattern, token is not None)
            if isinstance(found, KeyRecord):
                return _from_record(found)
        if (caller := tenant_keys.get(digest)) is not None:
            return caller
    return _unkeyed(headers, tenancy, host_pattern, token is not None)


def _token_caller(token: Verified, bearer: str | None) -> Caller | None:
    """The caller a verified token names; a refusal for a JWT Envoy did not verify (only
    reachable with `required: false`, where Envoy lets failures through); None to let the
    other sources decide (no token, or a bearer credential that is not a JWT)."""
    if token.provider is not None:
        if token.tenant is None or not _CLAIM_CHARS.match(token.tenant):
            raise openai.no_tenant(
                403,
                f"The token is valid but its {token.claim!r} claim does not name a tenant "
                f"(a string or integer of 1-{MAX_TENANT} printable characters without spaces).",
            )
        return Caller(token.tenant, "jwt", token.models, token.tools)
    if bearer is not None and looks_like_jwt(bearer):
        reason = token.failure or "it is not valid here"
        raise openai.no_tenant(401, f"The gateway did not accept the request's bearer token: {reason}.")
    if token.required:
        raise openai.no_tenant(401, "This gateway needs a valid JWT in Authorization: Bearer.")
    return None


async def _fetched(
    store: KeyStore, digest: str, headers: dict[str, bytes], tenancy: Tenancy, tenant_keys: Mapping[str, Caller],
    host_pattern: re.Pattern[str] | None, jwt: bool,
) -> Caller:
    try:
        record = await store.fetch(digest)
    except KeyStoreError:
        raise _unavailable() from None
    if record is not None:
        return _from_record(record)
    if (caller := tenant_keys.get(digest)) is not None:
        return caller
    return _unkeyed(headers, tenancy, host_pattern, jwt)


def _unavailable() -> RequestError:
    """Fail closed: an unknown answer is not "no such key" (that could hand out the default tenant)."""
    return RequestError(503, "The gateway cannot check API keys right now; retry shortly.", "server_error",
                        "key_store_unavailable")


def _from_record(record: KeyRecord) -> Caller:
    refusal = record.refusal(time.time())
    if refusal is not None:
        raise RequestError(401, refusal, "invalid_request_error", "invalid_api_key")
    return Caller(record.tenant, "key", record.models, record.tools, record.id)


def _unkeyed(
    headers: dict[str, bytes], tenancy: Tenancy, host_pattern: re.Pattern[str] | None, jwt: bool
) -> Caller:
    """The sources that prove nothing by themselves (`jwt`: JWT providers exist, for the message)."""
    if tenancy.hosts or host_pattern is not None:
        host = _host(headers.get(":authority"))
        if (tenant := tenancy.hosts.get(host)) is not None:
            return Caller(tenant, "host")
        if host_pattern is not None and (match := host_pattern.fullmatch(host)) is not None:
            return Caller(match.group("tenant"), "host")
    if tenancy.header is not None and (named := header_text(headers.get(tenancy.header))) is not None:
        if len(named) > MAX_TENANT or not _TENANT_CHARS.match(named):
            raise openai.bad_request(
                f"The {tenancy.header} header must be 1-{MAX_TENANT} characters of letters, digits and _.-"
            )
        return Caller(named, "header")
    if tenancy.default_tenant is not None:
        return Caller(tenancy.default_tenant, "default")
    source = " or ".join(
        (["a valid JWT"] if jwt else [])
        + ([f"the {tenancy.header} header"] if tenancy.header else [])
        + (["a known API key"] if tenancy.api_keys or tenancy.key_store else [])
        + (["a tenant's host name"] if tenancy.hosts or host_pattern is not None else [])
    )
    raise openai.no_tenant(tenancy.reject_status, f"This gateway needs to know who is calling: send {source}.")


def _host(authority: bytes | None) -> str:
    """The host of an :authority, lower-case, without its port (IPv6 literals never name tenants)."""
    if not authority:
        return ""
    text = authority.decode("latin-1").lower()
    return text.rsplit(":", 1)[0] if ":" in text and not text.startswith("[") else text
