"""scripts/soak's pure helpers: the memory verdict, Envoy counters, the incremental SSE
reader, the check of one streamed reply (against the simulator's own stream), the report."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from bench_lib import bodies  # noqa: E402
from bench_lib import soak  # noqa: E402

MIB = soak.MIB


def _samples(values_mib: list[float], step: float = 10.0) -> list[dict[str, Any]]:
    return [{"t_s": i * step, "processor_rss_bytes": int(v * MIB)} for i, v in enumerate(values_mib)]


# --- memory -------------------------------------------------------------------------------


def test_least_squares_slope() -> None:
    assert soak.least_squares_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert soak.least_squares_slope([(0, 5), (10, 5), (20, 5)]) == pytest.approx(0.0)
    assert soak.least_squares_slope([(0, 0), (1, 1), (2, 0), (3, 1)]) == pytest.approx(0.2)
    assert soak.least_squares_slope([(1, 1)]) is None
    assert soak.least_squares_slope([(1, 1), (1, 2)]) is None


def test_flat_memory_after_a_warm_up_climb() -> None:
    # Climbs during the warm-up (first 60 s), then wobbles around 150 MiB.
    v = soak.memory_verdict(_samples([100, 130, 145, 149, 150, 151, 150, 149, 151, 150, 150]), warmup_s=60)
    assert v["baseline_t_s"] == 60 and v["end_t_s"] == 100
    assert v["baseline_mib"] == pytest.approx(150) and v["end_mib"] == pytest.approx(150)
    assert v["growth_mib"] == pytest.approx(0) and v["growth_pct"] == pytest.approx(0)
    assert v["max_mib"] == pytest.approx(151)
    assert v["samples_after_warmup"] == 5
    assert abs(v["slope_mib_per_min"]) < 1
    assert v["flat"] is True and v["verdict"] == "flat"


def test_steady_growth_is_growing() -> None:
    # +1 MiB every 10 s after the warm-up: 6 MiB/min, 54 MiB over nine minutes.
    values = [100.0] * 6 + [100.0 + i for i in range(1, 56)]
    v = soak.memory_verdict(_samples(values), warmup_s=60)
    assert v["slope_mib_per_min"] == pytest.approx(6.0, rel=0.02)
    assert v["slope_mib_per_hour"] == pytest.approx(360, rel=0.02)
    assert v["baseline_mib"] == pytest.approx(101) and v["growth_mib"] == pytest.approx(54)
    assert v["flat"] is False and v["verdict"] == "GROWING"


def test_growth_within_tolerance_but_a_steep_slope_in_a_short_run_is_inconclusive() -> None:
    # 40 s after the warm-up, +5 MiB: below the 7.5 MiB tolerance (5% of 150), but the
    # slope would pass it within ten minutes.
    v = soak.memory_verdict(_samples([140, 145, 150, 151.25, 152.5, 153.75, 155]), warmup_s=20)
    assert v["tolerance_mib"] == pytest.approx(7.5)
    assert v["growth_mib"] == pytest.approx(5)
    assert v["flat"] is None and v["verdict"].startswith("rising")


def test_tolerance_is_the_larger_of_percent_and_mib() -> None:
    small = soak.memory_verdict(_samples([20, 20, 20]), warmup_s=0, tolerance_pct=5, tolerance_mib=4)
    assert small["tolerance_mib"] == pytest.approx(4)
    large = soak.memory_verdict(_samples([200, 200, 200]), warmup_s=0, tolerance_pct=5, tolerance_mib=4)
    assert large["tolerance_mib"] == pytest.approx(10)


def test_shrinking_memory_is_flat() -> None:
    assert soak.memory_verdict(_samples([100, 200, 190, 180, 170]), warmup_s=10)["flat"] is True


def test_too_few_samples_after_warm_up() -> None:
    v = soak.memory_verdict(_samples([100, 110, 120]), warmup_s=20)
    assert v["flat"] is None and v["baseline_mib"] is None
    assert "not enough samples" in v["verdict"]
    assert v["max_mib"] == pytest.approx(120)
    assert "not enough samples" in soak.format_memory_line(v)


def test_missing_values_are_skipped_and_other_keys_work() -> None:
    samples = [{"t_s": 0, "rss": None}, {"t_s": 10, "rss": 10 * MIB}, {"t_s": 20, "rss": 10 * MIB}]
    v = soak.memory_verdict(samples, warmup_s=0, key="rss")
    assert v["baseline_t_s"] == 10 and v["flat"] is True


# --- Envoy counters -------------------------------------------------------------------------

STATS = """\
cluster.backend-soak-upstream.upstream_rq_2xx: 63006
cluster.backend-soak-upstream.upstream_rq_5xx: 2
http.ai_gateway.downstream_rq_2xx: 63005
http.ai_gateway.downstream_rq_4xx: 1
http.ai_gateway.downstream_rq_5xx: 3
http.ai_gateway.downstream_rq_time: P0(nan,0) P25(nan,1)
"""


def test_parse_envoy_stats_and_error_counts() -> None:
    stats = soak.parse_envoy_stats(STATS)
    assert stats["http.ai_gateway.downstream_rq_5xx"] == 3
    assert "http.ai_gateway.downstream_rq_time" not in stats
    counts = soak.error_counts(stats, "backend-soak-upstream")
    assert counts == {
        "downstream_2xx": 63005, "downstream_4xx": 1, "downstream_5xx": 3,
        "upstream_2xx": 63006, "upstream_4xx": 0, "upstream_5xx": 2,
    }
    assert soak.envoy_errors(counts) == 6
    start = soak.error_counts(soak.parse_envoy_stats("http.ai_gateway.downstream_rq_2xx: 5\n"), "backend-soak-upstream")
    assert soak.deltas(start, counts)["downstream_2xx"] == 63000


def test_stats_filter_matches_exactly_the_counters() -> None:
    pattern = re.compile(soak.stats_filter("backend-soak-upstream"))
    for name in soak.counter_names("backend-soak-upstream"):
        assert pattern.search(name)
    assert not pattern.search("http.ai_gateway.downstream_rq_5xx_extra")
    assert not pattern.search("cluster.backend-soak-upstreamX.upstream_rq_5xx")
    assert not pattern.search("http.ai_gateway.downstream_rq_time")


# --- SSE ---------------------------------------------------------------------------------------


def test_sse_reader_across_arbitrary_splits() -> None:
    body = bodies.chat_stream_body().encode()
    expected = bodies.parse_sse_data(body.decode())
    for size in (1, 2, 7, 64, len(body)):
        reader = soak.SseReader()
        got = []
        for i in range(0, len(body), size):
            got.extend(reader.feed(body[i:i + size]))
        assert got == expected
        assert reader.pending == ""


def test_sse_reader_multibyte_split_crlf_comments_and_multiline_data() -> None:
    reader = soak.SseReader()
    raw = ": keep-alive\r\n\r\ndata: caf\u00e9\r\n\r\ndata: a\ndata: b\n\nevent: x\ndata:[DONE]\n\n".encode()
    cut = raw.index("\u00e9".encode()) + 1  # inside the two bytes of é
    assert reader.feed(raw[:cut]) == []
    assert reader.feed(raw[cut:]) == ["caf\u00e9", "a\nb", "[DONE]"]


# --- one streamed reply --------------------------------------------------------------------------


def _sim_stream(chunks: int, max_tokens: int) -> tuple[list[str], str]:
    """A real stream from the simulator's handlers (no network) and its expected text."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from extproc.sim import text as simtext
    from extproc.sim.server import create_app
    from extproc.sim.wire import SimSettings

    messages = soak.stream_messages(3, 8)
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "stream": True}

    async def fetch() -> str:
        async with TestClient(TestServer(create_app(SimSettings(chunks=chunks)))) as client:
            response = await client.post("/v1/chat/completions", json=body)
            return await response.text()

    text = asyncio.run(fetch())
    return bodies.parse_sse_data(text), simtext.reply_text(simtext.last_user_text(messages), max_tokens)


