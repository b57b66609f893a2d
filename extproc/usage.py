"""Token usage and the costs derived from it.

Costs are what Envoy's rate-limit filters charge: each configured cost key becomes a
dynamic-metadata number at the end of the response. CEL expressions are compiled
once, when the config is loaded, so a typo is a start-up error, not a silent zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from extproc.contract import TOKEN_KEYS, Meta

if TYPE_CHECKING:
    import cel

log = logging.getLogger(__name__)

# Variables a CEL cost expression may use.
CEL_VARIABLES = frozenset(
    {"model", "backend", "route", "input_tokens", "cached_input_tokens", "output_tokens", "total_tokens",
     "reasoning_tokens"}
)

BUILTIN_KEYS = TOKEN_KEYS  # the token counts' metadata keys: costs and budgets may charge them


@dataclass(slots=True)
class TokenUsage:
    """What one request consumed, as the provider reported it (or as estimated)."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int | None = None  # only providers that report it
    reasoning_tokens: int = 0
    estimated: bool = False

    def metadata(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            Meta.INPUT_TOKENS: self.input_tokens,
            Meta.OUTPUT_TOKENS: self.output_tokens,
            Meta.TOTAL_TOKENS: self.total_tokens,
            Meta.CACHED_INPUT_TOKENS: self.cached_input_tokens,
            Meta.REASONING_TOKENS: self.reasoning_tokens,
        }
        if self.cache_creation_input_tokens is not None:
            values[Meta.CACHE_CREATION_INPUT_TOKENS] = self.cache_creation_input_tokens
        if self.estimated:
            values[Meta.USAGE_ESTIMATED] = True
        return values


class CostType(str, Enum):
    input_token = "input_token"
    output_token = "output_token"
    total_token = "total_token"
    cached_input_token = "cached_input_token"
    reasoning_token = "reasoning_token"
    cel = "cel"


_SAMPLE_CONTEXT = {name: 1 for name in CEL_VARIABLES} | {"model": "m", "backend": "b", "route": "r"}


@lru_cache(maxsize=256)
def compile_cel(expression: str) -> cel.Program:
    """Compile a cost expression, rejecting unknown variables (raises ValueError)."""
    import cel  # ~30 MB resident: loaded only by configs that use CEL costs

    try:
        program = cel.compile(expression)
    except ValueError as exc:
        raise ValueError(f"invalid CEL expression: {exc}") from None
    # variables() also lists the loop variables of macros such as filter/map/exists, so an
    # identifier outside the known set is only an error if evaluation says it is undefined.
    unknown = sorted(set(program.variables()) - CEL_VARIABLES)
    if unknown:
        try:
            program.execute(_SAMPLE_CONTEXT)
        except RuntimeError as exc:
            if "Undefined variable" in str(exc):
                raise ValueError(
                    f"CEL expression uses unknown variable(s) {', '.join(unknown)}; "
                    f"available: {', '.join(sorted(CEL_VARIABLES))}"
                ) from None
        except Exception:  # noqa: S110 - other failures depend on the numbers, not the names
            pass
    return program


@dataclass(frozen=True, slots=True)
class CostKey:
    """One configured cost: a metadata key and how its value is computed."""

    metadata_key: str
    type: CostType
    program: "cel.Program | None" = None

    def value(self, usage: TokenUsage, context: dict[str, Any]) -> float | int | None:
        if self.type is CostType.input_token:
            return usage.input_tokens
        if self.type is CostType.output_token:
            return usage.output_tokens
        if self.type is CostType.total_token:
            return usage.total_tokens
        if self.type is CostType.cached_input_token:
            return usage.cached_input_tokens
        if self.type is CostType.reasoning_token:
            return usage.reasoning_tokens
        assert self.program is not None
        try:
            result = self.program.execute(context)
        except Exception as exc:  # e.g. division by zero for this request's numbers
            log.warning("cost %s not computed: %s", self.metadata_key, exc)
            return None
        if isinstance(result, bool) or not isinstance(result, int | float):
            log.warning("cost %s is not a number (%r); skipped", self.metadata_key, type(result).__name__)
            return None
        return result


def cel_context(usage: TokenUsage, model: str, backend: str, route: str) -> dict[str, Any]:
    return {
        "model": model,
        "backend": backend,
        "route": route,
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
    }


def cost_metadata(
    costs: tuple[CostKey, ...], usage: TokenUsage, model: str, backend: str, route: str
) -> dict[str, Any]:
    """The configured costs for one request, ready to merge into dynamic metadata."""
    if not costs:
        return {}
    context = cel_context(usage, model, backend, route) if any(c.program for c in costs) else {}
    out: dict[str, Any] = {}
    for cost in costs:
        value = cost.value(usage, context)
        if value is not None:
            out[cost.metadata_key] = value
    return out
