"""What every exchange shares: the compiled config, built once per (re)load."""

from __future__ import annotations

from dataclasses import dataclass

from extproc.budgets import charges, reserves
from extproc.config import Budget, LoadedConfig, Tenancy
from extproc.jwt_authn import claim_paths
from extproc.routing import Router
from extproc.schemas import openai
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
    tenant_keys: dict[str, str]
    reserve_budgets: tuple[Budget, ...]
    charges: tuple[tuple[str, str], ...]  # (cost key, charge key) budgets charge after the response
    request_limited: bool  # request_limits exist: Envoy's local filter may answer 429 itself
    force_stream_usage: bool
    estimate_when_missing: bool
    max_response_bytes: int
    mcp_paths: frozenset[str] = frozenset()  # client paths of MCP routes (served by the MCP gateway)
    jwt_claims: dict[str, tuple[str, ...]] | None = None  # auth.jwt: each provider's tenant claim path
    jwt_required: bool = True

    @classmethod
    def build(cls, loaded: LoadedConfig) -> Runtime:
        config = loaded.config
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
            tenant_keys=loaded.tenant_keys,
            reserve_budgets=tuple(b for b in config.budgets if reserves(config, b)),
            charges=charges(config),
            request_limited=bool(config.request_limits),
            force_stream_usage=config.usage.force_stream_usage,
            estimate_when_missing=config.usage.estimate_when_missing,
            max_response_bytes=config.usage.max_response_bytes,
            mcp_paths=frozenset(r.path for r in config.mcp.routes) if config.mcp is not None else frozenset(),
            jwt_claims=claim_paths(config.auth.jwt) if config.auth.jwt is not None else None,
            jwt_required=config.auth.jwt is None or config.auth.jwt.required,
        )
