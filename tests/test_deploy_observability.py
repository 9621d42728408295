"""The Grafana dashboard and the Prometheus alert rules refer only to metrics a real root exports.

A real root process (with loadtest.sink as its upstream, on loopback) serves a few requests, trimmed
and missed, so labelled series exist; its /metrics is scraped from the admin listener the test
config names (read from that config, so the test works whether /metrics is on the service port
or on `admin.port`). Every metric name in every dashboard query and alert expression must be
declared in that exposition (`up` is Prometheus's own). The queries are parsed as PromQL
(promql-parser) so a syntax error fails here, not in Grafana.

Also: the per-source reload metrics move when an overrides file fails to load.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtest.procs import free_port, start
from trimmer.bundle import BUNDLE_FORMAT, BUNDLE_KIND

from test_root_service import start_sink

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "trimmer.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
PROMETHEUS_OWN = {"up"}  # series Prometheus itself adds to every scrape target

_GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
_NAME = re.compile(r"\b(trimmer_[a-z0-9_]+|up)\b(?=\s*[{\[)\s]|$)")


def _grafana_to_promql(expr: str) -> str:
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # template variables are used in regex matchers only


def _panel_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(doc["panels"]):
        out += [t["expr"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            m = re.match(r"label_values\((\w+)", q["query"])
            if m:
                out.append(m.group(1))
    return out


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def _names(expr: str) -> set[str]:
    """Metric names an expression selects: from the PromQL AST when promql-parser is installed, else by pattern."""
    promql = _grafana_to_promql(expr)
    try:
        import promql_parser
    except ImportError:
        return set(_NAME.findall(promql))
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(promql), visit)  # ValueError on a syntax error
    return names


def _referenced() -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {}
    for e in _panel_exprs():
        for n in _names(e):
            refs.setdefault(n, set()).add("dashboard")
    for r in _alert_rules():
        for n in _names(r["expr"]):
            refs.setdefault(n, set()).add(f"alert {r['alert']}")
    return refs


def test_dashboard_covers_what_the_issue_asks() -> None:
    doc = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in doc["panels"])
    for want in ("bytes in", "bytes out", "bytes saved", "miss", "trim latency", "errors", "audit", "replicas up"):
        assert want in titles, want
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}"


def test_alert_rules_well_formed() -> None:
    rules = _alert_rules()
    names = {r["alert"] for r in rules}
    assert {"TrimmerAuditMismatch", "TrimmerAllowlistMissRateHigh", "TrimmerAllowlistReloadFailing",
            "TrimmerReplicaDown", "TrimmerRootDown"} <= names
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning")
        assert r["annotations"]["summary"]


def test_promql_parse_can_fail() -> None:
    pytest.importorskip("promql_parser")
    with pytest.raises(ValueError):
        _names("sum(rate(trimmer_root_requests_total[5m])")


def _bundle(path: Path) -> Path:
    doc = {"kind": BUNDLE_KIND, "format": BUNDLE_FORMAT,
           "models": {"alpha": {"versions": {"1": {"input_names": ["f1", "f2"], "output_names": ["score"]}}}}}
    path.write_text(json.dumps(doc))
    return path


def _scrape(url: str) -> tuple[str, set[str], set[str]]:
    """(text, declared metric names (families and sample names), sample names that have at least one sample)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    declared, sampled = set(), set()
    for fam in text_string_to_metric_families(text):
        declared.add(fam.name)
        for s in fam.samples:
            sampled.add(s.name)
    declared |= sampled
    for line in text.splitlines():  # metrics declared without samples yet (a labelled counter before its first inc)
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            declared.add(name)
            if kind == "histogram":
                declared |= {name + "_bucket", name + "_sum", name + "_count"}
    return text, declared, sampled


def _post(url: str, doc: dict) -> int:
    req = urllib.request.Request(url, data=msgspec.msgpack.encode(doc), headers={"Content-Type": "application/msgpack"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def root_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obs")
    sink = start_sink(tmp, "sink")
    overrides = tmp / "allowlists.yaml"
    overrides.write_text("models:\n  alpha:\n    mode: enforce\n")
    admin_port = free_port()
    config = {
        "bundles": [str(_bundle(tmp / "bundle.json"))],
        "overrides": str(overrides),
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "partitions": {"main": {"replicas": [sink.url]}},
        "models": {"alpha": {"partition": "main", "default_version": "1"}, "nolist": "main"},
        "timeouts": {"health_interval_s": 0.5},
    }
    cfg_path = tmp / "root.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    port = free_port()
    started = time.time()
    root = start("root", ["root", "--config", str(cfg_path), "--port", str(port)], port, "/readyz", tmp, timeout=30)
    cfg = yaml.safe_load(cfg_path.read_text())
    metrics_url = f"http://{cfg['admin']['host']}:{cfg['admin']['port']}/metrics"
    try:
        features = {f"f{i}": i for i in range(6)}
        assert _post(root.url + "/v1/models/alpha/score", {"features": features}) == 200  # trimmed
        assert _post(root.url + "/v1/models/nolist/score", {"features": features}) == 200  # allowlist miss
        yield {"root": root, "metrics": metrics_url, "overrides": overrides, "admin": metrics_url.rsplit("/", 1)[0],
               "started": started}
    finally:
        root.stop()
        sink.stop()


def test_every_referenced_metric_exists(root_env) -> None:
    _, declared, sampled = _scrape(root_env["metrics"])
    refs = _referenced()
    assert len(refs) >= 15
    missing = {n: sorted(w) for n, w in refs.items() if n not in declared and n not in PROMETHEUS_OWN}
    assert not missing, f"referenced but not exported by the root: {missing}"
    # The series the overview panels and the main alerts read carry samples after two requests.
    for name in ("trimmer_root_upstream_sent_bytes_total", "trimmer_root_untrimmed_bytes_total",
                 "trimmer_root_model_client_bytes_total",
                 "trimmer_root_mode_requests_total", "trimmer_root_requests_total",
                 "trimmer_root_allowlist_misses_total", "trimmer_root_trim_seconds_bucket", "trimmer_root_replica_up",
                 "trimmer_root_allowlist_reload_failures_total",
                 "trimmer_root_allowlist_last_reload_timestamp_seconds"):
        assert name in sampled, name


def test_reload_metrics_per_source(root_env) -> None:
    def sample(text: str, name: str, kind: str) -> float | None:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and s.labels.get("kind") == kind:
                    return s.value
        return None

    text, _, _ = _scrape(root_env["metrics"])
    assert sample(text, "trimmer_root_allowlist_reload_failures_total", "bundle") == 0
    assert sample(text, "trimmer_root_allowlist_reload_failures_total", "overrides") == 0
    last = sample(text, "trimmer_root_allowlist_last_reload_timestamp_seconds", "overrides")
    assert last is not None and root_env["started"] - 1 <= last <= time.time()

    root_env["overrides"].write_text("models:\n  alpha:\n    mode: trim-everything\n")
    req = urllib.request.Request(root_env["admin"] + "/admin/reload", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    text, _, _ = _scrape(root_env["metrics"])
    # the watcher may also have seen it
    assert sample(text, "trimmer_root_allowlist_reload_failures_total", "overrides") >= 1
    assert sample(text, "trimmer_root_allowlist_reload_failures_total", "bundle") == 0
    # last good unchanged
    assert sample(text, "trimmer_root_allowlist_last_reload_timestamp_seconds", "overrides") == last
