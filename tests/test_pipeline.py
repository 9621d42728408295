"""Root pipelines (root/pipeline.py): retrieval -> item_features -> ranker -> diversifier in one request,
through a real root and a real leaf on loopback.

Oracle: the same chain run by hand against the leaf, each stage sent every client feature plus the mapped
outputs, untrimmed; the pipeline's answers must be the same values (trimming never changes an answer).
Each hop must be trimmed (the root's per-model metrics) and a failure must name its stage.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess

import aiohttp
import numpy as np
import pytest

from leaf import demo_models as dm
# the demo's feed pipeline: retrieval -> item_features -> ranker -> diversifier
from loadtest.pipeline_demo import STAGES
from loadtest.procs import free_port, start, trimmer_cmd
from root.config import parse_config
from trimmer.codec import decode_json, decode_msgpack, encode_json, encode_msgpack
from trimmer.errors import ConfigError
from trimmer.tensor import Tensor
from promtext import metric_sum as _metric

MP = {"Content-Type": "application/msgpack"}
MODELS = ("retrieval", "item_features", "ranker", "diversifier")
assert tuple(s["model"] for s in STAGES) == MODELS


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    repo = tmp / "models"
    subprocess.run(trimmer_cmd("leaf", "build-demo", "--out", str(repo), "--items", "3000"), check=True,
                   capture_output=True, timeout=600)
    lport = free_port()
    leaf = start("leaf", ["leaf", "--repo", str(repo), "--port", str(lport), "--torch-threads", "1"], lport,
                 "/v2/health/ready", tmp, timeout=180)
    cfg = {"repositories": [str(repo)], "admin": {"on_service_port": True},
           "partitions": {"leaves": {"replicas": [leaf.url]}},
           # a default version per model: requests naming none are trimmed to its allowlist (else: counted misses,
           # untrimmed)
           "models": {m: {"partition": "leaves", "default_version": "2"} for m in MODELS},
           "timeouts": {"request_s": 30},
           "pipelines": {"feed": {"stages": STAGES},
                         "broken": {"stages": [{"model": "retrieval"},
                                               {"model": "ranker", "inputs": {"cand_item_id": "retrieval.nope"}}]}}}
    path = tmp / "root.yaml"
    path.write_text(json.dumps(cfg))
    port = free_port()
    try:
        root = start("root", ["root", "--config", str(path), "--port", str(port)], port, "/readyz", tmp, timeout=60)
    except Exception:
        leaf.stop()
        raise
    yield {"leaf": leaf, "root": root}
    root.stop()
    leaf.stop()


def client_features(seed: int) -> dict:
    """What a feed request carries: user features, context nobody reads, and noise."""
    rng = np.random.default_rng(seed)
    cat = dm.make_catalogue(3000)
    users = dm.make_users(cat, 4, seed)
    i = int(rng.integers(0, 4))
    return {
        "user_recent_items": Tensor.from_numpy(users["user_recent_items"][i] % 3000),
        "user_dense": Tensor.from_numpy(users["user_dense"][i]),
        "user_country": int(users["user_country"][i]),
        "user_language": int(users["user_language"][i]),
        "query_content_class": -1,
        "user_age": 31.0,
        "ctx_hour_of_day": 9,
        "ctx_device_type": 2,
        "unused_blob": Tensor.from_numpy(rng.standard_normal(4096).astype(np.float32)),
        "unused_tag": "x" * 200,
    }


async def _post(s, url, body, headers=MP):
    async with s.post(url, data=body, headers=headers) as r:
        return r.status, await r.read()


async def chain_by_hand(s, leaf_url: str, features: dict) -> dict[str, dict]:
    """The oracle: each stage straight to the leaf, untrimmed."""
    outs: dict[str, dict] = {}
    for st in STAGES:
        feats = dict(features)
        for feat, ref in st.get("inputs", {}).items():
            src, name = ref.split(".", 1)
            feats[feat] = outs[src][name]
        status, body = await _post(s, f"{leaf_url}/v1/models/{st['model']}/score", encode_msgpack({"features": feats}))
        assert status == 200, body[:300]
        outs[st["model"]] = decode_msgpack(body)["outputs"]
    return outs


async def test_pipeline_end_to_end_matches_the_chain_by_hand_and_trims_every_hop(stack):
    leaf, root = stack["leaf"], stack["root"]
    async with aiohttp.ClientSession() as s:
        async with s.get(root.url + "/metrics") as r:
            before = await r.text()
        for seed in (1, 2, 3):
            feats = client_features(seed)
            want = await chain_by_hand(s, leaf.url, feats)
            status, body = await _post(s, root.url + "/v1/pipelines/feed/score",
                                       encode_msgpack({"request_id": f"r{seed}", "features": feats}))
            assert status == 200, body[:400]
            doc = decode_msgpack(body)
            assert doc["pipeline"] == "feed" and doc["request_id"] == f"r{seed}" and list(doc["stages"]) == list(MODELS)
            for model in MODELS:
                got = doc["stages"][model]["outputs"]
                assert set(got) == set(want[model]), model
                for name, t in want[model].items():
                    assert np.array_equal(got[name].to_numpy(), t.to_numpy()), (model, name)
            slate = doc["outputs"]["slate"].to_numpy()
            real = slate[slate >= 0]
            assert len(real) == min(dm.SLATE_K, dm.TOP_K) and len(set(real.tolist())) == len(
                real) and real.max() < dm.TOP_K
        # the same request gzip-encoded: read like a scoring route's body (decoded within the limits), same answer
        status, body = await _post(s, root.url + "/v1/pipelines/feed/score",
                                   gzip.compress(encode_msgpack({"request_id": "gz", "features": feats})),
                                   {**MP, "Content-Encoding": "gzip"})
        assert status == 200, body[:400]
        assert np.array_equal(decode_msgpack(body)["outputs"]["slate"].to_numpy(), slate)
        # the same pipeline in JSON: every hop in JSON, same answer
        status, body = await _post(s, root.url + "/v1/pipelines/feed/score", encode_json({"features": feats}),
                                   {"Content-Type": "application/json"})
        assert status == 200, body[:400]
        assert np.array_equal(decode_json(body)["outputs"]["slate"].to_numpy(), slate)
        async with s.get(root.url + "/metrics") as r:
            after = await r.text()
    for model in MODELS:
        sent = _metric(after, "trimmer_root_requests_total", model=model) - _metric(
            before, "trimmer_root_requests_total", model=model)
        dropped = (_metric(after, "trimmer_root_features_dropped_total", model=model)
                   - _metric(before, "trimmer_root_features_dropped_total", model=model))
        trimmed = _metric(after, "trimmer_root_trimmed_bytes_total", model=model) - _metric(
            before, "trimmer_root_trimmed_bytes_total", model=model)
        untrimmed = (_metric(after, "trimmer_root_untrimmed_bytes_total", model=model)
                     - _metric(before, "trimmer_root_untrimmed_bytes_total", model=model))
        assert sent == 5, (model, sent)  # 3 msgpack + 1 gzip msgpack + 1 JSON request
        assert dropped >= 5 * 4, (model, dropped)  # at least ctx_*, unused_blob, unused_tag dropped at every hop
        assert 0 < trimmed < untrimmed, (model, trimmed, untrimmed)
    assert _metric(after, "trimmer_root_pipeline_requests_total", pipeline="feed", outcome="ok") >= 5


async def test_pipeline_errors_name_the_failing_stage(stack):
    root = stack["root"]
    async with aiohttp.ClientSession() as s:
        feats = client_features(5)
        del feats["user_recent_items"]  # retrieval needs it: stage 1 fails
        status, body = await _post(s, root.url + "/v1/pipelines/feed/score", encode_msgpack({"features": feats}))
        doc = json.loads(body)
        assert status == 400 and doc["stage"] == "retrieval" and "stage 1/4 'retrieval'" in doc["error"] \
            and "user_recent_items" in doc["error"]
        feats = client_features(5)
        feats["user_age"] = "old"  # only the ranker reads it: stages 1 and 2 pass, stage 3 fails
        status, body = await _post(s, root.url + "/v1/pipelines/feed/score", encode_msgpack({"features": feats}))
        doc = json.loads(body)
        assert status == 400 and doc["stage"] == "ranker" and "stage 3/4 'ranker'" in doc["error"] \
            and "user_age" in doc["error"]
        status, body = await _post(s, root.url + "/v1/pipelines/broken/score",
                                   encode_msgpack({"features": client_features(5)}))
        doc = json.loads(body)
        assert status == 502 and doc["stage"] == "ranker" and "'nope'" in doc["error"] and "item_ids" in doc["error"]
        status, body = await _post(s, root.url + "/v1/pipelines/nosuch/score", encode_msgpack({"features": {}}))
        assert status == 404 and "feed" in json.loads(body)["error"]
        status, body = await _post(s, root.url + "/v1/pipelines/feed/score", b"\xc1garbage")
        assert status == 400 and "error" in json.loads(body)


def _cfg(pipelines) -> dict:
    return {"partitions": {"p": {"replicas": ["http://127.0.0.1:1"]}},
            "models": {m: "p" for m in MODELS}, "pipelines": pipelines}


@pytest.mark.parametrize("pipelines, needle", [
    ({"feed": {"stages": []}}, "non-empty list"),
    ({"feed": {"stages": [{"model": "nosuch"}]}}, "'nosuch' is not in models"),
    ({"feed": {"stages": [{"model": "ranker", "inputs": {"cand_item_id": "retrieval.item_ids"}}]}}, "first stage"),
    ({"feed": {"stages": [{"model": "retrieval"},
                          {"model": "ranker", "inputs": {"cand_item_id": "diversifier.slate"}}]}}, "no earlier stage"),
    ({"feed": {"stages": [{"model": "retrieval"}, {"model": "retrieval"}]}}, "appears twice"),
    ({"feed": {"stages": [{"model": "retrieval", "oops": 1}]}}, "unknown key"),
    ({"feed": {"stages": [{"model": "retrieval"}, {"model": "ranker", "inputs": {"cand_item_id": "retrieval"}}]}},
     "<earlier stage>.<output>"),
    ({"feed": {"stages": [{"model": "oipmodel"}]}}, "pipeline stages need native partitions"),
])
def test_pipeline_config_errors_are_one_line(pipelines, needle):
    cfg = _cfg(pipelines)
    cfg["partitions"]["o"] = {"replicas": ["http://127.0.0.1:2"], "protocol": "oip"}
    cfg["models"]["oipmodel"] = "o"
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_config(cfg)


def test_pipeline_config_parses_stages_and_mappings():
    cfg = parse_config(_cfg({"feed": {"stages": STAGES}}))
    feed = cfg.pipelines["feed"]
    assert [s.model for s in feed.stages] == list(MODELS)
    assert ("cand_score", "ranker", "score") in feed.stages[3].inputs
