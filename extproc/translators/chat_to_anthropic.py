"""OpenAI chat completions to the Anthropic Messages API, and the answer back: JSON,
errors and the SSE stream (extproc/schemas/anthropic.py holds both directions' mapping)."""

from __future__ import annotations

from typing import Any

import orjson

from extproc.schemas import anthropic
from extproc.translators.anthropic_messages import anthropic_headers
from extproc.translators.base import StreamTranslator, Translator, UpstreamRequest


class ChatToAnthropic(Translator):
    translates_response = True

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        target = self.attempt.target
        translated = orjson.dumps(anthropic.chat_to_messages(body, self.attempt.model))
        return UpstreamRequest(target.path_prefix + anthropic.MESSAGES_SUFFIX, translated,
                               anthropic_headers(target.backend.anthropic_version))

    def stream_translator(self) -> StreamTranslator | None:
        return anthropic.StreamTranslator(self.attempt.model, self.attempt.include_usage)

    def whole_response(self, status: int, body: bytes, error_type: str | None) -> bytes:
        if status >= 300:
            return anthropic.error_to_openai(status, body)
        return orjson.dumps(anthropic.messages_to_chat(orjson.loads(body), self.attempt.model))
