"""extproc.redact: credential headers and known secrets never reach a log line."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.cli import main
from extproc.config import load_config, parse_config
from extproc.redact import (
    MAX_HEADER_VALUE_CHARS,
    REDACTED,
    LineScrubber,
    SecretScrubber,
    config_secrets,
    install_secret_scrubber,
    is_credential_header,
    redact_header_fields,
    redact_headers,
)

SECRET = "sk-live-7f3a9c-DO-NOT-LEAK"
OTHER = "azure-key-0123456789abcdef"

# -- redact_headers ------------------------------------------------------------------------


def test_credential_values_are_redacted() -> None:
    headers = {
        "x-api-key": SECRET.encode(),
        "api-key": OTHER,
        "cookie": b"session=abc123456789",
        "set-cookie": b"id=zzz; HttpOnly",
        "x-amz-security-token": b"FwoGZXIvYXdzEJr//////////",
        "x-goog-api-key": b"AIzaSyExample1234",
        "x-client-secret": b"hunter2hunter2",
        "x-refresh-token": b"rt-123456789",
        "Proxy-Authorization": b"Basic dXNlcjpwYXNz",
    }
    out = redact_headers(headers)
    assert out["x-api-key"] == REDACTED
    assert out["api-key"] == REDACTED
    assert out["cookie"] == REDACTED
    assert out["set-cookie"] == REDACTED
    assert out["x-amz-security-token"] == REDACTED
    assert out["x-goog-api-key"] == REDACTED
    assert out["x-client-secret"] == REDACTED
    assert out["x-refresh-token"] == REDACTED
    assert out["Proxy-Authorization"] == f"Basic {REDACTED}"
    assert SECRET not in repr(out) and OTHER not in repr(out)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"Bearer {SECRET}".encode(), f"Bearer {REDACTED}"),
        (b"bearer sk-lowercase-scheme-123", f"bearer {REDACTED}"),
        (
            b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/bedrock/aws4_request, "
            b"SignedHeaders=host;x-amz-date, Signature=abcdef0123456789",
            f"AWS4-HMAC-SHA256 {REDACTED}",
        ),
        (SECRET.encode(), REDACTED),  # no scheme: nothing kept
        (b"", REDACTED),
        (b"Bearer", REDACTED),  # a scheme alone is still not shown (it might be the key)
        ("Bearer\tkey-with-tab-1234", REDACTED),
    ],
)
def test_authorization_keeps_only_its_scheme(value: bytes | str, expected: str) -> None:
    assert redact_headers({"authorization": value}) == {"authorization": expected}
    assert redact_headers({"Authorization": value}) == {"Authorization": expected}


def test_other_values_are_decoded_as_latin1_and_cut() -> None:
    long = b"x" * (MAX_HEADER_VALUE_CHARS + 100)
    out = redact_headers({
        ":path": b"/v1/chat/completions",
        "content-type": "application/json",
        "x-latin": b"caf\xe9",
        "user-agent": long,
    })
    assert out[":path"] == "/v1/chat/completions"
    assert out["content-type"] == "application/json"
    assert out["x-latin"] == "café"
    assert out["user-agent"] == "x" * MAX_HEADER_VALUE_CHARS


def test_gateway_headers_are_not_taken_for_credentials() -> None:
    assert not is_credential_header("x-ai-eg-model")
    assert not is_credential_header("x-ai-eg-backend-key")  # the gateway's own: never a credential
    assert not is_credential_header("content-type")
    assert is_credential_header("X-Api-Key")
    assert is_credential_header("x-sim-cached-tokens")  # conservative: any *token* header
    out = redact_headers({"x-ai-eg-model": b"gpt-4o", "x-ai-eg-backend-key": b"openai"})
    assert out == {"x-ai-eg-model": "gpt-4o", "x-ai-eg-backend-key": "openai"}


# -- SecretScrubber ------------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, SecretScrubber]]:
    """A logger with one handler carrying a scrubber for SECRET and OTHER."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    scrubber = SecretScrubber([SECRET, OTHER, "short", ""])
    handler.addFilter(scrubber)
    logger = logging.getLogger("tests.redact.captured")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, stream, scrubber
    finally:
        logger.removeHandler(handler)


def test_scrubber_replaces_secrets_in_the_message(captured: Any) -> None:
    logger, stream, _ = captured
    logger.info(f"key is {SECRET} and {OTHER}!")
    assert stream.getvalue() == f"INFO key is {REDACTED} and {REDACTED}!\n"


