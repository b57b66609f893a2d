"""Histogram exemplars: per bucket, the trace of the latest sampled request that fell in it.

The OpenTelemetry Prometheus exporter renders no exemplars, so the processor keeps its own:
per (histogram, series, bucket) the newest (trace id, span id, value, time) of a request whose
span was sampled, one dict write per measurement. `merge.merge_openmetrics` writes them after
their bucket's sample when a scraper asks for OpenMetrics, so a latency spike links to its trace;
worker 0 merges every worker's (the newest per bucket wins).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.exporter.prometheus._mapping import (
    map_unit,
    sanitize_attribute,
    sanitize_full_name,
)

Labels = tuple[tuple[str, str], ...]  # a series' Prometheus labels, sorted, without empty values and `le`
Key = tuple[str, Labels, float]  # (bucket sample name, labels, bucket upper bound)
Exemplar = tuple[str, str, float, float]  # (trace id hex, span id hex, value, unix time)

_MAX_EXEMPLARS = 16384  # series x buckets; bounded like the attribute sets


class Histogram:
    """One histogram's bucket sample name (as the exporter spells it) and bucket bounds."""

    __slots__ = ("bounds", "bucket_sample")

    def __init__(self, name: str, unit: str, bounds: tuple[float, ...]) -> None:
        family = sanitize_full_name(name)
        suffix = map_unit(unit)
        if suffix and not family.endswith("_" + suffix):
            family += "_" + suffix
        self.bucket_sample = family + "_bucket"
        self.bounds = bounds


def series_labels(attributes: Mapping[str, Any]) -> Labels:
    """The Prometheus labels the exporter gives a measurement with `attributes` (built once per set)."""
    labels = ((sanitize_attribute(k), v if isinstance(v, str) else json.dumps(v, default=str))
              for k, v in attributes.items())
    return tuple(sorted((k, v) for k, v in labels if v != ""))


class ExemplarStore:
    """The latest sampled measurement per (histogram, series, bucket) of this worker."""

    def __init__(self) -> None:
        self._latest: dict[tuple[Histogram, Labels, int], tuple[int, int, float, float]] = {}

    def record(self, histogram: Histogram, labels: Labels, value: float, trace_id: int, span_id: int,
               now: float) -> None:
        if len(self._latest) >= _MAX_EXEMPLARS:
            self._latest.clear()
        self._latest[(histogram, labels, bisect_left(histogram.bounds, value))] = (trace_id, span_id, value, now)

    def snapshot(self) -> dict[Key, Exemplar]:
        result: dict[Key, Exemplar] = {}
        for (histogram, labels, index), (trace_id, span_id, value, now) in list(self._latest.items()):
            bound = histogram.bounds[index] if index < len(histogram.bounds) else float("inf")
            result[(histogram.bucket_sample, labels, float(bound))] = (
                f"{trace_id:032x}", f"{span_id:016x}", value, now)
        return result


def to_json(exemplars: Mapping[Key, Exemplar]) -> bytes:
    """A worker's exemplars for worker 0 (`/metrics?local=1&exemplars=1`)."""
    return json.dumps([[sample, list(labels), repr(bound), *exemplar]
                       for (sample, labels, bound), exemplar in exemplars.items()]).encode()


def from_json(body: bytes) -> dict[Key, Exemplar]:
    result: dict[Key, Exemplar] = {}
    for sample, labels, bound, trace_id, span_id, value, now in json.loads(body):
        key = (str(sample), tuple((str(k), str(v)) for k, v in labels), float(bound))
        result[key] = (str(trace_id), str(span_id), float(value), float(now))
    return result


def newest(sets: Iterable[Mapping[Key, Exemplar]]) -> dict[Key, Exemplar]:
    """Exemplars of several workers merged: per bucket, the most recent."""
    result: dict[Key, Exemplar] = {}
    for exemplars in sets:
        for key, exemplar in exemplars.items():
            current = result.get(key)
            if current is None or exemplar[3] > current[3]:
                result[key] = exemplar
    return result
