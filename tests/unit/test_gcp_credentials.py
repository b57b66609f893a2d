"""extproc.gcp_credentials: Google access tokens fetched and refreshed in a thread, once.

The cache logic runs on a stand-in google-auth credential whose `refresh` waits on
`threading.Event`s the test sets (so "while it runs" is causal, not timed) and a clock
the test moves; the real flow runs google-auth's service-account code against the
simulator's token endpoint, which checks the JWT's signature.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
from typing import Any

import orjson
import pytest

from extproc.gcp_credentials import (
    MIN_VALIDITY_S,
    REFRESH_WINDOW_S,
    GoogleTokens,
    application_default,
    json_loader,
)
from extproc.sim.google_auth import service_account_key
from extproc.sim.server import SimServer

WAIT_S = 10  # a bound for threads that should be released, so a bug fails instead of hanging
RETRY_S = 7.0


class Clock:
    def __init__(self) -> None:
        self.seconds = 1000.0

    def __call__(self) -> float:
        return self.seconds


class FakeCredentials:
    """google-auth's Credentials surface GoogleTokens uses: refresh(request), token, expiry."""

    def __init__(self, lifetime_s: float = 3600, hold: bool = False, fail: bool = False) -> None:
        self.lifetime_s = lifetime_s
        self.calls = 0
        self.threads: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail = fail
        self.token: str | None = None
        self.expiry: datetime.datetime | None = None

    def refresh(self, request: Any) -> None:
        self.calls += 1
        self.threads.append(threading.get_ident())
        self.entered.set()
        assert self.release.wait(WAIT_S)
        if self.fail:
            raise RuntimeError("invalid_grant: the token endpoint said no")
        self.token = f"ya29.token-{self.calls}"
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        self.expiry = now + datetime.timedelta(seconds=self.lifetime_s)


def tokens_for(credentials: FakeCredentials, clock: Clock) -> GoogleTokens:
    return GoogleTokens(lambda: credentials, "test credentials", clock=clock, retry_after=RETRY_S)  # type: ignore[arg-type, return-value]


async def test_concurrent_requests_share_one_refresh_in_a_thread() -> None:
    credentials = FakeCredentials(hold=True)
    tokens = tokens_for(credentials, Clock())
    assert tokens.current() is None
    waiting = [asyncio.ensure_future(tokens.get()) for _ in range(5)]
    assert await asyncio.to_thread(credentials.entered.wait, WAIT_S)
    credentials.release.set()
    assert await asyncio.gather(*waiting) == ["ya29.token-1"] * 5
    assert credentials.calls == 1 and credentials.threads[0] != threading.get_ident()
    assert tokens.current() == "ya29.token-1"  # from memory now


async def test_a_token_nearing_expiry_is_refreshed_in_the_background() -> None:
    clock = Clock()
    credentials = FakeCredentials()
    tokens = tokens_for(credentials, clock)
    assert await tokens.get() == "ya29.token-1"
    credentials.release.clear()
    clock.seconds += 3600 - REFRESH_WINDOW_S + 1  # inside the refresh window, still valid
    assert tokens.current() == "ya29.token-1"  # served at once, a refresh started
    assert await asyncio.to_thread(credentials.entered.wait, WAIT_S)
    assert tokens.current() == "ya29.token-1"  # still, while the refresh runs
    credentials.release.set()
    await tokens.settled()
    assert tokens.current() == "ya29.token-2" and credentials.calls == 2


async def test_a_token_about_to_expire_is_not_sent() -> None:
    clock = Clock()
    credentials = FakeCredentials()
    tokens = tokens_for(credentials, clock)
    await tokens.get()
    clock.seconds += 3600 - MIN_VALIDITY_S + 1
    assert tokens.current() is None
    assert await tokens.get() == "ya29.token-2"


async def test_a_failure_is_logged_without_secrets_and_not_retried_at_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    credentials = FakeCredentials(fail=True)
    tokens = tokens_for(credentials, clock)
    with caplog.at_level(logging.WARNING, logger="extproc.gcp_credentials"):
        assert await tokens.get() is None
    assert "test credentials" in caplog.text and "invalid_grant" in caplog.text
    assert await tokens.get() is None and credentials.calls == 1  # within the retry pause
    clock.seconds += RETRY_S
    credentials.fail = False
    assert await tokens.get() == "ya29.token-2" and credentials.calls == 2


async def test_a_failed_background_refresh_keeps_the_valid_token() -> None:
    clock = Clock()
    credentials = FakeCredentials()
    tokens = tokens_for(credentials, clock)
    await tokens.get()
    credentials.fail = True
    clock.seconds += 3600 - REFRESH_WINDOW_S + 1
    assert tokens.current() == "ya29.token-1"
    await tokens.settled()
    assert tokens.current() == "ya29.token-1" and credentials.calls == 2
    assert tokens.current() == "ya29.token-1" and credentials.calls == 2  # no new try before the pause ends


async def test_a_request_that_goes_away_leaves_the_refresh_running() -> None:
    credentials = FakeCredentials(hold=True)
    tokens = tokens_for(credentials, Clock())
    first = asyncio.ensure_future(tokens.get())
    assert await asyncio.to_thread(credentials.entered.wait, WAIT_S)
    first.cancel()
    credentials.release.set()
    assert await tokens.get() == "ya29.token-1" and credentials.calls == 1


async def test_a_service_account_key_gets_a_token_the_endpoint_issued(caplog: pytest.LogCaptureFixture) -> None:
    """google-auth's own JWT-bearer flow against the simulator, which checks the signature."""
    async with SimServer() as sim:
        info, public_pem = service_account_key("gw@sim-project.iam.gserviceaccount.com", f"{sim.url}/token")
        sim.google.register(info["client_email"], public_pem)
        text = orjson.dumps(info).decode()
        tokens = GoogleTokens(json_loader(text), "backend vx")
        token = await tokens.get()
        assert token is not None and token in sim.google.issued
        issued = sim.google.issued[token]
        assert issued.client_email == info["client_email"]
        assert "https://www.googleapis.com/auth/cloud-platform" in issued.scopes

        other, _ = service_account_key(info["client_email"], f"{sim.url}/token")  # a key Google does not know
        with caplog.at_level(logging.WARNING, logger="extproc.gcp_credentials"):
            assert await GoogleTokens(json_loader(orjson.dumps(other).decode()), "backend bad").get() is None
        assert "backend bad" in caplog.text and "Invalid JWT Signature" in caplog.text
        assert other["private_key"] not in caplog.text and "BEGIN PRIVATE KEY" not in caplog.text


async def test_application_default_credentials_come_from_google_auths_lookup(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No key in the config: google-auth's own lookup (here GOOGLE_APPLICATION_CREDENTIALS),
    run in the refresh thread like the token call."""
    async with SimServer() as sim:
        info, public_pem = service_account_key("adc@sim-project.iam.gserviceaccount.com", f"{sim.url}/token")
        sim.google.register(info["client_email"], public_pem)
        key_file = tmp_path / "adc.json"
        key_file.write_bytes(orjson.dumps(info))
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
        token = await GoogleTokens(application_default, "application default credentials").get()
        assert token is not None and sim.google.issued[token].client_email == info["client_email"]