def test_scrubber_replaces_secrets_in_arguments(captured: Any) -> None:
    logger, stream, _ = captured
    logger.warning("headers %s and %r", {"x-api-key": SECRET}, OTHER)
    text = stream.getvalue()
    assert SECRET not in text and OTHER not in text
    assert text.count(REDACTED) == 2


def test_scrubber_formats_the_record_once(captured: Any) -> None:
    _, _, scrubber = captured
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a %s b %d", (SECRET, 5), None)
    assert scrubber.filter(record) is True
    assert record.msg == f"a {REDACTED} b 5" and record.args == ()
    assert record.getMessage() == f"a {REDACTED} b 5"
    assert scrubber.filter(record) is True  # a second handler's filter: unchanged
    assert record.getMessage() == f"a {REDACTED} b 5"


def test_scrubber_replaces_secrets_in_exceptions(captured: Any) -> None:
    logger, stream, _ = captured
    try:
        raise ValueError(f"upstream refused key {SECRET}")
    except ValueError:
        logger.exception("call failed")
    text = stream.getvalue()
    assert "Traceback" in text and "ValueError: upstream refused key" in text
    assert SECRET not in text and REDACTED in text


def test_scrubber_replaces_secrets_in_exc_info_and_stack(captured: Any) -> None:
    logger, stream, _ = captured
    try:
        raise RuntimeError(OTHER)
    except RuntimeError:
        logger.debug("with exc_info", exc_info=True, stack_info=True)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None, sinfo=f"Stack: {SECRET}")
    captured[2].filter(record)
    assert record.stack_info == f"Stack: {REDACTED}"
    text = stream.getvalue()
    assert OTHER not in text and "RuntimeError" in text


def test_scrubber_keeps_precomputed_exc_text_scrubbed(captured: Any) -> None:
    _, _, scrubber = captured
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "m", (), None)
    record.exc_text = f"Traceback...\nError: {SECRET}"
    scrubber.filter(record)
    assert record.exc_text == f"Traceback...\nError: {REDACTED}"


def test_short_and_empty_secrets_are_ignored() -> None:
    scrubber = SecretScrubber(["short", "", "1234567"])
    assert scrubber.secrets == ()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "short %s", ("1234567",), None)
    assert scrubber.filter(record)
    assert record.getMessage() == "short 1234567"


def test_longer_secret_containing_a_shorter_one_is_replaced_whole() -> None:
    scrubber = SecretScrubber(["abcdefgh", "abcdefgh-and-more"])
    assert scrubber.scrub("x abcdefgh-and-more y abcdefgh") == f"x {REDACTED} y {REDACTED}"


def test_no_secret_present_is_a_no_op() -> None:
    """The common path: a record without secrets is left as it would be printed."""
    scrubber = SecretScrubber([SECRET, OTHER])
    text = "nothing to see here " * 10
    assert scrubber.scrub(text) is text  # same object: nothing copied
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "n=%d %s", (3, "ok"), None)
    assert scrubber.filter(record)
    assert record.getMessage() == "n=3 ok" and record.exc_text is None
    empty = SecretScrubber([])
    untouched = logging.LogRecord("x", logging.INFO, __file__, 1, "n=%d", (3,), None)
    assert empty.filter(untouched) and untouched.getMessage() == "n=3"


def test_broken_format_is_left_for_the_handler() -> None:
    scrubber = SecretScrubber([SECRET])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d", ("not a number",), None)
    assert scrubber.filter(record)
    assert record.args == ("not a number",)


# -- credential header values, known or not ---------------------------------------------------