def test_check_chat_stream_accepts_the_simulators_stream() -> None:
    payloads, expected = _sim_stream(chunks=5, max_tokens=20)
    assert "Stream 3 of 8" in expected
    check = soak.check_chat_stream(payloads, expected, "length")
    assert check["problems"] == [] and check["ok"]
    assert check["done"] and check["content_chunks"] == 5 and check["finish_reasons"] == ["length"]
    assert check["text_chars"] == len(expected)


def test_check_chat_stream_finds_problems() -> None:
    payloads, expected = _sim_stream(chunks=5, max_tokens=10)
    assert not soak.check_chat_stream(payloads[:-1], expected, "length")["done"]
    truncated = soak.check_chat_stream([*payloads[:2], "[DONE]"], expected, "length")
    assert not truncated["ok"]
    assert any("content differs" in p for p in truncated["problems"])
    assert any("finish_reason" in p for p in truncated["problems"])
    other = soak.check_chat_stream(payloads, soak.stream_prompt(4, 8), "length")
    assert not other["ok"]
    error = soak.check_chat_stream([json.dumps({"error": {"message": "boom"}}), "[DONE]"], "", "stop")
    assert any("error event" in p for p in error["problems"])
    assert any("not JSON" in p for p in soak.check_chat_stream(["{oops", "[DONE]"], "", "stop")["problems"])


