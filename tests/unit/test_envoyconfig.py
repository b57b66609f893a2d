"""Envoy config rendering: what the bundled Envoy is told to do with each backend."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

# Importing these registers the typed_config types with protobuf, so a rendered
# bootstrap can be parsed against Envoy's own schema (field names, enums, durations).
import envoy.extensions.access_loggers.filters.cel.v3.cel_pb2  # noqa: F401
import envoy.extensions.access_loggers.stream.v3.stream_pb2  # noqa: F401
import envoy.extensions.filters.http.ext_proc.v3.ext_proc_pb2  # noqa: F401
import envoy.extensions.filters.http.router.v3.router_pb2  # noqa: F401
import envoy.extensions.filters.http.upstream_codec.v3.upstream_codec_pb2  # noqa: F401
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2  # noqa: F401
import envoy.extensions.resource_monitors.downstream_connections.v3.downstream_connections_pb2  # noqa: F401
import envoy.extensions.transport_sockets.tls.v3.tls_pb2  # noqa: F401
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import duration_pb2, json_format
from hypothesis import example, given
from hypothesis import strategies as st

from extproc.config import GatewayConfig, parse_config
from extproc.envoyconfig import fragment, render, to_yaml

NAMESPACE = "io.envoy.ai_gateway"


def gateway(**overrides: Any) -> GatewayConfig:
    data: dict[str, Any] = {
        "backends": [
            {"name": "openai", "base_url": "https://api.openai.com/v1"},
            {"name": "local", "base_url": "http://llm.internal:8080/proxy/v1"},
            {"name": "secure", "base_url": "https://secure.example.com:8443/v1", "request_timeout_seconds": 45},
            {"name": "plain", "base_url": "http://plain.example.com/v1", "idle_timeout_seconds": 90},
        ],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "openai"}]}],
    }
    data.update(overrides)
    # One processor worker unless a test says otherwise (the default follows the core count).
    data["processor"] = {"workers": 1, **data.get("processor", {})}
    return parse_config(data)


CONFIG = gateway()
HTTPS = {"openai": "api.openai.com", "secure": "secure.example.com"}
HTTP = {"local": "llm.internal", "plain": "plain.example.com"}


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def listener(bootstrap: dict[str, Any]) -> dict[str, Any]:
    (only,) = bootstrap["static_resources"]["listeners"]
    return only


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener(bootstrap)["filter_chains"]
    (network_filter,) = chain["filters"]
    return network_filter["typed_config"]


def clusters_by_name(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def all_routes(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    (vhost,) = hcm(bootstrap)["route_config"]["virtual_hosts"]
    return vhost["routes"]


def backend_route(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    """The route Envoy takes once the processor set x-ai-eg-backend: <name>."""
    matching = [
        r
        for r in all_routes(bootstrap)
        if {"name": "x-ai-eg-backend", "string_match": {"exact": name}} in r["match"].get("headers", [])
        and not r["name"].startswith("staged-")
    ]
    assert len(matching) == 1, matching
    return matching[0]


def only_endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb_endpoint,) = locality["lb_endpoints"]
    return lb_endpoint["endpoint"]["address"]


def ext_proc(bootstrap: dict[str, Any]) -> dict[str, Any]:
    (found,) = [f for f in hcm(bootstrap)["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    return found["typed_config"]


# -- clusters -----------------------------------------------------------------------------


def test_one_cluster_per_backend() -> None:
    names = [c["name"] for c in render(CONFIG)["static_resources"]["clusters"]]
    assert sorted(n for n in names if n.startswith("backend-")) == sorted(f"backend-{b.name}" for b in CONFIG.backends)
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("name", "host", "port"),
    [("openai", "api.openai.com", 443), ("local", "llm.internal", 8080), ("secure", "secure.example.com", 8443), ("plain", "plain.example.com", 80)],
)
def test_cluster_endpoint_is_backend_host_and_port(name: str, host: str, port: int) -> None:
    address = only_endpoint(clusters_by_name(render(CONFIG))[f"backend-{name}"])
    assert address == {"socket_address": {"address": host, "port_value": port}}


@pytest.mark.parametrize(("name", "host"), sorted(HTTPS.items()))
def test_https_backend_uses_tls_with_sni_and_san_check(name: str, host: str) -> None:
    socket = clusters_by_name(render(CONFIG))[f"backend-{name}"]["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    tls = socket["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    assert tls["sni"] == host
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": host}}]
    assert validation["trusted_ca"]["filename"]


def test_ca_file_is_configurable() -> None:
    cluster = clusters_by_name(render(CONFIG, ca_file="/etc/my-ca.pem"))["backend-openai"]
    validation = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/my-ca.pem"}


@pytest.mark.parametrize("name", sorted(HTTP))
def test_http_backend_has_no_tls(name: str) -> None:
    cluster = clusters_by_name(render(CONFIG))[f"backend-{name}"]
    assert "transport_socket" not in cluster
    assert "tls" not in yaml.safe_dump(cluster).lower()


# -- routes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["openai", "local", "secure", "plain"])
def test_route_per_backend_selected_by_header(name: str) -> None:
    route = backend_route(render(CONFIG), name)
    assert route["route"]["cluster"] == f"backend-{name}"
    assert {"x-ai-eg-model", "x-ai-eg-backend"} <= set(route["request_headers_to_remove"])


@pytest.mark.parametrize(
    ("name", "authority"),
    [
        ("openai", "api.openai.com"),
        ("local", "llm.internal:8080"),
        ("secure", "secure.example.com:8443"),
        ("plain", "plain.example.com"),
    ],
)
def test_host_rewritten_to_backend_authority(name: str, authority: str) -> None:
    """Default ports are left out of Host; non-default ports are kept."""
    assert backend_route(render(CONFIG), name)["route"]["host_rewrite_literal"] == authority


def test_backend_routes_come_before_any_catch_all() -> None:
    """A route without the backend header must not shadow the backend routes."""
    routes = all_routes(render(CONFIG))
    header_routes = [i for i, r in enumerate(routes) if r["match"].get("headers")]
    other_routes = [i for i, r in enumerate(routes) if not r["match"].get("headers")]
    openai = [b for b in CONFIG.backends if b.schema_.value == "openai"]
    assert len(header_routes) == len(CONFIG.backends) + len(openai)  # + each OpenAI backend's staged route
    assert all(i < j for i in header_routes for j in other_routes)


def test_route_timeout_disabled_by_default() -> None:
    """No whole-request cut-off: long streamed completions must not be killed."""
    action = backend_route(render(CONFIG), "openai")["route"]
    assert seconds(action["timeout"]) == 0
    assert seconds(hcm(render(CONFIG))["request_timeout"]) == 0


def test_route_timeouts_from_config() -> None:
    bootstrap = render(CONFIG)
    assert seconds(backend_route(bootstrap, "secure")["route"]["timeout"]) == 45
    assert seconds(backend_route(bootstrap, "plain")["route"]["idle_timeout"]) == 90
    assert seconds(backend_route(bootstrap, "openai")["route"]["idle_timeout"]) > 0


# -- ext_proc filter ---------------------------------------------------------------------------------


def test_ext_proc_runs_before_router() -> None:
    names = [f["name"] for f in hcm(render(CONFIG))["http_filters"]]
    assert names.index("envoy.filters.http.ext_proc") < names.index("envoy.filters.http.router")
    assert names[-1] == "envoy.filters.http.router"


def test_processing_modes() -> None:
    mode = ext_proc(render(CONFIG))["processing_mode"]
    assert mode["request_header_mode"] == "SEND"
    assert mode["request_body_mode"] == "BUFFERED"
    assert mode["response_header_mode"] == "SEND"
    assert mode["response_body_mode"] == "STREAMED"


def test_metadata_namespace_is_received() -> None:
    """Envoy fact 13: metadata outside receiving_namespaces is silently dropped."""
    untyped = ext_proc(render(CONFIG))["metadata_options"]["receiving_namespaces"]["untyped"]
    assert NAMESPACE in untyped


def test_ext_proc_points_at_processor_cluster_over_http2() -> None:
    bootstrap = render(CONFIG)
    cluster_name = ext_proc(bootstrap)["grpc_service"]["envoy_grpc"]["cluster_name"]
    cluster = clusters_by_name(bootstrap)[cluster_name]
    assert not cluster_name.startswith("backend-")
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert only_endpoint(cluster) == {"socket_address": {"address": "127.0.0.1", "port_value": 1063}}


def test_message_timeout_from_config() -> None:
    config = gateway(processor={"message_timeout_ms": 1500})
    filter_config = ext_proc(render(config))
    assert seconds(filter_config["message_timeout"]) == 1.5
    assert seconds(filter_config["max_message_timeout"]) >= 1.5
    assert filter_config["failure_mode_allow"] is False


@pytest.mark.parametrize("address", ["unix:/tmp/extproc.sock", "unix:///tmp/extproc.sock"])
def test_unix_socket_processor_renders_as_pipe(address: str) -> None:
    bootstrap = render(gateway(processor={"grpc_address": address}))
    cluster_name = ext_proc(bootstrap)["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert only_endpoint(clusters_by_name(bootstrap)[cluster_name]) == {"pipe": {"path": "/tmp/extproc.sock"}}


@pytest.mark.parametrize(
    ("address", "host", "port"), [("10.0.0.5:7000", "10.0.0.5", 7000), ("[::1]:1063", "::1", 1063), ("localhost:9", "localhost", 9)]
)
def test_tcp_processor_address_from_config(address: str, host: str, port: int) -> None:
    bootstrap = render(gateway(processor={"grpc_address": address}))
    cluster_name = ext_proc(bootstrap)["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert only_endpoint(clusters_by_name(bootstrap)[cluster_name]) == {
        "socket_address": {"address": host, "port_value": port}
    }


# -- listener and admin ---------------------------------------------------------------------------------


def test_listener_port_and_buffer_limit_from_config() -> None:
    config = gateway(
        envoy={"listen_address": "0.0.0.0", "listen_port": 18080, "admin_port": 19901},
        limits={"max_request_body_bytes": 2 * 1024 * 1024},
    )
    bootstrap = render(config)
    only = listener(bootstrap)
    assert only["address"] == {"socket_address": {"address": "0.0.0.0", "port_value": 18080}}
    # Envoy fact 9: a smaller buffer would make Envoy answer 413 below the configured limit.
    assert only["per_connection_buffer_limit_bytes"] >= 2 * 1024 * 1024
    assert bootstrap["admin"]["address"]["socket_address"]["port_value"] == 19901


def test_default_listener() -> None:
    bootstrap = render(parse_config({"backends": [{"name": "a", "base_url": "http://a/v1"}], "routes": [{"name": "d", "default": True, "backends": [{"name": "a"}]}]}))
    assert listener(bootstrap)["address"]["socket_address"]["port_value"] == 1975
    assert listener(bootstrap)["per_connection_buffer_limit_bytes"] >= 4 * 1024 * 1024
    assert bootstrap["admin"]["address"]["socket_address"]["port_value"] == 9901


# -- output form ------------------------------------------------------------------------------------------


def test_render_is_deterministic_and_yaml_round_trips() -> None:
    first, second = render(CONFIG), render(gateway())
    assert first == second
    assert to_yaml(first) == to_yaml(second)
    assert yaml.safe_load(to_yaml(first)) == first


def test_fragment_has_filters_routes_and_clusters() -> None:
    bootstrap = render(CONFIG)
    piece = fragment(CONFIG)
    assert piece["http_filters"] == hcm(bootstrap)["http_filters"]
    assert piece["routes"] == all_routes(bootstrap)
    assert piece["clusters"] == bootstrap["static_resources"]["clusters"]
    assert yaml.safe_load(to_yaml(piece)) == piece


# -- Envoy's schema --------------------------------------------------------------------------------------


def as_bootstrap(bootstrap: dict[str, Any]) -> bootstrap_pb2.Bootstrap:
    """Parse the rendered YAML with Envoy's protobuf types (what Envoy does before validating)."""
    return json_format.ParseDict(yaml.safe_load(to_yaml(bootstrap)), bootstrap_pb2.Bootstrap())


