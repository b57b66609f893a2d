"""Every rendered Envoy config parses into Envoy's own protobuf messages (xds-protos).

`json_format.ParseDict` rejects an unknown field, a wrong enum name or a malformed
duration anywhere in the tree, `typed_config` contents included (an `Any` is parsed as
the message its `@type` names), so a misspelled field fails here in a second instead of
in the integration tests' `envoy --mode validate` or at Envoy's start. What protobuf
cannot see (PGV rules such as "at least one", extensions Envoy has not compiled in) is
left to those tests.

Covers the bootstrap (`extproc envoy-config`, `extproc run`, envoy/envoy.yaml) and each
piece of the `--fragment` output, for configs that between them use every `@type` the
renderer has.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The message types the renderer puts under "@type": importing a *_pb2 module registers its
# messages with protobuf's default pool, which ParseDict asks for each Any. Every type URL
# Envoy 1.40 is given by this renderer is in xds-protos, so no subtree is skipped (the OpenTelemetry
# access logger's newer `grpc_service`/`log_name` fields are checked in their older spelling, see
# `older_otel_log_shape`).
import envoy.extensions.access_loggers.filters.cel.v3.cel_pb2  # noqa: F401
import envoy.extensions.access_loggers.open_telemetry.v3.logs_service_pb2  # noqa: F401
import envoy.extensions.access_loggers.stream.v3.stream_pb2  # noqa: F401
import envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2  # noqa: F401
import envoy.extensions.filters.http.jwt_authn.v3.config_pb2  # noqa: F401
import envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2  # noqa: F401
import envoy.extensions.filters.http.ratelimit.v3.rate_limit_pb2  # noqa: F401
import envoy.extensions.filters.http.router.v3.router_pb2  # noqa: F401
import envoy.extensions.filters.http.upstream_codec.v3.upstream_codec_pb2  # noqa: F401
import envoy.extensions.http.early_header_mutation.header_mutation.v3.header_mutation_pb2  # noqa: F401
import envoy.extensions.resource_monitors.downstream_connections.v3.downstream_connections_pb2  # noqa: F401
import envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2  # noqa: F401
import envoy.extensions.retry.priority.previous_priorities.v3.previous_priorities_config_pb2  # noqa: F401
import envoy.extensions.transport_sockets.raw_buffer.v3.raw_buffer_pb2  # noqa: F401
import envoy.extensions.transport_sockets.tls.v3.tls_pb2  # noqa: F401
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message import Message

from extproc import envoyconfig
from extproc.config import GatewayConfig, load_config, parse_config
from extproc.config_defaults import demo_config_data

ROOT = Path(__file__).resolve().parents[2]
TYPE_URL_PREFIX = "type.googleapis.com/"


# -- the configs -----------------------------------------------------------------------------------


def _demo() -> GatewayConfig:
    """What `make envoy-config` renders into envoy/envoy.yaml (`--demo --workers 2`)."""
    return parse_config({**demo_config_data(), "processor": {"workers": 2}})


def _example() -> GatewayConfig:
    return load_config(ROOT / "examples" / "gateway.yaml", with_secrets=False).config


def _every_schema_and_fallback() -> GatewayConfig:
    """Upstream-stage filters for translated APIs, and a priority cluster mixing TLS and plain."""
    return parse_config({
        "backends": [
            {"name": "oa", "base_url": "https://api.openai.com/v1", "api_key": {"env": "X"},
             "headers": {"OpenAI-Organization": "org"}, "request_timeout_seconds": 30, "idle_timeout_seconds": 90},
            {"name": "claude", "schema": "anthropic", "base_url": "https://api.anthropic.com", "api_key": {"env": "X"}},
            {"name": "br", "schema": "aws_bedrock", "aws": {"region": "us-west-2"}},
            {"name": "az", "schema": "azure_openai", "base_url": "https://r.openai.azure.com", "api_key": {"env": "X"},
             "api_version": "2024-10-21", "deployment": "gpt-4o-prod"},
            {"name": "local", "base_url": "http://127.0.0.1:8080/v1", "model_name_override": "llama"},
        ],
        "routes": [
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
            {"name": "exact", "match": {"model": ["gpt-4o", "gpt-4o-mini"]}, "backends": [{"name": "oa"}]},
            {"name": "weighted", "match": {"prefix": "llama-"}, "request_timeout_seconds": 120,
             "backends": [{"name": "local", "weight": 9}, {"name": "oa", "weight": 1}]},
            {"name": "rest", "default": True, "backends": [
                {"name": "oa"}, {"name": "az", "priority": 1}, {"name": "br", "priority": 2},
                {"name": "local", "priority": 2, "weight": 3}]},
        ],
    })


def _mcp() -> GatewayConfig:
    return parse_config({
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:8000/v1"}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "tenancy": {"header": "x-tenant-id"},
        "budgets": [{"name": "calls", "tool": "github__search", "cost": "mcp_tool_call", "unit": "hour", "limit": 100}],
        "mcp": {
            "port": 1065,
            "request_timeout_seconds": 900,
            "servers": [
                {"name": "github", "url": "https://mcp.example.com/mcp", "api_key": {"env": "GITHUB_MCP_TOKEN"}},
                {"name": "search", "url": "http://127.0.0.1:8931/mcp", "headers": {"x-team": "a"}},
            ],
            "routes": [
                {"path": "/mcp", "servers": ["github", "search"], "deny_tools": ["github__delete_*"]},
                {"path": "/mcp/search", "servers": ["search"], "allow_tools": ["search__*"]},
            ],
        },
    })


def _rate_limits(ratelimit: dict[str, Any]) -> GatewayConfig:
    return parse_config({
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:8000/v1"}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "tenancy": {"header": "x-tenant-id", "default_tenant": "free"},
        "costs": [{"metadata_key": "micro_usd", "type": "cel", "cel": "double(total_tokens) * 2.0"}],
        "budgets": [
            {"name": "tpm", "unit": "minute", "limit": 1000},
            {"name": "gold", "tenant": "gold", "model": "gpt-4o", "unit": "day", "limit": 5, "cost": "micro_usd"},
        ],
        "request_limits": [{"unit": "minute", "requests": 60}, {"tenant": "gold", "unit": "second", "requests": 5}],
        "ratelimit": ratelimit,
    })


def _telemetry() -> GatewayConfig:
    """Costs (each an access-log field), telemetry and metadata settings, a unix-socket
    processor with several workers that Envoy may skip when it fails."""
    return parse_config({
        "backends": [{"name": "a", "base_url": "https://api.example.com/v1"}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "costs": [
            {"metadata_key": "input", "type": "input_token"},
            {"metadata_key": "cached", "type": "cached_input_token"},
            {"metadata_key": "reasoning", "type": "reasoning_token"},
            {"metadata_key": "weighted", "type": "cel", "cel": "input_tokens + output_tokens * 4"},
        ],
        "usage": {"estimate_when_missing": True},
        "metadata": {"session_id_header": "x-session"},
        "telemetry": {"metric_header_attributes": {"x-team": "team"}, "user_id_header": "x-user",
                      "access_log": {"otlp": {"endpoint": "otel-collector.observability:4317",
                                              "headers": {"authorization": "Bearer t"},
                                              "resource_attributes": {"service.name": "ai-gateway"}}}},
        "limits": {"max_request_body_bytes": 64 * 1024 * 1024},
        "processor": {"grpc_address": "unix:/tmp/extproc.sock", "workers": 3, "failure_mode_allow": True,
                      "message_timeout_ms": 250},
        "envoy": {"listen_address": "0.0.0.0", "listen_port": 0},
    })


def _authorization() -> GatewayConfig:
    """Per-tenant authorization: Envoy drops clients' copies of the caller headers early."""
    data = _mcp().model_dump(mode="json", by_alias=True, exclude_none=True)
    data["authorization"] = {"tenants": {"*": {"models": ["gpt-*"], "tools": ["search__*"]}}}
    return parse_config(data)


