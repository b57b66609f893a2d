"""OpenTelemetry GenAI semantic-convention attributes (`gen_ai.*`) for a request's span.

Tools that read only the OpenTelemetry GenAI conventions (`telemetry.span_conventions`
with `gen_ai`) get the same span as OpenInference readers, in the other vocabulary:

- the content (`gen_ai.input.messages`, `gen_ai.output.messages`, `gen_ai.tool.definitions`,
  request parameters) is converted by `openinference-instrumentation`'s own OpenInference ->
  GenAI conversion from the OpenInference attributes *as the span would record them*, so the
  `OPENINFERENCE_HIDE_*` masking, the size bounds and what was left out apply identically;
- the facts come from the `RequestRecord`, which knows them exactly: operation, provider
  (already a `gen_ai.provider.name` value), requested and answered model, response id,
  every finish reason, token usage with cache and reasoning details;
- system instructions given apart from the conversation (Anthropic `system`, Responses
  `instructions`) go to `gen_ai.system_instructions`, as the spec asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
from openinference.instrumentation._genai_conversion import get_genai_attributes
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as G
from opentelemetry.util.types import AttributeValue

from extproc.contract import ClientApi
from extproc.telemetry.record import RequestRecord

__all__ = ["OPENINFERENCE_PREFIXES", "genai_attributes", "span_name"]

# Attributes of the OpenInference vocabulary, left out when only gen_ai is asked for.
OPENINFERENCE_PREFIXES: Final = (
    "openinference.", "llm.", "input.", "output.", "embedding.", "reranker.", "session.id", "metadata",
)

# Client APIs whose system instructions are given apart from the messages.
_SEPARATE_INSTRUCTIONS: Final[dict[str, str]] = {
    ClientApi.ANTHROPIC_MESSAGES: "system",
    ClientApi.ANTHROPIC_COUNT_TOKENS: "system",
    ClientApi.OPENAI_RESPONSES: "instructions",
}


def span_name(record: RequestRecord) -> str:
    """`{gen_ai.operation.name} {gen_ai.request.model}`, as the GenAI span conventions name spans."""
    return f"{record.operation} {record.request_model}" if record.request_model else record.operation


def genai_attributes(record: RequestRecord, recorded: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
    """The `gen_ai.*` attributes of the span whose OpenInference attributes are `recorded`
    (already masked and bounded)."""
    out: dict[str, AttributeValue] = {k: v for k, v in get_genai_attributes(recorded).items() if v is not None}
    out[G.GEN_AI_OPERATION_NAME] = record.operation
    if record.provider:
        out[G.GEN_AI_PROVIDER_NAME] = record.provider
    if record.request_model:
        out[G.GEN_AI_REQUEST_MODEL] = record.request_model
    else:
        out.pop(G.GEN_AI_REQUEST_MODEL, None)
    if record.response_model:
        out[G.GEN_AI_RESPONSE_MODEL] = record.response_model
    if record.response_id:
        out[G.GEN_AI_RESPONSE_ID] = record.response_id
    reasons = [_finish_reason(m.finish_reason) for m in record.output or () if m.finish_reason]
    if reasons:
        out[G.GEN_AI_RESPONSE_FINISH_REASONS] = reasons
    _usage(record, out)
    body = record.request_body
    if record.operation == "embeddings":
        dimensions = body.get("dimensions") if isinstance(body, dict) else None
        if isinstance(dimensions, int) and not isinstance(dimensions, bool):
            out[G.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = dimensions
        elif record.embeddings is not None and record.embeddings[1]:
            out[G.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = record.embeddings[1]
        encoding = body.get("encoding_format") if isinstance(body, dict) else None
        if isinstance(encoding, str):
            out[G.GEN_AI_REQUEST_ENCODING_FORMATS] = [encoding]
    if isinstance(body, dict) and isinstance(field := _SEPARATE_INSTRUCTIONS.get(record.client_api), str) and body.get(field):
        _separate_instructions(out)
    return out


def _usage(record: RequestRecord, out: dict[str, AttributeValue]) -> None:
    for key in (G.GEN_AI_USAGE_INPUT_TOKENS, G.GEN_AI_USAGE_OUTPUT_TOKENS,
                G.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, G.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS):
        out.pop(key, None)
    usage = record.usage
    if usage is None:
        return
    out[G.GEN_AI_USAGE_INPUT_TOKENS] = usage.input_tokens
    if record.operation not in ("embeddings", "rerank"):
        out[G.GEN_AI_USAGE_OUTPUT_TOKENS] = usage.output_tokens
    if usage.cached_input_tokens:
        out[G.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = usage.cached_input_tokens
    if usage.cache_creation_input_tokens:
        out[G.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] = usage.cache_creation_input_tokens
    if usage.reasoning_tokens:
        out[G.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = usage.reasoning_tokens


def _finish_reason(reason: str) -> str:
    """As the output messages say it: the spec's `tool_call` for OpenAI's words, else the
    provider's own, lowercased."""
    lowered = reason.lower()
    return "tool_call" if lowered in ("tool_calls", "function_call") else lowered


def _separate_instructions(out: dict[str, AttributeValue]) -> None:
    """Move the leading system message (the request's `system` / `instructions`, put first
    by `inputs`) from the input messages to `gen_ai.system_instructions` (a list of parts)."""
    raw = out.get(G.GEN_AI_INPUT_MESSAGES)
    if not isinstance(raw, str):
        return
    try:
        messages: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
        return
    if messages[0].get("role") != "system":
        return
    out[G.GEN_AI_SYSTEM_INSTRUCTIONS] = orjson.dumps(messages[0].get("parts") or []).decode()
    if len(messages) > 1:
        out[G.GEN_AI_INPUT_MESSAGES] = orjson.dumps(messages[1:]).decode()
    else:
        del out[G.GEN_AI_INPUT_MESSAGES]
