"""extproc.affinity: response id -> backend, shared by the processes of one host."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from extproc.affinity import AffinityStore, default_path


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "affinity.sqlite3"


def test_remember_and_lookup(path: Path) -> None:
    with AffinityStore(path) as store:
        assert store.lookup("resp_1") is None
        store.remember("resp_1", "backend-a")
        store.remember("resp_2", "backend-b")
        assert store.lookup("resp_1") == "backend-a" and store.lookup("resp_2") == "backend-b"
        store.remember("resp_1", "backend-c")  # a later answer wins
        assert store.lookup("resp_1") == "backend-c" and store.count() == 2
        store.forget("resp_1")
        assert store.lookup("resp_1") is None and store.lookup("resp_2") == "backend-b"
        store.remember("", "x")
        store.remember("resp_3", "")
        store.remember("r" * 10_000, "x")
        assert store.count() == 1 and store.lookup("") is None and store.errors == 0


def test_wal_and_survives_reopening(path: Path) -> None:
    with AffinityStore(path) as store:
        store.remember("resp_1", "a")
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    with AffinityStore(path) as again:
        assert again.lookup("resp_1") == "a"


def test_expiry_on_lookup_and_prune(path: Path) -> None:
    clock = Clock()
    with AffinityStore(path, ttl_s=100, clock=clock) as store:
        store.remember("old", "a")
        clock.now += 60
        store.remember("new", "b")
        clock.now += 50  # "old" is 110 s old, "new" 50 s
        assert store.lookup("old") is None and store.lookup("new") == "b"
        assert store.count() == 2  # expired, not yet deleted
        assert store.prune() == 1 and store.count() == 1
        clock.now += 1000
        assert store.lookup("new") is None


def test_default_ttl_is_30_days(path: Path) -> None:
    clock = Clock()
    with AffinityStore(path, clock=clock) as store:
        store.remember("resp_1", "a")
        clock.now += 29 * 86400
        assert store.lookup("resp_1") == "a"
        clock.now += 2 * 86400
        assert store.lookup("resp_1") is None


def test_prune_every_n_writes_bounds_the_size(path: Path) -> None:
    with AffinityStore(path, max_rows=10, prune_every=5) as store:
        for i in range(23):
            store.remember(f"resp_{i}", "a")
        assert store.count() <= 10 + 5  # pruned at most prune_every writes ago
        assert store.lookup("resp_22") == "a" and store.lookup("resp_0") is None
        store.prune()
        assert store.count() == 10 and store.lookup("resp_13") == "a" and store.lookup("resp_12") is None


def test_expired_rows_are_pruned_on_open(path: Path) -> None:
    clock = Clock()
    with AffinityStore(path, ttl_s=10, clock=clock) as store:
        store.remember("resp_1", "a")
    clock.now += 11
    with AffinityStore(path, ttl_s=10, clock=clock) as store:
        assert store.count() == 0


def test_invalid_settings(path: Path) -> None:
    with pytest.raises(ValueError):
        AffinityStore(path, ttl_s=0)
    with pytest.raises(ValueError):
        AffinityStore(path, max_rows=0)


def test_bad_path_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises((OSError, sqlite3.Error)):
        AffinityStore(tmp_path / "file" / "affinity.sqlite3")


def test_errors_degrade_to_no_affinity(path: Path) -> None:
    with AffinityStore(path) as store:
        store.remember("resp_1", "a")
        other = sqlite3.connect(path)
        other.execute("DROP TABLE affinity")  # e.g. someone deleted it under us
        other.close()
        assert store.lookup("resp_1") is None  # logged and counted, not raised
        store.remember("resp_2", "a")
        assert store.errors == 2


def test_closed_store_does_nothing(path: Path) -> None:
    store = AffinityStore(path)
    store.remember("resp_1", "a")
    store.close()
    store.close()
    assert store.lookup("resp_1") is None
    store.remember("resp_2", "a")
    store.forget("resp_1")
    assert store.errors == 0


def test_default_path(tmp_path: Path) -> None:
    assert default_path("unix:/run/extproc.sock", tmp_path).name == "extproc-affinity-unix_run_extproc.sock.sqlite3"
    assert default_path("x:1", tmp_path).parent == tmp_path
    assert default_path("127.0.0.1:50051", tmp_path).name == "extproc-affinity-127.0.0.1_50051.sqlite3"
    assert default_path("[::1]:9", tmp_path).name == "extproc-affinity-1_9.sqlite3"
    assert default_path(":::", tmp_path).name == "extproc-affinity-default.sqlite3"


def test_threads_share_one_store(path: Path) -> None:
    with AffinityStore(path) as store:
        def work(n: int) -> None:
            for i in range(50):
                store.remember(f"resp_{n}_{i}", f"b{n}")
                assert store.lookup(f"resp_{n}_{i}") == f"b{n}"

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.count() == 200 and store.errors == 0


# -- processes -----------------------------------------------------------------------------------------


def _writer(path: str, worker: int, count: int, ready: "multiprocessing.synchronize.Barrier") -> None:
    store = AffinityStore(path, prune_every=50)
    ready.wait()
    for i in range(count):
        store.remember(f"resp_{worker}_{i}", f"backend-{worker}")
    # every worker sees every other worker's writes (those done so far at least its own)
    assert store.lookup(f"resp_{worker}_{count - 1}") == f"backend-{worker}"
    if store.errors:
        raise SystemExit(3)
    store.close()


def _inherited(store: AffinityStore, response_id: str) -> None:
    # A forked child uses the parent's store object: it must open its own connection.
    if store.lookup(response_id) != "parent":
        raise SystemExit(4)
    store.remember("resp_from_child", "child")
    if store.errors:
        raise SystemExit(5)


def test_two_processes_share_one_file(path: Path) -> None:
    context = multiprocessing.get_context("fork")
    count = 300
    ready = context.Barrier(2)
    workers = [context.Process(target=_writer, args=(str(path), n, count, ready)) for n in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(30)
    assert [p.exitcode for p in workers] == [0, 0]
    with AffinityStore(path) as store:
        assert store.count() == 2 * count
        assert store.lookup("resp_0_17") == "backend-0" and store.lookup("resp_1_299") == "backend-1"


def test_forked_child_reopens_the_connection(path: Path) -> None:
    with AffinityStore(path) as store:
        store.remember("resp_1", "parent")
        child = multiprocessing.get_context("fork").Process(target=_inherited, args=(store, "resp_1"))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert store.lookup("resp_from_child") == "child"  # the parent's connection still works
        store.remember("resp_2", "parent")
        assert store.errors == 0


# -- async ---------------------------------------------------------------------------------------------


async def test_async_wrappers(path: Path) -> None:
    with AffinityStore(path) as store:
        assert await store.alookup("resp_1") is None
        await store.aremember("resp_1", "a")
        assert await store.alookup("resp_1") == "a"
        results = await asyncio.gather(*(store.aremember(f"resp_{i}", "b") for i in range(100)))
        assert results == [None] * 100
        found = await asyncio.gather(*(store.alookup(f"resp_{i}") for i in range(100)))
        assert found == ["b"] * 100  # resp_1 overwritten by the batch
        await store.aforget("resp_1")
        assert await store.alookup("resp_1") is None
        # every call ran on the store's one thread
        executor = store._thread()
        names = await asyncio.gather(*(
            asyncio.get_running_loop().run_in_executor(executor, lambda: threading.current_thread().name)
            for _ in range(5)
        ))
        assert len(set(names)) == 1 and names[0].startswith("extproc-affinity")
    # closed: the wrappers do nothing rather than fail requests racing a shutdown
    assert await store.alookup("resp_2") is None
    await store.aremember("resp_3", "a")
    await store.aforget("resp_2")


def _hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another writer (as another process would be) holding the write lock for a while."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT OR REPLACE INTO affinity VALUES ('resp_other', 'x', 1e12)")

    def commit() -> None:
        threading.Event().wait(seconds)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=commit)
    thread.start()
    return thread


def test_writers_wait_for_each_other(path: Path) -> None:
    with AffinityStore(path) as store:
        holder = _hold_write_lock(path, 0.2)
        assert store.lookup("resp_other") is None  # WAL: readers do not wait for the writer
        store.remember("resp_1", "a")  # waits (busy_timeout) instead of failing
        holder.join()
        assert store.errors == 0 and store.lookup("resp_1") == "a" and store.lookup("resp_other") == "x"
    with AffinityStore(path, busy_timeout_ms=20) as impatient:
        holder = _hold_write_lock(path, 0.3)
        impatient.remember("resp_2", "a")
        holder.join()
        assert impatient.errors == 1 and impatient.lookup("resp_2") is None


async def test_event_loop_never_waits_for_a_blocked_call(path: Path) -> None:
    with AffinityStore(path) as store:
        await store.alookup("resp_0")  # the thread exists
        holder = _hold_write_lock(path, 0.3)
        loop = asyncio.get_running_loop()
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(loop.time())
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        await asyncio.gather(store.aremember("resp_1", "a"), store.alookup("resp_1"))
        tick_task.cancel()
        await asyncio.to_thread(holder.join)
        assert ticks and max(b - a for a, b in zip(ticks, ticks[1:])) < 0.15
        assert await store.alookup("resp_1") == "a" and store.errors == 0
