"""`compile: true` on the leaf (leaf/compile.py): compiled and eager outputs agree, failures fall back.

Tolerance stated: compiled vs eager within rtol 1e-4, atol 1e-5 on float outputs (inductor may fuse and
reorder float ops; nothing else may change), integer outputs identical. The eager answer is the oracle.
Only the ranker is compiled here: inductor on CPU runs the system C++ compiler, tens of seconds per model
on a shared 2-core machine (an unrolled 50-step SSD takes minutes; see docs/leaf.md).
"""

from __future__ import annotations

import shutil
import urllib.request

import numpy as np
import pytest
import torch

from leaf import demo_models as dm
from leaf.compile import compile_module, warmup_inputs
from leaf.config import load_config
from leaf.convert import Converter
from loadtest.procs import free_port, start
from trimmer.codec import decode_msgpack, encode_msgpack
from trimmer.errors import ConfigError
from trimmer.signature import read_signature
from trimmer.tensor import Tensor

RTOL, ATOL = 1e-4, 1e-5


def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler on PATH (inductor on CPU needs one)"
    return None


needs_compile = pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("compilerepo") / "repo"
    torch.manual_seed(0)
    with torch.no_grad():
        dm._save(dm.Ranker().eval(), dm.RANKER_INPUTS, dm.RANKER_OUTPUTS, out, "ranker")
    return out


def ranker_args(rows: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 16, generator=g), 18 + 50 * torch.rand(rows, generator=g),
            torch.randint(0, 8, (rows,), generator=g),
            torch.randint(0, 10**6, (rows,), generator=g), torch.randn(rows, 16, generator=g),
            torch.randn(rows, generator=g), 100 * torch.rand(rows, generator=g), torch.rand(rows, generator=g)]


@needs_compile
def test_compiled_ranker_agrees_with_eager_within_tolerance(repo):
    path = repo / "ranker" / "2" / "model.pt2"
    module = torch.export.load(str(path)).module()
    conv = Converter(read_signature(path))
    compiled, info = compile_module(module, warmup_inputs(conv, torch.device("cpu")), "ranker")
    assert info["compiled"], info
    with torch.inference_mode():
        for rows, seed in ((256, 1), (3, 2), (1000, 3)):  # sizes other than the warm-up ones: dynamic shapes
            args = ranker_args(rows, seed)
            for got, want in zip(compiled(*args), module(*args)):
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_torchscript_and_broken_modules_fall_back_to_eager(repo):
    script = torch.jit.load(str(repo / "ranker" / "1" / "model.pt"))
    served, info = compile_module(script, [ranker_args(2, 0)], "ranker/1")
    assert served is script and not info["compiled"] and "TorchScript" in info["reason"]

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    b = Broken()
    served, info = compile_module(b, [[torch.zeros(2)]], "broken")
    assert served is b and not info["compiled"] and "boom" in info["reason"]


def test_compile_config_per_model(tmp_path):
    cfg = tmp_path / "leaf.yaml"
    cfg.write_text("compile: false\nmodels:\n  ranker:\n    compile: true\n    max_batch_size: 8\n  retrieval:\n    "
                   "max_batch_size: 4\n")
    c = load_config(str(cfg))
    assert c.compile_for("ranker") and not c.compile_for("retrieval") and not c.compile_for("other")
    assert c.batching_for("ranker").max_batch_size == 8
    cfg.write_text("models:\n  ranker:\n    compile: yes please\n")
    with pytest.raises(ConfigError, match="models.ranker.compile"):
        load_config(str(cfg))


@needs_compile
def test_leaf_with_compile_serves_compiled_pt2_and_eager_pt_alike(repo, tmp_path):
    cfg = tmp_path / "leaf.yaml"
    cfg.write_text(f"repo: {repo}\nmodels:\n  ranker:\n    compile: true\n")
    port = free_port()
    proc = start("leaf-compile", ["leaf", "--config", str(cfg), "--port", str(port), "--torch-threads", "1"], port,
                 "/v2/health/ready", tmp_path / "logs", timeout=600)
    try:
        args = ranker_args(64, 9)
        feats = {n: Tensor.from_numpy(t.numpy()) for n, t in zip(dm.RANKER_INPUTS, args)}
        # user features are one value per request (the leaf repeats them per candidate row)
        feats.update(user_dense=Tensor.from_numpy(args[0][0].numpy()), user_age=float(args[1][0]),
                     user_country=int(args[2][0]))
        outs = {}
        for v in ("1", "2"):
            req = urllib.request.Request(f"{proc.url}/v1/models/ranker/versions/{v}/score",
                                         data=encode_msgpack({"features": feats}),
                                         headers={"Content-Type": "application/msgpack"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                outs[v] = {k: t.to_numpy() for k, t in decode_msgpack(resp.read())["outputs"].items()}
        log = proc.log_tail(200)
    finally:
        proc.stop()
    assert "compile: ranker/2 compiled" in log, log
    assert "compile: ranker/1: serving eager" in log and "TorchScript" in log, log
    for name in dm.RANKER_OUTPUTS:  # v1 is eager TorchScript, v2 compiled: the eager answer is the oracle
        np.testing.assert_allclose(outs["2"][name], outs["1"][name], rtol=RTOL, atol=ATOL)
