"""The leaf as a real process on a loopback port, serving the real demo repository.

One demo build and one leaf per module keep this fast; a second leaf on a private repo covers hot
pick-up and a broken version.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import lz4.frame
import numpy as np
import pytest
import zstandard

from loadtest.payload import make_request, universe_for_models
from loadtest.procs import free_port, start
from trimmer.codec import decode_msgpack, encode_json, encode_msgpack
from trimmer.signature import read_signature
from trimmer.tensor import Tensor

from leaf import demo_models as dm

N_ITEMS = 50_000
MSGPACK = {"Content-Type": "application/msgpack"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("leafrepo") / "repo"
    dm.build_demo(out, n_items=N_ITEMS, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def leaf(repo, tmp_path_factory):
    port = free_port()
    # concurrent requests may share batches here; test_batched_results_equal_one_by_one uses its own leaf for exact
    # batching
    proc = start("leaf", ["leaf", "--repo", str(repo), "--port", str(port), "--max-queue-delay-ms", "30",
                          "--torch-threads", "1"], port, "/v2/health/ready", tmp_path_factory.mktemp("logs"))
    yield proc.url
    proc.stop()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or MSGPACK, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def score(url: str, model: str, features: dict, version: str | None = None, **extra) -> dict:
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + "/score"
    status, body = post(url + path, encode_msgpack({**extra, "features": features}))
    assert status == 200, body
    out = decode_msgpack(body)
    return {k: v.to_numpy() for k, v in out["outputs"].items()}


def ranker_features(seed: int, candidates: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "user_dense": Tensor.from_numpy(rng.standard_normal(16).astype(np.float32)),
        "user_age": float(rng.integers(18, 70)),
        "user_country": int(rng.integers(0, dm.N_COUNTRIES)),
        "cand_item_id": Tensor.from_numpy(rng.integers(0, 10**6, candidates)),
        "cand_emb": Tensor.from_numpy(rng.standard_normal((candidates, 16)).astype(np.float32)),
        "cand_ctr": Tensor.from_numpy(rng.standard_normal(candidates).astype(np.float32)),
        "cand_age_hours": Tensor.from_numpy((rng.random(candidates) * 100).astype(np.float32)),
        "cand_price": Tensor.from_numpy(rng.random(candidates).astype(np.float32)),
        "unused_thing": "x",
    }


def retrieval_features(users: dict, i: int) -> dict:
    return {
        "user_recent_items": Tensor.from_numpy(users["user_recent_items"][i]),
        "user_dense": Tensor.from_numpy(users["user_dense"][i]),
        "user_country": int(users["user_country"][i]),
        "user_language": int(users["user_language"][i]),
        "query_content_class": int(users["query_content_class"][i]),
    }


def items(repo: Path) -> dict:
    return dict(np.load(repo / ".demo" / "items.npz"))


def test_ready_lists_every_version_and_metadata(leaf):
    status, body = get(leaf + "/v2/health/ready")
    assert status == 200 and body["models"] == ["diversifier/1", "diversifier/2", "item_features/1", "item_features/2",
                                                 "ranker/1", "ranker/2", "retrieval/1", "retrieval/2"]
    assert body["failed"] == {}
    status, meta = get(leaf + "/v2/models/ranker")
    assert status == 200 and meta["version"] == "2" and meta["platform"] == "pytorch_export"
    assert [i["name"] for i in meta["inputs"]] == list(dm.RANKER_INPUTS)
    assert meta["outputs"][0] == {"name": "score", "datatype": "FP32", "shape": [-1]}
    status, meta = get(leaf + "/v2/models/retrieval/versions/1")
    assert meta["platform"] == "pytorch_torchscript" and meta["outputs"][0]["shape"] == [dm.TOP_K]
    assert get(leaf + "/v2/models/retrieval/versions/1/ready")[0] == 200
    assert get(leaf + "/v2/health/live")[0] == 200


def test_retrieval_recall_against_exact_search_over_eligible_items(leaf, repo):
    cat = items(repo)
    emb = cat["emb"]
    users = dm.make_users({**dm.make_catalogue(N_ITEMS), "topic": np.arange(N_ITEMS) % dm.NLIST}, 60, seed=4242)
    recalls = []
    for i in range(60):
        out = score(leaf, "retrieval", retrieval_features(users, i))
        c, lang, k = int(users["user_country"][i]), int(users["user_language"][i]), int(users["query_content_class"][i])
        ok = cat["countries"][:, c] & cat["languages"][:, lang] & ((cat["classes"] == k) if k >= 0 else True)
        exact = emb @ out["user_embedding"]
        exact[~ok] = -np.inf
        truth = set(np.argsort(-exact)[: dm.TOP_K].tolist())
        got = out["item_ids"]
        assert ok[got[got >= 0]].all(), "retrieval returned an ineligible item"
        recalls.append(len(truth & set(got.tolist())) / dm.TOP_K)
    assert np.mean(recalls) >= 0.9, recalls


def test_bloom_filter_never_excludes_an_eligible_item(repo):
    cat = items(repo)
    bits, masks = cat["bits"], cat["token_masks"]
    for c in range(dm.N_COUNTRIES):
        for lang in range(dm.N_LANGUAGES):
            for k in range(-1, dm.N_CLASSES):
                q = masks[c] | masks[dm.N_COUNTRIES + lang]
                if k >= 0:
                    q = q | masks[dm.N_COUNTRIES + dm.N_LANGUAGES + k]
                passed = ((bits & q) == q).all(axis=1)
                eligible = cat["countries"][:, c] & cat["languages"][:, lang] & (
                    (cat["classes"] == k) if k >= 0 else True)
                assert passed[eligible].all(), (c, lang, k)
                assert passed.sum() <= eligible.sum() * 1.05  # and it does filter


def test_model_index_holds_the_bloom_signatures(repo):
    import torch

    cat = items(repo)
    with pytest.warns(DeprecationWarning):
        m = torch.jit.load(str(repo / "retrieval" / "1" / "model.pt"))
    ids, bits = m.cluster_ids.numpy(), m.cluster_bits.numpy()
    valid = ids >= 0
    assert valid.sum() == N_ITEMS and np.array_equal(np.sort(ids[valid]), np.arange(N_ITEMS))
    assert np.array_equal(bits[valid], cat["bits"][ids[valid]])
    assert np.array_equal(m.token_masks.numpy(), cat["token_masks"])


def test_pt_and_pt2_give_the_same_outputs(leaf, repo):
    users = dm.make_users(dm.make_catalogue(N_ITEMS), 5, seed=7)
    for i in range(5):
        a = score(leaf, "retrieval", retrieval_features(users, i), version="1")
        b = score(leaf, "retrieval", retrieval_features(users, i), version="2")
        assert np.array_equal(a["item_ids"], b["item_ids"])
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)
        f = ranker_features(i, 17)
        a, b = score(leaf, "ranker", f, version="1"), score(leaf, "ranker", f, version="2")
        np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["task_logits"], b["task_logits"], rtol=1e-5, atol=1e-5)


def _batch_stats(url: str, model: str) -> tuple[float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("trimmer_leaf_batch_size_sum", "trimmer_leaf_batch_size_count"):
            if line.startswith(key + "{") and f'model="{model}"' in line and 'version="2"' in line:
                vals[key] = float(line.rsplit(" ", 1)[1])
    return vals.get("trimmer_leaf_batch_size_sum", 0.0), vals.get("trimmer_leaf_batch_size_count", 0.0)


async def test_batched_results_equal_one_by_one(leaf, repo, tmp_path):
    """Twelve concurrent requests per model on a leaf that dispatches a batch only when 12 are queued (the
    queue delay is far longer than the test): exactly one batch per model, no timing involved. The answers
    equal the module leaf's answers to the same requests one at a time."""
    users = dm.make_users(dm.make_catalogue(N_ITEMS), 12, seed=99)
    jobs = [("ranker", ranker_features(100 + i, 5 + 7 * i)) for i in range(12)]
    jobs += [("retrieval", retrieval_features(users, i)) for i in range(12)]
    alone = [score(leaf, m, f) for m, f in jobs]
    cfg = tmp_path / "leaf.yaml"
    cfg.write_text(json.dumps({"models": {m: {"max_batch_size": 12, "max_queue_delay_ms": 120000}
                                          for m in ("ranker", "retrieval")}}))
    port = free_port()
    batching = start("leaf-batch12",
                     ["leaf", "--config", str(cfg), "--repo", str(repo), "--port", str(port), "--torch-threads", "1"],
                     port, "/v2/health/ready", tmp_path)
    try:
        together = await _together(batching.url, jobs)
    finally:
        batching.stop()
    for m in ("ranker", "retrieval"):
        assert together[1][m] == (12.0, 1.0), f"{m}: {together[1][m]} (requests, batches)"
    _same_outputs(jobs, alone, together[0])


