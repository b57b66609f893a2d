"""OpenInference attributes of one upstream attempt's span, from its `AttemptRecord`.

The request's span (`span_attributes.apply_record`) keeps the client's view; an attempt's
span says what one backend was actually sent and answered, in that backend's own API
(what Bedrock's Converse or Anthropic's Messages received after translation). Its bodies
are recorded as `input.value` / `output.value` under the same `TraceConfig` masking
(`OPENINFERENCE_HIDE_INPUTS` / `_OUTPUTS`, ...) and the same `max_content_chars` bound
as the request span's. No token counts: they are the request span's, and tools that sum
`llm.token_count.*` over a trace must not count a request twice.
"""

from __future__ import annotations

from typing import Final

from openinference.instrumentation import TraceConfig
from openinference.semconv.trace import SpanAttributes
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_PATH
from opentelemetry.trace import Span, Status, StatusCode

from extproc.telemetry.record import AttemptRecord
from extproc.telemetry.span_attributes import _PROVIDERS, _Attributes, _dumps

__all__ = ["ATTEMPT_SPAN_NAME", "apply_attempt"]

ATTEMPT_SPAN_NAME: Final = "UpstreamAttempt"
_JSON: Final = "application/json"
_TEXT: Final = "text/plain"


def apply_attempt(
    span: Span, record: AttemptRecord, config: TraceConfig, max_content_chars: int, max_attributes: int | None
) -> None:
    """Set the attempt span's attributes and status; the caller ends the span."""
    b = _Attributes(config, max_content_chars, max_attributes)
    b.fixed(SpanAttributes.LLM_MODEL_NAME, record.model)
    if provider := _PROVIDERS.get(record.provider):
        b.fixed(SpanAttributes.LLM_PROVIDER, provider)
    b.fixed(SERVER_ADDRESS, record.server_address)
    b.fixed(SERVER_PORT, record.server_port)
    if record.path:
        b.fixed(URL_PATH, record.path.split("?", 1)[0])  # a query may carry a key (Gemini's ?key=)
    if record.status:
        b.fixed(HTTP_RESPONSE_STATUS_CODE, record.status)
    if record.error is not None:
        b.fixed(ERROR_TYPE, record.error_type or (str(record.status) if record.status else "no_response"))
    if record.request_body is not None:
        _body(b, SpanAttributes.INPUT_VALUE, SpanAttributes.INPUT_MIME_TYPE, record.request_body,
              len(record.request_body), record.request_is_json)
    if record.response_body is not None:
        _body(b, SpanAttributes.OUTPUT_VALUE, SpanAttributes.OUTPUT_MIME_TYPE, record.response_body,
              record.response_size, record.response_is_json)
    metadata: dict[str, object] = {
        "backend": record.backend,
        "provider": record.provider,
        "backend_model": record.model,
        "client_api": record.client_api,
        "stream": record.stream,
    }
    if record.response_headers_ms is not None:
        metadata["response_headers_ms"] = round(record.response_headers_ms, 3)
    if b.truncated:
        metadata["values_truncated"] = b.truncated
    b.fixed(SpanAttributes.METADATA, _dumps(metadata))
    span.set_attributes(dict(b.attributes))
    if record.error is not None:
        span.set_status(Status(StatusCode.ERROR, record.error))
    else:
        span.set_status(Status(StatusCode.OK))


def _body(b: _Attributes, key: str, mime_key: str, body: bytes, size: int, json: bool) -> None:
    """A body as text, decoded only if the TraceConfig lets it be recorded, cut to the limit;
    JSON when whole (a streamed body is several JSON documents: plain text)."""
    if not body:
        return
    whole = size <= b.limit and json

    def text() -> str:
        decoded = body.decode("utf-8", "replace")
        if size > len(body):  # kept only up to the limit: say how much there was
            b.truncated += 1
            marker = f"...[truncated: {size} bytes]"
            return decoded[: max(0, b.limit - len(marker))] + marker
        return b.cut(decoded)

    b.group([(key, text), (mime_key, _JSON if whole else _TEXT)], charged=False)
