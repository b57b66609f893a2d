"""Metrics and traces built from per-request records."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from extproc.config import TelemetrySettings
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.record import RequestRecord

if TYPE_CHECKING:
    from extproc.telemetry.tracing import SpanHandle, Tracing


def traces_configured(environ: Mapping[str, str]) -> bool:
    """Will OTLP traces be exported? (the standard OTEL_* switches; see Tracing)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()}
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return bool(endpoint) and "none" not in exporters


class _NoTracing:
    """Tracing when no exporter is configured: the OpenTelemetry trace SDK and the
    OpenInference libraries (~30 MB per worker) are then not even imported."""

    enabled = False
    records_content = False

    # Tracing's interface, never called here: callers check `enabled` first.
    def start(
        self, operation: str, headers: Mapping[str, bytes], start_time_ns: int, client_api: str | None = None
    ) -> SpanHandle | None:
        return None

    def inject(self, span: SpanHandle) -> list[tuple[str, bytes]]:
        return []

    def start_attempt(self, headers: Mapping[str, bytes], backend: str, start_time_ns: int) -> SpanHandle | None:
        return None

    def finish_attempt(self, span: Any, record: Any, end_time_ns: int) -> None:  # pragma: no cover - never started
        pass

    def finish(self, span: Any, record: RequestRecord) -> None:  # pragma: no cover - never started
        pass

    def shutdown(self) -> None:
        pass


class Telemetry:
    """One per processor: metrics and tracing share the settings and the environment."""

    def __init__(self, settings: TelemetrySettings, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.settings = settings
        self.metrics = Metrics(settings, environ)
        self.tracing: Tracing | _NoTracing
        if traces_configured(env):
            from extproc.telemetry.tracing import Tracing

            self.tracing = Tracing(settings, environ)
        else:
            self.tracing = _NoTracing()

    def publish(self, record: RequestRecord, span: SpanHandle | None) -> None:
        """Hand a finished request to metrics and (if it has a span) to tracing."""
        trace = None
        if span is not None:  # a sampled span: its ids become the durations' exemplars
            context = span.span.get_span_context()
            if context.is_valid and context.trace_flags.sampled:
                trace = (context.trace_id, context.span_id)
        self.metrics.record(record, trace)
        if span is not None:
            self.tracing.finish(span, record)

    def shutdown(self) -> None:
        self.tracing.shutdown()
        self.metrics.shutdown()
