"""OpenAI chat completions to Amazon Bedrock's Converse API, and the answer back: JSON,
errors and the binary event stream (extproc/schemas/bedrock.py holds the mapping).
botocore (~5 MiB per worker) is imported on first use only."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import orjson

from extproc.translators.base import StreamTranslator, Translator, UpstreamRequest


def _bedrock() -> ModuleType:
    from extproc.schemas import bedrock

    return bedrock


class ChatToBedrock(Translator):
    translates_response = True

    def request(self, body: dict[str, Any], raw: bytes) -> UpstreamRequest:
        bedrock = _bedrock()
        attempt = self.attempt
        path = attempt.target.path_prefix + bedrock.converse_path(attempt.model, attempt.stream)
        accept = bedrock.EVENT_STREAM_CONTENT_TYPE.encode() if attempt.stream else b"application/json"
        return UpstreamRequest(path, orjson.dumps(bedrock.chat_to_converse(body)),
                               [("content-type", b"application/json"), ("accept", accept)])

    def stream_translator(self) -> StreamTranslator | None:
        stream: StreamTranslator = _bedrock().StreamTranslator(self.attempt.model, self.attempt.include_usage)
        return stream

    def whole_response(self, status: int, body: bytes, error_type: str | None) -> bytes:
        if status >= 300:
            return _bedrock().error_to_openai(status, body, error_type)
        return orjson.dumps(_bedrock().converse_to_chat(orjson.loads(body), self.attempt.model))