def _jwt() -> GatewayConfig:
    """JWT providers (remote JWKS over https and http, optional tokens) with MCP paths."""
    data = _mcp().model_dump(mode="json", by_alias=True, exclude_none=True)
    data["auth"] = {"jwt": {"required": False, "providers": [
        {"name": "corp", "issuer": "https://login.example.com", "audiences": ["gw"],
         "jwks_uri": "https://login.example.com/.well-known/jwks.json", "tenant_claim": "org.id"},
        {"name": "dev", "issuer": "http://dev-idp", "jwks_uri": "http://127.0.0.1:8088/jwks", "cache_seconds": 5},
    ]}}
    return parse_config(data)


CONFIGS: dict[str, Callable[[], GatewayConfig]] = {
    "authorization": _authorization,
    "jwt": _jwt,
    "demo": _demo,
    "example": _example,
    "every-schema-and-fallback": _every_schema_and_fallback,
    "mcp": _mcp,
    "rate-limits-builtin": lambda: _rate_limits({}),
    "rate-limits-external": lambda: _rate_limits(
        {"address": "ratelimit.internal:8081", "reserve": True, "failure_mode": "closed", "timeout_ms": 100}
    ),
    "telemetry": _telemetry,
}


# -- helpers -----------------------------------------------------------------------------------------


