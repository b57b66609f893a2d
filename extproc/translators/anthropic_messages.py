"""The Anthropic Messages API (and its token count) to Anthropic: the same API on both sides."""

from __future__ import annotations

from typing import Any

from extproc.client_apis import SPECS
from extproc.translators.base import Translator, UpstreamRequest


def anthropic_headers(version: str) -> list[tuple[str, bytes]]:
    """What every request to Anthropic carries besides its key."""
    return [("content-type", b"application/json"), ("anthropic-version", version.encode())]


class AnthropicMessages(Translator):
    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        target = self.attempt.target
        return UpstreamRequest(target.path_prefix + SPECS[self.attempt.client_api].suffix, self.body_with_model(body, raw),
                               anthropic_headers(target.backend.anthropic_version))
