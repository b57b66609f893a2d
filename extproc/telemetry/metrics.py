"""OpenTelemetry GenAI metrics for every routed request, plus the gateway's own overhead.

Instruments (names, units and bucket boundaries from the GenAI semantic conventions,
metrics page, released v1.41 set; the boundaries are set with SDK views):

- ``gen_ai.client.token.usage`` (``{token}``): one measurement per token type, with
  ``gen_ai.token.type``. ``input`` and ``output`` are recorded whenever the usage is known
  (failed requests carry no usage). Cached input and reasoning tokens are recorded as well,
  only when the provider reported more than zero of them. The conventions (and the
  installed ``opentelemetry-semantic-conventions``, whose ``GenAiTokenTypeValues`` lists
  only ``input`` and ``output``) define no value for those, and allow a custom one, so they
  are ``input_cached`` and ``output_reasoning``. They are subsets: ``input`` already
  counts the cached input tokens and ``output`` the reasoning tokens, as providers report
  them, so do not add the four types together.
- ``gen_ai.server.request.duration`` (``s``): every request, with ``error.type`` when it
  failed (the upstream's error type or HTTP status, ``no_response``, ``incomplete``).
- ``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token``
  (``s``): streams only, and, as the conventions define them, successful responses only.
- ``extproc.processor.duration`` (``s``): the time the processor itself spent on a
  request (upstream excluded), with only ``gen_ai.operation.name`` and ``stream``.
- ``extproc.cost`` (a counter, no unit: each configured cost's own): the sum of every
  configured cost (``costs[]``) over successful requests, one series per ``cost`` (its
  ``metadata_key``), with the request's attributes (model, provider, tenant...).
- ``mcp.request.duration`` (``s``) and ``mcp.requests`` (``{request}``): one per message the
  MCP gateway (``extproc.mcp``) answered, with ``mcp.method.name``, ``mcp.tool.name``,
  ``mcp.server`` and ``error.type`` when known (``record_mcp_request``).

Attributes: ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``
(the model the backend was asked for), ``gen_ai.response.model`` (when known),
``server.address`` and ``server.port`` (the port is conditionally required by the
conventions when the address is set), ``gen_ai.original.model`` (the client's model, only
when the gateway overrode it), and the configured request-header attributes. Each header
attribute passes at most ``max_attribute_values`` distinct values (truncated to 128
characters); later new values become ``other``.

Exemplars: for a request whose span was sampled, the duration histograms (request
duration, TTFT, time per output token, processor duration) keep its trace and span id as
the exemplar of the bucket each value fell in (the newest per bucket; ``exemplars``);
/metrics renders them only in OpenMetrics (telemetry/exemplars.py, merge.merge_openmetrics).

Export: Prometheus text from a private registry (``render_prometheus``, served by the
admin port), and OTLP (``http/protobuf`` or ``grpc``) when ``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` is set. The endpoint, protocol, headers,
``OTEL_METRIC_EXPORT_INTERVAL``/``_TIMEOUT``, ``OTEL_METRICS_EXPORTER=none``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SDK_DISABLED`` come from
the given environment; the exporters read their other ``OTEL_EXPORTER_OTLP_*`` settings
(timeout, compression, certificates, temporality) from the process environment.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from extproc import __version__
from extproc.contract import Attr, Metric
from extproc.config import TelemetrySettings
from extproc.telemetry.exemplars import Exemplar, ExemplarStore, Histogram, Key, Labels, series_labels
from extproc.telemetry.record import RequestRecord

log = logging.getLogger(__name__)


SCHEMA_URL = "https://opentelemetry.io/schemas/1.41.0"
METER_NAME = "extproc"

# Instrument and attribute names: spelled in extproc/contract.py.

# Explicit bucket boundaries: the conventions' for the gen_ai metrics, 10 µs..100 ms for ours.
TOKEN_USAGE_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)
REQUEST_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)
TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
PROCESSOR_DURATION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)
# The MCP semantic conventions' boundaries for mcp.*.operation.duration.
MCP_REQUEST_DURATION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)

# Attribute names.
CORE_ATTRIBUTES = frozenset(
    {Attr.OPERATION_NAME, Attr.PROVIDER_NAME, Attr.REQUEST_MODEL, Attr.RESPONSE_MODEL, Attr.ORIGINAL_MODEL,
     Attr.TOKEN_TYPE, Attr.SERVER_ADDRESS, Attr.SERVER_PORT, Attr.ERROR_TYPE, Attr.COST_KEY}
)

# gen_ai.token.type values: the conventions' two, then the custom ones (see the module docstring).
TOKEN_INPUT = "input"
TOKEN_OUTPUT = "output"
TOKEN_INPUT_CACHED = "input_cached"
TOKEN_OUTPUT_REASONING = "output_reasoning"

# The histograms that carry exemplars (the trace of the latest sampled request per bucket).
_DURATION = Histogram(Metric.REQUEST_DURATION, "s", REQUEST_DURATION_BUCKETS)
_TTFT = Histogram(Metric.TIME_TO_FIRST_TOKEN, "s", TIME_TO_FIRST_TOKEN_BUCKETS)
_TPOT = Histogram(Metric.TIME_PER_OUTPUT_TOKEN, "s", TIME_PER_OUTPUT_TOKEN_BUCKETS)
_PROCESSOR = Histogram(Metric.PROCESSOR_DURATION, "s", PROCESSOR_DURATION_BUCKETS)

OTHER = "other"  # replaces header-attribute values past the cap
MAX_VALUE_CHARS = 128
_MAX_CACHED_ATTRIBUTE_SETS = 4096


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _millis(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        log.warning("%s=%r is not a positive number of milliseconds; using %g", name, raw, default)
        return default
    return value


def _resource_attributes(raw: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES: comma-separated key=value, percent-encoded."""
    out: dict[str, str] = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if sep and key:
            out[unquote(key)] = unquote(value.strip())
    return out


