"""Google Cloud access tokens for Vertex AI, fetched and refreshed off the event loop.

Vertex AI takes `Authorization: Bearer <OAuth access token>`. google-auth makes the
token: a service-account key signs a JWT and trades it at its `token_uri`; application
default credentials may read gcloud's files or ask the metadata server. Each is an HTTP
call (and a file read) that can take seconds, so on the event loop it would stall every
stream of the worker. `GoogleTokens` therefore does it in a thread, as
`aws_credentials.ChainCredentials` does for AWS (both are `refreshing.RefreshedInThread`):

* the request path reads the cached token from memory (`current`), no I/O;
* `REFRESH_WINDOW_S` before expiry one background refresh starts, and requests keep
  using the current token meanwhile;
* only with no token yet, or less than `MIN_VALIDITY_S` left, does a request wait
  (`get`), without blocking the loop, on the one refresh in flight all waiting
  requests share;
* after a failure the token endpoint is not asked again for `retry_after` seconds
  (requests that need a token get None: a 503), so a broken key does not cost a
  token call per request.

Tokens and keys are never logged; a failure is logged with google-auth's message,
which names the cause (e.g. the token endpoint's `invalid_grant`), not the secrets.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from extproc.refreshing import RefreshedInThread

if TYPE_CHECKING:
    from google.auth.credentials import Credentials

log = logging.getLogger(__name__)

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
MIN_VALIDITY_S = 60.0  # a token closer to expiry than this is not sent
REFRESH_WINDOW_S = 300.0  # a background refresh starts this long before expiry
RETRY_AFTER_S = 10.0  # after a failed refresh, the token endpoint is not asked again for this long
TOKEN_TIMEOUT_S = 10.0  # one token call (google-auth's own default is 120 s)
DEFAULT_LIFETIME_S = 3600.0  # for credentials that report no expiry
_MAX_ERROR_CHARS = 300

Loader = Callable[[], "Credentials"]


class _Token(NamedTuple):
    value: str
    expires_at: float  # clock seconds


# Credential JSON types a backend's `credentials` may hold (others: use application
# default credentials, e.g. GOOGLE_APPLICATION_CREDENTIALS, which google-auth vets).
JSON_TYPES = ("service_account", "authorized_user")


def json_loader(text: str) -> Loader:
    """Credentials from a service-account key or an authorized-user file (gcloud's), built
    in the refresh thread by google-auth's loader for exactly that type."""

    def load() -> Credentials:
        info = orjson.loads(text)
        kind = info.get("type")
        if kind == "service_account":
            # google-auth is imported only by workers with a Vertex backend
            from google.oauth2 import service_account

            return service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
        if kind == "authorized_user":
            from google.oauth2 import credentials

            return credentials.Credentials.from_authorized_user_info(info, scopes=SCOPES)
        raise ValueError(f"credential type {kind!r} is not one of {', '.join(JSON_TYPES)}")

    return load


def application_default() -> Credentials:
    """google-auth's application default credentials (blocking: call it in a thread)."""
    import google.auth

    credentials, _project = google.auth.default(scopes=SCOPES)
    return credentials


def _transport() -> Callable[..., Any]:
    """google-auth's requests transport with a bounded timeout per token call."""
    from google.auth.transport.requests import Request

    request = Request()

    def call(url: str, method: str = "GET", body: Any = None, headers: Any = None, timeout: Any = None,
             **kwargs: Any) -> Any:
        return request(url, method, body, headers, timeout=timeout or TOKEN_TIMEOUT_S, **kwargs)

    return call


class GoogleTokens(RefreshedInThread[str]):
    """One credential's access tokens; use it from one event loop."""

    def __init__(
        self, load: Loader, label: str, clock: Callable[[], float] = time.monotonic,
        retry_after: float = RETRY_AFTER_S,
    ) -> None:
        super().__init__(clock)
        self._load = load
        self.label = label  # which credentials, for log lines
        self._retry_after = retry_after
        self._credentials: Credentials | None = None  # google-auth's object, touched only in the thread
        self._transport: Callable[..., Any] | None = None
        self._token: _Token | None = None

    def current(self) -> str | None:
        """The token to send now, without waiting; None when the caller must `get`.
        Starts a background refresh when the token nears expiry."""
        token = self._token
        if token is None:
            return None
        left = token.expires_at - self._clock()
        if left < MIN_VALIDITY_S:
            return None
        if left < REFRESH_WINDOW_S and self._may_start():
            self._start()
        return token.value

    async def _refresh(self) -> None:
        try:
            value, lifetime = await asyncio.to_thread(self._refresh_blocking)
        except Exception as exc:  # noqa: BLE001 - a bad key, the endpoint refusing or down: logged, retried later
            message = str(exc)[:_MAX_ERROR_CHARS]
            log.warning("Google access token for %s could not be obtained: %s: %s; retrying in %.0fs",
                        self.label, type(exc).__name__, message, self._retry_after)
            self._retry_at = self._clock() + self._retry_after
        else:
            self._token = _Token(value, self._clock() + lifetime)

    def _refresh_blocking(self) -> tuple[str, float]:
        """In a thread: load the credentials (first time), refresh them, and return the new
        token with its lifetime in seconds."""
        if self._credentials is None:
            self._credentials = self._load()
        if self._transport is None:
            self._transport = _transport()
        credentials = self._credentials
        credentials.refresh(self._transport)
        token = credentials.token
        if not isinstance(token, str) or not token:
            raise ValueError("the credentials produced no access token")
        expiry = credentials.expiry  # naive UTC, google-auth's convention
        if expiry is None:
            return token, DEFAULT_LIFETIME_S
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        return token, (expiry - now).total_seconds()


_BY_SOURCE: dict[str, GoogleTokens] = {}


def for_json(text: str, label: str) -> GoogleTokens:
    """The process's tokens for one credential JSON: shared by backends using the same
    key and kept across config reloads (a reload does not cost a token call)."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    tokens = _BY_SOURCE.get(digest)
    if tokens is None:
        tokens = _BY_SOURCE[digest] = GoogleTokens(json_loader(text), label)
    return tokens


def shared_default() -> GoogleTokens:
    """The process's application default credentials (every backend without a key)."""
    tokens = _BY_SOURCE.get("")
    if tokens is None:
        tokens = _BY_SOURCE[""] = GoogleTokens(application_default, "application default credentials")
    return tokens
