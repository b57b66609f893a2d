"""OpenAI's APIs to an OpenAI-compatible backend (OpenAI, vLLM, Ollama, ...): the same
API on both sides; the path is the backend's base URL plus the endpoint."""

from __future__ import annotations

from typing import Any

from extproc.client_apis import SPECS
from extproc.translators.base import Translator, UpstreamRequest


class OpenAICompatible(Translator):
    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        attempt = self.attempt
        path = attempt.target.path_prefix + SPECS[attempt.client_api].suffix
        return UpstreamRequest(path, self.body_with_model(body, raw), [("content-type", b"application/json")])
