"""Small builders for ext_proc messages, written once so the phase logic stays readable.

Envoy facts these encode (see ENVOY_FACTS.md): header values travel in `raw_value`
(never `value`); every phase must be answered with its own response type, even
when nothing changes; dynamic metadata lands only in a namespace Envoy listens to.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc.contract import ATTRIBUTES_KEY, METADATA_NAMESPACE


# What a stage's `handle` returns: the response, or a coroutine the server awaits when
# the answer must wait (a lookup, an estimate, credentials) without blocking the loop.
Answer = ep.ProcessingResponse | Coroutine[Any, Any, ep.ProcessingResponse]
# The gRPC service Envoy calls; also the name the processor's health service answers for.
PROCESSOR_SERVICE = ep.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = (("content-type", b"application/json"),)

# Answers that change nothing. They are never mutated after creation, so one shared
# instance per phase saves an allocation per message on the hot path.
CONTINUE_REQUEST_HEADERS = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
CONTINUE_REQUEST_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
CONTINUE_RESPONSE_HEADERS = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
CONTINUE_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
CONTINUE_REQUEST_TRAILERS = ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
CONTINUE_RESPONSE_TRAILERS = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


def continue_phase(phase: str | None) -> ep.ProcessingResponse:
    """The change-nothing answer for a phase (its name as `ProcessingRequest.WhichOneof` gives it)."""
    return {
        "request_headers": CONTINUE_REQUEST_HEADERS,
        "request_body": CONTINUE_REQUEST_BODY,
        "response_headers": CONTINUE_RESPONSE_HEADERS,
        "response_body": CONTINUE_RESPONSE_BODY,
        "request_trailers": CONTINUE_REQUEST_TRAILERS,
    }.get(phase or "", CONTINUE_RESPONSE_TRAILERS)


def attribute(request: ep.ProcessingRequest, name: str) -> str:
    """A string attribute Envoy sent with this message ("" when absent): attributes come
    with the first message of each direction, if the filter's config asks for them."""
    attributes = request.attributes.get(ATTRIBUTES_KEY)
    if attributes is None:
        return ""
    value = attributes.fields.get(name)
    return value.string_value if value is not None else ""


def header_map(headers: ep.HttpHeaders) -> dict[str, bytes]:
    """Envoy's header list as a dict of lower-case name -> raw bytes (last value wins)."""
    return {h.key: h.raw_value for h in headers.headers.headers}


def set_header(name: str, value: bytes) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, raw_value=value), append_action=_OVERWRITE)


def header_mutation(
    set_headers: Iterable[tuple[str, bytes]] = (), remove: Iterable[str] = ()
) -> ep.HeaderMutation:
    return ep.HeaderMutation(
        set_headers=[set_header(k, v) for k, v in set_headers],
        remove_headers=list(remove),
    )


def metadata_struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    """Dynamic metadata under the gateway namespace; None values are left out."""
    struct = struct_pb2.Struct()
    struct.update({METADATA_NAMESPACE: {k: v for k, v in values.items() if v is not None}})
    return struct


def immediate(
    status: int,
    body: bytes,
    details: str,
    headers: Iterable[tuple[str, bytes]] = _JSON,
    metadata: Mapping[str, Any] | None = None,
) -> ep.ProcessingResponse:
    """Answer the client directly (Envoy sends it; the upstream never sees the request)."""
    response = ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=header_mutation(headers),
            body=body,
            details=details,
        )
    )
    if metadata:
        response.dynamic_metadata.CopyFrom(metadata_struct(metadata))
    return response
