"""What the MCP gateway records of each client message: one span, one metric point.

Why a module of its own: dispatch and relay only note what happened (`Observation.fail`,
`answered`, the server and tool involved); how that becomes OpenInference span attributes,
the `mcp.requests` / `mcp.request.duration` metrics and the trace context the servers get
is decided here, once.

A span per request (OpenInference kind TOOL for `tools/call`, CHAIN for the others), a
child of the client's W3C trace context: `params._meta.traceparent` (and `tracestate`) when
the message carries a valid one (it is per message; SEP-414), else the HTTP headers. The
servers get the gateway span's context (the incoming context when tracing is off). Metric
attributes: `mcp.method.name`, `mcp.tool.name` (prefixed, a bounded number of values),
`mcp.server` and `error.type` (the JSON-RPC error code, `tool_error` for a result with
`isError`, or the HTTP status class).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web
from openinference.semconv.trace import OpenInferenceMimeTypeValues, OpenInferenceSpanKindValues, SpanAttributes

from extproc.contract import Attr
from extproc.mcp.jsonrpc import INTERNAL_ERROR, Message
from extproc.mcp.sessions import SESSION_HEADER, session_digest

if TYPE_CHECKING:
    from extproc.telemetry import Telemetry
    from extproc.telemetry.tracing import SpanHandle

__all__ = ["Observation", "Observer"]

# Metric and span attributes.
TOOL_ERROR: Final = "tool_error"

# mcp.method.name values kept as they are; anything else is "other" (clients choose method names).
_KNOWN_METHODS: Final = frozenset({
    "initialize", "ping", "tools/list", "tools/call", "prompts/list", "prompts/get", "resources/list",
    "resources/read", "resources/templates/list", "resources/subscribe", "resources/unsubscribe",
    "completion/complete", "logging/setLevel", "server/discover", "notifications/initialized",
    "notifications/cancelled", "notifications/progress", "notifications/roots/list_changed",
})
_OTHER: Final = "other"
MAX_TOOL_NAME_VALUES: Final = 1000  # distinct mcp.tool.name values before "other"

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(?:-[\x21-\x7e]*)?$")
_TRACESTATE = re.compile(r"^[\x20-\x7e]{0,512}$")
_PROTOCOL_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,32}$")


def _trace_carrier(headers: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, str]:
    """The client's W3C trace context: from `params._meta` when valid there, else the headers."""
    meta = params.get("_meta")
    for source in (meta if isinstance(meta, Mapping) else {}, headers):
        parent = source.get("traceparent")
        if isinstance(parent, str) and _TRACEPARENT.match(parent.strip()):
            carrier = {"traceparent": parent.strip()}
            state = source.get("tracestate")
            if isinstance(state, str) and state and _TRACESTATE.match(state):
                carrier["tracestate"] = state
            return carrier
    return {}


def _bounded(value: Any, limit: int) -> str:
    try:
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
    except TypeError:
        text = str(value)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


class Observation:
    """Span and metrics of one client message, finished once."""

    __slots__ = ("observer", "method", "started", "span", "tool", "original_tool", "server", "error_type", "error",
                 "output", "finished", "trace_out", "got_answer")

    def __init__(self, observer: Observer, method: str | None, span: SpanHandle | None,
                 trace_out: dict[str, str]) -> None:
        self.observer = observer
        self.method = method
        self.started = time.perf_counter()
        self.span = span
        self.trace_out = trace_out  # trace context headers for the servers
        self.tool: str | None = None
        self.original_tool: str | None = None
        self.server: str | None = None
        self.error_type: str | None = None
        self.error: str | None = None
        self.output: Any = None
        self.finished = False
        self.got_answer = False  # the JSON-RPC answer to the client's request went out

    def fail(self, code: int | str, message: str) -> None:
        self.error_type = str(code)
        self.error = message

    def http_failure(self, status: int, message: str) -> None:
        self.fail(f"{status // 100}xx", message)

    def answered(self, message: Mapping[str, Any]) -> None:
        """The JSON-RPC answer the client got."""
        self.got_answer = True
        error = message.get("error")
        if error is not None:
            code = error.get("code") if isinstance(error, Mapping) else None
            text = error.get("message") if isinstance(error, Mapping) else None
            self.fail(code if isinstance(code, int) else INTERNAL_ERROR, str(text or "error"))
            return
        result = message.get("result")
        self.output = result
        if isinstance(result, Mapping) and result.get("isError") is True:
            self.fail(TOOL_ERROR, "the tool reported an error (isError)")

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        observer = self.observer
        attributes: dict[str, str] = {}
        if self.method is not None:
            attributes[Attr.MCP_METHOD] = self.method if self.method in _KNOWN_METHODS else _OTHER
        if self.tool is not None:
            attributes[Attr.MCP_TOOL] = observer.tool_value(self.tool)
        if self.server is not None:
            attributes[Attr.MCP_SERVER] = self.server
        if self.error_type is not None:
            attributes[Attr.ERROR_TYPE] = self.error_type
        telemetry: Any = observer.telemetry
        if telemetry is not None:
            telemetry.metrics.record_mcp_request(time.perf_counter() - self.started, attributes)
            if self.span is not None:
                span_attributes: dict[str, Any] = {}
                if self.server is not None:
                    span_attributes[Attr.MCP_SERVER] = self.server
                if self.original_tool is not None:
                    span_attributes[Attr.MCP_ORIGINAL_TOOL] = self.original_tool
                if self.error_type is not None:
                    span_attributes[Attr.ERROR_TYPE] = self.error_type
                if self.output is not None and self.span.is_recording:
                    span_attributes[SpanAttributes.OUTPUT_VALUE] = _bounded(self.output, observer.content_limit)
                    span_attributes[SpanAttributes.OUTPUT_MIME_TYPE] = OpenInferenceMimeTypeValues.JSON.value
                telemetry.tracing.end_span(
                    self.span, span_attributes, self.error if self.error_type is not None else None
                )


