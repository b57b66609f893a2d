"""Render the Envoy configuration from the gateway config.

Adding a backend in the gateway YAML is all a user does: this module turns each
backend into a cluster (TLS + SNI for https) and a route selected by the
`x-ai-eg-backend` header that the processor sets, and wires the ext_proc filter.
Output is plain data (dicts) dumped as YAML, deterministic for a given config so
the bundled envoy/envoy.yaml can be checked against a fresh render.
"""

from __future__ import annotations

from typing import Any

import yaml

from extproc import budgets, jwt_authn
from extproc.auth_config import JwtProvider
from extproc.client_apis import ANTHROPIC_APIS, ENDPOINTS
from extproc.config import Backend, GatewayConfig, ParsedUrl, Route, Schema
from extproc.contract import (
    BACKEND_HEADER,
    CODE_DETAILS_ATTRIBUTE,
    ENDPOINT_BACKEND_KEY,
    METADATA_NAMESPACE,
    MODEL_HEADER,
    PROCESSOR_DETAILS_PREFIX,
    ROUTE_HEADER,
    STAGE_HEADER,
    TENANT_HEADER,
    TOOL_GRANTS_HEADER,
    UPSTREAM_HOST_ATTRIBUTE,
    Meta,
)
from extproc.local_replies import RATE_LIMITER_ERROR
from extproc.mcp import jsonrpc
from extproc.protocol import PROCESSOR_SERVICE
from extproc.workers import worker_addresses, worker_count

PROCESSOR_CLUSTER = "extproc"  # every processor worker
MCP_CLUSTER = "extproc-mcp"  # the MCP gateway in processor worker 0
BUILTIN_RATELIMIT_CLUSTER = "extproc-ratelimit"  # worker 0, which runs the built-in rate limit service
RATELIMIT_CLUSTER = "ratelimit"  # an external rate limit service
OTLP_LOGS_CLUSTER = "otlp-access-log"  # the collector receiving access logs over OTLP/gRPC
DEFAULT_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"

_EARLY_HEADER_MUTATION = (
    "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation"
)
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_CEL_FILTER = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
_DOWNSTREAM_CONNECTIONS = (
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)
_RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
_LOCAL_RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_STDOUT_LOG = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
_OTEL_LOG = "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig"
_UPSTREAM_CODEC = "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
_PREVIOUS_PRIORITIES = (
    "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig"
)
_RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
# When a backend fails (cannot connect, resets, 5xx, 429), Envoy tries the next priority.
FALLBACK_RETRY_ON = "connect-failure,refused-stream,reset,5xx,retriable-status-codes"

# Envoy's own local replies (upstream down, timeouts, body too large, no route) get the
# OpenAI error shape. Replies the processor made (response code details starting with
# "extproc_") already have it and are left untouched. First matching mapper wins.
_UPSTREAM_ERRORS: list[tuple[list[str], int, str, str]] = [
    (["UF", "UH", "UO", "URX", "NC"], 503, "backend_unavailable", "The backend is unavailable"),
    (["UT", "SI"], 504, "backend_timeout", "The backend did not answer in time"),
    (["UC", "UR", "UPE", "LR"], 502, "backend_error", "The backend connection failed"),
]


def duration(seconds: float) -> str:
    """A protobuf JSON duration ("1.5s"): fixed-point, never an exponent, ns precision."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def cluster_name(backend: str) -> str:
    return f"backend-{backend}"


def staged_cluster_name(backend: str) -> str:
    """An OpenAI backend's second cluster, with the upstream stage (translated client APIs)."""
    return f"staged-{backend}"


def route_cluster_name(route: str) -> str:
    """A route with fallbacks gets one cluster holding all its backends, by priority."""
    return f"route-{route}"


def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _processor_address(grpc_address: str) -> dict[str, Any]:
    if grpc_address.startswith("unix:"):
        return {"pipe": {"path": grpc_address.removeprefix("unix:").removeprefix("//")}}
    host, _, port = grpc_address.rpartition(":")
    return _socket_address(host.strip("[]") or "127.0.0.1", int(port))


