"""Fault injection through real Envoy + the processor: what a client sees, what is accounted.

Every fault is driven from the client side (the official openai SDK or raw httpx) against
`extproc run`, with the simulator (`extproc.sim`) as the upstream and its `x-sim-*` knobs
as the fault switches. Each test checks three things:

* what the user sees: the status, the OpenAI error shape, or a stream that ends (cleanly,
  or cut, as an error the client library raises rather than a hang);
* that nothing is lost: Envoy's access-log line exists, with the tokens whenever the
  upstream reported usage before the fault;
* that the processor never raised (checked after every test, and once more after the
  gateway stopped): no "Traceback", "processor error" or "Exception" on its stderr.

One gateway serves the whole module; timeouts are 1 s and streams a few chunks long, so
the file runs in well under a minute. Waits use deadlines, never timing asserts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from extproc.sim import SimServer
from extproc.sim import text as simtext
from tests.integration.harness import RunningGateway, free_port, running_gateway

USER = [{"role": "user", "content": "Tell me about faults"}]
BODY_LIMIT = 4 * 1024 * 1024  # the default limits.max_request_body_bytes
# Flags Envoy gives a response the upstream cut after it started: reset, protocol error
# (premature close of a chunked or content-length body), connection termination.
UPSTREAM_CUT_FLAGS = {"UR", "UPE", "UC"}
RAISED_MARKERS = ("Traceback", "processor error", "Exception")


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer() as server:
        yield server


@pytest.fixture(scope="module")
def gw(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = {
        "backends": [
            {"name": "sim", "base_url": sim.base_url},
            # the same simulator under another prefix: the recorded path tells who served
            {"name": "spare", "base_url": f"{sim.url}/spare/v1"},
            {"name": "refused", "base_url": f"http://127.0.0.1:{free_port()}/v1"},  # nothing listens
            {"name": "slow-total", "base_url": sim.base_url, "request_timeout_seconds": 1},
            {"name": "slow-idle", "base_url": sim.base_url, "idle_timeout_seconds": 1},
        ],
        "routes": [
            {"name": "down", "match": {"model": "down-model"}, "backends": [{"name": "refused"}]},
            {"name": "total", "match": {"model": "stall-total"}, "backends": [{"name": "slow-total"}]},
            {"name": "idle", "match": {"model": "stall-idle"}, "backends": [{"name": "slow-idle"}]},
            {
                "name": "guarded",  # a route with a fallback: Envoy picks its backend by x-ai-eg-route
                "match": {"model": "guarded-model"},
                "backends": [{"name": "spare"}, {"name": "sim", "priority": 1}],
            },
            {"name": "everything", "default": True, "backends": [{"name": "sim"}]},
        ],
    }
    with running_gateway(config, tmp_path_factory.mktemp("faults")) as gateway:
        yield gateway
    # Stopped: let the reader threads take in the last lines the processor printed.
    time.sleep(0.3)
    assert not _raised(gateway), "the processor raised during the fault tests"


@pytest.fixture(autouse=True)
def _each_test(gw: RunningGateway, sim: SimServer) -> Iterator[None]:
    sim.clear()
    yield
    assert not _raised(gw), "the processor raised"


@pytest.fixture
def sdk(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="sk-client", max_retries=0, timeout=30)


# -- helpers ---------------------------------------------------------------------------


def _label(series: str, name: str) -> str | None:
    """A label's value in one Prometheus series line."""
    marker = f'{name}="'
    if marker not in series:
        return None
    return series.split(marker, 1)[1].split('"', 1)[0]


def _raised(gw: RunningGateway) -> list[str]:
    return [line for line in list(gw.stderr_lines) if any(marker in line for marker in RAISED_MARKERS)]


def _tag() -> tuple[str, dict[str, str]]:
    request_id = str(uuid.uuid4())
    return request_id, {"x-request-id": request_id}


def _log(gw: RunningGateway, request_id: str) -> dict[str, Any]:
    return gw.wait_access_log(lambda e: e.get("request_id") == request_id)