CLIENT = "sk-client-unknown-0a1b2c3d"  # a credential no config names


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Envoy 1.40's debug dump of a header map, one header a line.
        (f"'authorization', 'Bearer {CLIENT}'", f"'authorization', 'Bearer {REDACTED}'"),
        (f"'x-api-key', '{CLIENT}'", f"'x-api-key', '{REDACTED}'"),
        (f"'proxy-authorization', 'Basic {CLIENT}'", f"'proxy-authorization', 'Basic {REDACTED}'"),
        # Envoy does not escape quotes: the value runs to the line's last quote.
        (f"'cookie', 'a={CLIENT}', 'b'", f"'cookie', '{REDACTED}'"),
        (f"'x-amz-security-token', '{CLIENT}'", f"'x-amz-security-token', '{REDACTED}'"),
        # Python reprs (a dict of headers, a list of byte pairs) and JSON.
        (f"headers: {{':path': '/v1', 'api-key': '{CLIENT}', 'cookie': \"it's {CLIENT}\"}}",
         f"headers: {{':path': '/v1', 'api-key': '{REDACTED}', 'cookie': \"{REDACTED}\"}}"),
        (f"[(b'x-client-secret', b'{CLIENT}'), (b'set-cookie', b'id={CLIENT}; Path=/')]",
         f"[(b'x-client-secret', b'{REDACTED}'), (b'set-cookie', b'{REDACTED}')]"),
        (f'{{"Authorization": "Bearer {CLIENT}\\"x", "n": 1}}', f'{{"Authorization": "Bearer {REDACTED}", "n": 1}}'),
        (f"<CIMultiDict('Host': 'h', 'Authorization': 'Bearer {CLIENT}')>",
         f"<CIMultiDict('Host': 'h', 'Authorization': 'Bearer {REDACTED}')>"),
        # Protobuf text in one text (Envoy's ext_proc mutation dump, as one record).
        (f'key: "x-api-key"\n  raw_value: "{CLIENT}"', f'key: "x-api-key"\n  raw_value: "{REDACTED}"'),
        # HTTP lines and a SigV4 canonical request as botocore logs it at DEBUG.
        (f"Authorization: AWS4-HMAC-SHA256 Credential=AKID/x, Signature={CLIENT}",
         f"Authorization: AWS4-HMAC-SHA256 {REDACTED}"),
        (f"POST\n/model/m/converse\n\nhost:bedrock\nx-amz-security-token:{CLIENT}\n\nhost;x-amz-security-token\nabc",
         f"POST\n/model/m/converse\n\nhost:bedrock\nx-amz-security-token:{REDACTED}\n\nhost;x-amz-security-token\nabc"),
    ],
)
def test_credential_header_values_are_redacted_in_every_printed_form(text: str, expected: str) -> None:
    assert redact_header_fields(text) == expected
    assert redact_header_fields(expected) == expected  # already redacted: stays so


@pytest.mark.parametrize(
    "text",
    [
        "':authority', 'api.example.com'",
        "'x-ai-eg-backend-key', 'openai'",  # the gateway's own headers hold no credential
        '          key: "llm_input_token"',  # protobuf text, not a header
        "[debug][ext_proc] Sending headers message",
        "[2026-01-01][info] token: not at the start of the line",
        '      body: "data: {\\"usage\\":{\\"prompt_tokens\\":5}}"',
        '{"type": "tokens", "headers_to_remove": ["x-api-key", "authorization"]}',  # names, no values
    ],
)
def test_other_text_is_left_alone(text: str) -> None:
    assert redact_header_fields(text) is text


def test_line_scrubber_redacts_a_header_envoy_prints_over_two_lines() -> None:
    """Envoy's ext_proc debug dump: `key: "<name>"` on one line, its value on the next."""
    scrub = LineScrubber(SecretScrubber([SECRET]))
    lines = [
        '          key: "x-amz-security-token"', f'          raw_value: "{CLIENT}"',
        '          key: ":path"', '          raw_value: "/v1/chat/completions"',
        '          key: "authorization"', f'          raw_value: "AWS4-HMAC-SHA256 Credential={CLIENT}"',
        '          key: "x-api-key"', "        }", f'          raw_value: "{CLIENT}"',  # not the next line: untouched
        f"'api-key', '{SECRET}'",
    ]
    assert [scrub(line) for line in lines] == [
        '          key: "x-amz-security-token"', f'          raw_value: "{REDACTED}"',
        '          key: ":path"', '          raw_value: "/v1/chat/completions"',
        '          key: "authorization"', f'          raw_value: "AWS4-HMAC-SHA256 {REDACTED}"',
        '          key: "x-api-key"', "        }", f'          raw_value: "{CLIENT}"',
        f"'api-key', '{REDACTED}'",
    ]


def test_scrubber_redacts_header_values_it_does_not_know(captured: Any) -> None:
    logger, stream, _ = captured
    logger.debug("client sent %s", {"authorization": f"Bearer {CLIENT}", "cookie": CLIENT})
    assert stream.getvalue() == f"DEBUG client sent {{'authorization': 'Bearer {REDACTED}', 'cookie': '{REDACTED}'}}\n"


# -- secrets of a config, install_secret_scrubber, the CLI ---------------------------------


def _loaded(tmp_path: Any, environ: dict[str, str]) -> Any:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        """
backends:
  - {name: openai, base_url: "https://api.example.com/v1", api_key: {env: T_OPENAI}}
  - name: bedrock
    schema: aws_bedrock
    aws: {region: us-east-1, access_key_id: {env: T_AK}, secret_access_key: {env: T_SK}}
  - {name: chain, schema: aws_bedrock, aws: {region: us-west-2}}
routes:
  - {name: all, default: true, backends: [{name: openai}]}
tenancy:
  api_keys: [{key: {env: T_TENANT}, tenant: team-a}]
""",
        encoding="utf-8",
    )
    return load_config(path, environ)