def access_log_fields(config: GatewayConfig) -> dict[str, str]:
    """Every access-log field and its Envoy format: the stdout JSON keys and the OTLP attributes."""

    def meta(key: str) -> str:
        return f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%"

    fields = {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(:PATH)%",
        "status": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
        "duration_ms": "%DURATION%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "request_model": meta(Meta.REQUEST_MODEL),
        "model_name_override": meta(Meta.MODEL_NAME_OVERRIDE),
        "response_model": meta(Meta.RESPONSE_MODEL),
        "backend_name": meta(Meta.BACKEND_NAME),
        "route_name": meta(Meta.ROUTE_NAME),
        "session_id": meta(Meta.SESSION_ID),
        "tenant": meta(Meta.TENANT),
        "input_tokens": meta(Meta.INPUT_TOKENS),
        "output_tokens": meta(Meta.OUTPUT_TOKENS),
        "total_tokens": meta(Meta.TOTAL_TOKENS),
        "cached_input_tokens": meta(Meta.CACHED_INPUT_TOKENS),
        "cache_creation_input_tokens": meta(Meta.CACHE_CREATION_INPUT_TOKENS),
        "reasoning_tokens": meta(Meta.REASONING_TOKENS),
        "usage_estimated": meta(Meta.USAGE_ESTIMATED),
        "error_type": meta(Meta.RESPONSE_ERROR_TYPE),
        "ttft_ms": meta(Meta.TTFT_MS),
        "itl_ms": meta(Meta.ITL_MS),
        "mcp_method": meta(Meta.MCP_METHOD),
        "mcp_tool_name": meta(Meta.MCP_TOOL_NAME),
        "mcp_backend": meta(Meta.MCP_BACKEND),
        "mcp_request_id": meta(Meta.MCP_REQUEST_ID),
        "trace_id": meta(Meta.TRACE_ID),
        "span_id": meta(Meta.SPAN_ID),
        **{f"cost_{c.metadata_key}": meta(c.metadata_key) for c in config.costs},
    }
    return fields


def _access_log(config: GatewayConfig) -> list[dict[str, Any]]:
    stdout = {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {"@type": _STDOUT_LOG, "log_format": {"json_format": access_log_fields(config)}},
    }
    return [stdout, *_otlp_access_log(config)]


def _key_values(values: dict[str, str]) -> dict[str, Any]:
    """An OTLP KeyValueList of string values."""
    return {"values": [{"key": k, "value": {"string_value": v}} for k, v in values.items()]}


def _otlp_access_log(config: GatewayConfig) -> list[dict[str, Any]]:
    """Envoy's OpenTelemetry access logger, exporting to the collector cluster over OTLP/gRPC.

    Each field of the JSON log is a log-record attribute of the same name (Envoy drops an
    attribute whose value is unknown, as the JSON log writes null). `trace_id`/`span_id` are
    the request span's ids, set by the processor: Envoy fills the record's own trace fields
    only from a span of its own tracer, which the gateway does not run."""
    otlp = config.telemetry.access_log.otlp
    if otlp is None:
        return []
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": OTLP_LOGS_CLUSTER}, "timeout": "5s"}
    if otlp.headers:
        grpc_service["initial_metadata"] = [{"key": k, "value": v} for k, v in otlp.headers.items()]
    typed_config: dict[str, Any] = {
        "@type": _OTEL_LOG,
        "grpc_service": grpc_service,
        "log_name": "ai_gateway",
        "body": {"string_value": "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%"},
        "attributes": _key_values(access_log_fields(config)),
    }
    if otlp.resource_attributes:
        typed_config["resource_attributes"] = _key_values(otlp.resource_attributes)
    return [{"name": "envoy.access_loggers.open_telemetry", "typed_config": typed_config}]


def _otlp_logs_cluster(config: GatewayConfig) -> list[dict[str, Any]]:
    otlp = config.telemetry.access_log.otlp
    if otlp is None:
        return []
    # A collector is usually named by DNS (a Kubernetes service, a sidecar).
    return [_grpc_cluster(OTLP_LOGS_CLUSTER, [otlp.endpoint], discovery="STRICT_DNS")]


def _openai_error_format(message: str, error_type: str, code: str) -> dict[str, Any]:
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return {"json_format": {"error": error}, "content_type": "application/json"}


def _status_between(low: int, high: int) -> dict[str, Any]:
    def compare(op: str, value: int) -> dict[str, Any]:
        return {"status_code_filter": {"comparison": {"op": op, "value": {"default_value": value, "runtime_key": "extproc.local_reply.status"}}}}

    return {"and_filter": {"filters": [compare("GE", low), compare("LE", high)]}}


def _cel_filter(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {"@type": _CEL_FILTER, "expression": expression},
        }
    }