async def _together(leaf: str, jobs: list) -> tuple[list, dict]:
    """Send every job at once; (outputs, {model: (requests, batches) this leaf ran})."""
    before = {m: _batch_stats(leaf, m) for m in ("ranker", "retrieval")}

    async def one(session: aiohttp.ClientSession, model: str, features: dict) -> dict:
        async with session.post(f"{leaf}/v1/models/{model}/score",
                                data=encode_msgpack({"features": features}), headers=MSGPACK) as r:
            assert r.status == 200, await r.text()
            return {k: v.to_numpy() for k, v in decode_msgpack(await r.read())["outputs"].items()}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        together = await asyncio.gather(*(one(s, m, f) for m, f in jobs))
    stats = {}
    for m in ("ranker", "retrieval"):
        (s0, c0), (s1, c1) = before[m], _batch_stats(leaf, m)
        stats[m] = (s1 - s0, c1 - c0)
    return together, stats


def _same_outputs(jobs: list, alone: list, together: list) -> None:
    for (m, _), a, b in zip(jobs, alone, together):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].shape == b[k].shape
            if a[k].dtype.kind in "iu":
                assert np.array_equal(a[k], b[k]), (m, k)
            else:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=f"{m}.{k}")


def test_compressed_requests_and_json(leaf):
    f = ranker_features(3, 9)
    plain = score(leaf, "ranker", f)
    body = encode_msgpack({"features": f})
    for enc, data in (("lz4", lz4.frame.compress(body)), ("zstd", zstandard.ZstdCompressor().compress(body))):
        status, out = post(leaf + "/v1/models/ranker/score", data, {**MSGPACK, "Content-Encoding": enc})
        assert status == 200, out
        np.testing.assert_array_equal(decode_msgpack(out)["outputs"]["score"].to_numpy(), plain["score"])
    status, out = post(leaf + "/v1/models/ranker/score", encode_json({"request_id": "r9", "features": f}),
                       {"Content-Type": "application/json"})
    assert status == 200
    obj = json.loads(out)
    assert obj["request_id"] == "r9" and obj["outputs"]["score"]["$tensor"]["shape"] == [9]


