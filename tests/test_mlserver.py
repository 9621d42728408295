"""Optional: Seldon MLServer itself behind the root (an unversioned upstream, trimmed from its metadata).

MLServer answers model metadata with `"versions": []` and 404s every versioned
path; the root must trim from that metadata and keep paths unversioned. CI
does not install MLServer (its dependency set is large and pins its own web
stack), so this test runs only where an `mlserver` executable is found: on
PATH or in $MLSERVER_BIN (e.g. `python -m venv /tmp/mls && /tmp/mls/bin/pip
install mlserver`, then MLSERVER_BIN=/tmp/mls/bin/mlserver). The stand-in
that always runs is `loadtest.sink --unversioned` (tests/test_versions.py).
"""

from __future__ import annotations

import json
import os
import shutil

import aiohttp
import pytest

from loadtest.procs import ManagedProcess, free_port, start

MLSERVER = os.environ.get("MLSERVER_BIN") or shutil.which("mlserver")
pytestmark = pytest.mark.skipif(not MLSERVER,
                                reason="MLServer not installed (set MLSERVER_BIN or put mlserver on PATH); "
                                                    "the faithful stand-in in test_versions.py covers the same "
                                                    "behaviour")

RUNTIME = '''
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class Echo(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        names = [i.name for i in payload.inputs]
        return InferenceResponse(model_name=self.name, outputs=[
            ResponseOutput(name="received", datatype="BYTES", shape=[len(names)], data=names)])
'''


@pytest.fixture(scope="module")
def mlserver_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlserver")
    models = tmp / "models"
    (models / "echo").mkdir(parents=True)
    (models / "echo" / "runtime.py").write_text(RUNTIME)
    (models / "echo" / "model-settings.json").write_text(json.dumps({
        "name": "echo", "implementation": "runtime.Echo",
        "inputs": [{"name": "f1", "datatype": "FP32", "shape": [-1]},
                   {"name": "f2", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "received", "datatype": "BYTES", "shape": [-1]}]}))
    port = free_port()
    (models / "settings.json").write_text(json.dumps({"http_port": port, "grpc_port": free_port(),
                                                      "metrics_port": free_port(),
                                                     "parallel_workers": 0, "host": "127.0.0.1"}))
    mls = ManagedProcess("mlserver", [MLSERVER, "start", "."], f"http://127.0.0.1:{port}",
                         tmp / "mlserver.log", cwd=models)
    mls.start()
    root = None
    try:
        mls.wait_ready("/v2/models/echo/ready", timeout=120)
        aport = free_port()
        (tmp / "root.yaml").write_text(json.dumps({
            "admin": {"port": aport},
            "partitions": {"mls": {"replicas": [mls.url], "protocol": "oip", "versioned_paths": False,
                                   "allowlists_from_metadata": {"models": ["echo"]}}},
            "models": {"echo": "mls"}}))
        rport = free_port()
        root = start("root", ["root", "--config", str(tmp / "root.yaml"), "--port", str(rport)], rport,
                     "/readyz", tmp, timeout=60)
        yield {"root": root, "admin": f"http://127.0.0.1:{aport}", "mlserver": mls}
    finally:
        if root is not None:
            root.stop()
        mls.stop()


async def test_mlserver_is_trimmed_from_its_metadata_on_unversioned_paths(mlserver_root):
    inputs = [{"name": n, "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]} for n in ("f1", "f2", "f3", "f4")]
    async with aiohttp.ClientSession() as s:
        async with s.get(mlserver_root["mlserver"].url + "/v2/models/echo") as r:
            assert (await r.json())["versions"] == []  # the premise: MLServer serves it without versions
        async with s.post(mlserver_root["root"].url + "/v2/models/echo/infer", json={"inputs": inputs}) as r:
            assert r.status == 200, await r.text()
            out = await r.json()
        assert out["outputs"][0]["data"] == ["f1", "f2"]  # what MLServer received: only its declared inputs
        async with s.get(mlserver_root["admin"] + "/metrics") as r:
            text = await r.text()
    untrimmed = [line for line in text.splitlines() if line.startswith("trimmer_root_untrimmed_forwards_total{")
                 and 'model="echo"' in line]
    assert all(line.endswith(" 0.0") for line in untrimmed), untrimmed
