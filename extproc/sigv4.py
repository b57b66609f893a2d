"""AWS Signature Version 4 for a request to Bedrock, by botocore's signer.

Its own module so that importing it is what loads botocore (~5 MiB): `backend_auth.SigV4`
imports it on first use, and workers without a Bedrock backend never do.
"""

from __future__ import annotations

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def sign(
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    region: str,
    access_key: str,
    secret_key: str,
    session_token: str | None = None,
    service: str = "bedrock",
) -> dict[str, str]:
    """The headers to add (lower-case names) so AWS accepts this exact request.

    botocore signs `headers` plus `host`, derived from `url` as HTTP clients send it
    (so the upstream's Host/:authority must be that host[:port]). Pass only headers
    that reach AWS unchanged; `content-type` is always signed, and returned as
    application/json when `headers` has none.
    """
    given = {k.lower(): v for k, v in headers.items() if k.lower() not in ("host", "authorization")}
    added: dict[str, str] = {}
    if "content-type" not in given:
        given["content-type"] = added["content-type"] = "application/json"
    request = AWSRequest(method=method.upper(), url=url, data=body, headers=given)
    SigV4Auth(Credentials(access_key, secret_key, session_token), service, region).add_auth(request)
    for name, value in request.headers.items():
        if given.get(name.lower()) != value:
            added[name.lower()] = value
    return added
