"""Histogram exemplars: recorded per bucket, rendered as OpenMetrics, merged across workers."""

from __future__ import annotations

from typing import Any

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from extproc.telemetry import exemplars
from extproc.telemetry.merge import merge_expositions, merge_openmetrics
from tests.unit.test_metrics import (
    DURATION,
    PROCESSOR,
    TTFT,
    make_record,
    metrics,
    stream_record,
)

TRACE_A, SPAN_A = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
TRACE_B, SPAN_B = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7


def _text(m: Any) -> str:
    return str(m.render_prometheus()[0].decode())


def _exemplified(text: str) -> dict[tuple[str, str, str], Any]:
    """(sample name, le, model or stream) -> exemplar, from OpenMetrics text (the parser validates it)."""
    found = {}
    for family in openmetrics_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                series = sample.labels.get("gen_ai_request_model") or sample.labels["stream"]
                found[(sample.name, sample.labels["le"], series)] = sample.exemplar
    return found


def test_each_histogram_keeps_the_sampled_request_on_the_bucket_its_value_fell_in() -> None:
    m = metrics()
    m.record(stream_record(), (TRACE_A, SPAN_A))  # 1.5 s, first token at 0.3 s, 0.4 ms in the processor
    text = merge_openmetrics([_text(m)], m.exemplars())

    assert text.endswith("# EOF\n")
    found = _exemplified(text)
    assert set(found) == {
        (f"{DURATION}_bucket", "2.56", "gpt-4o"),
        (f"{TTFT}_bucket", "0.5", "gpt-4o"),
        ("gen_ai_server_time_per_output_token_seconds_bucket", "0.1", "gpt-4o"),
        (f"{PROCESSOR}_bucket", "0.0005", "true"),
    }
    duration = found[(f"{DURATION}_bucket", "2.56", "gpt-4o")]
    assert duration.labels == {"trace_id": f"{TRACE_A:032x}", "span_id": f"{SPAN_A:016x}"}
    assert duration.value == 1.5
    assert duration.timestamp is not None


def test_the_newest_sampled_request_wins_a_bucket_and_unsampled_ones_leave_none() -> None:
    m = metrics()
    m.record(make_record(), (TRACE_A, SPAN_A))
    m.record(make_record(ended_at=101.6), (TRACE_B, SPAN_B))  # same bucket (1.28, 2.56]
    m.record(make_record(ended_at=130.0))  # no sampled span: counted, no exemplar
    found = _exemplified(merge_openmetrics([_text(m)], m.exemplars()))
    assert found[(f"{DURATION}_bucket", "2.56", "gpt-4o")].labels["trace_id"] == f"{TRACE_B:032x}"
    assert (f"{DURATION}_bucket", "40.96", "gpt-4o") not in found


def test_openmetrics_has_the_same_values_as_the_text_format() -> None:
    m = metrics()
    m.record(stream_record(), (TRACE_A, SPAN_A))
    m.record(make_record(error_type="500", status=500, usage=None))
    plain = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if v)), s.value)  # "" is no label
             for f in text_string_to_metric_families(_text(m)) for s in f.samples if s.name != "target_info"}
    opened = {(s.name, tuple(sorted(s.labels.items())), s.value)
              for f in openmetrics_families(merge_openmetrics([_text(m)], m.exemplars()))
              for s in f.samples if s.name != "target_info"}
    assert opened == plain


def test_plain_text_carries_no_exemplars() -> None:
    m = metrics()
    m.record(stream_record(), (TRACE_A, SPAN_A))
    text = _text(m)
    assert f"{TRACE_A:032x}" not in text and "# EOF" not in text
    assert f"{TRACE_A:032x}" not in merge_expositions([text, text])


def test_workers_merge_adds_counts_and_keeps_the_newest_exemplar_per_bucket() -> None:
    first, second = metrics(), metrics()
    first.record(make_record(), (TRACE_A, SPAN_A))
    second.record(make_record(), (TRACE_B, SPAN_B))  # later: wins the shared bucket
    shipped = exemplars.from_json(exemplars.to_json(second.exemplars()))  # as worker 0 fetches it
    assert shipped == second.exemplars()
    text = merge_openmetrics([_text(first), _text(second)], exemplars.newest([first.exemplars(), shipped]))

    found = _exemplified(text)
    assert found[(f"{DURATION}_bucket", "2.56", "gpt-4o")].labels["trace_id"] == f"{TRACE_B:032x}"
    counts = [s.value for f in openmetrics_families(text) for s in f.samples
              if s.name == f"{DURATION}_count" and s.labels.get("gen_ai_request_model") == "gpt-4o"]
    assert counts == [2]
