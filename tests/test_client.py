"""trimmer.client against a real leaf (demo models) and a real root in front of it, on loopback.

Oracles: the leaf's own answer to a body encoded independently of the client (Tensor.from_numpy +
trimmer.codec, sent with urllib), decoded by trimmer.codec; the native and OIP routes must agree
with each other and with the client, directly and through the trimming root.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request

import numpy as np
import pytest

from loadtest.procs import free_port, start, trimmer_cmd
from trimmer import codec
from trimmer.client import AsyncClient, Client, ClientError, decode_infer, encode_features, oip_input
from trimmer.errors import TrimmerError
from trimmer.repository import scan_repository
from trimmer.tensor import Tensor

NP = {"bool": np.bool_, "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
      "float16": np.float16, "float32": np.float32, "float64": np.float64}
CANDIDATES = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    repo = tmp / "models"
    subprocess.run(trimmer_cmd("leaf", "build-demo", "--out", str(repo), "--items", "3000"), check=True,
                   capture_output=True, timeout=240)
    scan = scan_repository(repo)
    lport = free_port()
    leaf = start("leaf", ["leaf", "--repo", str(repo), "--port", str(lport), "--max-batch-size", "1"], lport,
                 "/v2/health/ready", tmp, timeout=180)
    root = None
    try:
        cfg = {"repositories": [str(repo)], "partitions": {"leaves": {"replicas": [leaf.url]}},
               "models": {m: "leaves" for m, _ in scan.versions}, "timeouts": {"request_s": 30}}
        (tmp / "root.yaml").write_text(json.dumps(cfg))
        rport = free_port()
        root = start("root", ["root", "--config", str(tmp / "root.yaml"), "--port", str(rport)], rport,
                     "/readyz", tmp, timeout=60)
        yield {"leaf": leaf, "root": root, "scan": scan}
    finally:
        if root is not None:
            root.stop()
        leaf.stop()


def features_for(sig, seed: int) -> dict:
    """numpy values for every input the signature declares, plus unused features of every other kind."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    for name in sig.input_names:
        spec = sig.inputs[name]
        shape = tuple(CANDIDATES if d == -1 else d for d in spec.shape)
        dt = NP[spec.dtype]
        if np.issubdtype(dt, np.floating):
            out[name] = rng.standard_normal(shape).astype(dt)
        elif dt is np.bool_:
            out[name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            out[name] = rng.integers(0, 100, shape).astype(dt)
    out.update({"unused_str": "red shoes", "unused_list": [1, 2, 3], "unused_scalar": 3.5,
                "unused_col": np.arange(CANDIDATES, dtype=np.int64)})
    return out


def raw_score(url: str, model: str, version: str, features: dict) -> dict:
    """The oracle: encode without the client (numpy -> Tensor by hand), POST with urllib, decode with the codec."""
    body = codec.encode_msgpack(
        {"features": {k: Tensor.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in features.items()}})
    req = urllib.request.Request(f"{url}/v1/models/{model}/versions/{version}/score", data=body,
                                 headers={"Content-Type": "application/msgpack"})
    with urllib.request.urlopen(req, timeout=30) as r:
        doc = codec.decode(r.read(), r.headers["Content-Type"])
    return {k: v.to_numpy() for k, v in doc["outputs"].items()}


def same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


def test_encode_features_matches_hand_encoding() -> None:
    f = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": 7, "s": "x", "l": [1.5, 2.5], "z": np.float64(2.0)}
    hand = codec.encode_msgpack({"request_id": "r",
                                 "features": {"a": Tensor.from_numpy(f["a"]), "b": 7, "s": "x", "l": [1.5, 2.5],
                                                                 "z": Tensor.from_numpy(np.asarray(2.0))}})
    assert encode_features(f, request_id="r") == hand
    doc = codec.decode(encode_features(f, "application/json"), "application/json")
    assert doc["features"]["a"] == Tensor.from_numpy(f["a"])


def test_torch_tensors_encode_like_numpy() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert encode_features({"a": t}) == encode_features({"a": t.numpy()})
    bf = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    doc = codec.decode(encode_features({"b": bf}), "application/msgpack")
    assert doc["features"]["b"].dtype == "bfloat16" and bytes(doc["features"]["b"].data) == bf.view(
        torch.int16).numpy().tobytes()


def test_oip_input_shapes_and_types() -> None:
    assert oip_input("x", np.array([[1, 2], [3, 4]], dtype=np.int32)) == {"name": "x", "datatype": "INT32",
                                                                          "shape": [2, 2], "data": [1, 2, 3, 4]}
    assert oip_input("s", ["a", "b"])["datatype"] == "BYTES"
    assert oip_input("f", 2.5) == {"name": "f", "datatype": "FP64", "shape": [], "data": [2.5]}


def test_decode_infer_takes_a_datatype_that_is_no_string_as_unknown() -> None:
    # was a TypeError (an unhashable datatype used as a dict key); an unknown datatype keeps the values as sent
    body = json.dumps({"outputs": [{"name": "s", "datatype": ["FP32"], "shape": [2], "data": [1.5, 2.5]}]}).encode()
    assert decode_infer(body).outputs["s"].tolist() == [1.5, 2.5]


@pytest.mark.parametrize("target", ["leaf", "root"])
@pytest.mark.parametrize("content_type", ["application/msgpack", "application/json"])
def test_sync_score_matches_the_leaf(stack, target: str, content_type: str) -> None:
    with Client(stack[target].url, content_type=content_type, max_connections=2) as c:
        for (model, version), mv in sorted(stack["scan"].versions.items()):
            feats = features_for(mv.signature, seed=len(model) + int(version))
            r = c.score(model, feats, version=version, request_id="abc")
            assert (r.model, r.version, r.request_id) == (model, version, "abc")
            same(r.outputs, raw_score(stack["leaf"].url, model, version, feats))


@pytest.mark.parametrize("target", ["leaf", "root"])
def test_sync_infer_matches_native(stack, target: str) -> None:
    with Client(stack[target].url) as c:
        for (model, version), mv in sorted(stack["scan"].versions.items()):
            feats = features_for(mv.signature, seed=3)
            inputs = {n: feats[n] for n in mv.signature.input_names}
            inputs["unused_extra"] = np.zeros(CANDIDATES, np.float32)  # the root trims it; the leaf ignores it
            r = c.infer(model, inputs, version=version, id="q1")
            assert r.id == "q1" and r.model == model
            same(r.outputs, raw_score(stack["leaf"].url, model, version, feats))


def test_torch_features_through_the_root(stack) -> None:
    torch = pytest.importorskip("torch")
    (model, version), mv = sorted(stack["scan"].versions.items())[0]
    feats = features_for(mv.signature, seed=5)
    as_torch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in feats.items()}
    with Client(stack["root"].url) as c:
        same(c.score(model, as_torch, version=version).outputs, raw_score(stack["leaf"].url, model, version, feats))


