"""Rate limit rules: the envoyproxy/ratelimit YAML format and its matching semantics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from extproc.ratelimit import UNIT_SECONDS, RuleConfigError, RuleSet, load_rules, load_rules_file

EXAMPLE = """
domain: ai-gateway
descriptors:
  - key: budget
    value: tpm
    descriptors:
      - key: tenant
        rate_limit: {unit: minute, requests_per_unit: 100000}
      - key: tenant
        value: team-a
        rate_limit: {unit: hour, requests_per_unit: 5000}
        descriptors:
          - key: model
            value: gpt-4o
            rate_limit: {unit: day, requests_per_unit: 1000}
          - key: model
            value: gpt-*
            rate_limit: {unit: day, requests_per_unit: 2000}
          - key: model
            rate_limit: {unit: day, requests_per_unit: 3000}
      - key: tenant
        value: free
        descriptors:
          - key: model
            rate_limit: {unit: second, requests_per_unit: 1}
      - key: tenant
        value: vip
        rate_limit: {unlimited: true}
      - key: tenant
        value: trial
        shadow_mode: true
        rate_limit: {unit: minute, requests_per_unit: 10}
  - key: user
    rate_limit: {unit: week, requests_per_unit: 7}
"""


@pytest.fixture()
def rules() -> RuleSet:
    return load_rules(yaml.safe_load(EXAMPLE), "example.yaml")


def tpm(*rest: tuple[str, str]) -> list[tuple[str, str]]:
    return [("budget", "tpm"), *rest]


def one_rule(rate_limit: dict[str, Any], **descriptor: Any) -> RuleSet:
    """Rules with a single descriptor `k` (any value) carrying `rate_limit`."""
    return load_rules({"domain": "d", "descriptors": [{"key": "k", "rate_limit": rate_limit, **descriptor}]})


def error_of(data: Any) -> str:
    with pytest.raises(RuleConfigError) as info:
        load_rules(data, "rl.yaml")
    return str(info.value)


# -- matching ------------------------------------------------------------------------------


def test_key_only_node_matches_any_value(rules: RuleSet) -> None:
    """A node without a value is the default for its key: any tenant gets the minute budget."""
    rule = rules.match(tpm(("tenant", "team-z")))
    assert rule is not None
    assert (rule.unit, rule.requests_per_unit, rule.window_seconds) == ("minute", 100000, 60)
    assert rules.domain == "ai-gateway"


def test_specific_value_wins_over_wildcard(rules: RuleSet) -> None:
    rule = rules.match(tpm(("tenant", "team-a")))
    assert rule is not None and (rule.unit, rule.requests_per_unit) == ("hour", 5000)


def test_nested_descriptor_takes_the_limit_of_the_last_entry(rules: RuleSet) -> None:
    """Order at a level: exact value, then wildcard pattern, then key only."""
    exact = rules.match(tpm(("tenant", "team-a"), ("model", "gpt-4o")))
    pattern = rules.match(tpm(("tenant", "team-a"), ("model", "gpt-4o-mini")))
    default = rules.match(tpm(("tenant", "team-a"), ("model", "claude")))
    assert exact is not None and exact.requests_per_unit == 1000
    assert pattern is not None and pattern.requests_per_unit == 2000
    assert default is not None and default.requests_per_unit == 3000


def test_descriptor_deeper_than_the_tree_has_no_limit(rules: RuleSet) -> None:
    """The wildcard tenant node has no children: a model entry below it matches nothing,
    even though the parent node has a limit (envoyproxy/ratelimit only uses the last entry)."""
    assert rules.match(tpm(("tenant", "team-b"), ("model", "gpt-4o"))) is None
    assert rules.match(tpm(("tenant", "team-a"), ("model", "gpt-4o"), ("x", "y"))) is None


def test_final_node_without_rate_limit_has_no_limit(rules: RuleSet) -> None:
    assert rules.match(tpm()) is None  # budget=tpm has only children
    assert rules.match(tpm(("tenant", "free"))) is None  # free has a limit only per model
    free_model = rules.match(tpm(("tenant", "free"), ("model", "x")))
    assert free_model is not None and free_model.unit == "second"


def test_unmatched_first_entry_or_no_entries_has_no_limit(rules: RuleSet) -> None:
    assert rules.match([("budget", "rpm"), ("tenant", "a")]) is None
    assert rules.match([("tenant", "a")]) is None
    assert rules.match([]) is None


def test_entry_order_matters(rules: RuleSet) -> None:
    assert rules.match([("tenant", "team-a"), ("budget", "tpm")]) is None


def test_unlimited_and_shadow_mode_flags(rules: RuleSet) -> None:
    vip = rules.match(tpm(("tenant", "vip")))
    trial = rules.match(tpm(("tenant", "trial")))
    assert vip is not None and vip.unlimited and vip.window_seconds == 0
    assert trial is not None and trial.shadow_mode and not trial.unlimited
    assert trial.path == "descriptors[0].descriptors[4]"


def test_each_value_of_a_wildcard_node_gets_its_own_counter(rules: RuleSet) -> None:
    a = tpm(("tenant", "team-x"))
    b = tpm(("tenant", "team-y"))
    rule_a, rule_b = rules.match(a), rules.match(b)
    assert rule_a is rule_b is not None
    assert rule_a.key(a) != rule_a.key(b)
    assert rule_a.key(a) == rule_a.key(list(a))  # stable
    assert "ai-gateway" in rule_a.key(a) and "team-x" in rule_a.key(a)


def test_counter_keys_cannot_collide_through_separators(rules: RuleSet) -> None:
    rule = rules.match([("user", "x")])
    assert rule is not None
    assert rule.key([("user", "a|b=c")]) != rule.key([("user", "a"), ("b", "c")])


@given(
    st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)), max_size=3),
    st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)), max_size=3),
)
def test_counter_key_is_injective(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> None:
    """Distinct descriptors never share a counter."""
    rule = one_rule({"unit": "second", "requests_per_unit": 1}).match([("k", "v")])
    assert rule is not None
    assert (rule.key(a) == rule.key(b)) == (a == b)


def test_wildcard_patterns_in_the_middle_and_config_order() -> None:
    rules = load_rules(
        {
            "domain": "d",
            "descriptors": [
                {"key": "path", "value": "/v1/*/chat*", "rate_limit": {"unit": "second", "requests_per_unit": 1}},
                {"key": "path", "value": "/v1/*", "rate_limit": {"unit": "second", "requests_per_unit": 2}},
                {"key": "path", "value": "*", "rate_limit": {"unit": "second", "requests_per_unit": 3}},
            ],
        }
    )

    def limit(value: str) -> int | None:
        rule = rules.match([("path", value)])
        return None if rule is None else rule.requests_per_unit

    assert limit("/v1/models/chat/completions") == 1
    assert limit("/v1/embeddings") == 2
    assert limit("/v2/x") == 3
    assert limit("") == 3
    assert limit("/v1/*/chat*") == 1  # the literal value is an exact match


def test_share_threshold_makes_pattern_values_share_one_counter() -> None:
    rules = load_rules(
        {
            "domain": "d",
            "descriptors": [
                {
                    "key": "model",
                    "value": "gpt-*",
                    "share_threshold": True,
                    "rate_limit": {"unit": "minute", "requests_per_unit": 5},
                },
                {"key": "other", "value": "x*", "rate_limit": {"unit": "minute", "requests_per_unit": 5}},
            ],
        }
    )
    a, b = [("model", "gpt-4o")], [("model", "gpt-5")]
    rule_a, rule_b = rules.match(a), rules.match(b)
    assert rule_a is not None and rule_b is not None
    assert rule_a.key(a) == rule_b.key(b)
    c, d = [("other", "x1")], [("other", "x2")]
    rule_c, rule_d = rules.match(c), rules.match(d)
    assert rule_c is not None and rule_d is not None
    assert rule_c.key(c) != rule_d.key(d)  # without share_threshold each value counts alone


# -- units and limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "seconds"),
    [("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400), ("week", 604800), ("month", 2592000),
     ("year", 31536000), ("MINUTE", 60), ("Hour", 3600)],
)
def test_units(unit: str, seconds: int) -> None:
    """Units as envoyproxy/ratelimit defines them (month = 30 days), case-insensitive."""
    rules = one_rule({"unit": unit, "requests_per_unit": 3})
    rule = rules.match([("k", "v")])
    assert rule is not None and rule.window_seconds == seconds == UNIT_SECONDS[rule.unit]


@pytest.mark.parametrize(
    ("rate_limit", "message"),
    [
        ({"unit": "fortnight", "requests_per_unit": 1}, "'fortnight' is not a unit"),
        ({"requests_per_unit": 1}, "missing is not a unit"),
        ({"unit": "minute"}, "requests_per_unit: is required"),
        ({"unit": "minute", "requests_per_unit": -1}, "expected an integer from 0 to 4294967295"),
        ({"unit": "minute", "requests_per_unit": 2**32}, "expected an integer"),
        ({"unit": "minute", "requests_per_unit": "10"}, "expected an integer"),
        ({"unit": "minute", "requests_per_unit": True}, "expected an integer"),
        ({"unlimited": True, "unit": "minute"}, "must not be set when unlimited"),
        ({"unlimited": "yes"}, "expected true or false"),
        ({"unit": "minute", "requests_per_unit": 1, "name": "a", "replaces": [{"name": "a"}]}, "cannot replace itself"),
        ({"unit": "minute", "requests_per_unit": 1, "replaces": [{}]}, "replaces[0].name: is required"),
    ],
)
def test_bad_rate_limit_is_rejected_with_its_path(rate_limit: dict[str, Any], message: str) -> None:
    nested = {"key": "a", "descriptors": [{"key": "b", "rate_limit": rate_limit}]}
    text = error_of({"domain": "d", "descriptors": [nested]})
    assert text.startswith("rl.yaml: descriptors[0].descriptors[0].rate_limit")
    assert message in text


@pytest.mark.parametrize(
    ("data", "path", "field"),
    [
        ({"domain": "d", "descriptor": []}, "rl.yaml: unknown field", "descriptor"),
        ({"domain": "d", "descriptors": [{"key": "a", "ratelimit": {}}]}, "descriptors[0]: unknown field", "ratelimit"),
        (
            {"domain": "d", "descriptors": [{"key": "a", "descriptors": [{"key": "b", "shadow": True}]}]},
            "descriptors[0].descriptors[0]: unknown field",
            "shadow",
        ),
        (
            {"domain": "d", "descriptors": [{"key": "a", "rate_limit": {"unit": "day", "requests_per_units": 1}}]},
            "descriptors[0].rate_limit: unknown field",
            "requests_per_units",
        ),
        (
            {"domain": "d", "descriptors": [{"key": "a", "rate_limit": {"unlimited": True, "replaces": [{"nam": 1}]}}]},
            "descriptors[0].rate_limit.replaces[0]: unknown field",
            "nam",
        ),
    ],
)
def test_unknown_fields_are_rejected_with_their_path(data: dict[str, Any], path: str, field: str) -> None:
    """A misspelt field would silently drop a budget, so it is an error that says where."""
    text = error_of(data)
    assert path in text and repr(field) in text and "allowed:" in text


def test_other_structural_errors() -> None:
    assert "domain: is required" in error_of({"descriptors": []})
    assert "expected a mapping" in error_of(["domain", "d"])
    assert "descriptors[0].key: is required" in error_of({"domain": "d", "descriptors": [{"value": "x"}]})
    assert "duplicate descriptor 'k=v'" in error_of(
        {"domain": "d", "descriptors": [{"key": "k", "value": "v"}, {"key": "k", "value": "v"}]}
    )
    assert "duplicate descriptor 'k'" in error_of({"domain": "d", "descriptors": [{"key": "k"}, {"key": "k"}]})
    assert "share_threshold: only applies to a wildcard" in error_of(
        {"domain": "d", "descriptors": [{"key": "k", "value": "v", "share_threshold": True}]}
    )
    bad_value = {"domain": "d", "descriptors": [{"key": "k", "value": [1]}]}
    assert "descriptors[0].value: expected a string" in error_of(bad_value)
    assert "descriptors: expected a list" in error_of({"domain": "d", "descriptors": {"key": "k"}})


def test_accepts_every_envoyproxy_ratelimit_field() -> None:
    """Configs written for envoyproxy/ratelimit load unchanged (metadata, detailed_metric, ...)."""
    rules = load_rules(
        {
            "domain": "d",
            "descriptors": [
                {
                    "key": "k",
                    "value": 42,  # YAML ints are values too
                    "shadow_mode": False,
                    "quota_mode": True,
                    "detailed_metric": True,
                    "value_to_metric": True,
                    "metadata": {"team": {"name": "x"}},
                    "rate_limit": {"unit": "minute", "requests_per_unit": 0, "name": "n", "replaces": [{"name": "m"}]},
                }
            ],
        }
    )
    rule = rules.match([("k", "42")])
    assert rule is not None
    assert (rule.quota_mode, rule.name, rule.replaces, rule.requests_per_unit) == (True, "n", ("m",), 0)
    assert rule.metadata == {"team": {"name": "x"}}


def test_load_rules_file(tmp_path: Path) -> None:
    path = tmp_path / "ratelimit.yaml"
    path.write_text(EXAMPLE)
    rules = load_rules_file(path)
    assert rules.domain == "ai-gateway" and rules.source == str(path)
    assert len(rules.rules()) == 9

    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: [unclosed\n")
    with pytest.raises(RuleConfigError, match=r"bad\.yaml: not valid YAML"):
        load_rules_file(bad)
    with pytest.raises(RuleConfigError, match="cannot read"):
        load_rules_file(tmp_path / "missing.yaml")