def _not_from_processor() -> dict[str, Any]:
    """True for Envoy's own replies: the processor's carry details starting with its prefix."""
    return _cel_filter(f"!response.code_details.startsWith('{PROCESSOR_DETAILS_PREFIX}')")


_RATE_LIMITED_BODY = _openai_error_format(
    "Rate limit reached for this tenant: the token budget or request limit is spent. "
    "See the x-ratelimit-* and retry-after headers.",
    "tokens",
    "rate_limit_exceeded",
)


_TOKEN_REFUSED = (
    "The gateway did not accept the request's bearer token: %LOCAL_REPLY_BODY%. "
    "Send a valid JWT in Authorization: Bearer."
)
_KEYS_UNAVAILABLE = (
    "The gateway could not check the request's bearer token: its identity provider's keys (JWKS) could not be "
    "fetched. Retry shortly."
)
# (condition on top of "jwt_authn refused", status, message, OpenAI type and code, Anthropic type, JSON-RPC code)
_JWT_REPLIES: list[tuple[str, int, str, str, str, str, int]] = [
    # The provider's JWKS host is down: not the client's fault, and retryable.
    ("response.code_details.contains('Jwks_remote_fetch_is_failed')", 503, _KEYS_UNAVAILABLE, "server_error",
     "identity_provider_unavailable", "api_error", jsonrpc.SERVER_UNAVAILABLE),
    ("true", 401, _TOKEN_REFUSED, "invalid_request_error", "invalid_api_key", "authentication_error",
     jsonrpc.UNAUTHORIZED),
]


def _cel_list(values: list[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _jwt_mappers(config: GatewayConfig) -> list[dict[str, Any]]:
    """jwt_authn refused the token (missing, expired, wrong issuer or audience, bad
    signature, unknown key): 401 in the client API's own shape, told apart by path.
    Envoy answers a wrong audience with 403; it is the same "this token is not valid
    here" to a client, so it becomes 401 too. Keys that could not be fetched: 503."""
    if config.auth.jwt is None:
        return []
    refused = f"response.code_details.startsWith('{jwt_authn.DETAILS_PREFIX}')"
    anthropic_paths = _cel_list(sorted(p for p, spec in ENDPOINTS.items() if spec.client_api in ANTHROPIC_APIS))
    mcp_paths = _cel_list([r.path for r in config.mcp.routes]) if config.mcp is not None else None
    mappers = []
    for condition, status, message, openai_type, code, anthropic_type, rpc_code in _JWT_REPLIES:
        shapes: list[tuple[str | None, dict[str, Any]]] = []
        if mcp_paths is not None:
            error = {"code": rpc_code, "message": message}
            shapes.append((mcp_paths, {
                "json_format": {"jsonrpc": "2.0", "id": None, "error": error}, "content_type": "application/json"}))
        shapes.append((anthropic_paths, {
            "json_format": {"type": "error", "error": {"type": anthropic_type, "message": message}},
            "content_type": "application/json",
        }))
        shapes.append((None, _openai_error_format(message, openai_type, code)))
        when = refused if condition == "true" else f"{refused} && {condition}"
        mappers += [
            {
                "filter": _cel_filter(when if paths is None else f"{when} && request.url_path in {paths}"),
                "status_code": status,
                "body_format_override": body,
            }
            for paths, body in shapes
        ]
    return mappers


def _local_reply_config(config: GatewayConfig) -> dict[str, Any]:
    body_limit = config.limits.max_request_body_bytes
    mappers: list[dict[str, Any]] = _jwt_mappers(config)
    mappers += [
        {
            "filter": {"response_flag_filter": {"flags": flags}},
            "status_code": status,
            "body_format_override": _openai_error_format(f"{message}: %LOCAL_REPLY_BODY%", "server_error", code),
        }
        for flags, status, code, message in _UPSTREAM_ERRORS
    ]
    mappers.append(
        {
            # Envoy's rate-limit filters (token budget or request limit) said no. Matched by
            # status: the local filter sets its RL flag only after the reply is mapped. (Its
            # x-ratelimit-* headers are added after mapping too: the processor copies
            # x-ratelimit-reset into retry-after.)
            "filter": {"and_filter": {"filters": [_status_between(429, 429), _not_from_processor()]}},
            "body_format_override": _RATE_LIMITED_BODY,
        }
    )
    mappers.append(
        {
            # ratelimit.failure_mode closed and the rate limit service (or its store) down:
            # Envoy's filter refuses with an empty body; say what failed.
            "filter": _cel_filter(f"response.code_details == '{RATE_LIMITER_ERROR}'"),
            "status_code": 503,
            "body_format_override": _openai_error_format(
                "The gateway could not check this tenant's budget: its rate limit service is unavailable, and "
                "the gateway refuses requests then (ratelimit.failure_mode: closed). Retry shortly.",
                "server_error", "ratelimit_unavailable"),
        }
    )
    mappers.append(
        {
            # The processor is unreachable (down, restarting, or too slow): Envoy's ext_proc
            # filter fails the request with details starting "ext_proc". Retryable: 503.
            "filter": _cel_filter("response.code_details.startsWith('ext_proc')"),
            "status_code": 503,
            "body_format_override": _openai_error_format(
                "The gateway's request processor is unavailable; retry shortly.", "server_error",
                "processor_unavailable"),
        }
    )
    too_large = f"Request body too large: the limit is {body_limit} bytes."
    for low, high, message, error_type, code in (
        (413, 413, too_large, "invalid_request_error", "request_too_large"),
        (400, 499, "%LOCAL_REPLY_BODY%", "invalid_request_error", "gateway_error"),
        (500, 599, "%LOCAL_REPLY_BODY%", "server_error", "gateway_error"),
    ):
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [_status_between(low, high), _not_from_processor()]}},
                "body_format_override": _openai_error_format(message, error_type, code),
            }
        )
    return {"mappers": mappers}


