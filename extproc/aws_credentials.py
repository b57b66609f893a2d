"""AWS credentials from botocore's default chain, resolved and refreshed off the event loop.

A Bedrock backend that names no keys signs with what botocore's chain finds:
environment, shared files, `credential_process`, SSO, STS assume-role, container or
instance metadata. Finding them, and refreshing temporary ones near expiry, may run a
program or call STS / the metadata service, for seconds. On the event loop that would
stall every stream of the worker, so `ChainCredentials` does it in a thread
(`refreshing.RefreshedInThread`, as Google tokens do):

* the request path reads frozen credentials from memory (`current`), no I/O;
* when botocore's advisory window opens (15 minutes before expiry), a background
  refresh starts and requests keep signing with the current credentials meanwhile;
* only with no credentials yet, or less than `MIN_VALIDITY_S` left, does a request
  wait (`get`), without blocking the loop, on the one resolution in flight that all
  waiting requests share;
* after a failure, or when nothing was found, the chain is not asked again for
  `RETRY_AFTER_S` (requests that need it get None: 503), so a misconfigured gateway
  does not rerun it per request.

botocore's own objects do the work: `Session.get_credentials` runs the chain, and
`RefreshableCredentials.get_frozen_credentials` refreshes by botocore's rules (an
advisory refresh that fails keeps the current credentials). Keys are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from extproc.refreshing import RefreshedInThread

if TYPE_CHECKING:
    from botocore.credentials import Credentials, RefreshableCredentials

log = logging.getLogger(__name__)

MIN_VALIDITY_S = 60  # credentials closer to expiry than this are not used to sign
RETRY_AFTER_S = 30.0  # after a failed or empty resolution, the chain is not asked again for this long


class AwsKeys(NamedTuple):
    access_key: str
    secret_key: str
    token: str | None


def default_chain() -> Credentials | None:
    """botocore's default provider chain, run once (blocking: call it in a thread)."""
    import botocore.session  # botocore's data loads only when a backend needs the chain

    return botocore.session.Session().get_credentials()


class ChainCredentials(RefreshedInThread[AwsKeys]):
    """One process's credentials from the chain; use it from one event loop."""

    def __init__(
        self, find: Callable[[], Credentials | None] = default_chain, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(clock)
        self._find = find
        self._credentials: Credentials | None = None  # botocore's object
        self._refreshable: RefreshableCredentials | None = None  # the same, when it expires
        self._keys: AwsKeys | None = None  # its frozen values, read by requests

    def current(self) -> AwsKeys | None:
        """Keys to sign with now, without waiting; None when the caller must `get`.
        Starts a background refresh when botocore's advisory window has opened."""
        keys = self._keys
        if keys is None or self._needs_refresh(MIN_VALIDITY_S):
            return None
        if self._may_start() and self._needs_refresh(None):
            self._start()
        return keys

    def _needs_refresh(self, within: int | None) -> bool:
        """botocore's test: expiring within `within` seconds (None: its advisory window).
        It only reads the expiry time, so it is safe while a refresh runs in a thread
        (at worst it sees the new expiry a moment before `_keys` holds the new keys)."""
        refreshable = self._refreshable
        return refreshable is not None and refreshable.refresh_needed(within)

    async def _refresh(self) -> None:
        """Run the chain (first time, or after it found nothing) or refresh, in a thread."""
        try:
            credentials, keys = await asyncio.to_thread(self._resolve_blocking, self._credentials)
        except Exception as exc:  # noqa: BLE001 - a broken profile, STS refusing: logged, retried later
            # botocore's messages name the provider and the cause, never the keys.
            log.warning("AWS credentials could not be resolved or refreshed: %s: %s; retrying in %.0fs",
                        type(exc).__name__, exc, RETRY_AFTER_S)
            self._retry_at = self._clock() + RETRY_AFTER_S
        else:
            self._credentials, self._keys = credentials, keys
            self._refreshable = _as_refreshable(credentials)
            if keys is None:
                log.warning("no AWS credentials found by botocore's chain; retrying in %.0fs", RETRY_AFTER_S)
                self._retry_at = self._clock() + RETRY_AFTER_S
            elif self._needs_refresh(None):  # botocore kept the old keys (an advisory refresh failed)
                self._retry_at = self._clock() + RETRY_AFTER_S

    def _resolve_blocking(self, known: Credentials | None) -> tuple[Credentials | None, AwsKeys | None]:
        """In a thread: the chain's credentials (run it unless known) and their frozen keys,
        refreshed first when botocore's rules say so."""
        credentials = known if known is not None else self._find()
        if credentials is None:
            return None, None
        frozen = credentials.get_frozen_credentials()
        if not frozen.access_key or not frozen.secret_key:
            return credentials, None
        return credentials, AwsKeys(frozen.access_key, frozen.secret_key, frozen.token)


def _as_refreshable(credentials: Credentials | None) -> RefreshableCredentials | None:
    from botocore.credentials import RefreshableCredentials  # loaded: botocore made `credentials`

    return credentials if isinstance(credentials, RefreshableCredentials) else None


_SHARED: ChainCredentials | None = None


def shared() -> ChainCredentials:
    """The process's chain credentials (every Bedrock backend without keys uses the same chain)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = ChainCredentials()
    return _SHARED
