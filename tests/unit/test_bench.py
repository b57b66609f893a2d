"""scripts/bench's pure helpers: fake upstream bodies (checked with the openai SDK's own
types), the Envoy configs, the wrk script and result line, the report table, and the
floor's no-op processor (its handler driven with real ext_proc messages, no network)."""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc import envoyconfig

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench_lib import bodies, envoy, litellm, messages, noop_processor, procs, report  # noqa: E402
from bench_lib import wrk as wrklib  # noqa: E402

# --- fake upstream bodies ---------------------------------------------------------------


def test_chat_completion_body_is_an_openai_chat_completion() -> None:
    completion = ChatCompletion.model_validate(json.loads(bodies.chat_completion_body()))
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == bodies.answer_text()
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_stream_body_is_24_content_chunks_a_finish_a_usage_chunk_and_done() -> None:
    body = bodies.chat_stream_body()
    assert body.endswith("data: [DONE]\n\n")
    payloads = bodies.parse_sse_data(body)
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == bodies.CONTENT_EVENTS == 24
    assert content[0].choices[0].delta.role == "assistant"
    finish, usage_only = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "stop" and finish.usage is None
    assert usage_only.choices == []
    assert usage_only.usage is not None and usage_only.usage.completion_tokens == 24
    assert len(chunks) == 26
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == bodies.answer_text()


def test_the_openai_sdk_streams_the_fake_upstream_body() -> None:
    """The SDK's own SSE reader (as used by `create(stream=True)`) accepts the stream."""
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    response = httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=bodies.chat_stream_body().encode(),
        request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"),
    )
    chunks = list(openai.Stream(cast_to=ChatCompletionChunk, response=response, client=client))
    assert len(chunks) == 26
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == bodies.usage()["total_tokens"]


def test_long_stream_body_is_240_content_chunks_with_the_same_finish_usage_and_done() -> None:
    body = bodies.chat_stream_body(bodies.LONG_CONTENT_EVENTS)
    assert body.endswith("data: [DONE]\n\n")
    payloads = bodies.parse_sse_data(body)
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == bodies.LONG_CONTENT_EVENTS == 240
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    finish, usage_only = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "stop" and finish.usage is None
    assert usage_only.choices == [] and usage_only.usage is not None
    assert usage_only.usage.completion_tokens == 240
    assert usage_only.usage.prompt_tokens == bodies.PROMPT_TOKENS
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == bodies.answer_text(240)
    # The same finish and usage chunks as the 24-event stream, but for the token count.
    short = bodies.chat_chunks()
    assert bodies.chat_chunks(240)[-2] == short[-2]
    assert bodies.chat_chunks(240)[-1]["usage"] == bodies.usage(240) != short[-1]["usage"]


def test_the_openai_sdk_streams_the_long_body() -> None:
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    response = httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=bodies.chat_stream_body(240).encode(),
        request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"),
    )
    chunks = list(openai.Stream(cast_to=ChatCompletionChunk, response=response, client=client))
    assert len(chunks) == 242
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == bodies.PROMPT_TOKENS + 240


def test_sse_modes_name_each_stream() -> None:
    assert bodies.SSE_MODES == {"sse": 24, "sse240": 240}
    assert bodies.sse_mode() == "sse" and bodies.sse_mode(240) == "sse240"
    assert bodies.answer_text(24) == bodies.answer_text()
    assert bodies.answer_text(240) == bodies.answer_text() * 10


@pytest.mark.parametrize("stream", [False, True])
def test_request_body_is_about_one_kilobyte_of_chat_request(stream: bool) -> None:
    raw = bodies.request_body(stream)
    assert 950 <= len(raw) <= 1200
    body = json.loads(raw)
    assert body["model"] == bodies.REQUEST_MODEL
    assert len(body["messages"][-1]["content"]) == bodies.PROMPT_CHARS
    assert body.get("stream", False) is stream
    assert "stream_options" not in body


def test_request_body_can_ask_for_stream_usage() -> None:
    body = json.loads(bodies.request_body(True, include_usage=True))
    assert body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in json.loads(bodies.request_body(False, include_usage=True))


def test_parse_sse_data_handles_crlf_and_multiline_data() -> None:
    assert bodies.parse_sse_data("data: a\r\n\r\n: comment\n\ndata: b\ndata: c\n\n") == ["a", "b\nc"]


# --- Envoy configs ---------------------------------------------------------------------


def test_fake_upstream_serves_sse_only_for_post_with_the_mode_header() -> None:
    config = envoy.fake_upstream(8000, 8001, '{"json":1}', "data: x\n\n" * 1000)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route_config = hcm["route_config"]
    assert route_config["max_direct_response_body_size_bytes"] >= 9000  # Envoy's default limit is 4 KiB
    sse, fallback = route_config["virtual_hosts"][0]["routes"]
    headers = {h["name"]: h["string_match"]["exact"] for h in sse["match"]["headers"]}
    assert headers == {":method": "POST", bodies.SSE_MODE_HEADER: "sse"}
    assert sse["response_headers_to_add"][0]["header"]["value"] == "text/event-stream"
    assert "headers" not in fallback["match"]
    assert fallback["response_headers_to_add"][0]["header"]["value"] == "application/json"
    # The whole request is read before answering, so connections stay open.
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.buffer", "envoy.filters.http.router"]


