"""The monitoring deployment: Prometheus config, alert rules (and their promtool unit tests) and the Grafana
dashboard, checked against the metrics that vLLM and this plugin really export.

promtool comes from Debian's prometheus package, unpacked into the venv by scripts/install_tools.sh (`make
setup`); without it these tests fail rather than skip."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import prometheus_client
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "vllm-kvevict.json"

METRIC_TOKEN = re.compile(r"(?<![\w:])vllm(?:_kvevict)?:[A-Za-z0-9_:]+")
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
BUILTIN_INTERVALS = {"__rate_interval", "__interval", "__range"}


# ---------------------------------------------------------------- what is exported


def series_names(name: str, kind: str) -> set[str]:
    """The series a metric family exposes on /metrics, as PromQL sees them."""
    if kind == "counter":  # prometheus_client drops a trailing _total from the name and adds it back
        return {name.removesuffix("_total") + "_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def kvevict_series() -> set[str]:
    """Our metrics, from PromMetrics built into a fresh registry (not the process-wide default one)."""
    from vllm_kvevict.integration.vllm.metrics import PromMetrics

    registry = prometheus_client.CollectorRegistry()
    patch = pytest.MonkeyPatch()
    for cls in ("Counter", "Gauge", "Histogram"):  # PromMetrics imports these from prometheus_client when built
        patch.setattr(prometheus_client, cls, functools.partial(getattr(prometheus_client, cls), registry=registry))
    try:
        PromMetrics()
    finally:
        patch.undo()
    return {s for family in registry.collect() for s in series_names(family.name, family.type)}


def vllm_series() -> set[str]:
    """vLLM's metrics, parsed from the installed vllm/v1/metrics/loggers.py (importing vLLM is slow and its
    metrics exist only once an engine is configured): calls like `self._counter_cls(name="vllm:...", ...)`,
    the name given literally or through a local variable assigned a literal."""
    package = importlib.util.find_spec("vllm")
    assert package is not None and package.submodule_search_locations, "vllm is not installed"
    source = Path(package.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py"
    tree = ast.parse(source.read_text())
    kinds = {"_counter_cls": "counter", "_gauge_cls": "gauge", "_histogram_cls": "histogram",
             "Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}
    found: set[str] = set()
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        literals = {
            target.id: node.value.value
            for node in ast.walk(function) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets if isinstance(target, ast.Name)
        }
        for call in ast.walk(function):
            if not isinstance(call, ast.Call):
                continue
            callee = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
            name = next((kw.value for kw in call.keywords if kw.arg == "name"), None)
            if callee not in kinds or name is None:
                continue
            value = name.value if isinstance(name, ast.Constant) else literals.get(getattr(name, "id", None))
            if isinstance(value, str) and value.startswith("vllm:"):
                found |= series_names(value, kinds[callee])
    return found


@pytest.fixture(scope="module")
def known_series() -> set[str]:
    vllm, ours = vllm_series(), kvevict_series()
    # guard the parsers themselves: an empty or partial result would make every check pass
    assert {"vllm:num_requests_running", "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds_bucket",
            "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total"} <= vllm
    assert {"vllm_kvevict:compactions_total", "vllm_kvevict:kept_ratio_bucket", "vllm_kvevict:kv_cache_tokens",
            "vllm_kvevict:policy_info"} <= ours
    return vllm | ours


def unknown_metrics(exprs, known: set[str]) -> set[str]:
    """Metric names in PromQL expressions that nothing exports (a typo, a counter without _total, a
    histogram without _bucket/_sum/_count, a metric renamed upstream)."""
    return {token for expr in exprs for token in METRIC_TOKEN.findall(expr)} - known


# ---------------------------------------------------------------- what the files use


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows included, and those inside collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(dashboard: dict) -> dict[str, str]:
    """'panel <id> <refId>' -> PromQL of every panel target."""
    return {f"panel {panel['id']} {target['refId']}": target["expr"]
            for panel in all_panels(dashboard) for target in panel.get("targets", [])}


def variable_queries(dashboard: dict) -> list[str]:
    """Queries of the query-type template variables (label_values(...), not PromQL)."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def concrete(expr: str, variables: set[str]) -> str:
    """A dashboard expression with Grafana's variables replaced as Grafana would: built-in intervals by a
    duration, the dashboard's own (used in regex matchers, All = .*) by a regex."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name in BUILTIN_INTERVALS:
            return "5m"
        if name in variables:
            return ".*"
        raise AssertionError(f"undefined Grafana variable ${name} in {expr!r}")

    return GRAFANA_VARIABLE.sub(value, expr)


# ---------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> Path:
    path = Path(sys.executable).parent / "promtool"
    assert path.exists(), f"{path} is missing: run scripts/install_tools.sh {Path(sys.executable).parent.parent}"
    return path


def run_promtool(promtool: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=120)


def check_promql(promtool: Path, exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`promtool check rules` on a rules file recording each expression: it parses every one."""
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, expr in enumerate(exprs.values())]
    path = tmp_path / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return run_promtool(promtool, "check", "rules", str(path))


