"""Merging the workers' Prometheus text into the one exposition the admin port serves."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from extproc.telemetry.merge import merge_expositions

HEADER = "# HELP d Duration.\n# TYPE d histogram\n"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_same_series_add_up() -> None:
    worker = HEADER + 'd_count{model="m"} 2\nd_sum{model="m"} 1.5\n'
    merged = samples(merge_expositions([worker, worker]))
    assert merged[("d_count", (("model", "m"),))] == 4
    assert merged[("d_sum", (("model", "m"),))] == 3


def test_an_empty_label_is_the_same_series_as_no_label() -> None:
    """One worker saw a response model on other requests (so pads this series with ""), the other
    never did: to Prometheus both are one series, so they must be summed, not shown twice."""
    padded = HEADER + 'd_count{error_type="rate_limited",response_model=""} 2\n'
    bare = HEADER + 'd_count{error_type="rate_limited"} 3\n'
    merged = merge_expositions([padded, bare])
    assert samples(merged) == {("d_count", (("error_type", "rate_limited"),)): 5}


def test_distinct_values_stay_distinct() -> None:
    a = HEADER + 'd_count{model="a"} 1\n'
    b = HEADER + 'd_count{model="b"} 1\n'
    assert samples(merge_expositions([a, b])) == {("d_count", (("model", "a"),)): 1, ("d_count", (("model", "b"),)): 1}
