"""Starting, stopping and attaching: `extproc run`, `extproc serve`, `extproc check`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.sim import SimServer
from tests.integration.harness import (
    READY_LINE,
    AttachedGateway,
    alive,
    descendants,
    free_port,
    free_port_block,
    running_gateway,
)

USER = [{"role": "user", "content": "hello there"}]


def _env_without_providers() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "AZURE_OPENAI_", "AWS_"))}


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc", *argv], capture_output=True, text=True, timeout=120, **kwargs)


def test_run_without_config_serves_the_offline_demo(tmp_path: Path) -> None:
    """What `make run` does on a fresh machine with no provider keys."""
    ports = {name: free_port() for name in ("port", "envoy-admin-port", "demo-port")}
    ports |= {name: free_port_block(2) for name in ("processor-port", "processor-admin-port")}
    ports["workers"] = 2
    argv = [sys.executable, "-m", "extproc", "run", *[a for k, v in ports.items() for a in (f"--{k}", str(v))]]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env_without_providers())
    banner: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            banner.append(line)
            if line.startswith("Stop with Ctrl-C"):
                break
        text = "".join(banner)
        assert text.startswith(READY_LINE), text + (process.stderr.read() if process.poll() is not None else "")
        base_url = f"http://127.0.0.1:{ports['port']}/v1"
        assert f"OpenAI base URL:  {base_url}" in text
        assert f"curl -s {base_url}/chat/completions" in text and '"model":"demo-model"' in text

        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
        reply = client.chat.completions.create(model="demo-model", messages=USER)
        assert reply.choices[0].message.content.startswith("This is a simulated reply to: hello there")
        streamed = client.chat.completions.create(model="any-model-at-all", messages=USER, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        children = descendants(process.pid)
        assert len(children) >= 3  # demo backend, processor, Envoy
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    assert code == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in children if alive(p)]


def test_run_reports_envoy_failure_without_traceback(tmp_path: Path, sim_a: SimServer) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = {
        "backends": [{"name": "a", "base_url": sim_a.base_url}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "processor": {"grpc_address": f"127.0.0.1:{free_port_block(2)}", "admin_port": free_port_block(2),
                      "workers": 2},
        "envoy": {"listen_port": port, "admin_port": free_port()},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        result = _run(["run", "--config", str(path)])
    finally:
        taken.close()
    assert result.returncode != 0
    assert "Envoy could not start" in result.stderr
    assert "cannot bind" in result.stderr and str(port) in result.stderr
    assert "Traceback" not in result.stderr


def test_processor_on_a_unix_socket(tmp_path: Path, sim_a: SimServer) -> None:
    config = {
        "backends": [{"name": "a", "base_url": sim_a.base_url}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "processor": {"grpc_address": f"unix:{tmp_path}/extproc.sock"},
    }
    with running_gateway(config, tmp_path) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0, timeout=30)
        assert client.chat.completions.create(model="whatever", messages=USER).choices[0].message.content
        assert (tmp_path / "extproc.sock").exists()
        assert gateway.stop() == 0


def _expected_reply(sim: SimServer, model: str) -> str:
    """The simulator's full reply to USER, asked of it directly."""
    direct = openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0)
    return direct.chat.completions.create(model=model, messages=USER).choices[0].message.content or ""


@pytest.fixture
def attached(tmp_path: Path, sim_a: SimServer):  # type: ignore[no-untyped-def]
    served = AttachedGateway(tmp_path, sim_a, grace=20)
    yield served
    served.close()


def test_serve_answers_grpc_health(attached: AttachedGateway) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{attached.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_drains_in_flight_streams_then_exits_zero(attached: AttachedGateway, sim_a: SimServer) -> None:
    hold = f"drain-{uuid.uuid4().hex}"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{attached.listen_port}/v1", api_key="k", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-sim-hold": hold, "x-sim-chunks": "5", "x-request-id": hold},
    )
    iterator = iter(stream)
    first = next(iterator)
    assert first.choices  # the stream is open and the processor is handling it

    attached.processor.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # drain has begun: health says so
        if httpx.get(f"http://127.0.0.1:{attached.admin_port}/healthz").status_code == 503:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("processor did not report draining")
    assert attached.processor.poll() is None  # still serving the open stream

    sim_a.release(hold)
    rest = list(iterator)
    content = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "stop"
    assert content == _expected_reply(sim_a, "m")
    usage = rest[-1].usage
    assert usage is not None
    # The stream that outlived SIGTERM was accounted in full.
    entry = attached.wait_access_log(lambda e: e.get("request_id") == hold)
    assert (int(entry["input_tokens"]), int(entry["output_tokens"])) == (usage.prompt_tokens, usage.completion_tokens)
    assert attached.processor.wait(30) == 0
    output = attached.processor.stdout.read() if attached.processor.stdout else ""
    assert "draining: 1 stream(s) in flight" in output


def test_check_accepts_a_good_file_and_explains_a_bad_one(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({
        "backends": [{"name": "a", "base_url": "https://api.example.com/v1", "api_key": {"env": "CHECK_TEST_KEY"}}],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "a"}]}],
    }))
    ok = _run(["check", str(good)], env={**os.environ, "CHECK_TEST_KEY": "sk-check-secret"})
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "sk-check-secret" not in ok.stdout + ok.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "backends": [{"name": "a", "schema": "openia", "base_url": "https://api.example.com/v1"}],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "b"}]}],
    }))
    result = _run(["check", str(bad)])
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "backends[0].schema" in result.stderr and "'openai'" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_everything(tmp_path: Path, sim_a: SimServer) -> None:
    config = {
        "backends": [{"name": "a", "base_url": sim_a.base_url}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
    }
    with running_gateway(config, tmp_path) as gateway:
        assert gateway.process is not None
        children = descendants(gateway.process.pid)
        gateway.process.send_signal(signal.SIGINT)
        assert gateway.process.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in children if alive(p)]



def test_killed_worker_0_leaves_no_worker_behind(tmp_path: Path, sim_a: SimServer) -> None:
    admin = free_port_block(2)
    config = {
        "backends": [{"name": "a", "base_url": sim_a.base_url}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "a"}]}],
        "processor": {"grpc_address": f"127.0.0.1:{free_port_block(2)}", "admin_port": admin, "workers": 2},
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    parent = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--config", str(tmp_path / "gateway.yaml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if all(httpx.get(f"http://127.0.0.1:{admin + i}/healthz").status_code == 200 for i in range(2)):
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        workers = descendants(parent.pid)
        assert len(workers) == 1  # the parent is worker 0 and started worker 1
    finally:
        parent.kill()  # no chance to stop its worker itself
        parent.wait(10)
    deadline = time.monotonic() + 15
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if alive(p)]
