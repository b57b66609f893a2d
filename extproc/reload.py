"""Live config reload: the file changed (or SIGHUP), so build a new runtime and swap it in.

Requests in flight keep the runtime they started with (each exchange holds its own
reference), so nothing is dropped. A new config is applied only when it is valid and
when Envoy's side would stay the same: backends, fallback routes, ports, budgets and
access-log fields all live in Envoy's config, and a processor that routes to a cluster
Envoy does not have would fail requests. Such a change is refused with a log line that
says what to do, and the running config keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from extproc.config import ConfigError, LoadedConfig, load_config
from extproc.file_state import file_state

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


Prepare = Callable[[LoadedConfig], LoadedConfig]


def check_reload(current: LoadedConfig, path: Path, prepare: Prepare | None = None) -> LoadedConfig:
    """Load `path` (with the command line's overrides applied by `prepare`) and decide
    whether it may replace `current`; raises ConfigError if not."""
    from extproc import envoyconfig  # the same renderer `extproc envoy-config` uses

    new = load_config(path)
    if prepare is not None:
        new = prepare(new)
    if envoyconfig.render(new.config) != envoyconfig.render(current.config):
        raise ConfigError(
            f"{path}: this change also changes Envoy's config (backends, routes with fallbacks, ports, budgets, "
            "request limits, costs, JWT providers or the processor's settings); render it with `extproc envoy-config` "
            "and restart (`extproc run`) or reload your Envoy, then the processor"
        )
    return new


class ConfigWatcher:
    """Polls one config file and reloads on change or on request (SIGHUP)."""

    def __init__(
        self,
        path: Path,
        current: LoadedConfig,
        apply: Callable[[LoadedConfig], None],
        prepare: Prepare | None = None,
        poll: bool = True,
    ) -> None:
        self.path = path
        self.poll = poll  # False: reload only when asked (SIGHUP)
        self.prepare = prepare
        self.current = current
        self.apply = apply
        self._state = file_state(path)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def request(self) -> None:
        """Reload now (SIGHUP), even if the file looks unchanged."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS if self.poll else None)
            asked = self._wake.is_set()
            self._wake.clear()
            state = file_state(self.path)
            if not asked and state == self._state:
                continue
            self._state = state
            await self.reload()

    async def reload(self) -> bool:
        """Try the file once; True when the new config now serves."""
        try:
            # Reading, validating and rendering are blocking work: off the event loop.
            new = await asyncio.to_thread(check_reload, self.current, self.path, self.prepare)
        except ConfigError as exc:
            log.error("config reload rejected, the running config keeps serving: %s", exc)
            return False
        except Exception:
            log.exception("config reload failed, the running config keeps serving")
            return False
        try:
            self.apply(new)
        except ConfigError as exc:
            log.error("config reload rejected, the running config keeps serving: %s", exc)
            return False
        self.current = new
        log.info("config reloaded from %s", self.path)
        return True
