"""A front Envoy doing what a load balancer in front of a gateway fleet does.

Round robin over the replicas' Envoy listeners, a TCP health check every 250 ms (a replica's
Envoy listens only once its processor answers, so "accepts connections" means "ready"), and
retries only where the request cannot have reached a replica (connection refused, reset
before the request went out), each on another replica. A request a replica had already taken
is never re-sent by the front: it may have been charged or billed upstream, so only the
client can decide to retry it. Every response names the replica that served it
(``x-fleet-replica``) and the JSON access log says where each request went.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from extproc.launcher import envoy_command
from tests.integration.harness import free_port
from tests.processes import terminate

REPLICA_HEADER = "x-fleet-replica"
HEALTH_INTERVAL = "0.25s"

_ACCESS_LOG = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "code": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
}


def front_config(listen_port: int, admin_port: int, replica_ports: list[int]) -> dict[str, Any]:
    """The front Envoy's bootstrap: one listener, one round-robin cluster of replicas."""
    typed = "type.googleapis.com/envoy.extensions"
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "front",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": f"{typed}.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "front",
                        "preserve_external_request_id": True,
                        "access_log": [{"name": "envoy.access_loggers.stdout", "typed_config": {
                            "@type": f"{typed}.access_loggers.stream.v3.StdoutAccessLog",
                            "log_format": {"json_format": _ACCESS_LOG}}}],
                        "route_config": {"virtual_hosts": [{
                            "name": "fleet", "domains": ["*"],
                            "response_headers_to_add": [
                                {"header": {"key": REPLICA_HEADER, "value": "%UPSTREAM_HOST%"}}],
                            "routes": [{"match": {"prefix": "/"}, "route": {
                                "cluster": "replicas", "timeout": "0s",
                                "retry_policy": {
                                    "retry_on": "connect-failure,refused-stream,reset-before-request",
                                    "num_retries": 3,
                                    "retry_host_predicate": [{
                                        "name": "envoy.retry_host_predicates.previous_hosts",
                                        "typed_config": {"@type": f"{typed}.retry.host.previous_hosts.v3."
                                                                  "PreviousHostsPredicate"}}],
                                    "host_selection_retry_max_attempts": 5,
                                },
                            }}],
                        }]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": f"{typed}.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "replicas",
                "type": "STATIC",
                "lb_policy": "ROUND_ROBIN",
                "connect_timeout": "1s",
                # Envoy checks every 60 s until a cluster has traffic unless told otherwise;
                # a fresh connection each time (a kept one says nothing about accepting).
                "health_checks": [{
                    "timeout": "1s", "interval": HEALTH_INTERVAL, "no_traffic_interval": HEALTH_INTERVAL,
                    "no_traffic_healthy_interval": HEALTH_INTERVAL, "unhealthy_threshold": 1,
                    "healthy_threshold": 1, "reuse_connection": False, "tcp_health_check": {}}],
                "load_assignment": {"cluster_name": "replicas", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    for port in replica_ports
                ]}]},
            }],
        },
    }


class FrontEnvoy:
    """The real Envoy binary running `front_config`; its access log is collected from stdout."""

    def __init__(self, tmp: Path, replica_ports: list[int]) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.replica_ports = replica_ports
        config_path = tmp / "front-envoy.json"
        config_path.write_bytes(orjson.dumps(front_config(self.port, self.admin_port, replica_ports)))
        # One worker thread: round robin is per thread, and tests count on one rotation.
        command = envoy_command(config_path, ["--log-level", "error", "--concurrency", "1"])
        self.lines: list[str] = []
        self.process = subprocess.Popen(command.argv, env=command.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def healthy_replicas(self) -> set[int]:
        """Ports of the replicas the front's health check currently passes."""
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/clusters", timeout=5).text
        healthy = set()
        for port in self.replica_ports:
            flags = f"replicas::127.0.0.1:{port}::health_flags::"
            line = next((row for row in text.splitlines() if row.startswith(flags)), None)
            if line is not None and line.removeprefix(flags) == "healthy":
                healthy.add(port)
        return healthy

    def wait_healthy(self, ports: set[int], timeout: float = 30) -> None:
        """Wait until exactly `ports` pass the health check."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.healthy_replicas() == ports:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"front Envoy: healthy {self.healthy_replicas()}, wanted {ports}\n"
                             + "\n".join(self.lines[-10:]))

    def access_log(self) -> dict[str, dict[str, Any]]:
        """The front's access log by request id (Envoy flushes it about once a second)."""
        entries = {}
        for line in list(self.lines):
            if line.startswith("{"):
                entry = orjson.loads(line)
                entries[entry["request_id"]] = entry
        return entries

    def close(self) -> None:
        terminate(self.process, timeout=10)