def test_prometheus_config_is_valid(promtool):
    result = run_promtool(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "vllm" and job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]


def test_alert_rules_are_valid(promtool):
    result = run_promtool(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests_pass(promtool):
    result = run_promtool(promtool, "test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_complete_and_unit_tested():
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {"VllmKvCacheNearlyFull", "VllmPreemptions", "VllmRequestQueueBuildingUp", "VllmTimeToFirstTokenHigh",
            "KvEvictNotEvicting", "KvEvictCompactionSlow"} <= names
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    assert {case["alertname"] for case in cases if case["exp_alerts"]} == names  # each one fires somewhere


def test_alert_metrics_exist(known_series):
    assert unknown_metrics([rule["expr"] for rule in alert_rules()], known_series) == set()


def test_dashboard_promql_parses(promtool, tmp_path):
    dashboard = load_dashboard()
    variables = {var["name"] for var in dashboard["templating"]["list"]}
    exprs = {where: concrete(expr, variables) for where, expr in dashboard_exprs(dashboard).items()}
    result = check_promql(promtool, exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_promql_check_catches_a_syntax_error(promtool, tmp_path):
    result = check_promql(promtool, {"bad": "sum by (policy) (rate(vllm_kvevict:compactions_total[5m])"}, tmp_path)
    assert result.returncode != 0


# ---------------------------------------------------------------- the dashboard


def test_dashboard_metrics_exist(known_series):
    dashboard = load_dashboard()
    exprs = [*dashboard_exprs(dashboard).values(), *variable_queries(dashboard)]
    assert unknown_metrics(exprs, known_series) == set()


def test_metric_check_catches_misspelled_names(known_series):
    good = 'sum by (policy) (rate(vllm_kvevict:evicted_tokens_total{policy=~"$policy"}[$__rate_interval]))'
    assert unknown_metrics([good], known_series) == set()
    bad = [
        "rate(vllm_kvevict:evicted_token_total[5m])",  # misspelled
        "rate(vllm:num_preemptions[5m])",  # counter without _total
        "histogram_quantile(0.9, rate(vllm:time_to_first_token_seconds[5m]))",  # histogram without _bucket
        "vllm:time_per_output_token_seconds_bucket",  # not in vLLM 0.32 (it is inter_token_latency_seconds)
    ]
    assert unknown_metrics(bad, known_series) == {
        "vllm_kvevict:evicted_token_total", "vllm:num_preemptions", "vllm:time_to_first_token_seconds",
        "vllm:time_per_output_token_seconds_bucket",
    }


def test_dashboard_structure():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"model_name", "policy"} <= set(variables)
    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert panel.get("title"), panel["id"]
        x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
        assert 0 <= x and x + w <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", panel["title"]
        targets = panel.get("targets", [])
        assert targets, panel["title"]
        assert all(t.get("expr") for t in targets), panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
    titles = " ".join(panel["title"] for panel in panels).lower()
    for needed in ("throughput", "time to first token", "inter-token", "kv cache usage", "preemptions",
                   "memory saved", "evicted", "freed", "compactions", "kept ratio", "compaction time",
                   "hit rate", "selected tokens", "active policy"):
        assert needed in titles, needed


def test_grafana_provisioning():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vllm-kvevict.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    # the README's mount puts the JSON where the provider looks
    assert f"{provider['options']['path']}/{DASHBOARD.name}" in (GRAFANA / "README.md").read_text()