def _ext_proc_config(config: GatewayConfig, response_body_mode: str) -> dict[str, Any]:
    """What both processor stages share: the cluster, timeouts, failure mode, the modes
    (headers sent, request body buffered, no trailers) and the metadata namespace."""
    timeout_ms = config.processor.message_timeout_ms
    return {
        "@type": _EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": PROCESSOR_CLUSTER}},
        "failure_mode_allow": config.processor.failure_mode_allow,
        "message_timeout": duration(timeout_ms / 1000),
        "max_message_timeout": duration(max(timeout_ms / 1000, 30)),
        "allow_mode_override": True,
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "request_trailer_mode": "SKIP",
            "response_header_mode": "SEND",
            "response_body_mode": response_body_mode,
            "response_trailer_mode": "SKIP",
        },
        "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
    }


def _ext_proc_filter(config: GatewayConfig) -> dict[str, Any]:
    """The request stage: once per client request, before the router."""
    typed_config = _ext_proc_config(config, "STREAMED")
    # A route's own timeout travels as x-envoy-upstream-rq-timeout-ms; Envoy refuses
    # x-envoy-* mutations without this.
    typed_config["mutation_rules"] = {"allow_envoy": True}
    # Tells Envoy's own replies (backend down, timeouts, rate limits) from a backend's answers.
    typed_config["response_attributes"] = [CODE_DETAILS_ATTRIBUTE]
    if config.auth.jwt is not None:
        # The verified JWT payloads (jwt_authn's metadata) name the tenant.
        typed_config["metadata_options"]["forwarding_namespaces"] = {"untyped": [jwt_authn.NAMESPACE]}
    return {"name": "envoy.filters.http.ext_proc", "typed_config": typed_config}


