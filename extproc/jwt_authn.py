"""Bearer JWTs, verified by Envoy's jwt_authn filter; the processor reads the verified claims.

Envoy does the cryptography (signature, `alg`, issuer, audience, lifetime, JWKS fetching
and caching) before ext_proc runs, strips the token (`forward: false`) and puts each
verified payload in its own metadata namespace, which the request stage's ext_proc
filter forwards to the processor. The tenant therefore comes from a payload Envoy
verified, never from anything a client can write itself.

With `required: false` Envoy lets failed tokens through too (an API key in
`Authorization: Bearer` is not a JWT) and records the failure in metadata; the processor
refuses a request that carried a JWT-shaped bearer token Envoy did not verify, and lets
the other tenant sources decide for everything else.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf import struct_pb2

from extproc.auth_config import JwtProvider, JwtSettings

NAMESPACE = "envoy.filters.http.jwt_authn"  # Envoy's metadata namespace for the verified payloads
FILTER_NAME = "envoy.filters.http.jwt_authn"
DETAILS_PREFIX = "jwt_authn_access_denied"  # response code details of the filter's 401/403
_JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
FAILED_SUFFIX = ".failed"  # metadata key of a provider's failure status: "<name>.failed"


def jwks_cluster_name(provider: str) -> str:
    return f"jwks-{provider}"


def _provider(provider: JwtProvider) -> dict[str, Any]:
    out: dict[str, Any] = {"issuer": provider.issuer, "require_expiration": True}  # no token lives forever
    if provider.audiences:
        out["audiences"] = list(provider.audiences)
    if provider.jwks_file is not None:
        out["local_jwks"] = {"filename": str(provider.jwks_file)}
    else:
        out["remote_jwks"] = {
            "http_uri": {"uri": provider.jwks_uri, "cluster": jwks_cluster_name(provider.name), "timeout": "5s"},
            "cache_duration": f"{provider.cache_seconds}s",
            # Fetched when Envoy starts and again whenever the cache expires, in the
            # background: no request waits for it, and rotated keys are picked up.
            "async_fetch": {"failed_refetch_duration": "1s"},
            "retry_policy": {"num_retries": 2},
        }
    # Where SDKs put a credential: the openai SDK's Authorization: Bearer, the anthropic
    # SDK's x-api-key. Never a query parameter (Envoy's default): the access log has paths.
    out["from_headers"] = [{"name": "authorization", "value_prefix": "Bearer "}, {"name": "x-api-key"}]
    out["forward"] = False  # the token stops at Envoy: no backend, no MCP server sees it
    out["payload_in_metadata"] = provider.name
    out["failed_status_in_metadata"] = provider.name + FAILED_SUFFIX
    return out


def http_filter(settings: JwtSettings) -> dict[str, Any]:
    """The jwt_authn filter, placed before the request stage's ext_proc filter."""
    requirements: list[dict[str, Any]] = [{"provider_name": p.name} for p in settings.providers]
    if not settings.required:
        requirements.append({"allow_missing_or_failed": {}})
    requires = requirements[0] if len(requirements) == 1 else {"requires_any": {"requirements": requirements}}
    return {
        "name": FILTER_NAME,
        "typed_config": {
            "@type": _JWT_AUTHN,
            "providers": {p.name: _provider(p) for p in settings.providers},
            "rules": [{"match": {"prefix": "/"}, "requires": requires}],
        },
    }


def needs_cluster(provider: JwtProvider) -> bool:
    return provider.jwks_uri is not None


@dataclass(frozen=True, slots=True)
class Verified:
    """What the processor learned from Envoy's jwt_authn metadata for one request."""

    provider: str | None  # the provider whose token Envoy verified, or None
    tenant: str | None  # the tenant claim's text, when the verified token had one
    claim: str  # the tenant claim's name (for messages)
    failure: str | None  # Envoy's reason for refusing a token (required: false only)
    required: bool  # auth.jwt.required: no verified token means no entry
    models: tuple[str, ...] | None = None  # the token's own grants (models_claim / tools_claim), if any
    tools: tuple[str, ...] | None = None


