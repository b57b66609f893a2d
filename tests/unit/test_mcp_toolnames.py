"""extproc.mcp.toolnames: the tool names each server session listed, bounded and expiring."""

from __future__ import annotations

import pytest

from extproc.mcp.toolnames import ListedTools


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_remembers_exact_names_per_server_session() -> None:
    listed = ListedTools(clock=Clock())
    listed.remember(("a", "session-1"), ["delete_repo", "list_repos"])
    listed.remember(("a", None), ["echo"])
    assert listed.names(("a", "session-1")) == {"delete_repo", "list_repos"}
    assert listed.names(("a", None)) == {"echo"}  # a stateless server's one entry
    assert listed.names(("a", "session-2")) is None  # another session of a stateful server: not known
    assert listed.names(("b", "session-1")) is None
    listed.remember(("a", "session-1"), ["list_repos"])  # a fresh listing replaces the old one
    assert listed.names(("a", "session-1")) == {"list_repos"}


def test_entries_expire() -> None:
    clock = Clock()
    listed = ListedTools(ttl=60, clock=clock)
    listed.remember(("a", None), ["echo"])
    clock.now += 59
    assert listed.names(("a", None)) == {"echo"}
    clock.now += 1
    assert listed.names(("a", None)) is None
    assert len(listed) == 0


def test_bounded_least_recently_used_first() -> None:
    listed = ListedTools(max_entries=2, clock=Clock())
    listed.remember(("a", "1"), ["x"])
    listed.remember(("a", "2"), ["y"])
    assert listed.names(("a", "1")) == {"x"}  # used: "2" is now the oldest
    listed.remember(("a", "3"), ["z"])
    assert len(listed) == 2
    assert listed.names(("a", "2")) is None
    assert listed.names(("a", "1")) == {"x"} and listed.names(("a", "3")) == {"z"}


def test_forget() -> None:
    listed = ListedTools(clock=Clock())
    listed.remember(("a", "1"), ["x"])
    listed.forget(("a", "1"))
    listed.forget(("a", "never"))
    assert listed.names(("a", "1")) is None


@pytest.mark.parametrize(("ttl", "max_entries"), [(0, 10), (-1, 10), (10, 0)])
def test_bad_limits(ttl: float, max_entries: int) -> None:
    with pytest.raises(ValueError):
        ListedTools(ttl=ttl, max_entries=max_entries)
