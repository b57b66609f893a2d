"""The shipped dashboard, recording rules and alerts, proven against a real Prometheus.

A real Prometheus (Debian `prometheus`) scrapes a real gateway (Envoy + the processor,
the admin port's /metrics) every second with the shipped scrape config and rule files,
while the official clients send traffic: OpenAI chat (JSON and streams) for two tenants,
provider errors, an unreachable backend, a tenant over its token budget, and MCP tool
calls through the MCP gateway. Every PromQL expression in the README, in the Grafana
dashboard and in the rule files is then evaluated through Prometheus' HTTP API and must
return data carrying the labels it groups by."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

pytest.importorskip("mcp.server.mcpserver", reason="needs the official MCP SDK 2.x")

import httpx2  # noqa: E402 (the mcp SDK's HTTP client)
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from extproc.sim import SimServer  # noqa: E402
from tests.integration.harness import RunningGateway, free_port, running_gateway  # noqa: E402
from tests.integration.test_mcp_gateway import ServerThread, build_a  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402
from tests.prometheus_server import PrometheusServer, promtool_binary  # noqa: E402

pytestmark = pytest.mark.timeout(360)

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "observability" / "prometheus"
DASHBOARD = REPO / "observability" / "grafana" / "ai-gateway.json"
RULE_FILES = ("recording_rules.yml", "alerts.yml")
USER = [{"role": "user", "content": "Tell me a story"}]
WAIT = 120.0  # bound on polling Prometheus until every expression has data (not a timing assert)
# Grafana's variables, as Grafana would expand them with "All" selected.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$model": ".*", "$tenant": ".*"}


# -- the expressions under test ---------------------------------------------------------------------


def readme_expressions() -> list[str]:
    """Every expression in the README's ```promql blocks (`#` lines are comments; an
    expression continues on indented lines)."""
    exprs: list[str] = []
    for block in re.findall(r"```promql\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        current: list[str] = []
        for line in [*block.splitlines(), "#"]:
            if line.strip().startswith("#") or not line.strip():
                if current:
                    exprs.append(" ".join(current))
                current = []
            elif line[:1].isspace() and current:
                current.append(line.strip())
            else:
                if current:
                    exprs.append(" ".join(current))
                current = [line.strip()]
    return exprs


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) for every target, Grafana's variables expanded."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unexpanded variable in {expr}"
            out.append((panel["title"], expr))
    return out


def rules() -> list[dict[str, Any]]:
    return [rule for name in RULE_FILES for group in yaml.safe_load((PROMETHEUS_DIR / name).read_text())["groups"]
            for rule in group["rules"]]


def grouped_by(expr: str) -> set[str]:
    """The labels an expression groups by (`by (...)`), `le` aside: its result must carry them."""
    return {label.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr)
            for label in group.split(",") if label.strip() and label.strip() != "le"}


def alert_operand(expr: str) -> str:
    """An alert's expression without its threshold: what must have data under traffic."""
    return re.sub(r"\s*(>|<|>=|<=|==|!=)\s*[0-9.eE+-]+\s*$", "", expr.strip())


def checks() -> dict[str, tuple[str, set[str]]]:
    """name -> (expression, labels every answer must show), for everything shipped."""
    out: dict[str, tuple[str, set[str]]] = {}
    for i, expr in enumerate(readme_expressions()):
        out[f"README #{i + 1}"] = (expr, grouped_by(expr))
    for i, (title, expr) in enumerate(dashboard_expressions()):
        out[f"dashboard target #{i + 1} ({title!r})"] = (expr, grouped_by(expr))
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    for name, expr in recorded.items():
        out[f"recording rule {name} (its expression)"] = (expr, grouped_by(expr))
        out[f"recording rule {name} (the recorded series)"] = (name, grouped_by(expr))
    for rule in rules():
        if "alert" in rule:
            operand = alert_operand(rule["expr"])
            out[f"alert {rule['alert']}"] = (operand, grouped_by(recorded.get(operand, operand)))
    return out


