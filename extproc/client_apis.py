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
from extproc.schemas import anthropic, forms, openai
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
    # Images and audio: `usage` {input_tokens, output_tokens} where the model reports
    # tokens (gpt-image, gpt-4o-transcribe), in the JSON body or a stream's last event;
    # audio and text/srt/vtt bodies are not read.
    media = "media"
    rerank = "rerank"  # Cohere v2 rerank: meta.tokens (or vLLM/Jina's usage)
    unmetered = "unmetered"  # token counting: observed, never charged as usage


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
    form: bool = False  # a multipart/form-data body (schemas/forms.py), not JSON
    stream_field: bool = False  # besides chat and completions: `stream` asks for a stream

    @property
    def streams(self) -> bool:
        """Whether `"stream": true` makes this API answer with a stream."""
        return self.stream_field or self.operation in (Operation.chat, Operation.completion)

    def parse(self, raw: bytes, content_type: str) -> ParsedRequest:
        """The request's facts, from a JSON body or (for a form API) a multipart one."""
        if self.form:
            return forms.parse_form(raw, content_type)
        return self.parse_request(raw)


SPECS: dict[ClientApi, ClientApiSpec] = {spec.client_api: spec for spec in (
    ClientApiSpec(ClientApi.OPENAI_CHAT, Operation.chat, "POST", "/chat/completions", usage_option=True),
    ClientApiSpec(ClientApi.OPENAI_COMPLETIONS, Operation.completion, "POST", "/completions", usage_option=True),
    ClientApiSpec(ClientApi.OPENAI_EMBEDDINGS, Operation.embeddings, "POST", "/embeddings"),
    ClientApiSpec(ClientApi.OPENAI_MODELS, Operation.models, "GET", "/models"),
    ClientApiSpec(ClientApi.OPENAI_RESPONSES, Operation.chat, "POST", "/responses",
                  response_shape=ResponseShape.responses),
    ClientApiSpec(ClientApi.ANTHROPIC_MESSAGES, Operation.chat, "POST", anthropic.MESSAGES_SUFFIX,
                  parse_request=anthropic.parse_request, response_shape=ResponseShape.anthropic),
    ClientApiSpec(ClientApi.OPENAI_IMAGES, Operation.generate_content, "POST", "/images/generations",
                  response_shape=ResponseShape.media, stream_field=True),
    ClientApiSpec(ClientApi.OPENAI_TRANSCRIPTIONS, Operation.generate_content, "POST", "/audio/transcriptions",
                  response_shape=ResponseShape.media, form=True, stream_field=True),
    ClientApiSpec(ClientApi.OPENAI_TRANSLATIONS, Operation.generate_content, "POST", "/audio/translations",
                  response_shape=ResponseShape.media, form=True),
    ClientApiSpec(ClientApi.OPENAI_SPEECH, Operation.generate_content, "POST", "/audio/speech",
                  response_shape=ResponseShape.media),
    ClientApiSpec(ClientApi.RERANK, Operation.rerank, "POST", "/rerank", response_shape=ResponseShape.rerank),
    ClientApiSpec(ClientApi.OPENAI_INPUT_TOKENS, Operation.count_tokens, "POST", "/responses/input_tokens",
                  response_shape=ResponseShape.unmetered),
    ClientApiSpec(ClientApi.ANTHROPIC_COUNT_TOKENS, Operation.count_tokens, "POST", anthropic.COUNT_TOKENS_SUFFIX,
                  parse_request=anthropic.parse_count_tokens, response_shape=ResponseShape.unmetered),
)}
# Client APIs whose errors take Anthropic's shape (extproc/client_errors.py).
ANTHROPIC_APIS = frozenset({ClientApi.ANTHROPIC_MESSAGES, ClientApi.ANTHROPIC_COUNT_TOKENS})

# Client paths as the openai, anthropic and cohere SDKs send them (the openai SDK's base URL
# ends in /v1; the anthropic SDK's base URL is the gateway's /anthropic; cohere's is the gateway).
ENDPOINTS: dict[str, ClientApiSpec] = {
    "/v1/chat/completions": SPECS[ClientApi.OPENAI_CHAT],
    "/v1/completions": SPECS[ClientApi.OPENAI_COMPLETIONS],
    "/v1/embeddings": SPECS[ClientApi.OPENAI_EMBEDDINGS],
    "/v1/models": SPECS[ClientApi.OPENAI_MODELS],
    "/v1/responses": SPECS[ClientApi.OPENAI_RESPONSES],
    "/anthropic/v1/messages": SPECS[ClientApi.ANTHROPIC_MESSAGES],
    "/v1/images/generations": SPECS[ClientApi.OPENAI_IMAGES],
    "/v1/audio/transcriptions": SPECS[ClientApi.OPENAI_TRANSCRIPTIONS],
    "/v1/audio/translations": SPECS[ClientApi.OPENAI_TRANSLATIONS],
    "/v1/audio/speech": SPECS[ClientApi.OPENAI_SPEECH],
    "/v1/rerank": SPECS[ClientApi.RERANK],  # vLLM's and Jina's path
    "/v2/rerank": SPECS[ClientApi.RERANK],  # Cohere's (the cohere SDK's base URL is the gateway)
    "/v1/responses/input_tokens": SPECS[ClientApi.OPENAI_INPUT_TOKENS],
    "/anthropic/v1/messages/count_tokens": SPECS[ClientApi.ANTHROPIC_COUNT_TOKENS],
}
MODEL_PATH_PREFIX = "/v1/models/"  # GET /v1/models/{id}
