"""Version-less requests are trimmed the way users send them: real root, real leaf, the shipped configs.

Most clients never name a version; Triton, KServe and our leaf run the latest.
The root must resolve such a request to the version the upstream will run and
trim to it, leave the path unversioned for servers without versions (MLServer
answers `"versions": []` and 404s versioned paths), and count every untrimmed
forward with its reason. Oracles: the leaf called directly with the untrimmed
body (outputs must be bit-identical) and an independent `msgpack.packb` of the
kept features.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp
import msgpack
import pytest
import yaml

from loadtest.procs import ManagedProcess, free_port, start, trimmer_cmd
from trimmer.codec import decode_msgpack
from trimmer.repository import scan_repository
from promtext import scrape

ROOT_DIR = Path(__file__).resolve().parent.parent
MP = {"Content-Type": "application/msgpack"}


def packb(obj) -> bytes:
    """An independent msgpack encoding: typed tensors as ExtType 1 (docs/protocol.md), everything else as msgpack
    does."""
    from trimmer.tensor import Tensor

    return msgpack.packb(obj, use_bin_type=True,
                         default=lambda t: msgpack.ExtType(1, t.ext_payload()) if isinstance(t, Tensor) else t)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo repository with a second ranker version, a leaf, and roots from the shipped configs."""
    tmp = tmp_path_factory.mktemp("versions")
    repo = tmp / "models"
    subprocess.run(trimmer_cmd("leaf", "build-demo", "--out", str(repo), "--items", "2000"), check=True,
                   capture_output=True, timeout=300)
    scan = scan_repository(repo)
    lport = free_port()
    leaf = start("leaf", ["leaf", "--repo", str(repo), "--port", str(lport), "--max-batch-size", "1"], lport,
                 "/v2/health/ready", tmp, timeout=180)
    roots: dict[str, ManagedProcess] = {}
    try:
        for name in ("root.yaml", "root-sidecar.yaml"):
            doc = yaml.safe_load((ROOT_DIR / "configs" / name).read_text())
            # As shipped, except where this machine differs: the repository, the leaf's port, a free admin port.
            doc["repositories"] = [str(repo)]
            doc.pop("overrides", None)
            doc["watch"] = False
            for part in doc["partitions"].values():
                part["replicas"] = [leaf.url]
            doc["admin"] = {"port": free_port()}
            path = tmp / name
            path.write_text(yaml.safe_dump(doc))
            port = free_port()
            roots[name] = start(name, ["root", "--config", str(path), "--port", str(port)], port,
                                "/readyz", tmp, timeout=60)
            roots[name].admin = f"http://127.0.0.1:{doc['admin']['port']}"  # type: ignore[attr-defined]
        yield {"leaf": leaf, "roots": roots, "scan": scan, "repo": repo, "tmp": tmp}
    finally:
        for r in roots.values():
            r.stop()
        leaf.stop()


def _latest(scan, model: str) -> tuple[str, object]:
    versions = {v: mv for (m, v), mv in scan.versions.items() if m == model}
    v = max(versions, key=lambda s: (1, int(s)) if s.isdigit() else (0, s))
    return v, versions[v].signature


def _request(signature, extra: int = 40) -> dict:
    from loadtest.payload import make_request, universe_for_models

    return make_request(universe_for_models([signature], usage_ratio=0.3, seed=5), candidates=6, seed=5)


async def test_version_less_native_requests_are_trimmed_and_answer_as_the_leaf(demo):
    root = demo["roots"]["root.yaml"]
    for model in ("ranker", "retrieval"):
        version, sig = _latest(demo["scan"], model)
        req = _request(sig)
        assert set(req["features"]) > set(sig.input_names)
        body = packb(req)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{demo['leaf'].url}/v1/models/{model}/score", data=body, headers=MP) as r:
                assert r.status == 200
                direct = decode_msgpack(await r.read())
            before = scrape(root.admin, "trimmer_root_upstream_sent_bytes_total", model=model, version=version)
            async with s.post(f"{root.url}/v1/models/{model}/score", data=body, headers=MP) as r:
                assert r.status == 200, await r.read()
                via = decode_msgpack(await r.read())
        assert via["version"] == direct["version"] == version
        assert {k: v.to_numpy().tobytes() for k,
                v in via["outputs"].items()} == {k: v.to_numpy().tobytes() for k, v in direct["outputs"].items()}
        # Oracle: an independent packing of only the kept features, the request's other keys untouched.
        kept = {**req, "features": {k: v for k, v in req["features"].items() if k in set(sig.input_names)}}
        expected = len(packb(kept))
        sent = scrape(root.admin, "trimmer_root_upstream_sent_bytes_total", model=model, version=version) - before
        assert sent == expected, (model, sent, expected, len(body))


