"""Noticing that a file a user edits has changed (the gateway config, the key store)."""

from __future__ import annotations

import os
from pathlib import Path

FileState = tuple[int, int, int] | None


def file_state(path: Path) -> FileState:
    """What changes when the file is edited or replaced (mtime, size, inode: editors and
    atomic rewrites often make a new inode); None when it cannot be read (missing, no
    permission), so its coming back also counts as a change."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
