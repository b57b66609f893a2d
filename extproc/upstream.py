"""The upstream stage: one ext_proc stream per attempt, from the backend cluster's filters.

The request stage (extproc/exchange.py) runs once per client request, before Envoy's
router. When a route has fallbacks, the router tries backends one after another, and
each may speak another API: the request must be translated and signed for the backend
of *that* attempt, which only a filter below the router sees. Envoy runs this stage as
an upstream HTTP filter of the cluster: its first message names the backend Envoy
picked (the endpoint's metadata) and carries the request stage's metadata
(`client_api`), so every attempt is self-contained and any worker can serve it.

Per attempt: request body -> the backend's wire format, path, host, credentials
(SigV4 for Bedrock, computed over the final body); response headers -> the served
backend's name for the request stage, and for translated APIs the response body
(JSON, errors, event streams) back to the client's API, chunk by chunk. Answers are
immediate, except an attempt whose credentials must still be found or refreshed
(botocore's chain for Bedrock, a Google access token for Vertex AI: `DeferredAuth`):
that answer is a coroutine the server awaits, so the event loop keeps serving other
streams meanwhile (extproc/aws_credentials.py, extproc/gcp_credentials.py).

With tracing on, each attempt has its own span (extproc/telemetry/attempt_attributes.py),
a child of the request's span, whose W3C context the request stage puts in the metadata
forwarded here (not the `traceparent` header: each attempt sets it to its own span for the
backend, and the next attempt would see it). The span records what this backend was sent
and answered (bodies read here anyway; an answer this stage does not read ends the span at
its headers), its status and error.

Envoy facts this relies on (checked with Envoy 1.40): header mutations made in one
attempt are still there in the next (the router reuses the header map) while the body
is the router's buffered original, so every attempt sets or removes every
provider-specific header and always sets content-length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import text_format

from extproc import protocol
from extproc.backend_auth import CREDENTIAL_HEADERS, DeferredAuth
from extproc.contract import (
    ATTRIBUTES_KEY,
    BACKEND_HEADER,
    ENDPOINT_BACKEND_KEY,
    METADATA_NAMESPACE,
    UPSTREAM_DETAILS_PREFIX,
    UPSTREAM_HOST_ATTRIBUTE,
    ClientApi,
    Meta,
)
from extproc.client_errors import error_reply
from extproc.exchange import PROVIDER_NAMES
from extproc.protocol import Answer
from extproc.routing import BackendTarget
from extproc.runtime import Runtime
from extproc.client_apis import SPECS
from extproc.schemas import anthropic, forms, openai
from extproc.schemas.openai import RequestError
from extproc.telemetry.record import AttemptRecord
from extproc.translators import Attempt, StreamTranslator, Translator, translator_for

if TYPE_CHECKING:
    from extproc.telemetry import Telemetry
    from extproc.telemetry.tracing import SpanHandle

log = logging.getLogger(__name__)


# Headers a backend's credentials or API set: an attempt removes those its backend does not use.
_PROVIDER_HEADERS = (*CREDENTIAL_HEADERS, "anthropic-version")
_BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED


def is_upstream_stream(request: ep.ProcessingRequest) -> bool:
    """The upstream stage asks Envoy for the host's metadata; the request stage asks nothing."""
    attributes = request.attributes.get(ATTRIBUTES_KEY)
    return attributes is not None and UPSTREAM_HOST_ATTRIBUTE in attributes.fields


def backend_of_host(metadata_text: str) -> str | None:
    """The backend name in an endpoint's metadata, which Envoy sends as protobuf text."""
    metadata = base_pb2.Metadata()
    try:
        text_format.Parse(metadata_text, metadata)
    except text_format.ParseError:
        return None
    fields = metadata.filter_metadata[METADATA_NAMESPACE].fields
    value = fields.get(ENDPOINT_BACKEND_KEY)
    return value.string_value if value is not None and value.string_value else None


