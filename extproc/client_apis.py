"""Each client API the gateway serves, described once: where clients call it, what the
call is (its OpenTelemetry operation), how its request is parsed, whether its streams
report usage only when asked, and in which shape its responses are read.

The request stage looks the spec up by path and then asks it, instead of testing API
names; the spec's `client_api` also picks its error shape (extproc/client_errors.py),
its translators (extproc/translators/) and its span reading (extproc/telemetry/).
To serve a new client API: add a ClientApi value, its spec and its path here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from extproc.contract import ClientApi
from extproc.schemas import anthropic, openai
from extproc.schemas.openai import Operation


class ParsedRequest(Protocol):
    """The few facts the gateway needs from a request body, plus the body itself."""

    body: dict[str, Any]
    model: str
    stream: bool


class ResponseShape(str, Enum):
    """How a response body of this API is read (usage, model, output, errors)."""

    openai = "openai"  # chat/completions/embeddings JSON, chat.completion.chunk SSE
    anthropic = "anthropic"  # a Messages JSON body, Anthropic's named SSE events
    responses = "responses"  # a Response object, response.* SSE events


@dataclass(frozen=True, slots=True)
class ClientApiSpec:
    client_api: ClientApi
    operation: Operation
    method: str
    suffix: str  # the path after the API version prefix, appended to a backend's base URL
    parse_request: Callable[[bytes], ParsedRequest] = openai.parse_request
    response_shape: ResponseShape = ResponseShape.openai
    # Its streams carry usage only when the client sends stream_options.include_usage
    # (the gateway asks for it, and hides the extra event from a client that did not).
    usage_option: bool = False

    @property
    def streams(self) -> bool:
        """Whether `"stream": true` makes this API answer with a stream."""
        return self.operation in (Operation.chat, Operation.completion)


SPECS: dict[ClientApi, ClientApiSpec] = {spec.client_api: spec for spec in (
    ClientApiSpec(ClientApi.OPENAI_CHAT, Operation.chat, "POST", "/chat/completions", usage_option=True),
    ClientApiSpec(ClientApi.OPENAI_COMPLETIONS, Operation.completion, "POST", "/completions", usage_option=True),
    ClientApiSpec(ClientApi.OPENAI_EMBEDDINGS, Operation.embeddings, "POST", "/embeddings"),
    ClientApiSpec(ClientApi.OPENAI_MODELS, Operation.models, "GET", "/models"),
    ClientApiSpec(ClientApi.OPENAI_RESPONSES, Operation.chat, "POST", "/responses",
                  response_shape=ResponseShape.responses),
    ClientApiSpec(ClientApi.ANTHROPIC_MESSAGES, Operation.chat, "POST", anthropic.MESSAGES_SUFFIX,
                  parse_request=anthropic.parse_request, response_shape=ResponseShape.anthropic),
)}

# Client paths as the openai and anthropic SDKs send them (the openai SDK's base URL ends
# in /v1; the anthropic SDK's base URL is the gateway's /anthropic).
ENDPOINTS: dict[str, ClientApiSpec] = {
    "/v1/chat/completions": SPECS[ClientApi.OPENAI_CHAT],
    "/v1/completions": SPECS[ClientApi.OPENAI_COMPLETIONS],
    "/v1/embeddings": SPECS[ClientApi.OPENAI_EMBEDDINGS],
    "/v1/models": SPECS[ClientApi.OPENAI_MODELS],
    "/v1/responses": SPECS[ClientApi.OPENAI_RESPONSES],
    "/anthropic/v1/messages": SPECS[ClientApi.ANTHROPIC_MESSAGES],
}
MODEL_PATH_PREFIX = "/v1/models/"  # GET /v1/models/{id}
