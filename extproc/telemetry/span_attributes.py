"""OpenInference span attributes for one request, from its `RequestRecord`.

Kept apart from `tracing` (provider, export, propagation): this module only decides what a
finished request's span says. The span describes the exchange in the client's API
(`RequestRecord.client_api`): `llm.system` is that API's family (an Anthropic-SDK call is
`anthropic` whoever serves it), `llm.provider` the provider that served it, and the input
messages are read from that API's request shape (`inputs`); output messages come
assembled from its response shape (`outputs`, `schemas.openai`).

Attributes are named by `openinference.semconv.trace` constants; hide/redact decisions
are the `TraceConfig`'s (the span, an `openinference.instrumentation.OITracer` span,
masks them again when they are set).

Size bounds: every recorded text is cut to `TelemetrySettings.max_content_chars` (with a
marker); lists are capped (messages, tool calls, content parts, tools, inputs); and the
repeated content of one span (messages, tools, prompts, ...) is limited to
`SPAN_CONTENT_BUDGET_FACTOR` times `max_content_chars` and to the SDK's span attribute count limit
(`OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT`, default 128), so nothing is silently evicted: the
oldest input messages are left out first, and `metadata` says how many were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, cast

import orjson
from openinference.instrumentation import TraceConfig
from openinference.instrumentation.config import (
    REDACTED_VALUE,
    is_base64_url,
    mask_without_externalization,
)
from openinference.semconv.trace import (
    ChoiceAttributes,
    DocumentAttributes,
    EmbeddingAttributes,
    ImageAttributes,
    MessageAttributes,
    MessageContentAttributes,
    OpenInferenceLLMProviderValues,
    OpenInferenceLLMSystemValues,
    OpenInferenceMimeTypeValues,
    OpenInferenceSpanKindValues,
    PromptAttributes,
    RerankerAttributes,
    SpanAttributes,
    ToolAttributes,
    ToolCallAttributes,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from extproc.contract import ClientApi
from extproc.telemetry.genai import OPENINFERENCE_PREFIXES, genai_attributes
from extproc.telemetry.inputs import ANTHROPIC_MESSAGES, INPUT_FIELDS, RESPONSES, input_messages
from extproc.telemetry.record import OutputMessage, RequestRecord

__all__ = ["apply_record"]

# Operations (gen_ai.operation.name) whose spans differ from chat ones.
_EMBEDDINGS = "embeddings"
_COMPLETIONS = "text_completion"
_RERANK = "rerank"
# The tenant the request was charged to (no OpenTelemetry convention names one).
TENANT_ID: Final = "tenant.id"

# Caps on repeated things recorded from one request.
MAX_MESSAGES: Final = 500
MAX_TOOL_CALLS: Final = 128  # per message
MAX_CONTENT_PARTS: Final = 64  # per message
MAX_TOOLS: Final = 128
MAX_INPUTS: Final = 500  # completion prompts, embedding inputs
MAX_CHOICES: Final = 128
# Repeated content recorded in one span (messages, tools, prompts, choices, embedding texts),
# in units of max_content_chars; input.value, output.value and the fixed facts (models,
# tokens, metadata, parameters) are bounded one by one and come on top.
SPAN_CONTENT_BUDGET_FACTOR: Final = 4
# Attribute slots kept for the gen_ai.* attributes when both conventions are recorded.
GENAI_SLOTS: Final = 24
OPENINFERENCE: Final = "openinference"
GEN_AI: Final = "gen_ai"

# Request fields with attributes of their own, or that describe the exchange rather than the model call.
_NOT_INVOCATION_PARAMETERS: Final = frozenset({"messages", "prompt", "input", "model", "stream", "tools", "functions"})

# client API -> OpenInference llm.system (the family of the API the client spoke); others: openai
_SYSTEMS: Final[dict[str, str]] = {
    ANTHROPIC_MESSAGES: OpenInferenceLLMSystemValues.ANTHROPIC.value,
    ClientApi.ANTHROPIC_COUNT_TOKENS: OpenInferenceLLMSystemValues.ANTHROPIC.value,
}
_OPENAI_SYSTEM: Final = OpenInferenceLLMSystemValues.OPENAI.value

# gen_ai.provider.name (and a few short forms) -> OpenInference llm.provider
_PROVIDERS: Final[dict[str, str]] = {
    "openai": OpenInferenceLLMProviderValues.OPENAI.value,
    "azure.ai.openai": OpenInferenceLLMProviderValues.AZURE.value,
    "azure.ai.inference": OpenInferenceLLMProviderValues.AZURE.value,
    "azure": OpenInferenceLLMProviderValues.AZURE.value,
    "aws.bedrock": OpenInferenceLLMProviderValues.AWS.value,
    "aws": OpenInferenceLLMProviderValues.AWS.value,
    "anthropic": OpenInferenceLLMProviderValues.ANTHROPIC.value,
    "gcp.gemini": OpenInferenceLLMProviderValues.GOOGLE.value,
    "gcp.vertex_ai": OpenInferenceLLMProviderValues.GOOGLE.value,
    "gcp.gen_ai": OpenInferenceLLMProviderValues.GOOGLE.value,
    "cohere": OpenInferenceLLMProviderValues.COHERE.value,
    "mistral_ai": OpenInferenceLLMProviderValues.MISTRALAI.value,
    "mistralai": OpenInferenceLLMProviderValues.MISTRALAI.value,
    "deepseek": OpenInferenceLLMProviderValues.DEEPSEEK.value,
    "groq": OpenInferenceLLMProviderValues.GROQ.value,
    "x_ai": OpenInferenceLLMProviderValues.XAI.value,
    "xai": OpenInferenceLLMProviderValues.XAI.value,
    "perplexity": OpenInferenceLLMProviderValues.PERPLEXITY.value,
}

_JSON = OpenInferenceMimeTypeValues.JSON.value
_TEXT = OpenInferenceMimeTypeValues.TEXT.value

# Attribute key pieces
_IN = SpanAttributes.LLM_INPUT_MESSAGES
_OUT = SpanAttributes.LLM_OUTPUT_MESSAGES
_ROLE = MessageAttributes.MESSAGE_ROLE
_CONTENT = MessageAttributes.MESSAGE_CONTENT
_CONTENTS = MessageAttributes.MESSAGE_CONTENTS
_TOOL_CALLS = MessageAttributes.MESSAGE_TOOL_CALLS

Value = AttributeValue | Callable[[], AttributeValue]


def apply_record(
    span: Span,
    record: RequestRecord,
    config: TraceConfig,
    max_content_chars: int,
    max_attributes: int | None,
    header_user_id: str | None,
    conventions: Iterable[str] = (OPENINFERENCE,),
) -> None:
    """Set the span's attributes and status from `record`; the caller ends the span.

    `max_attributes`: attribute slots this may fill (None: no count limit), so the SDK's
    limit evicts nothing. `header_user_id`: the user id header seen when the span started,
    used when the record carries no user id of its own. `conventions`: `openinference`,
    `gen_ai` or both (`TelemetrySettings.span_conventions`); gen_ai attributes are derived
    from the OpenInference ones as recorded, so the same masking and bounds apply.
    """
    conventions = frozenset(conventions)
    if GEN_AI in conventions and OPENINFERENCE in conventions and max_attributes is not None:
        max_attributes = max(8, max_attributes - GENAI_SLOTS)
    builder = _Attributes(config, max_content_chars, max_attributes)
    embeddings = record.operation == _EMBEDDINGS
    completions = record.operation == _COMPLETIONS
    rerank = record.operation == _RERANK
    model = record.response_model or record.backend_model or record.request_model
    body = record.request_body if isinstance(record.request_body, dict) else None

    # Fixed facts: always kept.
    fixed = builder.fixed
    if embeddings:
        fixed(SpanAttributes.OPENINFERENCE_SPAN_KIND, OpenInferenceSpanKindValues.EMBEDDING.value)
        if model:
            fixed(SpanAttributes.EMBEDDING_MODEL_NAME, model)
    elif rerank:
        fixed(SpanAttributes.OPENINFERENCE_SPAN_KIND, OpenInferenceSpanKindValues.RERANKER.value)
        if model:
            fixed(RerankerAttributes.RERANKER_MODEL_NAME, model)
        top_n = body.get("top_n") if body is not None else None
        if isinstance(top_n, int) and not isinstance(top_n, bool):
            fixed(RerankerAttributes.RERANKER_TOP_K, top_n)
    else:
        fixed(SpanAttributes.OPENINFERENCE_SPAN_KIND, OpenInferenceSpanKindValues.LLM.value)
        if model:
            fixed(SpanAttributes.LLM_MODEL_NAME, model)
        if record.request_model:
            fixed(SpanAttributes.LLM_REQUEST_MODEL_NAME, record.request_model)
        if record.response_model:
            fixed(SpanAttributes.LLM_RESPONSE_MODEL_NAME, record.response_model)
        # The API the client spoke, whatever the backend; the backend is the provider.
        fixed(SpanAttributes.LLM_SYSTEM, _SYSTEMS.get(record.client_api, _OPENAI_SYSTEM))
        if record.provider:
            fixed(SpanAttributes.LLM_PROVIDER, _PROVIDERS.get(record.provider.lower(), record.provider))
    usage = record.usage
    if usage is not None:
        fixed(SpanAttributes.LLM_TOKEN_COUNT_PROMPT, usage.input_tokens)
        fixed(SpanAttributes.LLM_TOKEN_COUNT_TOTAL, usage.total_tokens)
        if not embeddings and not rerank:
            fixed(SpanAttributes.LLM_TOKEN_COUNT_COMPLETION, usage.output_tokens)
        if usage.cached_input_tokens:
            fixed(SpanAttributes.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_READ, usage.cached_input_tokens)
        if usage.cache_creation_input_tokens:
            fixed(SpanAttributes.LLM_TOKEN_COUNT_PROMPT_DETAILS_CACHE_WRITE, usage.cache_creation_input_tokens)
        if usage.reasoning_tokens:
            fixed(SpanAttributes.LLM_TOKEN_COUNT_COMPLETION_DETAILS_REASONING, usage.reasoning_tokens)
    if record.session_id:
        fixed(SpanAttributes.SESSION_ID, builder.cut(record.session_id))
    user_id = record.user_id or header_user_id
    if user_id:
        fixed(SpanAttributes.USER_ID, builder.cut(user_id))
    if record.tenant:
        fixed(TENANT_ID, record.tenant)
    if record.status:
        fixed(HTTP_RESPONSE_STATUS_CODE, record.status)
    if record.server_address:
        fixed(SERVER_ADDRESS, record.server_address)
        if record.server_port:
            fixed(SERVER_PORT, record.server_port)
    if record.error_type:
        fixed(ERROR_TYPE, record.error_type)
    output = record.output or []
    finish = next((m.finish_reason for m in output if m.finish_reason), None)
    if finish:
        fixed(SpanAttributes.LLM_FINISH_REASON, finish)
    if body is not None:
        key = SpanAttributes.EMBEDDING_INVOCATION_PARAMETERS if embeddings else SpanAttributes.LLM_INVOCATION_PARAMETERS
        not_parameters = _NOT_INVOCATION_PARAMETERS | INPUT_FIELDS.get(record.client_api, frozenset())
        fixed(key, builder.lazy_json(lambda: {k: v for k, v in body.items() if k not in not_parameters}))

    # Content, most useful first, within the span's budget.
    if body is not None:
        builder.value(SpanAttributes.INPUT_VALUE, SpanAttributes.INPUT_MIME_TYPE, body)
    if output and not embeddings:
        value = _output_value(output, completions, record.client_api)
        builder.value(SpanAttributes.OUTPUT_VALUE, SpanAttributes.OUTPUT_MIME_TYPE, value)
        if completions:
            for i, message in enumerate(output[:MAX_CHOICES]):
                key = f"{SpanAttributes.LLM_CHOICES}.{i}.{ChoiceAttributes.COMPLETION_TEXT}"
                builder.group([(key, builder.cut(message.content))])
        else:
            for i, message in enumerate(output[:MAX_CHOICES]):
                builder.group(_output_message(builder, f"{_OUT}.{i}", message))
    if body is not None:
        if embeddings:
            for i, text in enumerate(_texts(body.get("input"))):
                key = f"{SpanAttributes.EMBEDDING_EMBEDDINGS}.{i}.{EmbeddingAttributes.EMBEDDING_TEXT}"
                builder.group([(key, builder.cut(text))])
        elif completions:
            for i, text in enumerate(_texts(body.get("prompt"))):
                key = f"{SpanAttributes.LLM_PROMPTS}.{i}.{PromptAttributes.PROMPT_TEXT}"
                builder.group([(key, builder.cut(text))])
        elif rerank:
            if isinstance(body.get("query"), str):
                builder.group([(RerankerAttributes.RERANKER_QUERY, builder.cut(body["query"]))])
            for i, text in enumerate(_texts(body.get("documents"))):
                key = f"{RerankerAttributes.RERANKER_INPUT_DOCUMENTS}.{i}.{DocumentAttributes.DOCUMENT_CONTENT}"
                builder.group([(key, builder.cut(text))])
        else:
            for i, tool in enumerate(_tools(body)):
                key = f"{SpanAttributes.LLM_TOOLS}.{i}.{ToolAttributes.TOOL_JSON_SCHEMA}"
                builder.group([(key, builder.lazy_json(_returning(tool)))])
            read = input_messages(record.client_api, body)
            if read is not None:
                messages, unread = read
                # Newest first: when the budget runs out, the oldest turns are left out.
                shown = messages[-MAX_MESSAGES:]
                offset = len(messages) - len(shown)
                builder.omitted_messages = offset + unread
                kept: list[list[tuple[str, AttributeValue]]] = []
                for i in range(len(shown) - 1, -1, -1):
                    turn = shown[i]
                    if not isinstance(turn, dict):
                        continue
                    accepted = builder.accept(_input_message(builder, f"{_IN}.{offset + i}", turn))
                    if accepted is None:
                        builder.omitted_messages += i + 1
                        break
                    kept.append(accepted)
                for accepted in reversed(kept):  # recorded in conversation order
                    builder.attributes.extend(accepted)

    # Gateway facts, last so they can say what was left out.
    fixed(SpanAttributes.METADATA, builder.cut(_dumps(_metadata(record, builder))))

    attributes: list[tuple[str, AttributeValue]] = builder.attributes
    if GEN_AI in conventions:
        recorded: dict[str, AttributeValue] = {}
        for key, value in attributes:
            if (masked := mask_without_externalization(config, key, value)) is not None:
                recorded[key] = masked
        if OPENINFERENCE not in conventions:
            attributes = [(k, v) for k, v in attributes if not k.startswith(OPENINFERENCE_PREFIXES)]
        attributes.extend(genai_attributes(record, recorded).items())
    for key, value in attributes:
        span.set_attribute(key, value)
    if record.error_type:
        span.set_status(Status(StatusCode.ERROR, _error_description(record)))
    else:
        span.set_status(Status(StatusCode.OK))



class _Attributes:
    """Collects a span's attributes under the size and count budgets.

    Values are checked against the TraceConfig with the library's side-effect-free mask
    (`mask_without_externalization`) only to know whether they will be recorded and how big
    they are; the span itself applies `TraceConfig.mask` again when they are set.
    """

    def __init__(self, config: TraceConfig, limit: int, max_attributes: int | None) -> None:
        self.config = config
        self.limit = limit
        self.budget = limit * SPAN_CONTENT_BUDGET_FACTOR
        self.max_attributes = max_attributes
        self.attributes: list[tuple[str, AttributeValue]] = []
        self.omitted_messages = 0
        self.omitted_other = 0
        self.truncated = 0
        self.count = 0  # attributes accepted so far

    # values --------------------------------------------------------------------------------

    def cut(self, text: str) -> str:
        """`text`, at most `limit` characters, with a marker saying it was cut."""
        if len(text) <= self.limit:
            return text
        self.truncated += 1
        marker = f"...[truncated: {len(text)} chars]"
        return text[: max(0, self.limit - len(marker))] + marker

    def lazy_json(self, make: Callable[[], Any]) -> Callable[[], str]:
        """Serialized only if the TraceConfig lets it be recorded."""
        return lambda: self.cut(_dumps(make()))

    def image_url(self, url: str) -> AttributeValue:
        if len(url) <= self.limit:
            return url
        # TraceConfig's __post_init__ replaces a None with its default, so it is an int here.
        if is_base64_url(url) and len(url) > cast(int, self.config.base64_image_max_length):
            return url  # the library redacts it (or hands it to the configured blob uploader)
        return REDACTED_VALUE  # a cut image is useless

    def _shown(self, key: str, value: Value) -> AttributeValue | None:
        return mask_without_externalization(self.config, key, value)

    @staticmethod
    def _size(value: AttributeValue) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, list | tuple):
            return sum(len(v) if isinstance(v, str) else 8 for v in value)
        return 8

    # collection ------------------------------------------------------------------------------

    def fixed(self, key: str, value: Value) -> None:
        shown = self._shown(key, value)
        if shown is not None:
            self.attributes.append((key, shown))
            self.count += 1

    def value(self, key: str, mime_key: str, value: Any) -> None:
        """input.value / output.value with its mime type: JSON, or plain text for a string or a cut JSON."""
        if value == "" or value is None:
            return
        if isinstance(value, str):
            pairs: list[tuple[str, Value]] = [(key, self.cut(value)), (mime_key, _TEXT)]
        else:
            text: list[str] = []

            def serialized() -> str:
                if not text:
                    text.append(_dumps(value))
                return self.cut(text[0])

            pairs = [(key, serialized), (mime_key, lambda: _JSON if text and len(text[0]) <= self.limit else _TEXT)]
        self.group(pairs, charged=False)  # bounded by `limit` each, outside the budget

    def group(self, pairs: Iterable[tuple[str, Value]], *, charged: bool = True) -> bool:
        """Add attributes that belong together (one message), all or none. False when they did not fit."""
        accepted = self.accept(pairs, charged=charged)
        if accepted is None:
            self.omitted_other += 1
            return False
        self.attributes.extend(accepted)
        return True

    def accept(self, pairs: Iterable[tuple[str, Value]], *, charged: bool = True) -> list[tuple[str, AttributeValue]] | None:
        """The attributes of `pairs` that will be recorded, charged to the budget; None if they do not fit."""
        shown: list[tuple[str, AttributeValue]] = []
        size = 0
        for key, value in pairs:
            masked = self._shown(key, value)
            if masked is None:
                continue
            # Images: keep the original so the span's mask can hand it to a blob uploader.
            final = value if key.endswith(ImageAttributes.IMAGE_URL) and not callable(value) else masked
            shown.append((key, final))
            size += self._size(masked) if charged else 0
        if not shown:
            return shown
        count_ok = self.max_attributes is None or self.count + len(shown) <= self.max_attributes
        if size > self.budget or not count_ok:
            return None
        self.budget -= size
        self.count += len(shown)
        return shown


def _input_message(b: _Attributes, prefix: str, message: Mapping[str, Any]) -> list[tuple[str, Value]]:
    out: list[tuple[str, Value]] = []
    role = message.get("role")
    if isinstance(role, str) and role:
        out.append((f"{prefix}.{_ROLE}", role))
    if (tool_call_id := message.get("tool_call_id")) and isinstance(tool_call_id, str):
        out.append((f"{prefix}.{MessageAttributes.MESSAGE_TOOL_CALL_ID}", b.cut(tool_call_id)))
    if (name := message.get("name")) and isinstance(name, str):
        out.append((f"{prefix}.{MessageAttributes.MESSAGE_NAME}", b.cut(name)))
    content = message.get("content")
    if isinstance(content, str):
        if content:
            out.append((f"{prefix}.{_CONTENT}", b.cut(content)))
    elif isinstance(content, list):
        for j, part in enumerate(content[:MAX_CONTENT_PARTS]):
            if isinstance(part, str):  # lenient: a bare string part
                part = {"type": "text", "text": part}
            if not isinstance(part, dict):
                continue
            part_prefix = f"{prefix}.{_CONTENTS}.{j}"
            kind = part.get("type")
            if kind in ("text", "refusal"):
                text = part.get("text") if kind == "text" else part.get("refusal")
                out.append((f"{part_prefix}.{MessageContentAttributes.MESSAGE_CONTENT_TYPE}", "text"))
                if isinstance(text, str) and text:
                    out.append((f"{part_prefix}.{MessageContentAttributes.MESSAGE_CONTENT_TEXT}", b.cut(text)))
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                out.append((f"{part_prefix}.{MessageContentAttributes.MESSAGE_CONTENT_TYPE}", "image"))
                if isinstance(url, str) and url:
                    key = f"{part_prefix}.{MessageContentAttributes.MESSAGE_CONTENT_IMAGE}.{ImageAttributes.IMAGE_URL}"
                    out.append((key, b.image_url(url)))
            # audio and file parts are in input.value only, as openinference-instrumentation-openai does
    elif content is not None:
        out.append((f"{prefix}.{_CONTENT}", b.cut(_dumps(content))))
    function_call = message.get("function_call")
    if isinstance(function_call, dict):
        if isinstance(fname := function_call.get("name"), str) and fname:
            out.append((f"{prefix}.{MessageAttributes.MESSAGE_FUNCTION_CALL_NAME}", b.cut(fname)))
        if isinstance(fargs := function_call.get("arguments"), str) and fargs:
            out.append((f"{prefix}.{MessageAttributes.MESSAGE_FUNCTION_CALL_ARGUMENTS_JSON}", b.cut(fargs)))
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for k, call in enumerate(tool_calls[:MAX_TOOL_CALLS]):
            if not isinstance(call, dict):
                continue
            function = call.get("function")
            if not isinstance(function, dict):
                function = {}
            out.extend(_tool_call(b, f"{prefix}.{_TOOL_CALLS}.{k}", call.get("id"), function.get("name"), function.get("arguments")))
    return out


def _output_message(b: _Attributes, prefix: str, message: OutputMessage) -> list[tuple[str, Value]]:
    out: list[tuple[str, Value]] = [(f"{prefix}.{_ROLE}", message.role or "assistant")]
    if message.content:
        out.append((f"{prefix}.{_CONTENT}", b.cut(message.content)))
    for k, call in enumerate(message.tool_calls[:MAX_TOOL_CALLS]):
        out.extend(_tool_call(b, f"{prefix}.{_TOOL_CALLS}.{k}", call.id, call.name, call.arguments))
    return out


def _tool_call(b: _Attributes, prefix: str, call_id: Any, name: Any, arguments: Any) -> list[tuple[str, Value]]:
    """`arguments`: JSON text, or (Anthropic's tool_use `input`) an object serialized if recorded."""
    out: list[tuple[str, Value]] = []
    if isinstance(call_id, str) and call_id:
        out.append((f"{prefix}.{ToolCallAttributes.TOOL_CALL_ID}", b.cut(call_id)))
    if isinstance(name, str) and name:
        out.append((f"{prefix}.{ToolCallAttributes.TOOL_CALL_FUNCTION_NAME}", b.cut(name)))
    key = f"{prefix}.{ToolCallAttributes.TOOL_CALL_FUNCTION_ARGUMENTS_JSON}"
    if isinstance(arguments, str):
        if arguments:
            out.append((key, b.cut(arguments)))
    elif isinstance(arguments, dict | list):
        out.append((key, b.lazy_json(lambda: arguments)))
    return out


def _returning(value: Any) -> Callable[[], Any]:
    """A thunk bound to `value` now (a lambda in a loop would see the last one)."""
    return lambda: value


def _tools(body: Mapping[str, Any]) -> list[Any]:
    tools = body.get("tools")
    found = [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    functions = body.get("functions")  # legacy function calling, shown in the tool format
    if isinstance(functions, list):
        found.extend({"type": "function", "function": f} for f in functions if isinstance(f, dict))
    return found[:MAX_TOOLS]


def _texts(value: Any) -> list[str]:
    """Text inputs (prompt / embedding input); token-id inputs are not decoded."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[:MAX_INPUTS]
    return []


def _output_value(output: list[OutputMessage], completions: bool, client_api: str) -> Any:
    """The text when there is one plain answer, else the assembled answer as JSON in the
    client API's shape (chat choices, an Anthropic message's content, Responses output items)."""
    if len(output) == 1 and not output[0].tool_calls:
        return output[0].content
    if client_api == ANTHROPIC_MESSAGES:
        return _anthropic_output_value(output[0])
    if client_api == RESPONSES:
        return _responses_output_value(output[0])
    if completions:
        return [{"index": i, "text": m.content, "finish_reason": m.finish_reason} for i, m in enumerate(output[:MAX_CHOICES])]
    messages = []
    for m in output[:MAX_CHOICES]:
        item: dict[str, Any] = {"role": m.role or "assistant", "content": m.content or None}
        if m.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls[:MAX_TOOL_CALLS]
            ]
        if m.finish_reason:
            item["finish_reason"] = m.finish_reason
        messages.append(item)
    return messages[0] if len(messages) == 1 else messages


def _anthropic_output_value(message: OutputMessage) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    for call in message.tool_calls[:MAX_TOOL_CALLS]:
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": _arguments(call.arguments)})
    return {"role": message.role or "assistant", "content": content, "stop_reason": message.finish_reason}


def _responses_output_value(message: OutputMessage) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if message.content:
        items.append({"type": "message", "role": message.role or "assistant",
                      "content": [{"type": "output_text", "text": message.content}]})
    for call in message.tool_calls[:MAX_TOOL_CALLS]:
        items.append({"type": "function_call", "call_id": call.id, "name": call.name, "arguments": call.arguments})
    return items


def _arguments(arguments: str) -> Any:
    """A tool call's input as the object it was, or the text when it is not whole JSON (cut)."""
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments


def _metadata(record: RequestRecord, b: _Attributes) -> dict[str, Any]:
    data: dict[str, Any] = dict(record.attributes)  # configured request-header attributes (tenant, ...)
    data.update(
        backend=record.backend,
        route=record.route,
        request_model=record.request_model,
        backend_model=record.backend_model,
        provider=record.provider,
        client_api=record.client_api,
        stream=record.stream,
        complete=record.complete,
    )
    if record.tenant:
        data["tenant"] = record.tenant
    if record.usage is not None and record.usage.estimated:
        data["usage_estimated"] = True
    if (ttft := record.time_to_first_token) is not None:
        data["time_to_first_token_ms"] = round(ttft * 1000, 3)
    if (tpot := record.time_per_output_token) is not None:
        data["time_per_output_token_ms"] = round(tpot * 1000, 3)
    data["processor_ms"] = round(record.processor_seconds * 1000, 3)
    if b.omitted_messages:
        data["input_messages_omitted"] = b.omitted_messages
    if b.omitted_other:
        data["content_items_omitted"] = b.omitted_other
    if b.truncated:
        data["values_truncated"] = b.truncated
    if record.embeddings is not None:  # a summary: vectors are not recorded
        data["embeddings"] = {"count": record.embeddings[0], "dimensions": record.embeddings[1]}
    return data


def _error_description(record: RequestRecord) -> str:
    parts = [record.error_type or "error"]
    if record.status:
        parts.append(f"upstream status {record.status}")
    else:
        parts.append("no response from upstream")
    if not record.complete and record.status and 200 <= record.status < 300:
        parts.append("response cut off")
    return "; ".join(parts)


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:  # e.g. integers beyond 64 bits
        import json

        return json.dumps(value, default=str, ensure_ascii=False)