def test_fake_upstream_serves_another_sse_mode_for_its_header_value() -> None:
    long_body = bodies.chat_stream_body(240)
    config = envoy.fake_upstream(8000, 8001, "{}", "data: short\n\n", {"sse240": long_body})
    route_config = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]
    routes = route_config["virtual_hosts"][0]["routes"]
    by_mode = {
        h["string_match"]["exact"]: r["direct_response"]["body"]["inline_string"]
        for r in routes if "headers" in r["match"]
        for h in r["match"]["headers"] if h["name"] == bodies.SSE_MODE_HEADER
    }
    assert by_mode == {"sse": "data: short\n\n", "sse240": long_body}
    assert routes[-1]["name"] == "json"
    assert route_config["max_direct_response_body_size_bytes"] >= len(long_body)


def test_plain_proxy_routes_everything_to_the_upstream_without_ext_proc() -> None:
    config = envoy.plain_proxy(8000, 8001, 9000)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]
    (cluster,) = config["static_resources"]["clusters"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9000}


# --- wrk -------------------------------------------------------------------------------


def test_lua_script_posts_the_body_with_the_headers() -> None:
    load = wrklib.LOADS_BY_NAME["sse_c8"]
    script = wrklib.load_script(load)
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["content-type"] = "application/json"' in script
    assert f'wrk.headers["{bodies.SSE_MODE_HEADER}"] = "sse"' in script
    assert bodies.request_body(True).decode() in script
    assert "function done(summary, latency, requests)" in script
    assert wrklib.RESULT_MARKER in script
    assert "x-bench-mode" not in wrklib.load_script(wrklib.LOADS_BY_NAME["rps_c32"])


def test_the_240_event_load_asks_for_the_long_stream() -> None:
    load = wrklib.LOADS_BY_NAME["sse240_c8"]
    script = wrklib.load_script(load)
    assert f'wrk.headers["{bodies.SSE_MODE_HEADER}"] = "sse240"' in script
    assert bodies.request_body(True).decode() in script  # the same request as the 24-event load
    assert load.as_dict()["sse_events"] == 240
    assert "sse_events" not in wrklib.LOADS_BY_NAME["rps_c32"].as_dict()


def test_lua_long_string_level_avoids_the_body_content() -> None:
    script = wrklib.lua_script(b'{"a":"]]","b":"]=]"}', {})
    assert 'wrk.body = [==[\n{"a":"]]","b":"]=]"}]==]' in script


def test_loads_are_the_documented_ones() -> None:
    assert [(x.name, x.stream, x.connections, x.threads) for x in wrklib.LOADS] == [
        ("latency_c1", False, 1, 1),
        ("sse_c1", True, 1, 1),
        ("rps_c32", False, 32, 2),
        ("sse_c8", True, 8, 2),
        ("sse240_c8", True, 8, 2),
    ]
    assert [x.events for x in wrklib.LOADS if x.stream] == [24, 24, 240]
    argv = wrklib.command("/usr/bin/wrk", "http://127.0.0.1:1/v1/chat/completions", "s.lua", wrklib.LOADS[2], 3)
    assert argv == [
        "/usr/bin/wrk", "-t", "2", "-c", "32", "-d", "3s", "--timeout", "5s", "-s", "s.lua",
        "http://127.0.0.1:1/v1/chat/completions",
    ]


WRK_STDOUT = """Running 3s test @ http://127.0.0.1:40000/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.05ms  564.30us   4.42ms   70.00%
  3764 requests in 2.00s, 2.99MB read
  Non-2xx or 3xx responses: 4
Requests/sec:   1882.00
BENCH_JSON {"requests":3764,"duration_us":2000000,"bytes":3131648,"errors":{"connect":0,"read":1,"write":0,\
"status":4,"timeout":2},"latency_us":{"min":45.0,"mean":1051.8,"stdev":564.3,"max":4418.0,"p50":971.0,\
"p90":1791.0,"p99":2642.0,"p999":4158.0}}
"""


def test_parse_result_reads_the_json_line_not_the_human_output() -> None:
    result = wrklib.parse_result(WRK_STDOUT)
    assert result["requests"] == 3764
    assert result["duration_s"] == 2.0
    assert result["rps"] == 1882.0
    assert result["bytes"] == 3131648
    assert result["errors"] == {"connect": 0, "read": 1, "write": 0, "timeout": 2, "status": 4}
    assert result["errors_total"] == 7
    assert result["latency_ms"]["p50"] == pytest.approx(0.971)
    assert result["latency_ms"]["p90"] == pytest.approx(1.791)
    assert result["latency_ms"]["p99"] == pytest.approx(2.642)
    assert result["latency_ms"]["max"] == pytest.approx(4.418)


