"""Who calls, and so who pays: the tenant a request's budgets and metadata are charged to.

Precedence, strongest proof first: a JWT Envoy verified (its tenant claim) > a known
client API key (`tenancy.api_keys`) > the tenant header > `tenancy.default_tenant`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from extproc.config import Tenancy, key_digest
from extproc.jwt_authn import Verified, looks_like_jwt
from extproc.request_headers import client_api_key, header_text
from extproc.schemas import openai

MAX_TENANT = 128
_TENANT_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A verified claim is the issuer's word, not a client's: wider (e-mail subjects, "auth0|id"),
# but still one bounded printable word, as it becomes a metric label and a rate-limit key.
_CLAIM_CHARS = re.compile(r"^[^\s\x00-\x1f\x7f]{1,128}$")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from, and how the gateway knows."""

    tenant: str
    via: Literal["jwt", "key", "host", "header", "default"]
    models: tuple[str, ...] | None = None  # the credential's own grants; None = the tenant's policy
    tools: tuple[str, ...] | None = None


def tenant_of(
    headers: dict[str, bytes], tenancy: Tenancy | None, tenant_keys: Mapping[str, str], token: Verified | None = None
) -> Caller | None:
    """A verified JWT first, then a known client API key (it proves identity), then the
    tenant header, then the default; with none of them the request is refused
    (`tenancy.reject_status`). None: no tenancy configured and no token to name one.

    `tenant_keys`: tenant by the SHA-256 digest of each known client key. `token`: what
    Envoy's jwt_authn filter verified (None when no JWT provider is configured)."""
    key = client_api_key(headers)
    if token is not None and (caller := _token_caller(token, key)) is not None:
        return caller
    if tenancy is None:
        return None
    if key and (tenant := tenant_keys.get(key_digest(key))) is not None:
        return Caller(tenant, "key")
    if tenancy.header is not None and (named := header_text(headers.get(tenancy.header))) is not None:
        if len(named) > MAX_TENANT or not _TENANT_CHARS.match(named):
            raise openai.bad_request(
                f"The {tenancy.header} header must be 1-{MAX_TENANT} characters of letters, digits and _.-"
            )
        return Caller(named, "header")
    if tenancy.default_tenant is not None:
        return Caller(tenancy.default_tenant, "default")
    source = " or ".join(
        (["a valid JWT"] if token is not None else [])
        + ([f"the {tenancy.header} header"] if tenancy.header else [])
        + (["a known API key"] if tenancy.api_keys else [])
    )
    raise openai.no_tenant(tenancy.reject_status, f"This gateway needs to know who is calling: send {source}.")


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
        return Caller(token.tenant, "jwt")
    if bearer is not None and looks_like_jwt(bearer):
        reason = token.failure or "it is not valid here"
        raise openai.no_tenant(401, f"The gateway did not accept the request's bearer token: {reason}.")
    if token.required:
        raise openai.no_tenant(401, "This gateway needs a valid JWT in Authorization: Bearer.")
    return None