def test_config_secrets_cover_backends_tenants_and_the_aws_chain(tmp_path: Any) -> None:
    environ = {
        "T_OPENAI": "sk-openai-123456789", "T_AK": "AKIDEXAMPLE12", "T_SK": "aws/Secret+Key/123456",
        "T_TENANT": "tenant-key-abcdef", "AWS_SECRET_ACCESS_KEY": "chain/secret/key/xyz", "AWS_SESSION_TOKEN": "",
    }
    found = config_secrets(_loaded(tmp_path, environ), environ)
    assert found == {"sk-openai-123456789", "AKIDEXAMPLE12", "aws/Secret+Key/123456", "tenant-key-abcdef",
                     "chain/secret/key/xyz"}


def test_config_secrets_skip_the_aws_environment_without_a_chain_backend() -> None:
    from extproc.config import LoadedConfig

    config = parse_config({"backends": [{"name": "a", "base_url": "https://x.example/v1"}],
                           "routes": [{"name": "r", "default": True, "backends": [{"name": "a"}]}]})
    assert config_secrets(LoadedConfig(config=config, source="t"), {"AWS_SECRET_ACCESS_KEY": "x" * 20}) == set()


@pytest.fixture
def root_handler() -> Iterator[tuple[logging.Handler, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    package = logging.getLogger("extproc")
    before = list(package.filters)
    try:
        yield handler, stream
    finally:
        root.removeHandler(handler)
        for f in list(package.filters):
            if f not in before:
                package.removeFilter(f)


def test_install_attaches_one_scrubber_to_root_handlers(tmp_path: Any, root_handler: Any) -> None:
    handler, stream = root_handler
    environ = {"T_OPENAI": "sk-openai-123456789", "T_AK": "AKIDEXAMPLE12", "T_SK": "aws/Secret+Key/123456",
               "T_TENANT": "tenant-key-abcdef"}
    loaded = _loaded(tmp_path, environ)
    install_secret_scrubber(loaded, environ)
    install_secret_scrubber(loaded, environ)  # again: replaced, not stacked
    assert sum(isinstance(f, SecretScrubber) for f in handler.filters) == 1
    assert sum(isinstance(f, SecretScrubber) for f in logging.getLogger("extproc").filters) == 1
    logger = logging.getLogger("extproc.some.module")
    logger.warning("sent %s with tenant key %s", "sk-openai-123456789", "tenant-key-abcdef")
    assert "sk-openai-123456789" not in stream.getvalue()
    assert "tenant-key-abcdef" not in stream.getvalue()
    assert stream.getvalue().count(REDACTED) == 2
    for f in [f for f in handler.filters if isinstance(f, SecretScrubber)]:
        handler.removeFilter(f)


def test_log_level_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.cli import build_parser

    monkeypatch.setenv("EXTPROC_LOG_LEVEL", "DEBUG")
    assert build_parser().parse_args(["check", "x"]).log_level == "DEBUG"
    monkeypatch.delenv("EXTPROC_LOG_LEVEL")
    assert build_parser().parse_args(["check", "x"]).log_level == "INFO"
    assert build_parser().parse_args(["--log-level", "WARNING", "check", "x"]).log_level == "WARNING"


def test_cli_main_still_runs_a_command(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("backends: [{name: a, base_url: 'https://x.example/v1'}]\n"
                    "routes: [{name: r, default: true, backends: [{name: a}]}]\n")
    assert main(["check", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_config_secrets_cover_redis_url_passwords() -> None:
    from extproc.config import LoadedConfig

    config = parse_config({
        "backends": [{"name": "a", "base_url": "https://x.example/v1"}],
        "routes": [{"name": "r", "default": True, "backends": [{"name": "a"}]}],
        "state": {"redis": "rediss://gateway:state-pass-123456@redis.example:6380/0"},
        "ratelimit": {"store": "redis://:budget-pass-123456@redis.example:6379/1"},
        "tenancy": {"key_store": {"redis": {"url": "redis://keys:keys-pass-1234567@redis.example/2"}}},
    })
    found = config_secrets(LoadedConfig(config=config, source="t"), {})
    assert found == {"state-pass-123456", "budget-pass-123456", "keys-pass-1234567"}
    without = parse_config({**config.model_dump(mode="json", by_alias=True, exclude_none=True),
                            "state": {"redis": "redis://redis:6379/0"}, "ratelimit": {"store": "memory"},
                            "tenancy": None})
    assert config_secrets(LoadedConfig(config=without, source="t"), {}) == set()
