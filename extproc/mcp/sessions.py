"""Stateless gateway sessions: the id a client holds carries the servers' own session ids.

    <base64url(JSON payload)>.<base64url(HMAC-SHA256(key, "extproc-mcp-session.v1." + payload part))>

The payload names the route the session belongs to, the protocol version agreed with the
client, for each server of the session its `Mcp-Session-Id` (None for a stateless server)
and the protocol version it agreed to, and a random nonce drawn for each id. The nonce is
what makes every `initialize` yield a new id: without it, all clients of a route whose
servers are stateless would hold the same id (the MCP spec wants session ids globally
unique and cryptographically secure). Nothing is stored in the gateway, so any
process holding the key can serve the session, and a restart with a configured
`session_secret` keeps sessions working. A tampered, truncated or foreign id fails the
signature check (`InvalidSession`), which the gateway answers with 404 as the MCP spec says
for an unknown session; the client then starts a new one.

The ids are signed, not encrypted: a client can read the servers' session ids (base64), but
cannot reach the servers with them (it does not hold their credentials), and cannot alter
them. Ids only contain visible ASCII, as the spec requires.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

__all__ = ["SESSION_HEADER", "GatewaySession", "InvalidSession", "ServerSession", "SessionCodec", "session_digest"]

SESSION_HEADER: Final = "Mcp-Session-Id"  # the header carrying a client's gateway session id

_DOMAIN: Final = b"extproc-mcp-session.v1."
_VERSION: Final = 1
NONCE_BYTES: Final = 16  # 128 random bits per session id
MAX_TOKEN_CHARS: Final = 16 * 1024  # longer ids are refused before any decoding


class InvalidSession(ValueError):
    """Not a session id this gateway issued (tampered, truncated, another key, malformed)."""


@dataclass(frozen=True, slots=True)
class ServerSession:
    session_id: str | None  # the server's Mcp-Session-Id; None when it issued none (stateless server)
    protocol_version: str | None  # what the server answered to initialize


@dataclass(frozen=True, slots=True)
class GatewaySession:
    route: str  # the route path the session was started on
    protocol_version: str | None  # what the gateway answered the client
    servers: dict[str, ServerSession] = field(default_factory=dict)  # servers that joined the session


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text.isascii():
        raise InvalidSession("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidSession("not base64url") from None


class SessionCodec:
    """Signs and checks gateway session ids with one HMAC key."""

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes | None = None) -> None:
        """`secret`: the configured session_secret; None draws a random key (sessions then
        end with the process)."""
        if secret is None:
            key = os.urandom(32)
        elif isinstance(secret, str):
            key = secret.encode("utf-8")
        else:
            key = bytes(secret)
        if not key:
            raise ValueError("the session secret must not be empty")
        self._key = key

    def _sign(self, payload_part: bytes) -> bytes:
        return hmac.new(self._key, _DOMAIN + payload_part, hashlib.sha256).digest()

    def encode(self, session: GatewaySession) -> str:
        """A new signed id for `session`; two calls never return the same id (fresh nonce)."""
        payload: dict[str, Any] = {
            "v": _VERSION,
            "n": _b64encode(os.urandom(NONCE_BYTES)),
            "r": session.route,
            "p": session.protocol_version,
            "s": {name: [s.session_id, s.protocol_version] for name, s in session.servers.items()},
        }
        payload_part = _b64encode(orjson.dumps(payload)).encode("ascii")
        return f"{payload_part.decode('ascii')}.{_b64encode(self._sign(payload_part))}"

    def decode(self, token: str) -> GatewaySession:
        """The session a client's `Mcp-Session-Id` stands for; raises InvalidSession."""
        if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise InvalidSession("malformed session id")
        payload_part, dot, signature_part = token.partition(".")
        if not dot or not payload_part or not signature_part:
            raise InvalidSession("malformed session id")
        signature = _b64decode(signature_part)
        if not hmac.compare_digest(signature, self._sign(payload_part.encode("ascii"))):
            raise InvalidSession("bad signature")
        # Signed by us: anything below failing means a bug or an old format, not an attack.
        # The nonce "n" only makes the id unique; ids issued before it existed still decode.
        try:
            payload = orjson.loads(_b64decode(payload_part))
            if payload.get("v") != _VERSION:
                raise InvalidSession("unsupported session format")
            servers = {
                str(name): ServerSession(entry[0], entry[1]) for name, entry in dict(payload["s"]).items()
            }
            return GatewaySession(route=str(payload["r"]), protocol_version=payload.get("p"), servers=servers)
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
            if isinstance(exc, InvalidSession):
                raise
            raise InvalidSession("malformed session payload") from None

    def decode_for_route(self, token: str, route: str) -> GatewaySession | None:
        """The session `token` stands for when it is one of `route`'s (a route path), else
        None: unknown to that route, which the gateway answers with 404."""
        try:
            session = self.decode(token)
        except InvalidSession:
            return None
        return session if session.route == route else None


def session_digest(token: str) -> str:
    """A short stable stand-in for a session id in spans and logs (the id itself carries
    the servers' session ids, which do not belong in a trace backend)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:32]