def _upstream_stage_filters(config: GatewayConfig) -> list[dict[str, Any]]:
    """The processor again, below the router: once per attempt, for the backend Envoy
    picked (the endpoint's metadata names it), to translate, sign and read back."""
    ext_proc = _ext_proc_config(config, "NONE")  # the processor asks for the body when it translates it
    ext_proc["request_attributes"] = [UPSTREAM_HOST_ATTRIBUTE]
    # Each attempt sets its backend's host (a fallback cluster mixes hosts); Envoy
    # refuses :authority mutations without this.
    ext_proc["mutation_rules"] = {"allow_all_routing": True}
    ext_proc["metadata_options"]["forwarding_namespaces"] = {"untyped": [METADATA_NAMESPACE]}
    return [
        {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
        {"name": "envoy.filters.http.upstream_codec", "typed_config": {"@type": _UPSTREAM_CODEC}},
    ]


def _endpoint_metadata(backend: Backend) -> dict[str, Any]:
    return {
        "filter_metadata": {
            METADATA_NAMESPACE: {ENDPOINT_BACKEND_KEY: backend.name},
            "envoy.transport_socket_match": {"backend": backend.name},
        }
    }


def _backend_route(backend: Backend) -> dict[str, Any]:
    url = backend.url
    action: dict[str, Any] = {
        "cluster": cluster_name(backend.name),
        "host_rewrite_literal": url.authority,
        "timeout": duration(backend.request_timeout_seconds),
        "idle_timeout": duration(backend.idle_timeout_seconds),
    }
    return {
        "name": f"backend-{backend.name}",
        "match": {"prefix": "/", "headers": [{"name": BACKEND_HEADER, "string_match": {"exact": backend.name}}]},
        "route": action,
        "request_headers_to_remove": [MODEL_HEADER, BACKEND_HEADER, STAGE_HEADER],
    }


def _staged_route(backend: Backend) -> dict[str, Any]:
    """An OpenAI backend's cluster has no upstream stage (the fast path); a request that
    needs one there (an Anthropic client, translated) carries x-ai-eg-stage and goes to
    the same backend through its staged cluster."""
    route = _backend_route(backend)
    route["name"] = f"staged-{backend.name}"
    route["match"]["headers"].append({"name": STAGE_HEADER, "present_match": True})
    route["route"]["cluster"] = staged_cluster_name(backend.name)
    return route


def _fallback_route(config: GatewayConfig, route: Route) -> dict[str, Any]:
    members = [config.backend(ref.name) for ref in route.backends]
    longest = 0.0 if any(b.request_timeout_seconds == 0 for b in members) else max(
        b.request_timeout_seconds for b in members
    )
    action: dict[str, Any] = {
        "cluster": route_cluster_name(route.name),
        "timeout": duration(longest),
        "idle_timeout": duration(max(b.idle_timeout_seconds for b in members)),
        "retry_policy": {
            "retry_on": FALLBACK_RETRY_ON,
            "retriable_status_codes": [429],
            "num_retries": max(len(members) - 1, 1),
            "retry_priority": {
                "name": "envoy.retry_priorities.previous_priorities",
                "typed_config": {"@type": _PREVIOUS_PRIORITIES, "update_frequency": 1},
            },
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
            "host_selection_retry_max_attempts": 5,
        },
    }
    return {
        "name": f"route-{route.name}",
        "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": route.name}}]},
        "route": action,
        "request_headers_to_remove": [MODEL_HEADER, BACKEND_HEADER, ROUTE_HEADER],
    }


def _no_backend_route(config: GatewayConfig) -> dict[str, Any]:
    """Reached only when the processor chose no backend: it answers such requests itself,
    so this is the processor-unreachable path. With `failure_mode_allow`, such requests
    go unprocessed to the default route's first backend; otherwise there is nothing to do."""
    if config.processor.failure_mode_allow:
        default = next((r for r in config.routes if r.default), None)
        if default is not None:
            backend = config.backend(next(ref.name for ref in default.backends if ref.priority == 0))
            url = backend.url
            return {
                "name": "unprocessed",
                "match": {"prefix": "/v1/"},
                "route": {
                    "cluster": cluster_name(backend.name),
                    "host_rewrite_literal": url.authority,
                    "prefix_rewrite": url.path_prefix + "/",
                    "timeout": duration(backend.request_timeout_seconds),
                },
            }
    return {
        "name": "no-backend",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": "No backend was selected for this request"}},
    }


def _tls_socket(host: str, ca_file: str, alpn: list[str]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS,
            "sni": host,
            "common_tls_context": {
                "alpn_protocols": alpn,
                "validation_context": {
                    "trusted_ca": {"filename": ca_file},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                },
            },
        },
    }


def _staged_cluster(config: GatewayConfig, backend: Backend, ca_file: str) -> dict[str, Any]:
    """An OpenAI backend once more, with the upstream stage (see _staged_route)."""
    cluster = _backend_cluster(config, backend, ca_file, staged=True)
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = staged_cluster_name(backend.name)
    return cluster


