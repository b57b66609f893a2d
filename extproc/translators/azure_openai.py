"""OpenAI's APIs to Azure OpenAI: the same bodies, under a deployment's path with the
backend's api-version."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from extproc.translators.base import Translator, UpstreamRequest, content_type
from extproc.client_apis import SPECS


class AzureOpenAI(Translator):
    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        attempt = self.attempt
        backend = attempt.target.backend
        deployment = quote(backend.deployment or attempt.model, safe="")
        spec = SPECS[attempt.client_api]
        path = f"{attempt.target.path_prefix}/openai/deployments/{deployment}{spec.suffix}?api-version={backend.api_version}"
        return UpstreamRequest(path, self.body_with_model(body, raw), content_type(spec))