@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        gateway(processor={"grpc_address": "unix:/tmp/extproc.sock", "message_timeout_ms": 250}),
        gateway(limits={"max_request_body_bytes": 64 * 1024 * 1024}, envoy={"listen_port": 0}),
    ],
    ids=["default", "unix-socket", "limits"],
)
def test_render_parses_as_envoy_bootstrap(config: GatewayConfig) -> None:
    parsed = as_bootstrap(render(config))
    openai = [b for b in config.backends if b.schema_.value == "openai"]
    assert len(parsed.static_resources.clusters) == len(config.backends) + len(openai) + 1


timeouts = st.floats(min_value=0.001, max_value=10_000_000, allow_nan=False).map(lambda v: round(v, 3))


@example(request=0, idle=1_000_000)  # "no limit" spelled as a very long idle timeout
@example(request=2_592_000, idle=300)  # 30 days
@example(request=0, idle=0.00001)
@given(request=st.one_of(st.just(0.0), timeouts), idle=timeouts.filter(lambda v: v > 0))
def test_any_configured_timeout_renders_as_a_valid_duration(request: float, idle: float) -> None:
    """Every timeout the config accepts becomes a duration Envoy can parse, with its value kept."""
    config = gateway(
        backends=[
            {
                "name": "a",
                "base_url": "https://api.example.com/v1",
                "request_timeout_seconds": request,
                "idle_timeout_seconds": idle,
            }
        ],
        routes=[{"name": "d", "default": True, "backends": [{"name": "a"}]}],
    )
    action = backend_route(render(config), "a")["route"]
    for rendered, wanted in ((action["timeout"], request), (action["idle_timeout"], idle)):
        duration = duration_pb2.Duration()
        duration.FromJsonString(rendered)  # protobuf's JSON form: decimal seconds, no exponent
        assert abs(duration.ToTimedelta().total_seconds() - wanted) <= 0.001, (rendered, wanted)
    as_bootstrap(render(config))


