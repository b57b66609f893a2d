"""Reading the few request headers the processor uses, safely.

Header values become metadata, metric labels and span attributes: each is cut to a
bounded length and dropped unless printable, so a client cannot inject control
characters or unbounded text into logs and dashboards.
"""

from __future__ import annotations

MAX_HEADER_VALUE = 256  # session id / tenant / tool values longer than this are cut


def header_text(value: bytes | None) -> str | None:
    """A request header as metadata text: bounded, printable, or nothing."""
    if not value:
        return None
    text = value[:MAX_HEADER_VALUE].decode("utf-8", "replace")
    return text if text.isprintable() else None


def client_api_key(headers: dict[str, bytes]) -> str | None:
    """The key a client sent the gateway: `Authorization: Bearer K` or `x-api-key: K`."""
    authorization = headers.get("authorization")
    if authorization and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip().decode("latin-1")
    key = headers.get("x-api-key")
    return key.strip().decode("latin-1") if key else None