ClaimPath = tuple[str, ...]
GrantPaths = tuple[ClaimPath | None, ClaimPath | None]  # a provider's models_claim and tools_claim paths


def read(
    metadata: struct_pb2.Struct | None, claims: dict[str, ClaimPath], required: bool,
    grants: dict[str, GrantPaths] | None = None,
) -> Verified:
    """The verified payload's tenant claim from Envoy's metadata, or Envoy's failure.

    `claims`: each provider's tenant claim path; `grants`: its grant claims' paths. Only
    those claims are read: the payload itself is never copied, logged or kept."""
    failure = None
    if metadata is not None:
        for name, value in metadata.fields.items():
            if name.endswith(FAILED_SUFFIX):
                message = value.struct_value.fields.get("message")
                failure = failure or (message.string_value if message is not None else None)
                continue
            path = claims.get(name)
            if path is None or value.WhichOneof("kind") != "struct_value":
                continue
            models, tools = (grants or {}).get(name, (None, None))
            payload = value.struct_value
            return Verified(name, _claim(payload, path), ".".join(path), None, required,
                            _globs(payload, models), _globs(payload, tools))
    return Verified(None, None, "", failure, required)


def _node(payload: struct_pb2.Struct, path: ClaimPath) -> struct_pb2.Value | None:
    node: struct_pb2.Value | None = None
    fields = payload.fields
    for key in path:
        node = fields.get(key)
        if node is None:
            return None
        fields = node.struct_value.fields
    return node


def _globs(payload: struct_pb2.Struct, path: ClaimPath | None) -> tuple[str, ...] | None:
    """A grant claim: a list of globs, or a space-separated (scope-style) string. Absent: the
    tenant's grants apply (they bound every caller anyway); malformed: nothing (fail closed)."""
    if path is None:
        return None
    node = _node(payload, path)
    if node is None:
        return None
    kind = node.WhichOneof("kind")
    if kind == "string_value":
        return tuple(node.string_value.split())
    if kind == "list_value":
        return tuple(v.string_value for v in node.list_value.values if v.WhichOneof("kind") == "string_value")
    return ()


def _claim(payload: struct_pb2.Struct, path: ClaimPath) -> str | None:
    """A claim's text: a string, an integer, or the first of a list of them (e.g. groups)."""
    node = _node(payload, path)
    if node is None:
        return None
    if node.WhichOneof("kind") == "list_value" and node.list_value.values:
        node = node.list_value.values[0]
    kind = node.WhichOneof("kind")
    if kind == "string_value":
        return node.string_value
    if kind == "number_value" and node.number_value.is_integer():
        return str(int(node.number_value))
    return None


def looks_like_jwt(token: str) -> bool:
    """A compact JWS: three dot-separated parts, the first a JSON object (its header).
    An opaque API key is not one, and goes on to the key lookups."""
    head, dot, rest = token.partition(".")
    if not dot or rest.count(".") != 1 or len(head) > 4096:
        return False
    try:
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(header, dict)


def claim_paths(settings: JwtSettings | None) -> dict[str, ClaimPath]:
    if settings is None:
        return {}
    return {p.name: tuple(p.tenant_claim.split(".")) for p in settings.providers}


def grant_paths(settings: JwtSettings | None) -> dict[str, GrantPaths]:
    """Each provider's models_claim and tools_claim paths (only providers that set one)."""
    if settings is None:
        return {}
    return {
        p.name: (_split(p.models_claim), _split(p.tools_claim))
        for p in settings.providers if p.models_claim is not None or p.tools_claim is not None
    }


def _split(claim: str | None) -> ClaimPath | None:
    return tuple(claim.split(".")) if claim is not None else None

