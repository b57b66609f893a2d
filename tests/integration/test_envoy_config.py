"""The rendered Envoy config is what the real Envoy binary accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import envoyconfig
from extproc.config import parse_config
from extproc.config_defaults import demo_config_data
from extproc.launcher import bundled_envoy

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "envoy" / "envoy.yaml"


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bundled_envoy()), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
        capture_output=True, text=True, timeout=120,
    )


def test_bundled_envoy_yaml_is_the_render_of_the_demo_config() -> None:
    rendered = subprocess.run(
        [sys.executable, "-m", "extproc", "envoy-config", "--demo", "--workers", "2"], capture_output=True, text=True,
        check=True,
    ).stdout
    assert BUNDLED.read_text() == rendered, "envoy/envoy.yaml is stale: run `make envoy-config`"


def test_bundled_envoy_yaml_validates() -> None:
    result = _validate(BUNDLED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_with_tls_prefix_and_unix_socket_validates(tmp_path: Path) -> None:
    config = parse_config({
        "backends": [
            {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key": {"env": "X"}},
            {"name": "proxy", "base_url": "http://127.0.0.1:8080/prefix/v1", "model_name_override": "m",
             "request_timeout_seconds": 600, "idle_timeout_seconds": 30},
        ],
        "routes": [
            {"name": "gpt", "match": {"glob": "gpt-*"}, "backends": [{"name": "openai", "weight": 3}, {"name": "proxy"}]},
            {"name": "rest", "default": True, "backends": [{"name": "proxy"}]},
        ],
        "processor": {"grpc_address": "unix:/tmp/extproc-test.sock"},
    })
    path = tmp_path / "envoy.yaml"
    path.write_text(envoyconfig.to_yaml(envoyconfig.render(config)))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def _users_envoy(pieces: dict[str, Any], **connection_manager: Any) -> dict[str, Any]:
    """A user's own listener and clusters with the fragment's filters, routes and clusters in
    place; `connection_manager`: more of the fragment's HttpConnectionManager settings."""
    return {
        "static_resources": {
            "listeners": [{
                "name": "users_listener",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 18080}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "users",
                        **connection_manager,
                        "route_config": {"virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": pieces["routes"]}]},
                        "http_filters": pieces["http_filters"],
                    },
                }]}],
            }],
            "clusters": pieces["clusters"],
        }
    }


def test_fragment_pieces_fit_into_a_users_envoy(tmp_path: Path) -> None:
    """The documented attach path: a user's own listener + our filter/route/cluster pieces."""
    config = parse_config(demo_config_data())
    pieces = envoyconfig.fragment(config)
    users_envoy = {
        "layered_runtime": {"layers": [{"name": "static", "static_layer": pieces["runtime"]}]},
        "grpc_async_client_manager_config": pieces["grpc_async_client_manager_config"],
        **_users_envoy(pieces, local_reply_config=pieces["local_reply_config"]),
    }
    path = tmp_path / "users-envoy.yaml"
    path.write_text(yaml.safe_dump(users_envoy))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("flag", ["--fragment", "--demo"])
def test_envoy_config_cli_prints_yaml(flag: str) -> None:
    out = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", flag], capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout)


def test_example_config_renders_to_a_valid_envoy_config(tmp_path: Path) -> None:
    from extproc.config import load_config

    loaded = load_config(ROOT / "examples" / "gateway.yaml", with_secrets=False)
    path = tmp_path / "envoy.yaml"
    path.write_text(envoyconfig.to_yaml(envoyconfig.render(loaded.config)))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("ratelimit", [{}, {"address": "127.0.0.1:8081", "reserve": True, "failure_mode": "closed"}])
def test_budgets_and_request_limits_render_a_valid_envoy_config(tmp_path: Path, ratelimit: dict) -> None:
    config = parse_config({
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:8000/v1"}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "tenancy": {"header": "x-tenant-id"},
        "costs": [{"metadata_key": "micro_usd", "type": "cel", "cel": "double(total_tokens) * 2.0"}],
        "budgets": [
            {"name": "tpm", "unit": "minute", "limit": 1000},
            {"name": "gold", "tenant": "gold", "model": "gpt-4o", "unit": "day", "limit": 5, "cost": "micro_usd"},
        ],
        "request_limits": [{"unit": "minute", "requests": 60}, {"tenant": "gold", "unit": "second", "requests": 5}],
        "ratelimit": ratelimit,
    })
    path = tmp_path / "envoy.yaml"
    path.write_text(envoyconfig.to_yaml(envoyconfig.render(config)))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_provider_schema_and_a_tls_fallback_route_validate(tmp_path: Path) -> None:
    """Upstream-stage filters, a mixed plain/TLS priority cluster and its retry policy."""
    config = parse_config({
        "backends": [
            {"name": "oa", "base_url": "https://api.openai.com/v1", "api_key": {"env": "X"}},
            {"name": "claude", "schema": "anthropic", "base_url": "https://api.anthropic.com", "api_key": {"env": "X"}},
            {"name": "br", "schema": "aws_bedrock", "aws": {"region": "us-west-2"}},
            {"name": "az", "schema": "azure_openai", "base_url": "https://r.openai.azure.com", "api_key": {"env": "X"},
             "api_version": "2024-10-21"},
            {"name": "local", "base_url": "http://127.0.0.1:8080/v1"},
        ],
        "routes": [
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
            {"name": "rest", "default": True, "backends": [
                {"name": "oa"}, {"name": "az", "priority": 1}, {"name": "br", "priority": 2},
                {"name": "local", "priority": 2, "weight": 3}]},
        ],
    })
    path = tmp_path / "envoy.yaml"
    path.write_text(envoyconfig.to_yaml(envoyconfig.render(config)))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_jwt_providers_render_a_valid_envoy_config(tmp_path: Path) -> None:
    """A local JWKS file and a remote one over TLS (its own cluster), in the bootstrap."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", '
                    '"x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", '
                    '"y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}')
    config = parse_config({
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:8000/v1"}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "auth": {"jwt": {"required": False, "providers": [
            {"name": "file", "issuer": "https://a.example.com", "jwks_file": str(jwks)},
            {"name": "idp", "issuer": "https://login.example.com", "audiences": ["gw", "api"],
             "jwks_uri": "https://login.example.com/.well-known/jwks.json", "tenant_claim": "org.id"},
        ]}},
        "budgets": [{"name": "tpm", "unit": "minute", "limit": 1000}],
    })
    path = tmp_path / "envoy.yaml"
    path.write_text(envoyconfig.to_yaml(envoyconfig.render(config)))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_otlp_access_log_validates_in_the_bootstrap_and_the_fragment(tmp_path: Path) -> None:
    """Envoy 1.40 itself accepts the OpenTelemetry access logger (whose newest fields xds-protos lacks)."""
    data = demo_config_data()
    data["telemetry"] = {"access_log": {"otlp": {
        "endpoint": "otel-collector.observability:4317", "headers": {"authorization": "Bearer t"},
        "resource_attributes": {"service.name": "ai-gateway"}}}}
    config = parse_config(data)
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(envoyconfig.to_yaml(envoyconfig.render(config)))
    result = _validate(bootstrap)
    assert result.returncode == 0, result.stdout + result.stderr

    pieces = envoyconfig.fragment(config)
    users_envoy = _users_envoy(pieces, access_log=pieces["access_log"])
    path = tmp_path / "users-envoy.yaml"
    path.write_text(yaml.safe_dump(users_envoy))
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
