"""Token budgets and request limits, rendered for Envoy and for the rate limit service.

One budget becomes (a) rate-limit actions in Envoy's global rate-limit filter: a
check before the request goes upstream (addend 0: admit or 429, charge nothing) and a
charge after the response (`apply_on_stream_done`, addend = the cost from dynamic
metadata), and (b) a rule in the envoyproxy/ratelimit descriptor format, so the
bundled service and envoyproxy/ratelimit read the same file.
"""

from __future__ import annotations

from typing import Any

from extproc.config import Budget, GatewayConfig, RequestLimit
from extproc.contract import METADATA_NAMESPACE, Meta

TENANT_KEY = Meta.TENANT  # also the descriptor key
MCP_TOOL_KEY = Meta.MCP_TOOL_NAME
RESERVE_KEY = Meta.RESERVE
UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
SETTLE_REFUND = ("settle", "refund")  # descriptor entry the bundled service reads as "give back"


def charge_key(cost: str) -> str:
    """Metadata key Envoy charges a budget from after the response: the processor sets it on
    every request it sees to the end (0 when nothing is owed: an error, a refusal, another
    kind of request), because a charge whose metadata is missing makes Envoy log a warning
    ("Invalid hits_addend") per request, while the reported usage keys stay absent on errors."""
    return f"ratelimit_charge_{cost}"


def charges(config: GatewayConfig) -> tuple[tuple[str, str], ...]:
    """(cost key, its charge key) for each cost budgets charge after the response (reserve
    mode settles its own way); built once per config, not per request."""
    costs = dict.fromkeys(b.cost for b in config.budgets if not reserves(config, b))
    return tuple((cost, charge_key(cost)) for cost in costs)


def add_charges(values: dict[str, Any], charged: tuple[tuple[str, str], ...]) -> None:
    """Set every charge key in `values` to its cost there, 0 when the cost is absent."""
    for cost, key in charged:
        values[key] = values.get(cost, 0)


def settle_key(budget: Budget) -> str:
    return f"ratelimit_settle_{budget.name}"


def refund_key(budget: Budget) -> str:
    return f"ratelimit_refund_{budget.name}"


def reserves(config: GatewayConfig, budget: Budget) -> bool:
    """Reserve mode applies to budgets counted in tokens (a reservation is a token estimate)."""
    return config.ratelimit.reserve and budget.cost.startswith("llm_") and budget.cost.endswith("_token")


def _metadata_action(descriptor_key: str, metadata_key: str) -> dict[str, Any]:
    return {
        "metadata": {
            "descriptor_key": descriptor_key,
            "metadata_key": {"key": METADATA_NAMESPACE, "path": [{"key": metadata_key}]},
            "source": "DYNAMIC",
        }
    }


def _addend(metadata_key: str) -> dict[str, Any]:
    return {"format": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{metadata_key})%"}


def _budget_actions(budget: Budget) -> list[dict[str, Any]]:
    actions: list[dict[str, Any]] = [
        {"generic_key": {"descriptor_key": "budget", "descriptor_value": budget.name}},
        _metadata_action(TENANT_KEY, TENANT_KEY),
    ]
    if budget.model is not None:
        actions.append(_metadata_action("model", Meta.REQUEST_MODEL))
    if budget.tool is not None:
        actions.append(_metadata_action("tool", MCP_TOOL_KEY))
    return actions


def envoy_rate_limits(config: GatewayConfig) -> list[dict[str, Any]]:
    """The `rate_limits` of Envoy's global rate-limit filter for every budget."""
    out: list[dict[str, Any]] = []
    for budget in config.budgets:
        actions = _budget_actions(budget)
        if reserves(config, budget):
            # Charge the estimate now (and refuse if it does not fit), settle after.
            out.append({"actions": actions, "hits_addend": _addend(RESERVE_KEY)})
            out.append({"actions": actions, "hits_addend": _addend(settle_key(budget)), "apply_on_stream_done": True})
            refund = [*actions, {"generic_key": {"descriptor_key": SETTLE_REFUND[0], "descriptor_value": SETTLE_REFUND[1]}}]
            out.append({"actions": refund, "hits_addend": _addend(refund_key(budget)), "apply_on_stream_done": True})
        else:
            # Admit while the budget is not spent (addend 0 charges nothing) ...
            out.append({"actions": actions, "hits_addend": {"number": 0}})
            # ... and charge what the response actually cost once it is over.
            out.append({"actions": actions, "hits_addend": _addend(charge_key(budget.cost)), "apply_on_stream_done": True})
    return out


def _rate_limit(unit: str, limit: int) -> dict[str, Any]:
    return {"unit": unit, "requests_per_unit": limit}


def descriptor_config(config: GatewayConfig) -> dict[str, Any]:
    """The rate limit service's rules, in envoyproxy/ratelimit's YAML format."""
    descriptors = []
    for budget in config.budgets:
        tenant: dict[str, Any] = {"key": TENANT_KEY}
        if budget.tenant != "*":
            tenant["value"] = budget.tenant
        if budget.model is not None:
            tenant["descriptors"] = [
                {"key": "model", "value": budget.model, "rate_limit": _rate_limit(budget.unit, budget.limit)}
            ]
        elif budget.tool is not None:
            tenant["descriptors"] = [
                {"key": "tool", "value": budget.tool, "rate_limit": _rate_limit(budget.unit, budget.limit)}
            ]
        else:
            tenant["rate_limit"] = _rate_limit(budget.unit, budget.limit)
        descriptors.append({"key": "budget", "value": budget.name, "descriptors": [tenant]})
    return {"domain": config.ratelimit.domain, "descriptors": descriptors}


def local_rate_limit_descriptors(limits: list[RequestLimit]) -> list[dict[str, Any]]:
    """Token buckets for Envoy's local rate-limit filter: one per tenant ('' = each tenant)."""
    return [
        {
            "entries": [{"key": TENANT_KEY, "value": "" if limit.tenant == "*" else limit.tenant}],
            "token_bucket": {
                "max_tokens": limit.requests,
                "tokens_per_fill": limit.requests,
                "fill_interval": f"{UNIT_SECONDS[limit.unit]}s",
            },
        }
        for limit in limits
    ]
