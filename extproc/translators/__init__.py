"""One translator per (client API, backend schema) pair, picked from one registry.

To serve a new pair, add its module here and one line to REGISTRY; the upstream stage
treats every pair the same way (extproc/upstream.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from extproc.config import Schema
from extproc.contract import ClientApi
from extproc.schemas import anthropic, openai
from extproc.translators.anthropic_messages import AnthropicMessages
from extproc.translators.azure_openai import AzureOpenAI
from extproc.translators.base import Attempt, StreamTranslator, Translator, UpstreamRequest
from extproc.translators.chat_to_anthropic import ChatToAnthropic
from extproc.translators.chat_to_bedrock import ChatToBedrock
from extproc.translators.messages_to_chat import via_chat
from extproc.translators.chat_to_gemini import ChatToGemini
from extproc.translators.embeddings_to_gemini import EmbeddingsToGemini
from extproc.translators.openai_compatible import OpenAICompatible
from extproc.translators.vertex import chat_on_vertex, count_tokens_on_vertex, messages_on_vertex

if TYPE_CHECKING:
    from extproc.routing import BackendTarget

__all__ = [
    "REGISTRY", "Attempt", "OpenAICompatible", "StreamTranslator", "Translator", "UpstreamRequest", "translator_for",
    "unserved",
]

REGISTRY: dict[tuple[ClientApi, Schema], Callable[[Attempt], Translator]] = {
    (ClientApi.OPENAI_CHAT, Schema.openai): OpenAICompatible,
    (ClientApi.OPENAI_COMPLETIONS, Schema.openai): OpenAICompatible,
    (ClientApi.OPENAI_EMBEDDINGS, Schema.openai): OpenAICompatible,
    (ClientApi.OPENAI_RESPONSES, Schema.openai): OpenAICompatible,
    (ClientApi.OPENAI_CHAT, Schema.azure_openai): AzureOpenAI,
    (ClientApi.OPENAI_COMPLETIONS, Schema.azure_openai): AzureOpenAI,
    (ClientApi.OPENAI_EMBEDDINGS, Schema.azure_openai): AzureOpenAI,
    (ClientApi.ANTHROPIC_MESSAGES, Schema.anthropic): AnthropicMessages,
    (ClientApi.OPENAI_CHAT, Schema.anthropic): ChatToAnthropic,
    (ClientApi.OPENAI_CHAT, Schema.aws_bedrock): ChatToBedrock,
    # Anthropic Messages clients on any schema that serves OpenAI chat: through its chat translator.
    (ClientApi.ANTHROPIC_MESSAGES, Schema.openai): via_chat(OpenAICompatible),
    (ClientApi.ANTHROPIC_MESSAGES, Schema.azure_openai): via_chat(AzureOpenAI),
    (ClientApi.ANTHROPIC_MESSAGES, Schema.aws_bedrock): via_chat(ChatToBedrock),
    (ClientApi.OPENAI_CHAT, Schema.gemini): ChatToGemini,
    (ClientApi.OPENAI_EMBEDDINGS, Schema.gemini): EmbeddingsToGemini,
    (ClientApi.ANTHROPIC_MESSAGES, Schema.gemini): via_chat(ChatToGemini),
    (ClientApi.OPENAI_IMAGES, Schema.openai): OpenAICompatible,
    (ClientApi.OPENAI_TRANSCRIPTIONS, Schema.openai): OpenAICompatible,
    (ClientApi.OPENAI_TRANSLATIONS, Schema.openai): OpenAICompatible,
    (ClientApi.OPENAI_SPEECH, Schema.openai): OpenAICompatible,
    (ClientApi.RERANK, Schema.openai): OpenAICompatible,
    (ClientApi.OPENAI_INPUT_TOKENS, Schema.openai): OpenAICompatible,
    (ClientApi.OPENAI_IMAGES, Schema.azure_openai): AzureOpenAI,
    (ClientApi.OPENAI_TRANSCRIPTIONS, Schema.azure_openai): AzureOpenAI,
    (ClientApi.OPENAI_TRANSLATIONS, Schema.azure_openai): AzureOpenAI,
    (ClientApi.OPENAI_SPEECH, Schema.azure_openai): AzureOpenAI,
    (ClientApi.ANTHROPIC_COUNT_TOKENS, Schema.anthropic): AnthropicMessages,
    (ClientApi.ANTHROPIC_MESSAGES, Schema.gcp_vertex_ai): messages_on_vertex,
    (ClientApi.OPENAI_CHAT, Schema.gcp_vertex_ai): chat_on_vertex,
    (ClientApi.ANTHROPIC_COUNT_TOKENS, Schema.gcp_vertex_ai): count_tokens_on_vertex,
}

_OFFERED = {
    ClientApi.OPENAI_EMBEDDINGS: "embeddings", ClientApi.OPENAI_COMPLETIONS: "legacy completions",
    ClientApi.OPENAI_RESPONSES: "the Responses API", ClientApi.OPENAI_IMAGES: "image generation",
    ClientApi.OPENAI_TRANSCRIPTIONS: "audio transcriptions", ClientApi.OPENAI_TRANSLATIONS: "audio translations",
    ClientApi.OPENAI_SPEECH: "speech", ClientApi.RERANK: "rerank",
    ClientApi.OPENAI_INPUT_TOKENS: "input token counts",
}


def translator_for(attempt: Attempt, client_model: str) -> Translator:
    """The attempt's translator; a pair nobody serves is the client's error, in its API's shape."""
    factory = REGISTRY.get((attempt.client_api, attempt.target.backend.schema_))
    if factory is None:
        raise unserved(attempt.client_api, attempt.target, client_model)
    return factory(attempt)


def unserved(client_api: ClientApi, target: BackendTarget, client_model: str) -> Exception:
    """The client's 400 for a pair no translator serves (the request stage raises it
    before any upstream cost when the route has one backend; else the attempt does)."""
    schema = target.backend.schema_
    if client_api is ClientApi.ANTHROPIC_MESSAGES:
        return anthropic.AnthropicRequestError(
            400, f"The model `{client_model}` is served by a backend that does not speak the Anthropic "
            "Messages API; use /v1/chat/completions for it.", "invalid_request_error")
    if client_api is ClientApi.ANTHROPIC_COUNT_TOKENS:
        return anthropic.AnthropicRequestError(
            400, f"The model `{client_model}` is served by a backend that does not count tokens with the "
            "Anthropic API.", "invalid_request_error")
    what = _OFFERED.get(client_api, "this API")
    if schema is Schema.gemini:
        return openai.bad_request(
            f"The backend {target.name} (gemini) does not offer {what}; it serves chat completions and "
            "embeddings. Route this model to an OpenAI-compatible backend."
        )
    if schema in (Schema.anthropic, Schema.aws_bedrock, Schema.gcp_vertex_ai):
        return openai.bad_request(
            f"The backend {target.name} ({schema.value}) does not offer {what}; "
            "route this model to an OpenAI-compatible backend."
        )
    return openai.bad_request(f"The backend {target.name} ({schema.value}) does not offer {what}.")
