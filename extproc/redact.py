"""Keep credentials out of logs.

Three tools, for the ways a credential could reach a log line:

* `redact_headers` for code that logs request or response headers on purpose
  (e.g. a DEBUG dump): credential headers keep their name (and, for
  ``authorization``, their scheme) but lose their value.
* `SecretScrubber`, a `logging.Filter` installed at start-up on the processor's log
  handlers (`install_secret_scrubber`), and the function `extproc run` applies to every
  line it forwards: any resolved provider secret that still finds its way into a text
  is replaced with ``<redacted>``, and so is the value of every credential header
  printed in one of the forms logs print headers in (`redact_header_fields`), known
  secret or not: a client's own key, or temporary AWS credentials botocore found.
* `LineScrubber`, the same for a stream of lines (a child's stderr), which also
  catches the form Envoy's ext_proc debug dump spreads over two lines.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import orjson

from extproc.contract import GATEWAY_HEADER_PREFIX

if TYPE_CHECKING:
    from extproc.config import GatewayConfig, LoadedConfig

__all__ = [
    "MAX_HEADER_VALUE_CHARS",
    "MIN_SECRET_CHARS",
    "REDACTED",
    "LineScrubber",
    "SecretScrubber",
    "config_secrets",
    "install_secret_scrubber",
    "is_credential_header",
    "redact_header_fields",
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
    "x-goog-api-key",
    "cookie",
    "set-cookie",
    "x-amz-security-token",
})
_SCHEMED_HEADERS = frozenset({"authorization", "proxy-authorization"})
_CREDENTIAL_WORDS = ("secret", "token", "key")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9._~+/-]{0,63}")  # "Bearer", "Basic", "AWS4-HMAC-SHA256", ...
# Header fields as logs print them. A name matching _NAME may be a credential header;
# `is_credential_header` decides (every credential header name holds one of these words).
# Only the words ignore case: a case-insensitive pattern is several times slower to scan.
_WORDS = ("key", "token", "cookie", "secret", "authorization")
_NAME = rf"[A-Za-z0-9_-]*(?i:{'|'.join(_WORDS)})[A-Za-z0-9_-]*"
# The test after the substring tests, on the lower-cased text: a credential word ending a
# name that a quote or a colon follows. Most lines hold no such word and are left alone.
_CANDIDATE = re.compile(rf"(?:{'|'.join(_WORDS)})[a-z0-9_-]*(?:['\"]|[ \t]*:)")
_FIELD_FORMS = (
    # Envoy's header-map dump, one header a line: 'authorization', 'Bearer sk-...'
    # (the value runs to the line's last quote: Envoy does not escape quotes in it).
    re.compile(rf"^(?P<head>[ \t]*'(?P<name>{_NAME})', ')(?P<value>.*)(?P<tail>'[ \t]*)$", re.M),
    # Python and JSON mappings: {'x-api-key': '...'}, {b'cookie': b'...'}, "api-key": "...",
    # <CIMultiDict('Authorization': '...')>
    # (a quoted name right after a colon is a value, not a name).
    re.compile(
        rf"""(?<![:\w])(?<!: )(?P<head>b?(?P<q>['"])(?P<name>{_NAME})(?P=q)[ \t]*:[ \t]*b?(?P<vq>['"]))"""
        rf"""(?P<value>.*?)(?P<tail>(?P=vq))(?=[ \t]*(?:[,)}}]|$))""",
        re.M,
    ),
    # Python pairs: ('authorization', 'Bearer ...'), (b'cookie', b'...')
    re.compile(
        rf"""(?P<head>\([ \t]*b?(?P<q>['"])(?P<name>{_NAME})(?P=q),[ \t]*b?(?P<vq>['"]))"""
        rf"""(?P<value>.*?)(?P<tail>(?P=vq)[ \t]*\))"""
    ),
    # Protobuf text (an ext_proc header mutation): key: "authorization" raw_value: "..."
    re.compile(rf'(?P<head>key:\s*"(?P<name>{_NAME})"\s*(?:raw_)?value:\s*")(?P<value>(?:[^"\\]|\\.)*)(?P<tail>")'),
    # HTTP / SigV4 canonical form at the start of a line: x-amz-security-token:FwoG...
    re.compile(rf"^(?P<head>[ \t]*(?P<name>{_NAME})[ \t]*:[ \t]*)(?P<value>\S.*?)(?P<tail>[ \t]*)$", re.M),
)
_PROTO_FIELDS = frozenset({"key", "value", "raw_value"})  # `key: "..."` is protobuf text, not a header
# Envoy prints a protobuf header on two lines: `key: "authorization"`, then `raw_value: "..."`.
_PROTO_KEY_LINE = re.compile(rf'^\s*key:\s*"(?P<name>{_NAME})"\s*$')
_PROTO_VALUE_LINE = re.compile(r'^(?P<head>\s*(?:raw_)?value:\s*")(?P<value>(?:[^"\\]|\\.)*)(?P<tail>"\s*)$')
# Environment variables botocore's chain reads when a Bedrock backend names no keys.
_AWS_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def is_credential_header(name: str) -> bool:
    """True for headers whose value is (or may be) a credential."""
    lowered = name.lower()
    if lowered in _CREDENTIAL_HEADERS:
        return True
    if lowered.startswith(GATEWAY_HEADER_PREFIX):
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


def _redact_field(match: re.Match[str]) -> str:
    name = match["name"]
    if name.lower() in _PROTO_FIELDS or not is_credential_header(name):
        return match[0]
    return match["head"] + _redacted_value(name.lower(), match["value"]) + match["tail"]


def _may_print_a_credential(text: str) -> bool:
    lowered = text.lower()
    for word in _WORDS:  # substring tests first: far cheaper than a regular expression
        if word in lowered:
            return _CANDIDATE.search(lowered) is not None
    return False


def redact_header_fields(text: str) -> str:
    """`text` with the value of every credential header it prints redacted, whatever the
    value (the same object when there is none). Recognised forms: Envoy's header dump
    (``'name', 'value'``), Python and JSON mappings and pairs (``'name': 'value'``,
    ``('name', b'value')``), protobuf text
    (``key: "name" raw_value: "value"``) and ``name: value`` at the start of a line."""
    if not _may_print_a_credential(text):
        return text  # the common case: nothing copied
    for form in _FIELD_FORMS:
        text = form.sub(_redact_field, text)
    return text


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
    """Replaces every known secret and every credential header's value in a log record
    with ``<redacted>``.

    The record's message is formatted here, once (``msg`` becomes the final text and
    ``args`` is emptied, so the handler does not format it again); exception and stack
    text is formatted into ``exc_text`` / scrubbed in place. Secrets shorter than
    `MIN_SECRET_CHARS` are ignored. A text with no secret and no credential word costs
    one regular expression search and five substring tests."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        kept = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_CHARS}
        # Longest first, so a secret containing another is replaced whole.
        self.secrets: tuple[str, ...] = tuple(sorted(kept, key=lambda s: (-len(s), s)))
        self._pattern = re.compile("|".join(re.escape(s) for s in self.secrets)) if self.secrets else None

    def scrub(self, text: str) -> str:
        """`text` with every known secret and credential header value replaced (the same
        object when there is none)."""
        if self._pattern is not None and self._pattern.search(text):
            text = self._pattern.sub(REDACTED, text)
        return redact_header_fields(text)

    def filter(self, record: logging.LogRecord) -> bool:
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


class LineScrubber:
    """`SecretScrubber.scrub` for one stream of lines (a child process's stderr), which
    also redacts the value line that follows a protobuf ``key: "<credential header>"``
    line: Envoy's debug log prints each header of an ext_proc mutation that way. One per
    stream: it remembers the previous line."""

    __slots__ = ("_scrub", "_credential_key")

    def __init__(self, scrubber: SecretScrubber) -> None:
        self._scrub = scrubber.scrub
        self._credential_key: str | None = None  # the header the previous line named

    def __call__(self, line: str) -> str:
        header, self._credential_key = self._credential_key, None
        line = self._scrub(line)
        if header is not None and (value := _PROTO_VALUE_LINE.match(line)):
            return value["head"] + _redacted_value(header, value["value"]) + value["tail"]
        if (key := _PROTO_KEY_LINE.match(line)) and is_credential_header(key["name"]):
            self._credential_key = key["name"].lower()
        return line


def _format_exception(exc_info: object) -> str:
    """As logging.Formatter.formatException formats it."""
    if not isinstance(exc_info, tuple):
        return ""
    text = "".join(traceback.format_exception(*exc_info))
    return text.removesuffix("\n")


_GOOGLE_SECRET_FIELDS = ("private_key", "private_key_id", "refresh_token", "client_secret")


def _google_credential_secrets(text: str) -> list[str]:
    """The secret values inside a Google credential JSON (its key, refresh token...)."""
    if not text.startswith("{"):
        return []
    try:
        info = orjson.loads(text)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(info, dict):
        return []
    return [value for name in _GOOGLE_SECRET_FIELDS if isinstance(value := info.get(name), str)]


def config_secrets(loaded: LoadedConfig, environ: Mapping[str, str] | None = None) -> set[str]:
    """Every secret the gateway holds for `loaded`: each resolved backend credential, each
    tenancy API key, the secret fields of a Google credential JSON, and AWS keys botocore's
    chain would take from the environment for a Bedrock backend that names none."""
    env = os.environ if environ is None else environ
    found = {secret.get_secret_value() for secret in loaded.secrets.values()}
    for secret in loaded.secrets.values():
        found.update(_google_credential_secrets(secret.get_secret_value()))
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

    found.update(_redis_passwords(loaded.config))
    if any(b.schema_ is Schema.aws_bedrock and b.aws is not None and b.aws.secret_access_key is None
           for b in loaded.config.backends):
        found.update(value for name in _AWS_ENV_SECRETS if (value := env.get(name, "").strip()))
    return {s for s in found if len(s) >= MIN_SECRET_CHARS}


def _redis_passwords(config: GatewayConfig) -> set[str]:
    """Passwords in the Redis URLs the config names (state, budgets, the key store): a
    connection error may print its URL."""
    from urllib.parse import urlsplit

    key_store = config.tenancy.key_store if config.tenancy is not None else None
    urls = [config.state.redis, config.ratelimit.store,
            key_store.redis.url if key_store is not None and key_store.redis is not None else None]
    found = set()
    for url in urls:
        if url and url.startswith(("redis://", "rediss://")):
            try:
                password = urlsplit(url).password
            except ValueError:  # a malformed port: there is still no password to find
                continue
            if password:
                found.add(password)
    return found


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
