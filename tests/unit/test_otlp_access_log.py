"""telemetry.access_log.otlp: the config it takes and the Envoy OpenTelemetry access logger it renders."""

from __future__ import annotations

from typing import Any

import pytest

from extproc import envoyconfig
from extproc.config import GatewayConfig, parse_config
from extproc.config_base import ConfigError

_OTEL = "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig"


def _config(otlp: dict[str, Any] | None = None, **extra: Any) -> GatewayConfig:
    data: dict[str, Any] = {
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:8000/v1"}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "processor": {"workers": 1},
        **extra,
    }
    if otlp is not None:
        data["telemetry"] = {"access_log": {"otlp": otlp}}
    return parse_config(data)


def _loggers(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return list(hcm["access_log"])


def _key_values(kvs: dict[str, Any]) -> dict[str, str]:
    return {kv["key"]: kv["value"]["string_value"] for kv in kvs["values"]}


def test_without_otlp_only_the_stdout_log_is_rendered() -> None:
    bootstrap = envoyconfig.render(_config())
    assert [log["name"] for log in _loggers(bootstrap)] == ["envoy.access_loggers.stdout"]
    assert envoyconfig.OTLP_LOGS_CLUSTER not in {c["name"] for c in bootstrap["static_resources"]["clusters"]}
    assert "access_log" not in envoyconfig.fragment(_config())


def test_otlp_logger_has_every_json_field_as_an_attribute_and_its_collector_cluster() -> None:
    config = _config(
        {"endpoint": "otel-collector:4317", "headers": {"Authorization": "Bearer t"},
         "resource_attributes": {"service.name": "ai-gateway"}},
        costs=[{"metadata_key": "micro_usd", "type": "cel", "cel": "double(total_tokens) * 2.0"}],
    )
    bootstrap = envoyconfig.render(config)
    stdout, otel = _loggers(bootstrap)
    assert stdout["name"] == "envoy.access_loggers.stdout"  # the JSON log stays
    assert otel["name"] == "envoy.access_loggers.open_telemetry"
    typed = otel["typed_config"]
    assert typed["@type"] == _OTEL
    fields = stdout["typed_config"]["log_format"]["json_format"]
    assert _key_values(typed["attributes"]) == fields
    assert {"input_tokens", "output_tokens", "cost_micro_usd", "ttft_ms", "mcp_tool_name", "trace_id", "span_id",
            "tenant", "error_type", "backend_name"} <= set(fields)
    assert fields["trace_id"] == "%DYNAMIC_METADATA(io.envoy.ai_gateway:trace_id)%"
    assert _key_values(typed["resource_attributes"]) == {"service.name": "ai-gateway"}
    grpc_service = typed["grpc_service"]
    assert grpc_service["envoy_grpc"] == {"cluster_name": envoyconfig.OTLP_LOGS_CLUSTER}
    assert grpc_service["initial_metadata"] == [{"key": "authorization", "value": "Bearer t"}]  # gRPC keys: lowercase

    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    collector = clusters[envoyconfig.OTLP_LOGS_CLUSTER]
    assert collector["type"] == "STRICT_DNS"
    (endpoint,) = collector["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "otel-collector", "port_value": 4317}
    assert "http2_protocol_options" in str(collector["typed_extension_protocol_options"])

    pieces = envoyconfig.fragment(config)  # an existing Envoy gets the logger and the cluster too
    assert pieces["access_log"] == [otel]
    assert envoyconfig.OTLP_LOGS_CLUSTER in {c["name"] for c in pieces["clusters"]}


def test_an_ipv6_collector_address() -> None:
    bootstrap = envoyconfig.render(_config({"endpoint": "[::1]:4317"}))
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    (endpoint,) = clusters[envoyconfig.OTLP_LOGS_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "::1", "port_value": 4317}
    assert "initial_metadata" not in _loggers(bootstrap)[1]["typed_config"]["grpc_service"]
    assert "resource_attributes" not in _loggers(bootstrap)[1]["typed_config"]


@pytest.mark.parametrize(
    ("otlp", "message"),
    [
        ({"endpoint": "http://collector:4317"}, "is not host:port"),
        ({"endpoint": "collector"}, "is not host:port"),
        ({"endpoint": "collector:0"}, "is not host:port"),
        ({"endpoint": "collector:70000"}, "is not host:port"),
        ({"endpoint": "collector:4317", "headers": {"bad key": "v"}}, "is not a gRPC metadata key"),
        ({"endpoint": "collector:4317", "headers": {"x-token-bin": "v"}}, "is not a gRPC metadata key"),
        ({"endpoint": "collector:4317", "headers": {"x-token": "s3cret\nb"}}, "header 'x-token' is not printable"),
        ({"endpoint": "collector:4317", "protocol": "http"}, "otlp.protocol: unknown field"),
        ({}, "otlp.endpoint: required field is missing"),
    ],
)
def test_bad_otlp_settings_are_refused_with_a_clear_message(otlp: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        _config(otlp)
    assert "s3cret" not in str(refused.value)  # a header value (a token) is never echoed
