"""`trimmer root bench --proxies` (loadtest/bench/proxies.py): refuses clearly without its tools, and, where wrk
and nginx are installed, runs and reports every row side by side (optional: skipped, saying so, elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from loadtest.procs import trimmer_cmd


def test_without_wrk_or_nginx_it_says_what_to_install_and_exits_2(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir)}  # neither wrk nor nginx on PATH
    out = subprocess.run(trimmer_cmd("root", "bench", "--proxies"), capture_output=True,
                         text=True, timeout=120, env=env)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "wrk" in lines[0] and "nginx" in lines[0] and "apt-get install" in lines[0] and "Traceback" not in out.stderr


@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("nginx") is None,
                    reason="optional: needs wrk and nginx on PATH (apt-get install wrk nginx-light haproxy)")
def test_side_by_side_run_reports_every_proxy(tmp_path):
    report = tmp_path / "proxies.json"
    out = subprocess.run(trimmer_cmd("root", "bench", "--proxies", "--seconds", "1", "--out", str(report)),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(report.read_text())
    names = [r["proxy"] for r in doc["rows"]]
    assert names[0].startswith("direct") and "nginx passthrough" in names and "root trim" in names
    assert ("haproxy passthrough" in names) == (shutil.which("haproxy") is not None)
    for row in doc["rows"][1:]:
        assert row["cpu_ms_per_request"] > 0 and row["requests_per_s"] > 0, row
    sent = doc["upstream_bytes"]["root"]
    assert sent["ref_pass"] == doc["payload_bytes"] and 0 < sent["ref"] < sent["ref_pass"] / 2  # 20 % of features kept
    r = doc["rss"]["root"]
    assert r["slow_model_peak_mib"] >= r["idle_mib"] > 0 and r["flood_peak_mib"] >= r["idle_mib"]
