"""Metrics and traces built from per-request records."""

from __future__ import annotations

from collections.abc import Mapping

from extproc.config import TelemetrySettings
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.record import RequestRecord
from extproc.telemetry.tracing import SpanHandle, Tracing


class Telemetry:
    """One per processor: metrics and tracing share the settings and the environment."""

    def __init__(self, settings: TelemetrySettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(settings, environ)
        self.tracing = Tracing(settings, environ)

    def publish(self, record: RequestRecord, span: SpanHandle | None) -> None:
        """Hand a finished request to metrics and (if it has a span) to tracing."""
        self.metrics.record(record)
        if span is not None:
            self.tracing.finish(span, record)

    def shutdown(self) -> None:
        self.tracing.shutdown()
        self.metrics.shutdown()
