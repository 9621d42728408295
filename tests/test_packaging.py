"""The wheel, installed into a fresh virtual environment without torch, runs a real root.

This is what `pip install feature-trimmer` gives a user who only wants the root: the base
dependencies and nothing else (no torch, no plotting or benchmarking libraries). The test builds
the wheel from a copy of the sources, installs it into a new venv (dependencies from the package
index the machine reaches), and then:
- the heavy packages are absent, the ones the root needs are present, `py.typed` ships;
- `trimmer root --help` works, and a command that needs an extra says which one in one line;
- a real root process starts from that venv, gets ready against a stand-in upstream from the same
  venv, and trims a request.
About a minute, most of it pip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

import msgspec
import pytest

from loadtest.procs import ManagedProcess, free_port

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "matplotlib", "rich", "hdrh", "psutil")
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.pyc",
                                 ".pytest_cache", ".hypothesis", "out", "demo-out", "tests")


def _run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_IGNORE)
    wheels = tmp / "wheels"
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)])
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = wheels.glob("feature_trimmer-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = _run([str(py), "-m", "pip", "install", "-q", str(wheel)], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return env_dir


def test_base_install_is_lean(fresh: Path) -> None:
    py = str(fresh / "bin" / "python")
    probe = ("import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
             f"{list(HEAVY) + ['aiohttp', 'msgspec', 'numpy', 'prometheus_client', 'trimmer', 'root']!r}}}))")
    r = _run([py, "-c", probe], cwd="/")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert not [m for m in HEAVY if found[m]], found
    assert all(found[m] for m in ("aiohttp", "msgspec", "numpy", "prometheus_client", "trimmer", "root"))
    # Every root and trimmer module imports without the extras (heavy imports stay inside the commands).
    r = _run([py, "-c", "import importlib, pkgutil, root, trimmer\n"
                        "for p in (root, trimmer):\n"
                        "    for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
                        "        if not m.name.endswith('__main__'):\n"
                        "            importlib.import_module(m.name)"], cwd="/")
    assert r.returncode == 0, r.stderr
    r = _run([py, "-c", "import trimmer, root, pathlib; print(all((pathlib.Path(m.__file__).parent / "
                        "'py.typed').is_file() for m in (trimmer, root)))"],
             cwd="/")
    assert r.stdout.strip() == "True", r.stderr


def test_cli_in_fresh_venv(fresh: Path) -> None:
    trimmer = str(fresh / "bin" / "trimmer")
    r = _run([trimmer, "root", "--help"], cwd="/")
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr
    # A command that needs an extra: one line naming it, no traceback.
    r = _run([trimmer, "bench", "trim"], cwd="/")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "feature-trimmer[loadtest]" in r.stderr and "Traceback" not in r.stderr


def test_real_root_from_fresh_venv(fresh: Path, tmp_path: Path) -> None:
    py = str(fresh / "bin" / "python")
    sink_port, port = free_port(), free_port()
    sink = ManagedProcess("sink", [py, "-m", "loadtest.sink", "--port", str(sink_port)],
                          f"http://127.0.0.1:{sink_port}", tmp_path / "sink.log")
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"kind": "feature-trimmer/bundle", "format": 1,
                                  "models": {"m": {"versions": {"1": {"input_names": ["a"], "output_names": ["y"]}}}}}))
    cfg = tmp_path / "root.yaml"
    cfg.write_text(json.dumps({"bundles": [str(bundle)], "partitions": {"p": {"replicas": [sink.url]}},
                               "models": {"m": {"partition": "p", "default_version": "1"}}}))
    root = ManagedProcess("root", [str(fresh / "bin" / "trimmer"), "root", "--config", str(cfg), "--port", str(port)],
                          f"http://127.0.0.1:{port}", tmp_path / "root.log")
    try:
        sink.start()
        sink.wait_ready("/v2/health/ready", timeout=60)
        root.start()
        root.wait_ready("/readyz", timeout=60)
        body = msgspec.msgpack.encode({"features": {"a": 1, "b": 2, "c": 3}})
        req = urllib.request.Request(root.url + "/v1/models/m/score", data=body,
                                     headers={"Content-Type": "application/msgpack"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            out = msgspec.msgpack.decode(resp.read())
        assert out["features"] == ["a"]  # the sink saw the trimmed body
    finally:
        root.stop()
        sink.stop()


# python:3.11-slim is about 125 MB; the root image adds /opt/trimmer, slimmed by deploy/docker/slim-site.sh.
IMAGE_BUDGET_MB, SLIM_BASE_MB = 250, 130


def test_root_install_fits_the_image_budget(fresh: Path, tmp_path: Path) -> None:
    """The same install and the same slimming as root.Dockerfile, measured: base + environment < 250 MB."""
    if shutil.which("strip") is None:
        pytest.skip("strip (binutils) not installed: cannot slim the environment as the image build does")
    env = tmp_path / "opt-trimmer"
    shutil.copytree(fresh, env, symlinks=True)
    r = _run(["sh", str(REPO / "deploy" / "docker" / "slim-site.sh"), str(env)])
    assert r.returncode == 0, r.stderr
    total = sum(f.stat().st_size for f in env.rglob("*") if f.is_file() and not f.is_symlink())
    mb = total / 1e6
    assert SLIM_BASE_MB + mb < IMAGE_BUDGET_MB, \
        f"the root environment is {mb:.0f} MB; with the slim base that exceeds {IMAGE_BUDGET_MB} MB"
    # Still works after slimming (nothing it imports was removed).
    probe = ("import root.app, numpy, zstandard, lz4.frame, uvloop, msgspec\n"
             "from trimmer.trim import ACCELERATED, trim\n"
             "body = msgspec.msgpack.encode({'features': {'a': 1, 'b': 2}})\n"
             "assert ACCELERATED and msgspec.msgpack.decode(trim(body, frozenset({'a'}), 'application/msgpack').body) "
             "== {'features': {'a': 1}}\n"
             "assert float(numpy.linalg.norm(numpy.ones(4))) == 2.0 and zstandard.ZstdDecompressor().decompress("
             "zstandard.ZstdCompressor().compress(body)) == body\n"
             "print('ok')")
    r = _run([str(env / "bin" / "python"), "-c", probe], cwd="/")
    assert r.stdout.strip() == "ok", r.stderr
