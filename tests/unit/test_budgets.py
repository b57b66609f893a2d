"""Budgets rendered for Envoy and for the rate limit service agree with each other."""

from __future__ import annotations

from typing import Any

import pytest

from extproc import budgets
from extproc.config import ConfigError, parse_config
from extproc.ratelimit import load_rules

BASE: dict[str, Any] = {
    "backends": [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}],
    "routes": [{"name": "r", "default": True, "backends": [{"name": "a"}]}],
    "tenancy": {"header": "x-tenant-id"},
    "costs": [{"metadata_key": "micro_usd", "type": "cel", "cel": "double(total_tokens) * 2.0"}],
}


def config(**extra: Any):  # type: ignore[no-untyped-def]
    return parse_config({**BASE, **extra}, "gw.yaml")


def _descriptor(rate_limit: dict[str, Any], tenant: str, model: str) -> list[tuple[str, str]]:
    """The entries Envoy would send for one `rate_limits` item (its actions, resolved)."""
    entries = []
    for action in rate_limit["actions"]:
        if "generic_key" in action:
            entries.append((action["generic_key"]["descriptor_key"], action["generic_key"]["descriptor_value"]))
        else:
            key = action["metadata"]["descriptor_key"]
            entries.append((key, tenant if key == "tenant" else model))
    return entries


def test_each_tenant_budget_checks_then_charges_the_actual_cost() -> None:
    cfg = config(budgets=[{"name": "tpm", "unit": "minute", "limit": 1000}])
    check, charge = budgets.envoy_rate_limits(cfg)
    assert check["hits_addend"] == {"number": 0} and "apply_on_stream_done" not in check
    assert charge["apply_on_stream_done"] is True
    assert charge["hits_addend"] == {"format": "%DYNAMIC_METADATA(io.envoy.ai_gateway:ratelimit_charge_llm_total_token)%"}
    rules = load_rules(budgets.descriptor_config(cfg))
    for tenant in ("team-a", "team-b"):
        rule = rules.match(_descriptor(check, tenant, "gpt-4o"))
        assert rule is not None and (rule.unit, rule.requests_per_unit) == ("minute", 1000)
    assert rules.match(_descriptor(check, "team-a", "m")).key(_descriptor(check, "team-a", "m")) != rules.match(
        _descriptor(check, "team-b", "m")
    ).key(_descriptor(check, "team-b", "m"))


def test_tenant_and_model_specific_budget_charging_a_cost_key() -> None:
    cfg = config(budgets=[{"name": "gold", "tenant": "gold", "model": "gpt-4o", "unit": "day", "limit": 5,
                           "cost": "micro_usd"}])
    check, charge = budgets.envoy_rate_limits(cfg)
    assert charge["hits_addend"]["format"].endswith(":ratelimit_charge_micro_usd)%")
    rules = load_rules(budgets.descriptor_config(cfg))
    assert rules.match(_descriptor(check, "gold", "gpt-4o")) is not None
    assert rules.match(_descriptor(check, "gold", "other-model")) is None  # not this budget's model
    assert rules.match(_descriptor(check, "silver", "gpt-4o")) is None  # not this budget's tenant


def test_reserve_mode_charges_up_front_and_settles_both_ways() -> None:
    cfg = config(budgets=[{"name": "tpm", "unit": "minute", "limit": 1000}], ratelimit={"reserve": True})
    reserve, settle, refund = budgets.envoy_rate_limits(cfg)
    assert reserve["hits_addend"]["format"].endswith(f":{budgets.RESERVE_KEY})%")
    assert "apply_on_stream_done" not in reserve
    assert settle["apply_on_stream_done"] and refund["apply_on_stream_done"]
    assert refund["actions"][-1] == {"generic_key": {"descriptor_key": "settle", "descriptor_value": "refund"}}
    budget = cfg.budgets[0]
    assert settle["hits_addend"]["format"].endswith(f":{budgets.settle_key(budget)})%")
    assert refund["hits_addend"]["format"].endswith(f":{budgets.refund_key(budget)})%")


def test_reserve_mode_skips_budgets_not_counted_in_tokens() -> None:
    cfg = config(budgets=[{"name": "usd", "unit": "day", "limit": 9, "cost": "micro_usd"}], ratelimit={"reserve": True})
    assert len(budgets.envoy_rate_limits(cfg)) == 2  # check + charge, no reservation


def test_local_request_limits_one_bucket_per_tenant() -> None:
    cfg = config(request_limits=[{"unit": "minute", "requests": 60}, {"tenant": "gold", "unit": "second", "requests": 5}])
    each, gold = budgets.local_rate_limit_descriptors(cfg.request_limits)
    assert each["entries"] == [{"key": "tenant", "value": ""}]  # "" = each distinct tenant its own bucket
    assert each["token_bucket"] == {"max_tokens": 60, "tokens_per_fill": 60, "fill_interval": "60s"}
    assert gold["entries"] == [{"key": "tenant", "value": "gold"}]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tenancy": None, "budgets": [{"name": "b", "unit": "hour", "limit": 1}]}, "add a 'tenancy' section"),
        ({"budgets": [{"name": "b", "unit": "hour", "limit": 1, "cost": "nope"}]}, "unknown cost 'nope'"),
        ({"budgets": [{"name": "b", "unit": "week", "limit": 1}]}, "budgets[0].unit"),
        ({"budgets": [{"name": "b", "unit": "hour", "limit": 2**32}]}, "budgets[0].limit"),
        ({"budgets": [{"name": "b", "unit": "hour", "limit": 1}, {"name": "b", "unit": "day", "limit": 1}]},
         "duplicate budget name"),
        ({"tenancy": {"default_tenant": "x"}}, "say where the tenant comes from"),
        ({"ratelimit": {"store": "mysql://x"}}, "ratelimit.store"),
    ],
)
def test_budget_config_errors(extra: dict[str, Any], message: str) -> None:
    data = {**BASE, **extra}
    if data.get("tenancy") is None:
        data.pop("tenancy")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data, "gw.yaml")