def _backend_cluster(config: GatewayConfig, backend: Backend, ca_file: str, staged: bool = False) -> dict[str, Any]:
    url = backend.url
    endpoint = {"endpoint": {"address": _socket_address(url.host, url.port)}, "metadata": _endpoint_metadata(backend)}
    cluster: dict[str, Any] = {
        "name": cluster_name(backend.name),
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "10s",
        "load_assignment": {"cluster_name": cluster_name(backend.name), "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    if url.tls:
        cluster["transport_socket"] = _tls_socket(url.host, ca_file, ["h2", "http/1.1"])
        options: dict[str, Any] = {"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}
    else:
        options = {"explicit_http_config": {"http_protocol_options": {}}}
    if staged or backend.schema_ is not Schema.openai:
        options["http_filters"] = _upstream_stage_filters(config)
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {"@type": _HTTP_OPTIONS, **options}
    }
    return cluster


def _fallback_cluster(config: GatewayConfig, route: Route, ca_file: str) -> dict[str, Any]:
    """All of a route's backends in one cluster, by priority (weights within one).

    Each endpoint's metadata names its backend, for the upstream stage and for its own
    TLS settings (`transport_socket_matches`). HTTP/1.1 everywhere: one protocol for
    plain and TLS endpoints alike."""
    levels: dict[int, list[dict[str, Any]]] = {}
    matches: list[dict[str, Any]] = []
    for ref in route.backends:
        backend = config.backend(ref.name)
        url = backend.url
        levels.setdefault(ref.priority, []).append({
            "endpoint": {"address": _socket_address(url.host, url.port), "hostname": url.host},
            "metadata": _endpoint_metadata(backend),
            "load_balancing_weight": ref.weight,
        })
        socket = _tls_socket(url.host, ca_file, ["http/1.1"]) if url.tls else {
            "name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": _RAW_BUFFER}}
        matches.append({"name": backend.name, "match": {"backend": backend.name}, "transport_socket": socket})
    name = route_cluster_name(route.name)
    return {
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"priority": p, "lb_endpoints": levels[p]} for p in sorted(levels)],
        },
        "transport_socket_matches": matches,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": _upstream_stage_filters(config),
            }
        },
    }


def _jwks_cluster(provider: JwtProvider, ca_file: str) -> dict[str, Any]:
    """The host Envoy fetches a JWT provider's keys from (TLS for https)."""
    assert provider.jwks_uri is not None
    url = ParsedUrl.of(provider.jwks_uri)
    name = jwt_authn.jwks_cluster_name(provider.name)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _socket_address(url.host, url.port)}}]}]},
    }
    if url.tls:
        cluster["transport_socket"] = _tls_socket(url.host, ca_file, ["http/1.1"])
    return cluster


def _grpc_cluster(name: str, addresses: list[str], discovery: str = "STATIC") -> dict[str, Any]:
    """An HTTP/2 cluster over the given gRPC addresses; streams are spread round robin."""
    return {
        "name": name,
        "type": discovery,
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _processor_address(address)}} for address in addresses]}
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def _processor_cluster(addresses: list[str]) -> dict[str, Any]:
    """Every worker, health-checked: a worker that stops answering (hung, stopped) gets
    no new streams after two missed checks (about four seconds: each waits one second
    and they are one second apart), and gets them again at its first answer.

    The check is the processor's own gRPC health service, one call a second per worker
    from Envoy's main thread (not per request). A draining worker answers NOT_SERVING
    and is taken out the same way. The panic threshold is 1% (Envoy rounds it to a whole
    percent and panics below it): Envoy's default, 50%, spreads streams over every
    worker, hung ones included, once fewer than half answer (1 of 3); at 1% that happens
    only when none answers (up to 100 workers), when trying them all is all that is left."""
    cluster = _grpc_cluster(PROCESSOR_CLUSTER, addresses)
    cluster["health_checks"] = [
        {
            "timeout": "1s",
            "interval": "1s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            # Envoy's default checks a cluster that has carried no traffic yet once a
            # minute: the first requests could go to a worker that hung meanwhile.
            "no_traffic_interval": "1s",
            "grpc_health_check": {"service_name": PROCESSOR_SERVICE},
        }
    ]
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 1}}
    return cluster


def _worker_grpc_addresses(config: GatewayConfig) -> list[str]:
    settings = config.processor
    return [w.grpc_address for w in worker_addresses(settings, worker_count(settings))]


def _global_rate_limit_filter(config: GatewayConfig) -> dict[str, Any]:
    """Envoy's global rate-limit filter, after ext_proc so it sees the request metadata."""
    service = config.ratelimit
    cluster = BUILTIN_RATELIMIT_CLUSTER if service.address == "builtin" else RATELIMIT_CLUSTER
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": _RATELIMIT,
            "domain": service.domain,
            "stat_prefix": "token_budgets",
            "timeout": duration(service.timeout_ms / 1000),
            "failure_mode_deny": service.failure_mode == "closed",
            "status_on_error": {"code": "ServiceUnavailable"},
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
                "transport_api_version": "V3",
            },
            "rate_limits": budgets.envoy_rate_limits(config),
        },
    }


