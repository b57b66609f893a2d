"""What telemetry learns about one request: built once, when Envoy ends the stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extproc.contract import ClientApi
from extproc.usage import TokenUsage


@dataclass(slots=True)
class ToolCall:
    id: str | None = None
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class OutputMessage:
    """One assistant choice, assembled from a JSON body or from stream deltas."""

    role: str = "assistant"
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class RequestRecord:
    """The facts of one routed request, for metrics and traces.

    Times are `time.monotonic()` seconds except `start_time_ns` (wall clock, for spans).
    """

    operation: str  # gen_ai.operation.name: chat, text_completion, embeddings
    provider: str  # gen_ai.provider.name, e.g. openai
    request_model: str  # what the client asked for
    backend_model: str  # what the backend was sent (differs when overridden)
    response_model: str | None
    backend: str
    route: str
    server_address: str
    server_port: int
    stream: bool
    status: int  # 0: no response from upstream was seen
    error_type: str | None  # set for failures (non-2xx, or cut off before any response)
    usage: TokenUsage | None
    start_time_ns: int
    started_at: float
    ended_at: float
    first_output_at: float | None
    last_output_at: float | None
    complete: bool  # the response body ended normally
    processor_seconds: float  # time the processor spent on this request, upstream excluded
    client_api: str = ClientApi.OPENAI_CHAT  # the API the client spoke (a ClientApi value)
    session_id: str | None = None
    user_id: str | None = None
    tenant: str | None = None  # who the request was charged to (tenancy.py: JWT claim, key, header...)
    attributes: dict[str, str] = field(default_factory=dict)  # configured request-header attributes
    costs: dict[str, float] = field(default_factory=dict)  # configured costs (metadata_key -> value), 2xx only
    request_body: dict[str, Any] | None = None  # kept only when tracing records content
    output: list[OutputMessage] | None = None  # assembled only when tracing records content
    response_id: str | None = None  # the response's own id (chat completion, message, response)
    embeddings: tuple[int, int] | None = None  # embeddings answered: (vectors, dimensions of the first)

    @property
    def duration(self) -> float:
        return self.ended_at - self.started_at

    @property
    def time_to_first_token(self) -> float | None:
        if not self.stream or self.first_output_at is None:
            return None
        return self.first_output_at - self.started_at

    @property
    def time_per_output_token(self) -> float | None:
        """Seconds per output token after the first, as the GenAI conventions define it."""
        if not self.stream or self.first_output_at is None or self.last_output_at is None or self.usage is None:
            return None
        if self.usage.output_tokens <= 1:
            return None
        return (self.last_output_at - self.first_output_at) / (self.usage.output_tokens - 1)


@dataclass(slots=True)
class AttemptRecord:
    """What one upstream attempt sent and got back, in the backend's own API, for its span.

    The bodies are the bytes the backend received and answered (after translation and
    before the answer is translated back), kept only when tracing records content;
    `response_body` is at most the span's content limit (`response_size`: how much there was).
    """

    backend: str
    provider: str  # gen_ai.provider.name
    model: str  # the model the backend was sent
    client_api: str
    stream: bool
    server_address: str
    server_port: int
    path: str = ""
    status: int = 0  # 0: no response seen
    error_type: str | None = None
    error: str | None = None  # the span's ERROR description; None: the attempt succeeded
    request_body: bytes | None = None
    request_is_json: bool = True
    response_body: bytes | None = None
    response_is_json: bool = True  # False: an event stream (several documents) or text
    response_size: int = 0
    response_headers_ms: float | None = None  # from the attempt's start to the backend's response headers
