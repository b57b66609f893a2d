"""The processor failing, restarting, reloading and stopping, under real Envoy.

What a user must see: a clear error in their API's shape while the processor is gone
(or, when configured, traffic passing unprocessed and counted), traffic processed again
as soon as it is back without touching Envoy, config changes applied without dropping a
request, and a stop that lets open streams finish and accounts them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.sim import SimServer
from extproc.workers import PORT_STRIDE
from tests.integration.harness import AttachedGateway, RunningGateway, alive, descendants, running_gateway

USER = [{"role": "user", "content": "hello there"}]


def _chat(port: int, model: str = "m", **headers: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": model, "messages": USER},
                      headers=headers, timeout=30)


def _kill_processor(attached: AttachedGateway) -> None:
    attached.processor.kill()
    attached.processor.wait(10)


def _envoy_stat(admin_port: int, name: str) -> int:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/stats?filter={name}", timeout=5).text
    return sum(int(line.rpartition(":")[2]) for line in text.splitlines() if line.strip())


def test_processor_down_gives_a_clear_5xx_then_recovers_without_touching_envoy(
    tmp_path: Path, sim_a: SimServer
) -> None:
    attached = AttachedGateway(tmp_path, sim_a, grace=5)
    try:
        assert _chat(attached.listen_port).status_code == 200
        envoy_pid = attached.envoy.pid
        _kill_processor(attached)

        down = _chat(attached.listen_port, **{"x-request-id": "while-down"})
        assert down.status_code == 503  # retryable
        error = down.json()["error"]  # OpenAI's error shape, from Envoy's local reply mapping
        assert error["type"] == "server_error" and error["code"] == "processor_unavailable" and error["message"]
        assert not [r for r in sim_a.requests if r.headers.get("x-request-id") == "while-down"]  # nothing unprocessed

        attached.start_processor()
        attached.wait_processor_healthy()
        deadline = time.monotonic() + 15
        while _chat(attached.listen_port).status_code != 200:  # Envoy reconnects on its own
            assert time.monotonic() < deadline, "Envoy did not use the restarted processor"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{attached.listen_port}/v1", api_key="k", max_retries=0)
        assert client.chat.completions.create(model="m", messages=USER).usage is not None
        assert attached.envoy.pid == envoy_pid and attached.envoy.poll() is None
    finally:
        attached.close()


def test_failure_mode_allow_passes_traffic_unprocessed_and_counts_it(tmp_path: Path, sim_a: SimServer) -> None:
    attached = AttachedGateway(tmp_path, sim_a, grace=5, failure_mode_allow=True)
    try:
        _kill_processor(attached)
        response = _chat(attached.listen_port, **{"x-request-id": "unprocessed-1"})
        assert response.status_code == 200 and response.json()["choices"]
        sent = next(r for r in sim_a.requests if r.headers.get("x-request-id") == "unprocessed-1")
        assert sent.path == "/v1/chat/completions"
        assert not any(k.startswith("x-ai-eg-") for k in sent.headers)  # the processor never saw it
        assert _envoy_stat(attached.envoy_admin_port, "ext_proc.failure_mode_allowed") >= 1
    finally:
        attached.close()


def _config(sim: SimServer, override: str, **extra: Any) -> dict[str, Any]:
    return {
        "backends": [{"name": "a", "base_url": sim.base_url, "model_name_override": override}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        **extra,
    }


@pytest.fixture
def gateway(tmp_path: Path, sim_a: SimServer) -> Any:
    with running_gateway(_config(sim_a, "first-model"), tmp_path) as gw:
        yield gw


def _model_seen_by_backend(gateway: RunningGateway, sim: SimServer) -> str:
    rid = uuid.uuid4().hex
    assert _chat(gateway.listen_port, **{"x-request-id": rid}).status_code == 200
    return next(r.json["model"] for r in sim.requests if r.headers.get("x-request-id") == rid)


def _argv(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def test_run_restarts_a_crashed_processor(gateway: RunningGateway, sim_a: SimServer) -> None:
    assert gateway.process is not None
    tree = descendants(gateway.process.pid)
    processor = [p for p in tree if b"serve" in _argv(p) and b"extproc" in _argv(p)]
    envoys = [p for p in tree if _argv(p) and _argv(p)[0].endswith(b"envoy")]
    assert processor and envoys
    os.kill(min(processor), signal.SIGKILL)  # worker 0: the parent of the other workers
    gateway.wait_stderr(lambda line: "processor restarted" in line, timeout=60)
    assert _model_seen_by_backend(gateway, sim_a) == "first-model"
    assert all(alive(p) for p in envoys)  # Envoy was never restarted


def _worker_pid(gateway: RunningGateway, index: int) -> int | None:
    """The pid worker `index` reports on its own admin port (None while nothing answers)."""
    try:
        health = httpx.get(f"http://127.0.0.1:{gateway.processor_admin_port + PORT_STRIDE * index}/healthz", timeout=2)
    except httpx.HTTPError:
        return None
    return int(health.json()["pid"]) if health.status_code == 200 else None


def _requests_served(gateway: RunningGateway, index: int) -> float:
    """Requests worker `index` has finished, from its own (not the merged) /metrics."""
    port = gateway.processor_admin_port + PORT_STRIDE * index
    text = httpx.get(f"http://127.0.0.1:{port}/metrics?local=1", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text) if family.name.startswith("gen_ai_server_request_duration")
        for sample in family.samples if sample.name.endswith("_count")
    )


def _envoy_pid(gateway: RunningGateway) -> int:
    assert gateway.process is not None
    (envoy,) = [p for p in descendants(gateway.process.pid) if _argv(p) and _argv(p)[0].endswith(b"envoy")]
    return envoy


def _until_in_a_row(client: openai.OpenAI, wanted: int, timeout: float = 90) -> None:
    """Send requests until `wanted` succeed in a row. On the way only the processor's own
    retryable 503 is allowed (a stream that went to the hung worker before it was taken out)."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < wanted:
        assert time.monotonic() < deadline, f"no {wanted} successful requests in a row within {timeout:.0f}s"
        try:
            assert client.chat.completions.create(model="m", messages=USER).choices
            in_a_row += 1
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and exc.code == "processor_unavailable", exc.body
            in_a_row = 0