def _logs(gw: RunningGateway, request_ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The access-log entries of many requests (by case name), waiting for one flush, not one each."""
    wanted = set(request_ids.values())
    gw.wait_access_log(lambda _: wanted <= {e.get("request_id") for e in gw.access_log()})
    by_id = {e.get("request_id"): e for e in gw.access_log()}
    return {case: by_id[request_id] for case, request_id in request_ids.items()}


def _flags(entry: dict[str, Any]) -> set[str]:
    return set(str(entry["response_flags"]).split(","))


def _assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = orjson.loads(response.content)["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code
    return error


def _assert_sdk_stream_ended_cleanly(entry: dict[str, Any]) -> None:
    """A stream the openai SDK read to `[DONE]`: the SDK closes the connection right after
    `[DONE]` without reading the end of the body, so Envoy may log that close (DC) if it
    comes before the upstream's end of stream; nothing else may be flagged."""
    assert entry["status"] == 200 and entry["response_flags"] in ("-", "DC")


def _assert_no_tokens(entry: dict[str, Any]) -> None:
    assert entry["input_tokens"] is None and entry["output_tokens"] is None and entry["total_tokens"] is None


def _post(gw: RunningGateway, body: dict[str, Any] | bytes, headers: dict[str, str]) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(
        f"{gw.base_url}/chat/completions", content=content,
        headers={"content-type": "application/json", **headers}, timeout=30,
    )


def _direct(sim: SimServer, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    """The simulator asked directly, without the gateway: what the provider sends."""
    return httpx.post(f"{sim.base_url}/chat/completions", json=body, headers=headers or {}, timeout=30)


def _stream(gw: RunningGateway, body: dict[str, Any], headers: dict[str, str]) -> tuple[httpx.Response, bytes, Exception | None]:
    """Read a streamed response as far as it goes: (response, bytes received, the error that ended it)."""
    got = bytearray()
    error: Exception | None = None
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", json=body, headers=headers, timeout=30) as response:
        try:
            for piece in response.iter_bytes():
                got += piece
        except httpx.HTTPError as exc:
            error = exc
    return response, bytes(got), error


def _events(raw: bytes) -> list[bytes]:
    """The data of each complete SSE event (`data: X` blocks ended by a blank line)."""
    blocks = raw.split(b"\n\n")
    return [block.removeprefix(b"data: ") for block in blocks[:-1] if block.strip()]


def _usage_of(sim: SimServer, messages: list[dict[str, Any]]) -> dict[str, int]:
    """The usage the simulator reports for these messages (the same streamed or not)."""
    return _direct(sim, {"model": "m", "messages": messages}).json()["usage"]


def _sdk_stream_until_it_ends(stream: Any) -> tuple[list[Any], BaseException | None]:
    chunks: list[Any] = []
    try:
        for chunk in stream:
            chunks.append(chunk)
    except (openai.APIError, httpx.HTTPError) as exc:
        return chunks, exc
    return chunks, None


def _cut_off_logged(gw: RunningGateway, model: str) -> str:
    return gw.wait_stderr(lambda line: "response cut off before completion" in line and f"model={model} " in line)


# -- upstream faults -------------------------------------------------------------------


def test_connection_refused_is_503_backend_unavailable(gw: RunningGateway, sdk: openai.OpenAI) -> None:
    request_id, headers = _tag()
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="down-model", messages=USER, extra_headers=headers)
    assert caught.value.status_code == 503
    assert caught.value.code == "backend_unavailable"
    _assert_openai_error(caught.value.response, 503, "backend_unavailable")

    entry = _log(gw, request_id)
    assert entry["status"] == 503 and "UF" in _flags(entry)
    assert entry["backend_name"] == "refused" and entry["request_model"] == "down-model"
    assert entry["error_type"] == "backend_unavailable"  # nobody answered: not the provider's error
    _assert_no_tokens(entry)


def test_upstream_reset_before_the_response_is_502_backend_error(gw: RunningGateway, sim: SimServer) -> None:
    request_id, headers = _tag()
    response = _post(gw, {"model": "m", "messages": USER}, {**headers, "x-sim-reset-after-chunks": "0"})
    error = _assert_openai_error(response, 502, "backend_error")
    assert error["type"] == "server_error"
    assert len(sim.requests) == 1  # it reached the provider, which died on it

    entry = _log(gw, request_id)
    assert entry["status"] == 502 and _flags(entry) & UPSTREAM_CUT_FLAGS
    assert entry["backend_name"] == "sim" and entry["error_type"] == "backend_error"
    _assert_no_tokens(entry)


def test_upstream_reset_mid_json_body_is_502_not_half_a_reply(gw: RunningGateway) -> None:
    """A JSON reply is buffered for accounting, so a provider dying halfway through it
    becomes a clean 502 in OpenAI's shape instead of half a JSON document with a 200."""
    request_id, headers = _tag()
    response = _post(gw, {"model": "m", "messages": USER}, {**headers, "x-sim-reset-after-chunks": "1"})
    _assert_openai_error(response, 502, "backend_error")
    assert b"chatcmpl-" not in response.content

    entry = _log(gw, request_id)
    assert entry["status"] == 502 and _flags(entry) & UPSTREAM_CUT_FLAGS
    _assert_no_tokens(entry)


def test_upstream_reset_mid_stream_raises_in_the_sdk_after_the_chunks_that_came(
    gw: RunningGateway, sdk: openai.OpenAI
) -> None:
    request_id, headers = _tag()
    model = f"reset-{uuid.uuid4().hex[:8]}"
    stream = sdk.chat.completions.create(
        model=model, messages=USER, stream=True,
        extra_headers={**headers, "x-sim-chunks": "4", "x-sim-reset-after-chunks": "3"},  # role + 2 pieces
    )
    chunks, error = _sdk_stream_until_it_ends(stream)
    assert error is not None, "a stream the provider cut must not end as if it were complete"
    assert len(chunks) == 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in chunks)

    entry = _log(gw, request_id)
    assert entry["status"] == 200 and _flags(entry) & UPSTREAM_CUT_FLAGS
    assert entry["request_model"] == model and entry["backend_name"] == "sim"
    _assert_no_tokens(entry)  # the provider died before reporting usage
    assert "usage=not reported" in _cut_off_logged(gw, model)


