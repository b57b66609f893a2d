"""Pure helpers for `scripts/soak`: the memory verdict (least-squares slope, growth after
warm-up), Envoy admin counters, an incremental SSE reader, the check of one streamed
chat reply, and the text report. No processes, no network: unit-tested in
tests/unit/test_soak.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MIB = 1024 * 1024
LISTENER_PREFIX = "ai_gateway"
# Envoy counters that say "something went wrong" (names after the cluster/listener prefix).
DOWNSTREAM_CODES = ("2xx", "4xx", "5xx")
HORIZON_S = 600.0  # a slope that would exceed the tolerance within this time is not "flat"
UPSTREAM_CODES = ("2xx", "4xx", "5xx")


# --- memory --------------------------------------------------------------------------


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Slope of the least-squares line through (x, y) points; None with fewer than two
    distinct x values."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx


def memory_verdict(
    samples: Sequence[Mapping[str, Any]],
    warmup_s: float,
    key: str = "processor_rss_bytes",
    tolerance_pct: float = 5.0,
    tolerance_mib: float = 4.0,
    horizon_s: float = HORIZON_S,
) -> dict[str, Any]:
    """Is memory flat after the warm-up?

    `samples` are dicts with `t_s` (seconds since the load started) and `key` (bytes).
    The baseline is the first sample at or after `warmup_s`; the end is the last sample.
    The tolerance is the larger of `tolerance_pct` % of the baseline and `tolerance_mib`.

    - "GROWING" (flat False): the growth from baseline to end, or the growth the
      least-squares slope gives over the post-warm-up window, exceeds the tolerance;
    - "rising, window too short" (flat None): within the tolerance so far, but the slope
      would exceed it within `horizon_s` (a run shorter than that cannot tell);
    - "flat" (flat True): otherwise.
    """
    usable = [s for s in samples if s.get(key) is not None]
    post = [s for s in usable if s["t_s"] >= warmup_s]
    out: dict[str, Any] = {
        "key": key,
        "warmup_s": warmup_s,
        "samples_after_warmup": len(post),
        "baseline_t_s": None,
        "baseline_mib": None,
        "end_t_s": None,
        "end_mib": None,
        "growth_mib": None,
        "growth_pct": None,
        "max_mib": max(s[key] for s in usable) / MIB if usable else None,
        "max_after_warmup_mib": max(s[key] for s in post) / MIB if post else None,
        "slope_mib_per_min": None,
        "slope_mib_per_hour": None,
        "slope_growth_mib": None,
        "tolerance_mib": None,
        "flat": None,
        "verdict": "not enough samples after the warm-up",
    }
    if len(post) < 2:
        return out
    base, end = post[0], post[-1]
    base_mib, end_mib = base[key] / MIB, end[key] / MIB
    slope_per_s = least_squares_slope([(s["t_s"], s[key] / MIB) for s in post])
    window_s = end["t_s"] - base["t_s"]
    tolerance = max(tolerance_mib, base_mib * tolerance_pct / 100)
    growth = end_mib - base_mib
    slope_growth = (slope_per_s or 0.0) * window_s
    if growth > tolerance or slope_growth > tolerance:
        flat, verdict = False, "GROWING"
    elif (slope_per_s or 0.0) * max(window_s, horizon_s) > tolerance:
        flat, verdict = None, f"rising, window too short to tell (would pass the tolerance within {horizon_s / 60:g} min)"
    else:
        flat, verdict = True, "flat"
    out.update(
        baseline_t_s=base["t_s"],
        baseline_mib=base_mib,
        end_t_s=end["t_s"],
        end_mib=end_mib,
        growth_mib=growth,
        growth_pct=100 * growth / base_mib if base_mib else None,
        slope_mib_per_min=None if slope_per_s is None else slope_per_s * 60,
        slope_mib_per_hour=None if slope_per_s is None else slope_per_s * 3600,
        slope_growth_mib=slope_growth,
        tolerance_mib=tolerance,
        flat=flat,
        verdict=verdict,
    )
    return out


def roles(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    """The processor roles seen in the samples' `processor_rss_by_pid`, sorted."""
    return sorted({p["role"] for s in samples for p in (s.get("processor_rss_by_pid") or {}).values()})


