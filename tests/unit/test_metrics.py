"""GenAI metrics: what Prometheus scrapes from /metrics and what an OTLP collector receives."""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import GenAiTokenTypeValues
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from extproc.config import TelemetrySettings
from extproc.telemetry.metrics import (
    PROCESSOR_DURATION_BUCKETS,
    REQUEST_DURATION_BUCKETS,
    TIME_PER_OUTPUT_TOKEN_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
    TOKEN_USAGE_BUCKETS,
    Metrics,
)
from extproc.telemetry.record import RequestRecord
from extproc.usage import TokenUsage

TOKENS = "gen_ai_client_token_usage"
DURATION = "gen_ai_server_request_duration_seconds"
TTFT = "gen_ai_server_time_to_first_token_seconds"
TPOT = "gen_ai_server_time_per_output_token_seconds"
PROCESSOR = "extproc_processor_duration_seconds"
WAIT = 5.0  # seconds to wait for an export to arrive (bounded, never asserted as a timing)


def make_record(**changes: Any) -> RequestRecord:
    record = RequestRecord(
        operation="chat",
        provider="openai",
        request_model="gpt-4o",
        backend_model="gpt-4o",
        response_model="gpt-4o-2024-08-06",
        backend="openai",
        route="gpt",
        server_address="api.openai.com",
        server_port=443,
        stream=False,
        status=200,
        error_type=None,
        usage=TokenUsage(input_tokens=12, output_tokens=30, total_tokens=42),
        start_time_ns=1_700_000_000_000_000_000,
        started_at=100.0,
        ended_at=101.5,
        first_output_at=None,
        last_output_at=None,
        complete=True,
        processor_seconds=0.0004,
    )
    return replace(record, **changes)


def stream_record(**changes: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "stream": True,
        "first_output_at": 100.3,
        "last_output_at": 101.3,
        "usage": TokenUsage(input_tokens=12, output_tokens=11, total_tokens=23),
    }
    values.update(changes)
    return make_record(**values)


def metrics(environ: dict[str, str] | None = None, **settings: Any) -> Metrics:
    return Metrics(TelemetrySettings(**settings), environ if environ is not None else {})


@pytest.fixture
def m() -> Iterator[Metrics]:
    instance = metrics()
    yield instance
    instance.shutdown()


def scrape(instance: Metrics) -> dict[str, list[Sample]]:
    body, content_type = instance.render_prometheus()
    assert content_type.startswith("text/plain")
    families = text_string_to_metric_families(body.decode())
    return {family.name: family.samples for family in families}


