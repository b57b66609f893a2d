"""Which models and MCP tools a caller may use: the tenant's grants, narrowed by the
caller's own (a key's or a token's grants; see `tenancy.Caller`).

Compiled once per config: each list of globs becomes one regex, so a check is a dict
lookup and one match whatever the number of globs. Matching is case-sensitive, over the
names clients use: the client's model name (before any override) and the prefixed MCP
tool name `<server>__<tool>`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Final

from extproc.config import Authorization, TenantGrants
from extproc.schemas import openai
from extproc.schemas.openai import RequestError
from extproc.tenancy import Caller

ANY_TENANT: Final = "*"


def compile_globs(globs: list[str] | tuple[str, ...] | None) -> re.Pattern[str] | None:
    """One regex matching any of `globs`; None (no list) matches everything."""
    if globs is None:
        return None
    if not globs:
        return re.compile(r"(?!)")  # an empty list allows nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs))


def _allows(pattern: re.Pattern[str] | None, name: str) -> bool:
    return pattern is None or pattern.match(name) is not None


@dataclass(frozen=True, slots=True)
class _Grants:
    models: re.Pattern[str] | None
    tools: re.Pattern[str] | None


_NOTHING = _Grants(re.compile(r"(?!)"), re.compile(r"(?!)"))


class Policy:
    """The compiled `authorization` section."""

    __slots__ = ("_tenants", "_any", "_own")

    def __init__(self, settings: Authorization) -> None:
        self._tenants = {name: _compiled(grants) for name, grants in settings.tenants.items() if name != ANY_TENANT}
        wildcard = settings.tenants.get(ANY_TENANT)
        self._any = _compiled(wildcard) if wildcard is not None else _NOTHING
        self._own: dict[tuple[str, ...], re.Pattern[str] | None] = {}  # callers' own globs, compiled once

    def _grants(self, tenant: str) -> _Grants:
        return self._tenants.get(tenant, self._any)

    def _own_pattern(self, globs: tuple[str, ...] | None) -> re.Pattern[str] | None:
        if globs is None:
            return None
        pattern = self._own.get(globs)
        if pattern is None and globs not in self._own:
            if len(self._own) >= 4096:  # bounded: grants come from keys and tokens
                self._own.clear()
            pattern = self._own[globs] = compile_globs(globs)
        return pattern

    def allows_model(self, caller: Caller, model: str) -> bool:
        return _allows(self._grants(caller.tenant).models, model) and _allows(self._own_pattern(caller.models), model)

    def allows_tool(self, tenant: str | None, own_tools: tuple[str, ...] | None, tool: str) -> bool:
        """`tenant` None: the caller is unknown (the request stage did not name it): nothing."""
        if tenant is None:
            return False
        return _allows(self._grants(tenant).tools, tool) and _allows(self._own_pattern(own_tools), tool)

    def models_for(self, caller: Caller, models: tuple[str, ...]) -> tuple[str, ...]:
        """The listed models this caller may use, in the listing's order."""
        return tuple(model for model in models if self.allows_model(caller, model))


def _compiled(grants: TenantGrants) -> _Grants:
    return _Grants(compile_globs(grants.models), compile_globs(grants.tools))


def model_refused(model: str) -> RequestError:
    """403 naming the model, not the policy (the Anthropic shape maps it to permission_error)."""
    return RequestError(403, f"You are not allowed to use the model `{model}`.", "permission_error",
                        "model_not_allowed", "model")


def models_body(policy: Policy | None, caller: Caller | None, models: tuple[str, ...], everything: bytes) -> bytes:
    """GET /v1/models for this caller: only the models it may use."""
    if policy is None or caller is None:
        return everything
    return openai.models_list(policy.models_for(caller, models))
