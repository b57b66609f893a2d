"""Bootstrap configs for the two Envoys the benchmark starts itself.

- the fake upstream: answers every request with a `direct_response` (no cluster, no
  upstream), so it is never the bottleneck: SSE when the request says
  `x-bench-mode: sse` (or another SSE mode, such as `sse240`), else a JSON chat completion;
- "Envoy alone": a plain proxy (HTTP connection manager + router, no ext_proc) to the
  fake upstream, with the same HTTP/1.1 upstream cluster the gateway renders for an
  `http://` backend;
- the floor: Envoy alone plus the gateway's request-stage ext_proc filter, processor
  cluster and bootstrap settings, as `extproc.envoyconfig` renders them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc import envoyconfig
from extproc.config import GatewayConfig

from bench_lib.bodies import SSE_MODE_HEADER

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_DOWNSTREAM_CONNECTIONS = (
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)
_BUFFER = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _content_type(value: str) -> list[dict[str, Any]]:
    return [{"header": {"key": "content-type", "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]


def _listener(
    name: str, port: int, route_config: dict[str, Any], filters: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    hcm = {
        "@type": _HCM,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "request_timeout": "0s",
        "stream_idle_timeout": "300s",
        "route_config": route_config,
        "http_filters": [*(filters or []), {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "name": name,
        "address": _address(port),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _bootstrap(admin_port: int, static_resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "admin": {"address": _address(admin_port)},
        # As in the gateway's config (and it silences Envoy's start-up warning).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {"@type": _DOWNSTREAM_CONNECTIONS, "max_active_downstream_connections": 50000},
                }
            ]
        },
        "static_resources": static_resources,
    }


def _sse_route(mode: str, body: str) -> dict[str, Any]:
    return {
        "name": mode,
        "match": {
            "prefix": "/",
            "headers": [
                {"name": ":method", "string_match": {"exact": "POST"}},
                {"name": SSE_MODE_HEADER, "string_match": {"exact": mode}},
            ],
        },
        "direct_response": {"status": 200, "body": {"inline_string": body}},
        "response_headers_to_add": _content_type("text/event-stream"),
    }


def fake_upstream(
    listen_port: int, admin_port: int, json_body: str, sse_body: str, extra_sse: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """POST + `x-bench-mode: sse` -> the SSE body; POST + `x-bench-mode: <mode>` -> `extra_sse[mode]`;
    anything else -> the JSON body."""
    sse_bodies = {"sse": sse_body, **(extra_sse or {})}
    sse_routes = [_sse_route(mode, body) for mode, body in sse_bodies.items()]
    json_route = {
        "name": "json",
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": json_body}},
        "response_headers_to_add": _content_type("application/json"),
    }
    # A direct response sent before the request body is read makes Envoy close the
    # connection; reading the whole request first keeps connections alive, as a real
    # upstream does.
    read_whole_request = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {"@type": _BUFFER, "max_request_bytes": 1 << 20},
    }
    route_config = {
        "name": "fake_upstream",
        # Envoy refuses direct_response bodies over 4 KiB unless told otherwise.
        "max_direct_response_body_size_bytes": max(len(body) for body in [json_body, *sse_bodies.values()]) + 4096,
        "virtual_hosts": [{"name": "fake_upstream", "domains": ["*"], "routes": [*sse_routes, json_route]}],
    }
    return _bootstrap(
        admin_port, {"listeners": [_listener("fake_upstream", listen_port, route_config, [read_whole_request])]}
    )


_UPSTREAM_CLUSTER = "fake_upstream"


def _route_to_upstream(name: str, upstream_port: int) -> dict[str, Any]:
    """Every request to the fake upstream's cluster."""
    return {
        "name": name,
        "virtual_hosts": [
            {
                "name": name,
                "domains": ["*"],
                "routes": [
                    {
                        "name": "upstream",
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": _UPSTREAM_CLUSTER,
                            "host_rewrite_literal": f"127.0.0.1:{upstream_port}",
                            "timeout": "0s",
                            "idle_timeout": "300s",
                        },
                    }
                ],
            }
        ],
    }


def _upstream_cluster(upstream_port: int) -> dict[str, Any]:
    """The same cluster shape the gateway renders for an http:// backend."""
    return {
        "name": _UPSTREAM_CLUSTER,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": _UPSTREAM_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(upstream_port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http_protocol_options": {}},
            }
        },
    }


def plain_proxy(listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """Envoy alone: every request goes to the fake upstream through the router."""
    return _bootstrap(
        admin_port,
        {
            "listeners": [_listener("envoy_alone", listen_port, _route_to_upstream("envoy_alone", upstream_port))],
            "clusters": [_upstream_cluster(upstream_port)],
        },
    )


def floor_proxy(listen_port: int, admin_port: int, upstream_port: int, gateway: GatewayConfig) -> dict[str, Any]:
    """Envoy alone plus the transport of the gateway's request stage: the ext_proc filter
    and processor cluster that `gateway` renders (same modes, timeouts, health checks) and
    the gateway's bootstrap settings, routing straight to the fake upstream. With a
    processor that changes nothing, it costs what ext_proc itself costs."""
    filters = [f for f in envoyconfig.http_filters(gateway) if f["name"] == "envoy.filters.http.ext_proc"]
    if len(filters) != 1:
        raise ValueError(f"expected one ext_proc filter in the gateway's render, got {len(filters)}")
    processor = next(c for c in envoyconfig.clusters(gateway) if c["name"] == envoyconfig.PROCESSOR_CLUSTER)
    bootstrap = _bootstrap(
        admin_port,
        {
            "listeners": [_listener("floor", listen_port, _route_to_upstream("floor", upstream_port), filters)],
            "clusters": [_upstream_cluster(upstream_port), processor],
        },
    )
    bootstrap["layered_runtime"] = {"layers": [{"name": "static", "static_layer": dict(envoyconfig.RUNTIME_FLAGS)}]}
    bootstrap["grpc_async_client_manager_config"] = dict(envoyconfig.GRPC_CLIENT_CACHE)
    return bootstrap
