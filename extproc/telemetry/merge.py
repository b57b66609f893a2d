"""Merge the Prometheus text of several processor workers into one exposition.

Every worker records its own requests; the operator scrapes one port. Counters,
histogram buckets/sums/counts and gauges with the same labels are added up; identity
series (`target_info`, values equal in every worker) are kept once.

A label with an empty value is the same as no label to Prometheus, and each worker's
exporter pads a family's series to the label names that worker has seen (`""` for the
others), so series are keyed without their empty labels: two workers' spellings of one
series would otherwise come out as two samples Prometheus counts as one (keeping either).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

from extproc.telemetry.exemplars import Exemplar, Key

_KEEP_ONE = frozenset({"target_info"})
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def merge_expositions(texts: Iterable[str]) -> str:
    """One Prometheus text exposition whose series are the sums over `texts`."""
    return _render(*_add_up(texts), exemplars=None)


def merge_openmetrics(texts: Iterable[str], exemplars: Mapping[Key, Exemplar]) -> str:
    """The same sums as `merge_expositions`, as OpenMetrics text with each bucket's exemplar
    (`# {trace_id="...",span_id="..."} value timestamp`) and the closing `# EOF`."""
    return _render(*_add_up(texts), exemplars=exemplars)


def _render(
    families: dict[str, tuple[str, str]], samples: dict[str, dict[_Series, float]],
    exemplars: Mapping[Key, Exemplar] | None,
) -> str:
    """The added-up series as text: the Prometheus format, or OpenMetrics when `exemplars`
    is given (family names as parsed, +Inf spelled out, exemplars on buckets, `# EOF`)."""
    openmetrics = exemplars is not None
    number = _om_number if openmetrics else _number
    lines: list[str] = []
    for name, (kind, documentation) in families.items():
        kind = "gauge" if kind == "info" else kind  # target_info: a gauge in both formats
        exposed = name + "_total" if not openmetrics and kind == "counter" and not name.endswith("_total") else name
        if documentation:
            help_text = _escape_label(documentation) if openmetrics else _escape_help(documentation)
            lines.append(f"# HELP {exposed} {help_text}")
        lines.append(f"# TYPE {exposed} {kind}")
        for (sample_name, labels), value in samples[name].items():
            rendered = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            line = f"{sample_name}{{{rendered}}} {number(value)}" if rendered else f"{sample_name} {number(value)}"
            if exemplars is not None and sample_name.endswith("_bucket"):
                exemplar = exemplars.get(_exemplar_key(sample_name, labels))
                if exemplar is not None:
                    trace_id, span_id, observed, at = exemplar
                    line += f' # {{trace_id="{trace_id}",span_id="{span_id}"}} {_om_number(observed)} {at:.3f}'
            lines.append(line)
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


_Series = tuple[str, tuple[tuple[str, str], ...]]


def _add_up(texts: Iterable[str]) -> tuple[dict[str, tuple[str, str]], dict[str, dict[_Series, float]]]:
    families: dict[str, tuple[str, str]] = {}  # name -> (type, help), first seen wins
    samples: dict[str, dict[_Series, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, (family.type, family.documentation))
            series = samples.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if v != "")))
                if family.name in _KEEP_ONE or family.type == "info":
                    series.setdefault(key, sample.value)
                elif sample.name.endswith("_created"):  # a timestamp: the earliest start
                    series[key] = min(series.get(key, sample.value), sample.value)
                else:
                    series[key] = series.get(key, 0.0) + sample.value
    return families, samples


def _exemplar_key(sample_name: str, labels: tuple[tuple[str, str], ...]) -> Key:
    """A bucket sample's exemplar key: its labels without `le` and the exporter's constant
    `otel_scope_*` labels (the store keys series by the measurement's attributes)."""
    bound = float("inf")
    kept = []
    for k, v in labels:
        if k == "le":
            bound = float(v)
        elif not k.startswith("otel_scope_"):
            kept.append((k, v))
    return sample_name, tuple(kept), bound


def _om_number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return _number(value)


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
