"""Who pays for a request: the tenant its budgets and metadata are charged to."""

from __future__ import annotations

import re
from collections.abc import Mapping

from extproc.config import Tenancy, key_digest
from extproc.request_headers import client_api_key, header_text
from extproc.schemas import openai

MAX_TENANT = 128
_TENANT_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def tenant_of(headers: dict[str, bytes], tenancy: Tenancy, tenant_keys: Mapping[str, str]) -> str:
    """A known client API key first (it proves identity), then the tenant header, then
    the default; with none of them the request is refused (`tenancy.reject_status`).

    `tenant_keys`: tenant by the SHA-256 digest of each known client key."""
    key = client_api_key(headers)
    if key and (tenant := tenant_keys.get(key_digest(key))) is not None:
        return tenant
    if tenancy.header is not None and (named := header_text(headers.get(tenancy.header))) is not None:
        if len(named) > MAX_TENANT or not _TENANT_CHARS.match(named):
            raise openai.bad_request(
                f"The {tenancy.header} header must be 1-{MAX_TENANT} characters of letters, digits and _.-"
            )
        return named
    if tenancy.default_tenant is not None:
        return tenancy.default_tenant
    source = " or ".join(
        ([f"the {tenancy.header} header"] if tenancy.header else []) + (["a known API key"] if tenancy.api_keys else [])
    )
    raise openai.no_tenant(tenancy.reject_status, f"This gateway needs to know who is calling: send {source}.")
