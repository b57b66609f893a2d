"""Rate limit rules in the envoyproxy/ratelimit descriptor YAML format.

The file format, field names and matching behaviour follow envoyproxy/ratelimit so a
config written for that service works here unchanged (and the other way round):

    domain: ai-gateway
    descriptors:
      - key: tenant                          # no value: any value, one counter per value
        rate_limit: {unit: minute, requests_per_unit: 100000}
      - key: tenant
        value: team-a                        # a specific value wins over the default
        rate_limit: {unit: hour, requests_per_unit: 5000}

Matching walks a request descriptor's entries down the tree. At each level the node is
chosen by, in order: exact key+value, then a wildcard value (`value: "gpt-*"`, config
order), then key only. The limit is the one on the node matched by the LAST entry; a
descriptor that runs past the tree or ends on a node without `rate_limit` has no limit.

Unknown fields are errors (naming the file and the path) because a misspelt field in a
budget config silently disables the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from extproc.yaml_file import read_yaml_file

__all__ = [
    "UNIT_SECONDS",
    "MAX_REQUESTS_PER_UNIT",
    "Rule",
    "RuleSet",
    "RuleConfigError",
    "load_rules",
    "load_rules_file",
]

# Window lengths as envoyproxy/ratelimit defines them (month = 30 days, year = 365 days).
UNIT_SECONDS: dict[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 60 * 60,
    "day": 60 * 60 * 24,
    "week": 60 * 60 * 24 * 7,
    "month": 60 * 60 * 24 * 30,
    "year": 60 * 60 * 24 * 365,
}
MAX_REQUESTS_PER_UNIT = 2**32 - 1  # the wire field is uint32

_ROOT_FIELDS = ("domain", "descriptors")
_DESCRIPTOR_FIELDS = (
    "key",
    "value",
    "rate_limit",
    "descriptors",
    "shadow_mode",
    "quota_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
)
_DESCRIPTOR_FLAGS = ("shadow_mode", "quota_mode", "detailed_metric", "value_to_metric", "share_threshold")
_RATE_LIMIT_FIELDS = ("unit", "requests_per_unit", "unlimited", "name", "replaces")
_REPLACES_FIELDS = ("name",)


class RuleConfigError(ValueError):
    """A rate limit config problem, phrased for the operator: `source: path: what is wrong`."""


Entries = Sequence[tuple[str, str]]


def _escape(text: str) -> str:
    """Make the separators of a counter key unambiguous (keys must never collide)."""
    return text.replace("%", "%25").replace("|", "%7C").replace("=", "%3D").replace("~", "%7E")


@dataclass(frozen=True)
class Rule:
    """One configured limit: `requests_per_unit` hits per fixed `unit` window."""

    domain: str
    unit: str  # one of UNIT_SECONDS ("" when unlimited)
    requests_per_unit: int
    unlimited: bool = False
    shadow_mode: bool = False
    quota_mode: bool = False
    name: str = ""
    replaces: tuple[str, ...] = ()
    detailed_metric: bool = False
    value_to_metric: bool = False
    path: str = ""  # where it was configured, for logs and errors
    # share_threshold: (entry index, wildcard pattern) pairs; those entries count under the
    # pattern so every value matching it shares one counter.
    shared_values: tuple[tuple[int, str], ...] = ()
    metadata: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def window_seconds(self) -> int:
        """Length of the fixed window (0 for an unlimited rule)."""
        return UNIT_SECONDS.get(self.unit, 0)

    def key(self, entries: Entries) -> str:
        """The counter name for a request descriptor matched to this rule.

        Built from the domain and the request's actual entries (so a key-only node gives each
        value its own counter), except entries shared through `share_threshold`.
        """
        shared = dict(self.shared_values)
        parts = [_escape(self.domain)]
        for index, (key, value) in enumerate(entries):
            pattern = shared.get(index)
            if pattern is None:
                parts.append(f"{_escape(key)}={_escape(value)}")
            else:
                parts.append(f"{_escape(key)}~{_escape(pattern)}")
        return "|".join(parts)


def _wildcard_match(pattern: str, value: str) -> bool:
    """`*` matches any run of characters (including none); everything else is literal."""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return pattern == value
    first, *middle, last = pieces
    if len(value) < len(first) + len(last) or not value.startswith(first) or not value.endswith(last):
        return False
    position, end = len(first), len(value) - len(last)
    for piece in middle:
        found = value.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


@dataclass
class _Node:
    """One level of the descriptor tree: its limit and the children below it."""

    rule: Rule | None = None
    share_threshold: bool = False
    value: str = ""
    exact: dict[tuple[str, str], _Node] = field(default_factory=dict)
    default: dict[str, _Node] = field(default_factory=dict)
    wildcards: list[tuple[str, str, _Node]] = field(default_factory=list)  # (key, pattern, node), config order

    @property
    def has_children(self) -> bool:
        return bool(self.exact or self.default)

    def child(self, key: str, value: str) -> tuple[_Node | None, bool]:
        """The child an entry selects, and whether it was chosen through a wildcard value."""
        node = self.exact.get((key, value))
        if node is not None:
            return node, False
        for wild_key, pattern, wild_node in self.wildcards:
            if wild_key == key and _wildcard_match(pattern, value):
                return wild_node, True
        return self.default.get(key), False


class RuleSet:
    """The limits of one domain, loaded from one config document."""

    def __init__(self, domain: str, root: _Node, source: str = "<rules>") -> None:
        self.domain = domain
        self.source = source
        self._root = root

    def match(self, entries: Entries) -> Rule | None:
        """The rule for a request descriptor's `(key, value)` entries, or None (no limit)."""
        level = self._root
        shared: list[tuple[int, str]] = []
        last = len(entries) - 1
        for index, (key, value) in enumerate(entries):
            node, via_wildcard = level.child(key, value)
            if node is None:
                return None
            if via_wildcard and node.share_threshold:
                shared.append((index, node.value))
            if index == last:
                if node.rule is None:
                    return None
                return replace(node.rule, shared_values=tuple(shared)) if shared else node.rule
            if not node.has_children:
                return None  # the descriptor is deeper than the tree
            level = node
        return None  # no entries

    def rules(self) -> list[Rule]:
        """Every configured rule, depth first (for listing and debugging)."""
        found: list[Rule] = []

        def walk(node: _Node) -> None:
            for child in [*node.exact.values(), *node.default.values()]:
                if child.rule is not None:
                    found.append(child.rule)
                walk(child)

        walk(self._root)
        return found

    def __repr__(self) -> str:
        return f"RuleSet(domain={self.domain!r}, source={self.source!r}, rules={len(self.rules())})"


