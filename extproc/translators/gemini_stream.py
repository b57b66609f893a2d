"""Gemini's streamGenerateContent SSE (``alt=sse``) as OpenAI chat.completion.chunk SSE.

Each Gemini event is a whole GenerateContentResponse holding the next piece of each
candidate, usageMetadata (the last one is the whole request's) and, at its end, the
finishReason. Gemini sends no end-of-stream event: the stream is complete when every
candidate has finished and the usage counting the output came with it, or else at the end
of the body.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from extproc.schemas.openai import STREAM_DONE, sse_event, usage_object
from extproc.sse import SSEDecoder
from extproc.translators.chat_to_gemini import (
    completion_id,
    error_parts,
    finish_reason,
    model_name,
    tool_call,
    usage_from_gemini,
)
from extproc.usage import TokenUsage


class GeminiStreamTranslator:
    """Gemini SSE in, OpenAI chunks out, in any chunking: per ``feed`` the work is the
    chunk plus one incomplete event (SSEDecoder), each complete event translated at once."""

    def __init__(self, model: str, include_usage: bool, candidates: int = 1) -> None:
        self.model = model  # replaced by the modelVersion Gemini reports
        self.include_usage = include_usage
        self.candidates = max(1, candidates)
        self.id = completion_id(None)
        self.created = int(time.time())
        self.usage: TokenUsage | None = None
        self.done = False  # [DONE] or an error event went out: nothing more will
        self._decoder = SSEDecoder()
        self._started = False
        self._calls: dict[int, int] = {}  # candidate index -> tool calls sent so far
        self._finished: set[int] = set()  # candidates whose finishReason arrived

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        out: list[bytes] = []
        for event in self._decoder.feed(data):
            if self.done:
                break
            if event.has_data:
                self._on_data(event.data, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the body: a last unterminated event, then the usage and [DONE], or an
        error if no candidate ever finished (the stream was cut)."""
        out: list[bytes] = []
        for event in self._decoder.flush():
            if not self.done and event.has_data:
                self._on_data(event.data, out)
        if not self.done:
            if self._finished:
                self._end(out)
            else:
                out.append(self._fail("The Gemini stream ended before the response was complete.",
                                      "server_error", "stream_truncated"))
        return b"".join(out)

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse_event({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        })

    def _fail(self, message: str, error_type: str, code: str | None) -> bytes:
        self.done = True
        return sse_event({"error": {"message": message, "type": error_type, "param": None, "code": code}})

    def _end(self, out: list[bytes]) -> None:
        if self.include_usage and self.usage is not None:
            out.append(sse_event({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage_object(self.usage),
            }))
        out.append(STREAM_DONE)
        self.done = True

    def _on_data(self, data: bytes, out: list[bytes]) -> None:
        try:
            response = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(response, dict):
            return
        if "error" in response:  # Gemini reports a failure after the start as an error event
            message, error_type, code = error_parts(response["error"], 500)
            out.append(self._fail(message or "The Gemini stream failed.", error_type, code))
            return
        if not self._started:
            self._started = True
            self.id = completion_id(response.get("responseId"))
        self.model = model_name(response, self.model)
        meta = response.get("usageMetadata")
        usage = usage_from_gemini(meta)
        if usage is not None:
            self.usage = usage
        candidates = response.get("candidates")
        if isinstance(candidates, list):
            for position, candidate in enumerate(candidates):
                if isinstance(candidate, dict):
                    self._on_candidate(position, candidate, out)
        elif isinstance(response.get("promptFeedback"), dict) and response["promptFeedback"].get("blockReason"):
            for index in range(self.candidates):  # the prompt was blocked: nothing will be generated
                out.append(self._chunk(index, {"role": "assistant", "content": ""}, "content_filter"))
                self._finished.add(index)
        # Done when every candidate finished and this event's usage counts the output (mid-stream
        # usage has the prompt only); else the end of the body ends the stream (finish).
        if len(self._finished) >= self.candidates and isinstance(meta, dict) and "candidatesTokenCount" in meta:
            self._end(out)

    def _on_candidate(self, position: int, candidate: dict[str, Any], out: list[bytes]) -> None:
        index = candidate.get("index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else position
        if index not in self._calls:
            self._calls[index] = 0
            out.append(self._chunk(index, {"role": "assistant", "content": ""}))
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("functionCall"), dict):
                call = {"index": self._calls[index], **tool_call(part)}
                self._calls[index] += 1
                out.append(self._chunk(index, {"tool_calls": [call]}))
            elif isinstance(part.get("text"), str) and part["text"]:
                key = "reasoning_content" if part.get("thought") is True else "content"
                out.append(self._chunk(index, {key: part["text"]}))
        reason = finish_reason(candidate.get("finishReason"), self._calls[index] > 0)
        if reason is not None and index not in self._finished:
            self._finished.add(index)
            out.append(self._chunk(index, {}, reason))
