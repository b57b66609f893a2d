"""`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` for per-tenant token budgets.

Envoy's global rate limit filter calls this twice per LLM request:

* on the request path, with `hits_addend` explicitly 0 on the descriptor: a *check*. It reads
  the counter and answers OVER_LIMIT once the budget is spent (total >= limit), without
  charging anything, because the token count is not known yet;
* after the response (`apply_on_stream_done`), with `hits_addend` = the tokens used: a
  *charge*. It adds them and answers OVER_LIMIT when the new total exceeds the limit
  (envoyproxy/ratelimit's rule; Envoy ignores the answer at that point anyway).

A descriptor whose last entry is `("settle", "refund")` gives `hits_addend` back to the counter
of the rule the other entries match (e.g. an estimate charged up front, corrected later).

Matching, `unlimited`, `shadow_mode`, `quota_mode`, `replaces`, the per-descriptor `limit`
override and the response statuses follow envoyproxy/ratelimit, so the two are interchangeable
behind the same Envoy config. When the counter store fails the call is aborted with
UNAVAILABLE so Envoy applies its own `failure_mode_deny` choice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import ratelimit_unit_pb2
from google.protobuf import duration_pb2

from extproc.contract import RETRY_AFTER_HEADER
from extproc.ratelimit.descriptors import UNIT_SECONDS, Rule, RuleSet
from extproc.ratelimit.store import Store, StoreUnavailable, window_start

__all__ = ["RateLimitServicer", "REFUND_ENTRY", "MAX_ADDEND"]

log = logging.getLogger(__name__)

REFUND_ENTRY = ("settle", "refund")
UINT32_MAX = 2**32 - 1
# Any addend above the largest possible limit (uint32) is over every limit; capping it keeps
# counters far from Redis' int64 range whatever a caller sends.
MAX_ADDEND = 2**32

Code = rls_pb2.RateLimitResponse.Code
Descriptor: TypeAlias = ratelimit_pb2.RateLimitDescriptor
_UNIT_ENUM = {name: rls_pb2.RateLimitResponse.RateLimit.Unit.Value(name.upper()) for name in UNIT_SECONDS}


@dataclass(frozen=True)
class _Plan:
    """What to do for one request descriptor."""

    rule: Rule | None  # None: no limit applies
    key: str = ""
    addend: int = 0
    mode: str = "none"  # none | unlimited | check | charge | refund


@dataclass(frozen=True)
class _Outcome:
    status: rls_pb2.RateLimitResponse.DescriptorStatus
    over: bool  # over the limit (before shadow mode is applied)
    blocking: bool  # counts towards OVER_LIMIT (over, not shadow)
    quota: bool
    reset: int


class _ThrottledWarning:
    """At most one warning per `interval` seconds; says how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last = -math.inf
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._last < self._interval:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        if held:
            self._logger.warning(message + " (%d similar warnings suppressed)", *args, held)
        else:
            self._logger.warning(message, *args)


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Answers Envoy's rate limit calls from `rules` and the counters in `store`.

    `rules` may be replaced at any time (`servicer.rules = new`); each call uses the rules it
    started with. `store_errors` and `failures` (by reason: connection, timeout, error) count
    calls aborted because the store failed.
    """

    def __init__(
        self,
        rules: RuleSet,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        store_timeout: float | None = 0.5,
    ) -> None:
        self.rules = rules
        self.store = store
        self.store_timeout = store_timeout
        self.store_errors = 0
        self.failures: Counter[str] = Counter()
        self._clock = clock
        self._warn = _ThrottledWarning(log)

    # -- planning ------------------------------------------------------------------------

    @staticmethod
    def _addend(request: rls_pb2.RateLimitRequest, descriptor: Descriptor) -> int:
        """Per-descriptor wrapper if present (0 allowed = check), else the request's, else 1."""
        if descriptor.HasField("hits_addend"):
            value = descriptor.hits_addend.value
        else:
            value = request.hits_addend or 1
        return min(value, MAX_ADDEND)

    @staticmethod
    def _override(rules: RuleSet, descriptor: Descriptor) -> Rule | None:
        """The limit Envoy put on the descriptor itself (RateLimitOverride), if usable."""
        if not descriptor.HasField("limit"):
            return None
        limit = descriptor.limit
        try:
            unit = ratelimit_unit_pb2.RateLimitUnit.Name(limit.unit).lower()
        except ValueError:
            return None
        if unit not in UNIT_SECONDS:  # UNKNOWN
            return None
        return Rule(domain=rules.domain, unit=unit, requests_per_unit=limit.requests_per_unit, path="descriptor limit")

    def _plan(self, rules: RuleSet, request: rls_pb2.RateLimitRequest) -> list[_Plan]:
        plans: list[_Plan] = []
        replaced: set[str] = set()
        for descriptor in request.descriptors:
            entries = [(entry.key, entry.value) for entry in descriptor.entries]
            refund = bool(entries) and entries[-1] == REFUND_ENTRY
            if refund:
                entries.pop()
            if request.domain != rules.domain or not entries:
                plans.append(_Plan(None))
                continue
            rule = self._override(rules, descriptor) or rules.match(entries)
            if rule is None:
                plans.append(_Plan(None))
                continue
            replaced.update(rule.replaces)
            if rule.unlimited:
                plans.append(_Plan(rule, mode="unlimited"))
                continue
            addend = self._addend(request, descriptor)
            mode = "refund" if refund else ("charge" if addend > 0 else "check")
            plans.append(_Plan(rule, rule.key(entries), addend, mode))
        if replaced:  # a matched limit named in another match's `replaces` does not apply
            plans = [
                _Plan(None) if p.mode != "unlimited" and p.rule is not None and p.rule.name in replaced else p
                for p in plans
            ]
        return plans

    # -- store ---------------------------------------------------------------------------

    async def _count(self, plan: _Plan, now: float) -> int:
        assert plan.rule is not None
        window = plan.rule.window_seconds
        if plan.mode == "refund":
            return await self.store.subtract(plan.key, plan.addend, window, now)
        return await self.store.add(plan.key, plan.addend if plan.mode == "charge" else 0, window, now)

    async def _totals(self, plans: list[_Plan], now: float) -> list[int | None]:
        """Counter totals for the plans that touch the store, concurrently (one call each)."""
        indexes = [i for i, plan in enumerate(plans) if plan.mode in ("check", "charge", "refund")]
        totals: list[int | None] = [None] * len(plans)
        if not indexes:
            return totals
        gathered = asyncio.gather(*(self._count(plans[i], now) for i in indexes), return_exceptions=True)
        if self.store_timeout is None:
            results = await gathered
        else:
            async with asyncio.timeout(self.store_timeout):
                results = await gathered
        for i, result in zip(indexes, results):
            if isinstance(result, BaseException):
                raise result
            totals[i] = result
        return totals

    def _store_failed(self, reason: str, error: BaseException) -> None:
        self.store_errors += 1
        self.failures[reason] += 1
        detail = str(error) or type(error).__name__
        self._warn.warning("rate limit store failed (%s): %s; answering UNAVAILABLE", reason, detail)

    # -- response ------------------------------------------------------------------------

    @staticmethod
    def _outcome(plan: _Plan, total: int | None, now: float) -> _Outcome:
        if plan.mode == "none":
            return _Outcome(rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OK), False, False, False, 0)
        if plan.mode == "unlimited":
            status = rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OK, limit_remaining=UINT32_MAX)
            return _Outcome(status, False, False, False, 0)
        rule = plan.rule
        assert rule is not None and total is not None
        limit = rule.requests_per_unit
        window = rule.window_seconds
        reset = max(1, math.ceil(window_start(now, window) + window - now))
        if plan.mode == "check":
            over = total >= limit  # budget spent: nothing left for this request
        elif plan.mode == "charge":
            over = total > limit
        else:
            over = False  # a refund never limits
        blocking = over and not rule.shadow_mode
        status = rls_pb2.RateLimitResponse.DescriptorStatus(
            code=Code.OVER_LIMIT if blocking else Code.OK,
            current_limit=rls_pb2.RateLimitResponse.RateLimit(
                requests_per_unit=limit, unit=_UNIT_ENUM[rule.unit], name=rule.name
            ),
            limit_remaining=0 if over else min(UINT32_MAX, max(0, limit - total)),
            duration_until_reset=duration_pb2.Duration(seconds=reset),
        )
        return _Outcome(status, over, blocking, rule.quota_mode, reset)

    async def ShouldRateLimit(  # noqa: N802 - the gRPC method name
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        if not request.domain:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rate limit domain must not be empty")
        if not request.descriptors:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rate limit descriptor list must not be empty")

        rules = self.rules  # one snapshot per call, even if swapped meanwhile
        now = self._clock()
        plans = self._plan(rules, request)
        try:
            totals = await self._totals(plans, now)
        except StoreUnavailable as exc:
            self._store_failed(exc.reason, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rate limit store unavailable ({exc.reason})")
        except TimeoutError as exc:
            self._store_failed("timeout", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rate limit store unavailable (timeout)")

        outcomes = [self._outcome(plan, total, now) for plan, total in zip(plans, totals)]
        # envoyproxy/ratelimit: OVER_LIMIT if any ordinary limit is over, or if every quota-mode
        # limit in the request is over.
        blocking = [o for o in outcomes if o.blocking and not o.quota]
        quota = [o for o in outcomes if o.quota and o.status.HasField("current_limit")]
        if not blocking and quota and all(o.blocking for o in quota):
            blocking = quota
        response = rls_pb2.RateLimitResponse(
            overall_code=Code.OVER_LIMIT if blocking else Code.OK,
            statuses=[o.status for o in outcomes],
        )
        if blocking:
            # Every over-limit window must have reset before a retry can pass: wait for the last.
            retry_after = max(o.reset for o in blocking)
            response.response_headers_to_add.append(base_pb2.HeaderValue(key=RETRY_AFTER_HEADER, value=str(retry_after)))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "ShouldRateLimit domain=%s %s -> %s",
                request.domain,
                [(p.mode, p.key, p.addend, t) for p, t in zip(plans, totals)],
                Code.Name(response.overall_code),
            )
        return response