class Observer:
    """Begins the `Observation` of each client message; one per gateway (it bounds the
    distinct `mcp.tool.name` values across all messages)."""

    __slots__ = ("telemetry", "content_limit", "_tool_values")

    def __init__(self, telemetry: Telemetry | None) -> None:
        self.telemetry = telemetry
        self.content_limit = telemetry.settings.max_content_chars if telemetry is not None else 32_768
        self._tool_values: set[str] = set()

    def tool_value(self, tool: str) -> str:
        """mcp.tool.name as recorded: bounded number of distinct values."""
        if tool in self._tool_values:
            return tool
        if len(self._tool_values) < MAX_TOOL_NAME_VALUES:
            self._tool_values.add(tool)
            return tool
        return _OTHER

    def observe(self, request: web.Request, message: Message | None) -> Observation:
        method = message.method if message is not None else None
        carrier = _trace_carrier(request.headers, message.params) if message is not None else {}
        span: SpanHandle | None = None
        trace_out = carrier  # tracing off: the servers get the client's context as it came
        tracing: Any = self.telemetry.tracing if self.telemetry is not None else None
        if message is not None and message.kind == "request" and tracing is not None and tracing.enabled:
            span = self._start_span(tracing, request, message, carrier)
            if span is not None:
                injected = {name: value.decode("latin-1") for name, value in tracing.inject(span)}
                trace_out = injected or carrier
        return Observation(self, method, span, trace_out)

    def _start_span(self, tracing: Any, request: web.Request, message: Message,
                    carrier: dict[str, str]) -> SpanHandle | None:
        method = message.method or ""
        params = message.params
        limit = self.content_limit
        attributes: dict[str, Any] = {Attr.MCP_METHOD: method}
        if message.id is not None:
            attributes[Attr.JSONRPC_ID] = str(message.id)
        token = request.headers.get(SESSION_HEADER)
        if token:
            attributes[SpanAttributes.SESSION_ID] = session_digest(token)
        version = request.headers.get("mcp-protocol-version")
        if version and _PROTOCOL_VERSION.match(version):
            attributes[Attr.MCP_PROTOCOL_VERSION] = version
        if method == "tools/call":
            kind = OpenInferenceSpanKindValues.TOOL
            name = params.get("name")
            tool = name if isinstance(name, str) else ""
            span_name = f"tools/call {tool[:200]}".rstrip()
            if tool:
                attributes[SpanAttributes.TOOL_NAME] = tool[:1024]
            arguments = params.get("arguments")
            attributes[SpanAttributes.INPUT_VALUE] = _bounded(arguments if arguments is not None else {}, limit)
            attributes[SpanAttributes.INPUT_MIME_TYPE] = OpenInferenceMimeTypeValues.JSON.value
        else:
            kind = OpenInferenceSpanKindValues.CHAIN
            span_name = method if method in _KNOWN_METHODS else "mcp request"
            if params:
                attributes[SpanAttributes.INPUT_VALUE] = _bounded(params, limit)
                attributes[SpanAttributes.INPUT_MIME_TYPE] = OpenInferenceMimeTypeValues.JSON.value
        span: SpanHandle | None = tracing.start_span(span_name, carrier, kind, attributes)
        return span