def test_parse_result_with_no_completed_request_has_no_latency() -> None:
    line = (
        'BENCH_JSON {"requests":0,"duration_us":3000000,"bytes":0,"errors":{"connect":32,"read":0,"write":0,'
        '"status":0,"timeout":0},"latency_us":{"min":null,"mean":null,"stdev":null,"max":null,"p50":null,'
        '"p90":null,"p99":null,"p999":null}}'
    )
    result = wrklib.parse_result(line)
    assert result["rps"] == 0.0
    assert result["errors_total"] == 32
    assert set(result["latency_ms"].values()) == {None}


@pytest.mark.parametrize(
    "stdout",
    [
        "Running 3s test\nRequests/sec: 100\n",
        "BENCH_JSON {not json",
        'BENCH_JSON {"requests":"many","duration_us":1,"errors":{},"latency_us":{}}',
        'BENCH_JSON {"requests":1,"duration_us":1}',
        "BENCH_JSON [1, 2]",
    ],
)
def test_parse_result_rejects_missing_or_malformed_lines(stdout: str) -> None:
    with pytest.raises(wrklib.WrkOutputError):
        wrklib.parse_result(stdout)


# --- processes (pure parts) ---------------------------------------------------------------


def test_processor_processes_are_recognised_by_their_command_line() -> None:
    python = "/work/main/.venv/bin/python"
    serve = [python, "-m", "extproc", "serve", "--config", "/tmp/g.yaml"]
    worker = [python, "-m", "extproc", "--log-level", "INFO", "serve", "--config", "x", "--worker-index", "1"]
    run = [python, "-m", "extproc", "run", "--config", "/tmp/serve/g.yaml"]
    envoy_argv = ["/x/envoy", "-c", "/tmp/envoy.yaml"]
    assert procs.is_processor(serve) and procs.is_processor(worker)
    assert not procs.is_processor(run)
    assert not procs.is_processor(envoy_argv)


def test_cpu_between_snapshots_counts_new_processes_whole_and_skips_reused_pids() -> None:
    ticks = procs.CLOCK_TICKS
    before = {1: (100, 10 * ticks), 2: (200, 5 * ticks)}
    after = {1: (100, 12 * ticks), 2: (999, 1 * ticks), 3: (300, 3 * ticks)}  # pid 2 was reused
    assert procs.cpu_seconds_between(before, after) == pytest.approx(2 + 1 + 3)


# --- report ----------------------------------------------------------------------------


def _run(rps: float, p50: float, p90: float, p99: float, errors: dict[str, int] | None = None,
         **extra: Any) -> dict[str, Any]:
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0, **(errors or {})}
    result = {
        "requests": int(rps * 10),
        "duration_s": 10.0,
        "rps": rps,
        "errors": errors,
        "errors_total": sum(errors.values()),
        "latency_ms": {"p50": p50, "p90": p90, "p99": p99},
    }
    return {"error": None, "result": result, **extra}


def _results() -> dict[str, Any]:
    return {
        "direct": {"error": None, "loads": {"latency_c1": _run(20000, 0.05, 0.07, 0.1), "rps_c32": _run(50000, 0.5, 1, 2)}},
        "envoy": {"error": None, "loads": {"latency_c1": _run(8000, 0.12, 0.15, 0.3), "rps_c32": _run(20000, 1.5, 2, 4)}},
        "gateway": {
            "error": None,
            "loads": {
                "latency_c1": _run(
                    1000, 0.92, 1.1, 2.3, processor={"cpu_ms_per_request": 0.8123, "rss_bytes": 200 * report.MIB},
                    messages={"per_request": 4.0},
                ),
                "rps_c32": _run(
                    5000, 6.5, 8, 12.25, {"status": 3}, processor={"cpu_ms_per_request": 0.5, "rss_bytes": 210 * report.MIB},
                    system_cpu={"other_share": 0.4},
                ),
            },
        },
    }


def test_compare_gives_added_latency_and_rps_share() -> None:
    results = _results()
    cmp = report.compare(results["gateway"]["loads"]["latency_c1"], results["envoy"]["loads"]["latency_c1"])
    assert cmp["added_p50_ms"] == pytest.approx(0.8)
    assert cmp["added_p99_ms"] == pytest.approx(2.0)
    assert cmp["rps_percent_of_envoy"] == pytest.approx(12.5)
    assert set(report.compare(None, results["envoy"]["loads"]["latency_c1"]).values()) == {None}
    assert set(report.compare({"error": "boom"}, results["envoy"]["loads"]["latency_c1"]).values()) == {None}


