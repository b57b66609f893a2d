"""Google's OAuth token endpoint, simulated: service-account JWTs in, access tokens out.

A service-account key file names its `token_uri`; google-auth signs a JWT with the key
(RS256: iss = the account's email, aud = the token_uri, scope, iat, exp) and posts it
as `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>`. This
endpoint (`POST /token`) checks that assertion as Google does, against the public key a
test registered for the account (`GoogleAccounts.register`), and issues an opaque
bearer token the simulated Google APIs (``vertex_api``) then require. So a test proves
the gateway obtained its token with the configured key, not that it sent some string.

Errors are the OAuth shape (`{"error": "invalid_grant", "error_description": ...}`);
`GoogleAccounts.fail_status` makes the endpoint answer that status instead (a token
endpoint outage). No network: everything stays in the simulator's process.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

TOKEN_PATH = "/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
MAX_ASSERTION_LIFETIME_S = 3600  # Google refuses assertions valid for longer
CLOCK_SKEW_S = 300
TOKEN_LIFETIME_S = 3599  # what Google's endpoint says (expires_in)
# The audience Google requires in the assertion (google-auth sends it whatever the token_uri).
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


@dataclass
class GoogleAccounts:
    """The service accounts the simulator knows, and the tokens it issued (live settings)."""

    public_keys: dict[str, bytes] = field(default_factory=dict)  # client_email -> PEM public key
    issued: dict[str, Issued] = field(default_factory=dict)  # by token
    fail_status: int | None = None  # the token endpoint answers this instead (e.g. 503)
    token_lifetime_s: int = TOKEN_LIFETIME_S
    token_requests: int = 0  # assertions received, valid or not

    def register(self, client_email: str, public_key_pem: bytes) -> None:
        """Accept JWTs signed by this account's key."""
        self.public_keys[client_email] = public_key_pem

    def token_of(self, authorization: str | None) -> Issued | None:
        """What a valid `Bearer` token was issued as (None: missing, unknown, expired)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        found = self.issued.get(token.strip())
        if found is None or found.expires_at <= time.time():
            return None
        return found


@dataclass(frozen=True)
class Issued:
    """An access token the endpoint issued."""

    client_email: str
    expires_at: float  # epoch seconds
    scopes: frozenset[str]


class _Refused(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _verify(assertion: str, accounts: GoogleAccounts, audiences: tuple[str, ...]) -> dict[str, Any]:
    """The claims of a JWT-bearer assertion whose RS256 signature, issuer, audience,
    scope and times check out; else the OAuth error Google gives."""
    try:
        header_b64, claims_b64, signature_b64 = assertion.split(".")
        header = orjson.loads(_b64url(header_b64))
        claims = orjson.loads(_b64url(claims_b64))
        signature = _b64url(signature_b64)
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        raise _Refused(400, "invalid_grant", "Invalid JWT: Token must be a short-lived token and in a reasonable "
                       "timeframe.") from None
    if not isinstance(header, dict) or header.get("alg") != "RS256" or not isinstance(claims, dict):
        raise _Refused(400, "invalid_grant", "Invalid JWT: the algorithm must be RS256.")
    pem = accounts.public_keys.get(claims.get("iss"))  # type: ignore[arg-type]
    if pem is None:
        raise _Refused(400, "invalid_grant", "Invalid grant: account not found")
    public_key = serialization.load_pem_public_key(pem)
    assert isinstance(public_key, rsa.RSAPublicKey)
    try:
        public_key.verify(signature, f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise _Refused(400, "invalid_grant", "Invalid JWT Signature.") from None
    if claims.get("aud") not in audiences:
        raise _Refused(400, "invalid_grant", f"Invalid JWT: the audience must be {audiences[0]}.")
    now = time.time()
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int) or not isinstance(exp, int) or not (
        iat - CLOCK_SKEW_S <= now < exp and exp - iat <= MAX_ASSERTION_LIFETIME_S
    ):
        raise _Refused(400, "invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in "
                       "a reasonable timeframe. Check your iat and exp values in the JWT claim.")
    if not str(claims.get("scope", "")).split():
        raise _Refused(400, "invalid_scope", "Invalid OAuth scope or ID token audience provided.")
    return claims


async def token_endpoint(request: web.Request, accounts: GoogleAccounts) -> web.Response:
    """``POST /token``: a JWT-bearer grant in, `{"access_token", "expires_in", "token_type"}` out."""
    try:
        if request.method != "POST":
            raise _Refused(405, "invalid_request", "Use POST.")
        accounts.token_requests += 1
        if accounts.fail_status is not None:
            raise _Refused(accounts.fail_status, "internal_failure", "The token service is unavailable.")
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            raise _Refused(400, "unsupported_grant_type", "Invalid grant_type.")
        assertion = form.get("assertion")
        if not isinstance(assertion, str):
            raise _Refused(400, "invalid_request", "Missing required parameter: assertion")
        claims = _verify(assertion, accounts, (GOOGLE_TOKEN_AUDIENCE, f"{request.scheme}://{request.host}{TOKEN_PATH}"))
        token = "ya29.sim-" + secrets.token_urlsafe(32)
        accounts.issued[token] = Issued(claims["iss"], time.time() + accounts.token_lifetime_s,
                                        frozenset(str(claims["scope"]).split()))
        body = {"access_token": token, "expires_in": accounts.token_lifetime_s, "token_type": "Bearer"}
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    except _Refused as exc:
        body = {"error": exc.error, "error_description": exc.description}
        return web.Response(status=exc.status, body=orjson.dumps(body), content_type="application/json")


def service_account_key(client_email: str, token_uri: str, project_id: str = "sim-project") -> tuple[dict[str, Any], bytes]:
    """A fresh service-account key file's JSON (as Google's console downloads it, with
    `token_uri` pointing where the test says) and its public key PEM to `register`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": private_pem,
        "client_email": client_email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "universe_domain": "googleapis.com",
    }
    return info, public_pem
