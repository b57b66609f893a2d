"""A rate limit service for Envoy's global rate limit filter: per-tenant token budgets.

A drop-in peer of envoyproxy/ratelimit (same descriptor YAML, same matching) whose counters
live in memory or in Redis, with check-only calls (hits_addend 0), after-the-response charges
and refunds. See `service` for the protocol, `descriptors` for the config, `store` for counters.
"""

from extproc.ratelimit.descriptors import (
    MAX_REQUESTS_PER_UNIT,
    UNIT_SECONDS,
    Rule,
    RuleConfigError,
    RuleSet,
    load_rules,
    load_rules_file,
)
from extproc.ratelimit.service import MAX_ADDEND, REFUND_ENTRY, RateLimitServicer
from extproc.ratelimit.store import (
    REDIS_KEY_PREFIX,
    MemoryStore,
    RedisStore,
    Store,
    StoreUnavailable,
    store_from_url,
    window_start,
)

__all__ = [
    "MAX_ADDEND",
    "MAX_REQUESTS_PER_UNIT",
    "REDIS_KEY_PREFIX",
    "REFUND_ENTRY",
    "UNIT_SECONDS",
    "MemoryStore",
    "RateLimitServicer",
    "RedisStore",
    "Rule",
    "RuleConfigError",
    "RuleSet",
    "Store",
    "StoreUnavailable",
    "load_rules",
    "load_rules_file",
    "store_from_url",
    "window_start",
]