def test_table_has_a_row_per_load_and_column_groups_per_scenario() -> None:
    text = report.format_table(
        _results(), ["direct", "envoy", "gateway"], ["latency_c1", "rps_c32"], "processor (2 workers)"
    )
    lines = text.splitlines()
    titles, headers = lines[0], lines[1]
    for title in ("direct (no proxy)", "Envoy alone", "gateway", "gateway vs Envoy alone", "processor (2 workers)"):
        assert title in titles
    assert headers.split("|")[1].split() == ["RPS", "p50", "p90", "p99"]
    assert "CPU ms/req" in headers and "RSS MiB" in headers and "msg/req" in headers
    latency = next(line for line in lines if line.startswith("latency_c1"))
    cells = [c.split() for c in latency.split("|")]
    assert cells[1] == ["20000", "0.05", "0.07", "0.10"]
    assert cells[2] == ["8000", "0.12", "0.15", "0.30"]
    assert cells[3] == ["1000", "0.92", "1.10", "2.30"]
    assert cells[4] == ["+0.80", "+2.00", "12.5%"]
    assert headers.split("|")[4].split() == ["+p50", "+p99", "RPS", "%"]
    assert cells[5] == ["0.812", "200.0", "4.00"]
    rps = next(line for line in lines if line.startswith("rps_c32"))
    assert rps.split("|")[3].split()[0] == "5000!~"  # wrk errors and a busy machine are flagged
    assert "gateway rps_c32: 3 errors in 50000 requests (status 3)" in text
    assert "gateway rps_c32: other processes on the machine used 40% of all CPUs" in text
    # Columns line up: every table line has its separators at the same places.
    def separators(line: str, char: str) -> tuple[int, ...]:
        return tuple(i for i, ch in enumerate(line) if ch == char)

    assert lines[2].startswith("-----")
    positions = {separators(line, "|") for line in lines[:2] + lines[3:5]} | {separators(lines[2], "+")}
    assert len(positions) == 1


def test_table_reports_a_failed_scenario_and_a_failed_run_without_losing_the_others() -> None:
    results = _results()
    results["gateway"] = {"error": "extproc run exited with code 1: port in use\nmore", "loads": {}}
    results["envoy"]["loads"]["rps_c32"] = {"error": "wrk exited with code 1: boom"}
    text = report.format_table(results, ["direct", "envoy", "gateway"], ["latency_c1", "rps_c32"])
    latency = next(line for line in text.splitlines() if line.startswith("latency_c1"))
    assert latency.split("|")[3].split() == ["failed"] * 4
    assert latency.split("|")[4].split() == ["-", "-", "-"]
    assert latency.split("|")[1].split()[0] == "20000"
    rps = next(line for line in text.splitlines() if line.startswith("rps_c32"))
    assert rps.split("|")[2].split() == ["error"] * 4
    assert "gateway: FAILED: extproc run exited with code 1: port in use" in text
    assert "more" not in text
    assert "envoy rps_c32: wrk exited with code 1: boom" in text


def test_table_shows_a_run_that_never_finished_as_dashes() -> None:
    results = _results()
    results["gateway"]["loads"]["rps_c32"] = {"error": None, "warmup": {}}
    del results["envoy"]["loads"]["rps_c32"]
    text = report.format_table(results, ["direct", "envoy", "gateway"], ["latency_c1", "rps_c32"])
    rps = next(line for line in text.splitlines() if line.startswith("rps_c32"))
    assert [cell.split() for cell in rps.split("|")[2:5]] == [["-"] * 4, ["-"] * 4, ["-"] * 3]


def test_table_without_gateway_has_no_comparison_or_processor_columns() -> None:
    text = report.format_table(_results(), ["direct"], ["latency_c1"])
    assert "gateway" not in text and "processor" not in text
    assert text.splitlines()[1].split("|")[1].split() == ["RPS", "p50", "p90", "p99"]


def test_number_formats() -> None:
    assert report.fmt_ms(0.123) == "0.12"
    assert report.fmt_ms(123.45) == "123.5"
    assert report.fmt_ms(None) == "-"
    assert report.fmt_delta_ms(-0.5) == "-0.50"
    assert report.fmt_delta_ms(0.0) == "+0.00"
    assert report.fmt_percent(99.94) == "99.9%"
    assert report.fmt_rps(1234.6) == "1235"


# --- the optional litellm scenario ------------------------------------------------------


def test_request_body_for_another_model_differs_only_in_the_model() -> None:
    for stream in (False, True):
        default = json.loads(bodies.request_body(stream))
        other = json.loads(bodies.request_body(stream, model=litellm.MODEL_NAME))
        assert other.pop("model") == litellm.MODEL_NAME
        assert default.pop("model") == bodies.REQUEST_MODEL
        assert other == default
    script = wrklib.load_script(wrklib.LOADS_BY_NAME["sse_c8"], model=litellm.MODEL_NAME)
    assert bodies.request_body(True, model=litellm.MODEL_NAME).decode() in script
    assert f'wrk.headers["{bodies.SSE_MODE_HEADER}"] = "sse"' in script


def test_litellm_config_is_one_openai_deployment_on_the_fake_upstream_without_a_database() -> None:
    config = litellm.config(41000)
    (deployment,) = config["model_list"]
    assert deployment["model_name"] == litellm.MODEL_NAME == "bench-model"
    assert deployment["litellm_params"] == {
        "model": f"openai/{bodies.REQUEST_MODEL}",
        "api_base": "http://127.0.0.1:41000/v1",
        "api_key": "fake",
    }
    general = config["general_settings"]
    assert "master_key" not in general and "database_url" not in general
    assert general["disable_spend_logs"] is True and general["disable_error_logs"] is True
    # The fake upstream streams only for requests carrying the x-bench-mode header.
    assert general["forward_client_headers_to_llm_api"] is True
    assert config["litellm_settings"]["set_verbose"] is False


