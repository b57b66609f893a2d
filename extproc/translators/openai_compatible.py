"""OpenAI's APIs to an OpenAI-compatible backend (OpenAI, vLLM, Ollama, ...): the same
API on both sides; the path is the backend's base URL plus the endpoint."""

from __future__ import annotations

from typing import Any

from extproc.client_apis import SPECS
from extproc.translators.base import Translator, UpstreamRequest, content_type


class OpenAICompatible(Translator):
    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        attempt = self.attempt
        spec = SPECS[attempt.client_api]
        return UpstreamRequest(attempt.target.path_prefix + spec.suffix, self.body_with_model(body, raw),
                               content_type(spec))
