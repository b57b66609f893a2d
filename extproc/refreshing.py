"""A credential made in a thread and cached in memory: what AWS chain credentials
(`aws_credentials`) and Google access tokens (`gcp_credentials`) share.

Making one (running botocore's chain, calling a token endpoint) can take seconds; on the
event loop that would stall every stream of the worker. So:

* the request path reads the cached value (`current`), no I/O;
* at most one refresh runs at a time (`_flight`), and every request that must wait
  awaits that same one;
* a request that goes away leaves the refresh running (`asyncio.shield`);
* after a failure no new attempt starts for a while (`_retry_at`), so a broken
  credential does not cost a lookup per request.

Subclasses say when the value is usable (`current`) and how a refresh runs (`_refresh`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class RefreshedInThread(Generic[T]):
    """The single-flight part; use an instance from one event loop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._flight: asyncio.Task[None] | None = None  # the one refresh running
        self._retry_at = 0.0  # no new attempt before this (clock seconds)

    def current(self) -> T | None:
        """The value to use now, without waiting; None when the caller must `get`."""
        raise NotImplementedError

    async def _refresh(self) -> None:
        """Make the value (in a thread) and store it, or set `_retry_at` when that fails."""
        raise NotImplementedError

    async def get(self) -> T | None:
        """The value, waiting (off the loop) for the refresh if need be; None when it
        failed, now or before `_retry_at`."""
        value = self.current()
        if value is not None:
            return value
        if self._flight is None:
            if self._clock() < self._retry_at:
                return None
            self._start()
        assert self._flight is not None
        await asyncio.shield(self._flight)  # a request that goes away leaves the refresh running
        return self.current()

    async def settled(self) -> None:
        """Return once no refresh runs (its result is then in place): for tests, and to warm
        the credential before traffic."""
        while self._flight is not None:
            await asyncio.shield(self._flight)

    def _may_start(self) -> bool:
        """No refresh running and no recent failure: a background refresh may start."""
        return self._flight is None and self._clock() >= self._retry_at

    def _start(self) -> None:
        self._flight = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._refresh()
        finally:
            self._flight = None
