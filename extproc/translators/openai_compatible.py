"""OpenAI's APIs to an OpenAI-compatible backend (OpenAI, vLLM, Ollama, ...): the same
API on both sides; the path is the backend's base URL plus the endpoint."""

from __future__ import annotations

from typing import Any

from extproc.contract import ClientApi
from extproc.translators.base import Translator, UpstreamRequest

# Where each OpenAI API lives under a backend's base URL (".../v1").
SUFFIXES = {
    ClientApi.OPENAI_CHAT: "/chat/completions",
    ClientApi.OPENAI_COMPLETIONS: "/completions",
    ClientApi.OPENAI_EMBEDDINGS: "/embeddings",
    ClientApi.OPENAI_RESPONSES: "/responses",
}


class OpenAICompatible(Translator):
    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        attempt = self.attempt
        path = attempt.target.path_prefix + SUFFIXES[attempt.client_api]
        return UpstreamRequest(path, self.body_with_model(body, raw), [("content-type", b"application/json")])