def as_envoy_reads_it(data: dict[str, Any]) -> Any:
    """The data as Envoy gets it: dumped to YAML and read back."""
    return yaml.safe_load(envoyconfig.to_yaml(data))


def type_urls(tree: Any) -> Iterator[str]:
    """Every `@type` in a rendered tree."""
    if isinstance(tree, dict):
        if "@type" in tree:
            yield tree["@type"]
        for value in tree.values():
            yield from type_urls(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from type_urls(value)


def assert_types_known(tree: Any) -> None:
    """Each `@type` names a message protobuf can parse, so ParseDict checks its fields."""
    pool = descriptor_pool.Default()
    for url in type_urls(tree):
        assert url.startswith(TYPE_URL_PREFIX), url
        name = url.removeprefix(TYPE_URL_PREFIX)
        try:
            pool.FindMessageTypeByName(name)
        except KeyError:
            pytest.fail(
                f"{url} is not registered: import its *_pb2 module (package {name.rsplit('.', 1)[0]}) "
                "at the top of this file, or, if xds-protos lacks it, skip that subtree here saying why"
            )


_OTEL_LOG = TYPE_URL_PREFIX + "envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig"


def older_otel_log_shape(tree: Any) -> Any:
    """The tree with each OpenTelemetry access logger's `grpc_service` and `log_name` (Envoy 1.40,
    not in xds-protos 1.85) moved into `common_config`, the older message with the same fields
    (a GrpcService, a log name), so ParseDict still checks every field of the logger."""
    if isinstance(tree, list):
        return [older_otel_log_shape(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    out = {k: older_otel_log_shape(v) for k, v in tree.items()}
    if out.get("@type") == _OTEL_LOG and "grpc_service" in out:
        out["common_config"] = {"grpc_service": out.pop("grpc_service"), "log_name": out.pop("log_name", ""),
                                "transport_api_version": "V3"}
    return out


def parse(data: Any, message: Message) -> Message:
    assert_types_known(data)
    data = older_otel_log_shape(data)
    return json_format.ParseDict(data, message)  # ignore_unknown_fields=False: a typo fails


# -- the bootstrap -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", CONFIGS.values(), ids=CONFIGS.keys())
def test_bootstrap_parses_as_envoy_bootstrap(make: Callable[[], GatewayConfig]) -> None:
    config = make()
    parsed = parse(as_envoy_reads_it(envoyconfig.render(config)), bootstrap_pb2.Bootstrap())
    assert isinstance(parsed, bootstrap_pb2.Bootstrap)
    # Parsed, not just accepted: the listener and its typed HCM are there.
    (listener,) = parsed.static_resources.listeners
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.http_filters[-1].name == "envoy.filters.http.router"
    clusters = {c.name for c in parsed.static_resources.clusters}
    assert {envoyconfig.cluster_name(b.name) for b in config.backends} <= clusters


def test_bundled_envoy_yaml_parses_as_envoy_bootstrap() -> None:
    data = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    parse(data, bootstrap_pb2.Bootstrap())


# -- the --fragment pieces -----------------------------------------------------------------------------

# Where each piece goes in a user's Envoy, as the message it becomes there.
FRAGMENT_PIECES: dict[str, Callable[[Any], tuple[Any, Message]]] = {
    "http_filters": lambda v: ({"http_filters": v}, hcm_pb2.HttpConnectionManager()),
    "routes": lambda v: ({"name": "llm", "domains": ["*"], "routes": v}, route_components_pb2.VirtualHost()),
    "local_reply_config": lambda v: (v, hcm_pb2.LocalReplyConfig()),
    "runtime": lambda v: ({"name": "static", "static_layer": v}, bootstrap_pb2.RuntimeLayer()),
    "grpc_async_client_manager_config": lambda v: (v, bootstrap_pb2.Bootstrap.GrpcAsyncClientManagerConfig()),
    "access_log": lambda v: ({"access_log": v}, hcm_pb2.HttpConnectionManager()),  # only with an OTLP access log
}


@pytest.mark.parametrize("make", CONFIGS.values(), ids=CONFIGS.keys())
def test_fragment_pieces_parse_as_the_messages_they_become(make: Callable[[], GatewayConfig]) -> None:
    pieces = as_envoy_reads_it(envoyconfig.fragment(make()))
    assert set(FRAGMENT_PIECES) - {"access_log"} <= set(pieces) <= {*FRAGMENT_PIECES, "clusters"}, (
        "a new fragment piece needs its message here")
    for key, wrap in FRAGMENT_PIECES.items():
        if key not in pieces:
            continue
        data, message = wrap(pieces[key])
        parse(data, message)
    for cluster in pieces["clusters"]:
        parse(cluster, cluster_pb2.Cluster())


# -- the test itself ---------------------------------------------------------------------------------


def test_the_configs_use_every_type_the_renderer_has() -> None:
    """So a new filter or extension type is parsed here as soon as the renderer emits it."""
    in_source = set(re.findall(r"type\.googleapis\.com/[\w.]+", inspect.getsource(envoyconfig)))
    rendered = {url for make in CONFIGS.values() for url in type_urls(envoyconfig.render(make()))}
    assert in_source and in_source <= rendered, sorted(in_source - rendered)


def _router_config(bootstrap: dict[str, Any]) -> dict[str, Any]:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"][-1]["typed_config"]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda b: b["admin"].update(adress=b["admin"].pop("address")),  # top level
        lambda b: _router_config(b).update(suppress_envoy_header=True),  # inside an Any
        lambda b: b["static_resources"]["clusters"][0].update(lb_policy="ROUND_ROBBIN"),  # enum value
        lambda b: b["static_resources"]["clusters"][0].update(connect_timeout="5 seconds"),  # duration
        lambda b: _router_config(b).update({"@type": TYPE_URL_PREFIX + "envoy.NoSuchFilter"}),  # unknown type
    ],
    ids=["field", "field-in-any", "enum", "duration", "type-url"],
)
def test_a_spoiled_render_is_rejected(spoil: Callable[[dict[str, Any]], None]) -> None:
    """The check has teeth: each kind of mistake fails."""
    bootstrap = copy.deepcopy(envoyconfig.render(_demo()))
    spoil(bootstrap)
    with pytest.raises((json_format.ParseError, pytest.fail.Exception)):
        parse(bootstrap, bootstrap_pb2.Bootstrap())


def test_a_spoiled_otlp_access_logger_is_rejected() -> None:
    """The OpenTelemetry logger is checked too, its gRPC service included, after the reshaping."""
    bootstrap = copy.deepcopy(envoyconfig.render(_telemetry()))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (otel,) = [log["typed_config"] for log in hcm["access_log"] if log["typed_config"]["@type"] == _OTEL_LOG]
    otel["grpc_service"]["envoy_grpc"]["cluster"] = otel["grpc_service"]["envoy_grpc"].pop("cluster_name")
    with pytest.raises(json_format.ParseError):
        parse(bootstrap, bootstrap_pb2.Bootstrap())