@pytest.mark.parametrize("asked", [True, False], ids=["client-asked-usage", "gateway-forced-usage"])
def test_upstream_reset_after_the_usage_chunk_keeps_the_tokens(
    gw: RunningGateway, sim: SimServer, asked: bool
) -> None:
    """The provider reported usage, then died before [DONE]: the tokens are accounted."""
    request_id, headers = _tag()
    body: dict[str, Any] = {"model": "m", "messages": USER, "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    # role, 3 pieces, finish, usage: 6 events; the reset comes where [DONE] would.
    knobs = {"x-sim-chunks": "3", "x-sim-reset-after-chunks": "6"}
    response, raw, error = _stream(gw, body, {**headers, **knobs})
    assert response.status_code == 200
    assert isinstance(error, httpx.RemoteProtocolError)  # the client sees the cut
    events = _events(raw)
    assert b"[DONE]" not in events
    expected = _usage_of(sim, USER)
    if asked:
        assert len(events) == 6 and orjson.loads(events[-1])["usage"] == expected
    else:
        assert len(events) == 5 and b'"usage"' not in raw  # the forced usage event is still removed

    entry = _log(gw, request_id)
    assert entry["status"] == 200 and _flags(entry) & UPSTREAM_CUT_FLAGS
    assert (entry["input_tokens"], entry["output_tokens"], entry["total_tokens"]) == (
        expected["prompt_tokens"], expected["completion_tokens"], expected["total_tokens"],
    )


@pytest.mark.parametrize(("model", "flag"), [("stall-total", "UT"), ("stall-idle", "SI")],
                         ids=["request-timeout", "idle-timeout"])
def test_stall_before_the_first_byte_is_504_backend_timeout(
    gw: RunningGateway, sdk: openai.OpenAI, model: str, flag: str
) -> None:
    request_id, headers = _tag()
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(
            model=model, messages=USER, extra_headers={**headers, "x-sim-first-byte-delay-ms": "4000"}
        )
    assert caught.value.status_code == 504 and caught.value.code == "backend_timeout"
    _assert_openai_error(caught.value.response, 504, "backend_timeout")

    entry = _log(gw, request_id)
    assert entry["status"] == 504 and flag in _flags(entry)
    assert entry["error_type"] == "backend_timeout", entry["response_code_details"]
    _assert_no_tokens(entry)


def test_errors_nobody_answered_are_labelled_apart_from_a_providers_own(gw: RunningGateway, sdk: openai.OpenAI) -> None:
    """Operators tell "backend down" from "provider error": in the access log (above) and in
    gen_ai.server.request.duration's error.type, where a provider's 500 keeps its own type."""
    cases = [("down-model", {}), ("stall-idle", {"x-sim-first-byte-delay-ms": "4000"}),
             ("labels-reset", {"x-sim-reset-after-chunks": "0"}), ("labels-provider-500", {"x-sim-error": "500"})]
    for model, knobs in cases:
        with pytest.raises(openai.APIStatusError):
            sdk.chat.completions.create(model=model, messages=USER, extra_headers=knobs)
    expected = {("down-model", "backend_unavailable"), ("stall-idle", "backend_timeout"),
                ("labels-reset", "backend_error"), ("labels-provider-500", "server_error")}
    deadline = time.monotonic() + 15
    while True:
        metrics = httpx.get(f"http://127.0.0.1:{gw.processor_admin_port}/metrics", timeout=10).text
        seen = {(_label(line, "gen_ai_request_model"), _label(line, "error_type")) for line in metrics.splitlines()
                if line.startswith("gen_ai_server_request_duration_seconds_count{")}
        if expected <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert expected <= seen
    # ... and none of Envoy's own replies passes for the provider's error
    assert not {("down-model", "server_error"), ("stall-idle", "server_error"), ("labels-reset", "server_error")} & seen


@pytest.mark.parametrize(("model", "flag", "delay_ms"), [("stall-total", "UT", "400"), ("stall-idle", "SI", "4000")],
                         ids=["request-timeout", "idle-timeout"])
def test_stall_mid_stream_cuts_the_stream(
    gw: RunningGateway, sdk: openai.OpenAI, model: str, flag: str, delay_ms: str
) -> None:
    request_id, headers = _tag()
    stream = sdk.chat.completions.create(
        model=model, messages=USER, stream=True,
        extra_headers={**headers, "x-sim-chunks": "8", "x-sim-chunk-delay-ms": delay_ms},
    )
    chunks, error = _sdk_stream_until_it_ends(stream)
    assert error is not None  # cut, not hung and not passed off as complete
    assert chunks and chunks[0].choices[0].delta.role == "assistant"
    assert not any(c.choices and c.choices[0].finish_reason for c in chunks)

    entry = _log(gw, request_id)
    assert entry["status"] == 200 and flag in _flags(entry)
    _assert_no_tokens(entry)  # usage would have come at the end
    _cut_off_logged(gw, model)


@pytest.mark.parametrize("status", [200, 500])
def test_garbage_json_passes_through_unchanged(gw: RunningGateway, sim: SimServer, status: int) -> None:
    """`application/json` that is not JSON: the client gets the provider's bytes as they
    were (the gateway invents nothing), the access log has the request and no tokens."""
    knobs = {"x-sim-garbage": "json", **({"x-sim-error": str(status)} if status != 200 else {})}
    body = {"model": "m", "messages": USER}
    expected = _direct(sim, body, knobs)
    request_id, headers = _tag()
    response = _post(gw, body, {**headers, **knobs})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.content == expected.content

    entry = _log(gw, request_id)
    assert entry["status"] == status and entry["response_flags"] == "-"
    _assert_no_tokens(entry)
    if status >= 400:
        assert entry["error_type"] == f"http_{status}"  # no error type could be read from the body


def test_garbage_json_through_the_sdk_fails_in_the_sdk_not_the_gateway(sdk: openai.OpenAI) -> None:
    with pytest.raises(ValueError):  # the SDK's own decoding of the provider's bytes
        sdk.chat.completions.create(model="m", messages=USER, extra_headers={"x-sim-garbage": "json"})


@pytest.mark.parametrize("asked", [True, False], ids=["client-asked-usage", "gateway-forced-usage"])
def test_garbage_sse_passes_through_unchanged(gw: RunningGateway, sim: SimServer, asked: bool) -> None:
    """Malformed events (not JSON, invalid UTF-8, NUL, bare CRs, junk usage) reach the client
    byte for byte, even when the gateway rewrites the stream to remove its forced usage."""
    body: dict[str, Any] = {"model": "m", "messages": USER, "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    expected = _direct(sim, body, {"x-sim-garbage": "sse"}).content
    request_id, headers = _tag()
    response, raw, error = _stream(gw, body, {**headers, "x-sim-garbage": "sse"})
    assert error is None and response.status_code == 200
    assert raw == expected

    entry = _log(gw, request_id)
    assert entry["status"] == 200 and entry["response_flags"] == "-"
    # A usage object with junk counts reads as 0 (extproc.schemas.openai.usage_from_openai):
    # no tokens are invented either way.
    assert entry["input_tokens"] in (None, 0) and entry["output_tokens"] in (None, 0)


def test_truncated_json_passes_through(gw: RunningGateway, sim: SimServer) -> None:
    """A reply cut in half, with a content-length that matches the cut: passed on as it is."""
    body = {"model": "m", "messages": USER}
    direct = _direct(sim, body, {"x-sim-garbage": "truncated-json"})  # ids differ, lengths do not
    request_id, headers = _tag()
    response = _post(gw, body, {**headers, "x-sim-garbage": "truncated-json"})
    assert response.status_code == 200
    assert len(response.content) == len(direct.content) == int(direct.headers["content-length"])
    assert response.content.startswith(b'{"id":"chatcmpl-')
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(response.content)

    entry = _log(gw, request_id)
    assert entry["status"] == 200 and entry["response_flags"] == "-"
    _assert_no_tokens(entry)


def test_truncated_sse_ends_the_stream_and_keeps_the_usage(gw: RunningGateway, sdk: openai.OpenAI, sim: SimServer) -> None:
    """A stream that ends (cleanly, at the HTTP level) without [DONE] and inside an event."""
    request_id, headers = _tag()
    stream = sdk.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True},
        extra_headers={**headers, "x-sim-garbage": "truncated-sse", "x-sim-chunks": "3"},
    )
    chunks = list(stream)  # ends, without an error and without hanging
    expected = _usage_of(sim, USER)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == expected["total_tokens"]

    entry = _log(gw, request_id)
    assert entry["status"] == 200 and entry["response_flags"] == "-"
    assert (entry["input_tokens"], entry["output_tokens"]) == (expected["prompt_tokens"], expected["completion_tokens"])