class _Loader:
    """Validates one config document and builds the tree; every error names its path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> RuleConfigError:
        return RuleConfigError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        for name in value:
            if name not in allowed:
                raise self.fail(path, f"unknown field {name!r} (allowed: {', '.join(allowed)})")
        return value

    def flag(self, data: Mapping[str, Any], name: str, path: str) -> bool:
        value = data.get(name, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.fail(f"{path}.{name}", f"expected true or false, got {value!r}")
        return value

    def text(self, data: Mapping[str, Any], name: str, path: str) -> str:
        value = data.get(name)
        if value is None:
            return ""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.fail(f"{path}.{name}", f"expected a string, got {value!r} (quote it)")
        return str(value)

    def sequence(self, data: Mapping[str, Any], name: str, path: str) -> list[Any]:
        value = data.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(f"{path}.{name}", f"expected a list, got {type(value).__name__}")
        return value

    def load(self, data: Any) -> RuleSet:
        root = self.mapping(data, "", _ROOT_FIELDS)
        domain = self.text(root, "domain", "")
        if not domain:
            raise self.fail("domain", "is required and must not be empty")
        tree = _Node()
        self.descriptors(tree, domain, self.sequence(root, "descriptors", ""), "descriptors")
        return RuleSet(domain, tree, self.source)

    def descriptors(self, parent: _Node, domain: str, items: list[Any], path: str) -> None:
        for position, item in enumerate(items):
            here = f"{path}[{position}]"
            data = self.mapping(item, here, _DESCRIPTOR_FIELDS)
            key = self.text(data, "key", here)
            if not key:
                raise self.fail(f"{here}.key", "is required and must not be empty")
            value = self.text(data, "value", here)
            if (key, value) in parent.exact or (not value and key in parent.default):
                shown = f"{key}={value}" if value else key
                raise self.fail(here, f"duplicate descriptor {shown!r} at this level")
            flags = {name: self.flag(data, name, here) for name in _DESCRIPTOR_FLAGS}
            share_threshold = flags.pop("share_threshold")
            if share_threshold and "*" not in value:
                raise self.fail(f"{here}.share_threshold", "only applies to a wildcard value (one containing '*')")
            metadata = data.get("metadata")
            if metadata is not None and not isinstance(metadata, Mapping):
                raise self.fail(f"{here}.metadata", f"expected a mapping, got {type(metadata).__name__}")

            node = _Node(share_threshold=share_threshold, value=value)
            if data.get("rate_limit") is not None:
                node.rule = self.rate_limit(data, domain, here, metadata, flags)
            self.descriptors(node, domain, self.sequence(data, "descriptors", here), f"{here}.descriptors")

            if value:
                parent.exact[(key, value)] = node
                if "*" in value:
                    parent.wildcards.append((key, value, node))
            else:
                parent.default[key] = node

    def rate_limit(
        self, descriptor: Mapping[str, Any], domain: str, path: str, metadata: Any, flags: dict[str, bool]
    ) -> Rule:
        here = f"{path}.rate_limit"
        data = self.mapping(descriptor["rate_limit"], here, _RATE_LIMIT_FIELDS)
        unlimited = self.flag(data, "unlimited", here)
        unit = self.text(data, "unit", here).lower()
        if unlimited:
            if unit:
                raise self.fail(f"{here}.unit", "must not be set when unlimited is true")
        elif unit not in UNIT_SECONDS:
            shown = repr(unit) if unit else "missing"
            raise self.fail(f"{here}.unit", f"{shown} is not a unit (use one of: {', '.join(UNIT_SECONDS)})")

        requests = data.get("requests_per_unit")
        if requests is None and not unlimited:
            raise self.fail(f"{here}.requests_per_unit", "is required (use unlimited: true for no limit)")
        requests = 0 if requests is None else requests
        if isinstance(requests, bool) or not isinstance(requests, int) or not 0 <= requests <= MAX_REQUESTS_PER_UNIT:
            raise self.fail(
                f"{here}.requests_per_unit", f"expected an integer from 0 to {MAX_REQUESTS_PER_UNIT}, got {requests!r}"
            )

        name = self.text(data, "name", here)
        replaces: list[str] = []
        for position, item in enumerate(self.sequence(data, "replaces", here)):
            where = f"{here}.replaces[{position}]"
            replaced = self.text(self.mapping(item, where, _REPLACES_FIELDS), "name", where)
            if not replaced:
                raise self.fail(f"{where}.name", "is required and must not be empty")
            if replaced == name:
                raise self.fail(f"{where}.name", "a limit cannot replace itself")
            replaces.append(replaced)

        return Rule(
            domain=domain,
            unit=unit,
            requests_per_unit=requests,
            unlimited=unlimited,
            name=name,
            replaces=tuple(replaces),
            shadow_mode=flags["shadow_mode"],
            quota_mode=flags["quota_mode"],
            detailed_metric=flags["detailed_metric"],
            value_to_metric=flags["value_to_metric"],
            path=path,
            metadata=metadata,
        )


def load_rules(data: Any, source: str = "<rules>") -> RuleSet:
    """Build a RuleSet from a parsed config document; `source` prefixes every error."""
    return _Loader(source).load(data)


def load_rules_file(path: str | Path) -> RuleSet:
    """Read and validate one envoyproxy/ratelimit config file."""
    return load_rules(read_yaml_file(path, RuleConfigError), str(path))
