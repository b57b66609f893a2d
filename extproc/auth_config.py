"""The `auth` config section: who may call, proven by Envoy before the processor sees a request.

JWT providers become Envoy's `jwt_authn` filter (extproc/jwt_authn.py): Envoy checks the
signature, issuer, audience and lifetime, and hands the processor the verified payload
as metadata; the processor only reads the claim that names the tenant.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from extproc.config_base import StrictModel, first_repeat

PROVIDER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
_CLAIM_PATH = re.compile(r"^[A-Za-z0-9_:/-]+(\.[A-Za-z0-9_:/-]+){0,7}$")


class JwtProvider(StrictModel):
    """One token issuer: where its keys are, which tokens it may sign, which claim names the tenant."""

    name: Annotated[str, Field(pattern=PROVIDER_NAME)]
    issuer: str = Field(min_length=1, description="the tokens' `iss` claim, exactly")
    audiences: list[str] = Field(
        default_factory=list, description="accepted `aud` values (any one); empty = any audience"
    )
    jwks_file: Path | None = Field(default=None, description="a JWKS file, read when Envoy starts")
    jwks_uri: str | None = Field(default=None, description="an http(s) URL Envoy fetches the JWKS from")
    cache_seconds: int = Field(
        default=300, ge=1, le=86_400, description="jwks_uri: how long Envoy keeps the keys before fetching again"
    )
    tenant_claim: str = Field(
        default="sub", description="the claim naming the tenant; a dotted path for a nested claim (org.id)"
    )

    models_claim: str | None = Field(
        default=None, description="a claim listing model globs the token is limited to (within its tenant's grants)"
    )
    tools_claim: str | None = Field(
        default=None, description="a claim listing MCP tool globs the token is limited to (within its tenant's grants)"
    )

    @field_validator("tenant_claim", "models_claim", "tools_claim")
    @classmethod
    def _claim_path(cls, value: str | None) -> str | None:
        if value is not None and not _CLAIM_PATH.match(value):
            raise ValueError("a claim name, or up to 8 names joined by dots for a nested claim (e.g. org.id)")
        return value

    @field_validator("jwks_uri")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/?#\s]+(/\S*)?$", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("jwks_file")
    @classmethod
    def _readable_jwks(cls, value: Path | None) -> Path | None:
        """Envoy refuses to start on a bad local JWKS; say which file and why, earlier."""
        if value is None:
            return None
        path = value.expanduser().absolute()
        try:
            keys = json.loads(path.read_text(encoding="utf-8")).get("keys")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise ValueError(f"cannot read a JWKS from {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if not isinstance(keys, list) or not keys:
            raise ValueError(f"{path} has no 'keys' list: a JWKS holds the issuer's public keys")
        return path

    @model_validator(mode="after")
    def _one_jwks(self) -> JwtProvider:
        if (self.jwks_file is None) == (self.jwks_uri is None):
            raise ValueError("set exactly one of 'jwks_file' or 'jwks_uri'")
        return self


class JwtSettings(StrictModel):
    """Bearer JWTs (`Authorization: Bearer <token>`) checked by Envoy's jwt_authn filter."""

    providers: list[JwtProvider] = Field(min_length=1)
    required: bool = Field(
        default=True,
        description="true: a request without a valid token is refused (401). false: a request without a "
        "token, or whose bearer credential is not a JWT (an API key), falls back to the other tenant sources",
    )

    @model_validator(mode="after")
    def _unique(self) -> JwtSettings:
        if repeat := first_repeat([p.name for p in self.providers]):
            raise ValueError(f"duplicate provider name {repeat[1]!r}")
        if repeat := first_repeat([p.issuer for p in self.providers]):
            raise ValueError(f"two providers share the issuer {repeat[1]!r}; one provider per issuer")
        return self


class Auth(StrictModel):
    """How callers prove who they are."""

    jwt: JwtSettings | None = None