def test_truncated_sse_with_forced_usage_passes_the_partial_event_on(gw: RunningGateway, sim: SimServer) -> None:
    request_id, headers = _tag()
    body = {"model": "m", "messages": USER, "stream": True}
    response, raw, error = _stream(gw, body, {**headers, "x-sim-garbage": "truncated-sse", "x-sim-chunks": "3"})
    assert error is None and response.status_code == 200
    assert raw.endswith(b', "object": "chat.compl')  # the half event, as the provider sent it
    assert b"[DONE]" not in raw and b'"usage"' not in raw
    assert len(_events(raw)) == 5  # role, 3 pieces, finish: the forced usage event removed

    expected = _usage_of(sim, USER)
    entry = _log(gw, request_id)
    assert (entry["input_tokens"], entry["output_tokens"]) == (expected["prompt_tokens"], expected["completion_tokens"])


def test_wrong_content_type_on_json_passes_through(gw: RunningGateway, sdk: openai.OpenAI) -> None:
    request_id, headers = _tag()
    raw = sdk.chat.completions.with_raw_response.create(
        model="m", messages=USER, extra_headers={**headers, "x-sim-content-type": "text/plain"}
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["content-type"] == "text/plain"
    assert orjson.loads(raw.http_response.content)["usage"]["total_tokens"] > 0
    assert raw.parse().choices[0].message.content  # the SDK reads it anyway

    entry = _log(gw, request_id)
    assert entry["status"] == 200 and entry["response_flags"] == "-"
    # The content type decides how a body is read (README, "Architecture"): a body labelled
    # text/plain is not read, so its usage is not accounted.
    _assert_no_tokens(entry)


@pytest.mark.parametrize("asked", [True, False], ids=["client-asked-usage", "gateway-forced-usage"])
def test_wrong_content_type_on_a_stream_passes_through(gw: RunningGateway, sdk: openai.OpenAI, asked: bool) -> None:
    request_id, headers = _tag()
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if asked else {}
    stream = sdk.chat.completions.create(
        model="m", messages=USER, stream=True, extra_headers={**headers, "x-sim-content-type": "text/html"}, **extra,
    )
    chunks = list(stream)
    assert stream.response.headers["content-type"] == "text/html"
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "stop"
    if asked:
        assert chunks[-1].usage is not None
    # Not asked: the usage event the gateway forced reaches the client here, since a body
    # labelled text/html is not read at all (tests/unit/test_response.py,
    # test_unknown_content_type_reads_nothing).

    entry = _log(gw, request_id)
    _assert_sdk_stream_ended_cleanly(entry)
    _assert_no_tokens(entry)


def test_upstream_500_with_an_html_body_passes_through(gw: RunningGateway, sim: SimServer, sdk: openai.OpenAI) -> None:
    knobs = {"x-sim-garbage": "html", "x-sim-error": "500"}
    body = {"model": "m", "messages": USER}
    expected = _direct(sim, body, knobs)
    request_id, headers = _tag()
    response = _post(gw, body, {**headers, **knobs})
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/html")
    assert response.content == expected.content  # the provider's page, not one the gateway made up

    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(**body, extra_headers=knobs)  # type: ignore[call-overload]
    assert caught.value.status_code == 500

    entry = _log(gw, request_id)
    assert entry["status"] == 500 and entry["response_flags"] == "-"
    assert entry["error_type"] == "http_500" and entry["backend_name"] == "sim"
    _assert_no_tokens(entry)


# -- client faults ---------------------------------------------------------------------


def test_client_disconnect_mid_stream_is_logged(gw: RunningGateway, sim: SimServer, sdk: openai.OpenAI) -> None:
    hold = f"hold-{uuid.uuid4().hex}"
    model = f"hangup-{uuid.uuid4().hex[:8]}"
    request_id, headers = _tag()
    with httpx.stream(
        "POST", f"{gw.base_url}/chat/completions", json={"model": model, "messages": USER, "stream": True},
        headers={**headers, "x-sim-hold": hold, "x-sim-chunks": "6"}, timeout=30,
    ) as response:
        got = b""
        for piece in response.iter_bytes():
            got += piece
            if got.count(b"data: ") >= 2:  # the role chunk and the first piece
                break
    sim.release(hold)  # the provider goes on writing to a gateway whose client is gone

    entry = _log(gw, request_id)
    assert entry["status"] == 200 and "DC" in _flags(entry)
    assert entry["request_model"] == model and entry["backend_name"] == "sim"
    _assert_no_tokens(entry)  # the provider had not reported usage yet
    assert "output_seen=True" in _cut_off_logged(gw, model)
    assert sdk.chat.completions.create(model="m", messages=USER).choices[0].message.content  # unharmed


def test_slow_reader_gets_the_whole_stream(gw: RunningGateway, sdk: openai.OpenAI, sim: SimServer) -> None:
    request_id, headers = _tag()
    stream = sdk.chat.completions.create(
        model="m", messages=USER, stream=True, extra_headers={**headers, "x-sim-chunks": "6"}
    )
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        time.sleep(0.05)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = _direct(sim, {"model": "m", "messages": USER}).json()
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1].choices[0].finish_reason == "stop"

    entry = _log(gw, request_id)
    _assert_sdk_stream_ended_cleanly(entry)
    assert entry["output_tokens"] == full["usage"]["completion_tokens"]
    assert entry["input_tokens"] == full["usage"]["prompt_tokens"]


