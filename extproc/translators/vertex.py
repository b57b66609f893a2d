"""Vertex AI (`gcp_vertex_ai`): Google's and Anthropic's models behind Google's endpoints.

Vertex serves each model under its publisher:

    {base}/v1/projects/{project}/locations/{region}/publishers/{publisher}/models/{model}:{method}

Which publisher serves a model: `claude-*` is Anthropic's, anything else Google's.

Claude on Vertex is Anthropic's Messages API with two changes, as the anthropic SDK's
AnthropicVertex client makes them: the model moves from the body to the path, and the
version from the `anthropic-version` header into the body (`"anthropic_version":
"vertex-2023-10-16"`); `rawPredict` answers JSON and `streamRawPredict` Anthropic's event
stream, both in Anthropic's own shapes. So Anthropic clients pass through, and OpenAI
chat reuses ChatToAnthropic's translation.

Gemini on Vertex is the Gemini API's GenerateContent under Vertex's path, so OpenAI chat
reuses ChatToGemini's translation, and Anthropic clients reach it through chat (as on
the `gemini` schema). Credentials (a Google access token) are backend_auth's business.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson

from extproc.schemas import anthropic
from extproc.translators.base import Attempt, Translator, UpstreamRequest
from extproc.translators.chat_to_anthropic import ChatToAnthropic, chat_to_messages
from extproc.translators.chat_to_gemini import ChatToGemini, generate_method, model_id
from extproc.translators.messages_to_chat import MessagesViaChat

VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
_JSON = [("content-type", b"application/json")]


def publisher_of(model: str) -> str:
    """The Vertex publisher serving `model`: Anthropic's Claude models, else Google's."""
    return "anthropic" if model.startswith("claude") else "google"


def model_path(attempt: Attempt, publisher: str, method: str, model: str | None = None) -> str:
    """The publisher model's path on the backend (its base URL's path first)."""
    target = attempt.target
    vertex = target.backend.vertex
    assert vertex is not None  # the config requires it for gcp_vertex_ai
    model = quote(model or attempt.model, safe="@")
    return (f"{target.path_prefix}/v1/projects/{vertex.project}/locations/{vertex.region}"
            f"/publishers/{publisher}/models/{model}:{method}")


def _claude_method(stream: bool) -> str:
    return "streamRawPredict" if stream else "rawPredict"


def vertex_body(messages: dict[str, Any]) -> bytes:
    """A Messages request in Vertex's convention: no model, the version in the body."""
    body = {k: v for k, v in messages.items() if k != "model"}
    body["anthropic_version"] = VERTEX_ANTHROPIC_VERSION
    return orjson.dumps(body)


class AnthropicOnVertex(Translator):
    """The Anthropic Messages API to Claude on Vertex: the same API, Vertex's path and body.
    Replies pass through; an error Google's front end answered itself (auth, quota, an
    unknown model) is put in Anthropic's shape, as the model's own errors already are."""

    translates_errors = True

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        attempt = self.attempt
        return UpstreamRequest(model_path(attempt, "anthropic", _claude_method(attempt.stream)), vertex_body(body),
                               list(_JSON))

    def whole_response(self, status: int, body: bytes, error_type: str | None) -> bytes:
        return google_error_to_anthropic(status, body)


def google_error_to_anthropic(status: int, body: bytes) -> bytes:
    """Google's `{"error": {"code", "message", "status"}}` as Anthropic's error; any other
    body (Anthropic's own error) as it came. Never raises."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("type") == "error":
        return body
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        message = f"Vertex AI answered with HTTP status {status}."
    error_type = anthropic.ERROR_TYPES_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return anthropic.error_body(message, error_type)


class ChatToAnthropicOnVertex(ChatToAnthropic):
    """OpenAI chat to Claude on Vertex: ChatToAnthropic's translation both ways (Google's
    own errors, `{"error": {"code", "message", "status"}}`, read as any error is)."""

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        attempt = self.attempt
        messages = chat_to_messages(body, attempt.model)
        return UpstreamRequest(model_path(attempt, "anthropic", _claude_method(attempt.stream)), vertex_body(messages),
                               list(_JSON))


class ChatToGeminiOnVertex(ChatToGemini):
    """OpenAI chat to Gemini on Vertex: ChatToGemini's translation, Vertex's path."""

    def path(self, model: str, stream: bool) -> str:
        return model_path(self.attempt, "google", generate_method(stream), model_id(model))


class CountTokensOnVertex(AnthropicOnVertex):
    """Anthropic's token count for Claude on Vertex: one `count-tokens:rawPredict` path for
    every model, which the body names (with the version, as the AnthropicVertex client sends it)."""

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        counted = {**body, "model": self.attempt.model, "anthropic_version": VERTEX_ANTHROPIC_VERSION}
        return UpstreamRequest(model_path(self.attempt, "anthropic", "rawPredict", "count-tokens"),
                               orjson.dumps(counted), list(_JSON))


def count_tokens_on_vertex(attempt: Attempt) -> Translator:
    """Anthropic clients' token count: Claude models only (Gemini's own count is another API)."""
    if publisher_of(attempt.model) != "anthropic":
        raise anthropic.AnthropicRequestError(
            400, f"The model `{attempt.model}` is served on Vertex AI by Google; the gateway counts tokens "
            "through Anthropic's count_tokens for Claude models only.", "invalid_request_error")
    return CountTokensOnVertex(attempt)


def messages_on_vertex(attempt: Attempt) -> Translator:
    """Anthropic clients: Claude natively; Google's models through OpenAI chat (as on the
    gemini schema)."""
    if publisher_of(attempt.model) == "anthropic":
        return AnthropicOnVertex(attempt)
    return MessagesViaChat(attempt, chat=ChatToGeminiOnVertex)


def chat_on_vertex(attempt: Attempt) -> Translator:
    """OpenAI chat to whichever publisher serves the model."""
    if publisher_of(attempt.model) == "anthropic":
        return ChatToAnthropicOnVertex(attempt)
    return ChatToGeminiOnVertex(attempt)