def test_litellm_environment_is_lean_and_drops_what_would_change_the_proxy() -> None:
    base = {
        "PATH": "/usr/bin", "HOME": "/root", "LITELLM_MASTER_KEY": "sk-x", "DATABASE_URL": "postgres://x",
        "PYTHONPATH": "/elsewhere", "LITELLM_LOG": "DEBUG", "REDIS_HOST": "r",
    }
    env = litellm.environment(base)
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/root"
    for dropped in ("LITELLM_MASTER_KEY", "DATABASE_URL", "PYTHONPATH", "REDIS_HOST"):
        assert dropped not in env
    assert env["LITELLM_LOG"] == "ERROR"
    assert env["DISABLE_ADMIN_UI"] == "True"
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert env["LITELLM_TELEMETRY_DISABLED"] == "true"


def test_litellm_command_line_listens_on_loopback_with_two_workers() -> None:
    argv = litellm.command(Path("/v"), Path("/t/c.yaml"), 4321)
    assert argv[0] == "/v/bin/litellm"
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert flags["--config"] == "/t/c.yaml"
    assert flags["--host"] == "127.0.0.1"
    assert flags["--port"] == "4321"
    assert flags["--num_workers"] == "2"
    assert int(flags["--timeout_worker_healthcheck"]) >= 60
    assert litellm.requirement() == f"litellm[proxy]=={litellm.PINNED_VERSION}"


def test_litellm_output_helpers() -> None:
    assert litellm.ready_workers("x\nLiteLLM: Proxy initialized with Config\ny\nLiteLLM: Proxy initialized with") == 2
    stderr = "12:00 - LiteLLM Proxy:CRITICAL: LITELLM_MASTER_KEY is not set! ...\nERROR: port in use"
    assert litellm.failure_lines(stderr) == ["ERROR: port in use"]
    pip_log = (
        "$ python -m pip install litellm\nWARNING: Location 'file:///x' is ignored: it is neither a file nor a directory.\n"
        "Collecting litellm\nERROR: Could not find a version\nERROR: No matching distribution found\n"
    )
    assert litellm.log_summary(pip_log) == "ERROR: Could not find a version | ERROR: No matching distribution found"
    assert litellm.log_summary("$ cmd\nCollecting a\nKilled\n") == "Collecting a | Killed"