async def test_version_less_oip_requests_are_trimmed_through_the_sidecar_config(demo):
    root = demo["roots"]["root-sidecar.yaml"]
    version, sig = _latest(demo["scan"], "ranker")
    from loadtest.payload import make_request, universe_for_models

    req = make_request(universe_for_models([sig], usage_ratio=0.3, seed=9), candidates=4, seed=9)
    feats = req["features"]

    def oip(name, value):
        import numpy as np

        arr = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)
        dt = {"float32": "FP32", "float64": "FP64", "int64": "INT64",
              "int32": "INT32", "bool": "BOOL"}.get(str(arr.dtype))
        return None if dt is None else {"name": name, "shape": list(arr.shape), "datatype": dt,
                                        "data": arr.reshape(-1).tolist()}

    inputs = [t for t in (oip(n, v) for n, v in feats.items()) if t is not None]
    names = {t["name"] for t in inputs}
    assert set(sig.input_names) <= names and len(names) > len(sig.input_names)
    body = json.dumps({"id": "q", "inputs": inputs}).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{demo['leaf'].url}/v2/models/ranker/infer", data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            direct = await r.json()
        async with s.post(f"{root.url}/v2/models/ranker/infer", data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            via = await r.json()
    assert via["outputs"] == direct["outputs"]
    assert scrape(root.admin, "trimmer_root_features_dropped_total", model="ranker") > 0
    assert scrape(root.admin, "trimmer_root_untrimmed_forwards_total", model="ranker") == 0


def test_admin_shows_what_a_version_less_request_resolves_to(demo):
    with urllib.request.urlopen(demo["roots"]["root.yaml"].admin + "/admin/allowlists", timeout=10) as r:
        doc = json.loads(r.read())
    version, sig = _latest(demo["scan"], "ranker")
    wv = doc["models"]["ranker"]["without_version"]
    assert (wv["resolves_to"], wv["reason"], wv["names_version_upstream"]) == (version, "latest_version", False)
    assert doc["models"]["ranker"]["versions"][version]["features"] == sorted(sig.input_names)


@pytest.fixture(scope="module")
def mlserver_like(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unversioned")
    port = free_port()
    sink = ManagedProcess("sink", [sys.executable, "-m", "loadtest.sink", "--port", str(port), "--unversioned",
                                   "--oip-inputs", "mls=f1,f2"], f"http://127.0.0.1:{port}", tmp / "sink.log")
    sink.start()
    sink.wait_ready("/v2/health/ready", timeout=30)
    cfg = tmp / "root.yaml"
    aport = free_port()
    cfg.write_text(json.dumps({
        "admin": {"port": aport},
        "partitions": {"mls": {"replicas": [sink.url], "protocol": "oip", "versioned_paths": False,
                               "allowlists_from_metadata": {"models": ["mls"]}}},
        "models": {"mls": "mls"}}))
    rport = free_port()
    root = start("root", ["root", "--config", str(cfg), "--port", str(rport)], rport, "/readyz", tmp, timeout=60)
    root.admin = f"http://127.0.0.1:{aport}"  # type: ignore[attr-defined]
    try:
        yield {"root": root, "sink": sink}
    finally:
        root.stop()
        sink.stop()


async def test_an_unversioned_upstream_is_trimmed_from_its_metadata_on_unversioned_paths(mlserver_like):
    root = mlserver_like["root"]
    inputs = [{"name": n, "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]} for n in ("f1", "f2", "f3", "f4")]
    async with aiohttp.ClientSession() as s:
        async with s.post(root.url + "/v2/models/mls/infer", json={"id": "1", "inputs": inputs}) as r:
            assert r.status == 200, await r.text()
            out = await r.json()
    assert out["outputs"][0]["data"] == ["f1", "f2"]  # what the upstream received
    assert scrape(root.admin, "trimmer_root_features_dropped_total", model="mls") == 2
    assert scrape(root.admin, "trimmer_root_untrimmed_forwards_total", model="mls") == 0
