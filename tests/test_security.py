"""Security properties of the root and the `trimmer` CLI (issue 6, Security).

- No torch and no unpickling outside the leaf: a hostile archive whose pickle
  would run a command is read, scanned and bundled under an audit hook that
  records every `pickle.find_class` and `os.system`/`subprocess.Popen` event.
- Default binds are loopback for the root and the leaf (code defaults and
  shipped configs).
- Admin endpoints (/metrics, /admin/*) can be switched off or moved to a
  separate listener: checked on real root processes.
Archive size bounds and body limits are covered by tests/test_bad_inputs.py.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from loadtest.procs import ManagedProcess, free_port, start

ROOT_DIR = Path(__file__).resolve().parent.parent


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def hostile_archive() -> bytes:
    """module_info.json is fine; data.pkl runs `touch PWNED` if anything ever unpickles it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model/extra/module_info.json", json.dumps({"input_names": ["a", "b"], "output_names": ["s"]}))
        zf.writestr("model/data.pkl", pickle.dumps(_Evil()))
        zf.writestr("model/constants.pkl", pickle.dumps(_Evil()))
    return buf.getvalue()


CHILD = r"""
import sys, json
events = []
def hook(event, args):
    if event in ("pickle.find_class", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn"):
        events.append(event)
sys.addaudithook(hook)
repo, out = sys.argv[1], sys.argv[2]
from trimmer.cli import main, build_parser
build_parser()  # registers every subcommand module, root and loadtest included
rc = [main(["inspect", repo + "/m/1/model.pt"]), main(["inspect", repo]), main(["bundle", "build", repo, "-o", out]),
      main(["inspect", out])]
import root.app, root.config
from trimmer.registry import Registry, RepositorySource, BundleSource
reg = Registry([RepositorySource(repo), BundleSource(out)])
reg.reload()
res = reg.resolve("m", "1")
print(json.dumps({"rc": rc, "events": events, "torch": "torch" in sys.modules, "allow": sorted(res.allowlist)}))
"""


def test_cli_and_root_never_import_torch_or_unpickle(tmp_path):
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / "model.pt").write_bytes(hostile_archive())
    out = subprocess.run([sys.executable, "-c", CHILD, str(repo), str(tmp_path / "bundle.json")], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["rc"] == [0, 0, 0, 0]
    assert doc["allow"] == ["a", "b"]  # the archive really was read
    assert doc["events"] == [] and doc["torch"] is False
    assert not (tmp_path / "PWNED").exists()


def test_the_hook_would_catch_an_unpickle(tmp_path):
    """The check above can fail: unpickling the same archive's data.pkl trips the hook."""
    code = CHILD.split("repo, out")[0] + (
        f"import zipfile, pickle\nzf = zipfile.ZipFile({str(tmp_path / 'a.pt')!r})\n"
        "try:\n    pickle.loads(zf.read('model/data.pkl'))\nexcept Exception:\n    pass\n"
        "print(events)\n")
    (tmp_path / "a.pt").write_bytes(hostile_archive())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "pickle.find_class" in out.stdout and "os.system" in out.stdout


def test_root_and_trimmer_sources_never_mention_unpickling():
    """No torch import, torch.load, pickle or marshal in the root or the trimmer library."""
    bad = []
    for pkg in ("root", "trimmer"):
        for path in (ROOT_DIR / pkg).glob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if any(tok in code
                       for tok in ("import torch", "from torch", "torch.load", "import pickle", "pickle.load",
                                               "import marshal", "import dill", "import joblib")):
                    bad.append(f"{path.relative_to(ROOT_DIR)}:{i}: {line.strip()}")
    assert not bad, bad


def test_default_binds_are_loopback(tmp_path):
    from leaf.config import LeafConfig, load_config as leaf_config
    from root.config import load_config as root_config

    minimal = tmp_path / "root.yaml"
    minimal.write_text(json.dumps({"partitions": {"p": {"replicas": ["http://127.0.0.1:9"]}}, "models": {"m": "p"}}))
    cfg = root_config(minimal)
    assert cfg.host == "127.0.0.1" and (cfg.admin_host, cfg.admin_port) == ("127.0.0.1", 9901)  # admin: loopback, apart
    assert LeafConfig().host == "127.0.0.1"
    # the shipped configs, validated in full: they expect the demo repository the leaf builds at build/demo-models
    shutil.copytree(ROOT_DIR / "configs", tmp_path / "configs")
    (tmp_path / "build" / "demo-models").mkdir(parents=True)
    assert root_config(tmp_path / "configs" / "root.yaml").host == "127.0.0.1"
    assert root_config(tmp_path / "configs" / "root-sidecar.yaml").host == "127.0.0.1"
    assert leaf_config(str(tmp_path / "configs" / "leaf.yaml")).host == "127.0.0.1"


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    port = free_port()
    mp = ManagedProcess("sink", [sys.executable, "-m", "loadtest.sink", "--port", str(port)],
                        f"http://127.0.0.1:{port}", tmp / "sink.log")
    mp.start()
    mp.wait_ready("/v2/health/ready", timeout=30)
    yield mp
    mp.stop(grace=2)


def _root(tmp: Path, name: str, sink_url: str, admin: dict) -> ManagedProcess:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(json.dumps({"partitions": {"p": {"replicas": [sink_url]}}, "models": {"m": "p"}, "admin": admin}))
    port = free_port()
    return start(name, ["root", "--config", str(cfg), "--port", str(port)], port, "/readyz", tmp, timeout=60)


def test_admin_endpoints_off(sink, tmp_path):
    root = _root(tmp_path, "root-noadmin", sink.url, {"enabled": False})
    try:
        assert _status(root.url + "/healthz") == 200
        for path in ("/metrics", "/admin/allowlists", "/admin/drift"):
            assert _status(root.url + path) == 404, path
    finally:
        root.stop()


def test_admin_endpoints_on_a_separate_listener(sink, tmp_path):
    aport = free_port()
    root = _root(tmp_path, "root-admin", sink.url, {"host": "127.0.0.1", "port": aport})
    admin = f"http://127.0.0.1:{aport}"
    try:
        for path in ("/metrics", "/admin/allowlists"):
            assert _status(root.url + path) == 404, path  # not on the service port
            assert _status(admin + path) == 200, path
        assert _status(admin + "/readyz") == 200
        assert _status(admin + "/v2/health/ready") == 404  # the service routes stay on the service port
    finally:
        root.stop()