def test_ten_megabyte_body_is_413_with_content_length(gw: RunningGateway, sim: SimServer, sdk: openai.OpenAI) -> None:
    request_id, headers = _tag()
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x" * 10_000_000}], extra_headers=headers
        )
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"
    error = _assert_openai_error(caught.value.response, 413, "request_too_large")
    assert str(BODY_LIMIT) in error["message"]
    assert sim.requests == []
    assert _log(gw, request_id)["status"] == 413


def test_ten_megabyte_body_is_413_when_chunked(gw: RunningGateway, sim: SimServer) -> None:
    request_id, headers = _tag()
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 10_000_000}]})
    pieces = iter([body[i : i + 256 * 1024] for i in range(0, len(body), 256 * 1024)])  # no content-length
    response = httpx.post(f"{gw.base_url}/chat/completions", content=pieces, headers=headers, timeout=30)
    error = _assert_openai_error(response, 413, "request_too_large")
    assert str(BODY_LIMIT) in error["message"]
    assert sim.requests == []
    assert _log(gw, request_id)["status"] == 413


INVALID_UTF8 = {
    "invalid-byte": b'{"model": "m\xff\xfe", "messages": [{"role": "user", "content": "hi"}]}',
    "cut-sequence": b'{"model": "m", "messages": [{"role": "user", "content": "caf\xc3"}]}',
    "encoded-surrogate": b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    "lone-surrogate-escape": b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
    "byte-order-mark": b'\xef\xbb\xbf{"model": "m", "messages": []}',
}
DEEPLY_NESTED = {
    "open-arrays": b'{"model": "m", "messages": ' + b"[" * 100_000,
    "closed-arrays": b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "open-objects": b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": ' + b'{"a":' * 100_000,
}


