"""The key store through real Envoy: keys added, rotated and revoked with `extproc keys` while
traffic runs (nothing dropped, no restart, Envoy's config untouched), expired and revoked
keys refused with 401 in the client API's shape, 100,000 keys in the file, and Redis."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from extproc.config import key_digest
from extproc.keys import manage
from extproc.keys.manage import FileKeyEditor
from extproc.keys.redis_store import RedisKeyEditor
from extproc.sim import SimServer
from tests.integration.harness import RunningGateway, eventually, running_gateway
from tests.redis_server import RedisServer

USER = [{"role": "user", "content": "hi"}]
BULK = 100_000


def _config(sim: SimServer, key_store: dict[str, Any]) -> dict[str, Any]:
    return {
        "backends": [{"name": "sim", "base_url": sim.base_url, "api_key": {"env": "TEST_SIM_KEY"}}],
        "routes": [{"name": "all", "default": True, "backends": [{"name": "sim"}]}],
        "tenancy": {"key_store": key_store},
    }


def _bulk_file(path: Path, count: int) -> None:
    """`count` stored keys (tenants bulk-0..), written the way `extproc keys` writes them."""
    lines = [
        orjson.dumps({"id": f"bulk-{i}", "digest": hashlib.sha256(f"sk-bulk-{i:06d}-padding".encode()).hexdigest(),
                      "tenant": f"bulk-{i % 1000}", "created_at": 1_800_000_000})
        for i in range(count)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def _keys(path: Path, *args: str) -> str:
    """`extproc keys ...` as an operator runs it; returns what it printed (a new key, or nothing)."""
    done = subprocess.run([sys.executable, "-m", "extproc", "keys", *args, "--file", str(path)],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def _client(gateway: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=30)


def _works(gateway: RunningGateway, key: str) -> bool:
    try:
        return bool(_client(gateway, key).chat.completions.create(model="m", messages=USER, max_tokens=2).choices)
    except openai.AuthenticationError:
        return False


def _everywhere(check: Callable[[], bool]) -> bool:
    """Eventually true eight times in a row: every processor worker polls the file on its own,
    so one answer from a worker that has seen a change says nothing of the others."""
    return eventually(lambda: all(check() for _ in range(8)))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    _bulk_file(path, BULK)
    return path


@pytest.fixture(scope="module")
def keyed_gateway(sim_a: SimServer, key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = _config(sim_a, {"file": str(key_file), "poll_seconds": 0.2})
    with running_gateway(config, tmp_path_factory.mktemp("gw"), env={"TEST_SIM_KEY": "sk-provider-key-000"}) as gw:
        yield gw


def test_one_of_100000_keys_names_its_tenant(keyed_gateway: RunningGateway, sim_a: SimServer) -> None:
    key = f"sk-bulk-{BULK - 7:06d}-padding"
    reply = _client(keyed_gateway, key).chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert reply.choices[0].message.content
    entry = keyed_gateway.wait_access_log(lambda e: e["tenant"] == f"bulk-{(BULK - 7) % 1000}")
    assert entry["status"] == 200
    forwarded = sim_a.requests[-1].headers
    assert forwarded.get("authorization") == "Bearer sk-provider-key-000"  # the client's key never goes upstream
    assert key not in str(forwarded)


def test_an_unknown_key_is_401_in_openai_shape(keyed_gateway: RunningGateway) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(keyed_gateway, "sk-nobody-has-this-key-000").chat.completions.create(model="m", messages=USER)
    assert refused.value.status_code == 401
    assert refused.value.body == {"message": "This gateway needs to know who is calling: send a known API key.",
                                  "type": "invalid_request_error", "code": "invalid_api_key", "param": None}


def test_an_expired_key_is_refused(keyed_gateway: RunningGateway, key_file: Path) -> None:
    key = _keys(key_file, "add", "--tenant", "late", "--id", "expiring")
    assert eventually(lambda: _works(keyed_gateway, key))
    editor = FileKeyEditor(key_file)  # as if the entry had been made with an expiry that has now passed
    (record,) = [r for r in editor.records() if r.id == "expiring"]
    with editor.transaction():
        editor.save([record.__class__(**{**record.to_json(), "expires_at": time.time() - 1})])
    assert _everywhere(lambda: not _works(keyed_gateway, key))
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(keyed_gateway, key).chat.completions.create(model="m", messages=USER)
    assert refused.value.body["message"] == "This API key has expired."  # type: ignore[index]
    assert key.encode() not in key_file.read_bytes()


def test_add_rotate_revoke_while_traffic_runs(keyed_gateway: RunningGateway, key_file: Path) -> None:
    first = _keys(key_file, "add", "--tenant", "team-live", "--id", "live")
    assert _everywhere(lambda: _works(keyed_gateway, first))
    current = [first]
    outcomes: list[str] = []
    stop = threading.Event()

    def traffic() -> None:  # one client, one request after another, always with the key it was given
        while not stop.is_set():
            key = current[0]
            try:
                _client(keyed_gateway, key).chat.completions.create(model="m", messages=USER, max_tokens=2)
                outcomes.append("ok")
            except openai.APIError as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        other = _keys(key_file, "add", "--tenant", "team-other", "--id", "other")
        assert eventually(lambda: _works(keyed_gateway, other))
        # Rotation with a grace period: the old key keeps working while clients switch over.
        second = _keys(key_file, "rotate", "live", "--grace", "600")
        assert second != first
        assert _everywhere(lambda: _works(keyed_gateway, second))
        seen = len(outcomes)
        assert eventually(lambda: len(outcomes) >= seen + 5)  # the old key still served meanwhile
        current[0] = second
        # Revoking another entry changes nothing for this client.
        _keys(key_file, "revoke", "other")
        assert _everywhere(lambda: not _works(keyed_gateway, other))
        seen = len(outcomes)  # and the client, now on the new key, is still served
        assert eventually(lambda: len(outcomes) >= seen + 5)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert len(outcomes) >= 10 and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(keyed_gateway, other).chat.completions.create(model="m", messages=USER)
    assert refused.value.body["message"] == "This API key has been revoked."  # type: ignore[index]
    assert _works(keyed_gateway, second) and _works(keyed_gateway, first)  # still within the grace period
    _keys(key_file, "revoke", "live")
    assert eventually(lambda: not _works(keyed_gateway, second) and not _works(keyed_gateway, first))
    keyed_gateway.wait_access_log(lambda e: e["tenant"] == "team-live" and e["status"] == 200)
    data = key_file.read_bytes()
    assert all(k.encode() not in data for k in (first, second, other))
    assert not any("config reload" in line for line in keyed_gateway.stderr_lines)  # keys are not config


def test_a_revoked_key_is_401_for_anthropic_clients_too(keyed_gateway: RunningGateway, key_file: Path) -> None:
    key = _keys(key_file, "add", "--tenant", "team-anthropic", "--id", "anthropic-client")
    client = anthropic.Anthropic(base_url=f"{keyed_gateway.url}/anthropic", api_key=key, max_retries=0, timeout=30)

    def works() -> bool:
        try:
            return bool(client.messages.create(model="m", max_tokens=2, messages=USER).content)  # type: ignore[arg-type]
        except anthropic.AuthenticationError:
            return False

    assert eventually(works)
    _keys(key_file, "revoke", "anthropic-client")
    assert _everywhere(lambda: not works())
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client.messages.create(model="m", max_tokens=2, messages=USER)  # type: ignore[arg-type]
    assert refused.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                             "message": "This API key has been revoked."}}


def test_redis_keys_are_read_live(sim_a: SimServer, tmp_path: Path) -> None:
    with RedisServer() as redis:
        editor = RedisKeyEditor(redis.url)
        made = manage.add(editor, "team-redis", time.time(), entry_id="shared")
        config = _config(sim_a, {"redis": {"url": redis.url, "cache_seconds": 0.5}})
        with running_gateway(config, tmp_path, env={"TEST_SIM_KEY": "sk-provider-key-000"}) as gateway:
            assert _works(gateway, made.key)
            gateway.wait_access_log(lambda e: e["tenant"] == "team-redis" and e["status"] == 200)
            rotated = manage.rotate(editor, "shared", time.time())
            assert eventually(lambda: _works(gateway, rotated.key) and not _works(gateway, made.key))
            assert key_digest(made.key) != key_digest(rotated.key)
        editor.close()


def test_budgets_charge_the_stored_keys_tenant(sim_a: SimServer, tmp_path: Path) -> None:
    """Budgets count per tenant, whichever way the tenant was known: here two keys of one
    tenant share its budget, and a key of another tenant is still served."""
    path = tmp_path / "keys.jsonl"
    editor = FileKeyEditor(path)
    spender = manage.add(editor, "team-spend", time.time(), entry_id="spender").key
    colleague = manage.add(editor, "team-spend", time.time(), entry_id="colleague").key
    other = manage.add(editor, "team-other", time.time(), entry_id="other").key
    config = {**_config(sim_a, {"file": str(path)}), "budgets": [{"name": "hourly", "unit": "hour", "limit": 50}]}
    with running_gateway(config, tmp_path / "gw", env={"TEST_SIM_KEY": "sk-provider-key-000"}) as gateway:
        spent = _client(gateway, spender).chat.completions.create(model="m", messages=USER, max_tokens=60)
        assert spent.usage is not None and spent.usage.total_tokens > 50

        def refused() -> bool:
            try:
                _client(gateway, colleague).chat.completions.create(model="m", messages=USER, max_tokens=1)
            except openai.RateLimitError:
                return True
            return False

        assert eventually(refused)
        assert _works(gateway, other)
        entry = gateway.wait_access_log(lambda e: e["tenant"] == "team-spend" and e["status"] == 429)
        assert entry["error_type"] == "gateway_rate_limited"


def test_pointing_the_config_at_another_store_reloads_without_a_restart(sim_a: SimServer, tmp_path: Path) -> None:
    import yaml

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    old = manage.add(FileKeyEditor(first), "team-first", time.time()).key
    new = manage.add(FileKeyEditor(second), "team-second", time.time()).key
    config = _config(sim_a, {"file": str(first)})
    with running_gateway(config, tmp_path / "gw", env={"TEST_SIM_KEY": "sk-provider-key-000"}) as gateway:
        assert _works(gateway, old) and not _works(gateway, new)
        changed = {**gateway.config, "tenancy": {"key_store": {"file": str(second)}}}
        gateway.config_path.write_text(yaml.safe_dump(changed))
        assert eventually(lambda: _works(gateway, new) and not _works(gateway, old))
        gateway.wait_stderr(lambda line: "config reloaded" in line)
        assert not any("reload rejected" in line for line in gateway.stderr_lines)