def series(samples: dict[str, list[Sample]], family: str, suffix: str, **labels: str) -> list[Sample]:
    """Samples of one family whose name ends with suffix and whose labels include `labels`."""
    return [
        s for s in samples.get(family, [])
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(samples: dict[str, list[Sample]], family: str, suffix: str, **labels: str) -> float:
    found = series(samples, family, suffix, **labels)
    assert len(found) == 1, f"{family}{suffix} {labels}: {found}"
    return found[0].value


def bucket_bounds(samples: dict[str, list[Sample]], family: str) -> list[float]:
    first = series(samples, family, "_count")[0].labels
    keep = {k: v for k, v in first.items() if k != "le"}
    return [float(s.labels["le"]) for s in series(samples, family, "_bucket", **keep)]


# --- token usage -----------------------------------------------------------------------------


def test_token_usage_sums_and_counts_per_type_and_model(m: Metrics) -> None:
    m.record(make_record(usage=TokenUsage(input_tokens=12, output_tokens=30)))
    m.record(make_record(usage=TokenUsage(input_tokens=100, output_tokens=5)))
    m.record(make_record(backend_model="gpt-4o-mini", request_model="gpt-4o-mini", response_model=None,
                         usage=TokenUsage(input_tokens=7, output_tokens=3)))
    samples = scrape(m)

    assert value(samples, TOKENS, "_sum", gen_ai_token_type="input", gen_ai_request_model="gpt-4o") == 112
    assert value(samples, TOKENS, "_count", gen_ai_token_type="input", gen_ai_request_model="gpt-4o") == 2
    assert value(samples, TOKENS, "_sum", gen_ai_token_type="output", gen_ai_request_model="gpt-4o") == 35
    assert value(samples, TOKENS, "_sum", gen_ai_token_type="input", gen_ai_request_model="gpt-4o-mini") == 7
    assert value(samples, TOKENS, "_sum", gen_ai_token_type="output", gen_ai_request_model="gpt-4o-mini") == 3
    # No cached or reasoning tokens were reported: no such series.
    types = {s.labels["gen_ai_token_type"] for s in samples[TOKENS]}
    assert types == {"input", "output"}

    first = series(samples, TOKENS, "_count", gen_ai_token_type="input", gen_ai_request_model="gpt-4o")[0].labels
    assert first["gen_ai_operation_name"] == "chat"
    assert first["gen_ai_provider_name"] == "openai"
    assert first["gen_ai_response_model"] == "gpt-4o-2024-08-06"
    assert first["server_address"] == "api.openai.com"
    assert first["server_port"] == "443"
    mini = series(samples, TOKENS, "_count", gen_ai_token_type="input", gen_ai_request_model="gpt-4o-mini")[0]
    assert mini.labels["gen_ai_response_model"] == ""  # unknown: the attribute is absent
    assert bucket_bounds(samples, TOKENS) == [float(b) for b in TOKEN_USAGE_BUCKETS] + [float("inf")]


def test_cached_and_reasoning_tokens_only_when_reported(m: Metrics) -> None:
    m.record(make_record(usage=TokenUsage(input_tokens=50, output_tokens=20, cached_input_tokens=32,
                                          reasoning_tokens=8)))
    m.record(make_record(usage=TokenUsage(input_tokens=10, output_tokens=2, cached_input_tokens=0,
                                          reasoning_tokens=0)))
    samples = scrape(m)
    assert value(samples, TOKENS, "_sum", gen_ai_token_type="input") == 60
    assert value(samples, TOKENS, "_sum", gen_ai_token_type="output") == 22
    assert value(samples, TOKENS, "_sum", gen_ai_token_type="input_cached") == 32
    assert value(samples, TOKENS, "_count", gen_ai_token_type="input_cached") == 1
    assert value(samples, TOKENS, "_sum", gen_ai_token_type="output_reasoning") == 8
    assert value(samples, TOKENS, "_count", gen_ai_token_type="output_reasoning") == 1


def test_token_types_follow_the_conventions() -> None:
    assert GenAiTokenTypeValues.INPUT.value == "input"
    assert GenAiTokenTypeValues.OUTPUT.value == "output"
    # The conventions define no cached/reasoning value; if a release adds one, revisit ours.
    assert {v.value for v in GenAiTokenTypeValues} == {"input", "output"}


def test_configured_costs_add_up_per_cost_key_and_model(m: Metrics) -> None:
    m.record(make_record(costs={"micro_usd": 1250, "total": 42}))
    m.record(make_record(costs={"micro_usd": 0.5, "total": 0}))  # 0: nothing added
    m.record(make_record(backend_model="gpt-4o-mini", request_model="gpt-4o-mini", costs={"micro_usd": 7}))
    m.record(make_record(status=500, error_type="server_error", usage=None))  # no costs: no series
    samples = scrape(m)
    cost = "extproc_cost"
    assert value(samples, cost, "_total", cost="micro_usd", gen_ai_request_model="gpt-4o") == 1250.5
    assert value(samples, cost, "_total", cost="total", gen_ai_request_model="gpt-4o") == 42
    assert value(samples, cost, "_total", cost="micro_usd", gen_ai_request_model="gpt-4o-mini") == 7
    labels = series(samples, cost, "_total", cost="total")[0].labels
    assert labels["gen_ai_provider_name"] == "openai" and "error_type" not in labels


def test_no_usage_no_token_series(m: Metrics) -> None:
    m.record(make_record(status=502, error_type="502", usage=None))
    samples = scrape(m)
    assert TOKENS not in samples
    assert value(samples, DURATION, "_count", error_type="502") == 1


# --- durations -------------------------------------------------------------------------------


def test_request_duration_buckets_and_error_type(m: Metrics) -> None:
    m.record(make_record(started_at=10.0, ended_at=10.5))
    m.record(make_record(started_at=10.0, ended_at=13.0, status=429, error_type="rate_limit_exceeded", usage=None))
    m.record(make_record(status=0, error_type="no_response", usage=None))
    samples = scrape(m)

    assert bucket_bounds(samples, DURATION) == list(REQUEST_DURATION_BUCKETS) + [float("inf")]
    ok = series(samples, DURATION, "_count", error_type="")
    assert len(ok) == 1 and ok[0].value == 1
    assert value(samples, DURATION, "_sum", error_type="") == pytest.approx(0.5)
    assert value(samples, DURATION, "_count", error_type="rate_limit_exceeded") == 1
    assert value(samples, DURATION, "_sum", error_type="rate_limit_exceeded") == pytest.approx(3.0)
    assert value(samples, DURATION, "_count", error_type="no_response") == 1
    # 0.5 s lands in the 0.64 bucket, not in 0.32.
    assert value(samples, DURATION, "_bucket", error_type="", le="0.32") == 0
    assert value(samples, DURATION, "_bucket", error_type="", le="0.64") == 1


def test_time_to_first_token_and_per_output_token_for_streams_only(m: Metrics) -> None:
    m.record(make_record())  # not a stream
    samples = scrape(m)
    assert TTFT not in samples and TPOT not in samples

    m.record(stream_record())  # first output after 0.3 s, 10 more tokens over 1.0 s
    samples = scrape(m)
    assert value(samples, TTFT, "_count") == 1
    assert value(samples, TTFT, "_sum") == pytest.approx(0.3)
    assert value(samples, TPOT, "_count") == 1
    assert value(samples, TPOT, "_sum") == pytest.approx(0.1)
    assert bucket_bounds(samples, TTFT) == list(TIME_TO_FIRST_TOKEN_BUCKETS) + [float("inf")]
    assert bucket_bounds(samples, TPOT) == list(TIME_PER_OUTPUT_TOKEN_BUCKETS) + [float("inf")]
    assert "error_type" not in series(samples, TTFT, "_count")[0].labels


def test_stream_latencies_skipped_when_unknown_or_failed(m: Metrics) -> None:
    m.record(stream_record(first_output_at=None, last_output_at=None))  # no output seen
    m.record(stream_record(usage=TokenUsage(input_tokens=3, output_tokens=1)))  # one token: no TPOT
    m.record(stream_record(error_type="incomplete", complete=False))  # the conventions: successful only
    samples = scrape(m)
    assert value(samples, TTFT, "_count") == 1
    assert TPOT not in samples
    assert value(samples, DURATION, "_count", error_type="incomplete") == 1


def test_processor_duration_recorded_with_few_attributes(m: Metrics) -> None:
    m.record(make_record(processor_seconds=0.0003))
    m.record(stream_record(processor_seconds=0.002))
    m.record(stream_record(processor_seconds=0.004, status=500, error_type="500", usage=None))
    samples = scrape(m)
    assert value(samples, PROCESSOR, "_count", stream="false") == 1
    assert value(samples, PROCESSOR, "_sum", stream="false") == pytest.approx(0.0003)
    assert value(samples, PROCESSOR, "_count", stream="true") == 2
    assert value(samples, PROCESSOR, "_sum", stream="true") == pytest.approx(0.006)
    assert bucket_bounds(samples, PROCESSOR) == list(PROCESSOR_DURATION_BUCKETS) + [float("inf")]
    labels = set(series(samples, PROCESSOR, "_count", stream="true")[0].labels)
    assert labels - {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"} == {
        "gen_ai_operation_name", "stream"
    }


# --- attributes ------------------------------------------------------------------------------


def test_original_model_only_when_overridden(m: Metrics) -> None:
    m.record(make_record())
    m.record(make_record(request_model="local-model", backend_model="llama-3-8b", response_model="llama-3-8b",
                         provider="openai", server_address="127.0.0.1", server_port=8080))
    samples = scrape(m)
    plain = series(samples, DURATION, "_count", gen_ai_request_model="gpt-4o")
    assert len(plain) == 1 and plain[0].labels.get("gen_ai_original_model", "") == ""
    overridden = series(samples, DURATION, "_count", gen_ai_request_model="llama-3-8b")
    assert len(overridden) == 1
    assert overridden[0].labels["gen_ai_original_model"] == "local-model"
    assert overridden[0].labels["server_address"] == "127.0.0.1"
    assert overridden[0].labels["server_port"] == "8080"
    assert value(samples, TOKENS, "_sum", gen_ai_token_type="input", gen_ai_original_model="local-model") == 12


def test_header_attributes_mapped_and_capped() -> None:
    instance = metrics(metric_header_attributes={"x-tenant": "tenant.id", "x-team": "team"}, max_attribute_values=2)
    try:
        for tenant in ("acme", "globex", "initech", "acme", "umbrella"):
            instance.record(make_record(attributes={"tenant.id": tenant, "team": "search"}))
        instance.record(make_record(attributes={"tenant.id": "x" * 300}))
        instance.record(make_record(attributes={"unconfigured": "leak"}))
        samples = scrape(instance)
    finally:
        instance.shutdown()

    counts: dict[str, float] = {}
    for sample in series(samples, DURATION, "_count"):
        counts[sample.labels["tenant_id"]] = counts.get(sample.labels["tenant_id"], 0) + sample.value
    assert counts == {"acme": 2, "globex": 1, "other": 3, "": 1}
    assert sum(s.value for s in series(samples, DURATION, "_count", team="search")) == 5
    # Only configured attribute names become labels.
    assert all("unconfigured" not in s.labels for s in samples[DURATION])
    # The cap covers every instrument using the common attributes.
    assert sum(s.value for s in series(samples, TOKENS, "_count", gen_ai_token_type="input", tenant_id="other")) == 3


def test_header_attribute_values_truncated() -> None:
    instance = metrics(metric_header_attributes={"x-tenant": "tenant.id"}, max_attribute_values=5)
    try:
        instance.record(make_record(attributes={"tenant.id": "t" * 300}))
        samples = scrape(instance)
    finally:
        instance.shutdown()
    assert [s.labels["tenant_id"] for s in series(samples, DURATION, "_count")] == ["t" * 128]


def test_header_attribute_cannot_replace_a_genai_attribute() -> None:
    instance = metrics(metric_header_attributes={"x-model": "gen_ai.request.model"})
    try:
        instance.record(make_record(attributes={"gen_ai.request.model": "spoofed"}))
        samples = scrape(instance)
    finally:
        instance.shutdown()
    assert [s.labels["gen_ai_request_model"] for s in series(samples, DURATION, "_count")] == ["gpt-4o"]


# --- robustness, isolation, lifecycle -------------------------------------------------------


def test_record_never_raises(m: Metrics) -> None:
    m.record(object())  # type: ignore[arg-type]
    m.record(make_record(attributes=42))  # type: ignore[arg-type]
    m.record(make_record(usage="not usage"))  # type: ignore[arg-type]
    m.record(make_record())
    samples = scrape(m)
    assert value(samples, TOKENS, "_sum", gen_ai_token_type="input") == 12


def test_sdk_disabled_records_nothing() -> None:
    instance = metrics({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    instance.record(make_record())
    instance.record(stream_record())
    body, content_type = instance.render_prometheus()
    assert content_type.startswith("text/plain")
    assert b"gen_ai" not in body
    assert list(text_string_to_metric_families(body.decode())) == []
    assert not instance.otlp_enabled
    instance.shutdown()


def test_instances_do_not_share_state() -> None:
    first = metrics({"OTEL_SERVICE_NAME": "first"})
    second = metrics({"OTEL_SERVICE_NAME": "second"})
    try:
        first.record(make_record())
        one, two = scrape(first), scrape(second)
    finally:
        first.shutdown()
        second.shutdown()
    assert value(one, TOKENS, "_sum", gen_ai_token_type="input") == 12
    assert TOKENS not in two and DURATION not in two
    assert b"gen_ai" not in generate_latest(REGISTRY)  # nothing leaks into the global registry
    assert value(one, "target_info", "", service_name="first") == 1


def test_default_service_name_and_no_otlp_without_endpoint(m: Metrics) -> None:
    m.record(make_record())
    samples = scrape(m)
    assert value(samples, "target_info", "", service_name="extproc") == 1
    assert not m.otlp_enabled


def test_shutdown_is_idempotent_and_stops_recording() -> None:
    instance = metrics()
    instance.record(make_record())
    instance.shutdown()
    instance.shutdown()
    instance.record(make_record())  # ignored, no error
    body, _ = instance.render_prometheus()
    list(text_string_to_metric_families(body.decode()))  # still a valid exposition


# --- OTLP export -----------------------------------------------------------------------------


class _Collector:
    """A loopback OTLP/HTTP metrics receiver."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.paths: list[str] = []
        self.arrived = threading.Event()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                encoding = self.headers.get("content-encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = metrics_service_pb2.ExportMetricsServiceRequest()
                request.ParseFromString(body)
                collector.paths.append(self.path)
                collector.requests.append(request)
                if _token_usage_points(request):
                    collector.arrived.set()
                reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _token_usage_points(request: metrics_service_pb2.ExportMetricsServiceRequest) -> dict[str, float]:
    """input/output token sums by gen_ai.token.type found in one export request."""
    out: dict[str, float] = {}
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name != "gen_ai.client.token.usage":
                    continue
                assert metric.unit == "{token}"
                for point in metric.histogram.data_points:
                    attributes = {kv.key: kv.value.string_value for kv in point.attributes}
                    out[attributes["gen_ai.token.type"]] = point.sum
                    assert list(point.explicit_bounds) == [float(b) for b in TOKEN_USAGE_BUCKETS]
    return out


def _service_name(request: metrics_service_pb2.ExportMetricsServiceRequest) -> str:
    for kv in request.resource_metrics[0].resource.attributes:
        if kv.key == "service.name":
            return kv.value.string_value
    return ""


@pytest.fixture
def collector() -> Iterator[_Collector]:
    receiver = _Collector()
    yield receiver
    receiver.close()


def test_otlp_http_periodic_export_arrives(collector: _Collector) -> None:
    instance = metrics({
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{collector.port}/v1/metrics",
        "OTEL_METRIC_EXPORT_INTERVAL": "100",
        "OTEL_SERVICE_NAME": "gateway-under-test",
    })
    try:
        assert instance.otlp_enabled
        instance.record(make_record(usage=TokenUsage(input_tokens=21, output_tokens=34)))
        assert collector.arrived.wait(WAIT), "no OTLP export with token usage arrived"
    finally:
        instance.shutdown()
    request = next(r for r in collector.requests if _token_usage_points(r))
    assert _token_usage_points(request) == {"input": 21, "output": 34}
    assert _service_name(request) == "gateway-under-test"
    assert collector.paths[0] == "/v1/metrics"


def test_otlp_http_shutdown_flushes_with_base_endpoint(collector: _Collector) -> None:
    instance = metrics({
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}/",  # the SDK appends v1/metrics
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": "600000",  # never on its own during the test
    })
    instance.record(make_record(usage=TokenUsage(input_tokens=5, output_tokens=8, reasoning_tokens=3)))
    instance.shutdown()
    assert collector.arrived.wait(WAIT), "shutdown did not flush the metrics"
    request = next(r for r in collector.requests if _token_usage_points(r))
    assert _token_usage_points(request) == {"input": 5, "output": 8, "output_reasoning": 3}
    assert collector.paths[-1] == "/v1/metrics"


def test_otlp_grpc_export_arrives() -> None:
    received: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
    arrived = threading.Event()

    class Service(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - generated name
            received.append(request)
            if _token_usage_points(request):
                arrived.set()
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        instance = metrics({
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
            "OTEL_METRIC_EXPORT_INTERVAL": "600000",
        })
        instance.record(make_record(usage=TokenUsage(input_tokens=2, output_tokens=3)))
        instance.shutdown()
        assert arrived.wait(WAIT), "no OTLP/gRPC export arrived"
    finally:
        server.stop(0)
    request = next(r for r in received if _token_usage_points(r))
    assert _token_usage_points(request) == {"input": 2, "output": 3}


def test_metrics_exporter_none_disables_otlp() -> None:
    instance = metrics({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_METRICS_EXPORTER": "none"})
    try:
        assert not instance.otlp_enabled
        instance.record(make_record())
        assert value(scrape(instance), TOKENS, "_sum", gen_ai_token_type="input") == 12
    finally:
        instance.shutdown()
