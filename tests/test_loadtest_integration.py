"""A short real matrix against a real root and a real leaf: the report's trimmed bytes equal the computed minimum.

Real processes on loopback ports (loadtest.procs); a few seconds of load per
scenario, three scenarios.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from loadtest.config import LoadtestConfig, ModelTarget, PayloadSpec
from loadtest.matrix import run_matrix
from loadtest.report import write_report
from loadtest.runner import LoadSpec


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "models"
    r = subprocess.run([sys.executable, "-m", "trimmer", "leaf", "build-demo", "--out", str(out)],
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def _cfg(tmp: Path, repo: Path) -> LoadtestConfig:
    return LoadtestConfig(
        path="(test)", out=tmp, repo=repo, models=(ModelTarget("ranker"), ModelTarget("retrieval")),
        payload=PayloadSpec(usage_ratio=0.2, candidates=256, seed=0, distinct=4),
        load=LoadSpec(mode="open", rate=20, duration_s=2.0, warmup_s=0.5, timeout_s=10),
        scenarios=("passthrough", "trim", "shadow"),
    )


def test_short_real_matrix_trimmed_bytes_match_minimum(tmp_path: Path, demo_repo: Path) -> None:
    cfg = _cfg(tmp_path, demo_repo)
    report = run_matrix(cfg, tmp_path)
    files = write_report(report, tmp_path)
    # nothing left running: leaf, relay and every root are stopped
    assert psutil.Process().children(recursive=True) == []

    data = json.loads(Path(files["json"]).read_text())
    rows = {r["scenario"]: r for r in data["scenarios"]}
    p = data["payload"]
    assert p["used"] > 0 and p["min_bytes"] < p["untrimmed_bytes"]
    for name, r in rows.items():
        assert r["errors"] == {}, (name, r["errors"], (tmp_path / "logs").iterdir())
        assert r["measured"] >= 20, name
        assert r["crosscheck"]["ok"], (name, r["crosscheck"])  # relay bytes vs the root's metric, within 1 %
        assert r["upstream_requests"] == 2 * r["client_requests"], name  # one upstream request per model
        assert r["root_cpu_s_per_1k"] > 0 and r["latency_ms"]["p50"] > 0
    trim, base, shadow = rows["trim"], rows["passthrough"], rows["shadow"]
    # the acceptance figure: trimmed bytes on the wire == bytes of the request with only the kept features
    assert trim["body_bytes_per_request"] == pytest.approx(p["min_bytes"], rel=0.01)
    assert trim["wire_bytes_per_request"] == pytest.approx(p["min_bytes"], rel=0.03)  # + HTTP framing
    assert base["body_bytes_per_request"] == pytest.approx(p["untrimmed_bytes"], rel=0.01)
    assert shadow["body_bytes_per_request"] == pytest.approx(base["body_bytes_per_request"], rel=0.001)
    assert trim["saved_pct"] > 30
    assert rows["shadow"]["root_metrics"]["shadow_features_dropped"] > 0
    assert trim["root_metrics"]["features_dropped"] > 0
    md = Path(files["md"]).read_text()
    assert "| trim | loopback |" in md
    assert Path(files["bytes_per_request"]).stat().st_size > 1000


def test_loadtest_cli_rejects_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "lt.yaml"
    bad.write_text("scenarios: [turbo]\n")
    r = subprocess.run([sys.executable, "-m", "trimmer", "loadtest", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown scenario 'turbo'" in r.stderr