def test_streams_are_spread_over_every_worker_and_rate_limits_go_to_worker_zero() -> None:
    config = gateway(
        processor={"grpc_address": "127.0.0.1:7000", "workers": 3},
        tenancy={"header": "x-tenant-id"},
        budgets=[{"name": "tpm", "unit": "minute", "limit": 10}],
    )
    by_name = clusters_by_name(render(config))
    endpoints = by_name["extproc"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]
    assert ports == [7000, 7010, 7020]
    assert by_name["extproc"]["lb_policy"] == "ROUND_ROBIN"
    assert only_endpoint(by_name["extproc-ratelimit"]) == {"socket_address": {"address": "127.0.0.1", "port_value": 7000}}


def test_a_worker_that_stops_answering_leaves_the_rotation() -> None:
    """Envoy health-checks every worker over gRPC, quickly, on the service the processor
    serves; with 1 of 3 workers answering that one takes every stream (Envoy's default
    panic threshold, 50%, would spread them over the hung ones too), and with none
    answering Envoy still tries them all."""
    from extproc.server import SERVICE_NAME

    bootstrap = render(gateway(processor={"workers": 3}))
    cluster = clusters_by_name(bootstrap)["extproc"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"] == {"service_name": SERVICE_NAME}
    assert seconds(check["timeout"]) <= 1 and seconds(check["interval"]) <= 1
    assert seconds(check["no_traffic_interval"]) <= 1  # Envoy's default is 60 s
    assert check["unhealthy_threshold"] * (seconds(check["interval"]) + seconds(check["timeout"])) <= 5
    assert check["healthy_threshold"] == 1
    # Envoy rounds the threshold to a whole percent and panics below it.
    panic = round(cluster["common_lb_config"]["healthy_panic_threshold"]["value"])
    assert 0 < panic <= 100 / 3
    (parsed,) = [c for c in as_bootstrap(bootstrap).static_resources.clusters if c.name == "extproc"]
    assert parsed.health_checks[0].grpc_health_check.service_name == SERVICE_NAME  # Envoy's schema takes it
    others = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] != "extproc"]
    assert not [c["name"] for c in others if "health_checks" in c]  # backends are not the processor's to check
    attach = fragment(gateway(processor={"workers": 3}))["clusters"]
    assert [c for c in attach if c["name"] == "extproc"] == [cluster]  # users attaching their Envoy get it too