def test_the_expressions_are_found() -> None:
    """The parsing above finds what is shipped (or the real test would check nothing)."""
    assert len(readme_expressions()) >= 4
    assert len(dashboard_expressions()) >= 15
    assert {r.get("alert") for r in rules()} >= {"AIGatewayProviderErrorRatioHigh", "AIGatewayOverheadP99High",
                                                 "AIGatewayBudgetExhausted"}
    assert grouped_by("histogram_quantile(0.9, sum by (le, a) (rate(x[1m]))) / sum by (b,c) (y)") == {"a", "b", "c"}
    assert alert_operand("gen_ai:x:ratio > 0.05") == "gen_ai:x:ratio"


# -- promtool ---------------------------------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = promtool_binary()
    assert binary, "promtool is not installed (make system-deps, or apt-get install prometheus)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR)


def test_promtool_checks_the_rule_files() -> None:
    done = _promtool("check", "rules", *RULE_FILES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout and "SUCCESS: 3 rules found" in done.stdout


def test_promtool_checks_the_scrape_config() -> None:
    done = _promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 2 rule files found" in done.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - record: a:b\n        expr: sum by (x (rate(y[5m]))\n")
    done = _promtool("check", "rules", str(broken))
    assert done.returncode != 0


# -- a real Prometheus scraping a real gateway --------------------------------------------------------


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[ServerThread]:
    with ServerThread(build_a(), json_response=True) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(sim_a: SimServer, mcp_server: ServerThread,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    config = {
        "backends": [{"name": "sim", "base_url": sim_a.base_url},
                     {"name": "unreachable", "base_url": f"http://127.0.0.1:{free_port()}/v1"}],
        "routes": [{"name": "down", "match": {"model": "down-model"}, "backends": [{"name": "unreachable"}]},
                   {"name": "all", "default": True, "backends": [{"name": "sim"}]}],
        "tenancy": {"header": "x-tenant-id"},
        "budgets": [{"name": "capped", "tenant": "capped", "unit": "hour", "limit": 5}],
        "costs": [{"metadata_key": "micro_usd", "type": "cel", "cel": "input_tokens * 3 + output_tokens * 12"}],
        "telemetry": {"tenant_attribute": "tenant"},
        "mcp": {"port": free_port(), "servers": [{"name": "a", "url": mcp_server.url}],
                "routes": [{"path": "/mcp", "servers": ["a"]}]},
    }
    with running_gateway(config, tmp_path_factory.mktemp("prometheus")) as gw:
        yield gw


@pytest.fixture(scope="module")
def prometheus(gateway: RunningGateway) -> Iterator[PrometheusServer]:
    """The shipped scrape config, pointed at the gateway, scraping and evaluating every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{gateway.processor_admin_port}"]}]
    with PrometheusServer(yaml.safe_dump(config)) as server:
        yield server


def _client(gateway: RunningGateway, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0, timeout=30,
                         default_headers={"x-tenant-id": tenant})


async def _mcp_calls(gateway: RunningGateway) -> None:
    http = httpx2.AsyncClient(headers={"x-tenant-id": "team-a"}, timeout=httpx2.Timeout(30))
    async with http, streamable_http_client(f"{gateway.url}/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        await session.list_tools()
        result = await session.call_tool("a__add", {"a": 2, "b": 3})
        assert result.is_error is False and "5" in str(result.content[0])


def _traffic(gateway: RunningGateway) -> None:
    """One round of everything the dashboard shows."""
    for tenant in ("team-a", "team-b"):
        client = _client(gateway, tenant)
        answer = client.chat.completions.create(model="m", messages=USER, max_tokens=5)
        assert answer.usage is not None and answer.usage.completion_tokens == 5
        stream = client.chat.completions.create(model="m", messages=USER, max_tokens=6, stream=True,
                                                stream_options={"include_usage": True})
        assert [chunk.usage.completion_tokens for chunk in stream if chunk.usage] == [6]
    team_a = _client(gateway, "team-a")
    with pytest.raises(openai.InternalServerError):
        team_a.chat.completions.create(model="sim-error-500", messages=USER)  # the provider fails
    with pytest.raises(openai.APIStatusError):
        team_a.chat.completions.create(model="down-model", messages=USER)  # nobody answers
    try:  # the first of these spends the tenant's 5 tokens; the later ones are refused
        _client(gateway, "capped").chat.completions.create(model="m", messages=USER, max_tokens=8)
    except openai.RateLimitError:
        pass
    asyncio.run(_mcp_calls(gateway))


def _missing(prometheus: PrometheusServer, expr: str, labels: set[str]) -> str | None:
    """Why the expression's answer is not yet what it must be, or None."""
    try:
        result = prometheus.query(expr)
    except ValueError as exc:
        return str(exc)
    if not result:
        return "no data"
    absent = sorted(label for label in labels if not any(s["metric"].get(label) for s in result))
    return f"no series with {absent}: {[s['metric'] for s in result]}" if absent else None


def _alert_states(prometheus: PrometheusServer) -> dict[str, list[dict[str, str]]]:
    states: dict[str, list[dict[str, str]]] = {}
    for alert in prometheus.api("alerts")["alerts"]:
        states.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
    return states


def test_every_shipped_expression_returns_data_with_its_labels(gateway: RunningGateway,
                                                               prometheus: PrometheusServer) -> None:
    pending = checks()
    for _ in range(60):  # a first scrape before traffic: rates then see the counters grow
        if any(s["value"][1] == "1" for s in prometheus.query('up{job="ai-gateway"}')):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Prometheus never scraped the gateway: {prometheus.api('targets')} {prometheus.log()}")

    why: dict[str, str] = {}
    deadline = time.monotonic() + WAIT
    while pending and time.monotonic() < deadline:
        _traffic(gateway)  # every round: counters keep growing between scrapes
        time.sleep(1.5)
        for name, (expr, labels) in list(pending.items()):
            reason = _missing(prometheus, expr, labels)
            if reason is None:
                del pending[name]
            else:
                why[name] = reason
    assert not pending, "\n".join(f"{name}: {pending[name][0]} -> {why.get(name)}" for name in pending)

    # The rules evaluate cleanly, and the two alerts this traffic should trip are active.
    for group in prometheus.api("rules")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
    states: dict[str, list[dict[str, str]]] = {}
    while time.monotonic() < deadline + WAIT:  # rates need a series to grow after it appeared
        states = _alert_states(prometheus)
        if "AIGatewayProviderErrorRatioHigh" in states and "AIGatewayBudgetExhausted" in states:
            break
        _traffic(gateway)
        time.sleep(1.5)
    assert {a.get("gen_ai_provider_name") for a in states.get("AIGatewayProviderErrorRatioHigh", [])} == {"openai"}
    assert {a.get("tenant") for a in states.get("AIGatewayBudgetExhausted", [])} == {"capped"}, json.dumps(
        (states, prometheus.query("gen_ai:budget_refusals:rate5m")))


# -- exemplars: a latency bucket links to its trace ----------------------------------------------


def test_prometheus_stores_the_request_span_as_the_bucket_exemplar(sim_a: SimServer, tmp_path: Path) -> None:
    """Prometheus asks for OpenMetrics; with exemplar storage on it keeps each bucket's trace id."""
    config = {"backends": [{"name": "sim", "base_url": sim_a.base_url}],
              "routes": [{"name": "all", "default": True, "backends": [{"name": "sim"}]}]}
    with OtlpReceiver() as receiver, running_gateway(config, tmp_path, env=receiver.exporter_env()) as gw:
        scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        scrape["global"].update(scrape_interval="1s")
        scrape["rule_files"] = []
        scrape["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{gw.processor_admin_port}"]}]
        with PrometheusServer(yaml.safe_dump(scrape), flags=("--enable-feature=exemplar-storage",)) as prometheus:
            trace_id = secrets.token_hex(16)
            model = f"exemplar-{secrets.token_hex(4)}"
            client = openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=30)
            client.chat.completions.create(model=model, messages=USER, max_tokens=5, extra_headers={
                "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
            span = receiver.wait_for_span(lambda s: s.trace_id == trace_id and not s.name.startswith("Upstream"))

            query = f'gen_ai_server_request_duration_seconds_bucket{{gen_ai_request_model="{model}"}}'
            found: list[dict[str, Any]] = []
            deadline = time.monotonic() + WAIT
            while not found and time.monotonic() < deadline:
                time.sleep(0.5)
                now = time.time()
                found = [e for series in prometheus.api("query_exemplars", query=query, start=str(now - 600),
                                                        end=str(now + 60))
                         for e in series["exemplars"]]
            assert found, prometheus.log()
            assert [e["labels"] for e in found] == [{"trace_id": trace_id, "span_id": span.span_id}]