def _fake_venv(tmp_path: Path, version: str, install_ok: bool) -> Path:
    """A venv whose python answers like one holding litellm `version`, and whose
    `pip install` either installs PINNED_VERSION or fails as pip does."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    state = tmp_path / "version"
    state.write_text(version)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-c" ]; then cat {state}; echo; exit 0; fi\n'
        'if [ "$3" = "freeze" ]; then echo "litellm==$(cat ' + str(state) + ')"; exit 0; fi\n'
        + (f'echo "Successfully installed"; echo {litellm.PINNED_VERSION} > {state}; exit 0\n' if install_ok
           else 'echo "ERROR: No matching distribution found for litellm"; exit 1\n')
    )
    python.chmod(0o755)
    return venv


def test_litellm_venv_with_the_pinned_version_is_reused(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path, litellm.PINNED_VERSION, install_ok=False)
    messages: list[str] = []
    info = litellm.ensure_installed(venv, tmp_path / "install.log", messages.append)
    assert info["installed_now"] is False and info["version"] == litellm.PINNED_VERSION
    assert info["pip_freeze"] == [f"litellm=={litellm.PINNED_VERSION}"]
    assert messages == [] and not (tmp_path / "install.log").exists()


def test_litellm_venv_with_another_version_is_upgraded(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path, "1.0.0", install_ok=True)
    messages: list[str] = []
    info = litellm.ensure_installed(venv, tmp_path / "install.log", messages.append)
    assert info["found_version"] == "1.0.0"
    assert info["installed_now"] is True and info["version"] == litellm.PINNED_VERSION
    assert "replacing 1.0.0" in messages[0]
    assert f"pip install --disable-pip-version-check --no-input {litellm.requirement()}" in (
        tmp_path / "install.log"
    ).read_text()


def test_litellm_install_failure_says_what_pip_said(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path, "", install_ok=False)
    with pytest.raises(litellm.InstallError, match="No matching distribution found for litellm"):
        litellm.ensure_installed(venv, tmp_path / "install.log", lambda message: None)


def _bench_module() -> Any:
    loader = importlib.machinery.SourceFileLoader("bench_script", str(SCRIPTS / "bench"))
    spec = importlib.util.spec_from_loader("bench_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_litellm_scenario_runs_only_when_asked_for() -> None:
    bench = _bench_module()
    assert bench.parse_args([]).scenarios == ["direct", "envoy", "gateway", "floor"]
    assert bench.parse_args([]).litellm is False
    args = bench.parse_args(["--litellm"])
    assert args.scenarios == ["direct", "envoy", "gateway", "floor", "litellm"] and args.litellm is True
    assert args.litellm_venv == bench.REPO / ".bench" / "litellm-venv"
    assert bench.parse_args(["--scenarios", "litellm,direct"]).scenarios == ["direct", "litellm"]
    assert bench.parse_args(["--scenarios", "gateway", "--litellm"]).scenarios == ["gateway", "litellm"]
    assert bench.parse_args(["--scenarios", "floor,gateway"]).scenarios == ["gateway", "floor"]  # floor after gateway


def _with_litellm() -> dict[str, Any]:
    results = _results()
    results["gateway"]["loads"]["latency_c1"]["cpu"] = {
        "processor": {"cpu_ms_per_request": 0.8}, "proxy_envoy": {"cpu_ms_per_request": 0.2}
    }
    results["litellm"] = {
        "error": None,
        "loads": {
            "latency_c1": _run(400, 2.5, 3, 9.5, litellm={"cpu_ms_per_request": 4.0, "rss_bytes": 900 * report.MIB}),
            "rps_c32": _run(500, 60, 80, 120),
        },
    }
    return results


def test_compare_litellm_gives_rps_ratio_and_whole_proxy_cpu() -> None:
    results = _with_litellm()
    cmp = report.compare_litellm(results["gateway"]["loads"]["latency_c1"], results["litellm"]["loads"]["latency_c1"])
    assert cmp["rps_ratio"] == pytest.approx(2.5)
    assert cmp["gateway_p50_ms"] == pytest.approx(0.92) and cmp["litellm_p50_ms"] == pytest.approx(2.5)
    assert cmp["gateway_cpu_ms_per_request"] == pytest.approx(1.0)
    assert cmp["cpu_ratio"] == pytest.approx(4.0)
    assert report.compare_litellm(None, results["litellm"]["loads"]["latency_c1"])["rps_ratio"] is None
    assert report.compare_litellm(results["gateway"]["loads"]["rps_c32"], {"error": "boom"})["rps_ratio"] is None


def test_table_with_litellm_has_its_group_the_rps_ratio_and_its_resources() -> None:
    text = report.format_table(
        _with_litellm(), ["direct", "envoy", "gateway", "litellm"], ["latency_c1", "rps_c32"],
        "processor (2 workers)", "LiteLLM (2 workers)",
    )
    lines = text.splitlines()
    titles = [t.strip() for t in lines[0].split("|")]
    assert titles == [
        "", "direct (no proxy)", "Envoy alone", "gateway", "LiteLLM", "gateway vs Envoy alone", "gateway vs LiteLLM",
        "processor (2 workers)", "LiteLLM (2 workers)",
    ]
    latency = [c.split() for c in next(line for line in lines if line.startswith("latency_c1")).split("|")]
    assert latency[4] == ["400", "2.50", "3.00", "9.50"]
    assert latency[6] == ["2.50x"]
    assert latency[7] == ["0.812", "200.0", "4.00"]
    assert latency[8] == ["4.000", "900.0"]
    rps = [c.split() for c in next(line for line in lines if line.startswith("rps_c32")).split("|")]
    assert rps[6] == ["10.0x"]
    assert rps[8] == ["-", "-"]
    assert "gateway vs LiteLLM: gateway RPS / LiteLLM RPS" in text
    columns = {tuple(i for i, ch in enumerate(line) if ch == "|") for line in lines[:2] + lines[3:5]}
    assert len(columns) == 1 and columns == {tuple(i for i, ch in enumerate(lines[2]) if ch == "+")}


def test_table_with_a_failed_litellm_keeps_the_others() -> None:
    results = _results()
    results["litellm"] = {"error": "LiteLLM install failed: ERROR: No matching distribution", "loads": {}}
    text = report.format_table(results, ["gateway", "litellm"], ["latency_c1"])
    latency = [c.split() for c in next(line for line in text.splitlines() if line.startswith("latency_c1")).split("|")]
    assert latency[1] == ["1000", "0.92", "1.10", "2.30"]
    assert latency[2] == ["failed"] * 4
    assert latency[3] == ["-"]
    assert "litellm: FAILED: LiteLLM install failed" in text


def test_ratio_format() -> None:
    assert report.fmt_ratio(None) == "-"
    assert report.fmt_ratio(2.345) == "2.35x"
    assert report.fmt_ratio(12.34) == "12.3x"


# --- the floor: a no-op processor behind the gateway's request-stage ext_proc filter -----


def _headers(end_of_stream: bool = False, **pairs: str) -> ep.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in pairs.items()]
    return ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=end_of_stream)


def _exchange(stream: bool) -> list[ep.ProcessingRequest]:
    """What Envoy sends for one request in the gateway's request-stage modes."""
    response_body = [
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: {}\n\n", end_of_stream=False)),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: [DONE]\n\n", end_of_stream=True)),
    ] if stream else [ep.ProcessingRequest(response_body=ep.HttpBody(body=b"{}", end_of_stream=True))]
    return [
        ep.ProcessingRequest(request_headers=_headers(**{":method": "POST", ":path": "/v1/chat/completions"})),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=bodies.request_body(stream), end_of_stream=True)),
        ep.ProcessingRequest(response_headers=_headers(**{":status": "200"})),
        *response_body,
    ]


