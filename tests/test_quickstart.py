"""The README's quick start, run as written: the shipped configs, then every code block in order.

Only the ports change (8001, 8080, 9901 become free ones, in the configs and in
the commands alike) and the demo models are built small beforehand, so the
leaf finds them instead of building the full set. Each block must exit 0, and
the bytes the root reports prove that it trimmed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.procs import ManagedProcess, free_port, trimmer_cmd

REPO = Path(__file__).resolve().parent.parent
PORTS = ("8001", "8080", "9901")


def quickstart_blocks() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(sh|python)\n(.*?)```", section, flags=re.S)


def test_the_quick_start_has_the_blocks_this_test_runs():
    kinds = [k for k, _ in quickstart_blocks()]
    assert kinds == ["sh", "sh", "python", "python"], kinds
    assert "trimmer leaf --config configs/leaf.yaml" in quickstart_blocks()[0][1]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    ports = {p: str(free_port()) for p in PORTS}

    def localize(text: str) -> str:
        for old, new in ports.items():
            text = text.replace(old, new)
        return text

    (tmp / "configs").mkdir()
    for f in (REPO / "configs").glob("*.yaml"):
        (tmp / "configs" / f.name).write_text(localize(f.read_text()))
    subprocess.run(trimmer_cmd("leaf", "build-demo", "--out", str(tmp / "build" / "demo-models"), "--items", "2000"),
                   check=True, capture_output=True, timeout=300)
    procs: list[ManagedProcess] = []
    try:
        start_block = quickstart_blocks()[0][1]
        for line in start_block.splitlines():
            args = line.split("#", 1)[0].strip().rstrip("&").split()
            if not args:
                continue
            assert args[0].endswith("trimmer"), line
            name = args[1]
            proc = ManagedProcess(name, trimmer_cmd(*args[1:]),
                                  f"http://127.0.0.1:{ports['8001' if name == 'leaf' else '8080']}",
                                  tmp / f"{name}.log", cwd=tmp)
            proc.start()
            proc.wait_ready("/v2/health/ready" if name == "leaf" else "/readyz", timeout=240)
            procs.append(proc)
        yield {"tmp": tmp, "localize": localize}
    finally:
        for p in reversed(procs):
            p.stop()


def _metric(text: str, name: str, model: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and f'model="{model}"' in line)


def test_curl_with_json_is_trimmed(quickstart):
    block = quickstart["localize"](quickstart_blocks()[1][1])
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True,
                         timeout=60, cwd=quickstart["tmp"])
    assert out.returncode == 0, out.stderr
    assert '"outputs"' in out.stdout and '"item_ids"' in out.stdout, out.stdout[:500]
    untrimmed = _metric(out.stdout, "trimmer_root_untrimmed_bytes_total", "retrieval")
    sent = _metric(out.stdout, "trimmer_root_upstream_sent_bytes_total", "retrieval")
    assert 0 < sent < untrimmed, out.stdout[-800:]


def test_python_client_is_trimmed(quickstart):
    block = quickstart["localize"](quickstart_blocks()[2][1])
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                         timeout=60, cwd=quickstart["tmp"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    from trimmer.repository import scan_repository

    versions = [
        v for (m, v) in scan_repository(quickstart["tmp"] / "build" / "demo-models").versions if m == "retrieval"]
    assert lines[0].split()[0] == max(versions, key=int)  # no version named: the latest ran
    assert "trimmer_root_features_dropped_total" in lines[-1] and not lines[-1].endswith("0.0']"), lines[-1]


def test_shipped_configs_are_untouched_but_for_ports(quickstart):
    for f in (REPO / "configs").glob("*.yaml"):
        assert quickstart["localize"](f.read_text()) == (quickstart["tmp"] / "configs" / f.name).read_text()
    assert shutil.which("curl"), "curl is needed by the quick start"


def test_tritonclient_with_its_defaults_is_trimmed(quickstart):
    def sent() -> float:
        import urllib.request

        with urllib.request.urlopen(quickstart["localize"]("http://127.0.0.1:9901/metrics"), timeout=10) as r:
            text = r.read().decode()
        return (_metric(text, "trimmer_root_untrimmed_bytes_total", "retrieval"),
                _metric(text, "trimmer_root_upstream_sent_bytes_total", "retrieval"))

    before = sent()
    block = quickstart["localize"](quickstart_blocks()[3][1])
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                         timeout=60, cwd=quickstart["tmp"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("["), out.stdout
    after = sent()
    untrimmed, upstream = after[0] - before[0], after[1] - before[1]
    assert untrimmed > 4096 * 4 and upstream < 1000, (untrimmed, upstream)  # the 16 KB session_blob never left the root