def test_signature_over_http(stack) -> None:
    with Client(stack["root"].url) as c:
        for (model, version), mv in sorted(stack["scan"].versions.items()):
            sig = c.signature(model, version)
            assert list(sig) == list(mv.signature.input_names)
            for name, spec in sig.items():
                assert spec["shape"] == list(mv.signature.inputs[name].shape)


def test_errors_are_one_line(stack) -> None:
    with Client(stack["root"].url) as c:
        with pytest.raises(ClientError) as ei:
            c.score("no_such_model", {"a": 1})
        assert ei.value.status == 404 and "no_such_model" in ei.value.message
        assert c.ready()
    with pytest.raises(TrimmerError):
        Client("not a url")
    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as c:
        with pytest.raises(ClientError) as ei:
            c.score("m", {"a": 1})
        assert ei.value.status == 0
        assert not c.ready()


async def test_async_client_concurrent_through_the_root(stack) -> None:
    items = sorted(stack["scan"].versions.items())
    feats = {key: features_for(mv.signature, seed=i) for i, (key, mv) in enumerate(items)}
    async with AsyncClient(stack["root"].url, max_connections=2) as c:
        results = await asyncio.gather(*(c.score(m, feats[(m, v)], version=v) for _ in range(3) for (m, v), _ in items))
        infer = await c.infer(items[0][0][0], {n: feats[items[0][0]][n] for n in items[0][1].signature.input_names},
                              version=items[0][0][1])
        sig = await c.signature(items[0][0][0], items[0][0][1])
        with pytest.raises(ClientError) as ei:
            await c.score("no_such_model", {"a": 1})
        assert ei.value.status == 404
    for r, ((m, v), _) in zip(results, [x for _ in range(3) for x in items]):
        same(r.outputs, raw_score(stack["leaf"].url, m, v, feats[(m, v)]))
    same(infer.outputs, raw_score(stack["leaf"].url, items[0][0][0], items[0][0][1], feats[items[0][0]]))
    assert list(sig) == list(items[0][1].signature.input_names)
