"""OpenInference traces: one span per routed request, exported over OTLP.

The span is started when the request arrives (so its id can be injected into the upstream
request as `traceparent`) and is filled in and ended once, from the `RequestRecord`, when
Envoy ends the stream. Nothing is exported on the request path: spans go to a
`BatchSpanProcessor`, whose own thread talks to the collector.

Span shape, chosen to look like what `openinference-instrumentation-openai` records for the
same call, so Phoenix and Arize show gateway spans like SDK-instrumented ones:

- name `ChatCompletion` / `Completion` / `CreateEmbeddings` (the OpenInference embedding
  spec and Envoy AI Gateway use `CreateEmbeddings`);
- OpenTelemetry kind INTERNAL, as the OpenInference instrumentors, the OpenInference spec
  examples and Envoy AI Gateway emit; the LLM-ness is in `openinference.span.kind`;
- attributes named by `openinference.semconv.trace` constants, and filtered by
  `openinference.instrumentation.OITracer` with a `TraceConfig` built from the
  `OPENINFERENCE_*` variables: the library does every hide/redact decision.

With `telemetry.span_conventions` naming `gen_ai`, spans also (or only) carry the
OpenTelemetry GenAI attributes (`extproc.telemetry.genai`) and are named as those conventions
name them, `{gen_ai.operation.name} {gen_ai.request.model}`; with only `gen_ai`, of kind CLIENT.

Each upstream attempt (fallbacks, retries) gets a span of its own, a child of the request's
(`start_attempt` / `finish_attempt`, from the upstream stage): name `UpstreamAttempt
{backend}`, the backend's own request and response bodies (`attempt_attributes`).

This module owns the OpenTelemetry side (provider, export, propagation, span lifetime);
which attributes a finished span carries, and their size bounds, are decided in
`extproc.telemetry.span_attributes`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, Final

from openinference.instrumentation import OITracer, TraceConfig
from openinference.instrumentation.config import OPENINFERENCE_BLOB_UPLOADER
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from openinference.semconv.trace import OpenInferenceSpanKindValues
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.util.types import AttributeValue
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from extproc.config import TelemetrySettings
from extproc.contract import ClientApi
from extproc.telemetry.attempt_attributes import ATTEMPT_SPAN_NAME, apply_attempt
from extproc.telemetry.genai import span_name
from extproc.telemetry.record import AttemptRecord, RequestRecord
from extproc.telemetry.span_attributes import GEN_AI, apply_record

log = logging.getLogger(__name__)

__all__ = ["API_SPAN_NAMES", "SpanHandle", "Tracing", "SPAN_NAMES"]

# operation (gen_ai.operation.name) -> span name, as openinference-instrumentation-openai names them
SPAN_NAMES: Final[dict[str, str]] = {
    "chat": "ChatCompletion",
    "text_completion": "Completion",
    "embeddings": "CreateEmbeddings",
}
# client APIs whose calls the OpenInference instrumentations name otherwise (anthropic: Messages;
# openai: the response type, Response)
API_SPAN_NAMES: Final[dict[str, str]] = {
    ClientApi.ANTHROPIC_MESSAGES: "Messages",
    ClientApi.OPENAI_RESPONSES: "Response",
    ClientApi.ANTHROPIC_COUNT_TOKENS: "MessageTokensCount",
    ClientApi.OPENAI_INPUT_TOKENS: "InputTokenCount",
    ClientApi.OPENAI_IMAGES: "ImagesResponse",
    ClientApi.OPENAI_TRANSCRIPTIONS: "Transcription",
    ClientApi.OPENAI_TRANSLATIONS: "Translation",
    ClientApi.OPENAI_SPEECH: "Speech",
    ClientApi.RERANK: "Rerank",
}
SPAN_KIND: Final = SpanKind.INTERNAL
# With only the GenAI conventions: CLIENT, as they ask of a call to a model in another process.
GENAI_SPAN_KIND: Final = SpanKind.CLIENT

# Attribute slots kept free for what the SDK or OpenInference add (span kind at end()).
_RESERVED_ATTRIBUTES: Final = 4

_OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
_OTEL_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
_BSP_OPTIONS: Final = (
    ("OTEL_BSP_SCHEDULE_DELAY", "schedule_delay_millis"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size"),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "max_export_batch_size"),
    ("OTEL_BSP_EXPORT_TIMEOUT", "export_timeout_millis"),
)

_PROPAGATOR = TraceContextTextMapPropagator()
_PROPAGATED = ("traceparent", "tracestate")


class SpanHandle:
    """The span of one request, between `Tracing.start` and `Tracing.finish`."""

    __slots__ = ("span", "start_time_ns", "header_user_id", "_ended")

    def __init__(self, span: Span, start_time_ns: int, header_user_id: str | None) -> None:
        self.span = span
        self.start_time_ns = start_time_ns
        self.header_user_id = header_user_id
        self._ended = False

    @property
    def is_recording(self) -> bool:
        """False when the span is sampled out (e.g. the client's traceparent says not sampled)."""
        return self.span.is_recording()

    def ids(self) -> dict[str, str]:
        """Trace and span id in hex (W3C form), for the access log; empty when the context is invalid."""
        context = self.span.get_span_context()
        if not context.is_valid:
            return {}
        return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"


def _trace_config(env: Mapping[str, str]) -> TraceConfig:
    """A TraceConfig from `env` (not necessarily os.environ), parsed as TraceConfig parses its variables."""
    kwargs: dict[str, Any] = {}
    for f in fields(TraceConfig):
        var = f.metadata.get("env_var")
        if not var or var not in env:
            continue
        raw = env[var].strip()
        default = f.metadata.get("default_value")
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false"):
                    raise ValueError(raw)
                kwargs[f.name] = raw.lower() == "true"
            elif isinstance(default, int):
                kwargs[f.name] = int(raw)
            else:
                continue
        except ValueError:
            log.warning("%s=%r is not valid; using the default %r", var, raw, default)
    # The OpenInference configuration spec says hiding inputs, input messages or input text
    # also hides embedding input text; TraceConfig.mask only looks at hide_embeddings_text.
    if any(kwargs.get(name) for name in ("hide_inputs", "hide_input_messages", "hide_input_text")):
        kwargs["hide_embeddings_text"] = True
    if env is not os.environ and (uploader_name := env.get(OPENINFERENCE_BLOB_UPLOADER)):
        from openinference.instrumentation import load_blob_uploader

        if (uploader := load_blob_uploader(uploader_name)) is not None:
            kwargs["blob_uploader"] = uploader
    # Fields absent from `env` fall back to TraceConfig's own defaults: give them explicitly
    # so os.environ is not consulted when `env` is another mapping.
    for f in fields(TraceConfig):
        if f.name in kwargs or not f.metadata.get("env_var"):
            continue
        default = f.metadata.get("default_value", MISSING)
        if default is not MISSING and default is not None:
            kwargs[f.name] = default
    return TraceConfig(**kwargs)


class Tracing:
    """Creates, fills and exports the gateway's OpenInference spans.

    `enabled`: OTLP traces are configured (an `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, no
    `OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER` not `none`) or a `span_processor` was given.
    `records_content`: enabled, and the `OPENINFERENCE_HIDE_*` settings leave something of the
    request body or output to record; when False the caller need not keep the request body
    or assemble output messages.

    `environ` defaults to the process environment. When another mapping is given (tests), it
    supplies the switches above, the `OPENINFERENCE_*` settings, `OTEL_SERVICE_NAME`, the
    OTLP endpoint, `OTEL_BSP_*` and the span attribute count limit; the exporters' TLS,
    headers, timeout and compression, and the sampler, always come from the process
    environment.
    """

    def __init__(
        self,
        settings: TelemetrySettings,
        environ: Mapping[str, str] | None = None,
        span_processor: SpanProcessor | None = None,
    ) -> None:
        process_env = environ is None or environ is os.environ
        env: Mapping[str, str] = os.environ if environ is None else environ
        self._limit = settings.max_content_chars
        self._provider: TracerProvider | None = None
        self._tracer: OITracer | None = None
        self._config = _trace_config(env)
        self._user_header = settings.user_id_header
        self._conventions = tuple(settings.span_conventions)
        self._kind = SPAN_KIND if "openinference" in self._conventions else GENAI_SPAN_KIND

        exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()}
        endpoint_set = bool(env.get(_OTEL_TRACES_ENDPOINT) or env.get(_OTEL_ENDPOINT))
        otlp = endpoint_set and "none" not in exporters
        if otlp and exporters - {"otlp"}:
            log.warning("OTEL_TRACES_EXPORTER=%s: only otlp is supported for traces", ",".join(sorted(exporters)))
        self.enabled: bool = not _truthy(env.get("OTEL_SDK_DISABLED")) and (otlp or span_processor is not None)
        config = self._config
        fully_hidden = config.hide_inputs and config.hide_outputs and config.hide_llm_invocation_parameters
        self.records_content: bool = self.enabled and not fully_hidden
        if not self.enabled:
            return

        self._span_limits = _span_limits(env, process_env)
        provider = TracerProvider(resource=_resource(env), span_limits=self._span_limits)
        if span_processor is not None:
            provider.add_span_processor(span_processor)
        if otlp:
            provider.add_span_processor(_batch_processor(env, process_env))
        self._provider = provider
        self._tracer = OITracer(provider.get_tracer("extproc.telemetry.tracing"), config=config)
        max_attributes = self._span_limits.max_span_attributes
        self._max_attributes = None if max_attributes is None else max(8, max_attributes - _RESERVED_ATTRIBUTES)

    # -- request path -----------------------------------------------------------------------

    def start(
        self, operation: str, headers: Mapping[str, bytes], start_time_ns: int, client_api: str | None = None
    ) -> SpanHandle | None:
        """Start the request's span as a child of the client's W3C trace context in `headers`,
        named after the client API's call (`client_api`, e.g. anthropic.messages) or the operation."""
        if self._tracer is None:
            return None
        try:
            carrier = {name: _header(headers, name) for name in _PROPAGATED if name in headers}
            parent: Context | None = _PROPAGATOR.extract(carrier) if carrier else Context()
            name = API_SPAN_NAMES.get(client_api or "") or SPAN_NAMES.get(operation, operation or "LLM")
            span = self._tracer.start_span(
                name,
                context=parent,
                kind=self._kind,
                start_time=start_time_ns,
            )
            user = None
            if self._user_header and self._user_header in headers:
                user = _header(headers, self._user_header) or None
            return SpanHandle(span, start_time_ns, user)
        except Exception:
            log.debug("could not start a span", exc_info=True)
            return None

    def start_span(
        self,
        name: str,
        carrier: Mapping[str, str],
        openinference_kind: OpenInferenceSpanKindValues,
        attributes: Mapping[str, AttributeValue] | None = None,
        start_time_ns: int | None = None,
    ) -> SpanHandle | None:
        """Start a span of any OpenInference kind (e.g. the MCP gateway's TOOL and CHAIN spans)
        as a child of the W3C trace context in `carrier` (`traceparent`, `tracestate`; none:
        a new trace). The caller adds attributes and ends it with `end_span`. Attributes pass
        through the same `TraceConfig` masking as the LLM spans. None when tracing is off."""
        if self._tracer is None:
            return None
        try:
            started = time.time_ns() if start_time_ns is None else start_time_ns
            present = {key: carrier[key] for key in _PROPAGATED if carrier.get(key)}
            parent: Context = _PROPAGATOR.extract(present) if present else Context()
            span = self._tracer.start_span(
                name,
                context=parent,
                kind=SPAN_KIND,
                attributes=dict(attributes) if attributes else None,
                start_time=started,
                openinference_span_kind=openinference_kind,
            )
            return SpanHandle(span, started, None)
        except Exception:
            log.debug("could not start a span", exc_info=True)
            return None

    def end_span(
        self,
        span: SpanHandle,
        attributes: Mapping[str, AttributeValue] | None = None,
        error: str | None = None,
        end_time_ns: int | None = None,
    ) -> None:
        """Set the last attributes, ERROR status with `error` as its description when given,
        and end a span from `start_span` (once). Never raises."""
        try:
            if span._ended:
                return
            span._ended = True
            if span.span.is_recording():
                if attributes:
                    span.span.set_attributes(dict(attributes))
                if error is not None:
                    span.span.set_status(Status(StatusCode.ERROR, error))
            span.span.end(end_time=end_time_ns)
        except Exception:
            log.debug("could not end span", exc_info=True)

    def inject(self, span: SpanHandle) -> list[tuple[str, bytes]]:
        """`traceparent` (and `tracestate`) naming the gateway span, for the upstream request."""
        try:
            if not span.span.get_span_context().is_valid:  # e.g. instrumentation suppressed
                return []
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier, context=set_span_in_context(span.span))
            return [(name, value.encode("latin-1")) for name, value in carrier.items() if value]
        except Exception:
            log.debug("could not inject trace context", exc_info=True)
            return []

    def finish(self, span: SpanHandle, record: RequestRecord) -> None:
        """Record everything known about the request and end the span. Never raises."""
        try:
            if span._ended:
                return
            span._ended = True
        except Exception:
            log.debug("not a span handle: %r", span)
            return
        end_ns: int | None = None
        try:
            end_ns = span.start_time_ns + max(0, int(record.duration * 1e9))
            if span.span.is_recording():
                apply_record(span.span, record, self._config, self._limit, self._max_attributes, span.header_user_id,
                             self._conventions)
                if GEN_AI in self._conventions:
                    span.span.update_name(span_name(record))
        except Exception:
            log.debug("could not record span attributes", exc_info=True)
        try:
            span.span.end(end_time=end_ns)
        except Exception:
            log.debug("could not end span", exc_info=True)

    # -- upstream attempts -----------------------------------------------------------------

    def start_attempt(self, headers: Mapping[str, bytes], backend: str, start_time_ns: int) -> SpanHandle | None:
        """Start one upstream attempt's span as a child of the request's span, which the
        request stage named in the `traceparent` it set towards upstream (Envoy's router
        hands every attempt the same request headers)."""
        if self._tracer is None:
            return None
        try:
            carrier = {name: _header(headers, name) for name in _PROPAGATED if name in headers}
            parent: Context = _PROPAGATOR.extract(carrier) if carrier else Context()
            span = self._tracer.start_span(
                f"{ATTEMPT_SPAN_NAME} {backend}",
                context=parent,
                kind=SPAN_KIND,
                start_time=start_time_ns,
                openinference_span_kind=OpenInferenceSpanKindValues.LLM,
            )
            return SpanHandle(span, start_time_ns, None)
        except Exception:
            log.debug("could not start an attempt span", exc_info=True)
            return None

    def finish_attempt(self, span: SpanHandle, record: AttemptRecord, end_time_ns: int) -> None:
        """Record what the attempt sent and got back, and end its span (once). Never raises."""
        try:
            if span._ended:
                return
            span._ended = True
            if span.span.is_recording():
                apply_attempt(span.span, record, self._config, self._limit, self._max_attributes)
        except Exception:
            log.debug("could not record attempt span attributes", exc_info=True)
        try:
            span.span.end(end_time=end_time_ns)
        except Exception:
            log.debug("could not end attempt span", exc_info=True)

    def shutdown(self) -> None:
        provider, self._provider, self._tracer = self._provider, None, None
        if provider is not None:
            try:
                provider.shutdown()
            except Exception:
                log.debug("tracer provider shutdown failed", exc_info=True)