def test_default_ports_give_every_worker_its_own_grpc_and_admin_port() -> None:
    from extproc.workers import worker_addresses

    addresses = worker_addresses(gateway().processor, 4)
    grpc = [int(a.grpc_address.rpartition(":")[2]) for a in addresses]
    admin = [a.admin_port for a in addresses]
    assert grpc == [1063, 1073, 1083, 1093] and admin == [1064, 1074, 1084, 1094]
    assert not set(grpc) & set(admin)


def test_colliding_worker_ports_are_refused() -> None:
    from extproc.config import ConfigError
    from extproc.workers import worker_addresses

    settings = gateway(processor={"grpc_address": "127.0.0.1:5000", "admin_port": 5010}).processor
    with pytest.raises(ConfigError, match="collide"):
        worker_addresses(settings, 2)


# -- providers and fallback ---------------------------------------------------------------


def _providers() -> GatewayConfig:
    return parse_config({
        "backends": [
            {"name": "oa", "base_url": "https://api.openai.com/v1"},
            {"name": "claude", "schema": "anthropic", "base_url": "https://api.anthropic.com", "api_key": {"env": "X"}},
            {"name": "local", "base_url": "http://127.0.0.1:8080/v1"},
        ],
        "routes": [
            {"name": "claude", "match": {"glob": "claude-*"}, "backends": [{"name": "claude"}]},
            {"name": "rest", "default": True, "backends": [
                {"name": "oa", "weight": 2}, {"name": "local", "priority": 1}, {"name": "claude", "priority": 1}]},
        ],
    })


