"""A real OTLP/HTTP receiver for tests: what a collector would get from the gateway.

    with OtlpReceiver() as receiver:
        env = receiver.exporter_env()
        ...  # run the gateway with env
        span = receiver.wait_for_span(lambda s: s.name == "ChatCompletion", timeout=10)
        assert span.attributes["llm.model_name"] == "gpt-4o-mini"

Accepts protobuf `POST /v1/traces`, `/v1/metrics` and `/v1/logs` (gzip or deflate
Content-Encoding), keeps decoded spans and metric points, and answers like a collector.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["OtlpReceiver", "ReceivedSpan", "MetricPoint", "any_value"]


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: str  # INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER, UNSPECIFIED
    status_code: str  # UNSET, OK, ERROR
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    start_time_ns: int
    end_time_ns: int
    trace_state: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    dropped_attributes_count: int = 0


@dataclass(frozen=True)
class MetricPoint:
    """One data point of one metric. `value` is the number for sums/gauges, the sum for histograms."""

    name: str
    unit: str
    type: str  # sum, gauge, histogram, exponential_histogram, summary
    attributes: dict[str, Any]
    resource: dict[str, Any]
    value: float | int | None
    count: int | None = None
    bucket_counts: list[int] | None = None
    explicit_bounds: list[float] | None = None


def any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as a plain Python value."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def _span_kind(kind: int) -> str:
    return trace_pb2.Span.SpanKind.Name(kind).removeprefix("SPAN_KIND_")


def _status_code(code: int) -> str:
    return trace_pb2.Status.StatusCode.Name(code).removeprefix("STATUS_CODE_")


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) endpoint on 127.0.0.1 and a free port, served by a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._points: list[MetricPoint] = []
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers) of every export
        self.errors: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                receiver._handle(self, body)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._closed = False

    # -- server side ---------------------------------------------------------------------------

    def _handle(self, http: BaseHTTPRequestHandler, body: bytes) -> None:
        path = http.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in http.headers.items()}
        messages: dict[str, tuple[Any, Any]] = {
            "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse),
            "/v1/metrics": (
                metrics_service_pb2.ExportMetricsServiceRequest,
                metrics_service_pb2.ExportMetricsServiceResponse,
            ),
            "/v1/logs": (logs_service_pb2.ExportLogsServiceRequest, logs_service_pb2.ExportLogsServiceResponse),
        }
        if path not in messages:
            self._reply(http, 404, b"not found", "text/plain")
            return
        if "protobuf" not in headers.get("content-type", ""):
            self._reply(http, 415, b"only application/x-protobuf is supported", "text/plain")
            return
        try:
            encoding = headers.get("content-encoding", "").strip().lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                raise ValueError(f"unsupported content-encoding {encoding!r}")
            request_type, response_type = messages[path]
            request = request_type.FromString(body)
        except Exception as exc:  # a broken export is a test failure to report, not a crash
            with self._lock:
                self.errors.append(f"{path}: {exc}")
            self._reply(http, 400, str(exc).encode(), "text/plain")
            return
        with self._lock:
            self.requests.append((path, headers))
            if path == "/v1/traces":
                self._spans.extend(self._decode_spans(request))
            elif path == "/v1/metrics":
                self._points.extend(self._decode_metrics(request))
            self._lock.notify_all()
        self._reply(http, 200, response_type().SerializeToString(), "application/x-protobuf")

    @staticmethod
    def _reply(http: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        http.send_response(status)
        http.send_header("Content-Type", content_type)
        http.send_header("Content-Length", str(len(body)))
        http.end_headers()
        http.wfile.write(body)

    @staticmethod
    def _decode_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
        out = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    out.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=_span_kind(span.kind),
                            status_code=_status_code(span.status.code),
                            status_message=span.status.message,
                            attributes=_attributes(span.attributes),
                            resource=resource,
                            scope=scope_spans.scope.name,
                            start_time_ns=span.start_time_unix_nano,
                            end_time_ns=span.end_time_unix_nano,
                            trace_state=span.trace_state,
                            events=[
                                {"name": e.name, "time_ns": e.time_unix_nano, "attributes": _attributes(e.attributes)}
                                for e in span.events
                            ],
                            dropped_attributes_count=span.dropped_attributes_count,
                        )
                    )
        return out

    @staticmethod
    def _decode_metrics(request: metrics_service_pb2.ExportMetricsServiceRequest) -> list[MetricPoint]:
        out = []
        for resource_metrics in request.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    if kind is None:
                        continue
                    data = getattr(metric, kind)
                    for point in data.data_points:
                        value: float | int | None
                        count = bucket_counts = bounds = None
                        if kind in ("sum", "gauge"):
                            which = point.WhichOneof("value")
                            value = getattr(point, which) if which else None
                        else:
                            value = point.sum
                            count = point.count
                            if kind == "histogram":
                                bucket_counts = list(point.bucket_counts)
                                bounds = list(point.explicit_bounds)
                        out.append(
                            MetricPoint(
                                name=metric.name,
                                unit=metric.unit,
                                type=kind,
                                attributes=_attributes(point.attributes),
                                resource=resource,
                                value=value,
                                count=count,
                                bucket_counts=bucket_counts,
                                explicit_bounds=bounds,
                            )
                        )
        return out

    # -- test side -------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Base URL for OTEL_EXPORTER_OTLP_ENDPOINT (the exporters append /v1/traces, /v1/metrics)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def exporter_env(self, metric_interval_ms: int = 60_000, **extra: str) -> dict[str, str]:
        """The environment that points a gateway's OTLP exporters here: protobuf, spans sent
        within 100 ms, metrics every `metric_interval_ms` (a minute: tests read /metrics)."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": str(metric_interval_ms),
            **extra,
        }

    @property
    def traces_endpoint(self) -> str:
        return f"{self.endpoint}/v1/traces"

    @property
    def metrics_endpoint(self) -> str:
        return f"{self.endpoint}/v1/metrics"

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def metric_points(self, name: str | None = None) -> list[MetricPoint]:
        with self._lock:
            return [p for p in self._points if name is None or p.name == name]

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._points.clear()
            self.requests.clear()

    def wait_for_spans(
        self, predicate: Callable[[list[ReceivedSpan]], bool] | None = None, timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """All spans, once `predicate(spans)` holds (default: at least one span); TimeoutError otherwise."""
        check = predicate or bool
        return self._wait(lambda: self._spans, check, timeout, "spans")

    def wait_for_span(self, predicate: Callable[[ReceivedSpan], bool], timeout: float = 10.0) -> ReceivedSpan:
        """The first span for which `predicate(span)` holds."""
        spans = self.wait_for_spans(lambda spans: any(predicate(s) for s in spans), timeout)
        return next(s for s in spans if predicate(s))

    def wait_for_request_span(self, trace_id: str, timeout: float = 10.0) -> ReceivedSpan:
        """The request's span of a trace: not one of its upstream attempts' (`UpstreamAttempt ...`)."""
        return self.wait_for_span(lambda s: s.trace_id == trace_id and not s.name.startswith("UpstreamAttempt"), timeout)

    def wait_for_metrics(
        self, predicate: Callable[[list[MetricPoint]], bool] | None = None, timeout: float = 10.0
    ) -> list[MetricPoint]:
        check = predicate or bool
        return self._wait(lambda: self._points, check, timeout, "metric points")

    def _wait(self, items: Callable[[], list[Any]], check: Callable[[list[Any]], bool], timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                current = list(items())
                if check(current):
                    return current
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({getattr(i, "name", "?") for i in current})
                    raise TimeoutError(f"no matching {what} after {timeout}s; received {len(current)}: {names}")
                self._lock.wait(min(remaining, 0.1))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
