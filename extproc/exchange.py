"""One HTTP exchange as the processor sees it, phase by phase.

Envoy opens one gRPC stream per HTTP request and sends, in order: request headers,
the buffered request body (POST only), response headers, response body chunks.
Each `on_*` method answers one message. The phase work is CPU on data Envoy already
sent, so it runs inline on the event loop; the one exception (the opt-in token
estimate, which may encode megabytes) is returned as a coroutine and run in a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc import budgets, jwt_authn, protocol
from extproc.accounting import end_of_response_metadata
from extproc.authorization import model_refused, models_body
from extproc.client_apis import ANTHROPIC_APIS, ENDPOINTS, MODEL_PATH_PREFIX, ClientApiSpec, ResponseShape
from extproc.client_errors import error_reply
from extproc.config import Schema
from extproc.estimate import estimate_usage
from extproc.contract import (
    BACKEND_HEADER,
    CLIENT_CREDENTIAL_HEADERS,
    CODE_DETAILS_ATTRIBUTE,
    MCP_SESSION_HEADER,
    MODEL_HEADER,
    PROCESSOR_DETAILS_PREFIX,
    RATELIMIT_RESET_HEADER,
    RETRY_AFTER_HEADER,
    ROUTE_HEADER,
    STAGE_HEADER,
    TENANT_HEADER,
    TIMEOUT_HEADER,
    TOOL_GRANTS_HEADER,
    ClientApi,
    Meta,
)
from extproc.local_replies import LOCAL_RATE_LIMITED, local_reply_error_type
from extproc.mcp import jsonrpc
from extproc.mcp.call_metadata import message_metadata, session_label
from extproc.protocol import Answer
from extproc.request_headers import header_text
from extproc.redact import redact_headers
from extproc.response import BodyKind, ResponseObserver
from extproc.routing import BackendTarget, CompiledRoute
from extproc.runtime import Runtime
from extproc.schemas import anthropic, forms, openai, responses
from extproc.schemas.anthropic import AnthropicRequestError
from extproc.schemas.openai import Operation, RequestError
from extproc import translators
from extproc.telemetry.record import RequestRecord
from extproc.usage import cost_metadata
from extproc.tenancy import Caller, caller_of

if TYPE_CHECKING:
    from extproc.affinity import Affinity
    from extproc.telemetry import Telemetry
    from extproc.telemetry.tracing import SpanHandle

log = logging.getLogger(__name__)

_TRACE_HEADERS = ("traceparent", "tracestate")
_BUFFER_JSON_RESPONSE = ep.ProcessingResponse(
    response_headers=ep.HeadersResponse(),
    mode_override=processing_mode_pb2.ProcessingMode(
        response_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
    ),
)
# gen_ai.provider.name values of the OpenTelemetry GenAI conventions, per backend schema.
PROVIDER_NAMES = {
    Schema.openai: "openai",
    Schema.anthropic: "anthropic",
    Schema.aws_bedrock: "aws.bedrock",
    Schema.azure_openai: "azure.ai.openai",
    Schema.gemini: "gcp.gemini",
    Schema.gcp_vertex_ai: "gcp.vertex_ai",
}

# APIs whose missing usage the opt-in estimate fills in (text in, text out).
_ESTIMATED = frozenset({ResponseShape.openai, ResponseShape.responses})

_NO_KEYS: Mapping[str, bytes] = MappingProxyType({})  # no client key: shared, read-only
_BACKGROUND: set[asyncio.Future[Any]] = set()  # fire-and-forget writes, referenced until done


class Exchange:
    """Per-request state; lives exactly as long as Envoy's ext_proc stream."""

    __slots__ = (
        "runtime", "telemetry", "started_at", "start_time_ns", "method", "path", "query", "endpoint", "model",
        "route", "target", "stream", "session_id", "tenant", "caller", "observer", "finished", "processor_seconds",
        "span", "user_id", "attributes", "_trace_headers", "_request_body", "_prompt", "_reserved", "staged",
        "affinity", "_stored", "mcp", "done", "content_type", "_client_keys",
    )

    def __init__(
        self, runtime: Runtime, telemetry: Telemetry | None = None, affinity: Affinity | None = None
    ) -> None:
        self.runtime = runtime
        self.telemetry = telemetry
        self.affinity = affinity
        self.started_at = time.monotonic()
        self.start_time_ns = time.time_ns()
        self.method = ""
        self.path = ""
        self.query = ""
        self.endpoint: ClientApiSpec | None = None  # the client API called
        self.model: str | None = None
        self.route: CompiledRoute | None = None
        self.target: BackendTarget | None = None
        self.stream = False
        self.session_id: str | None = None
        self.tenant: str | None = None
        self.caller: Caller | None = None  # who calls (tenancy.py): tenant, how known, grants; None: no tenancy
        self.observer: ResponseObserver | None = None
        self.finished = False
        self.processor_seconds = 0.0  # time spent answering Envoy for this request (server adds it up)
        self.span: SpanHandle | None = None
        self.user_id: str | None = None
        self.attributes: dict[str, str] = {}
        self._trace_headers: dict[str, bytes] = {}
        self._request_body: dict[str, Any] | None = None  # kept only when a span records content
        self._prompt: tuple[str, int] | None = None  # (text, messages), kept only for the estimate
        self._reserved = 0  # tokens charged up front to each budget in reserve mode
        # The upstream stage prepares each attempt (translation, fallback): this stage
        # leaves path, model and credentials alone and learns the served backend late.
        self.staged = False
        self._stored = False  # a Responses API call whose response the backend keeps (stateful)
        self.mcp = False  # an MCP call: only metadata for Envoy; the MCP server does the rest
        # Envoy will send nothing this stream still needs: the processor ends the stream
        # after its next answer (see server.ExternalProcessor.Process).
        self.done = False
        self.content_type = ""  # the request's, for a multipart/form-data body's boundary
        # Provider keys the client sent in backends' client_key_header (bring your own key),
        # by header name: only ever put on the request to that backend, never logged or recorded.
        self._client_keys: Mapping[str, bytes] = _NO_KEYS

    def handle(self, request: ep.ProcessingRequest) -> Answer:
        """Answer one message; a bug here becomes a clean error, never a dead stream."""
        phase = request.WhichOneof("request")
        try:
            if phase == "response_body":
                answer = self.on_response_body(request.response_body)
            elif phase == "request_headers":
                answer = self.on_request_headers(request.request_headers, request.metadata_context)
            elif phase == "request_body":
                answer = self.on_request_body(request.request_body)
            elif phase == "response_headers":
                answer = self.on_response_headers(
                    request.response_headers, protocol.attribute(request, CODE_DETAILS_ATTRIBUTE))
            elif phase == "request_trailers":
                return protocol.CONTINUE_REQUEST_TRAILERS
            else:
                return protocol.CONTINUE_RESPONSE_TRAILERS
        except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
            return self._failed(exc, phase)
        if isinstance(answer, ep.ProcessingResponse):
            return answer
        return self._guarded(answer, phase)

    async def _guarded(self, answer: Coroutine[Any, Any, ep.ProcessingResponse], phase: str | None) -> ep.ProcessingResponse:
        """The same guarantee for answers that had to wait (a lookup, the estimate)."""
        try:
            return await answer
        except Exception as exc:  # noqa: BLE001
            return self._failed(exc, phase)

    def _failed(self, exc: Exception, phase: str | None) -> ep.ProcessingResponse:
        if isinstance(exc, (RequestError, AnthropicRequestError)):
            return self._reject(exc)
        log.error("processor error in %s for %s %s", phase, self.method, self.path, exc_info=exc)
        if phase in ("request_headers", "request_body"):
            return self._reject(
                RequestError(500, "The gateway failed to process this request.", "server_error", "gateway_error")
            )
        return protocol.continue_phase(phase)

    # -- request phases -------------------------------------------------------

    def on_request_headers(
        self, message: ep.HttpHeaders, metadata: base_pb2.Metadata | None = None
    ) -> ep.ProcessingResponse:
        headers = protocol.header_map(message)
        if log.isEnabledFor(logging.DEBUG):  # credentials shown as "<redacted>" (Bearer scheme kept)
            log.debug("request headers: %s", redact_headers(headers))
        self.method = headers.get(":method", b"").decode("latin-1")
        path, _, query = headers.get(":path", b"").decode("latin-1").partition("?")
        self.path, self.query = path, query
        if path in self.runtime.mcp_paths:
            return self._mcp_headers(headers, message.end_of_stream, metadata)
        endpoint = ENDPOINTS.get(path)
        if endpoint is None and self.method == "GET" and path.startswith(MODEL_PATH_PREFIX):
            model = unquote(path.removeprefix(MODEL_PATH_PREFIX))
            if self.runtime.authorization is None:
                return self._model_object(model)
            # A model the caller may not use is not shown: answered once the caller is known.
            return self._identified(headers, metadata, lambda: self._model_object(model))
        if endpoint is None or endpoint.method != self.method:
            raise openai.not_found_path(self.method, path)
        self.endpoint = endpoint
        if endpoint.operation is Operation.models:
            if self.runtime.authorization is None:
                return self._models_list()
            return self._identified(headers, metadata, self._models_list)
        if message.end_of_stream:
            raise openai.bad_request("The request body is empty; expected a JSON object with a 'model' field.")
        length = headers.get("content-length")
        limit = self.runtime.max_request_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise openai.too_large(limit)
        self.session_id = header_text(headers.get(self.runtime.session_id_header))
        if endpoint.form:
            self.content_type = headers.get("content-type", b"").decode("latin-1")
        if self.telemetry is not None:
            self._read_telemetry_headers(headers)
        return self._identified(headers, metadata, lambda: self._llm_headers_answer(headers))

    def _llm_headers_answer(self, headers: dict[str, bytes]) -> ep.ProcessingResponse:
        """The request headers' answer once the caller is known: keep the client's own provider keys."""
        if self.runtime.client_key_headers:
            self._client_keys = {name: key for name in self.runtime.client_key_headers
                                 if (key := headers.get(name, b"").strip())}
        return protocol.CONTINUE_REQUEST_HEADERS

    def _models_list(self) -> ep.ProcessingResponse:
        """GET /v1/models: the models the gateway routes, less those the caller may not use."""
        runtime = self.runtime
        body = models_body(runtime.authorization, self.caller, runtime.router.listed_models, runtime.models_body)
        return protocol.immediate(200, body, PROCESSOR_DETAILS_PREFIX + "models")

    def _identified(
        self, headers: dict[str, bytes], metadata: base_pb2.Metadata | None, then: Callable[[], ep.ProcessingResponse]
    ) -> Answer:
        """`then()` once the caller is known (extproc/tenancy.py: a verified JWT's claim, a key,
        a host, a header, the default): at once, or after a key-store lookup (Redis).
        Every answer that depends on the caller is built by `then`, never before.
        `metadata`: the request's forwarded metadata (Envoy's jwt_authn verified payloads)."""
        runtime = self.runtime
        token = None
        if runtime.jwt_claims is not None:
            verified = metadata.filter_metadata.get(jwt_authn.NAMESPACE) if metadata is not None else None
            token = jwt_authn.read(verified, runtime.jwt_claims, runtime.jwt_required, runtime.jwt_grants)
        elif runtime.tenancy is None:
            return then()
        found = caller_of(
            headers, runtime.tenancy, runtime.tenant_keys, runtime.key_store, runtime.host_pattern, token)
        if found is None or isinstance(found, Caller):
            if found is not None:
                self._set_caller(found)
            return then()

        async def later() -> ep.ProcessingResponse:
            self._set_caller(await found)
            return then()

        return later()

    def _set_caller(self, caller: Caller) -> None:
        self.caller = caller
        self.tenant = caller.tenant
        if self.telemetry is not None and (attribute := self.telemetry.settings.tenant_attribute):
            # Who tenancy.py says calls, over any header mapped to the same attribute.
            self.attributes[attribute] = caller.tenant

    # -- MCP ---------------------------------------------------------------------

    def _mcp_headers(
        self, headers: dict[str, bytes], end_of_stream: bool, metadata: base_pb2.Metadata | None = None
    ) -> Answer:
        """MCP goes to the gateway's MCP server (Envoy's route); this stage only names the
        call for Envoy's rate limits and access log, and skips the response (the MCP
        server records its own telemetry and streams SSE). With request limits it still
        sees the response headers, to give a limit's 429 its retry-after."""
        self.mcp = True
        self.session_id = header_text(headers.get(self.runtime.session_id_header)) or session_label(
            headers.get(MCP_SESSION_HEADER))
        return self._identified(headers, metadata, lambda: self._mcp_headers_answer(end_of_stream))

    def _mcp_headers_answer(self, end_of_stream: bool) -> ep.ProcessingResponse:
        """The MCP request headers' answer once the caller is known (it names the caller to the MCP gateway)."""
        response = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
        # The MCP gateway authorizes tools by these; a client's own copies never get through.
        caller = self.caller
        set_headers = [(TENANT_HEADER, caller.tenant.encode())] if caller is not None else []
        if caller is not None and caller.tools is not None:
            set_headers.append((TOOL_GRANTS_HEADER, orjson.dumps(caller.tools)))
        remove = [h for h in (TENANT_HEADER, TOOL_GRANTS_HEADER) if all(k != h for k, _ in set_headers)]
        response.request_headers.response.header_mutation.CopyFrom(protocol.header_mutation(set_headers, remove))
        # An override replaces every field: keep the buffered request body (proto default: NONE).
        response.mode_override.request_body_mode = processing_mode_pb2.ProcessingMode.BUFFERED
        if not self.runtime.request_limited:
            response.mode_override.response_header_mode = processing_mode_pb2.ProcessingMode.SKIP
        response.mode_override.response_body_mode = processing_mode_pb2.ProcessingMode.NONE
        if end_of_stream:  # GET (server stream) or DELETE (end of session): nothing to read, the metadata goes now
            self.done = not self.runtime.request_limited
            return self._with_mcp_method(response)
        return response

    def _with_mcp_method(self, response: ep.ProcessingResponse) -> ep.ProcessingResponse:
        response.dynamic_metadata.CopyFrom(protocol.metadata_struct(
            {Meta.MCP_METHOD: f"http.{self.method.lower()}", Meta.SESSION_ID: self.session_id, Meta.TENANT: self.tenant}))
        return response

    def _mcp_body(self, body: bytes) -> ep.ProcessingResponse:
        """Metadata for one JSON-RPC message (extproc/mcp/call_metadata.py)."""
        values: dict[str, Any] = {Meta.SESSION_ID: self.session_id, Meta.TENANT: self.tenant,
                                  **message_metadata(body)}
        policy, caller = self.runtime.authorization, self.caller
        if policy is not None and caller is not None and values.get(Meta.MCP_TOOL_CALL) and not policy.allows_tool(
                caller.tenant, caller.tools, values[Meta.MCP_TOOL_NAME]):
            values[Meta.MCP_TOOL_CALL] = 0  # the MCP gateway refuses it as an unknown tool: no call to charge
        budgets.add_charges(values, self.runtime.charges)  # a tool call costs a call budget 1, anything else 0
        response = ep.ProcessingResponse(request_body=ep.BodyResponse())
        response.dynamic_metadata.CopyFrom(protocol.metadata_struct(values))
        self.done = not self.runtime.request_limited  # the response phases are skipped for MCP
        return response

    def _read_telemetry_headers(self, headers: dict[str, bytes]) -> None:
        settings = self.telemetry.settings  # type: ignore[union-attr]
        if settings.user_id_header:
            self.user_id = header_text(headers.get(settings.user_id_header))
        for header, attribute in settings.metric_header_attributes.items():
            value = header_text(headers.get(header))
            if value is not None:
                self.attributes[attribute] = value
        if self.telemetry.tracing.enabled:  # type: ignore[union-attr]
            self._trace_headers = {k: headers[k] for k in _TRACE_HEADERS if k in headers}

    def _refused(self, model: str) -> ep.ProcessingResponse:
        """403 before routing, so nothing reaches a backend; the access log still says who
        asked for what (tenant, model)."""
        reply = self._reject(model_refused(model))
        reply.dynamic_metadata.CopyFrom(protocol.metadata_struct({Meta.TENANT: self.tenant, Meta.REQUEST_MODEL: model}))
        return reply

    def _model_object(self, model: str) -> ep.ProcessingResponse:
        """GET /v1/models/{id}: a model the gateway can route (and the caller may use) is a model it serves."""
        policy = self.runtime.authorization
        refused = policy is not None and self.caller is not None and not policy.allows_model(self.caller, model)
        if not model or refused or self.runtime.router.route_for(model) is None:
            raise openai.model_not_found(model)
        return protocol.immediate(200, openai.model_object(model), PROCESSOR_DETAILS_PREFIX + "model")

    def on_request_body(self, message: ep.HttpBody) -> Answer:
        if self.mcp:
            return self._mcp_body(message.body)
        runtime = self.runtime
        limit = runtime.max_request_body_bytes
        if len(message.body) > limit:
            raise openai.too_large(limit)
        assert self.endpoint is not None
        parsed = self.endpoint.parse(message.body, self.content_type)
        self.model = parsed.model
        policy = runtime.authorization
        if policy is not None and self.caller is not None and not policy.allows_model(self.caller, parsed.model):
            return self._refused(parsed.model)
        selection = runtime.router.select(parsed.model)
        if selection is None:
            if self.endpoint.client_api in ANTHROPIC_APIS:
                raise AnthropicRequestError(404, f"model: {parsed.model} is not served by this gateway", "not_found_error")
            raise openai.model_not_found(parsed.model)
        if self.endpoint.client_api is ClientApi.OPENAI_RESPONSES:
            self._stored = parsed.body.get("store") is not False
            previous = responses.previous_response_id(parsed.body)
            if previous is not None and self.affinity is not None and len(selection[0].members) > 1:
                return self._sticky(message, parsed, selection, previous)
        return self._routed(message, parsed, selection)

    async def _sticky(
        self, message: ep.HttpBody, parsed: Any, selection: tuple[CompiledRoute, BackendTarget], previous: str
    ) -> ep.ProcessingResponse:
        """A stateful Responses API call goes to the backend that holds the previous response."""
        assert self.affinity is not None
        holder = await self.affinity.alookup(previous)
        route, target = selection
        if holder is not None and holder in route.members and (found := self.runtime.router.targets.get(holder)):
            # Straight to that backend: no weighted pick, no fallback to one without the state.
            route = dataclasses.replace(route, fallback=False)
            target = found
        return self._routed(message, parsed, (route, target))

    def _routed(
        self, message: ep.HttpBody, parsed: Any, selection: tuple[CompiledRoute, BackendTarget]
    ) -> ep.ProcessingResponse:
        runtime = self.runtime
        assert self.endpoint is not None
        client_api = self.endpoint.client_api
        self.route, self.target = selection
        route, target = self.route, self.target
        self.stream = parsed.stream and self.endpoint.streams
        served_by = translators.REGISTRY.get((client_api, target.backend.schema_))
        if not route.fallback and served_by is None:
            raise translators.unserved(client_api, target, parsed.model)  # before any upstream cost
        # This stage does itself what OpenAICompatible does (path, model, key); every other
        # pair (another wire format, path or API) is prepared per attempt by the upstream stage.
        self.staged = route.fallback or served_by is not translators.OpenAICompatible

        if self.staged:
            set_headers, remove = self._staged_headers(route, target, parsed.model)
            override = None
        else:
            set_headers, remove = self._upstream_headers(target, parsed.model)
            override = target.model_for(parsed.model)
        if route.timeout_ms is not None:
            # Added after Envoy stripped clients' x-envoy-* headers, so only the route sets it.
            set_headers.append((TIMEOUT_HEADER, route.timeout_ms))
        updates: dict[str, Any] = {}
        if override is not None and override != parsed.model:
            updates["model"] = override
        forced_usage = (
            self.endpoint.usage_option and self.stream and runtime.force_stream_usage
            and not openai.asks_for_usage(parsed.body)
        )
        if forced_usage:
            updates["stream_options"] = openai.with_include_usage(parsed.body)
            # The extra usage event is removed on the way back; that needs plain bytes.
            set_headers.append(("accept-encoding", b"identity"))
        common = ep.CommonResponse(clear_route_cache=True)
        if updates and self.endpoint.form:  # only the model value changes; the file's bytes stay
            new_body = forms.with_model(message.body, parsed, updates["model"])
            common.body_mutation.body = new_body
            set_headers.append(("content-length", str(len(new_body)).encode()))
        elif updates:  # first: a body that cannot be rewritten is refused before anything starts
            new_body = openai.with_updates(message.body, parsed.body, updates)
            common.body_mutation.body = new_body
            set_headers.append(("content-length", str(len(new_body)).encode()))
        if runtime.estimate_when_missing and self.endpoint.response_shape in _ESTIMATED:
            self._prompt = (openai.prompt_text(parsed.body), len(parsed.body.get("messages") or ()) or 1)
        content_chars = self._start_span(set_headers, parsed.body)
        self.observer = ResponseObserver(
            strip_usage=forced_usage,
            collect_text=runtime.estimate_when_missing,
            max_json_bytes=runtime.max_response_bytes,
            collect_output_chars=content_chars,
            shape=self.endpoint.response_shape,
        )

        common.header_mutation.CopyFrom(protocol.header_mutation(set_headers, remove))

        response = ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
        request_metadata: dict[str, Any] = {
            Meta.REQUEST_MODEL: parsed.model,
            Meta.ROUTE_NAME: route.name,
            Meta.SESSION_ID: self.session_id,
            Meta.TENANT: self.tenant,
        }
        if self.span is not None and (ids := self.span.ids()):  # the access log links to the span
            request_metadata.update({Meta.TRACE_ID: ids["trace_id"], Meta.SPAN_ID: ids["span_id"]})
        if self.staged:
            request_metadata[Meta.CLIENT_API] = self.endpoint.client_api.value  # read by the upstream stage
        else:
            request_metadata[Meta.MODEL_NAME_OVERRIDE] = override or parsed.model
            request_metadata[Meta.BACKEND_NAME] = target.name
        if self.span is not None:  # the upstream stage's attempt spans are its children
            request_metadata.update((k, v.decode("latin-1")) for k, v in set_headers if k in _TRACE_HEADERS)
        if runtime.reserve_budgets:
            # A form's bytes are mostly a file: no measure of tokens (usage is charged at the end).
            self._reserved = 0 if self.endpoint.form else openai.reserve_estimate(len(message.body), parsed.body)
            request_metadata[budgets.RESERVE_KEY] = self._reserved
        response.dynamic_metadata.CopyFrom(protocol.metadata_struct(request_metadata))
        return response

    def _staged_headers(
        self, route: CompiledRoute, target: BackendTarget, model: str
    ) -> tuple[list[tuple[str, bytes]], list[str]]:
        """Only where Envoy goes: the upstream stage sets path, model and credentials per attempt."""
        if route.fallback:
            where = [(ROUTE_HEADER, route.name.encode())]
            other = [BACKEND_HEADER, STAGE_HEADER]
        else:  # the stage header picks the backend's staged cluster where it has one (OpenAI's)
            where = [(BACKEND_HEADER, target.name.encode()), (STAGE_HEADER, b"1")]
            other = [ROUTE_HEADER]
        # The routing headers not set here are removed: a client must not pick them (Envoy
        # matches fallback routes by x-ai-eg-route first). A client's own provider key stays
        # only for the backend that takes it: the upstream stage puts it in place.
        own = None if route.fallback else target.client_key_header
        keys = [h for h in self.runtime.client_key_headers if h != own]
        return [(MODEL_HEADER, model.encode()), *where], [*CLIENT_CREDENTIAL_HEADERS, *other, *keys]

    def _upstream_headers(self, target: BackendTarget, model: str) -> tuple[list[tuple[str, bytes]], list[str]]:
        """Where Envoy sends the request and with whose credentials: (headers to set, to remove)."""
        set_headers: list[tuple[str, bytes]] = [
            (MODEL_HEADER, model.encode()),
            (BACKEND_HEADER, target.name.encode()),
            # :path was decoded as Latin-1, so encoding it back the same way keeps every byte.
            (":path", self._upstream_path(target).encode("latin-1")),
        ]
        credentials = target.credentials(self._client_keys)  # credentials and the backend's configured headers
        set_headers.extend(credentials)
        if credentials is target.request_headers:  # the precomputed case: nothing to reconcile
            return set_headers, [*target.removed_client_headers, *self.runtime.client_key_headers]
        # The client's own key: never remove the header it now goes in (a backend without a key of its own).
        setting = {name for name, _ in credentials}
        return set_headers, [h for h in (*target.removed_client_headers, *self.runtime.client_key_headers)
                             if h not in setting]

    def _start_span(self, set_headers: list[tuple[str, bytes]], body: dict[str, Any]) -> int | None:
        """Start the request's span (child of the client's trace) and pass it upstream.

        Returns how many characters of output to assemble for it (None: no content kept)."""
        tracing = self.telemetry.tracing if self.telemetry is not None else None
        if tracing is None or not tracing.enabled or self.endpoint is None:
            return None
        self.span = tracing.start(
            self.endpoint.operation.value, self._trace_headers, self.start_time_ns, self.endpoint.client_api)
        if self.span is None:
            return None
        set_headers.extend(tracing.inject(self.span))
        if not tracing.records_content:
            return None
        self._request_body = body
        return self.telemetry.settings.max_content_chars  # type: ignore[union-attr]

    def _upstream_path(self, target: BackendTarget) -> str:
        assert self.endpoint is not None
        path = target.path_prefix + self.endpoint.suffix
        return f"{path}?{self.query}" if self.query else path

    # -- response phases ------------------------------------------------------

    def on_response_headers(self, message: ep.HttpHeaders, code_details: str = "") -> Answer:
        """`code_details`: Envoy's response code details, which tell its own replies (a
        backend down, a timeout, a rate limit) from the answers backends gave."""
        headers = protocol.header_map(message)
        if code_details == LOCAL_RATE_LIMITED and (reset := headers.get(RATELIMIT_RESET_HEADER)):
            # A request limit's 429: Envoy's x-ratelimit-reset says when the tenant's bucket
            # has a token again (whole seconds, never early); retry-after must say the same.
            answer = self._answer_response_headers(message, headers, code_details)
            return _with_headers(answer, [(RETRY_AFTER_HEADER, reset)])
        return self._answer_response_headers(message, headers, code_details)

    def _answer_response_headers(self, message: ep.HttpHeaders, headers: dict[str, bytes], code_details: str) -> Answer:
        observer = self.observer
        if observer is None:  # not a request we routed: an MCP call, or an Envoy local reply
            self.done = True
            return protocol.CONTINUE_RESPONSE_HEADERS
        if not self.staged:
            return self._on_response_headers(message, headers, observer, code_details)
        # The upstream stage names the backend that served this attempt: account to it
        # (before any accounting below), and keep the internal header from the client.
        served = headers.get(BACKEND_HEADER)
        if served is None:
            return self._on_response_headers(message, headers, observer, code_details)
        self.target = self.runtime.router.targets.get(served.decode("latin-1"), self.target)
        answer = self._on_response_headers(message, headers, observer, code_details)
        return _with_headers(answer, remove=[BACKEND_HEADER])

    def _on_response_headers(
        self, message: ep.HttpHeaders, headers: dict[str, bytes], observer: ResponseObserver, code_details: str
    ) -> Answer:
        status = headers.get(":status", b"0")
        length = headers.get("content-length", b"")
        envoy_error = local_reply_error_type(code_details)
        kind = observer.on_headers(
            int(status) if status.isdigit() else 0,
            # Envoy's own reply: its body says nothing about the backend, so it is not read.
            "" if envoy_error else headers.get("content-type", b"").decode("latin-1"),
            headers.get("content-encoding", b"").decode("latin-1"),
            int(length) if length.isdigit() else None,
        )
        observer.error_type = envoy_error
        if kind is BodyKind.json and not message.end_of_stream:
            # A JSON body is read at its end anyway: one buffered message instead of a
            # message per chunk (and one more for the end). PARTIAL: a body over Envoy's
            # buffer limit comes in parts rather than failing the request.
            return _BUFFER_JSON_RESPONSE
        if kind is not BodyKind.none and not message.end_of_stream:
            return protocol.CONTINUE_RESPONSE_HEADERS
        # Nothing to read in the body: account now, and spare Envoy the body round trips.
        response = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
        if not message.end_of_stream:
            response.mode_override.response_body_mode = processing_mode_pb2.ProcessingMode.NONE
        self.done = True
        return self._finish(response)

    def on_response_body(self, message: ep.HttpBody) -> Answer:
        observer = self.observer
        if observer is None or observer.kind is BodyKind.none:
            self.done = True
            return protocol.CONTINUE_RESPONSE_BODY
        end = message.end_of_stream
        replacement = observer.on_chunk(message.body, end, time.monotonic())
        # Account as soon as the body is complete ([DONE] or all bytes), in the answer that
        # lets those bytes go to the client: a client that hangs up right after reading
        # them can no longer cost us the metadata.
        finish = not self.finished and (observer.complete or end)
        # Accounted, and no bytes of the body held back: this answer is the stream's last.
        self.done = (self.finished or finish) and (end or not observer.holds_back)
        if replacement is None and not finish:
            return protocol.CONTINUE_RESPONSE_BODY
        response = ep.ProcessingResponse(response_body=ep.BodyResponse())
        if replacement is not None and replacement != message.body:
            response.response_body.response.body_mutation.body = replacement
        return self._finish(response) if finish else response

    # -- accounting -----------------------------------------------------------

    def _finish(self, response: ep.ProcessingResponse) -> Answer:
        """Attach the end-of-response metadata (tokens, costs, model, latency) to `response`."""
        self.finished = True
        observer = self.observer
        assert observer is not None
        self._remember_state(observer)
        if observer.usage is None and self._prompt is not None and 200 <= observer.status < 300:
            return self._finish_with_estimate(response)
        response.dynamic_metadata.CopyFrom(protocol.metadata_struct(self.final_metadata()))
        return response

    async def _finish_with_estimate(self, response: ep.ProcessingResponse) -> ep.ProcessingResponse:
        assert self.observer is not None and self._prompt is not None
        prompt, messages = self._prompt
        self.observer.usage = await asyncio.to_thread(estimate_usage, prompt, messages, self.observer.output_text)
        response.dynamic_metadata.CopyFrom(protocol.metadata_struct(self.final_metadata()))
        return response

    def _remember_state(self, observer: ResponseObserver) -> None:
        """A stored Responses API response: note which backend holds it, for follow-ups.
        Written off the event loop; a lost write only costs stickiness, never the request."""
        if not self._stored or self.affinity is None or self.target is None or self.route is None:
            return
        if observer.response_id is None or not 200 <= observer.status < 300 or len(self.route.members) < 2:
            return
        task = asyncio.ensure_future(self.affinity.aremember(observer.response_id, self.target.name))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    def final_metadata(self) -> dict[str, Any]:
        """Everything known at the end of the response, as metadata values (extproc/accounting.py)."""
        observer, target, route = self.observer, self.target, self.route
        assert observer is not None and target is not None and route is not None
        return end_of_response_metadata(
            self.runtime, observer, self.model or "", target.name, route.name, self._reserved, self.record())

    def close(self) -> None:
        """Envoy ended the stream: publish the request's record to metrics and traces.

        A response that never completed (the client or the upstream hung up) is still
        recorded with what was seen; Envoy no longer listens for metadata then, so the
        processor also logs it."""
        record = self.record()
        if record is not None and record.usage is not None and self.runtime.costs:
            record.costs = cost_metadata(self.runtime.costs, record.usage, record.request_model, record.backend,
                                         record.route)
        if record is not None and self.telemetry is not None:
            try:
                self.telemetry.publish(record, self.span)
            except Exception:
                log.exception("telemetry failed for %s %s", self.method, self.path)
        observer = self.observer
        if self.finished or observer is None or self.target is None or self.route is None:
            return
        usage = observer.usage
        ttft = (observer.first_output_at - self.started_at) * 1000 if observer.first_output_at else None
        log.info(
            "response cut off before completion: route=%s backend=%s model=%s status=%s output_seen=%s "
            "usage=%s ttft_ms=%s",
            self.route.name,
            self.target.name,
            self.model,
            observer.status or "none",
            observer.first_output_at is not None,
            usage.metadata() if usage else "not reported",
            f"{ttft:.1f}" if ttft is not None else "none",
        )

    def record(self) -> RequestRecord | None:
        """The facts of this request for telemetry; None for requests never routed."""
        observer, target, route, endpoint = self.observer, self.target, self.route, self.endpoint
        if observer is None or target is None or route is None or endpoint is None or self.model is None:
            return None
        status = observer.status
        ok = 200 <= status < 300
        if status >= 300:
            error_type = observer.error_type or str(status)
        elif status == 0:
            error_type = "no_response"
        elif not self.finished:
            error_type = "incomplete"  # cut off mid-body, by the client or the upstream
        else:
            error_type = None
        return RequestRecord(
            operation=endpoint.operation.value,
            provider=PROVIDER_NAMES[target.backend.schema_],
            request_model=self.model,
            backend_model=target.model_for(self.model),
            response_model=observer.response_model,
            backend=target.name,
            route=route.name,
            # precomputed per backend: parsing the base URL per request showed in the profile
            server_address=target.host,
            server_port=target.port,
            stream=self.stream,
            status=status,
            error_type=error_type,
            usage=observer.usage if ok else None,
            start_time_ns=self.start_time_ns,
            started_at=self.started_at,
            ended_at=time.monotonic(),
            first_output_at=observer.first_output_at,
            last_output_at=observer.last_output_at,
            complete=self.finished,
            processor_seconds=self.processor_seconds,
            client_api=endpoint.client_api,
            session_id=self.session_id,
            user_id=self.user_id,
            tenant=self.tenant,
            attributes=self.attributes,
            request_body=self._request_body,
            output=observer.output,
            response_id=observer.output_id,
            embeddings=observer.embeddings,
        )

    def _reject(self, error: RequestError | AnthropicRequestError) -> ep.ProcessingResponse:
        """Answer the client in its own API's error shape (MCP: a JSON-RPC error, one code per kind
        of refusal, the same as Envoy's own jwt_authn replies: see envoyconfig._JWT_REPLIES)."""
        if self.mcp:
            details = PROCESSOR_DETAILS_PREFIX + (getattr(error, "code", None) or error.error_type)
            body = jsonrpc.error_response(None, _mcp_error_code(error.status), error.message)
            return protocol.immediate(error.status, body, details)
        client_api = self.endpoint.client_api if self.endpoint is not None else None
        return error_reply(client_api, error, PROCESSOR_DETAILS_PREFIX)