def _by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def test_only_translated_backends_get_the_upstream_stage() -> None:
    clusters = _by_name(render(_providers())["static_resources"]["clusters"])
    options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    claude = clusters["backend-claude"]["typed_extension_protocol_options"][options]
    assert [f["name"] for f in claude["http_filters"]] == ["envoy.filters.http.ext_proc", "envoy.filters.http.upstream_codec"]
    ext_proc = claude["http_filters"][0]["typed_config"]
    assert ext_proc["request_attributes"] == ["xds.upstream_host_metadata"]
    assert ext_proc["metadata_options"]["forwarding_namespaces"]["untyped"] == [NAMESPACE]
    assert ext_proc["mutation_rules"] == {"allow_all_routing": True}
    # OpenAI backends on single-priority routes keep the one-stage fast path.
    assert "http_filters" not in clusters["backend-oa"]["typed_extension_protocol_options"][options]
    # ... and a staged twin for the clients that need translation (an Anthropic client).
    staged = clusters["staged-oa"]
    assert staged["load_assignment"] == {**clusters["backend-oa"]["load_assignment"], "cluster_name": "staged-oa"}
    assert staged["typed_extension_protocol_options"][options]["http_filters"] == claude["http_filters"]
    assert "staged-claude" not in clusters


def test_the_stage_header_sends_a_request_to_an_openai_backends_staged_cluster() -> None:
    routes = _by_name(render(_providers())["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]["routes"])
    names = list(routes)
    staged, plain = routes["staged-oa"], routes["backend-oa"]
    assert names.index("staged-oa") < names.index("backend-oa")  # Envoy takes the first match
    assert staged["match"]["headers"] == [*plain["match"]["headers"], {"name": "x-ai-eg-stage", "present_match": True}]
    assert staged["route"] == {**plain["route"], "cluster": "staged-oa"}
    assert "x-ai-eg-stage" in staged["request_headers_to_remove"]


def test_fallback_route_is_one_cluster_by_priority_with_a_retry_policy() -> None:
    bootstrap = render(_providers())
    cluster = _by_name(bootstrap["static_resources"]["clusters"])["route-rest"]
    levels = cluster["load_assignment"]["endpoints"]
    assert [lvl["priority"] for lvl in levels] == [0, 1]
    assert [e["metadata"]["filter_metadata"][NAMESPACE]["backend"] for e in levels[0]["lb_endpoints"]] == ["oa"]
    assert [e["load_balancing_weight"] for e in levels[0]["lb_endpoints"]] == [2]
    assert sorted(e["metadata"]["filter_metadata"][NAMESPACE]["backend"] for e in levels[1]["lb_endpoints"]) == [
        "claude", "local"]
    sockets = _by_name(cluster["transport_socket_matches"])
    assert sockets["oa"]["transport_socket"]["typed_config"]["sni"] == "api.openai.com"
    assert sockets["local"]["transport_socket"]["name"] == "envoy.transport_sockets.raw_buffer"
    routes = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    route = _by_name(routes)["route-rest"]
    assert route["match"]["headers"][0] == {"name": "x-ai-eg-route", "string_match": {"exact": "rest"}}
    policy = route["route"]["retry_policy"]
    assert "5xx" in policy["retry_on"] and "connect-failure" in policy["retry_on"]
    assert policy["retriable_status_codes"] == [429] and policy["num_retries"] == 2
    assert policy["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"
    assert "x-ai-eg-route" in route["request_headers_to_remove"]