def _local_rate_limit_filter(config: GatewayConfig) -> dict[str, Any]:
    """Requests per tenant, counted by this Envoy alone: no service needed."""
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "tenant_requests.enabled"}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": _LOCAL_RATELIMIT,
            "stat_prefix": "tenant_requests",
            # Requests that match no descriptor (no tenant limit) are not limited.
            "token_bucket": {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"},
            "filter_enabled": always,
            "filter_enforced": {**always, "runtime_key": "tenant_requests.enforced"},
            "descriptors": budgets.local_rate_limit_descriptors(config.request_limits),
            "rate_limits": [{"actions": [_tenant_action()]}],
            "max_dynamic_descriptors": 10_000,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",  # the processor adds retry-after to its 429
        },
    }


def _tenant_action() -> dict[str, Any]:
    return {
        "metadata": {
            "descriptor_key": budgets.TENANT_KEY,
            "metadata_key": {"key": METADATA_NAMESPACE, "path": [{"key": budgets.TENANT_KEY}]},
            "source": "DYNAMIC",
        }
    }


def http_filters(config: GatewayConfig) -> list[dict[str, Any]]:
    filters = [] if config.auth.jwt is None else [jwt_authn.http_filter(config.auth.jwt)]
    filters.append(_ext_proc_filter(config))
    if config.request_limits:
        filters.append(_local_rate_limit_filter(config))
    if config.budgets:
        filters.append(_global_rate_limit_filter(config))
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}})
    return filters


def _mcp_routes(config: GatewayConfig) -> list[dict[str, Any]]:
    """Each MCP path goes to the MCP gateway: no timeout (sessions stream), Envoy's rate
    limits apply on the way (the request stage names the method and tool in metadata)."""
    if config.mcp is None:
        return []
    return [
        {
            "name": f"mcp-{index}",
            "match": {"path": route.path},
            "route": {"cluster": MCP_CLUSTER, "timeout": "0s", "idle_timeout": duration(
                max(config.mcp.request_timeout_seconds * 2, 300))},
        }
        for index, route in enumerate(config.mcp.routes)
    ]


def routes(config: GatewayConfig) -> list[dict[str, Any]]:
    fallback = [_fallback_route(config, r) for r in config.routes if r.has_fallback]
    staged = [_staged_route(b) for b in config.backends if b.schema_ is Schema.openai]
    return [*_mcp_routes(config), *fallback, *staged, *(_backend_route(b) for b in config.backends),
            _no_backend_route(config)]


def clusters(config: GatewayConfig, ca_file: str = DEFAULT_CA_FILE) -> list[dict[str, Any]]:
    workers = _worker_grpc_addresses(config)
    out = [
        _processor_cluster(workers),
        *(_backend_cluster(config, b, ca_file) for b in config.backends),
        *(_staged_cluster(config, b, ca_file) for b in config.backends if b.schema_ is Schema.openai),
        *(_fallback_cluster(config, r, ca_file) for r in config.routes if r.has_fallback),
    ]
    if config.auth.jwt is not None:
        out.extend(_jwks_cluster(p, ca_file) for p in config.auth.jwt.providers if jwt_authn.needs_cluster(p))
    if config.mcp is not None:
        address = f"{config.processor.admin_address}:{config.mcp.port}"
        mcp = _grpc_cluster(MCP_CLUSTER, [address])
        mcp["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
            "explicit_http_config"] = {"http_protocol_options": {}}  # the MCP gateway speaks HTTP/1.1
        out.append(mcp)
    if config.budgets:
        if config.ratelimit.address == "builtin":
            out.append(_grpc_cluster(BUILTIN_RATELIMIT_CLUSTER, workers[:1]))  # worker 0 keeps the counters
        else:
            # An external service may be named by DNS (e.g. a Kubernetes service).
            out.append(_grpc_cluster(RATELIMIT_CLUSTER, [config.ratelimit.address], discovery="STRICT_DNS"))
    out.extend(_otlp_logs_cluster(config))
    return out


# Envoy's default ends an ext_proc stream that is still open when its request ends with a
# reset, and grpc.aio leaks native memory for every call it sees cancelled (grpc/grpc#43360):
# ~100 bytes per request. With the graceful close Envoy half-closes and waits for the
# processor's status instead: nothing is cancelled, memory stays flat. (The processor also
# ends each stream itself after its last answer, so Envoy seldom has anything to wait for.)
RUNTIME_FLAGS: dict[str, Any] = {"envoy.reloadable_features.ext_proc_graceful_grpc_close": True}

