"""The names the gateway shares with Envoy, with operators and between its two stages.

One spelling each: the Envoy config renderer matches routes on these headers and prints
these metadata keys in the access log, the request and upstream stages set and read
them, rate-limit descriptors and dashboards depend on them. The module imports nothing
from the gateway, so every part can use it without pulling in another part.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class ClientApi(StrEnum):
    """The API a client speaks, as named in the `client_api` metadata for the upstream stage."""

    OPENAI_CHAT = "openai.chat"
    OPENAI_COMPLETIONS = "openai.completions"
    OPENAI_EMBEDDINGS = "openai.embeddings"
    OPENAI_MODELS = "openai.models"
    OPENAI_RESPONSES = "openai.responses"
    ANTHROPIC_MESSAGES = "anthropic.messages"
    OPENAI_IMAGES = "openai.images"
    OPENAI_TRANSCRIPTIONS = "openai.audio.transcriptions"
    OPENAI_TRANSLATIONS = "openai.audio.translations"
    OPENAI_SPEECH = "openai.audio.speech"
    RERANK = "cohere.rerank"  # Cohere's v2 rerank shape, which vLLM, Jina and others serve too
    OPENAI_INPUT_TOKENS = "openai.responses.input_tokens"
    ANTHROPIC_COUNT_TOKENS = "anthropic.count_tokens"


# -- headers ----------------------------------------------------------------------

GATEWAY_HEADER_PREFIX: Final = "x-ai-eg-"  # the gateway's own headers; they never carry credentials
MODEL_HEADER: Final = "x-ai-eg-model"  # the model the client asked for, for Envoy's routes
# Request: the backend the processor picked (Envoy routes on it). Response: the backend
# that served an attempt (set by the upstream stage, read and removed by the request stage).
BACKEND_HEADER: Final = "x-ai-eg-backend"
ROUTE_HEADER: Final = "x-ai-eg-route"  # a route with fallbacks: Envoy picks the backend per attempt
# With x-ai-eg-backend: this request needs the upstream stage (a translated pair, e.g. an
# Anthropic client on an OpenAI backend), which an OpenAI backend's own cluster skips.
STAGE_HEADER: Final = "x-ai-eg-stage"
# MCP paths: the caller the request stage established, for the MCP gateway's tool
# authorization (its tenant; the caller's own tool globs as a JSON array). The request
# stage always sets or removes them, and Envoy removes clients' copies before any filter.
TENANT_HEADER: Final = "x-ai-eg-tenant"
TOOL_GRANTS_HEADER: Final = "x-ai-eg-tools"
TIMEOUT_HEADER: Final = "x-envoy-upstream-rq-timeout-ms"  # a route's own request timeout
MCP_SESSION_HEADER: Final = "mcp-session-id"
RATELIMIT_RESET_HEADER: Final = "x-ratelimit-reset"  # Envoy's local rate limit: seconds until a token
RETRY_AFTER_HEADER: Final = "retry-after"
# Credentials a client may send to the gateway; none of them may reach a provider.
CLIENT_CREDENTIAL_HEADERS: Final = (
    "authorization", "x-api-key", "api-key", "proxy-authorization", "cookie", "x-goog-api-key",
)

# -- Envoy attributes (ext_proc `request_attributes` / `response_attributes`) ------

ATTRIBUTES_KEY: Final = "envoy.filters.http.ext_proc"  # where Envoy puts the attributes a filter asked for
CODE_DETAILS_ATTRIBUTE: Final = "response.code_details"  # the request stage: tells Envoy's replies apart
UPSTREAM_HOST_ATTRIBUTE: Final = "xds.upstream_host_metadata"  # the upstream stage: which backend Envoy picked

# -- response code details of replies the processor makes --------------------------

PROCESSOR_DETAILS_PREFIX: Final = "extproc_"  # the request stage (Envoy's local-reply mappers skip these)
UPSTREAM_DETAILS_PREFIX: Final = "extproc_upstream_"  # the upstream stage

# -- dynamic metadata ----------------------------------------------------------------

METADATA_NAMESPACE: Final = "io.envoy.ai_gateway"
ENDPOINT_BACKEND_KEY: Final = "backend"  # a cluster endpoint's metadata (same namespace): its backend


class Meta:
    """Keys the processor writes in METADATA_NAMESPACE (the access log, rate limits and
    the upstream stage read them). Token keys follow Envoy AI Gateway's names."""

    REQUEST_MODEL: Final = "request_model"
    MODEL_NAME_OVERRIDE: Final = "model_name_override"
    RESPONSE_MODEL: Final = "response_model"
    BACKEND_NAME: Final = "backend_name"
    ROUTE_NAME: Final = "route_name"
    SESSION_ID: Final = "session.id"
    TENANT: Final = "tenant"
    CLIENT_API: Final = "client_api"  # for the upstream stage: the API to translate from
    TRACEPARENT: Final = "traceparent"  # for the upstream stage: the request span's W3C trace context
    TRACESTATE: Final = "tracestate"
    RESPONSE_ERROR_TYPE: Final = "response_error_type"
    TTFT_MS: Final = "token_latency_ttft"
    ITL_MS: Final = "token_latency_itl"
    INPUT_TOKENS: Final = "llm_input_token"
    OUTPUT_TOKENS: Final = "llm_output_token"
    TOTAL_TOKENS: Final = "llm_total_token"
    CACHED_INPUT_TOKENS: Final = "llm_cached_input_token"
    CACHE_CREATION_INPUT_TOKENS: Final = "llm_cache_creation_input_token"
    REASONING_TOKENS: Final = "llm_reasoning_token"
    USAGE_ESTIMATED: Final = "llm_usage_estimated"
    RESERVE: Final = "ratelimit_reserve"  # tokens charged up front in reserve mode
    MCP_METHOD: Final = "mcp_method"
    MCP_REQUEST_ID: Final = "mcp_request_id"
    MCP_TOOL_NAME: Final = "mcp_tool_name"
    MCP_BACKEND: Final = "mcp_backend"
    MCP_TOOL_CALL: Final = "mcp_tool_call"  # 1 on every MCP tools/call, for call budgets
    TRACE_ID: Final = "trace_id"  # the request span's ids (hex), so an access log links to its trace
    SPAN_ID: Final = "span_id"


