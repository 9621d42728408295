"""The root's command line: one-line errors with exit code 2, --version, --log-level."""

from __future__ import annotations

import json
import socket
import subprocess
from importlib.metadata import version

from loadtest.procs import trimmer_cmd


def _config(tmp_path, port: int, admin_port: int) -> str:
    path = tmp_path / "root.yaml"
    path.write_text(json.dumps({"listen": {"port": port}, "admin": {"port": admin_port},
                                "partitions": {"p": {"replicas": ["http://127.0.0.1:9"]}}, "models": {"m": "p"}}))
    return str(path)


def test_a_busy_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            admin = free.getsockname()[1]
        out = subprocess.run(trimmer_cmd("root", "--config", _config(tmp_path, port, admin)),
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("trimmer root: error: cannot listen") and str(port) in last
    assert "Traceback" not in out.stderr


def test_version_names_the_installed_package():
    out = subprocess.run(trimmer_cmd("--version"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"trimmer (feature-trimmer) {version('feature-trimmer')}"


def test_log_level_is_checked_and_every_root_option_has_help(tmp_path):
    out = subprocess.run(trimmer_cmd("root", "--log-level", "chatty", "--config", "x.yaml"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--log-level" in out.stderr
    helptext = subprocess.run(trimmer_cmd("root", "--help"), capture_output=True, text=True, timeout=60).stdout
    for opt in ("--config", "--host", "--port", "--workers", "--log-level"):
        line = next(ln for ln in helptext.splitlines() if ln.strip().startswith(opt))
        assert len(line.strip()) > len(opt) + 12 or opt in helptext.split(line, 1)[1][:200], (opt, line)


def test_inspect_warns_when_a_signature_lacks_dtype_specs(tmp_path):
    from archives import save_archive

    bare = save_archive(tmp_path / "bare.pt", {"input_names": ["x", "y"], "output_names": ["s"]})
    typed = save_archive(tmp_path / "typed.pt", {"input_names": ["x", "y"], "output_names": ["s"],
                                                 "inputs": {"x": {"dtype": "float32"},
                                                            "y": {"dtype": "int64", "shape": [-1]}}})
    out = subprocess.run(trimmer_cmd("inspect", str(bare)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["input_names"] == ["x", "y"]
    assert "warning" in out.stderr and "x, y" in out.stderr and "inputs.<name>.dtype" in out.stderr
    out = subprocess.run(trimmer_cmd("inspect", str(typed)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "warning" not in out.stderr
