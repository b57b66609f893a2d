"""The tool names each MCP server listed, so `tools/call` is forwarded only for a tool a
server offers, named exactly as it offered it.

Why: servers differ in how they match a called name (some ignore case, or a leading '_' or
'./'). Forwarding every name that merely starts with a server's prefix let a client reach
a tool the route denies: `alpha__DELETE_REPO` went to `alpha` as `DELETE_REPO` while
`alpha__delete_repo` was denied. Checking the name against the server's own listing, byte
for byte, closes that whatever the server does with names.

An entry belongs to one server *session* (server name, that server's own `Mcp-Session-Id`):
a stateful server may offer each session its own tools; servers that issue no session id
share one entry per server. Every `tools/list` passing the gateway fills the entries of the
servers it lists; the gateway lists a server itself when a call names a tool its entry
does not know (or there is no entry), so a new tool is callable at once and a client that
never lists still works. An entry expires after `ttl` seconds and is dropped when the
server announces `notifications/tools/list_changed`; at most `max_entries` are kept, the
least recently used dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_MAX_ENTRIES", "DEFAULT_TTL_SECONDS", "ListedTools", "ToolsKey"]

DEFAULT_TTL_SECONDS: Final = 300.0
DEFAULT_MAX_ENTRIES: Final = 4096

ToolsKey = tuple[str, str | None]
"""(server name, the server's own session id; None for a server that issues none)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    names: frozenset[str]
    expires: float  # on the cache's clock


class ListedTools:
    """A bounded, expiring map from a server session to the tool names that server listed."""

    __slots__ = ("_clock", "_entries", "_max_entries", "_ttl")

    def __init__(self, ttl: float = DEFAULT_TTL_SECONDS, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be positive and max_entries at least 1")
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[ToolsKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, key: ToolsKey) -> frozenset[str] | None:
        """The names listed for `key`, or None when unknown or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.names

    def remember(self, key: ToolsKey, names: Iterable[str]) -> frozenset[str]:
        """Keep a server's complete listing for `key` (replacing an older one); returns it."""
        listed = frozenset(names)
        self._entries[key] = _Entry(listed, self._clock() + self._ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return listed

    def forget(self, key: ToolsKey) -> None:
        """Drop `key`'s listing (the server said its tools changed)."""
        self._entries.pop(key, None)
