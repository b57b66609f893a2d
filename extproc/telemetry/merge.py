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

from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

_KEEP_ONE = frozenset({"target_info"})


def merge_expositions(texts: Iterable[str]) -> str:
    """One Prometheus text exposition whose series are the sums over `texts`."""
    families: dict[str, tuple[str, str]] = {}  # name -> (type, help), first seen wins
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
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
    lines: list[str] = []
    for name, (kind, documentation) in families.items():
        exposed = name + "_total" if kind == "counter" and not name.endswith("_total") else name
        if documentation:
            lines.append(f"# HELP {exposed} {_escape_help(documentation)}")
        lines.append(f"# TYPE {exposed} {'gauge' if kind == 'info' else kind}")
        for (sample_name, labels), value in samples[name].items():
            rendered = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{rendered}}} {_number(value)}" if rendered else f"{sample_name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
