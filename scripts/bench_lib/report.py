"""The results table: rows are loads, column groups are scenarios, plus the gateway's and
the floor's overhead against Envoy alone, and each processor's CPU, memory and ext_proc
messages per request (and, with the optional `litellm` scenario, the gateway's throughput
against LiteLLM's and LiteLLM's CPU and memory)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SCENARIO_TITLES = {
    "direct": "direct (no proxy)", "envoy": "Envoy alone", "gateway": "gateway", "floor": "floor (no-op processor)",
    "litellm": "LiteLLM",
}
SHORT_SSE, LONG_SSE = "sse_c8", "sse240_c8"  # the same load but for the stream's length: 24 and 240 events
MIB = 1024 * 1024
BUSY_SHARE = 0.10  # other processes using more than this share of all CPUs during a run get a note


def fmt_rps(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"


def fmt_delta_ms(value: float | None) -> str:
    return "-" if value is None else ("+" if value >= 0 else "") + fmt_ms(value)


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def fmt_fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _ok(run: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The wrk numbers of a run that completed, else None."""
    if not run or run.get("error") or not run.get("result"):
        return None
    result: Mapping[str, Any] = run["result"]
    return result if result.get("requests") else None


def compare(gateway_run: Mapping[str, Any] | None, envoy_run: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The gateway against Envoy alone on one load: added p50/p99 (ms) and RPS as % of Envoy's."""
    gateway, envoy = _ok(gateway_run), _ok(envoy_run)
    out: dict[str, float | None] = {"added_p50_ms": None, "added_p99_ms": None, "rps_percent_of_envoy": None}
    if gateway is None or envoy is None:
        return out
    g_lat, e_lat = gateway["latency_ms"], envoy["latency_ms"]
    if g_lat.get("p50") is not None and e_lat.get("p50") is not None:
        out["added_p50_ms"] = g_lat["p50"] - e_lat["p50"]
    if g_lat.get("p99") is not None and e_lat.get("p99") is not None:
        out["added_p99_ms"] = g_lat["p99"] - e_lat["p99"]
    if envoy["rps"]:
        out["rps_percent_of_envoy"] = 100 * gateway["rps"] / envoy["rps"]
    return out


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compare_litellm(gateway_run: Mapping[str, Any] | None, litellm_run: Mapping[str, Any] | None) -> dict[str, Any]:
    """The gateway against LiteLLM on one load: RPS ratio (gateway / LiteLLM), latencies,
    and CPU per request of each whole proxy (the gateway's Envoy + processor; all of LiteLLM's processes)."""
    gateway, litellm = _ok(gateway_run), _ok(litellm_run)
    out: dict[str, Any] = {
        "rps_ratio": None, "gateway_rps": None, "litellm_rps": None,
        "gateway_p50_ms": None, "litellm_p50_ms": None, "gateway_p99_ms": None, "litellm_p99_ms": None,
        "gateway_cpu_ms_per_request": None, "litellm_cpu_ms_per_request": None, "cpu_ratio": None,
    }
    if gateway is not None:
        out.update(gateway_rps=gateway["rps"], gateway_p50_ms=gateway["latency_ms"].get("p50"),
                   gateway_p99_ms=gateway["latency_ms"].get("p99"))
        cpu = (gateway_run or {}).get("cpu") or {}
        parts = [cpu.get(k, {}).get("cpu_ms_per_request") for k in ("processor", "proxy_envoy")]
        if all(p is not None for p in parts):
            out["gateway_cpu_ms_per_request"] = sum(parts)
    if litellm is not None:
        out.update(litellm_rps=litellm["rps"], litellm_p50_ms=litellm["latency_ms"].get("p50"),
                   litellm_p99_ms=litellm["latency_ms"].get("p99"))
        out["litellm_cpu_ms_per_request"] = ((litellm_run or {}).get("litellm") or {}).get("cpu_ms_per_request")
    if gateway is not None and litellm is not None:
        out["rps_ratio"] = _ratio(gateway["rps"], litellm["rps"])
        out["cpu_ratio"] = _ratio(out["litellm_cpu_ms_per_request"], out["gateway_cpu_ms_per_request"])
    return out


def _resource_cells(run: Mapping[str, Any] | None, key: str) -> list[str]:
    usage = (run or {}).get(key) or {}
    rss = usage.get("rss_bytes")
    return [fmt_fixed(usage.get("cpu_ms_per_request"), 3), fmt_fixed(rss / MIB if rss is not None else None, 1)]


def _processor_cells(run: Mapping[str, Any] | None) -> list[str]:
    """CPU and RSS of a scenario's processor, and the ext_proc messages it answered per request."""
    messages = (run or {}).get("messages") or {}
    return [*_resource_cells(run, "processor"), fmt_fixed(messages.get("per_request"), 2)]


def long_stream_share(loads: Mapping[str, Any]) -> float | None:
    """Throughput with 240 events per stream as % of that with 24 (the issue's target: >= 80%)."""
    short, long = _ok(loads.get(SHORT_SSE)), _ok(loads.get(LONG_SSE))
    if short is None or long is None or not short["rps"]:
        return None
    return 100 * long["rps"] / short["rps"]


def _compare_cells(run: Mapping[str, Any] | None, envoy_run: Mapping[str, Any] | None) -> list[str]:
    cmp = compare(run, envoy_run)
    return [
        fmt_delta_ms(cmp["added_p50_ms"]), fmt_delta_ms(cmp["added_p99_ms"]), fmt_percent(cmp["rps_percent_of_envoy"]),
    ]


def _error_summary(errors: Mapping[str, int]) -> str:
    parts = [f"{kind} {count}" for kind, count in errors.items() if count]
    return ", ".join(parts)


def first_line(text: str, limit: int = 160) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _render(groups: Sequence[tuple[str, Sequence[str]]], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain-text table with a title over each column group; first column left-aligned."""
    headers = [h for _, cols in groups for h in cols]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    # Widen a group's last column when its title is wider than its columns.
    start = 0
    spans = []
    for title, cols in groups:
        span = list(range(start, start + len(cols)))
        width = sum(widths[i] for i in span) + 2 * (len(span) - 1)
        if len(title) > width:
            widths[span[-1]] += len(title) - width
        spans.append(span)
        start += len(cols)

    def line(cells: Sequence[str]) -> str:
        parts = []
        for span in spans:
            texts = []
            for i in span:
                texts.append(cells[i].ljust(widths[i]) if i == 0 else cells[i].rjust(widths[i]))
            parts.append("  ".join(texts))
        return " | ".join(parts).rstrip()

    titles = []
    for (title, _), span in zip(groups, spans):
        width = sum(widths[i] for i in span) + 2 * (len(span) - 1)
        titles.append(title.ljust(width))
    out = [" | ".join(titles).rstrip(), line(headers)]
    out.append("-+-".join("-" * (sum(widths[i] for i in span) + 2 * (len(span) - 1)) for span in spans))
    out.extend(line(row) for row in rows)
    return out


def format_table(
    scenarios: Mapping[str, Mapping[str, Any]],
    scenario_order: Sequence[str],
    load_order: Sequence[str],
    processor_label: str = "processor",
    litellm_label: str = "LiteLLM proxy",
    floor_label: str = "no-op processor",
) -> str:
    """The report as text: the table, then notes for failures and wrk errors.

    `scenarios[name]` is {"error": str | None, "loads": {load: run}}, a run being
    {"error": str | None, "result": parsed wrk numbers, "processor": {...} (gateway only)}.
    """
    groups: list[tuple[str, Sequence[str]]] = [("", ["load"])]
    for name in scenario_order:
        groups.append((SCENARIO_TITLES.get(name, name), ["RPS", "p50", "p90", "p99"]))
    with_compare = "gateway" in scenario_order and "envoy" in scenario_order
    with_floor_compare = "floor" in scenario_order and "envoy" in scenario_order
    with_processor = "gateway" in scenario_order
    with_floor = "floor" in scenario_order
    with_litellm = "litellm" in scenario_order
    with_litellm_compare = with_litellm and "gateway" in scenario_order
    if with_compare:
        groups.append(("gateway vs Envoy alone", ["+p50", "+p99", "RPS %"]))
    if with_floor_compare:
        groups.append(("floor vs Envoy alone", ["+p50", "+p99", "RPS %"]))
    if with_litellm_compare:
        groups.append(("gateway vs LiteLLM", ["RPS x"]))
    if with_processor:
        groups.append((processor_label, ["CPU ms/req", "RSS MiB", "msg/req"]))
    if with_floor:
        groups.append((floor_label, ["CPU ms/req", "RSS MiB", "msg/req"]))
    if with_litellm:
        groups.append((litellm_label, ["CPU ms/req", "RSS MiB"]))

    notes: list[str] = []
    for name in scenario_order:
        error = scenarios.get(name, {}).get("error")
        if error:
            notes.append(f"{name}: FAILED: {first_line(error)}")

    rows = []
    for load in load_order:
        row = [load]
        for name in scenario_order:
            scenario = scenarios.get(name, {})
            run = scenario.get("loads", {}).get(load)
            if scenario.get("error") and not run:
                row += ["failed"] * 4
                continue
            if not run:
                row += ["-"] * 4
                continue
            if run.get("error"):
                row += ["error"] * 4
                notes.append(f"{name} {load}: {first_line(run['error'])}")
                continue
            result = run.get("result")
            if not result:  # never finished (interrupted)
                row += ["-"] * 4
                continue
            lat = result["latency_ms"]
            rps = fmt_rps(result["rps"])
            if result["errors_total"]:
                rps += "!"
                notes.append(
                    f"{name} {load}: {result['errors_total']} errors in {result['requests']} requests "
                    f"({_error_summary(result['errors'])})"
                )
            other = (run.get("system_cpu") or {}).get("other_share")
            if other is not None and other > BUSY_SHARE:
                rps += "~"
                notes.append(
                    f"{name} {load}: other processes on the machine used {100 * other:.0f}% of all CPUs "
                    "during this run; its numbers are disturbed"
                )
            row += [rps, fmt_ms(lat["p50"]), fmt_ms(lat["p90"]), fmt_ms(lat["p99"])]
        envoy_run = scenarios.get("envoy", {}).get("loads", {}).get(load)
        if with_compare:
            row += _compare_cells(scenarios.get("gateway", {}).get("loads", {}).get(load), envoy_run)
        if with_floor_compare:
            row += _compare_cells(scenarios.get("floor", {}).get("loads", {}).get(load), envoy_run)
        if with_litellm_compare:
            cmp_l = compare_litellm(
                scenarios.get("gateway", {}).get("loads", {}).get(load),
                scenarios.get("litellm", {}).get("loads", {}).get(load),
            )
            row.append(fmt_ratio(cmp_l["rps_ratio"]))
        if with_processor:
            row += _processor_cells(scenarios.get("gateway", {}).get("loads", {}).get(load))
        if with_floor:
            row += _processor_cells(scenarios.get("floor", {}).get("loads", {}).get(load))
        if with_litellm:
            row += _resource_cells(scenarios.get("litellm", {}).get("loads", {}).get(load), "litellm")
        rows.append(row)

    lines = _render(groups, rows)
    lines.append("")
    lines.append("RPS = completed requests/s; p50/p90/p99 = wrk latency in ms (for SSE loads: the whole stream).")
    if notes:
        lines.append("! = wrk saw errors, ~ = the machine was busy with other work during the run (see notes).")
    if with_compare:
        lines.append("gateway vs Envoy alone: added p50/p99 ms, gateway RPS as % of Envoy alone's.")
    if with_floor_compare:
        lines.append(
            "floor: Envoy with the gateway's request-stage ext_proc filter and a processor that changes nothing: "
            "the cost of the transport alone; floor vs Envoy alone as for the gateway."
        )
    if with_litellm_compare:
        lines.append("gateway vs LiteLLM: gateway RPS / LiteLLM RPS on the same load (2.00x = twice LiteLLM's).")
    if with_processor or with_floor:
        lines.append(
            "processor: CPU time of all processor processes per request; RSS summed at the end of the run; "
            "msg/req = ext_proc messages answered per request."
        )
    shares = {name: long_stream_share(scenarios.get(name, {}).get("loads", {})) for name in scenario_order}
    if any(share is not None for share in shares.values()):
        lines.append(
            f"240 vs 24 events ({LONG_SSE} RPS as % of {SHORT_SSE}'s; target >= 80%): "
            + ", ".join(f"{name} {fmt_percent(share)}" for name, share in shares.items() if share is not None)
        )
    if with_litellm:
        lines.append(
            "LiteLLM proxy: CPU time of all its processes (uvicorn supervisor and workers) per request; RSS summed "
            "at the end of the run. That is a whole proxy: the gateway's equivalent is its processor plus its Envoy "
            "(comparison_vs_litellm in the JSON)."
        )
    if notes:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  - {note}" for note in notes)
    return "\n".join(lines)
