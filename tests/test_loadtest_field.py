"""`trimmer loadtest --target URL` against a running root (real process, loadtest.sink upstream); it starts nothing
itself.

Oracle: the root's own counters. Every request the load test reports as answered must have
reached the root (trimmer_root_requests_total per model), and the root must have trimmed them
(upstream bytes below untrimmed), since the payload carries features the models do not read.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from loadtest.field import parse_models, signature_from_metadata
from loadtest.procs import free_port, start, trimmer_cmd
from trimmer.errors import ConfigError, TrimmerError

from test_root_service import metric, start_sink, write_bundle


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("field")
    sink = start_sink(tmp, "sink", "--oip-inputs", "alpha=f1,f2", "--oip-inputs", "beta=f3")
    write_bundle(tmp / "bundle.json", {"alpha": {"1": ["f1", "f2"]}, "beta": {"1": ["f3"]}})
    admin = free_port()
    cfg = {"bundles": [str(tmp / "bundle.json")], "admin": {"host": "127.0.0.1", "port": admin},
           "partitions": {"p": {"replicas": [sink.url]}},
           "models": {"alpha": {"partition": "p", "default_version": "1"},
                      "beta": {"partition": "p", "default_version": "1"}}}
    (tmp / "root.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    r = start("root", ["root", "--config", str(tmp / "root.yaml"), "--port", str(port)], port,
              "/readyz", tmp, timeout=30)
    try:
        yield {"url": r.url, "metrics": f"http://127.0.0.1:{admin}/metrics", "tmp": tmp}
    finally:
        r.stop()
        sink.stop()


def _loadtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(trimmer_cmd("loadtest", *args), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.mark.parametrize("models", ["alpha", "alpha,beta"])
def test_target_mode_loads_the_running_root(root, models: str, tmp_path: Path) -> None:
    before = _metrics(root["metrics"])
    out = tmp_path / "result.json"
    r = _loadtest("--target", root["url"], "--models", models, "--rate", "25", "--duration", "1.5", "--warmup", "0.3",
                  "--candidates", "16", "--distinct", "3", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert doc["errors"] == {} and doc["measured"] >= 10
    assert doc["path"] == ("/v1/score" if "," in models else "/v1/models/alpha/score")
    assert doc["payload"]["profile"] == "realistic"
    assert 0 < doc["payload"]["min_bytes"] < doc["payload"]["body_bytes"]
    after = _metrics(root["metrics"])
    for m in models.split(","):
        reached = metric(after, "trimmer_root_requests_total", model=m) - metric(
            before, "trimmer_root_requests_total", model=m)
        assert reached >= doc["sent"] >= doc["measured"]
        sent = metric(after, "trimmer_root_upstream_sent_bytes_total", model=m) - metric(
            before, "trimmer_root_upstream_sent_bytes_total", model=m)
        full = metric(after, "trimmer_root_untrimmed_bytes_total", model=m) - metric(
            before, "trimmer_root_untrimmed_bytes_total", model=m)
        assert 0 < sent < full


def test_target_mode_errors_are_one_line(root) -> None:
    r = _loadtest("--target", root["url"], "--models", "nope", "--duration", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "404" in r.stderr and "nope" in r.stderr
    r = _loadtest("--target", root["url"])
    assert r.returncode == 2 and "--models" in r.stderr
    r = _loadtest("--target", root["url"], "--config", "configs/loadtest.yaml", "--models", "alpha")
    assert r.returncode == 2 and "exclusive" in r.stderr
    r = _loadtest("--target", root["url"], "--models", "alpha", "--profile", "lifelike")
    assert r.returncode == 2 and "--profile" in r.stderr


def test_parse_models_and_metadata() -> None:
    assert [(t.model, t.version) for t in parse_models("a, b:2")] == [("a", None), ("b", "2")]
    with pytest.raises(ConfigError):
        parse_models("a,a")
    sig = signature_from_metadata({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                                              {"name": "y", "datatype": "INT64", "shape": [], "default": 0}],
                                   "outputs": [{"name": "s"}]}, "meta")
    assert sig.input_names == ("x", "y") and sig.output_names == ("s",)
    assert sig.inputs["x"].dtype == "float32" and sig.inputs["x"].shape == (-1, 4) and sig.inputs["y"].has_default
    with pytest.raises(TrimmerError, match="no inputs"):
        signature_from_metadata({"inputs": []}, "meta")
    # a datatype that is no string (was a TypeError when unhashable) is an unknown one: the input goes untyped
    odd = signature_from_metadata({"inputs": [{"name": "x", "datatype": ["FP32"], "shape": [2]}]}, "meta")
    assert odd.input_names == ("x",) and odd.inputs["x"].dtype is None and odd.inputs["x"].shape is None