def _drive(processor: noop_processor.NoopProcessor, requests: list[ep.ProcessingRequest]) -> tuple[list[Any], int]:
    """Run the handler over `requests` as grpc.aio would; returns its answers and how many
    messages it read before it ended the stream."""
    read = 0

    async def incoming() -> AsyncIterator[ep.ProcessingRequest]:
        nonlocal read
        for request in requests:
            read += 1
            yield request

    async def collect() -> list[Any]:
        return [answer async for answer in processor.Process(incoming(), None)]  # type: ignore[arg-type]

    return asyncio.run(collect()), read


@pytest.mark.parametrize("phase", noop_processor.PHASES)
def test_noop_processor_answers_each_phase_with_an_empty_continue_of_its_type(phase: str) -> None:
    request = ep.ProcessingRequest()
    getattr(request, phase).SetInParent()
    (answer,), _ = _drive(noop_processor.NoopProcessor(), [request])
    assert answer.WhichOneof("response") == phase
    assert answer == noop_processor.ANSWERS[phase]
    empty = ep.ProcessingResponse()
    getattr(empty, phase).SetInParent()
    assert answer == empty  # changes nothing: no mutation, no metadata, no mode override


@pytest.mark.parametrize("stream", [False, True])
def test_noop_processor_ends_the_stream_after_the_last_response_body_chunk(stream: bool) -> None:
    processor = noop_processor.NoopProcessor()
    requests = _exchange(stream)
    extra = ep.ProcessingRequest(response_trailers=ep.HttpTrailers())  # never read: the stream is over
    answers, read = _drive(processor, [*requests, extra])
    assert [a.WhichOneof("response") for a in answers] == [r.WhichOneof("request") for r in requests]
    assert read == len(requests)
    assert processor.messages == {
        "request_headers": 1, "request_body": 1, "response_headers": 1, "response_body": 2 if stream else 1,
    }


def test_noop_processor_ends_the_stream_after_response_headers_that_end_the_response() -> None:
    processor = noop_processor.NoopProcessor()
    requests = [*_exchange(False)[:2], ep.ProcessingRequest(response_headers=_headers(True, **{":status": "204"}))]
    answers, read = _drive(processor, [*requests, *_exchange(False)[3:]])
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body", "response_headers"]
    assert read == 3


def test_noop_processor_counts_are_read_like_the_gateways() -> None:
    processor = noop_processor.NoopProcessor()
    _drive(processor, _exchange(True))
    _drive(processor, _exchange(False))
    counts = messages.parse_counts(processor.metrics_text())
    assert counts == {
        ("request", "request_headers"): 2, ("request", "request_body"): 2,
        ("request", "response_headers"): 2, ("request", "response_body"): 3,
    }


GATEWAY_METRICS = """# HELP extproc_processor_messages_total ext_proc messages the processor answered
# TYPE extproc_processor_messages_total counter
extproc_processor_messages_total{phase="request_headers",stage="request"} 10.0
extproc_processor_messages_total{phase="response_body",stage="request"} 25.0
extproc_processor_messages_total{phase="request_headers",stage="upstream"} 4.0
# HELP extproc_processor_duration_seconds time
# TYPE extproc_processor_duration_seconds histogram
extproc_processor_duration_seconds_count 3.0
"""


def test_message_counts_per_request_between_two_readings() -> None:
    before = messages.parse_counts(GATEWAY_METRICS)
    assert before == {
        ("request", "request_headers"): 10, ("request", "response_body"): 25, ("upstream", "request_headers"): 4,
    }
    after = messages.add([before, {("request", "request_headers"): 10, ("request", "response_body"): 20}])
    result = messages.per_request(before, after, 10)
    assert result["messages"] == 30 and result["requests"] == 10
    assert result["per_request"] == pytest.approx(3.0)
    assert result["per_request_by_phase"] == {"request": {"request_headers": 1.0, "response_body": 2.0}}
    # No counter on /metrics (metrics turned off): nothing to say, rather than 0 per request.
    assert messages.per_request({}, messages.parse_counts("# nothing\n"), 10)["per_request"] is None