TOKEN_KEYS: Final = frozenset({
    Meta.INPUT_TOKENS, Meta.OUTPUT_TOKENS, Meta.TOTAL_TOKENS, Meta.CACHED_INPUT_TOKENS,
    Meta.CACHE_CREATION_INPUT_TOKENS, Meta.REASONING_TOKENS,
})
# Keys the gateway writes itself besides the token keys; a configured cost may not reuse any.
REQUEST_METADATA_KEYS: Final = frozenset({
    Meta.REQUEST_MODEL, Meta.MODEL_NAME_OVERRIDE, Meta.RESPONSE_MODEL, Meta.BACKEND_NAME, Meta.ROUTE_NAME,
    Meta.TTFT_MS, Meta.ITL_MS, Meta.SESSION_ID, Meta.TENANT, Meta.USAGE_ESTIMATED, Meta.RESPONSE_ERROR_TYPE,
    Meta.RESERVE, Meta.TRACE_ID, Meta.SPAN_ID,
})


# -- telemetry: the names dashboards and alerts are written against -------------------


class Metric:
    """Instrument names (OpenTelemetry GenAI and MCP conventions, and the gateway's own).
    Prometheus shows them with dots as underscores and a unit suffix."""

    TOKEN_USAGE: Final = "gen_ai.client.token.usage"
    REQUEST_DURATION: Final = "gen_ai.server.request.duration"
    TIME_TO_FIRST_TOKEN: Final = "gen_ai.server.time_to_first_token"
    TIME_PER_OUTPUT_TOKEN: Final = "gen_ai.server.time_per_output_token"
    PROCESSOR_DURATION: Final = "extproc.processor.duration"
    PROCESSOR_MESSAGES: Final = "extproc.processor.messages"  # Prometheus: extproc_processor_messages_total
    RATELIMIT_STORE_ERRORS: Final = "extproc.ratelimit.store_errors"
    AFFINITY_ERRORS: Final = "extproc.affinity.errors"  # Responses affinity store calls that failed
    MCP_REQUEST_DURATION: Final = "mcp.request.duration"  # the MCP gateway, one per client message
    MCP_REQUESTS: Final = "mcp.requests"
    COST: Final = "extproc.cost"  # Prometheus: extproc_cost_total, one series per configured cost key


class Attr:
    """Metric and span attribute names the gateway sets (OpenTelemetry conventions)."""

    OPERATION_NAME: Final = "gen_ai.operation.name"
    PROVIDER_NAME: Final = "gen_ai.provider.name"
    REQUEST_MODEL: Final = "gen_ai.request.model"
    RESPONSE_MODEL: Final = "gen_ai.response.model"
    ORIGINAL_MODEL: Final = "gen_ai.original.model"
    TOKEN_TYPE: Final = "gen_ai.token.type"
    SERVER_ADDRESS: Final = "server.address"
    SERVER_PORT: Final = "server.port"
    ERROR_TYPE: Final = "error.type"
    STREAM: Final = "stream"
    MCP_METHOD: Final = "mcp.method.name"
    MCP_TOOL: Final = "mcp.tool.name"
    MCP_SERVER: Final = "mcp.server"
    COST_KEY: Final = "cost"  # extproc.cost: the configured cost's metadata_key
    MCP_ORIGINAL_TOOL: Final = "mcp.tool.original_name"  # the name the server knows the tool by
    MCP_PROTOCOL_VERSION: Final = "mcp.protocol.version"
    JSONRPC_ID: Final = "jsonrpc.request.id"
