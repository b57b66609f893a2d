"""The client's error, in its own API's shape: one renderer for both stages.

The gateway refuses a request itself (a bad body, an unknown model, a pair no backend
serves, a failure of its own) with a status, a message and an OpenAI-style type and
code. A client of the Anthropic Messages API gets Anthropic's error shape, with the
Anthropic type its SDK maps to the right exception (413 -> `request_too_large`, 404 ->
`not_found_error`, ...); every other client gets OpenAI's shape.
"""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc import protocol
from extproc.client_apis import ANTHROPIC_APIS
from extproc.contract import ClientApi
from extproc.schemas import anthropic, openai
from extproc.schemas.anthropic import AnthropicRequestError
from extproc.schemas.openai import RequestError

GatewayError = RequestError | AnthropicRequestError


def anthropic_type(error: GatewayError) -> str:
    """The Anthropic error type for `error`: its own when it already is one, else by status."""
    if error.status == 413:
        return "request_too_large"
    if isinstance(error, AnthropicRequestError):
        return error.error_type
    return anthropic.ERROR_TYPES_BY_STATUS.get(
        error.status, "api_error" if error.status >= 500 else "invalid_request_error")


def error_body(client_api: ClientApi | None, error: GatewayError) -> bytes:
    if client_api in ANTHROPIC_APIS:
        return anthropic.error_body(error.message, anthropic_type(error))
    if isinstance(error, AnthropicRequestError):  # an Anthropic-side check, told to an OpenAI client
        return openai.error_body(error.status, error.message, error.error_type)
    return openai.error_body(error.status, error.message, error.error_type, error.code, error.param)


def error_reply(client_api: ClientApi | None, error: GatewayError, details_prefix: str) -> ep.ProcessingResponse:
    """The immediate response refusing the request; its response code details name the
    error (`<prefix><code or type>`), so the access log and Envoy's local-reply mappers
    tell the gateway's own refusals apart."""
    code = getattr(error, "code", None) or error.error_type
    return protocol.immediate(error.status, error_body(client_api, error), details_prefix + code)
