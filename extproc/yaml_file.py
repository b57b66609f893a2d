"""Reading a YAML file a user wrote (the gateway config, a rate-limit rules file), with
errors that say which file and where."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


def read_yaml_file(path: str | Path, error: Callable[[str], Exception]) -> Any:
    """The parsed document; `error(message)` is raised for an unreadable file or invalid
    YAML, the message starting with the path (and giving the line and column)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{source}: not valid YAML{where}: {problem}") from None
