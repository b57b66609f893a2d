"""Upstream attempt spans: the upstream stage driven with ext_proc messages, spans in memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from extproc.config import TelemetrySettings
from extproc.telemetry import Telemetry
from extproc.telemetry.tracing import Tracing
from extproc.upstream import UpstreamExchange
from tests.unit.test_upstream import ANTHROPIC_KEY, CHAT, NS, RUNTIME, headers_message

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-real", "stop_reason": "end_turn",
          "content": [{"type": "text", "text": "Hello there."}], "usage": {"input_tokens": 5, "output_tokens": 3}}


class Spans:
    def __init__(self, environ: dict[str, str] | None = None, **settings: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.settings = TelemetrySettings(**settings)
        self.tracing = Tracing(self.settings, environ=environ or {}, span_processor=SimpleSpanProcessor(self.exporter))
        self.telemetry = cast(Telemetry, SimpleNamespace(tracing=self.tracing, settings=self.settings))

    def attempt(self, backend: str = "claude", body: bytes | None = None, traced: bool = True) -> UpstreamExchange:
        return self.attempt_with_answer(backend, body, traced)[0]

    def attempt_with_answer(
        self, backend: str = "claude", body: bytes | None = None, traced: bool = True, forwarded: bool = False
    ) -> tuple[UpstreamExchange, object]:
        exchange = UpstreamExchange(RUNTIME, self.telemetry)
        context = f"00-{TRACE_ID}-{PARENT_ID}-01"
        extra = {"traceparent": context.encode()} if traced and not forwarded else {}
        if forwarded:  # what an earlier attempt left in the header must not matter
            extra = {"traceparent": f"00-{TRACE_ID}-{'1' * 16}-01".encode()}
        first = headers_message(backend, extra=extra)
        if forwarded:
            first.metadata_context.filter_metadata[NS].fields["traceparent"].string_value = context
        exchange.handle(first)
        raw = json.dumps(CHAT).encode() if body is None else body
        answer = exchange.handle(ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True)))
        return exchange, answer

    def one(self) -> ReadableSpan:
        spans = self.exporter.get_finished_spans()
        assert len(spans) == 1
        return spans[0]


@pytest.fixture
def spans() -> Iterator[Spans]:
    s = Spans()
    yield s
    s.tracing.shutdown()


def respond(exchange: UpstreamExchange, status: int, chunks: list[bytes], content_type: bytes) -> None:
    headers = {":status": str(status).encode(), "content-type": content_type}
    exchange.handle(ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in headers.items()]))))
    for i, chunk in enumerate(chunks):
        exchange.handle(ep.ProcessingRequest(
            response_body=ep.HttpBody(body=chunk, end_of_stream=i == len(chunks) - 1)))


def headers_set(answer: object) -> dict[str, bytes]:
    assert isinstance(answer, ep.ProcessingResponse)
    return {h.header.key: h.header.raw_value for h in answer.request_body.response.header_mutation.set_headers}


def test_translated_attempt_records_what_the_backend_received_and_answered(spans: Spans) -> None:
    exchange, answer = spans.attempt_with_answer()
    respond(exchange, 200, [orjson.dumps(ANSWER)], b"application/json")
    exchange.close()
    exchange.close()  # once
    span = spans.one()
    attributes = dict(span.attributes or {})

    assert span.name == "UpstreamAttempt claude"
    assert headers_set(answer)["traceparent"] == f"00-{TRACE_ID}-{format(span.context.span_id, '016x')}-01".encode()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.status.status_code == StatusCode.OK
    assert attributes["openinference.span.kind"] == "LLM"
    sent = json.loads(attributes["input.value"])
    assert sent["model"] == "claude-real" and sent["max_tokens"] == 7  # Anthropic's shape, not the client's
    assert attributes["input.mime_type"] == "application/json"
    assert json.loads(attributes["output.value"]) == ANSWER
    assert attributes["llm.model_name"] == "claude-real" and attributes["llm.provider"] == "anthropic"
    assert attributes["server.address"] == "api.anthropic.com" and attributes["url.path"] == "/prefix/v1/messages"
    assert attributes["http.response.status_code"] == 200
    assert not any(k.startswith("llm.token_count") for k in attributes)  # counted on the request span only
    assert ANTHROPIC_KEY not in str(attributes)
    assert json.loads(attributes["metadata"])["backend"] == "claude"


def test_backend_error_sets_error_status_and_type(spans: Spans) -> None:
    exchange = spans.attempt()
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    respond(exchange, 529, [orjson.dumps(error)], b"application/json")
    exchange.close()
    span = spans.one()
    attributes = dict(span.attributes or {})
    assert span.status.status_code == StatusCode.ERROR and span.status.description == "backend status 529"
    assert attributes["error.type"] == "529" and attributes["http.response.status_code"] == 529
    assert json.loads(attributes["output.value"]) == error  # the provider's own error, before translation


def test_no_response_is_an_error(spans: Spans) -> None:
    spans.attempt().close()  # e.g. connection refused: Envoy ends the stream after the request
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR and span.status.description == "no response from the backend"
    assert (span.attributes or {})["error.type"] == "no_response"


def test_request_the_gateway_refuses_is_an_error_without_a_backend_status(spans: Spans) -> None:
    exchange = spans.attempt(body=b"{not json")
    exchange.close()
    span = spans.one()
    assert span.status.status_code == StatusCode.ERROR
    assert (span.status.description or "").startswith("refused by the gateway: ")
    assert "http.response.status_code" not in (span.attributes or {})


def test_streamed_answer_is_kept_up_to_the_content_limit() -> None:
    spans = Spans(max_content_chars=300)
    exchange = spans.attempt(body=json.dumps({**CHAT, "stream": True}).encode())
    event = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' \
            b'"delta":{"type":"text_delta","text":"word "}}\n\n'
    respond(exchange, 200, [event] * 20, b"text/event-stream")
    exchange.close()
    attributes = dict(spans.one().attributes or {})
    output = attributes["output.value"]
    assert len(output) <= 300 and output.startswith("event: content_block_delta")
    assert output.endswith(f"...[truncated: {len(event) * 20} bytes]")
    assert attributes["output.mime_type"] == "text/plain"
    assert json.loads(attributes["metadata"])["values_truncated"] == 1
    spans.tracing.shutdown()


def test_binary_event_streams_are_not_recorded(spans: Spans) -> None:
    exchange = spans.attempt("br", body=json.dumps({**CHAT, "stream": True}).encode())
    respond(exchange, 200, [b"\x00\x00\x00\x9b binary frame"], b"application/vnd.amazon.eventstream")
    exchange.close()
    attributes = dict(spans.one().attributes or {})
    assert "output.value" not in attributes and json.loads(attributes["input.value"])["messages"]


def test_hidden_inputs_and_outputs() -> None:
    spans = Spans(environ={"OPENINFERENCE_HIDE_INPUTS": "true", "OPENINFERENCE_HIDE_OUTPUTS": "true"})
    exchange = spans.attempt()
    respond(exchange, 200, [orjson.dumps(ANSWER)], b"application/json")
    exchange.close()
    attributes = dict(spans.one().attributes or {})
    assert "hi" not in (attributes.get("input.value") or "") and "Hello" not in str(attributes)
    assert attributes["http.response.status_code"] == 200
    spans.tracing.shutdown()


def test_without_a_traceparent_the_attempt_starts_its_own_trace(spans: Spans) -> None:
    spans.attempt(traced=False).close()
    assert spans.one().parent is None


def test_the_request_stages_metadata_names_the_parent_over_the_header(spans: Spans) -> None:
    """The header may still name an earlier attempt's span (header mutations persist)."""
    exchange, _ = spans.attempt_with_answer(forwarded=True)
    exchange.close()
    span = spans.one()
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