def test_oip_infer_matches_native(leaf):
    f = ranker_features(5, 4)
    native = score(leaf, "ranker", f, version="1")
    inputs = []
    for name in dm.RANKER_INPUTS:
        v = f[name]
        arr = v.to_numpy() if isinstance(v, Tensor) else np.asarray(v)
        dt = {"float32": "FP32", "int64": "INT64"}[str(arr.dtype) if arr.dtype != np.float64 else "float32"]
        inputs.append({"name": name, "shape": list(arr.shape), "datatype": dt, "data": arr.reshape(-1).tolist()})
    status, body = post(leaf + "/v2/models/ranker/versions/1/infer", json.dumps({"id": "x", "inputs": inputs}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 200, body
    out = json.loads(body)
    assert out["id"] == "x" and out["outputs"][0]["name"] == "score"
    np.testing.assert_allclose(out["outputs"][0]["data"], native["score"], rtol=1e-6)


def _metric_lines(url: str, prefix: str) -> list[str]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return [ln for ln in resp.read().decode().splitlines() if ln.startswith(prefix)]


def test_unused_and_defaulted_features_are_counted_per_feature(leaf):
    f = ranker_features(8, 3)
    del f["cand_price"], f["user_age"]
    f["drift_probe_feature"] = 1.0
    score(leaf, "ranker", f, version="1")
    unused = _metric_lines(leaf, "trimmer_leaf_features_unused_by_feature_total")
    assert any(
        'feature="drift_probe_feature"' in ln and 'model="ranker"' in ln and 'version="1"' in ln for ln in unused)
    defaulted = _metric_lines(leaf, "trimmer_leaf_inputs_defaulted_by_feature_total")
    assert any('feature="cand_price"' in ln and 'version="1"' in ln for ln in defaulted)
    assert any('feature="user_age"' in ln for ln in defaulted)
    assert _metric_lines(leaf, "trimmer_leaf_inputs_defaulted_total")


def test_audit_copies_stay_out_of_drift_counters(leaf):
    f = ranker_features(9, 3)
    del f["cand_price"]
    f["audit_only_probe_feature"] = 1.0
    path = leaf + "/v1/models/ranker/versions/1/score"
    status, _ = post(path, encode_msgpack({"features": f}), {**MSGPACK, "X-Trimmer-Audit": "1"})
    assert status == 200
    assert not any(
        "audit_only_probe_feature" in ln for ln in _metric_lines(leaf, "trimmer_leaf_features_unused_by_feature_total"))
    # the same request without the header is counted: the check above can fail
    status, _ = post(path, encode_msgpack({"features": f}))
    assert status == 200
    assert any(
        "audit_only_probe_feature" in ln for ln in _metric_lines(leaf, "trimmer_leaf_features_unused_by_feature_total"))


def test_payload_generator_requests_are_served(leaf, repo):
    sigs = [read_signature(repo / m / "1" / "model.pt") for m in ("ranker", "retrieval")]
    universe = universe_for_models(sigs, usage_ratio=0.2)
    req = make_request(universe, candidates=32, seed=3)
    for model in ("ranker", "retrieval"):
        status, body = post(f"{leaf}/v1/models/{model}/score", encode_msgpack(req))
        assert status == 200, body


def _good() -> dict:
    return ranker_features(1, 4)


BAD = [
    ("missing every required feature is named",
     lambda f: {k: v for k, v in f.items() if k not in ("cand_emb", "cand_item_id")},
     400, ["cand_item_id", "cand_emb"]),
    ("wrong dtype", lambda f: {**f, "cand_ctr": Tensor.from_numpy(np.zeros(4, np.float64))},
     400, ["cand_ctr", "float32"]),
    ("wrong shape", lambda f: {**f, "cand_emb": Tensor.from_numpy(np.zeros((4, 8), np.float32))},
     400, ["cand_emb", "[C, 16]"]),
    ("string for a tensor", lambda f: {**f, "user_dense": "abc"}, 400, ["user_dense", "string"]),
    ("float list for int ids", lambda f: {**f, "cand_item_id": [1.5, 2.0, 3.0, 4.0]}, 400,
     ["cand_item_id", "floating"]),
    ("ragged list", lambda f: {**f, "user_dense": [[1.0], [1.0, 2.0]]}, 400, ["user_dense"]),
    ("candidate counts disagree",
     lambda f: {**f, "cand_ctr": Tensor.from_numpy(np.zeros(5, np.float32))}, 400, ["cand_ctr", "5"]),
    ("out of range int", lambda f: {**f, "user_country": 2**63 + 5}, 400, ["user_country"]),
    ("zero candidates", lambda f: {**{k: v for k, v in f.items() if not k.startswith("cand_")},
                                   "cand_item_id": Tensor.from_numpy(np.zeros(0, np.int64)),
                                   "cand_emb": Tensor.from_numpy(np.zeros((0, 16), np.float32)),
                                   "cand_ctr": Tensor.from_numpy(np.zeros(0, np.float32))}, 400, ["zero candidates"]),
]


@pytest.mark.parametrize("name,mutate,status,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_features_get_400_naming_the_feature(leaf, name, mutate, status, needles):
    code, body = post(leaf + "/v1/models/ranker/score", encode_msgpack({"features": mutate(_good())}))
    assert code == status, body
    err = json.loads(body)["error"]
    for n in needles:
        assert n in err, err


RAW_BAD = [
    ("/v1/models/nope/score", encode_msgpack({"features": {}}), MSGPACK, 404),
    ("/v1/models/ranker/versions/9/score", encode_msgpack({"features": {}}), MSGPACK, 404),
    ("/v1/models/ranker/score", b"{}", {"Content-Type": "text/plain"}, 415),
    ("/v1/models/ranker/score", b"\xc1\xc1", MSGPACK, 400),
    ("/v1/models/ranker/score", encode_msgpack([1, 2]), MSGPACK, 400),
    ("/v1/models/ranker/score", b"[1", {"Content-Type": "application/json"}, 400),
    ("/v1/models/ranker/score", b"garbage", {**MSGPACK, "Content-Encoding": "lz4"}, 400),
    ("/v1/models/ranker/score", b"garbage", {**MSGPACK, "Content-Encoding": "zstd"}, 400),
    ("/v1/models/ranker/score", b"x", {**MSGPACK, "Content-Encoding": "compress"}, 415),
    ("/v2/models/ranker/infer", b'{"inputs": 3}', {"Content-Type": "application/json"}, 400),
    ("/v2/models/ranker/infer", b'{"inputs": [{"name": "cand_ctr", "shape": [2], "datatype": "FP99", "data": [1, 2]}]}',
     {"Content-Type": "application/json"}, 400),
    ("/v2/models/ranker/infer", b'{"inputs": [{"name": "cand_ctr", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}',
     {"Content-Type": "application/json"}, 400),
    ("/v2/models/nope/infer", b'{"inputs": []}', {"Content-Type": "application/json"}, 404),
]


@pytest.mark.parametrize("path,body,headers,status", RAW_BAD, ids=[f"{i}-{r[3]}" for i, r in enumerate(RAW_BAD)])
def test_bad_requests_get_json_4xx(leaf, path, body, headers, status):
    code, out = post(leaf + path, body, headers)
    assert code == status, out
    assert json.loads(out)["error"]
    assert get(leaf + "/v2/models/nope")[0] == 404


def test_hot_pickup_and_failed_version_reported(repo, tmp_path):
    private = tmp_path / "repo"
    (private / "ranker" / "1").mkdir(parents=True)
    shutil.copy(repo / "ranker" / "1" / "model.pt", private / "ranker" / "1" / "model.pt")
    (private / "broken" / "1").mkdir(parents=True)
    (private / "broken" / "1" / "model.pt").write_bytes(b"not a zip archive")
    port = free_port()
    proc = start("leaf-hot", ["leaf", "--repo", str(private), "--port", str(port)], port, "/v2/health/ready", tmp_path)
    try:
        status, body = get(proc.url + "/v2/health/ready")
        assert status == 200 and body["models"] == ["ranker/1"] and "broken/1" in body["failed"]
        status, body = get(proc.url + "/v2/models/broken/ready")
        assert status == 503 and "not a valid zip" in body["error"]
        assert post(proc.url + "/v1/models/broken/score", encode_msgpack({"features": {}}))[0] == 503
        assert any('model="broken"' in ln and ln.endswith(" 0.0")
                   for ln in _metric_lines(proc.url, "trimmer_leaf_model_ready"))
        (private / "ranker" / "3").mkdir()
        shutil.copy(repo / "ranker" / "1" / "model.pt", private / "ranker" / "3" / "model.pt")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and get(proc.url + "/v2/models/ranker/versions/3/ready")[0] != 200:
            time.sleep(0.2)
        assert get(proc.url + "/v2/models/ranker/versions/3/ready")[0] == 200
        out = decode_msgpack(
            post(proc.url + "/v1/models/ranker/score", encode_msgpack({"features": ranker_features(2, 3)}))[1])
        assert out["version"] == "3"  # no version -> highest
    finally:
        proc.stop()
