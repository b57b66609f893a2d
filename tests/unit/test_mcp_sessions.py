"""extproc.mcp.sessions: signed, stateless gateway session ids."""

from __future__ import annotations

import base64

import orjson
import pytest

from extproc.mcp.sessions import GatewaySession, InvalidSession, ServerSession, SessionCodec, session_digest

SESSION = GatewaySession(
    route="/mcp",
    protocol_version="2025-11-25",
    servers={"a": ServerSession("4f1c", "2025-11-25"), "b": ServerSession(None, "2025-06-18")},
)


def test_round_trip() -> None:
    codec = SessionCodec("k" * 32)
    token = codec.encode(SESSION)
    assert codec.decode(token) == SESSION
    # Visible ASCII only, as the spec requires of session ids; no padding.
    assert all(0x21 <= ord(c) <= 0x7E for c in token) and "=" not in token


def test_every_id_is_new() -> None:
    """The same session contents (e.g. stateless servers: no server session ids) still give
    every client its own id: a random nonce is signed into each."""
    codec = SessionCodec("k")
    stateless = GatewaySession("/mcp", "2025-11-25", {"a": ServerSession(None, "2025-11-25")})
    tokens = {codec.encode(stateless) for _ in range(1000)}
    assert len(tokens) == 1000
    assert len({_payload(token)["n"] for token in tokens}) == 1000
    assert all(codec.decode(token) == stateless for token in tokens)


def test_any_process_with_the_key_can_serve_it() -> None:
    token = SessionCodec("shared-secret").encode(SESSION)
    assert SessionCodec("shared-secret").decode(token) == SESSION
    assert SessionCodec(b"shared-secret").decode(token) == SESSION
    with pytest.raises(InvalidSession):
        SessionCodec("another-secret").decode(token)


def test_random_key_by_default() -> None:
    token = SessionCodec().encode(SESSION)
    with pytest.raises(InvalidSession):
        SessionCodec().decode(token)


def _payload(token: str) -> dict:
    part = token.split(".")[0]
    return orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _encode_payload(payload: dict) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()


def test_tampered_ids_are_refused() -> None:
    codec = SessionCodec("k")
    token = codec.encode(SESSION)
    payload_part, signature = token.split(".")
    # Point server a at another session id, keep the signature.
    payload = _payload(token)
    payload["s"]["a"][0] = "someone-elses-session"
    forged = f"{_encode_payload(payload)}.{signature}"
    # Route swap, signature flip, truncation, garbage.
    payload = _payload(token)
    payload["r"] = "/admin-mcp"
    rerouted = f"{_encode_payload(payload)}.{signature}"
    flipped = f"{payload_part}.{signature[:-2]}{'A' if signature[-2] != 'A' else 'B'}{signature[-1]}"
    payload = _payload(token)
    payload["n"] = _payload(codec.encode(SESSION))["n"]  # another session's nonce
    renonced = f"{_encode_payload(payload)}.{signature}"
    for bad in (forged, rerouted, renonced, flipped, token[:-5], payload_part, f"{payload_part}.", f".{signature}",
                "not-a-session", "", "é.é", "x" * 20000, token + "x"):
        with pytest.raises(InvalidSession):
            codec.decode(bad)


def test_signed_but_malformed_payload() -> None:
    codec = SessionCodec("k")
    sign = codec._sign  # noqa: SLF001 - build ids the gateway would never issue
    for payload in ({"v": 2, "r": "/mcp", "p": None, "s": {}}, {"v": 1}, {"v": 1, "r": "/mcp", "s": {"a": 5}}):
        part = _encode_payload(payload).encode()
        token = f"{part.decode()}.{base64.urlsafe_b64encode(sign(part)).rstrip(b'=').decode()}"
        with pytest.raises(InvalidSession):
            codec.decode(token)


def test_ids_issued_before_the_nonce_still_decode() -> None:
    """A gateway upgraded with the same session_secret keeps its clients' sessions."""
    codec = SessionCodec("k")
    payload = _payload(codec.encode(SESSION))
    del payload["n"]
    part = _encode_payload(payload).encode()
    token = f"{part.decode()}.{base64.urlsafe_b64encode(codec._sign(part)).rstrip(b'=').decode()}"  # noqa: SLF001
    assert codec.decode(token) == SESSION


def test_empty_secret_refused() -> None:
    with pytest.raises(ValueError):
        SessionCodec("")


def test_digest() -> None:
    token = SessionCodec("k").encode(SESSION)
    assert session_digest(token) == session_digest(token)
    assert len(session_digest(token)) == 32 and "4f1c" not in session_digest(token)
