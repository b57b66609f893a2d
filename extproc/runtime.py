"""What every exchange shares: the compiled config, built once per (re)load."""

from __future__ import annotations

import re
from dataclasses import dataclass

from extproc.authorization import Policy
from extproc.budgets import charges, reserves
from extproc.config import Budget, LoadedConfig, Tenancy
from extproc.jwt_authn import GrantPaths, claim_paths, grant_paths
from extproc.keys import KeyStore
from extproc.routing import Router
from extproc.schemas import openai
from extproc.tenancy import Caller, host_matcher, key_callers
from extproc.usage import CostKey, compile_cel


@dataclass(frozen=True, slots=True)
class Runtime:
    """An immutable snapshot: a reload builds a new one; in-flight exchanges keep theirs."""

    loaded: LoadedConfig
    router: Router
    max_request_body_bytes: int
    models_body: bytes
    costs: tuple[CostKey, ...]
    session_id_header: str
    tenancy: Tenancy | None
    tenant_keys: dict[str, Caller]  # by the SHA-256 digest of each known client key
    reserve_budgets: tuple[Budget, ...]
    charges: tuple[tuple[str, str], ...]  # (cost key, charge key) budgets charge after the response
    request_limited: bool  # request_limits exist: Envoy's local filter may answer 429 itself
    force_stream_usage: bool
    estimate_when_missing: bool
    max_response_bytes: int
    mcp_paths: frozenset[str] = frozenset()  # client paths of MCP routes (served by the MCP gateway)
    key_store: KeyStore | None = None  # outlives reloads: the server keeps it while its settings stay
    authorization: Policy | None = None  # None: every caller may use everything
    host_pattern: re.Pattern[str] | None = None  # tenancy.host_pattern, compiled
    # Headers in which clients may send their own provider keys (backends' client_key_header):
    # read once at the request headers, removed before any backend.
    client_key_headers: frozenset[str] = frozenset()
    jwt_claims: dict[str, tuple[str, ...]] | None = None  # auth.jwt: each provider's tenant claim path
    jwt_required: bool = True
    jwt_grants: dict[str, GrantPaths] | None = None  # auth.jwt: providers' models_claim / tools_claim paths

    @classmethod
    def build(cls, loaded: LoadedConfig, key_store: KeyStore | None = None) -> Runtime:
        """`key_store`: the running store to keep; None opens the config's (a file is read now)."""
        config = loaded.config
        if key_store is None and config.tenancy is not None and config.tenancy.key_store is not None:
            from extproc.keys import open_key_store

            key_store = open_key_store(config.tenancy.key_store)
        router = Router(config, loaded.secrets)
        return cls(
            loaded=loaded,
            router=router,
            max_request_body_bytes=config.limits.max_request_body_bytes,
            models_body=openai.models_list(router.listed_models),
            costs=tuple(
                CostKey(c.metadata_key, c.type, compile_cel(c.cel) if c.cel else None) for c in config.costs
            ),
            session_id_header=config.metadata.session_id_header,
            tenancy=config.tenancy,
            tenant_keys=key_callers(loaded.tenant_keys),
            reserve_budgets=tuple(b for b in config.budgets if reserves(config, b)),
            charges=charges(config),
            request_limited=bool(config.request_limits),
            force_stream_usage=config.usage.force_stream_usage,
            estimate_when_missing=config.usage.estimate_when_missing,
            max_response_bytes=config.usage.max_response_bytes,
            mcp_paths=frozenset(r.path for r in config.mcp.routes) if config.mcp is not None else frozenset(),
            key_store=key_store,
            authorization=Policy(config.authorization) if config.authorization is not None else None,
            host_pattern=host_matcher(config.tenancy) if config.tenancy is not None else None,
            client_key_headers=frozenset(b.client_key_header for b in config.backends if b.client_key_header),
            jwt_claims=claim_paths(config.auth.jwt) if config.auth.jwt is not None else None,
            jwt_required=config.auth.jwt is None or config.auth.jwt.required,
            jwt_grants=grant_paths(config.auth.jwt) or None,
        )
