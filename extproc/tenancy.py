"""Who calls: the tenant its budgets and metadata are charged to, and the caller's own grants.

Precedence, strongest proof first: a known client API key (`tenancy.api_keys`), then the
host name the request was sent to (`tenancy.hosts`, `tenancy.host_pattern`), then the
tenant header, then `default_tenant`; with none of them the request is refused
(`tenancy.reject_status`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from extproc.config import ApiKeyTenant, Tenancy, key_digest
from extproc.request_headers import client_api_key, header_text
from extproc.schemas import openai

MAX_TENANT = 128
_TENANT_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from. `models` / `tools`: globs the caller's own credential is
    limited to (a key's, a token's), within its tenant's grants; None: the tenant's apply."""

    tenant: str
    via: str  # "jwt" | "key" | "host" | "header" | "default"
    models: tuple[str, ...] | None = None
    tools: tuple[str, ...] | None = None


def key_callers(entries: Mapping[str, ApiKeyTenant]) -> dict[str, Caller]:
    """The caller each known key digest stands for, built once per config."""
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


def tenant_of(
    headers: dict[str, bytes], tenancy: Tenancy, tenant_keys: Mapping[str, Caller],
    host_pattern: re.Pattern[str] | None = None,
) -> Caller:
    """The caller of a request (see the module's docstring for the order).

    `tenant_keys`: the caller by the SHA-256 digest of each known client key."""
    key = client_api_key(headers)
    if key and (caller := tenant_keys.get(key_digest(key))) is not None:
        return caller
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
        ([f"the {tenancy.header} header"] if tenancy.header else []) + (["a known API key"] if tenancy.api_keys else [])
        + (["a tenant's host name"] if tenancy.hosts or host_pattern is not None else [])
    )
    raise openai.no_tenant(tenancy.reject_status, f"This gateway needs to know who is calling: send {source}.")


def _host(authority: bytes | None) -> str:
    """The host of an :authority, lower-case, without its port (IPv6 literals never name tenants)."""
    if not authority:
        return ""
    text = authority.decode("latin-1").lower()
    return text.rsplit(":", 1)[0] if ":" in text and not text.startswith("[") else text
