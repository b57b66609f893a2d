"""Keep credentials out of logs.

Two tools, for two ways a credential could reach a log line:

* `redact_headers` for code that logs request or response headers on purpose
  (e.g. a DEBUG dump): credential headers keep their name (and, for
  ``authorization``, their scheme) but lose their value.
* `SecretScrubber`, a `logging.Filter` installed at start-up on the processor's log
  handlers (`install_secret_scrubber`): any resolved provider secret that still finds
  its way into a message, its arguments or an exception's text is replaced with
  ``<redacted>`` before the line is written.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extproc.config import LoadedConfig

__all__ = [
    "MAX_HEADER_VALUE_CHARS",
    "MIN_SECRET_CHARS",
    "REDACTED",
    "SecretScrubber",
    "config_secrets",
    "install_secret_scrubber",
    "is_credential_header",
    "redact_headers",
]

REDACTED = "<redacted>"
MAX_HEADER_VALUE_CHARS = 256
MIN_SECRET_CHARS = 8  # shorter "secrets" would match ordinary words and numbers

_CREDENTIAL_HEADERS = frozenset({
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "set-cookie",
    "x-amz-security-token",
})
_SCHEMED_HEADERS = frozenset({"authorization", "proxy-authorization"})
_CREDENTIAL_WORDS = ("secret", "token", "key")
_GATEWAY_PREFIX = "x-ai-eg-"  # the gateway's own internal headers carry no credentials
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9._~+/-]{0,63}")  # "Bearer", "Basic", "AWS4-HMAC-SHA256", ...
# Environment variables botocore's chain reads when a Bedrock backend names no keys.
_AWS_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def is_credential_header(name: str) -> bool:
    """True for headers whose value is (or may be) a credential."""
    lowered = name.lower()
    if lowered in _CREDENTIAL_HEADERS:
        return True
    if lowered.startswith(_GATEWAY_PREFIX):
        return False
    return any(word in lowered for word in _CREDENTIAL_WORDS)


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


def _redacted_value(name: str, value: str) -> str:
    if name in _SCHEMED_HEADERS:
        scheme, space, _credential = value.strip().partition(" ")
        if space and _SCHEME.fullmatch(scheme):
            return f"{scheme} {REDACTED}"
    return REDACTED


def redact_headers(headers: Mapping[str, bytes | str]) -> dict[str, str]:
    """Headers safe to log: credential values replaced by ``<redacted>`` (``authorization``
    keeps its scheme: ``Bearer <redacted>``); other values decoded as latin-1 and cut to
    `MAX_HEADER_VALUE_CHARS` characters."""
    out: dict[str, str] = {}
    for name, raw in headers.items():
        key = _text(name)
        if is_credential_header(key):
            out[key] = _redacted_value(key.lower(), _text(raw))
        else:
            out[key] = _text(raw)[:MAX_HEADER_VALUE_CHARS]
    return out


class SecretScrubber(logging.Filter):
    """Replaces every known secret in a log record with ``<redacted>``.

    The record's message is formatted here, once (``msg`` becomes the final text and
    ``args`` is emptied, so the handler does not format it again); exception and stack
    text is formatted into ``exc_text`` / scrubbed in place. Secrets shorter than
    `MIN_SECRET_CHARS` are ignored. With no secret in a record the cost is one regular
    expression search over its text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        kept = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_CHARS}
        # Longest first, so a secret containing another is replaced whole.
        self.secrets: tuple[str, ...] = tuple(sorted(kept, key=lambda s: (-len(s), s)))
        self._pattern = re.compile("|".join(re.escape(s) for s in self.secrets)) if self.secrets else None

    def scrub(self, text: str) -> str:
        """`text` with every secret replaced (the same object when there is none)."""
        if self._pattern is None or not self._pattern.search(text):
            return text
        return self._pattern.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return True
        record.msg = self.scrub(message)
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = _format_exception(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True


def _format_exception(exc_info: object) -> str:
    """As logging.Formatter.formatException formats it."""
    if not isinstance(exc_info, tuple):
        return ""
    text = "".join(traceback.format_exception(*exc_info))
    return text.removesuffix("\n")


def config_secrets(loaded: LoadedConfig, environ: Mapping[str, str] | None = None) -> set[str]:
    """Every secret the gateway holds for `loaded`: each resolved backend credential, each
    tenancy API key, and AWS keys botocore's chain would take from the environment for a
    Bedrock backend that names none."""
    env = os.environ if environ is None else environ
    found = {secret.get_secret_value() for secret in loaded.secrets.values()}
    tenancy = loaded.config.tenancy
    if tenancy is not None:
        for entry in tenancy.api_keys:
            try:
                found.add(entry.key.resolve(env).get_secret_value())
            except ValueError:  # load_config already refused unresolvable keys
                continue
    from extproc.config import ConfigError, Schema

    if loaded.config.mcp is not None:  # the MCP servers' keys and the session secret
        from extproc.mcp.config import resolve_mcp_secrets

        try:
            found.update(resolve_mcp_secrets(loaded.config.mcp, env).values())
        except ConfigError:  # reported where the gateway starts; nothing to scrub then
            pass

    if any(b.schema_ is Schema.aws_bedrock and b.aws is not None and b.aws.secret_access_key is None
           for b in loaded.config.backends):
        found.update(value for name in _AWS_ENV_SECRETS if (value := env.get(name, "").strip()))
    return {s for s in found if len(s) >= MIN_SECRET_CHARS}


def install_secret_scrubber(loaded: LoadedConfig, environ: Mapping[str, str] | None = None) -> SecretScrubber:
    """Attach a `SecretScrubber` for `loaded`'s secrets to every handler of the root logger
    (and of the ``extproc`` logger) present now, and to the ``extproc`` logger itself.
    Calling it again replaces the earlier scrubber. Handlers added later are not covered."""
    scrubber = SecretScrubber(config_secrets(loaded, environ))
    package = logging.getLogger("extproc")
    targets: list[logging.Filterer] = [*logging.getLogger().handlers, *package.handlers, package]
    for target in targets:
        for old in [f for f in target.filters if isinstance(f, SecretScrubber)]:
            target.removeFilter(old)
        target.addFilter(scrubber)
    return scrubber