@pytest.mark.parametrize(("cases", "needle"), [(INVALID_UTF8, None), (DEEPLY_NESTED, "JSON")],
                         ids=["invalid-utf8", "deeply-nested"])
def test_undecodable_bodies_are_400(gw: RunningGateway, sim: SimServer, cases: dict[str, bytes], needle: str | None) -> None:
    """Invalid UTF-8 in any form, and JSON nested 100,000 deep: a quick 400 in OpenAI's shape."""
    request_ids: dict[str, str] = {}
    for case, raw in cases.items():
        request_ids[case], headers = _tag()
        error = _assert_openai_error(_post(gw, raw, headers), 400)
        assert error["type"] == "invalid_request_error", case
        if needle is not None:
            assert needle in error["message"], case
    assert sim.requests == []
    for case, entry in _logs(gw, request_ids).items():
        assert entry["status"] == 400, case


NESTED_300 = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "stream": %s, "x": '


def _nested(model: str, stream: bool, depth: int = 300) -> bytes:
    head = NESTED_300 % (model.encode(), b"true" if stream else b"false")
    return head + b"[" * depth + b"]" * depth + b"}"


def test_nested_json_the_gateway_need_not_rewrite_is_served(gw: RunningGateway, sim: SimServer) -> None:
    """300 levels: legal JSON a provider may accept; the gateway passes it through untouched."""
    response = _post(gw, _nested("m", stream=False), {})
    assert response.status_code == 200, response.text
    assert sim.requests[-1].body.count(b"[") == 301