# The graceful close in Envoy 1.40 keeps the stream waiting after its filter is gone, and
# nothing then keeps the stream's gRPC client alive but the thread's client cache, which
# evicts a client not fetched for this long (default 50 s): a request longer than that on a
# thread with no newer ext_proc stream ended with a freed client and a SIGSEGV (README,
# "Long requests"). A year keeps every client cached for any request that can happen (the
# cache holds one client per gRPC service and worker thread: nothing grows).
GRPC_CLIENT_CACHE: dict[str, Any] = {"max_cached_entry_idle_duration": "31536000s"}


def _strip_caller_headers() -> list[dict[str, Any]]:
    """Clients' copies of the headers that name the caller to the MCP gateway go before
    any filter runs: only the request stage sets them, so even a request it never saw
    (processor.failure_mode_allow) cannot claim a tenant."""
    return [{
        "name": "envoy.http.early_header_mutation.header_mutation",
        "typed_config": {
            "@type": _EARLY_HEADER_MUTATION,
            "mutations": [{"remove": TENANT_HEADER}, {"remove": TOOL_GRANTS_HEADER}],
        },
    }]


def render(config: GatewayConfig, ca_file: str = DEFAULT_CA_FILE) -> dict[str, Any]:
    """The whole bootstrap for the bundled Envoy: admin, one listener, clusters."""
    envoy = config.envoy
    body_limit = config.limits.max_request_body_bytes
    hcm = {
        "@type": _HCM,
        "stat_prefix": "ai_gateway",
        "codec_type": "AUTO",
        "use_remote_address": True,
        # "/v1//chat/./completions" is the same endpoint as "/v1/chat/completions".
        "normalize_path": True,
        "merge_slashes": True,
        # A client's own x-request-id is kept, so it can find its request in the access log.
        "preserve_external_request_id": True,
        "request_timeout": "0s",
        "stream_idle_timeout": "300s",
        "access_log": _access_log(config),
        "local_reply_config": _local_reply_config(config),
        "route_config": {
            "name": "ai_gateway",
            "virtual_hosts": [{"name": "ai_gateway", "domains": ["*"], "routes": routes(config)}],
        },
        "http_filters": http_filters(config),
    }
    if config.authorization is not None:
        hcm["early_header_mutation_extensions"] = _strip_caller_headers()
    return {
        "admin": {"address": _socket_address("127.0.0.1", envoy.admin_port)},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": RUNTIME_FLAGS}]},
        "grpc_async_client_manager_config": GRPC_CLIENT_CACHE,
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {"@type": _DOWNSTREAM_CONNECTIONS, "max_active_downstream_connections": 50000},
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "ai_gateway",
                    "address": _socket_address(envoy.listen_address, envoy.listen_port),
                    # Envoy buffers the request body for the processor; allow the configured limit.
                    "per_connection_buffer_limit_bytes": body_limit,
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": clusters(config, ca_file),
        },
    }


def fragment(config: GatewayConfig, ca_file: str = DEFAULT_CA_FILE) -> dict[str, Any]:
    """The pieces a user adds to an Envoy they already run (filters, routes, clusters, and the
    OTLP access logger for the HTTP connection manager's access_log when configured)."""
    extra = {"access_log": _otlp_access_log(config)} if config.telemetry.access_log.otlp is not None else {}
    return {
        **extra,
        "http_filters": http_filters(config),
        "routes": routes(config),
        "clusters": clusters(config, ca_file),
        "local_reply_config": _local_reply_config(config),
        "runtime": dict(RUNTIME_FLAGS),  # belongs in the bootstrap's layered_runtime static layer
        # belongs in the bootstrap, with the runtime flag: one is not safe without the other
        "grpc_async_client_manager_config": dict(GRPC_CLIENT_CACHE),
    }


def to_yaml(data: dict[str, Any], header: str = "") -> str:
    return header + yaml.safe_dump(data, sort_keys=False, width=120)


BUNDLED_HEADER = (
    "# Rendered by `extproc envoy-config --demo --workers 2` from the built-in demo config (`extproc run`\n"
    "# renders for the machine's core count). Do not edit by hand:\n"
    "# change the gateway config and run `make envoy-config` (a test keeps this file in sync).\n"
)
