"""ConverseStream's binary AWS event stream as OpenAI chat.completion.chunk SSE.

Apart from chat_to_bedrock.py (whose mapping of stop reasons, usage and errors it uses)
because botocore checks and decodes each frame: ChatToBedrock imports this module for
the first streamed Bedrock answer, so workers without Bedrock never load botocore.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from botocore.eventstream import EventStreamBuffer, EventStreamMessage, ParserError

from extproc.schemas.openai import STREAM_DONE, as_count, sse_event, usage_object
from extproc.translators.chat_to_bedrock import (
    completion_id,
    error_kind,
    finish_reason,
    usage_from_bedrock,
)
from extproc.usage import TokenUsage

_PRELUDE_LENGTH = 12
_MIN_FRAME = 16  # prelude + message CRC
_MAX_FRAME = 16 * 1024 * 1024 + 128 * 1024 + 16  # botocore's payload + headers limits


class ConverseStreamTranslator:
    """A ConverseStream body (binary AWS event stream) as OpenAI chat.completion.chunk SSE.

    Frames are cut out of the byte stream here (by the 4-byte length each starts with)
    and each complete frame is checked and decoded by botocore's EventStreamBuffer, so
    the work per `feed` is proportional to the chunk however the body is split, even a
    large frame arriving a byte at a time. A corrupt frame or an exception event becomes
    one OpenAI error event and ends the translated stream (without [DONE], as OpenAI
    ends a failed stream); bytes after it are ignored.
    """

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = completion_id()
        self.created = int(time.time())
        self.usage: TokenUsage | None = None
        self.latency_ms: int | None = None
        self.stop_reason: str | None = None
        self.error: dict[str, Any] | None = None
        self.done = False  # [DONE] or an error event was emitted; nothing more will be
        self._buf = bytearray()
        self._prelude_checked = False
        self._tool_index: dict[int, int] = {}  # contentBlockIndex -> OpenAI tool_calls index

    def feed(self, data: bytes) -> bytes:
        """Bytes of the event stream in, SSE bytes to send on now out."""
        if self.done:
            return b""
        self._buf += data
        out: list[bytes] = []
        pos = 0
        buf = self._buf
        while not self.done and len(buf) - pos >= _PRELUDE_LENGTH:
            total = int.from_bytes(buf[pos:pos + 4], "big")
            if not self._prelude_checked:
                if not _MIN_FRAME <= total <= _MAX_FRAME:
                    out.append(self._fail("corrupt_stream", f"invalid event-stream frame length {total}"))
                    break
                self._decode(bytes(buf[pos:pos + _PRELUDE_LENGTH]), out)  # checks the prelude CRC only
                if self.done:
                    break
                self._prelude_checked = True
            if len(buf) - pos < total:
                break
            message = self._decode(bytes(buf[pos:pos + total]), out)
            pos += total
            self._prelude_checked = False
            if message is not None:
                out.extend(self._on_message(message))
        if self.done:
            self._buf = bytearray()
        elif pos:
            del buf[:pos]
        return b"".join(out)

    def finish(self) -> bytes:
        """At the end of the body: complete the stream, or report why it is incomplete."""
        if self.done:
            return b""
        if self._buf or self.stop_reason is None:
            return self._fail("stream_truncated", "The Bedrock stream ended before the response was complete.")
        self.done = True  # messageStop without metadata: no usage to report
        return STREAM_DONE

    def _decode(self, frame: bytes, out: list[bytes]) -> EventStreamMessage | None:
        decoder = EventStreamBuffer()
        decoder.add_data(frame)
        try:
            return next(decoder, None)
        except ParserError as exc:
            out.append(self._fail("corrupt_stream", f"corrupt event-stream frame: {exc}"))
        except Exception as exc:  # malformed headers botocore does not anticipate
            out.append(self._fail("corrupt_stream", f"undecodable event-stream frame: {exc!r}"))
        return None

    def _fail(self, code: str | None, message: str, error_type: str = "server_error") -> bytes:
        self.done = True
        self.error = {"message": message, "type": error_type, "param": None, "code": code}
        return sse_event({"error": self.error})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse_event({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        })

    def _on_message(self, message: EventStreamMessage) -> list[bytes]:
        # botocore-stubs say int; botocore sets the parsed header dict.
        headers: dict[str, Any] = message.headers  # type: ignore[assignment]
        kind = headers.get(":message-type")
        if kind == "exception":
            name = str(headers.get(":exception-type") or "exception")
            body = _payload(message)
            text = body.get("message") or body.get("Message") or name
            error_type, code = error_kind(name, 500)
            return [self._fail(code, str(text), error_type)]
        if kind == "error":
            name = str(headers.get(":error-code") or "error")
            error_type, code = error_kind(name, 500)
            return [self._fail(code, str(headers.get(":error-message") or name), error_type)]
        if kind != "event":
            return []
        event = headers.get(":event-type")
        payload = _payload(message)
        if event == "messageStart":
            return [self._chunk({"role": "assistant", "content": ""})]
        if event == "contentBlockStart":
            start = payload.get("start")
            use = start.get("toolUse") if isinstance(start, dict) else None
            if isinstance(use, dict):
                index = self._tool_index.setdefault(as_count(payload.get("contentBlockIndex")), len(self._tool_index))
                call = {"index": index, "id": str(use.get("toolUseId") or ""), "type": "function",
                        "function": {"name": str(use.get("name") or ""), "arguments": ""}}
                return [self._chunk({"tool_calls": [call]})]
            return []
        if event == "contentBlockDelta":
            return self._on_delta(payload)
        if event == "messageStop":
            self.stop_reason = str(payload.get("stopReason") or "end_turn")
            return [self._chunk({}, finish_reason(self.stop_reason))]
        if event == "metadata":
            return self._on_metadata(payload)
        return []  # contentBlockStop and events newer than this code

    def _on_delta(self, payload: dict[str, Any]) -> list[bytes]:
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return []
        if isinstance(delta.get("text"), str):
            return [self._chunk({"content": delta["text"]})]
        use = delta.get("toolUse")
        if isinstance(use, dict) and isinstance(use.get("input"), str):
            block = as_count(payload.get("contentBlockIndex"))
            index = self._tool_index.setdefault(block, len(self._tool_index))
            return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": use["input"]}}]})]
        reasoning = delta.get("reasoningContent")
        if isinstance(reasoning, dict) and isinstance(reasoning.get("text"), str):
            return [self._chunk({"reasoning_content": reasoning["text"]})]
        return []

    def _on_metadata(self, payload: dict[str, Any]) -> list[bytes]:
        self.usage = usage_from_bedrock(payload.get("usage"))
        metrics = payload.get("metrics")
        if isinstance(metrics, dict) and isinstance(metrics.get("latencyMs"), int):
            self.latency_ms = metrics["latencyMs"]
        out: list[bytes] = []
        if self.include_usage and self.usage is not None:
            out.append(sse_event({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage_object(self.usage),
            }))
        out.append(STREAM_DONE)
        self.done = True
        return out


def _payload(message: EventStreamMessage) -> dict[str, Any]:
    try:
        value = orjson.loads(message.payload) if message.payload else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