def role_series(samples: Sequence[Mapping[str, Any]], role: str) -> list[dict[str, Any]]:
    """[{t_s, rss}] of the processes with `role` (summed; None where none was found),
    ready for `memory_verdict(..., key="rss")`. A restarted worker keeps its role."""
    series = []
    for s in samples:
        found = [p["rss_bytes"] for p in (s.get("processor_rss_by_pid") or {}).values() if p["role"] == role]
        series.append({"t_s": s["t_s"], "rss": sum(found) if found else None})
    return series


# --- Envoy admin counters ---------------------------------------------------------------


def counter_names(cluster: str, listener: str = LISTENER_PREFIX) -> list[str]:
    return [f"http.{listener}.downstream_rq_{c}" for c in DOWNSTREAM_CODES] + [
        f"cluster.{cluster}.upstream_rq_{c}" for c in UPSTREAM_CODES
    ]


def stats_filter(cluster: str, listener: str = LISTENER_PREFIX) -> str:
    """A regex for Envoy's `/stats?filter=` matching exactly `counter_names`."""
    names = "|".join(re.escape(name) for name in counter_names(cluster, listener))
    return f"^({names})$"


def parse_envoy_stats(text: str) -> dict[str, int]:
    """`name: value` lines of Envoy's /stats text output; histograms and others skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def error_counts(stats: Mapping[str, int], cluster: str, listener: str = LISTENER_PREFIX) -> dict[str, int]:
    """Short names for the counters that matter; a counter Envoy has not created yet is 0."""
    out = {}
    for code in DOWNSTREAM_CODES:
        out[f"downstream_{code}"] = stats.get(f"http.{listener}.downstream_rq_{code}", 0)
    for code in UPSTREAM_CODES:
        out[f"upstream_{code}"] = stats.get(f"cluster.{cluster}.upstream_rq_{code}", 0)
    return out


def deltas(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {key: value - before.get(key, 0) for key, value in after.items()}


def envoy_errors(counts: Mapping[str, int]) -> int:
    return sum(v for k, v in counts.items() if not k.endswith("2xx"))


# --- streams ------------------------------------------------------------------------------


class SseReader:
    """Incremental SSE parser: feed it bytes as they arrive, get the complete events'
    `data:` payloads back (multi-line data joined with newlines, comments ignored)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._decoder_tail = b""

    def feed(self, chunk: bytes) -> list[str]:
        data = self._decoder_tail + chunk
        try:
            text = data.decode("utf-8")
            self._decoder_tail = b""
        except UnicodeDecodeError as exc:
            if exc.start < len(data) - 3:  # not just a character cut in two
                raise
            text = data[: exc.start].decode("utf-8")
            self._decoder_tail = data[exc.start:]
        self._buffer += text.replace("\r\n", "\n").replace("\r", "\n")
        events = []
        while "\n\n" in self._buffer:
            block, self._buffer = self._buffer.split("\n\n", 1)
            lines = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
            if lines:
                events.append("\n".join(lines))
        return events

    @property
    def pending(self) -> str:
        """Bytes of an event not terminated yet (should be empty at the end of a stream)."""
        return self._buffer


def check_chat_stream(payloads: Sequence[str], expected_text: str, expected_finish: str) -> dict[str, Any]:
    """What a client would check of one streamed chat completion.

    Returns done (ended with `[DONE]`, nothing after it), content chunks, the text put
    together, the finish_reason, and `problems` (empty when everything is as expected).
    """
    problems: list[str] = []
    done = bool(payloads) and payloads[-1] == "[DONE]"
    if not done:
        problems.append("no data: [DONE] at the end")
    if payloads.count("[DONE]") > 1:
        problems.append("more than one [DONE]")
    text_parts: list[str] = []
    finish: list[str] = []
    content_chunks = 0
    for payload in payloads:
        if payload == "[DONE]":
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            problems.append(f"event is not JSON: {payload[:80]!r}")
            continue
        if not isinstance(chunk, dict):
            problems.append("event is not a JSON object")
            continue
        if "error" in chunk:
            problems.append(f"error event: {json.dumps(chunk['error'])[:160]}")
            continue
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                text_parts.append(content)
                content_chunks += 1
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])
    text = "".join(text_parts)
    if text != expected_text:
        problems.append(f"content differs: got {text[:60]!r}..., expected {expected_text[:60]!r}...")
    if finish != [expected_finish]:
        problems.append(f"finish_reason {finish!r}, expected [{expected_finish!r}]")
    return {
        "done": done,
        "events": len(payloads),
        "content_chunks": content_chunks,
        "finish_reasons": finish,
        "text_chars": len(text),
        "problems": problems,
        "ok": not problems,
    }