def test_nested_json_the_gateway_must_rewrite_is_400(gw: RunningGateway, sim: SimServer) -> None:
    """A stream asks for usage, so the body is rewritten, and 300 levels are more than the
    rewrite (orjson: 254) writes: a clear 400 rather than a crash or a mangled body."""
    request_id, headers = _tag()
    error = _assert_openai_error(_post(gw, _nested("deep-stream", stream=True), headers), 400)
    assert "nested too deeply" in error["message"]
    assert sim.requests == []
    assert _log(gw, request_id)["status"] == 400


def test_a_rejected_rewrite_is_not_logged_as_a_cut_off_response(gw: RunningGateway) -> None:
    model = f"deep-{uuid.uuid4().hex[:8]}"
    request_id, headers = _tag()
    assert _post(gw, _nested(model, stream=True), headers).status_code == 400
    _log(gw, request_id)
    deadline = time.monotonic() + 2  # the processor logs as the stream closes: give it time to
    while time.monotonic() < deadline:
        logged = [line for line in list(gw.stderr_lines) if f"model={model} " in line]
        assert not logged, f"a request rejected with 400 was logged as a response: {logged}"
        time.sleep(0.05)


def test_huge_valid_json_under_the_limit_is_served(gw: RunningGateway, sim: SimServer, sdk: openai.OpenAI) -> None:
    request_id, headers = _tag()
    messages = [{"role": "user", "content": "word " * 600_000}]  # ~3 MB of JSON, under the 4 MiB limit
    completion = sdk.chat.completions.create(model="m", messages=messages, extra_headers=headers)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == simtext.count_message_tokens(messages)
    assert sim.requests[-1].json["messages"] == messages
    assert 3_000_000 < len(sim.requests[-1].body) < BODY_LIMIT

    entry = _log(gw, request_id)
    assert entry["input_tokens"] == completion.usage.prompt_tokens
    assert entry["output_tokens"] == completion.usage.completion_tokens


def test_thousands_of_messages_are_served_with_exact_usage(gw: RunningGateway, sim: SimServer, sdk: openai.OpenAI) -> None:
    request_id, headers = _tag()
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i}"} for i in range(4999)
    ] + [{"role": "user", "content": "and the last one"}]
    completion = sdk.chat.completions.create(model="m", messages=messages, extra_headers=headers)
    assert len(sim.requests[-1].json["messages"]) == 5000
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == simtext.count_message_tokens(messages)

    entry = _log(gw, request_id)
    assert entry["input_tokens"] == completion.usage.prompt_tokens
    assert entry["total_tokens"] == completion.usage.total_tokens