def _header(headers: Mapping[str, bytes], name: str) -> str:
    value = headers[name]
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


def _resource(env: Mapping[str, str]) -> Resource:
    detected = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME of the process
    name = env.get("OTEL_SERVICE_NAME")
    if not name:
        current = str(detected.attributes.get(SERVICE_NAME, ""))
        name = current if current and not current.startswith("unknown_service") else "extproc"
    return detected.merge(Resource({SERVICE_NAME: name}))


def _span_limits(env: Mapping[str, str], process_env: bool) -> SpanLimits:
    if process_env:
        return SpanLimits()
    raw = env.get("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT") or env.get("OTEL_ATTRIBUTE_COUNT_LIMIT")
    try:
        return SpanLimits(max_span_attributes=int(raw)) if raw else SpanLimits()
    except ValueError:
        return SpanLimits()


def _batch_processor(env: Mapping[str, str], process_env: bool) -> BatchSpanProcessor:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "").strip()
    grpc = protocol.lower() == "grpc"
    if protocol and not grpc and protocol.lower() != "http/protobuf":
        log.warning("OTLP protocol %r is not supported for traces; using http/protobuf", protocol)
    # The exporters read their own OTEL_EXPORTER_OTLP_* variables. Only when `env` is not the
    # process environment (tests) is the endpoint passed, resolved as the exporter would.
    exporter_kwargs: dict[str, Any] = {}
    bsp_kwargs: dict[str, Any] = {}
    if not process_env:
        endpoint = env.get(_OTEL_TRACES_ENDPOINT)
        if not endpoint:
            base = env.get(_OTEL_ENDPOINT, "")
            endpoint = base if grpc else base.rstrip("/") + "/v1/traces"
        exporter_kwargs["endpoint"] = endpoint
        for var, option in _BSP_OPTIONS:
            if raw := env.get(var):
                try:
                    bsp_kwargs[option] = int(raw)
                except ValueError:
                    log.warning("%s=%r is not an integer; ignored", var, raw)
    if grpc:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return BatchSpanProcessor(GrpcExporter(**exporter_kwargs), **bsp_kwargs)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return BatchSpanProcessor(HttpExporter(**exporter_kwargs), **bsp_kwargs)
