"""The key store: records, the file (atomic, watched, never a plaintext key), Redis (cached,
fail closed), `extproc keys`, and who a request runs under when a key comes from the store."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from extproc import cli
from extproc.config import key_digest, load_config
from extproc.exchange import Exchange
from extproc.keys import PENDING, KeyStoreError, manage
from extproc.keys.file_store import FileKeyStore, read_records
from extproc.keys.manage import FileKeyEditor
from extproc.keys.records import KeyRecord
from extproc.keys.redis_store import RedisKeyEditor, RedisKeyStore
from extproc.runtime import Runtime
from tests.unit.test_exchange import body_request, headers_request, immediate, metadata

NOW = 1_800_000_000.0
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


# -- records and the file ---------------------------------------------------------


def test_record_round_trip_and_refusals() -> None:
    record = KeyRecord("ci", "a" * 64, "team-a", NOW, expires_at=NOW + 10, models=("gpt-*",))
    assert KeyRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.refusal(NOW) is None
    assert record.refusal(NOW + 10) == "This API key has expired."
    assert KeyRecord("ci", "a" * 64, "t", NOW, revoked_at=NOW + 5).refusal(NOW + 5) == "This API key has been revoked."
    assert KeyRecord("ci", "a" * 64, "t", NOW, revoked_at=NOW + 5).refusal(NOW + 4) is None  # a grace period


@pytest.mark.parametrize(("data", "field"), [
    ({"id": "x", "digest": "not-hex", "tenant": "t"}, "digest"),
    ({"id": "x", "digest": "a" * 64, "tenant": "bad tenant"}, "tenant"),
    ({"id": "x", "digest": "a" * 64, "tenant": "t", "expires_at": "soon"}, "expires_at"),
    ({"id": "x", "digest": "a" * 64, "tenant": "t", "models": "gpt-*"}, "models"),
    ({"id": "x", "digest": "a" * 64, "tenant": "t", "key": "sk-oops"}, "unknown"),
])
def test_malformed_records_are_refused_by_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(KeyStoreError, match=field):
        KeyRecord.from_json(data)


def test_the_file_never_holds_a_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    editor = FileKeyEditor(path)
    made = manage.add(editor, "team-a", NOW, entry_id="ci", models=("gpt-*",))
    rotated = manage.rotate(editor, "ci", NOW + 1, grace_seconds=60)
    given = manage.add(editor, "team-b", NOW, key="sk-client-chosen-key-0123456789\n")
    data = path.read_bytes()
    for key in (made.key, rotated.key, given.key):
        assert key.encode() not in data and key.encode()[6:26] not in data
        assert key_digest(key).encode() in data
    assert given.key == "sk-client-chosen-key-0123456789"  # the line break read from stdin is not the key's
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert [r.id for r in read_records(path)] == ["ci", "ci", given.record.id]  # file order: old, rotated, added


def test_add_revoke_rotate(tmp_path: Path) -> None:
    editor = FileKeyEditor(tmp_path / "keys.jsonl")
    first = manage.add(editor, "team-a", NOW, entry_id="ci", expires_at=NOW + 3600, tools=("github__*",))
    with pytest.raises(KeyStoreError, match="exists"):
        manage.add(editor, "team-a", NOW, entry_id="ci")
    second = manage.rotate(editor, "ci", NOW + 10)
    records = {r.digest: r for r in editor.records()}
    assert records[key_digest(first.key)].refusal(NOW + 10) == "This API key has been revoked."
    fresh = records[key_digest(second.key)]
    assert (fresh.tenant, fresh.expires_at, fresh.tools, fresh.refusal(NOW + 10)) == ("team-a", NOW + 3600, ("github__*",), None)
    assert manage.revoke(editor, "ci", NOW + 20) == 1
    assert all(r.refusal(NOW + 20) for r in editor.records())
    with pytest.raises(KeyStoreError, match="no usable key"):
        manage.rotate(editor, "ci", NOW + 30)
    with pytest.raises(KeyStoreError, match="no entry"):
        manage.revoke(editor, "other", NOW)
    assert [row["state"] for row in manage.listing(editor.records(), NOW + 30)] == ["revoked", "revoked"]


async def test_file_store_follows_the_file_and_keeps_serving_a_bad_edit(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    store = FileKeyStore(path)  # a missing file: no keys yet, picked up once created
    assert store.lookup(key_digest("k" * 24)) is None
    made = manage.add(FileKeyEditor(path), "team-a", time.time())
    assert await store.refresh() is True
    assert store.lookup(key_digest(made.key)) == read_records(path)[0]
    path.write_text(path.read_text() + "{not json\n")
    assert await store.refresh() is False
    assert store.lookup(key_digest(made.key)) is not None  # the previous table keeps serving
    assert await store.refresh() is False  # unchanged since: not re-read


def test_a_file_that_does_not_parse_is_refused_at_start_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    path.write_text('{"id": "a", "digest": "' + "a" * 64 + '", "tenant": "t"}\n[1]\n')
    with pytest.raises(KeyStoreError, match=r"keys.jsonl:2: a record must be a JSON object"):
        FileKeyStore(path)


# -- the command line -------------------------------------------------------------


def test_cli_prints_a_key_once_and_lists_without_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "keys.jsonl")
    assert cli.main(["keys", "add", "--file", path, "--tenant", "team-a", "--id", "ci", "--expires-in", "30d",
                     "--model", "gpt-*"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-gw-") and len(key) >= 40
    assert cli.main(["keys", "list", "--file", path, "--json"]) == 0
    listed = capsys.readouterr().out
    (row,) = [json.loads(line) for line in listed.splitlines()]
    assert (row["id"], row["tenant"], row["state"], row["models"]) == ("ci", "team-a", "active", ["gpt-*"])
    assert row["expires_at"] == pytest.approx(time.time() + 30 * 86400, abs=60)
    assert key not in listed and key_digest(key) not in listed
    assert cli.main(["keys", "rotate", "--file", path, "ci"]) == 0
    new_key = capsys.readouterr().out.strip()
    assert new_key != key and new_key.startswith("sk-gw-")
    assert cli.main(["keys", "list", "--file", path]) == 0
    table = capsys.readouterr().out
    assert "revoked" in table and "active" in table and key not in table and new_key not in table
    assert cli.main(["keys", "revoke", "--file", path, "ci"]) == 0
    assert cli.main(["keys", "revoke", "--file", path, "nope"]) == 2
    assert "no entry with id 'nope'" in capsys.readouterr().err
    assert key.encode() not in Path(path).read_bytes() and new_key.encode() not in Path(path).read_bytes()


def test_cli_stores_a_key_from_stdin_without_echoing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.jsonl"
    monkeypatch.setattr("sys.stdin", io.StringIO("sk-brought-by-the-operator-0001\n"))
    assert cli.main(["keys", "add", "--file", str(path), "--tenant", "team-b", "--stdin"]) == 0
    assert capsys.readouterr().out == ""
    (record,) = read_records(path)
    assert record.digest == key_digest("sk-brought-by-the-operator-0001")


@pytest.mark.parametrize("flags", [["--expires-in", "soon"], ["--expires", "tomorrow"], ["--expires", "2001-01-01"]])
def test_cli_refuses_a_bad_expiry(tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "add", "--file", str(tmp_path / "k.jsonl"), "--tenant", "t", *flags]) == 2
    assert "expir" in capsys.readouterr().err
    assert not (tmp_path / "k.jsonl").exists()


# -- the request stage --------------------------------------------------------------


def runtime(tmp_path: Path, tenancy: dict[str, Any]) -> Runtime:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "a"}]}],
        "tenancy": tenancy,
    }))
    return Runtime.build(load_config(path, {}))


def call(rt: Runtime, headers: list[tuple[str, bytes]], path: str = "/v1/chat/completions") -> tuple[Exchange, Any]:
    """Headers (awaited when the lookup had to wait) then the body, through one Exchange."""
    exchange = Exchange(rt)

    async def run() -> Any:
        first = exchange.handle(headers_request("POST", path, headers))
        if not hasattr(first, "WhichOneof"):
            first = await first
        if first.WhichOneof("response") == "immediate_response":
            return first
        return exchange.handle(body_request(json.dumps(MESSAGES if "anthropic" in path else CHAT).encode()))

    return exchange, asyncio.run(run())


@pytest.fixture()
def keyed(tmp_path: Path) -> Iterator[tuple[Runtime, FileKeyEditor]]:
    editor = FileKeyEditor(tmp_path / "keys.jsonl")
    yield runtime(tmp_path, {"key_store": {"file": str(editor.path)}, "header": "x-tenant-id",
                             "default_tenant": "anonymous"}), editor


def bearer(key: str) -> list[tuple[str, bytes]]:
    return [("authorization", f"Bearer {key}".encode())]


def test_a_stored_key_names_the_caller_with_its_grants(keyed: tuple[Runtime, FileKeyEditor]) -> None:
    rt, editor = keyed
    made = manage.add(editor, "team-a", time.time(), entry_id="ci", models=("gpt-*",), tools=("gh__*",))
    asyncio.run(rt.key_store.refresh())  # type: ignore[union-attr]
    exchange, answer = call(rt, [*bearer(made.key), ("x-tenant-id", b"someone-else")])
    assert metadata(answer)["tenant"] == "team-a"
    assert exchange.caller is not None
    assert (exchange.caller.via, exchange.caller.key_id, exchange.caller.models, exchange.caller.tools) == (
        "key", "ci", ("gpt-*",), ("gh__*",))
    exchange, answer = call(rt, [("x-api-key", made.key.encode())], "/anthropic/v1/messages")
    assert metadata(answer)["tenant"] == "team-a"


def test_unknown_key_falls_back_to_header_then_default(keyed: tuple[Runtime, FileKeyEditor]) -> None:
    rt, _ = keyed
    assert call(rt, [*bearer("sk-unknown"), ("x-tenant-id", b"team-b")])[0].caller.via == "header"  # type: ignore[union-attr]
    assert metadata(call(rt, bearer("sk-unknown"))[1])["tenant"] == "anonymous"


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_revoked_or_expired_key_is_401_never_the_default(keyed: tuple[Runtime, FileKeyEditor], how: str) -> None:
    rt, editor = keyed
    made = manage.add(editor, "team-a", time.time(), entry_id="ci")
    if how == "revoked":
        manage.revoke(editor, "ci", time.time())
    else:  # as a record written a day ago with a one-hour expiry reads today
        (record,) = editor.records()
        editor.save([dataclasses.replace(record, created_at=time.time() - 86400, expires_at=time.time() - 82800)])
    asyncio.run(rt.key_store.refresh())  # type: ignore[union-attr]
    status, body, _, _ = immediate(call(rt, [*bearer(made.key), ("x-tenant-id", b"team-b")])[1])
    assert status == 401
    assert body["error"] == {"message": f"This API key has {'been revoked' if how == 'revoked' else 'expired'}.",
                             "type": "invalid_request_error", "code": "invalid_api_key", "param": None}
    status, body, _, _ = immediate(call(rt, [("x-api-key", made.key.encode())], "/anthropic/v1/messages")[1])
    assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"


def test_without_a_fallback_an_unknown_key_is_401(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"key_store": {"file": str(tmp_path / "keys.jsonl")}})
    status, body, _, _ = immediate(call(rt, bearer("sk-unknown"))[1])
    assert status == 401 and body["error"]["message"] == "This gateway needs to know who is calling: send a known API key."


def test_a_malformed_record_is_503_when_used(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    path.write_text(json.dumps({"id": "x", "digest": key_digest("sk-broken-record-0001"), "tenant": "bad tenant"}) + "\n")
    rt = runtime(tmp_path, {"key_store": {"file": str(path)}, "default_tenant": "anonymous"})
    status, body, _, _ = immediate(call(rt, bearer("sk-broken-record-0001"))[1])
    assert status == 503 and body["error"]["code"] == "key_store_unavailable"
    assert metadata(call(rt, bearer("sk-another-key-0001"))[1])["tenant"] == "anonymous"


def test_key_store_settings_need_exactly_one_store(tmp_path: Path) -> None:
    from extproc.config import ConfigError

    with pytest.raises(ConfigError, match="exactly one of 'file' and 'redis'"):
        runtime(tmp_path, {"key_store": {"file": "k.jsonl", "redis": {"url": "redis://127.0.0.1:1/0"}}})


# -- Redis --------------------------------------------------------------------------


async def test_redis_lookup_is_cached_for_a_bounded_time(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    editor = RedisKeyEditor(redis_url, prefix="t1:")
    made = manage.add(editor, "team-a", time.time(), entry_id="ci", models=("gpt-*",))
    clock = [1000.0]
    monkeypatch.setattr("extproc.keys.redis_store.time.monotonic", lambda: clock[0])
    store = RedisKeyStore.from_url(redis_url, prefix="t1:", cache_seconds=2.0)
    digest = key_digest(made.key)
    assert store.lookup(digest) is PENDING
    found = await asyncio.gather(*(store.fetch(digest) for _ in range(20)))
    assert {r.tenant for r in found if r is not None} == {"team-a"} and None not in found
    assert store.lookup(digest) == found[0]  # from the cache now
    manage.revoke(editor, "ci", time.time())
    assert store.lookup(digest) == found[0]  # still cached: the revocation delay
    clock[0] += 2.01
    assert store.lookup(digest) is PENDING
    assert (await store.fetch(digest)).refusal(time.time()) == "This API key has been revoked."  # type: ignore[union-attr]
    assert await store.fetch(key_digest("sk-unknown")) is None
    assert store.lookup(key_digest("sk-unknown")) is None  # a miss is cached too
    assert [r.id for r in editor.records()] == ["ci"]
    raw = b"".join(v for k in editor._client.keys("t1:d:*") for v in [editor._client.get(k)])
    assert made.key.encode() not in raw
    await store.close()
    editor.close()


async def test_redis_cache_stays_bounded(redis_url: str) -> None:
    store = RedisKeyStore.from_url(redis_url, prefix="t2:", cache_entries=100)
    for i in range(350):
        await store.fetch(key_digest(f"sk-probe-{i}"))
    assert len(store._cache) <= 100
    await store.close()


def test_redis_keys_through_the_request_stage(redis_url: str, tmp_path: Path) -> None:
    editor = RedisKeyEditor(redis_url, prefix="t3:")
    made = manage.add(editor, "team-r", time.time(), entry_id="ci")
    rt = runtime(tmp_path, {"key_store": {"redis": {"url": redis_url, "prefix": "t3:"}}})
    exchange, answer = call(rt, bearer(made.key))
    assert metadata(answer)["tenant"] == "team-r" and exchange.caller.key_id == "ci"  # type: ignore[union-attr]
    editor.close()


def test_redis_down_is_503_not_the_default_tenant(tmp_path: Path) -> None:
    from tests.redis_server import free_port

    rt = runtime(tmp_path, {"default_tenant": "anonymous",
                            "key_store": {"redis": {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_ms": 200}}})
    status, body, _, _ = immediate(call(rt, bearer("sk-someone-0123456789"))[1])
    assert status == 503 and body["error"]["code"] == "key_store_unavailable"
    assert "sk-someone" not in orjson.dumps(body).decode()


def mcp_runtime(tmp_path: Path, key_store: dict[str, Any]) -> Runtime:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "backends": [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "a"}]}],
        "tenancy": {"key_store": key_store},
        "mcp": {"servers": [{"name": "alpha", "url": "http://127.0.0.1:9/mcp"}],
                "routes": [{"path": "/mcp", "servers": ["alpha"]}]},
    }))
    return Runtime.build(load_config(path, {}))


async def test_mcp_calls_are_charged_to_the_stored_keys_tenant(redis_url: str, tmp_path: Path) -> None:
    editor = RedisKeyEditor(redis_url, prefix="t4:")
    made = manage.add(editor, "team-mcp", time.time(), entry_id="agent", tools=("alpha__*",))
    rt = mcp_runtime(tmp_path, {"redis": {"url": redis_url, "prefix": "t4:"}})
    exchange = Exchange(rt)
    pending = exchange.handle(headers_request("POST", "/mcp", bearer(made.key)))
    assert not hasattr(pending, "WhichOneof")  # the first use of a key waits for Redis, off the loop
    assert (await pending).WhichOneof("response") == "request_headers"  # type: ignore[misc]
    answer = exchange.handle(body_request(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"alpha__x"}}'))
    assert metadata(answer)["tenant"] == "team-mcp" and exchange.caller.tools == ("alpha__*",)  # type: ignore[union-attr]
    closing = Exchange(rt).handle(headers_request("DELETE", "/mcp", bearer(made.key), end_of_stream=True))
    assert hasattr(closing, "WhichOneof")  # cached now: answered at once, with its metadata
    assert metadata(closing)["tenant"] == "team-mcp"  # type: ignore[arg-type]
    manage.revoke(editor, "agent", time.time())
    rt.key_store._cache.clear()  # type: ignore[union-attr]  # as when cache_seconds have passed
    refused = await Exchange(rt).handle(headers_request("DELETE", "/mcp", bearer(made.key), end_of_stream=True))  # type: ignore[misc]
    assert immediate(refused)[0] == 401
    await rt.key_store.close()  # type: ignore[union-attr]
    editor.close()


def test_cli_finds_the_store_in_the_gateway_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runtime(tmp_path, {"key_store": {"file": str(tmp_path / "keys.jsonl")}})  # writes gw.yaml
    assert cli.main(["keys", "add", "--config", str(tmp_path / "gw.yaml"), "--tenant", "team-c", "--id", "c"]) == 0
    key = capsys.readouterr().out.strip()
    (record,) = read_records(tmp_path / "keys.jsonl")
    assert (record.id, record.tenant, record.digest) == ("c", "team-c", key_digest(key))


def test_cli_reports_an_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.redis_server import free_port

    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    assert cli.main(["keys", "list", "--redis", url]) == 2
    err = capsys.readouterr().err
    assert "the Redis key store did not answer: ConnectionError" in err and "hunter2" not in err


def test_check_reads_every_key_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runtime(tmp_path, {"key_store": {"file": str(tmp_path / "keys.jsonl")}})  # writes gw.yaml
    manage.add(FileKeyEditor(tmp_path / "keys.jsonl"), "team-a", time.time())
    assert cli.main(["check", str(tmp_path / "gw.yaml")]) == 0
    assert "keys.jsonl: OK (1 key record(s))" in capsys.readouterr().out
    with (tmp_path / "keys.jsonl").open("a") as out:
        out.write(json.dumps({"id": "x", "digest": "a" * 64, "tenant": "t", "expires_at": "never"}) + "\n")
    assert cli.main(["check", str(tmp_path / "gw.yaml")]) == 2
    assert "record 2: field 'expires_at' must be Unix seconds" in capsys.readouterr().err
