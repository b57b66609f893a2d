"""One HTTP exchange as the processor sees it, phase by phase.

Envoy opens one gRPC stream per HTTP request and sends, in order: request headers,
the buffered request body (POST only), response headers, response body chunks.
Each `on_*` method answers one message. Nothing here blocks or awaits: the phase
work is pure CPU on data Envoy already sent, so it runs inline on the event loop.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc import protocol
from extproc.routing import BackendTarget, CompiledRoute
from extproc.runtime import Runtime
from extproc.schemas import openai
from extproc.schemas.openai import Endpoint, RequestError

log = logging.getLogger(__name__)

MODEL_HEADER = "x-ai-eg-model"
BACKEND_HEADER = "x-ai-eg-backend"
# Credentials a client may send to the gateway; none of them may reach a provider.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")
PROCESSOR_DETAILS_PREFIX = "extproc_"  # response code details of those replies


class Exchange:
    """Per-request state; lives exactly as long as Envoy's ext_proc stream."""

    __slots__ = ("runtime", "method", "path", "query", "endpoint", "model", "route", "target")

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.method = ""
        self.path = ""
        self.query = ""
        self.endpoint: Endpoint | None = None
        self.model: str | None = None
        self.route: CompiledRoute | None = None
        self.target: BackendTarget | None = None

    def handle(self, request: ep.ProcessingRequest) -> ep.ProcessingResponse:
        """Answer one message; a bug here becomes a clean error, never a dead stream."""
        phase = request.WhichOneof("request")
        try:
            if phase == "request_headers":
                return self.on_request_headers(request.request_headers)
            if phase == "request_body":
                return self.on_request_body(request.request_body)
            if phase == "response_headers":
                return protocol.CONTINUE_RESPONSE_HEADERS
            if phase == "response_body":
                return protocol.CONTINUE_RESPONSE_BODY
            if phase == "request_trailers":
                return protocol.CONTINUE_REQUEST_TRAILERS
            return protocol.CONTINUE_RESPONSE_TRAILERS
        except RequestError as exc:
            return self._reject(exc)
        except Exception:
            log.exception("processor error in %s for %s %s", phase, self.method, self.path)
            if phase in ("request_headers", "request_body"):
                return self._reject(
                    RequestError(500, "The gateway failed to process this request.", "server_error", "gateway_error")
                )
            return _continue(phase)

    # -- request phases -------------------------------------------------------

    def on_request_headers(self, message: ep.HttpHeaders) -> ep.ProcessingResponse:
        headers = protocol.header_map(message)
        self.method = headers.get(":method", b"").decode("latin-1")
        path, _, query = headers.get(":path", b"").decode("latin-1").partition("?")
        self.path, self.query = path, query
        endpoint = openai.ENDPOINTS.get(path)
        if endpoint is None and self.method == "GET" and path.startswith(openai.MODEL_PATH_PREFIX):
            return self._model_object(unquote(path.removeprefix(openai.MODEL_PATH_PREFIX)))
        if endpoint is None or endpoint.method != self.method:
            raise openai.not_found_path(self.method, path)
        self.endpoint = endpoint
        if endpoint.operation is openai.Operation.models:
            return protocol.immediate(200, self.runtime.models_body, PROCESSOR_DETAILS_PREFIX + "models")
        if message.end_of_stream:
            raise openai.bad_request("The request body is empty; expected a JSON object with a 'model' field.")
        length = headers.get("content-length")
        limit = self.runtime.max_request_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise openai.too_large(limit)
        return protocol.CONTINUE_REQUEST_HEADERS

    def _model_object(self, model: str) -> ep.ProcessingResponse:
        """GET /v1/models/{id}: a model the gateway can route is a model it serves."""
        if not model or self.runtime.router.route_for(model) is None:
            raise openai.model_not_found(model)
        return protocol.immediate(200, openai.model_object(model), PROCESSOR_DETAILS_PREFIX + "model")

    def on_request_body(self, message: ep.HttpBody) -> ep.ProcessingResponse:
        limit = self.runtime.max_request_body_bytes
        if len(message.body) > limit:
            raise openai.too_large(limit)
        parsed = openai.parse_request(message.body)
        self.model = parsed.model
        selection = self.runtime.router.select(parsed.model)
        if selection is None:
            raise openai.model_not_found(parsed.model)
        self.route, self.target = selection
        target = self.target
        assert self.endpoint is not None

        set_headers: list[tuple[str, bytes]] = [
            (MODEL_HEADER, parsed.model.encode()),
            (BACKEND_HEADER, target.name.encode()),
            # :path was decoded as Latin-1, so encoding it back the same way keeps every byte.
            (":path", self._upstream_path(target).encode("latin-1")),
        ]
        remove: list[str] = []
        if target.api_key is not None:
            set_headers.append(("authorization", b"Bearer " + target.api_key.get_secret_value().encode()))
            remove.extend(h for h in CLIENT_CREDENTIAL_HEADERS if h != "authorization")
        else:
            remove.extend(CLIENT_CREDENTIAL_HEADERS)
        set_headers.extend(target.extra_headers)

        common = ep.CommonResponse(clear_route_cache=True)
        override = target.model_name_override
        if override is not None and override != parsed.model:
            new_body = openai.with_model(message.body, parsed.body, override)
            common.body_mutation.body = new_body
            set_headers.append(("content-length", str(len(new_body)).encode()))
        common.header_mutation.CopyFrom(protocol.header_mutation(set_headers, remove))

        response = ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
        response.dynamic_metadata.CopyFrom(
            protocol.metadata_struct(
                {
                    "request_model": parsed.model,
                    "model_name_override": override or parsed.model,
                    "backend_name": target.name,
                    "route_name": self.route.name,
                }
            )
        )
        return response

    def _upstream_path(self, target: BackendTarget) -> str:
        assert self.endpoint is not None
        path = target.path_prefix + self.endpoint.suffix
        return f"{path}?{self.query}" if self.query else path

    def _reject(self, error: RequestError) -> ep.ProcessingResponse:
        body = openai.error_body(error.status, error.message, error.error_type, error.code, error.param)
        code = error.code or error.error_type
        return protocol.immediate(error.status, body, PROCESSOR_DETAILS_PREFIX + code)


def _continue(phase: str | None) -> ep.ProcessingResponse:
    return {
        "request_headers": protocol.CONTINUE_REQUEST_HEADERS,
        "request_body": protocol.CONTINUE_REQUEST_BODY,
        "response_headers": protocol.CONTINUE_RESPONSE_HEADERS,
        "response_body": protocol.CONTINUE_RESPONSE_BODY,
        "request_trailers": protocol.CONTINUE_REQUEST_TRAILERS,
    }.get(phase or "", protocol.CONTINUE_RESPONSE_TRAILERS)
