"""How the gateway proves itself to each backend: one object per credential kind.

Built once per config (with the backend's routing target) and used by both stages, so a
credential is put on a request in one place whatever the path: a plain key in a header
(OpenAI's bearer token, Azure's `api-key`, Anthropic's `x-api-key`, Gemini's
`x-goog-api-key`), an AWS SigV4 signature over the final body, or a Google access token.
Keys live only inside these objects; their reprs say `<redacted>`. Credentials that must
be found or refreshed (`DeferredAuth`: AWS's chain, Google's tokens) are never found on
the event loop (`aws_credentials.ChainCredentials`, `gcp_credentials.GoogleTokens` do it
in a thread).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

from pydantic import SecretStr

from extproc import aws_credentials, gcp_credentials
from extproc.aws_credentials import AwsKeys
from extproc.config import AWS_SECRET_SEPARATOR, VERTEX_CREDENTIALS_SUFFIX, Backend, Schema

if TYPE_CHECKING:
    from extproc.config import AwsSettings

# Headers one credential kind or another sets: an attempt removes those its backend does
# not use, since a header set for an earlier attempt (another backend) is still there.
CREDENTIAL_HEADERS = (
    "authorization", "x-api-key", "api-key", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256",
    "proxy-authorization", "x-goog-api-key",
)


class BackendAuth:
    """No credentials: the backend needs none (a local model server, the demo)."""

    __slots__ = ()

    def headers(self) -> tuple[tuple[str, bytes], ...]:
        """The credential headers to set on every request to this backend."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<redacted>)"


class HeaderKey(BackendAuth):
    """A key sent as is in one header (optionally after a scheme such as `Bearer `)."""

    __slots__ = ("_headers",)

    def __init__(self, header: str, key: SecretStr, scheme: bytes = b"") -> None:
        self._headers = ((header, scheme + key.get_secret_value().encode()),)

    def headers(self) -> tuple[tuple[str, bytes], ...]:
        return self._headers


def bearer(key: SecretStr) -> HeaderKey:
    """OpenAI and every OpenAI-compatible server: `Authorization: Bearer <key>`."""
    return HeaderKey("authorization", key, b"Bearer ")


def azure_key(key: SecretStr) -> HeaderKey:
    """Azure OpenAI: `api-key: <key>`."""
    return HeaderKey("api-key", key)


def anthropic_key(key: SecretStr) -> HeaderKey:
    """Anthropic: `x-api-key: <key>`."""
    return HeaderKey("x-api-key", key)


def google_key(key: SecretStr) -> HeaderKey:
    """Google AI Studio's Gemini API: `x-goog-api-key: <key>` (as the google-genai SDK sends it)."""
    return HeaderKey("x-goog-api-key", key)


C = TypeVar("C")


class DeferredAuth(BackendAuth, Generic[C]):
    """Credentials put on each request by the upstream stage once they are at hand: it
    takes `now()` (in memory, no I/O) and, only when that is None, awaits `wait()` while
    the event loop serves other streams; `headers_for` then makes the request's headers."""

    __slots__ = ()

    def now(self) -> C | None:
        """The credentials to use right now, without waiting; None: await `wait`."""
        raise NotImplementedError

    async def wait(self) -> C | None:
        """The credentials once found or refreshed off the loop (None: there are none)."""
        raise NotImplementedError

    def headers_for(self, url: str, body: bytes, credentials: C) -> list[tuple[str, bytes]]:
        """The credential headers for a JSON POST of exactly `body` to `url`."""
        raise NotImplementedError

    def unavailable(self, backend: str) -> str:
        """The client's 503 message when `wait` found none (the log says why)."""
        raise NotImplementedError


class SigV4(DeferredAuth[AwsKeys]):
    """AWS Signature Version 4 (Bedrock): configured keys, or botocore's default chain."""

    __slots__ = ("region", "_keys")

    def __init__(self, region: str, keys: AwsKeys | None) -> None:
        self.region = region
        self._keys = keys  # None: the chain's, resolved off the event loop

    def now(self) -> AwsKeys | None:
        """Keys to sign with right now; None when the chain must first find or refresh them."""
        return self._keys if self._keys is not None else aws_credentials.shared().current()

    async def wait(self) -> AwsKeys | None:
        return self._keys if self._keys is not None else await aws_credentials.shared().get()

    def unavailable(self, backend: str) -> str:
        return f"No AWS credentials are available to sign requests for {backend}."

    def headers_for(self, url: str, body: bytes, keys: AwsKeys) -> list[tuple[str, bytes]]:
        """The signature headers for a JSON POST of exactly `body` to `url`."""
        from extproc import sigv4  # botocore: loaded only by workers that sign

        signed = sigv4.sign(
            "POST", url, {"content-type": "application/json"}, body, self.region, keys.access_key, keys.secret_key,
            keys.token,
        )
        return [(k.lower(), v.encode()) for k, v in signed.items()]


class GoogleBearer(DeferredAuth[str]):
    """Google Cloud (Vertex AI): an OAuth access token from google-auth, refreshed off
    the event loop before it expires, sent as `Authorization: Bearer`."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: gcp_credentials.GoogleTokens) -> None:
        self._tokens = tokens

    def now(self) -> str | None:
        return self._tokens.current()

    async def wait(self) -> str | None:
        return await self._tokens.get()

    def headers_for(self, url: str, body: bytes, token: str) -> list[tuple[str, bytes]]:
        return [("authorization", b"Bearer " + token.encode())]

    def unavailable(self, backend: str) -> str:
        return f"No Google Cloud access token is available for {backend}; the gateway's log says why."


# The header (and scheme) a plain key goes in, per schema that takes one: the configured
# key, or a client's own (`client_key_header`, bring your own key).
KEY_HEADERS: dict[Schema, tuple[str, bytes]] = {
    Schema.openai: ("authorization", b"Bearer "),
    Schema.azure_openai: ("api-key", b""),
    Schema.anthropic: ("x-api-key", b""),
    Schema.gemini: ("x-goog-api-key", b""),
}


def auth_for(backend: Backend, secrets: Mapping[str, SecretStr]) -> BackendAuth:
    """The credential object for `backend`, from the secrets the config resolved."""
    if backend.schema_ is Schema.aws_bedrock:
        aws = backend.aws
        assert aws is not None  # the config requires it for Bedrock
        return SigV4(aws.region, _aws_keys(backend.name, aws, secrets))
    if backend.schema_ is Schema.gcp_vertex_ai:
        key = secrets.get(backend.name + VERTEX_CREDENTIALS_SUFFIX)
        if key is None:
            return GoogleBearer(gcp_credentials.shared_default())
        return GoogleBearer(gcp_credentials.for_json(key.get_secret_value(), f"backend {backend.name}"))
    key = secrets.get(backend.name)
    if key is None:
        return BackendAuth()
    header, scheme = KEY_HEADERS[backend.schema_]
    return HeaderKey(header, key, scheme)


def _aws_keys(name: str, aws: AwsSettings, secrets: Mapping[str, SecretStr]) -> AwsKeys | None:
    prefix = name + AWS_SECRET_SEPARATOR
    access = secrets.get(prefix + "access_key_id")
    if access is None:
        return None
    token = secrets.get(prefix + "session_token")
    return AwsKeys(access.get_secret_value(), secrets[prefix + "secret_access_key"].get_secret_value(),
                   token.get_secret_value() if token else None)