def stream_prompt(index: int, total: int) -> str:
    """A distinct prompt per stream: the simulator echoes its first words, so a reply
    given to the wrong stream is caught."""
    return f"Stream {index} of {total}: describe how a gateway keeps many slow streams open."


def stream_messages(index: int, total: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": stream_prompt(index, total)},
    ]


def summarize_streams(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts over per-stream results (each with ok, done, finish_reasons, status, error)."""
    results = list(results)
    problems: dict[str, int] = {}
    for r in results:
        for problem in [*(r.get("problems") or []), *([r["error"]] if r.get("error") else [])]:
            key = problem if len(problem) <= 120 else problem[:117] + "..."
            problems[key] = problems.get(key, 0) + 1
    finish: dict[str, int] = {}
    for r in results:
        for reason in r.get("finish_reasons") or []:
            finish[reason] = finish.get(reason, 0) + 1
    return {
        "streams": len(results),
        "ok": sum(1 for r in results if r.get("ok")),
        "done": sum(1 for r in results if r.get("done")),
        "status_200": sum(1 for r in results if r.get("status") == 200),
        "finish_reasons": finish,
        "content_chunks_min": min((r.get("content_chunks", 0) for r in results), default=None),
        "content_chunks_max": max((r.get("content_chunks", 0) for r in results), default=None),
        "problems": dict(sorted(problems.items(), key=lambda kv: -kv[1])[:10]),
    }


# --- processes --------------------------------------------------------------------------


def process_role(argv: Sequence[str]) -> str:
    """`worker N` for `extproc serve --worker-index N`, else `worker 0` (the process
    `extproc serve` started: it is worker 0 and the parent of the others)."""
    if "--worker-index" in argv:
        i = list(argv).index("--worker-index")
        if i + 1 < len(argv):
            return f"worker {argv[i + 1]}"
        return "worker"
    return "worker 0"


def short_role(role: str) -> str:
    return "w" + role.split()[1] if role.startswith("worker ") else role


# --- report -------------------------------------------------------------------------------


def mib(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value / MIB:.{digits}f}"


def signed(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}{unit}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == len(cells) - 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def per_process(sample: Mapping[str, Any]) -> str:
    by_pid = sample.get("processor_rss_by_pid") or {}
    parts = sorted(by_pid.values(), key=lambda p: p["role"])
    return " ".join(f"{short_role(p['role'])} {mib(p['rss_bytes'])}" for p in parts)


def format_soak_table(samples: Sequence[Mapping[str, Any]], warmup_s: float) -> str:
    headers = [
        "t", "processor RSS MiB", "workers MiB", "CPU %", "envoy RSS MiB", "5xx", "4xx", "upstream 5xx",
        "per process (MiB)",
    ]
    rows = []
    for s in samples:
        errors = s.get("envoy_errors_so_far") or {}
        mark = "*" if s["t_s"] < warmup_s else " "
        rows.append([
            f"{s['t_s']:.0f}s{mark}",
            mib(s.get("processor_rss_bytes")),
            mib(s.get("workers_rss_bytes")),
            "-" if s.get("processor_cpu_percent") is None else f"{s['processor_cpu_percent']:.0f}",
            mib(s.get("envoy_rss_bytes")),
            str(errors.get("downstream_5xx", "-")),
            str(errors.get("downstream_4xx", "-")),
            str(errors.get("upstream_5xx", "-")),
            per_process(s),
        ])
    return "\n".join([*_table(headers, rows), "(* = warm-up sample; errors are counted from the start of the load)"])


def format_memory_line(verdict: Mapping[str, Any], label: str = "processor RSS") -> str:
    if verdict.get("baseline_mib") is None:
        return f"{label}: {verdict.get('verdict')}"
    return (
        f"{label}: {verdict['baseline_mib']:.1f} MiB at {verdict['baseline_t_s']:.0f}s (end of warm-up) -> "
        f"{verdict['end_mib']:.1f} MiB at {verdict['end_t_s']:.0f}s: {signed(verdict['growth_mib'], 1, ' MiB')} "
        f"({signed(verdict['growth_pct'], 1, '%')}); max {verdict['max_mib']:.1f} MiB; "
        f"slope {signed(verdict['slope_mib_per_min'], 2, ' MiB/min')} over {verdict['samples_after_warmup']} samples "
        f"=> {verdict['verdict']} (tolerance {verdict['tolerance_mib']:.1f} MiB)"
    )