def _mcp_error_code(status: int) -> int:
    """A refusal's JSON-RPC code on MCP paths, as Envoy's own jwt_authn replies give it:
    the caller refused (401/403: no, invalid, revoked or unknown identity) -32052; the
    gateway cannot check the caller now (503: key store or identity provider down) -32050;
    anything else is the request's fault (-32600)."""
    if status in (401, 403):
        return jsonrpc.UNAUTHORIZED
    if status == 503:
        return jsonrpc.SERVER_UNAVAILABLE
    return jsonrpc.INVALID_REQUEST


def _with_headers(answer: Answer, set_headers: Iterable[tuple[str, bytes]] = (), remove: Iterable[str] = ()) -> Answer:
    """A response-headers answer that also sets and removes these headers."""
    if not isinstance(answer, ep.ProcessingResponse):
        pending = answer

        async def later() -> ep.ProcessingResponse:  # the opt-in estimate runs in a thread
            done = _with_headers(await pending, set_headers, remove)
            assert isinstance(done, ep.ProcessingResponse)
            return done

        return later()
    response = ep.ProcessingResponse()
    response.CopyFrom(answer)  # answers may be shared constants: never mutate them
    mutation = response.response_headers.response.header_mutation
    mutation.set_headers.extend(protocol.set_header(k, v) for k, v in set_headers)
    mutation.remove_headers.extend(remove)
    return response
