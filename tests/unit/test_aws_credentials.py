"""extproc.aws_credentials: botocore's chain, resolved and refreshed in a thread, once.

Expiry runs on botocore's own `RefreshableCredentials` with a clock the test moves;
the chain and the refresh are functions that wait on `threading.Event`s the test sets,
so "while it runs" and "after it ran" are causal, never a matter of timing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import Credentials, RefreshableCredentials

from extproc.aws_credentials import RETRY_AFTER_S, AwsKeys, ChainCredentials

FIRST = AwsKeys("ASIAFIRST", "first-secret-key-0123456789", "first-session-token")
SECOND = AwsKeys("ASIASECOND", "second-secret-key-0123456789", "second-session-token")
WAIT_S = 10  # a bound for threads that should be released, so a bug fails instead of hanging


class Clock:
    """Both clocks the cache reads: botocore's (expiry) and the monotonic one (retries)."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)
        self.seconds = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.seconds += seconds

    def utc(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.seconds


class Refresher:
    """botocore's `refresh_using`: counts calls, may wait for the test, returns SECOND."""

    def __init__(self, clock: Clock, *, hold: bool = False, fail: bool = False) -> None:
        self.clock = clock
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail = fail

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(WAIT_S)
        if self.fail:
            raise RuntimeError("STS said no")
        return {"access_key": SECOND.access_key, "secret_key": SECOND.secret_key, "token": SECOND.token,
                "expiry_time": (self.clock.now + timedelta(hours=1)).isoformat()}


def refreshable(clock: Clock, refresher: Refresher, valid_for: timedelta = timedelta(hours=1)) -> RefreshableCredentials:
    return RefreshableCredentials(FIRST.access_key, FIRST.secret_key, FIRST.token, clock.now + valid_for,
                                  refresher, "test", time_fetcher=clock.utc)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_static_credentials_resolve_once_and_then_come_from_memory() -> None:
    found: list[int] = []

    def find() -> Credentials:
        found.append(1)
        return Credentials(*FIRST)

    chain = ChainCredentials(find)
    assert chain.current() is None  # nothing yet: the caller must wait
    assert await chain.get() == FIRST
    assert [chain.current() for _ in range(5)] == [FIRST] * 5
    assert await chain.get() == FIRST
    assert found == [1]


async def test_concurrent_requests_share_one_resolution_in_a_thread() -> None:
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def find() -> Credentials:
        calls.append(threading.current_thread().name)
        entered.set()
        assert release.wait(WAIT_S)
        return Credentials(*FIRST)

    chain = ChainCredentials(find)
    waiting = [asyncio.create_task(chain.get()) for _ in range(10)]
    # The loop is free while the chain runs: it can wait for the chain to have started.
    assert await asyncio.to_thread(entered.wait, WAIT_S)
    assert not any(task.done() for task in waiting)
    assert chain.current() is None
    release.set()
    assert await asyncio.gather(*waiting) == [FIRST] * 10
    assert len(calls) == 1 and calls[0] != threading.main_thread().name


async def test_refresh_starts_ahead_of_expiry_in_the_background(clock: Clock) -> None:
    refresher = Refresher(clock, hold=True)
    chain = ChainCredentials(lambda: refreshable(clock, refresher), clock.monotonic)
    assert await chain.get() == FIRST
    clock.advance(40 * 60)  # 20 minutes left: botocore sees no need yet
    assert chain.current() == FIRST and refresher.calls == 0
    clock.advance(8 * 60)  # 12 minutes left: botocore's advisory window (15) is open
    assert chain.current() == FIRST  # the request signs at once...
    assert await asyncio.to_thread(refresher.entered.wait, WAIT_S)  # ...while the refresh runs
    assert [chain.current() for _ in range(5)] == [FIRST] * 5
    # Less than a minute left: a request now waits, for the refresh already running.
    clock.advance(11 * 60 + 30)
    assert chain.current() is None
    waiting = [asyncio.create_task(chain.get()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    refresher.release.set()
    assert await asyncio.gather(*waiting) == [SECOND] * 3
    assert chain.current() == SECOND
    await chain.settled()
    assert refresher.calls == 1


async def test_expiring_credentials_are_refreshed_before_use(clock: Clock) -> None:
    refresher = Refresher(clock)
    chain = ChainCredentials(lambda: refreshable(clock, refresher, timedelta(seconds=30)), clock.monotonic)
    # botocore refreshes inside its mandatory window when the chain hands them over.
    assert await chain.get() == SECOND
    assert refresher.calls == 1


async def test_a_failed_background_refresh_keeps_the_valid_keys_and_waits_to_retry(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    refresher = Refresher(clock, fail=True)
    chain = ChainCredentials(lambda: refreshable(clock, refresher), clock.monotonic)
    assert await chain.get() == FIRST
    clock.advance(48 * 60)  # advisory window: botocore logs the failure and keeps the keys
    assert chain.current() == FIRST
    await chain.settled()
    assert refresher.calls == 1
    assert [chain.current() for _ in range(5)] == [FIRST] * 5
    await chain.settled()
    assert refresher.calls == 1  # not one refresh per request
    clock.advance(RETRY_AFTER_S)
    refresher.fail = False
    assert chain.current() == FIRST
    await chain.settled()
    assert refresher.calls == 2 and chain.current() == SECOND
    assert FIRST.secret_key not in caplog.text and SECOND.secret_key not in caplog.text


async def test_nothing_found_is_remembered_then_looked_up_again(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    found: list[Credentials | None] = [None]
    chain = ChainCredentials(lambda: found[-1], clock.monotonic)
    with caplog.at_level(logging.WARNING, "extproc.aws_credentials"):
        assert await chain.get() is None
    assert "no AWS credentials found" in caplog.text
    found.append(Credentials(*FIRST))
    assert await chain.get() is None  # not asked again yet: a 503, not the chain per request
    clock.advance(RETRY_AFTER_S)
    assert await chain.get() == FIRST


async def test_a_failing_chain_is_logged_without_secrets_and_retried_later(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[int] = []

    def find() -> Credentials:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("credential process exited with status 1")
        return Credentials(*FIRST)

    chain = ChainCredentials(find, clock.monotonic)
    with caplog.at_level(logging.WARNING, "extproc.aws_credentials"):
        assert await chain.get() is None
    assert "RuntimeError: credential process exited with status 1" in caplog.text
    assert await chain.get() is None and attempts == [1]
    clock.advance(RETRY_AFTER_S)
    assert await chain.get() == FIRST
    assert FIRST.secret_key not in caplog.text


async def test_a_request_that_goes_away_leaves_the_resolution_running() -> None:
    release = threading.Event()

    def find() -> Credentials:
        assert release.wait(WAIT_S)
        return Credentials(*FIRST)

    chain = ChainCredentials(find)
    first = asyncio.create_task(chain.get())
    await asyncio.sleep(0)
    first.cancel()
    second = asyncio.create_task(chain.get())
    await asyncio.sleep(0)
    release.set()
    assert await second == FIRST
    with pytest.raises(asyncio.CancelledError):
        await first


# -- botocore's real chain ------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No ambient AWS configuration: env vars cleared, files absent, no metadata service."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield tmp_path


async def test_default_chain_reads_the_environment_once(aws_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "envtoken")
    chain = ChainCredentials()
    assert await chain.get() == ("AKIDENV", "envsecret", "envtoken")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDOTHER")
    assert chain.current() == ("AKIDENV", "envsecret", "envtoken")  # not looked at per request
    assert await ChainCredentials().get() == ("AKIDOTHER", "envsecret", "envtoken")


async def test_default_chain_reads_shared_files(aws_env: Path) -> None:
    (aws_env / "credentials").write_text("[default]\naws_access_key_id = AKIDFILE\naws_secret_access_key = filesecret\n")
    assert await ChainCredentials().get() == ("AKIDFILE", "filesecret", None)


async def test_default_chain_with_nothing_configured(aws_env: Path) -> None:
    assert await ChainCredentials().get() is None