def _wait_for_new_worker(gateway: RunningGateway, index: int, old_pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (pid := _worker_pid(gateway, index)) in (None, old_pid):
        assert time.monotonic() < deadline, f"worker {index} (pid {old_pid}) was not replaced"
        time.sleep(0.2)
    assert pid is not None
    return pid


def _until_every_worker_served(gateway: RunningGateway, client: openai.OpenAI, timeout: float = 30) -> None:
    """Send requests, every one of which must succeed, until each worker has served one:
    Envoy has every (new) worker back in rotation."""
    deadline = time.monotonic() + timeout
    while not all(_requests_served(gateway, index) for index in (0, 1)):
        assert time.monotonic() < deadline, "a worker got no traffic"
        assert client.chat.completions.create(model="m", messages=USER).choices


def _resume(pid: int) -> None:
    """Undo a SIGSTOP the gateway did not clean up itself (it then stops the process normally)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def test_a_hung_worker_is_taken_out_of_rotation_and_replaced(gateway: RunningGateway) -> None:
    envoy = _envoy_pid(gateway)
    worker_0, hung = _worker_pid(gateway, 0), _worker_pid(gateway, 1)
    assert worker_0 is not None and hung is not None
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0, timeout=30)
    os.kill(hung, signal.SIGSTOP)  # alive, holding its port, answering nothing
    try:
        _until_in_a_row(client, 20)  # Envoy's health check took it out of rotation
        assert _envoy_stat(gateway.envoy_admin_port, r"^cluster\.extproc\.health_check\.failure$") >= 1

        replacement = _wait_for_new_worker(gateway, 1, hung)
        assert not alive(hung) and alive(replacement)
        assert replacement in descendants(worker_0)  # worker 0 started it
        gateway.wait_stderr(lambda line: f"processor worker 1 (pid {hung}) did not answer" in line)

        # Envoy puts the new worker back in rotation: it serves its share, and nothing fails.
        _until_every_worker_served(gateway, client)
        assert _worker_pid(gateway, 0) == worker_0
        assert _envoy_pid(gateway) == envoy
    finally:
        _resume(hung)


def test_a_hung_worker_0_makes_run_restart_the_processor(gateway: RunningGateway) -> None:
    envoy = _envoy_pid(gateway)
    hung = _worker_pid(gateway, 0)
    assert hung is not None
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0, timeout=30)
    os.kill(hung, signal.SIGSTOP)
    try:
        gateway.wait_stderr(lambda line: f"processor worker 0 (pid {hung}) did not answer" in line, timeout=60)
        gateway.wait_stderr(lambda line: "processor restarted" in line, timeout=60)
        assert not alive(hung)
        _until_in_a_row(client, 20)
        assert _worker_pid(gateway, 0) not in (None, hung)
        _until_every_worker_served(gateway, client)  # both new workers, once Envoy's checks see them
        assert _envoy_pid(gateway) == envoy
    finally:
        _resume(hung)


def test_config_reload_applies_new_routes_and_keeps_in_flight_streams(
    gateway: RunningGateway, sim_a: SimServer
) -> None:
    assert _model_seen_by_backend(gateway, sim_a) == "first-model"
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0, timeout=60)
    hold = f"reload-{uuid.uuid4().hex}"
    stream = iter(client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-sim-hold": hold, "x-sim-chunks": "4", "x-request-id": hold}))
    assert next(stream).choices  # in flight under the old config

    data = yaml.safe_load(gateway.config_path.read_text())
    data["backends"][0]["model_name_override"] = "second-model"
    gateway.config_path.write_text(yaml.safe_dump(data))
    gateway.wait_stderr(lambda line: "config reloaded" in line, timeout=30)
    # Every worker has swapped: Envoy spreads requests round robin over the workers, so eight
    # answers in a row from the new config cover each of them. (Moving on after one answer
    # let a worker still polling miss this version and meet only the refused ones below.)
    deadline, in_a_row = time.monotonic() + 30, 0
    while in_a_row < 8:
        assert time.monotonic() < deadline, "a worker kept the old config"
        in_a_row = in_a_row + 1 if _model_seen_by_backend(gateway, sim_a) == "second-model" else 0
        if not in_a_row:
            time.sleep(0.2)

    sim_a.release(hold)
    rest = list(stream)
    assert rest[-1].usage is not None  # the old request finished, and was accounted
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == hold)
    assert entry["model_name_override"] == "first-model" and int(entry["output_tokens"]) == rest[-1].usage.completion_tokens

    # A broken file is refused with a clear line; the running config keeps serving.
    gateway.config_path.write_text("backends: [unclosed")
    gateway.wait_stderr(lambda line: "config reload rejected" in line and "not valid YAML" in line, timeout=30)
    assert _model_seen_by_backend(gateway, sim_a) == "second-model"

    # A change Envoy would have to know about (a new backend) is refused too, and says why.
    data["backends"].append({"name": "b", "base_url": sim_a.base_url})
    gateway.config_path.write_text(yaml.safe_dump(data))
    gateway.wait_stderr(lambda line: "config reload rejected" in line and "Envoy" in line, timeout=30)
    assert _model_seen_by_backend(gateway, sim_a) == "second-model"


def test_sighup_reloads_when_watching_is_off(tmp_path: Path, sim_a: SimServer) -> None:
    config = _config(sim_a, "before-sighup", processor={"watch_config": False})
    with running_gateway(config, tmp_path) as gateway:
        data = yaml.safe_load(gateway.config_path.read_text())
        data["backends"][0]["model_name_override"] = "after-sighup"
        gateway.config_path.write_text(yaml.safe_dump(data))
        assert _model_seen_by_backend(gateway, sim_a) == "before-sighup"  # not watching: nothing changed yet
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGHUP)  # `extproc run` passes it on to the processor
        gateway.wait_stderr(lambda line: "config reloaded" in line, timeout=30)
        deadline = time.monotonic() + 20
        while _model_seen_by_backend(gateway, sim_a) != "after-sighup":
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_stop_lets_open_streams_finish_and_accounts_them(gateway: RunningGateway, sim_a: SimServer) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0, timeout=60)
    hold = f"stop-{uuid.uuid4().hex}"
    stream = iter(client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-sim-hold": hold, "x-sim-chunks": "4", "x-request-id": hold}))
    assert next(stream).choices
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # not a timing assert: give the stop a moment to begin before the stream goes on
    assert gateway.process.poll() is None  # waiting for the open stream
    sim_a.release(hold)
    rest = list(stream)
    assert rest[-1].usage is not None and [c for c in rest if c.choices][-1].choices[0].finish_reason == "stop"
    assert gateway.process.wait(60) == 0
    entry = gateway.wait_access_log(lambda e: e.get("request_id") == hold)
    assert int(entry["output_tokens"]) == rest[-1].usage.completion_tokens


def test_a_route_timeout_cuts_a_stalled_backend_with_a_504(tmp_path: Path, sim_a: SimServer) -> None:
    config = {
        "backends": [{"name": "a", "base_url": sim_a.base_url}],
        "routes": [
            {"name": "impatient", "match": {"model": "quick"}, "backends": [{"name": "a"}],
             "request_timeout_seconds": 0.5},
            {"name": "rest", "default": True, "backends": [{"name": "a"}]},
        ],
    }
    with running_gateway(config, tmp_path) as gateway:
        stalled = _chat(gateway.listen_port, model="quick", **{"x-sim-first-byte-delay-ms": "3000"})
        assert stalled.status_code == 504
        assert stalled.json()["error"]["code"] == "backend_timeout"
        # The same stall on a route without its own timeout is waited for.
        patient = _chat(gateway.listen_port, model="other", **{"x-sim-first-byte-delay-ms": "700"})
        assert patient.status_code == 200
