"""Bedrock credentials from botocore's chain never stall the processor.

The gateway's Bedrock backend names no keys: botocore finds them through a
`credential_process` in an AWS config file (temporary credentials with an expiry, as
SSO or STS hand out). That process waits until the test creates a file. With
one processor worker, a Bedrock request waits for it while an OpenAI request through
the same gateway is served; then the test releases the process, and the Bedrock
request completes and is accounted. A second Bedrock request uses the cached
credentials (the process would block again if it ran). Both logs run at debug level:
the temporary credentials, which no gateway config names, must not appear in them.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import openai
import pytest

from extproc.sim import SimServer
from extproc.sim.bedrock_api import (
    SIM_AWS_SESSION_ACCESS_KEY_ID,
    SIM_AWS_SESSION_SECRET_ACCESS_KEY,
    SIM_AWS_SESSION_TOKEN,
)
from tests.integration.harness import RunningGateway, running_gateway

OPENAI_KEY = "sk-openai-backend-4c3b2a19"
BEDROCK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
USER = [{"role": "user", "content": "Tell me about the sea"}]
CHAIN_SECRETS = {"secret": SIM_AWS_SESSION_SECRET_ACCESS_KEY, "token": SIM_AWS_SESSION_TOKEN}
# Variables that would give botocore keys before it reaches the config file's process.
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")

# Run by botocore: note the start, wait until the test creates the release file, print the keys.
CREDENTIAL_PROCESS = """
import json, os, sys, time
started, release, expiration = sys.argv[1:4]
with open(started, "a") as out:
    out.write("started\\n")
while not os.path.exists(release):
    time.sleep(0.01)
print(json.dumps({{"Version": 1, "AccessKeyId": {access!r}, "SecretAccessKey": {secret!r},
                  "SessionToken": {token!r}, "Expiration": expiration}}))
"""


@dataclass
class Observed:
    gateway: RunningGateway
    starts: Path  # one line per run of the credential process
    openai_reply: Any = None
    bedrock_done_before_release: bool | None = None
    starts_before_release: int = 0
    bedrock_reply: Any = None
    second_reply: Any = None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)


def _starts(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for_start(observed: Observed, pending: Future[Any], timeout: float = 30) -> None:
    """Until the credential process runs; fails at once if the request ended instead."""
    deadline = time.monotonic() + timeout
    while _starts(observed.starts) == 0:
        if pending.done():
            raise AssertionError(f"the Bedrock request ended before credentials were looked up: {pending.result()}")
        if time.monotonic() > deadline:
            raise AssertionError("botocore never ran the credential process")
        time.sleep(0.02)


def _aws_files(tmp: Path) -> tuple[Path, Path, Path]:
    """An AWS config whose default profile gets its keys from a process that waits for a file."""
    script, starts, release = tmp / "credential_process.py", tmp / "starts", tmp / "release"
    script.write_text(CREDENTIAL_PROCESS.format(
        access=SIM_AWS_SESSION_ACCESS_KEY_ID, secret=SIM_AWS_SESSION_SECRET_ACCESS_KEY, token=SIM_AWS_SESSION_TOKEN))
    expiration = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = shlex.join([sys.executable, str(script), str(starts), str(release), expiration])
    config = tmp / "aws-config"
    config.write_text(f"[default]\ncredential_process = {command}\n")
    return config, starts, release


def _config(sim: SimServer) -> dict[str, Any]:
    return {
        "backends": [
            {"name": "openai", "schema": "openai", "base_url": sim.base_url, "api_key": {"env": "T_OPENAI_KEY"}},
            {"name": "bedrock", "schema": "aws_bedrock", "base_url": sim.url,
             "aws": {"region": "us-east-1"}},  # no keys: botocore's chain
        ],
        "routes": [
            {"name": "openai", "match": {"glob": "gpt-*"}, "backends": [{"name": "openai"}]},
            {"name": "bedrock", "match": {"prefix": "anthropic."}, "backends": [{"name": "bedrock"}]},
        ],
        "processor": {"workers": 1},  # one event loop serves both requests
    }


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("aws-chain")
    aws_config, starts, release = _aws_files(tmp)
    env = {"T_OPENAI_KEY": OPENAI_KEY, "AWS_CONFIG_FILE": str(aws_config),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-credentials-file"), "AWS_EC2_METADATA_DISABLED": "true",
           "EXTPROC_LOG_LEVEL": "DEBUG"}
    with SimServer() as sim, pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(1) as pool:
        for name in AWS_VARIABLES:
            patch.delenv(name, raising=False)  # the gateway inherits this environment
        with running_gateway(_config(sim), tmp / "gateway", env=env, args=["--envoy-log-level", "debug"]) as gateway:
            client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-client-key", max_retries=0, timeout=30)
            observed = Observed(gateway, starts)

            def ask_bedrock(request_id: str) -> Any:
                return client.chat.completions.with_raw_response.create(
                    model=BEDROCK_MODEL, messages=USER, max_tokens=12, extra_headers={"x-request-id": request_id})

            bedrock = pool.submit(ask_bedrock, "bedrock-1")
            try:
                _wait_for_start(observed, bedrock)
                observed.openai_reply = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=USER, max_tokens=12, extra_headers={"x-request-id": "openai-1"})
                observed.bedrock_done_before_release = bedrock.done()
                observed.starts_before_release = _starts(starts)
            finally:
                release.touch()  # always, so no credential process is left waiting
            observed.bedrock_reply = bedrock.result(timeout=30)
            observed.second_reply = ask_bedrock("bedrock-2")
            for request_id in ("openai-1", "bedrock-1", "bedrock-2"):
                observed.entries[request_id] = gateway.wait_access_log(lambda e, r=request_id: e["request_id"] == r)
            gateway.stop()  # shutdown lines are output too
        gateway.wait_quiet()
        yield observed


def test_openai_request_is_served_while_bedrock_waits_for_credentials(observed: Observed) -> None:
    reply = observed.openai_reply
    assert reply.status_code == 200 and reply.parse().choices[0].message.content
    assert observed.starts_before_release == 1  # the process was running (waiting) meanwhile
    assert observed.bedrock_done_before_release is False
    assert observed.entries["openai-1"]["status"] == 200


def test_bedrock_request_completes_with_the_credentials_and_is_accounted(observed: Observed) -> None:
    reply = observed.bedrock_reply
    assert reply.status_code == 200  # the simulator checked the SigV4 signature and the session token
    completion = reply.parse()
    assert completion.choices[0].message.content and completion.usage is not None
    entry = observed.entries["bedrock-1"]
    assert entry["backend_name"] == "bedrock" and entry["status"] == 200
    assert (int(entry["input_tokens"]), int(entry["output_tokens"])) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens)


def test_later_requests_use_the_cached_credentials(observed: Observed) -> None:
    assert observed.second_reply.status_code == 200
    assert int(observed.entries["bedrock-2"]["output_tokens"]) > 0
    assert _starts(observed.starts) == 1  # botocore's chain ran once


def test_chain_credentials_are_never_logged(observed: Observed) -> None:
    gateway = observed.gateway
    output = "\n".join(gateway.stdout_lines + gateway.stderr_lines)
    leaked = [name for name, secret in CHAIN_SECRETS.items() if secret in output or quote(secret, safe="") in output]
    assert leaked == []
    # The token was in play: Envoy's debug dump of the upstream stage's mutation shows it redacted.
    lines = gateway.stderr_lines
    assert any(line.endswith('key: "x-amz-security-token"') and lines[i + 1].endswith('raw_value: "<redacted>"')
               for i, line in enumerate(lines[:-1]))
