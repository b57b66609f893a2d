"""ext_proc messages per request, the processor's main cost driver: every message costs
the same gRPC transport work whatever the processor does with it.

Both processors (the gateway's and the floor's no-op one) count the messages they
answered in `extproc_processor_messages_total{stage, phase}` on their admin port's
`/metrics`; the bench reads it before and after a load and divides the difference by
the requests wrk completed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SAMPLE = "extproc_processor_messages_total"
Counts = dict[tuple[str, str], float]  # (stage, phase) -> messages answered


def parse_counts(text: str) -> Counts:
    """The message counters in a Prometheus text exposition (empty when absent)."""
    counts: Counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # the family's name depends on how its TYPE line is written
            if sample.name == SAMPLE:
                key = (sample.labels.get("stage", ""), sample.labels.get("phase", ""))
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def add(parts: Iterable[Counts]) -> Counts:
    """The counts of several processes (workers) together."""
    total: Counts = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def per_request(before: Mapping[tuple[str, str], float], after: Mapping[tuple[str, str], float],
                requests: int) -> dict[str, Any]:
    """Messages answered between two readings: in all, per request, and per request by
    stage and phase. Requests still in flight at either reading make this approximate
    (a few out of thousands)."""
    delta = {key: after[key] - before.get(key, 0.0) for key in sorted(after)}
    total = sum(delta.values())
    by_phase: dict[str, dict[str, float | None]] = {}
    for (stage, phase), count in delta.items():
        if count:
            by_phase.setdefault(stage, {})[phase] = count / requests if requests else None
    return {
        "messages": total,
        "requests": requests,
        "per_request": total / requests if requests and after else None,
        "per_request_by_phase": by_phase,
    }
