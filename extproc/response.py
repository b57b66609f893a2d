"""Read one upstream response as it streams past: usage, model, timing, errors.

The client's bytes are never held or changed, with one exception the gateway itself
caused: when it forced `stream_options.include_usage` on a stream the client did not
ask usage for, it removes the extra usage-only event (and the `"usage":null` fields)
so the client receives the stream it asked for. Work per chunk is proportional to
the chunk: SSE is decoded incrementally, JSON is parsed once at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from typing import Any

import orjson

from extproc.client_apis import ResponseShape
from extproc.decoding import ChunkDecoder, decoder_for
from extproc.schemas import anthropic, media, openai, responses
from extproc.sse import SSEDecoder, SSEEvent
from extproc.telemetry.outputs import AnthropicOutput, OutputAssembler, ResponsesOutput
from extproc.telemetry.record import OutputMessage
from extproc.usage import TokenUsage

log = logging.getLogger(__name__)

_DONE = b"[DONE]"
_USAGE_NULL = b',"usage":null'


class BodyKind(str, Enum):
    none = "none"  # nothing to read (unknown content type, or no body)
    json = "json"
    sse = "sse"


class ResponseObserver:
    """One response's facts, gathered chunk by chunk."""

    __slots__ = (
        "status", "kind", "usage", "response_model", "error_type", "first_output_at", "last_output_at",
        "complete", "strip_usage", "_decoder", "_sse", "_json", "_json_limit", "_output_text", "_broken",
        "_expected_bytes", "_received_bytes", "_decoded_bytes", "_messages", "_max_chars", "_anthropic",
        "_responses", "response_id", "_assembler", "_usage_of", "output_id", "embeddings",
    )

    def __init__(
        self,
        *,
        strip_usage: bool,
        collect_text: bool,
        max_json_bytes: int,
        collect_output_chars: int | None = None,
        shape: ResponseShape = ResponseShape.openai,
    ) -> None:
        self.status = 0
        self.kind = BodyKind.none
        self.usage: TokenUsage | None = None
        self.response_model: str | None = None
        self.error_type: str | None = None
        self.first_output_at: float | None = None
        self.last_output_at: float | None = None
        # True once the body is logically complete ([DONE] or the usage-only chunk seen,
        # or all content-length bytes in): accounting happens then, before the client
        # (or the upstream) can hang up on us.
        self.complete = False
        self.strip_usage = strip_usage
        self._decoder: ChunkDecoder | None = None
        self._sse: SSEDecoder | None = None
        self._json: bytearray | None = None
        self._json_limit = max_json_bytes
        self._output_text: list[str] | None = [] if collect_text else None
        self._broken = False
        self._expected_bytes: int | None = None
        self._received_bytes = 0
        self._decoded_bytes = 0
        # Output messages for traces, assembled only when a span will record them.
        self._messages: dict[int, OutputMessage] | None = {} if collect_output_chars else None
        self._max_chars = collect_output_chars or 0
        # A client of the Anthropic Messages API reads Anthropic's own stream, untouched.
        anthropic_api, responses_api = shape is ResponseShape.anthropic, shape is ResponseShape.responses
        self._anthropic: anthropic.StreamUsage | None = anthropic.StreamUsage() if anthropic_api else None
        # The Responses API streams named events and reports usage in response.completed.
        self._responses: responses.StreamReader | None = responses.StreamReader() if responses_api else None
        self.response_id: str | None = None  # the Responses API id (for state affinity)
        # For traces: the response's own id whatever the API, and (embeddings) how many
        # vectors of how many dimensions were answered: a summary, never the vectors.
        self.output_id: str | None = None
        self.embeddings: tuple[int, int] | None = None
        # Output messages of the Anthropic and Responses APIs (for traces): their own shapes.
        self._assembler: OutputAssembler | None = None
        # Images, audio, rerank and token counts: usage read by their own rule (None: none counted).
        self._usage_of: Callable[[dict[str, Any]], TokenUsage | None] | None = _USAGE_READERS.get(shape)
        if collect_output_chars and (anthropic_api or responses_api):
            assembler = AnthropicOutput if anthropic_api else ResponsesOutput
            self._assembler = assembler(collect_output_chars)

    @property
    def output_text(self) -> str:
        return "".join(self._output_text or ())

    @property
    def output(self) -> list[OutputMessage] | None:
        if self._messages is None:
            return None
        if self._assembler is not None:
            return self._assembler.output
        return [self._messages[i] for i in sorted(self._messages)]

    def on_headers(
        self, status: int, content_type: str, content_encoding: str, content_length: int | None = None
    ) -> BodyKind:
        """Decide how to read the body; returns BodyKind.none when there is nothing to read."""
        self.status = status
        self._expected_bytes = content_length
        media = content_type.split(";", 1)[0].strip().lower()
        if media == "text/event-stream":
            self.kind = BodyKind.sse
        elif media == "application/json" or media.endswith("+json"):
            self.kind = BodyKind.json
        else:
            return BodyKind.none
        try:
            self._decoder = decoder_for(content_encoding)
        except ValueError as exc:
            log.warning("response not accounted: %s", exc)
            self.kind = BodyKind.none
            return self.kind
        if self._decoder is not None:
            self.strip_usage = False  # rewriting a compressed stream is not worth it: pass it through
        if self.kind is BodyKind.sse:
            self._sse = SSEDecoder(keep_raw=self.strip_usage)
        else:
            self._json = bytearray()
        return self.kind

    @property
    def holds_back(self) -> bool:
        """Bytes of an incomplete event are withheld from the client: a rewritten stream
        passes each event on once it is whole, so its reader must see the rest too."""
        return self.strip_usage and self._sse is not None and self._sse.pending > 0

    def on_chunk(self, chunk: bytes, end: bool, now: float) -> bytes | None:
        """Observe one body chunk; returns replacement bytes only when the stream is rewritten."""
        if self._broken:
            return None
        self._received_bytes += len(chunk)
        all_in = self._expected_bytes is not None and self._received_bytes >= self._expected_bytes
        end = end or all_in  # every byte the upstream announced is here
        try:
            data = chunk
            if self._decoder is not None and chunk:
                # The same cap as for JSON bodies bounds what a compressed body may expand to.
                data = self._decoder.decode(chunk, self._json_limit - self._decoded_bytes)
                self._decoded_bytes += len(data)
            if self.kind is BodyKind.sse:
                return self._on_sse(data, end, all_in, now)
            if self.kind is BodyKind.json:
                self._on_json(data, end)
        except Exception as exc:  # a broken body must never break the client's response
            log.warning("response body unreadable for accounting: %s", exc)
            self._broken = True
        return None

    # -- SSE ----------------------------------------------------------------

    def _on_sse(self, data: bytes, end: bool, all_in: bool, now: float) -> bytes | None:
        assert self._sse is not None
        events = self._sse.feed(data) if data else []
        if end:
            events += self._sse.flush()
        if all_in:
            self.complete = True
        if not self.strip_usage:
            for event in events:
                if event.has_data:
                    self._on_event(event, now)
            return None
        out: list[bytes] = []
        for event in events:
            if event.has_data and not self._on_event(event, now):
                continue
            out.append(event.raw.replace(_USAGE_NULL, b"") if event.has_data else event.raw)
        return b"".join(out)

    def _on_event(self, event: SSEEvent, now: float) -> bool:
        """Read one event; False when it is the forced usage-only event to drop.

        Never raises: an event we cannot make sense of is passed on untouched, so a
        rewritten stream cannot lose bytes the client should get."""
        if self.last_output_at == now and self._nothing_else_in(event.data):
            return True
        try:
            return self._read_event(event, now)
        except Exception as exc:
            log.debug("unreadable stream event passed through: %s", exc)
            return True

    def _nothing_else_in(self, data: bytes) -> bool:
        """True for an OpenAI stream event that cannot change anything known, once the
        output time is already `now` (events of one chunk share it): no usage, no error,
        not [DONE], the model known, no content kept. A byte test, so the events of a
        long stream that arrive together are not all parsed."""
        return (
            self._anthropic is None and self._responses is None and self._usage_of is None
            and self.response_model is not None
            and self._messages is None and self._output_text is None and data != _DONE
            and b'"error"' not in data and (b'"usage":' not in data or b'"usage":null' in data)
        )

    def _read_event(self, event: SSEEvent, now: float) -> bool:
        if self._anthropic is not None:
            self._read_named_event(self._anthropic, event, now)
            return True
        if self._responses is not None:
            self._read_named_event(self._responses, event, now)
            return True
        if self._usage_of is not None:
            self._read_media_event(self._usage_of, event, now)
            return True
        if event.data == _DONE:
            self.complete = True
            return True
        try:
            chunk = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(chunk, dict):
            return True
        if self.response_model is None and isinstance(chunk.get("model"), str):
            self.response_model = chunk["model"]
        if self.output_id is None and isinstance(chunk.get("id"), str):
            self.output_id = chunk["id"]
        usage = openai.usage_from_openai(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
            if openai.is_usage_only_chunk(chunk):
                # The usage-only chunk is the last data before [DONE]: everything there is
                # to account has arrived, so account now. An upstream that dies between it
                # and [DONE] (or Envoy cutting the stream there) can no longer lose the tokens.
                self.complete = True
        if "error" in chunk:
            self.error_type = openai.error_type_of(chunk) or self.error_type
        if self._messages is not None:
            openai.add_stream_chunk(self._messages, chunk, self._max_chars)
        if openai.stream_chunk_has_output(chunk):
            if self.first_output_at is None:
                self.first_output_at = now
            self.last_output_at = now
            if self._output_text is not None:
                self._output_text.append(openai.stream_chunk_text(chunk))
        return not (self.strip_usage and openai.is_usage_only_chunk(chunk))

    def _read_media_event(self, usage_of: Callable[[dict[str, Any]], TokenUsage | None], event: SSEEvent,
                          now: float) -> None:
        """An image or transcription stream's event: output as it comes, usage at its end."""
        data = orjson.loads(event.data)
        if not isinstance(data, dict):
            return
        self.usage = usage_of(data) or self.usage
        if "error" in data:
            self.error_type = openai.error_type_of(data) or self.error_type
        if media.is_stream_output(data):
            if self.first_output_at is None:
                self.first_output_at = now
            self.last_output_at = now
        self.complete = self.complete or media.is_stream_end(data)

    def _read_named_event(self, reader: anthropic.StreamUsage | responses.StreamReader, event: SSEEvent, now: float) -> None:
        """An event of an API whose stream names its events (Anthropic Messages, the
        Responses API): its own reader keeps the state; the facts are copied here."""
        data = orjson.loads(event.data)
        if not isinstance(data, dict):
            return
        reader.on_event(event.event, data)
        if self._assembler is not None:
            self._assembler.on_event(event.event, data)
        self.usage = reader.usage or self.usage
        if isinstance(reader, responses.StreamReader):
            self.response_id = reader.response_id or self.response_id
            self.output_id = self.response_id
        elif self.output_id is None and (event.event or data.get("type")) == "message_start":
            message = data.get("message")
            if isinstance(message, dict) and isinstance(message.get("id"), str):
                self.output_id = message["id"]
        self.response_model = reader.response_model or self.response_model
        self.error_type = reader.error_type or self.error_type
        self.complete = self.complete or reader.complete
        if reader.has_output:
            if self.first_output_at is None:
                self.first_output_at = now
            self.last_output_at = now

    # -- JSON ---------------------------------------------------------------

    def _on_json(self, data: bytes, end: bool) -> None:
        assert self._json is not None
        if len(self._json) + len(data) > self._json_limit:
            log.warning("JSON response over %d bytes: usage not read", self._json_limit)
            self._broken = True
            self._json = None
            return
        self._json += data
        if not end or self.complete:
            return
        self.complete = True
        if self._usage_of is media.media_usage and self.status < 400 and len(self._json) > media.LARGE_BODY:
            usage = media.usage_near_end(bytes(self._json[-media.TAIL_BYTES:]))
            if usage is not None:  # images in base64: not parsed for the few bytes of usage
                self._json = None
                self.usage = media.media_usage({"usage": usage})
                return
        body = orjson.loads(self._json)
        self._json = None
        if not isinstance(body, dict):
            return
        if isinstance(body.get("model"), str):
            self.response_model = body["model"]
        if self.status < 400 and isinstance(body.get("id"), str):
            self.output_id = body["id"]
        if self._usage_of is not None:
            if self.status >= 400:
                self.error_type = openai.error_type_of(body)  # OpenAI's and Anthropic's error shapes alike
            else:
                self.usage = self._usage_of(body)
            return
        if self._responses is not None:
            self.response_id, model, self.usage = responses.response_fields(body)
            self.response_model = model or self.response_model
            if self.status >= 400:
                self.error_type = openai.error_type_of(body)
            elif self._assembler is not None:
                self._assembler.on_body(body)
            return
        if self._anthropic is not None:
            self.usage = anthropic.usage_from_message(body)
            error = body.get("error")
            if self.status >= 400 and isinstance(error, dict):
                self.error_type = str(error.get("type") or "error")
            elif self.status < 400 and self._assembler is not None:
                self._assembler.on_body(body)
            return
        self.usage = openai.usage_from_openai(body.get("usage"))
        if self.status >= 400:
            self.error_type = openai.error_type_of(body)
            return
        if self._output_text is not None:
            self._output_text.append(_message_text(body))
        if body.get("object") == "list" and isinstance(body.get("data"), list):
            self.embeddings = _embeddings_summary(body["data"])
        if self._messages is not None:
            self._messages = dict(enumerate(openai.output_from_body(body, self._max_chars)))


def _embeddings_summary(data: list[Any]) -> tuple[int, int] | None:
    """(vectors, dimensions of the first) of an embeddings answer; base64 vectors are
    float32s, measured by their length, not decoded."""
    first = data[0] if data and isinstance(data[0], dict) else None
    vector = first.get("embedding") if first is not None else None
    if isinstance(vector, list):
        return len(data), len(vector)
    if isinstance(vector, str):
        raw = len(vector) * 3 // 4 - (len(vector) - len(vector.rstrip("=")))
        return len(data), raw // 4
    return None


def _uncharged(body: dict[str, Any]) -> TokenUsage | None:
    return None


_USAGE_READERS: dict[ResponseShape, Callable[[dict[str, Any]], TokenUsage | None]] = {
    ResponseShape.media: media.media_usage,
    ResponseShape.rerank: media.rerank_usage,
    ResponseShape.unmetered: _uncharged,  # a token count is not usage (README: "Endpoints and errors")
}


def _message_text(body: dict[str, Any]) -> str:
    parts: list[str] = []
    for choice in body.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                parts.append(message["content"])
            if isinstance(choice.get("text"), str):
                parts.append(choice["text"])
    return "".join(parts)