def _otlp_reader(environ: Mapping[str, str]) -> MetricReader | None:
    """A periodic OTLP reader when an OTLP endpoint is configured, else None."""
    signal_endpoint = (environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or "").strip()
    base_endpoint = (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
    if not signal_endpoint and not base_endpoint:
        return None
    exporters = {v.strip().lower() for v in (environ.get("OTEL_METRICS_EXPORTER") or "").split(",")}
    if "none" in exporters:
        return None
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip().lower()
    from opentelemetry.util.re import parse_env_headers

    headers = dict(
        parse_env_headers(
            environ.get("OTEL_EXPORTER_OTLP_METRICS_HEADERS") or environ.get("OTEL_EXPORTER_OTLP_HEADERS") or "",
            liberal=True,
        )
    )
    exporter: Any
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        exporter = GrpcExporter(endpoint=signal_endpoint or base_endpoint, headers=headers or None)
    else:
        if protocol != "http/protobuf":
            log.warning("OTLP protocol %r is not supported for metrics; using http/protobuf", protocol)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        endpoint = signal_endpoint or base_endpoint.rstrip("/") + "/v1/metrics"
        exporter = HttpExporter(endpoint=endpoint, headers=headers or None)
    return PeriodicExportingMetricReader(
        exporter,
        export_interval_millis=_millis(environ, "OTEL_METRIC_EXPORT_INTERVAL", 60_000),
        export_timeout_millis=_millis(environ, "OTEL_METRIC_EXPORT_TIMEOUT", 30_000),
    )


class _ValueCap:
    """At most `limit` distinct values per configured attribute; later new values are 'other'."""

    __slots__ = ("limit", "seen")

    def __init__(self, names: set[str], limit: int) -> None:
        self.limit = limit
        self.seen: dict[str, set[str]] = {name: set() for name in names}

    def value(self, name: str, value: str) -> str | None:
        seen = self.seen.get(name)
        if seen is None:  # not a configured attribute: never passed through
            return None
        if len(value) > MAX_VALUE_CHARS:
            value = value[:MAX_VALUE_CHARS]
        if value in seen:
            return value
        if len(seen) < self.limit:
            seen.add(value)
            return value
        return OTHER


class _AttributeSets:
    """The attribute dicts for one combination of request facts, built once and reused.

    The SDK only reads the dicts it is given, so they are shared between measurements.
    """

    __slots__ = ("input", "output", "input_cached", "output_reasoning", "duration", "latency", "costs",
                 "duration_labels", "latency_labels")

    def __init__(self, base: dict[str, Any], error_type: str | None) -> None:
        self.latency = base
        self.duration = {**base, Attr.ERROR_TYPE: error_type} if error_type else base
        self.input = {**base, Attr.TOKEN_TYPE: TOKEN_INPUT}
        self.output = {**base, Attr.TOKEN_TYPE: TOKEN_OUTPUT}
        self.input_cached = {**base, Attr.TOKEN_TYPE: TOKEN_INPUT_CACHED}
        self.output_reasoning = {**base, Attr.TOKEN_TYPE: TOKEN_OUTPUT_REASONING}
        self.costs: dict[str, dict[str, Any]] = {}
        self.duration_labels = series_labels(self.duration)  # exemplar keys
        self.latency_labels = series_labels(self.latency)

    def cost(self, key: str) -> dict[str, Any]:
        """The attributes for one cost key (few: the configured costs), built once."""
        attributes = self.costs.get(key)
        if attributes is None:
            attributes = self.costs[key] = {**self.latency, Attr.COST_KEY: key}
        return attributes


class Metrics:
    """OpenTelemetry GenAI metrics (released semantic conventions) + the gateway's own overhead."""

    otlp_enabled = False  # an OTLP reader is exporting

    def __init__(self, settings: TelemetrySettings, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.enabled = not _is_true(environ.get("OTEL_SDK_DISABLED"))
        self._registry = CollectorRegistry(auto_describe=False)
        self._render_lock = threading.Lock()
        self._closed = False
        self._provider: MeterProvider | None = None
        self._attribute_sets: dict[tuple[Any, ...], _AttributeSets] = {}
        self._processor_attributes: dict[tuple[str, bool], tuple[dict[str, Any], Labels]] = {}
        self._exemplars = ExemplarStore()
        header_names = set(settings.metric_header_attributes.values())
        if settings.tenant_attribute:
            header_names.add(settings.tenant_attribute)
        clashes = header_names & CORE_ATTRIBUTES
        if clashes:
            log.warning("metric header attributes %s clash with GenAI attributes; ignored", sorted(clashes))
            header_names -= clashes
        self._cap = _ValueCap(header_names, settings.max_attribute_values)
        if not self.enabled:
            return

        readers: list[MetricReader] = [PrometheusMetricReader(registry=self._registry)]
        try:
            otlp = _otlp_reader(environ)
        except Exception as exc:  # a bad exporter setting must not stop the gateway
            log.warning("OTLP metrics export disabled: %s", exc)
            otlp = None
        if otlp is not None:
            readers.append(otlp)
        self.otlp_enabled = otlp is not None

        attributes: dict[str, Any] = _resource_attributes(environ.get("OTEL_RESOURCE_ATTRIBUTES") or "")
        attributes["service.name"] = environ.get("OTEL_SERVICE_NAME") or attributes.get("service.name") or "extproc"
        attributes.setdefault("service.version", __version__)
        views = [
            View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(boundaries=buckets))
            for name, buckets in (
                (Metric.TOKEN_USAGE, TOKEN_USAGE_BUCKETS),
                (Metric.REQUEST_DURATION, REQUEST_DURATION_BUCKETS),
                (Metric.TIME_TO_FIRST_TOKEN, TIME_TO_FIRST_TOKEN_BUCKETS),
                (Metric.TIME_PER_OUTPUT_TOKEN, TIME_PER_OUTPUT_TOKEN_BUCKETS),
                (Metric.PROCESSOR_DURATION, PROCESSOR_DURATION_BUCKETS),
                (Metric.MCP_REQUEST_DURATION, MCP_REQUEST_DURATION_BUCKETS),
            )
        ]
        self._provider = MeterProvider(
            metric_readers=readers,
            resource=Resource.create(attributes),
            views=views,
            shutdown_on_exit=otlp is not None,  # flush OTLP at exit even if shutdown() was missed
        )
        meter = self._provider.get_meter(METER_NAME, __version__, schema_url=SCHEMA_URL)
        self._meter = meter
        self._token_usage = meter.create_histogram(
            Metric.TOKEN_USAGE, unit="{token}", description="Number of input and output tokens used."
        )
        self._request_duration = meter.create_histogram(
            Metric.REQUEST_DURATION,
            unit="s",
            description="Generative AI server request duration such as time-to-last byte or last output token.",
        )
        self._time_to_first_token = meter.create_histogram(
            Metric.TIME_TO_FIRST_TOKEN, unit="s", description="Time to generate first token for successful responses."
        )
        self._time_per_output_token = meter.create_histogram(
            Metric.TIME_PER_OUTPUT_TOKEN,
            unit="s",
            description="Time per output token generated after the first token for successful responses.",
        )
        self._processor_duration = meter.create_histogram(
            Metric.PROCESSOR_DURATION,
            unit="s",
            description="Time the processor spent on a request, upstream excluded.",
        )
        self._mcp_duration = meter.create_histogram(
            Metric.MCP_REQUEST_DURATION, unit="s", description="MCP gateway: time to answer one client message."
        )
        self._mcp_requests = meter.create_counter(
            Metric.MCP_REQUESTS, unit="{request}", description="MCP gateway: client messages answered."
        )
        self._cost = meter.create_counter(
            Metric.COST, description="Configured costs of successful requests, by cost key (costs[].metadata_key)."
        )

    def watch_rate_limit_service(self, service: Any) -> None:
        """Count the built-in rate limit service's store failures (`failures`: reason -> n)."""
        if self._provider is None:
            return

        def observe(_options: CallbackOptions) -> list[Observation]:
            return [Observation(count, {"reason": reason}) for reason, count in service.failures.items()]

        self._meter.create_observable_counter(
            Metric.RATELIMIT_STORE_ERRORS,
            callbacks=[observe],
            unit="{error}",
            description="Rate limit store calls that failed; Envoy then applied its failure mode.",
        )

    def watch_affinity_store(self, store: Any) -> None:
        """Count the Responses affinity store's failures (`errors`; `kind`: redis or sqlite):
        each one sent a follow-up where its route's policy sends any request."""
        if self._provider is None:
            return

        def observe(_options: CallbackOptions) -> list[Observation]:
            return [Observation(store.errors, {"store": store.kind})]

        self._meter.create_observable_counter(
            Metric.AFFINITY_ERRORS,
            callbacks=[observe],
            unit="{error}",
            description="Responses affinity store calls that failed (the request went where its route sends it).",
        )

    def watch_processor_messages(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Export the ext_proc messages the processor answered, by stage and phase, from a
        plain dict it counts into (`(stage, phase) -> n`): adding to an OpenTelemetry
        counter per message would cost more than the count is worth. Divided by requests,
        it is the gateway's main cost driver (each message costs the same transport work)."""
        if self._provider is None:
            return

        def observe(_options: CallbackOptions) -> list[Observation]:
            return [Observation(n, {"stage": stage, "phase": phase}) for (stage, phase), n in list(counts.items())]

        self._meter.create_observable_counter(
            Metric.PROCESSOR_MESSAGES,
            callbacks=[observe],
            unit="{message}",
            description="ext_proc messages the processor answered, by stage (request, upstream) and phase.",
        )

    def record_mcp_request(self, duration: float, attributes: Mapping[str, str]) -> None:
        """Count one message the MCP gateway answered (`mcp.requests`, `mcp.request.duration`).

        `attributes`: `mcp.method.name`, `mcp.tool.name`, `mcp.server`, `error.type`, each only
        when known; the caller keeps their values bounded. Cheap, and never raises."""
        if self._provider is None or self._closed:
            return
        try:
            self._mcp_duration.record(max(duration, 0.0), attributes)
            self._mcp_requests.add(1, attributes)
        except Exception:
            log.debug("MCP metrics not recorded", exc_info=True)

    def record(self, record: RequestRecord, trace: tuple[int, int] | None = None) -> None:
        """Record one finished request. Cheap, and never raises.

        `trace`: the (trace id, span id) of the request's sampled span: kept as the exemplar of
        the buckets its durations fall in."""
        if self._provider is None or self._closed:
            return
        try:
            self._record(record, trace)
        except Exception:
            log.debug("metrics for a request not recorded", exc_info=True)

    def exemplars(self) -> dict[Key, Exemplar]:
        """This worker's histogram exemplars (for OpenMetrics /metrics)."""
        return self._exemplars.snapshot()

    def _record(self, record: RequestRecord, trace: tuple[int, int] | None) -> None:
        sets = self._attributes(record)
        usage = record.usage
        if usage is not None:
            tokens = self._token_usage
            tokens.record(usage.input_tokens, sets.input)
            tokens.record(usage.output_tokens, sets.output)
            cached, reasoning = usage.cached_input_tokens, usage.reasoning_tokens
            if cached and cached > 0:
                tokens.record(cached, sets.input_cached)
            if reasoning and reasoning > 0:
                tokens.record(reasoning, sets.output_reasoning)
        duration = max(record.duration, 0.0)
        self._request_duration.record(duration, sets.duration)
        exemplars = self._exemplars if trace is not None else None
        now = time.time() if trace is not None else 0.0
        if exemplars is not None and trace is not None:
            exemplars.record(_DURATION, sets.duration_labels, duration, trace[0], trace[1], now)
        for cost_key, value in record.costs.items():
            if value > 0:
                self._cost.add(value, sets.cost(cost_key))
        if record.stream and record.error_type is None:
            ttft = record.time_to_first_token
            if ttft is not None:
                ttft = max(ttft, 0.0)
                self._time_to_first_token.record(ttft, sets.latency)
                if exemplars is not None and trace is not None:
                    exemplars.record(_TTFT, sets.latency_labels, ttft, trace[0], trace[1], now)
                tpot = record.time_per_output_token
                if tpot is not None:
                    tpot = max(tpot, 0.0)
                    self._time_per_output_token.record(tpot, sets.latency)
                    if exemplars is not None and trace is not None:
                        exemplars.record(_TPOT, sets.latency_labels, tpot, trace[0], trace[1], now)
        key = (record.operation, record.stream)
        processor = self._processor_attributes.get(key)
        if processor is None:
            attributes: dict[str, Any] = {Attr.OPERATION_NAME: record.operation, Attr.STREAM: record.stream}
            processor = self._processor_attributes[key] = (attributes, series_labels(attributes))
        self._processor_duration.record(record.processor_seconds, processor[0])
        if exemplars is not None and trace is not None:
            exemplars.record(_PROCESSOR, processor[1], record.processor_seconds, trace[0], trace[1], now)

    def _attributes(self, record: RequestRecord) -> _AttributeSets:
        headers: tuple[tuple[str, str], ...] = ()
        if record.attributes:
            cap = self._cap
            capped = []
            for name, value in record.attributes.items():
                shown = cap.value(name, value)
                if shown is not None:
                    capped.append((name, shown))
            headers = tuple(capped)
        original = record.request_model if record.request_model != record.backend_model else None
        key = (
            record.operation, record.provider, record.backend_model, record.response_model, record.server_address,
            record.server_port, original, record.error_type, headers,
        )
        sets = self._attribute_sets.get(key)
        if sets is not None:
            return sets
        base: dict[str, Any] = dict(headers)
        base[Attr.OPERATION_NAME] = record.operation
        base[Attr.PROVIDER_NAME] = record.provider
        if record.backend_model:
            base[Attr.REQUEST_MODEL] = record.backend_model
        if record.response_model:
            base[Attr.RESPONSE_MODEL] = record.response_model
        if record.server_address:
            base[Attr.SERVER_ADDRESS] = record.server_address
            if record.server_port:
                base[Attr.SERVER_PORT] = record.server_port
        if original:
            base[Attr.ORIGINAL_MODEL] = original
        sets = _AttributeSets(base, record.error_type)
        if len(self._attribute_sets) >= _MAX_CACHED_ATTRIBUTE_SETS:
            self._attribute_sets.clear()  # bounded memory; rebuilt on demand
        self._attribute_sets[key] = sets
        return sets

    def render_prometheus(self) -> tuple[bytes, str]:
        """The Prometheus text exposition for GET /metrics: (body, content type)."""
        try:
            with self._render_lock:
                return generate_latest(self._registry), CONTENT_TYPE_LATEST
        except Exception:
            log.warning("metrics not rendered", exc_info=True)
            return b"", CONTENT_TYPE_LATEST

    def shutdown(self) -> None:
        """Flush OTLP and stop the readers; record() does nothing afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._provider is not None:
            try:
                self._provider.shutdown()
            except Exception:
                log.warning("metrics shutdown failed", exc_info=True)