class UpstreamExchange:
    """One attempt of one request, against the backend Envoy picked for it."""

    __slots__ = ("runtime", "telemetry", "target", "client_api", "stream", "include_usage", "model", "_translator",
                 "_stream", "_status", "_error_type", "_reads", "done", "_content_type", "_client_keys", "_span",
                 "_attempt", "_started", "_kept", "_answered_ns")

    def __init__(self, runtime: Runtime, telemetry: Telemetry | None = None) -> None:
        self.runtime = runtime
        self.telemetry = telemetry
        self.target: BackendTarget | None = None
        self.client_api = ClientApi.OPENAI_CHAT
        self.stream = False
        self.include_usage = False
        self.model = ""
        self._translator: Translator | None = None  # this attempt's (client API, backend schema) pair
        self._stream: StreamTranslator | None = None  # a successful stream being translated
        self._status = 0
        self._error_type: str | None = None  # Bedrock's x-amzn-errortype
        self._reads = False  # this attempt's answer is read and rewritten into the client's API
        self.done = False  # Envoy will send nothing more this attempt needs (the processor then ends the stream)
        self._content_type = ""  # a multipart/form-data request's (its boundary)
        self._client_keys: dict[str, bytes] = {}  # the client's own key for this backend (never logged)
        self._span: SpanHandle | None = None  # this attempt's span (tracing on)
        self._attempt: AttemptRecord | None = None  # what the span will say
        self._started = 0.0  # time.monotonic() at the attempt's request headers
        self._kept: list[bytes] | None = None  # the backend's answer, up to the span's content limit
        self._answered_ns = 0  # wall clock when this stage last answered (the span's end once `done`)

    def handle(self, request: ep.ProcessingRequest) -> Answer:
        """Answer one message: a response, or a coroutine when the answer must wait (the
        server awaits it); a failure either way becomes a clean error, never a dead stream."""
        phase = request.WhichOneof("request")
        if self._span is not None:
            answer = self._handle(request, phase)
            self._answered_ns = time.time_ns()  # before Envoy hears it, so before any next attempt starts
            return answer
        return self._handle(request, phase)

    def _handle(self, request: ep.ProcessingRequest, phase: str | None) -> Answer:
        try:
            if phase == "request_headers":
                return self.on_request_headers(request)
            if phase == "request_body":
                answer = self.on_request_body(request.request_body)
                return answer if isinstance(answer, ep.ProcessingResponse) else self._guarded(answer, phase)
            if phase == "response_headers":
                return self.on_response_headers(request.response_headers)
            if phase == "response_body":
                return self.on_response_body(request.response_body)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
            return self._failed(exc, phase)
        return protocol.continue_phase(phase)

    async def _guarded(self, answer: Coroutine[Any, Any, ep.ProcessingResponse], phase: str) -> ep.ProcessingResponse:
        """The same guarantee for an answer that had to wait (credentials)."""
        try:
            return await answer
        except Exception as exc:  # noqa: BLE001
            return self._failed(exc, phase)

    def _failed(self, exc: Exception, phase: str | None) -> ep.ProcessingResponse:
        if isinstance(exc, (RequestError, anthropic.AnthropicRequestError)):
            return self._reject(exc)
        log.error("upstream stage error in %s (backend %s)", phase, self.target.name if self.target else "?",
                  exc_info=exc)
        if phase in ("request_headers", "request_body"):
            return self._reject(RequestError(500, "The gateway failed to prepare the request for its backend.",
                                             "server_error", "gateway_error"))
        return protocol.continue_phase(phase)

    # -- request ----------------------------------------------------------------

    def on_request_headers(self, request: ep.ProcessingRequest) -> ep.ProcessingResponse:
        name = backend_of_host(protocol.attribute(request, UPSTREAM_HOST_ATTRIBUTE))
        self.target = self.runtime.router.targets.get(name or "")
        if self.target is None:
            raise RequestError(500, "The gateway's Envoy config names a backend this processor does not know.",
                               "server_error", "gateway_config_error")
        self._start_span(request, self.target)
        forwarded = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        if forwarded is not None and Meta.CLIENT_API in forwarded.fields:
            self.client_api = ClientApi(forwarded.fields[Meta.CLIENT_API].string_value)
        own_key = self.target.client_key_header
        if SPECS[self.client_api].form or own_key is not None:
            headers = protocol.header_map(request.request_headers)
            self._content_type = headers.get("content-type", b"").decode("latin-1")  # a multipart body's boundary
            if own_key is not None and (key := headers.get(own_key, b"").strip()):
                self._client_keys[own_key] = key  # the request stage left it for this backend only
        return protocol.CONTINUE_REQUEST_HEADERS

    def on_request_body(self, message: ep.HttpBody) -> Answer:
        target = self.target
        assert target is not None
        raw = message.body  # one read: protobuf hands out a new bytes object per access
        form = forms.parse_form(raw, self._content_type) if SPECS[self.client_api].form else None
        if form is not None:
            body = form.body
        else:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise openai.bad_request("The request body is not valid JSON.") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise openai.bad_request("The request body must be a JSON object with a 'model' field.")
        self.model = target.model_for(body["model"])
        self.stream = body.get("stream") is True or (form is not None and form.stream)
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        attempt = Attempt(target, self.client_api, self.model, self.stream, self.include_usage, form)
        self._translator = translator_for(attempt, body["model"])
        upstream = self._translator.request(body, raw)
        path, new_body, headers = upstream.path, upstream.body, upstream.headers
        if self._attempt is not None:
            self._attempt.path = path
            if self.telemetry.tracing.records_content and form is None:  # type: ignore[union-attr]
                self._attempt.request_body = new_body  # what the backend receives (never a credential)
        headers.extend(target.credentials(self._client_keys))  # a key's header and the backend's configured headers
        if self._span is not None:  # the backend's own spans (if it traces) are this attempt's children
            headers.extend(self.telemetry.tracing.inject(self._span))  # type: ignore[union-attr]
        if self._translator.translates_response or self._translator.translates_errors:
            headers.append(("accept-encoding", b"identity"))  # translation reads plain bytes
        auth = target.auth
        if isinstance(auth, DeferredAuth):  # e.g. a signature over exactly these bytes
            credentials = auth.now()
            if credentials is None:  # they must be found or refreshed first, off the loop
                return self._signed_when_ready(auth, target, path, new_body, headers, raw)
            headers += auth.headers_for(self._url(target, path), new_body, credentials)
        return self._request_body_response(target, path, new_body, headers, raw)

    async def _signed_when_ready(
        self, auth: DeferredAuth[Any], target: BackendTarget, path: str, body: bytes,
        headers: list[tuple[str, bytes]], raw: bytes,
    ) -> ep.ProcessingResponse:
        credentials = await auth.wait()
        if credentials is None:
            raise RequestError(503, auth.unavailable(target.name), "server_error", "backend_credentials_missing")
        headers += auth.headers_for(self._url(target, path), body, credentials)
        return self._request_body_response(target, path, body, headers, raw)

    @staticmethod
    def _url(target: BackendTarget, path: str) -> str:
        return f"{target.backend.url.scheme}://{target.authority}{path}"

    def _request_body_response(
        self, target: BackendTarget, path: str, new_body: bytes, headers: list[tuple[str, bytes]], raw: bytes
    ) -> ep.ProcessingResponse:
        remove = [h for h in _PROVIDER_HEADERS if not any(k == h for k, _ in headers)]
        remove.extend(self.runtime.client_key_headers)  # a client's own key goes only in the credential header
        headers += [
            (":path", path.encode("latin-1")),
            (":authority", target.authority.encode()),
            ("content-length", str(len(new_body)).encode()),
        ]
        common = ep.CommonResponse(header_mutation=protocol.header_mutation(headers, remove))
        if new_body is not raw:
            common.body_mutation.body = new_body
        response = ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
        response.dynamic_metadata.CopyFrom(
            protocol.metadata_struct({Meta.BACKEND_NAME: target.name, Meta.MODEL_NAME_OVERRIDE: self.model})
        )
        return response

    # -- response ---------------------------------------------------------------

    def on_response_headers(self, message: ep.HttpHeaders) -> ep.ProcessingResponse:
        target = self.target
        assert target is not None
        headers = protocol.header_map(message)
        status_text = headers.get(":status", b"0")
        self._status = int(status_text) if status_text.isdigit() else 0
        errortype = headers.get("x-amzn-errortype")
        self._error_type = errortype.decode("latin-1") if errortype else None
        if (attempt := self._attempt) is not None:
            attempt.status = self._status
            attempt.error_type = self._error_type.split(":", 1)[0] if self._error_type else None
            attempt.response_headers_ms = (time.monotonic() - self._started) * 1000
        set_headers: list[tuple[str, bytes]] = [(BACKEND_HEADER, target.name.encode())]
        response = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
        translator = self._translator
        self._reads = translator is not None and (
            translator.translates_response or (translator.translates_errors and self._status >= 300))
        if translator is None or not self._reads or message.end_of_stream:
            response.response_headers.response.header_mutation.CopyFrom(protocol.header_mutation(set_headers))
            self.done = True  # the body is not read (this filter's body mode is NONE)
            return response
        remove = ["content-length"]
        self._stream = translator.stream_translator() if self.stream and self._status < 300 else None
        if self._attempt is not None and self.telemetry.tracing.records_content:  # type: ignore[union-attr]
            kind = headers.get("content-type", b"").split(b";", 1)[0].strip().lower()
            if kind.startswith(b"text/") or kind.endswith(b"json"):  # not Bedrock's binary event stream
                self._kept = []
                self._attempt.response_is_json = self._stream is None and kind.endswith(b"json")
        if self._stream is None:  # errors and JSON replies are translated whole
            set_headers.append(("content-type", b"application/json"))
            response.mode_override.response_body_mode = _BUFFERED
        else:
            set_headers.append(("content-type", b"text/event-stream"))
            response.mode_override.response_body_mode = _STREAMED
        response.response_headers.response.header_mutation.CopyFrom(protocol.header_mutation(set_headers, remove))
        return response

    def on_response_body(self, message: ep.HttpBody) -> ep.ProcessingResponse:
        translator = self._translator
        if translator is None or not self._reads:
            return protocol.CONTINUE_RESPONSE_BODY
        body = message.body  # one read
        if self._kept is not None:
            self._keep(body)
        if self._stream is not None:
            out = self._stream.feed(body) if body else b""
            if message.end_of_stream:
                out += self._stream.finish()
        else:
            out = self._translate_whole(translator, body)
        self.done = message.end_of_stream
        response = ep.ProcessingResponse(response_body=ep.BodyResponse())
        mutation = response.response_body.response.body_mutation
        if out:
            mutation.body = out
        else:
            mutation.clear_body = True
        return response

    def _translate_whole(self, translator: Translator, body: bytes) -> bytes:
        try:
            return translator.whole_response(self._status, body, self._error_type)
        except orjson.JSONDecodeError:
            name = self.target.name if self.target is not None else "?"
            return openai.error_body(502, f"The backend {name} sent a reply that is not JSON.",
                                     "server_error", "bad_backend_response")

    def _reject(self, error: RequestError | anthropic.AnthropicRequestError) -> ep.ProcessingResponse:
        if self._attempt is not None:  # refused by the gateway: the backend was never asked
            self._attempt.error = f"refused by the gateway: {error.message}"
            self._attempt.error_type = getattr(error, "code", None) or error.error_type
        return error_reply(self.client_api, error, UPSTREAM_DETAILS_PREFIX)

    # -- the attempt's span ---------------------------------------------------------

    def _start_span(self, request: ep.ProcessingRequest, target: BackendTarget) -> None:
        """A span for this attempt, child of the request's span (its `traceparent`)."""
        tracing = self.telemetry.tracing if self.telemetry is not None else None
        if tracing is None or not tracing.enabled:
            return
        self._started = time.monotonic()
        # The request span's context: from the request stage's metadata (the traceparent
        # header may name an earlier attempt's span, as mutations persist), else the header.
        forwarded = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        carrier: dict[str, bytes]
        if forwarded is not None and Meta.TRACEPARENT in forwarded.fields:
            carrier = {k: forwarded.fields[k].string_value.encode("latin-1")
                       for k in (Meta.TRACEPARENT, Meta.TRACESTATE) if k in forwarded.fields}
        else:
            carrier = protocol.header_map(request.request_headers)
        self._span = tracing.start_attempt(carrier, target.name, time.time_ns())
        if self._span is None or not self._span.is_recording:
            self._span = None
            return
        self._attempt = AttemptRecord(
            backend=target.name, provider=PROVIDER_NAMES.get(target.backend.schema_, str(target.backend.schema_)),
            model="", client_api="", stream=False, server_address=target.host,
            server_port=target.port)

    def close(self) -> None:
        """Envoy ended this attempt's stream: end its span with what was seen."""
        span, attempt, self._span = self._span, self._attempt, None
        if span is None or attempt is None or self.telemetry is None:
            return
        attempt.model, attempt.stream, attempt.client_api = self.model, self.stream, self.client_api.value
        refused = attempt.error is not None  # the gateway answered in the backend's stead
        ended = self._answered_ns if (self.done or refused) and self._answered_ns else time.time_ns()
        if self._kept is not None:
            attempt.response_body = b"".join(self._kept)
        if attempt.error is None:
            if attempt.status == 0:
                attempt.error = "no response from the backend"
            elif attempt.status >= 400:
                attempt.error = f"backend status {attempt.status}"
                attempt.error_type = attempt.error_type or str(attempt.status)
        self.telemetry.tracing.finish_attempt(span, attempt, ended)

    def _keep(self, chunk: bytes) -> None:
        """Keep the backend's answer for the span, up to its content limit (bytes >= chars)."""
        kept, attempt = self._kept, self._attempt
        if kept is None or attempt is None or not chunk:
            return
        room = self.telemetry.settings.max_content_chars - attempt.response_size  # type: ignore[union-attr]
        if room > 0:
            kept.append(chunk[:room])
        attempt.response_size += len(chunk)