def test_fake_upstream_stream_checks_out() -> None:
    payloads = bodies.parse_sse_data(bodies.chat_stream_body())
    assert soak.check_chat_stream(payloads, bodies.answer_text(), "stop")["ok"]


def test_summarize_streams() -> None:
    results = [
        {"ok": True, "done": True, "status": 200, "finish_reasons": ["length"], "content_chunks": 40, "problems": []},
        {"ok": True, "done": True, "status": 200, "finish_reasons": ["length"], "content_chunks": 40, "problems": []},
        {"ok": False, "done": False, "status": 200, "finish_reasons": [], "content_chunks": 12,
         "problems": ["no data: [DONE] at the end"]},
        {"ok": False, "done": False, "status": 503, "error": "status 503: b'no healthy upstream'"},
    ]
    s = soak.summarize_streams(results)
    assert s["streams"] == 4 and s["ok"] == 2 and s["done"] == 2 and s["status_200"] == 3
    assert s["finish_reasons"] == {"length": 2}
    assert s["content_chunks_min"] == 0 and s["content_chunks_max"] == 40
    assert s["problems"] == {"no data: [DONE] at the end": 1, "status 503: b'no healthy upstream'": 1}


def test_stream_prompts_differ() -> None:
    assert len({soak.stream_prompt(i, 256) for i in range(256)}) == 256


# --- processes and report -------------------------------------------------------------------------


def test_process_role() -> None:
    base = ["/venv/bin/python", "-m", "extproc", "--log-level", "INFO", "serve", "--config", "g.yaml"]
    assert soak.process_role([*base, "--worker-index", "1", "--workers", "2"]) == "worker 1"
    assert soak.process_role(base) == "worker 0"  # the parent is worker 0
    assert soak.short_role("worker 1") == "w1" and soak.short_role("worker 0") == "w0"


def test_soak_table_and_memory_line() -> None:
    samples = _samples([100, 101, 101, 101])
    for i, s in enumerate(samples):
        s.update(
            processor_cpu_percent=None if i == 0 else 95.0,
            envoy_rss_bytes=60 * MIB,
            workers_rss_bytes=60 * MIB,
            envoy_errors_so_far={"downstream_5xx": i, "downstream_4xx": 0, "upstream_5xx": 0},
            processor_rss_by_pid={
                "12": {"role": "worker 1", "rss_bytes": 30 * MIB},
                "11": {"role": "worker 0", "rss_bytes": 30 * MIB},
            },
        )
    table = soak.format_soak_table(samples, warmup_s=10)
    lines = table.splitlines()
    assert "processor RSS MiB" in lines[0]
    assert lines[2].split()[:4] == ["0s*", "100.0", "60.0", "-"]
    assert lines[3].split()[:7] == ["10s", "101.0", "60.0", "95", "60.0", "1", "0"]
    assert lines[3].rstrip().endswith("w0 30.0 w1 30.0")
    line = soak.format_memory_line(soak.memory_verdict(samples, 10))
    assert "101.0 MiB at 10s" in line and "+0.0 MiB" in line and "=> flat" in line