# -- model names that try to become headers or paths --------------------------------------

REJECTED_MODELS = {
    "crlf-header": "a\r\nx-injected: 1",
    "lf": "a\nx-injected: 1",
    "cr": "a\rx-injected: 1",
    "nul": "a\x00b",
    "tab": "a\tb",
    "line-separator": "a\u2028x-injected: 1",
    "next-line": "a\u0085b",
    "10kB": "m" * 10_000,
}
ROUTED_MODELS = {
    "dot-dot": "/../admin",
    "dot-dot-relative": "../../../etc/passwd",
    "query": "m?x=1&api-version=evil",
    "fragment": "m#frag",
    "spaces": "my model name",
    "non-ascii": "modèle-日本語-🚀",
    "encoded-crlf": "a%0d%0ax-injected:%201",
    "semicolon": "m;x-injected=1",
    "slashes": "org/model/v2",
}


def test_model_names_with_control_characters_are_400(gw: RunningGateway, sim: SimServer) -> None:
    request_ids: dict[str, str] = {}
    for case, model in REJECTED_MODELS.items():
        request_ids[case], headers = _tag()
        response = _post(gw, {"model": model, "messages": USER}, headers)
        error = _assert_openai_error(response, 400, "invalid_value")
        assert error["param"] == "model", case
        assert "x-injected" not in response.headers, case
    assert sim.requests == []
    for case, entry in _logs(gw, request_ids).items():
        assert entry["status"] == 400, case


def test_odd_model_names_stay_in_the_body(gw: RunningGateway, sim: SimServer) -> None:
    """Routed (the default route takes any name), but never into the path, query or headers."""
    assert _post(gw, {"model": "m", "messages": USER}, {}).status_code == 200
    baseline = set(sim.requests[-1].headers)
    request_ids: dict[str, str] = {}
    for case, model in ROUTED_MODELS.items():
        sim.clear()
        request_ids[case], headers = _tag()
        response = _post(gw, {"model": model, "messages": USER}, headers)
        assert response.status_code == 200, (case, response.text)
        assert response.json()["model"] == model, case
        assert "x-injected" not in response.headers, case
        assert not [h for h in response.headers if h.startswith("x-ai-eg-")], case
        (upstream,) = sim.requests
        assert (upstream.path, upstream.query) == ("/v1/chat/completions", ""), case
        assert set(upstream.headers) == baseline, case  # not one header more (or less)
        assert upstream.json["model"] == model, case
    for case, entry in _logs(gw, request_ids).items():
        assert entry["request_model"] == ROUTED_MODELS[case] and entry["backend_name"] == "sim", case


def test_model_lookup_path_cannot_inject_headers(gw: RunningGateway) -> None:
    response = httpx.get(f"{gw.base_url}/models/a%0D%0Ax-injected:%201", timeout=30)
    assert response.status_code in (200, 404)
    assert "x-injected" not in response.headers
    assert response.headers["content-type"].startswith("application/json")


def test_client_backend_and_model_headers_do_not_choose_the_backend(gw: RunningGateway, sim: SimServer) -> None:
    request_ids: dict[str, str] = {}
    for spoof in ({"x-ai-eg-backend": "spare"}, {"x-ai-eg-model": "guarded-model"}):
        sim.clear()
        (name,) = spoof
        request_ids[name], headers = _tag()
        response = _post(gw, {"model": "m", "messages": USER}, {**headers, **spoof})
        assert response.status_code == 200, response.text
        (upstream,) = sim.requests
        assert upstream.path == "/v1/chat/completions", name  # the model's own route: "sim", not "spare"
    for name, entry in _logs(gw, request_ids).items():
        assert entry["backend_name"] == "sim", name


def test_client_route_header_does_not_choose_the_backend(gw: RunningGateway, sim: SimServer) -> None:
    request_id, headers = _tag()
    response = _post(gw, {"model": "m", "messages": USER}, {**headers, "x-ai-eg-route": "guarded"})
    assert response.status_code == 200, response.text
    (upstream,) = sim.requests
    assert upstream.path == "/v1/chat/completions"  # the model's own route: backend "sim", not "spare"
    assert _log(gw, request_id)["backend_name"] == "sim"