def test_floor_envoy_has_the_gateways_request_stage_and_bootstrap_settings() -> None:
    bench = _bench_module()
    processor = {"grpc_address": "127.0.0.1:50000", "admin_address": "127.0.0.1", "admin_port": 51000, "workers": 2}
    gateway = bench.checked_config(bench.gateway_config(40000, processor, 40001, 40002), "floor")
    config = envoy.floor_proxy(40001, 40002, 40000, gateway)
    (listener,) = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 40001
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc, router = hcm["http_filters"]
    assert router["name"] == "envoy.filters.http.router"
    assert ext_proc == envoyconfig.http_filters(gateway)[0]  # the gateway's own rendering, not a copy
    assert ext_proc["typed_config"]["processing_mode"] == {
        "request_header_mode": "SEND", "request_body_mode": "BUFFERED", "request_trailer_mode": "SKIP",
        "response_header_mode": "SEND", "response_body_mode": "STREAMED", "response_trailer_mode": "SKIP",
    }
    # Every request goes straight to the fake upstream (the gateway routes by a header its processor sets).
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert route["match"] == {"prefix": "/"} and "headers" not in route["match"]
    upstream, processors = config["static_resources"]["clusters"]
    assert upstream["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"] == 40000
    assert processors["name"] == envoyconfig.PROCESSOR_CLUSTER == _cluster_of(ext_proc)
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in processors["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [50000, 50000 + bench.PORT_STRIDE]  # one no-op worker per gateway worker
    assert processors["health_checks"][0]["grpc_health_check"]["service_name"] == noop_processor.SERVICE_NAME
    assert config["layered_runtime"]["layers"][0]["static_layer"] == envoyconfig.RUNTIME_FLAGS
    assert config["grpc_async_client_manager_config"] == envoyconfig.GRPC_CLIENT_CACHE


def _cluster_of(ext_proc: dict[str, Any]) -> str:
    return str(ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"])


def _with_floor() -> dict[str, Any]:
    results = _results()
    results["envoy"]["loads"].update(sse_c8=_run(10000, 0.8, 1, 2), sse240_c8=_run(8000, 1, 1.2, 2.5))
    results["gateway"]["loads"].update(sse_c8=_run(1000, 8, 10, 20), sse240_c8=_run(500, 16, 20, 40))
    results["floor"] = {
        "error": None,
        "info": {"workers": 2},
        "loads": {
            "latency_c1": _run(
                2000, 0.62, 0.8, 1.3, processor={"cpu_ms_per_request": 0.5, "rss_bytes": 80 * report.MIB, "workers": 2},
                messages={"per_request": 4.0},
            ),
            "sse_c8": _run(1500, 5, 6, 9, messages={"per_request": 4.5}),
            "sse240_c8": {"error": "wrk exited with code 1: boom"},
        },
    }
    return results


def test_table_with_the_floor_has_its_group_its_comparison_and_its_processor() -> None:
    order = ["direct", "envoy", "gateway", "floor"]
    loads = ["latency_c1", "sse_c8", "sse240_c8"]
    text = report.format_table(
        _with_floor(), order, loads, "processor (2 workers)", floor_label="no-op processor (2 workers)"
    )
    lines = text.splitlines()
    assert [t.strip() for t in lines[0].split("|")] == [
        "", "direct (no proxy)", "Envoy alone", "gateway", "floor (no-op processor)", "gateway vs Envoy alone",
        "floor vs Envoy alone", "processor (2 workers)", "no-op processor (2 workers)",
    ]
    assert lines[1].split("|")[8].split() == ["CPU", "ms/req", "RSS", "MiB", "msg/req"]
    latency = [c.split() for c in next(line for line in lines if line.startswith("latency_c1")).split("|")]
    assert latency[4] == ["2000", "0.62", "0.80", "1.30"]
    assert latency[5] == ["+0.80", "+2.00", "12.5%"]
    assert latency[6] == ["+0.50", "+1.00", "25.0%"]
    assert latency[7] == ["0.812", "200.0", "4.00"]
    assert latency[8] == ["0.500", "80.0", "4.00"]
    sse = [c.split() for c in next(line for line in lines if line.startswith("sse_c8")).split("|")]
    assert sse[8] == ["-", "-", "4.50"]
    long = [c.split() for c in next(line for line in lines if line.startswith("sse240_c8")).split("|")]
    assert long[4] == ["error"] * 4 and long[6] == ["-", "-", "-"]
    # The target: 240-event streams at >= 80% of the 24-event throughput.
    assert "240 vs 24 events (sse240_c8 RPS as % of sse_c8's; target >= 80%): envoy 80.0%, gateway 50.0%" in text
    assert "floor sse240_c8: wrk exited with code 1: boom" in text
    columns = {tuple(i for i, ch in enumerate(line) if ch == "|") for line in lines[:2] + lines[3:6]}
    assert len(columns) == 1 and columns == {tuple(i for i, ch in enumerate(lines[2]) if ch == "+")}


def test_floor_results_in_the_json() -> None:
    bench = _bench_module()
    doc = {"scenarios": _with_floor(), "options": {"loads": ["latency_c1", "sse_c8", "sse240_c8"]}}
    floor = bench.comparisons(doc, "floor")
    assert floor["latency_c1"]["rps_percent_of_envoy"] == pytest.approx(25.0)
    assert floor["sse240_c8"]["rps_percent_of_envoy"] is None
    shares = bench.long_stream_shares(doc)
    assert shares["envoy"] == pytest.approx(80.0) and shares["gateway"] == pytest.approx(50.0)
    assert shares["floor"] is None and shares["direct"] is None
    assert bench.processor_label(doc, "floor", "no-op processor") == "no-op processor (2 workers)"
