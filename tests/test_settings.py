"""trimmer/settings.py: TRIMMER_* variables parsed once; a bad value stops `trimmer root` / `trimmer leaf` with one
line; the values in force are logged once and served at GET /admin/settings (real processes on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from loadtest.procs import free_port, start, trimmer_cmd
from trimmer.errors import ConfigError
from trimmer.settings import Settings

from test_root_service import start_sink, write_bundle

# The documented variables and defaults (docs/settings.md), written out here rather than read from the module.
DOCUMENTED = {
    "TRIMMER_FAST_LISTENER": ("fast_listener", True),
    "TRIMMER_MALLOC_TUNING": ("malloc_tuning", True),
    "TRIMMER_GC_TUNING": ("gc_tuning", True),
    "TRIMMER_LOG_LEVEL": ("log_level", "INFO"),
    "TRIMMER_LOG_FORMAT": ("log_format", "text"),
    "TRIMMER_DEMO_CACHE": ("demo_cache", None),
    "TRIMMER_NO_EXTENSIONS": ("no_extensions", False),
}
BOOLS = [v for v, (_, d) in DOCUMENTED.items() if isinstance(d, bool)]


def test_defaults_without_variables_and_empty_values_count_as_unset():
    for env in ({}, {var: "" for var in DOCUMENTED}, {"UNRELATED": "x"}):
        s = Settings.from_env(env)
        assert {var: getattr(s, field) for var,
                (field, _) in DOCUMENTED.items()} == {v: d for v, (_, d) in DOCUMENTED.items()}


@pytest.mark.parametrize("var", BOOLS)
@pytest.mark.parametrize("raw, expected", [("0", False), ("1", True), ("false", False), ("TRUE", True), ("off", False),
                                           ("On", True), ("no", False), ("yes", True), (" 0 ", False)])
def test_booleans(var, raw, expected):
    assert getattr(Settings.from_env({var: raw}), DOCUMENTED[var][0]) is expected


@pytest.mark.parametrize("var, raw, allowed", [
    ("TRIMMER_GC_TUNING", "maybe", "true, false"),
    ("TRIMMER_FAST_LISTENER", "2", "true, false"),
    ("TRIMMER_NO_EXTENSIONS", "y", "true, false"),
    ("TRIMMER_LOG_LEVEL", "chatty", "DEBUG, INFO, WARNING, ERROR"),
    ("TRIMMER_LOG_FORMAT", "xml", "text, json"),
])
def test_bad_values_are_one_line_errors_naming_the_variable_and_the_choices(var, raw, allowed):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: raw})
    msg = str(info.value)
    assert var in msg and repr(raw) in msg and allowed in msg and "\n" not in msg


def test_text_values_are_normalised_and_describe_reports_what_changed():
    s = Settings.from_env({"TRIMMER_LOG_LEVEL": "debug", "TRIMMER_LOG_FORMAT": "JSON", "TRIMMER_DEMO_CACHE": "/tmp/c"})
    assert (s.log_level, s.log_format, s.demo_cache) == ("DEBUG", "json", "/tmp/c")
    d = s.describe()
    assert set(d) == {field for field, _ in DOCUMENTED.values()}
    assert d["log_level"] == {"value": "DEBUG", "env": "TRIMMER_LOG_LEVEL", "default": "INFO", "changed": True}
    assert d["gc_tuning"] == {"value": True, "env": "TRIMMER_GC_TUNING", "default": True, "changed": False}
    json.dumps(d)  # served as JSON as it is


def _bad_env_run(args: list[str], var: str, raw: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMMER_")} | {var: raw}
    return subprocess.run(trimmer_cmd(*args), capture_output=True, text=True, timeout=120, env=env)


def _root_config(tmp_path, replica: str, admin_port: int) -> str:
    write_bundle(tmp_path / "bundle.json", {"alpha": {"1": ["f1"]}})
    path = tmp_path / "root.yaml"
    path.write_text(json.dumps({"bundles": [str(tmp_path / "bundle.json")], "admin": {"port": admin_port},
                                "partitions": {"p": {"replicas": [replica]}}, "models": {"alpha": "p"}}))
    return str(path)


@pytest.mark.parametrize("var, raw", [("TRIMMER_GC_TUNING", "maybe"), ("TRIMMER_LOG_FORMAT", "xml")])
def test_root_refuses_to_start_on_a_bad_value(tmp_path, var, raw):
    cfg = _root_config(tmp_path, "http://127.0.0.1:9", free_port())
    out = _bad_env_run(["root", "--config", cfg, "--port", str(free_port())], var, raw)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"trimmer root: error: {var}={raw!r}: expected one of "
                                               + ("1, 0, true, false, yes, no, on, off" if var == "TRIMMER_GC_TUNING"
                                                  else "text, json")]


def test_leaf_refuses_to_start_on_a_bad_value(tmp_path):
    (tmp_path / "repo").mkdir()
    out = _bad_env_run(["leaf", "--repo", str(tmp_path / "repo"), "--port", str(free_port())],
                       "TRIMMER_FAST_LISTENER", "sometimes")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trimmer leaf: error: TRIMMER_FAST_LISTENER='sometimes'"), out.stderr


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/json")
        return json.loads(resp.read())


def test_root_logs_its_settings_once_and_serves_them_on_the_admin_listener(tmp_path):
    sink = start_sink(tmp_path, "sink")
    admin_port, port = free_port(), free_port()
    cfg = _root_config(tmp_path, sink.url, admin_port)
    root = start("root", ["root", "--config", cfg, "--port", str(port)], port, "/readyz", tmp_path, timeout=30,
                 env={"TRIMMER_FAST_LISTENER": "off", "TRIMMER_LOG_LEVEL": "warning", "TRIMMER_GC_TUNING": ""})
    try:
        got = _get_json(f"http://127.0.0.1:{admin_port}/admin/settings")
        assert got["fast_listener"] == {"value": False, "env": "TRIMMER_FAST_LISTENER",
                                        "default": True, "changed": True}
        assert got["log_level"]["value"] == "WARNING" and got["gc_tuning"]["value"] is True
        with pytest.raises(urllib.error.HTTPError) as info:  # admin routes stay off the service port
            urllib.request.urlopen(root.url + "/admin/settings", timeout=10)
        assert info.value.code == 404
    finally:
        root.stop()
        sink.stop()
    # WARNING level: the INFO settings line is not logged; the level itself came from the variable.
    assert "settings:" not in root.log_path.read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_root_settings_line_at_info_once(tmp_path, workers):
    sink = start_sink(tmp_path, "sink")
    port = free_port()
    root = start("root", ["root", "--config", _root_config(tmp_path, sink.url, free_port()), "--port", str(port),
                          "--workers", str(workers)], port, "/readyz", tmp_path, timeout=60,
                          env={"TRIMMER_MALLOC_TUNING": "0"})
    root.stop()
    sink.stop()
    lines = [ln for ln in root.log_path.read_text().splitlines() if "settings:" in ln]
    assert len(
        lines) == 1 and " INFO " in lines[0] and "malloc_tuning=False" in lines[0] and "fast_listener=True" in lines[0]


def test_leaf_logs_and_serves_its_settings(tmp_path):
    from archives import make_repo

    repo = make_repo(tmp_path / "repo", {"m": {"1": ["x", "y"]}})
    port = free_port()
    leaf = start("leaf", ["leaf", "--repo", str(repo), "--port", str(port), "--torch-threads", "1"], port,
                 "/v2/health/ready", tmp_path, env={"TRIMMER_GC_TUNING": "no", "TRIMMER_NO_EXTENSIONS": "1"})
    try:
        got = _get_json(leaf.url + "/admin/settings")
        assert got["gc_tuning"] == {"value": False, "env": "TRIMMER_GC_TUNING", "default": True, "changed": True}
        assert got["no_extensions"]["value"] is True and got["malloc_tuning"]["value"] is True
    finally:
        leaf.stop()
    lines = [ln for ln in leaf.log_path.read_text().splitlines() if "settings:" in ln]
    assert len(lines) == 1 and "gc_tuning=False" in lines[0] and "no_extensions=True" in lines[0]
