"""What the gateway config (`extproc.config`) and the MCP config (`extproc.mcp.config`) share.

Both are strict pydantic models whose errors speak to an operator, both *reference*
credentials (env var or file) rather than hold them, and both let an operator add headers
to upstream requests. Those pieces live here, below both modules, so that `extproc.config`
can import `extproc.mcp.config` (`GatewayConfig.mcp`) without the MCP config importing
the gateway config back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = [
    "GATEWAY_OWNED_HEADERS",
    "HEADER_NAME",
    "ConfigError",
    "SecretRef",
    "StrictModel",
    "check_extra_headers",
    "first_repeat",
    "resolve_secret_refs",
]

# An HTTP header name (RFC 9110 token characters).
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Header names we refuse as "extra headers" everywhere: the gateway owns them.
GATEWAY_OWNED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})

_K = TypeVar("_K", bound=Hashable)


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""


class StrictModel(BaseModel):
    """A config section: an unknown field is an error (a misspelt option must not be
    ignored) and a parsed section is frozen (a loaded config is shared, never edited)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(StrictModel):
    """Where a secret lives: exactly one of an environment variable or a file."""

    env: str | None = Field(default=None, description="environment variable holding the secret")
    file: Path | None = Field(default=None, description="file whose content (stripped) is the secret")

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of 'env' or 'file'")
        return self

    def describe(self) -> str:
        return f"env var {self.env}" if self.env else f"file {self.file}"

    def resolve(self, environ: Mapping[str, str], multiline: bool = False) -> SecretStr:
        """Read the secret now; the error names where we looked, never the value.
        `multiline`: a document such as a credential JSON file, never put in a header."""
        if self.env is not None:
            value = environ.get(self.env, "").strip()
            if not value:
                raise ValueError(f"environment variable {self.env} is not set or empty")
        else:
            assert self.file is not None
            try:
                value = self.file.expanduser().read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or "not UTF-8 text"
                raise ValueError(f"cannot read secret file {self.file}: {reason}") from None
            if not value:
                raise ValueError(f"secret file {self.file} is empty")
        # It travels in a header: a line break or NUL inside would break or split it.
        if not multiline and any(c in value for c in "\r\n\0"):
            raise ValueError(f"the secret from {self.describe()} contains a line break or NUL character")
        return SecretStr(value)


def resolve_secret_refs(
    refs: Iterable[tuple[_K, str, SecretRef]], environ: Mapping[str, str], failure: str,
    multiline: Callable[[_K], bool] | None = None,
) -> dict[_K, SecretStr]:
    """Resolve (key, field path, reference) triples into key -> secret.

    Every reference is tried, so one `ConfigError` (headed `failure`) lists each field that
    could not be resolved, by its path and never by a value.
    """
    resolved: dict[_K, SecretStr] = {}
    problems: list[str] = []
    for key, where, ref in refs:
        try:
            resolved[key] = ref.resolve(environ, multiline is not None and multiline(key))
        except ValueError as exc:
            problems.append(f"  {where}: {exc}")
    if problems:
        raise ConfigError(f"{failure}:\n" + "\n".join(problems))
    return resolved


def first_repeat(names: Iterable[str]) -> tuple[int, str] | None:
    """The index and value of the first name already seen earlier in `names`, or None:
    names that must be unique are reported at their second occurrence."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            return i, name
        seen.add(name)
    return None


def check_extra_headers(
    headers: dict[str, str], reserved: frozenset[str], reserved_prefixes: tuple[str, ...] = ()
) -> dict[str, str]:
    """Validate headers an operator adds to upstream requests (a field validator's body).

    Names must be valid, not a pseudo-header and not one the gateway sets itself (`reserved`,
    lower-case, or starting with one of `reserved_prefixes`); values must not hold CR, LF or
    NUL, which would split or end the header.
    """
    for name, value in headers.items():
        lower = name.lower()
        if not HEADER_NAME.match(name) or lower in reserved or lower.startswith((":", *reserved_prefixes)):
            raise ValueError(f"header {name!r} cannot be set here (reserved or not a valid header name)")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} value must not contain CR, LF or NUL")
    return headers
