"""The root's routing, trim and fan-out in one process: the real handlers (root.app.build_apps) in front of
the real stand-in upstream (loadtest.sink.build_app) on loopback, both in the test's event loop.

Fast enough to run per mutant (`make mutate`), and every expected body comes from an independent oracle:
msgpack-python's encoding of the request with only the kept features, compared by sha256 with what the
upstream reports it received. The same behaviours are covered with real processes elsewhere.
"""

from __future__ import annotations

import hashlib
import json

import aiohttp
import msgpack
import msgspec
import pytest
from aiohttp import web

from loadtest.procs import free_port
from root.app import RootState, build_apps
from root.config import parse_config
from root.dataplane import fanout_status, target_keys, ModelRef
from loadtest.sink import build_app as sink_app
from trimmer.bundle import BUNDLE_FORMAT, BUNDLE_KIND
from trimmer.errors import PayloadError

MP = {"Content-Type": "application/msgpack"}
FEATURES = {"f1": 1, "f2": [2, 2], "f3": "three", "f4": 4.5, "f5": b"\x05" * 40, "f6": None, "f7": {"k": [7]}}
ALLOW = {("a", "1"): ["f1", "f2"], ("a", "2"): ["f1", "f2", "f3"], ("b", "1"): ["f3", "f4"], ("sh", "1"): ["f5"],
         ("offm", "1"): ["f6"], ("gamma", "1"): ["f1"], ("junk", "1"): ["f1"], ("oipm", "1"): ["x1"]}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def packed(doc: dict, allow: list[str] | None) -> bytes:
    """Independent oracle: the document without `models`, with only the allowlisted features (None: all)."""
    out = {}
    for k, v in doc.items():
        if k == "models":
            continue
        out[k] = v if k != "features" or allow is None else {n: x for n, x in v.items() if n in allow}
    return msgpack.packb(out)


@pytest.fixture
async def root(tmp_path):
    models: dict = {}
    for (m, v), names in ALLOW.items():
        models.setdefault(m, {"versions": {}})["versions"][v] = {"input_names": names, "output_names": ["score"]}
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"kind": BUNDLE_KIND, "format": BUNDLE_FORMAT, "models": models}))
    overrides = tmp_path / "allowlists.yaml"
    overrides.write_text("models:\n  sh:\n    mode: shadow\n  offm:\n    mode: off\n")
    sink = web.AppRunner(sink_app({"gamma"}, 0.0, {}, False, frozenset({"junk"})), access_log=None)
    await sink.setup()
    sport = free_port()
    await web.TCPSite(sink, "127.0.0.1", sport).start()
    sink_url = f"http://127.0.0.1:{sport}"
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = parse_config({
        "bundles": [str(bundle)], "overrides": str(overrides), "watch": False, "admin": {"on_service_port": True},
        "partitions": {"main": {"replicas": [sink_url]}, "dead": {"replicas": [dead]}},
        "models": {"a": {"partition": "main", "default_version": "1"}, "b": "main", "sh": "main", "offm": "main",
                   "nolist": "main", "gamma": "main", "junk": "main", "oipm": "main", "deadm": "dead"},
        "limits": {"max_fanout_targets": 4},
        "timeouts": {"request_s": 10, "connect_s": 1},
    }, str(tmp_path / "root.yaml"))
    state = RootState(cfg)
    await state.start()
    main, _ = build_apps(state)
    runner = web.AppRunner(main, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield {"url": f"http://127.0.0.1:{port}", "state": state}
    finally:
        await runner.cleanup()
        await state.stop()
        await sink.cleanup()


async def post(url: str, data: bytes, headers=MP) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=data, headers=headers) as r:
            raw = await r.read()
            return r.status, (
                msgspec.msgpack.decode(raw) if "msgpack" in r.headers.get("Content-Type", "") else json.loads(raw))


def sample(state, name: str, **labels: str) -> float:
    total = 0.0
    for fam in state.metrics.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_fanout_sends_each_target_exactly_its_allowlist(root):
    doc = {"request_id": "r", "models": [{"name": "a"}, {"name": "a", "version": "2"}, {"name": "b", "version": 1}],
           "features": FEATURES, "ctx": {"z": 1}}
    status, out = await post(root["url"] + "/v1/score", msgpack.packb(doc))
    assert status == 200 and out["errors"] == {}, out
    res = out["results"]
    assert set(res) == {"a/default", "a/2", "b"}
    assert res["a/default"]["body_sha256"] == sha(packed(doc, ALLOW[("a", "1")]))
    assert res["a/default"]["version"] == "1"  # the configured default, pinned on the path
    assert res["a/2"]["body_sha256"] == sha(packed(doc, ALLOW[("a", "2")])) and res["a/2"]["version"] == "2"
    # an int version named
    assert res["b"]["body_sha256"] == sha(packed(doc, ALLOW[("b", "1")])) and res["b"]["version"] == "1"
    st = root["state"]
    assert sample(st, "trimmer_root_features_dropped_total", model="a") == (7 - 2) + (7 - 3)
    assert sample(st, "trimmer_root_features_dropped_total", model="b") == 7 - 2
    assert sample(st, "trimmer_root_features_in_total", model="a") == 14
    assert sample(st, "trimmer_root_untrimmed_forwards_total") == 0


@pytest.mark.parametrize("model, reason", [("sh", "shadow"), ("offm", "mode_off"), ("nolist", "no_version")])
async def test_untrimmed_targets_get_the_whole_body_and_say_why(root, model, reason):
    doc = {"request_id": "u", "models": [{"name": model}], "features": FEATURES}
    status, out = await post(root["url"] + "/v1/score", msgpack.packb(doc))
    assert status == 200, out
    assert out["results"][model]["body_sha256"] == sha(packed(doc, None)), out["results"][model]
    assert sample(root["state"], "trimmer_root_untrimmed_forwards_total", reason=reason) == 1
    assert sample(root["state"], "trimmer_root_features_dropped_total") == 0
    shadow_dropped = sample(root["state"], "trimmer_root_shadow_features_dropped_total")
    assert shadow_dropped == (6 if model == "sh" else 0)


async def test_native_json_and_oip_routes_trim_exactly(root):
    doc = {"request_id": "n", "features": FEATURES}
    status, out = await post(root["url"] + "/v1/models/a/versions/2/score", msgpack.packb(doc))
    assert status == 200 and out["body_sha256"] == sha(packed(doc, ALLOW[("a", "2")]))
    jdoc = {"features": {"f3": 1, "f9": [1, 2]}, "id": "j"}
    status, out = await post(root["url"] + "/v1/models/b/score", json.dumps(jdoc).encode(),
                             {"Content-Type": "application/json"})
    assert status == 200 and out["features"] == ["f3"] and out["keys"] == ["features", "id"]
    assert out["body_sha256"] == sha(msgspec.json.encode({"features": {"f3": 1}, "id": "j"}))
    oip = {"id": "o", "inputs": [{"name": "x1", "datatype": "FP32", "shape": [1], "data": [1.0]},
                                 {"name": "x2", "datatype": "FP32", "shape": [1], "data": [2.0]}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(root["url"] + "/v2/models/oipm/infer", data=json.dumps(oip).encode(),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            got = await r.json()
    received = next(o for o in got["outputs"] if o["name"] == "received")["data"]
    assert received == ["x1"]


async def test_fanout_statuses(root):
    url = root["url"] + "/v1/score"

    async def fan(models: list) -> tuple[int, dict]:
        return await post(url, msgpack.packb({"models": models, "features": FEATURES}))

    status, out = await fan([{"name": "a"}, {"name": "gamma"}])  # one fails, one answers: 200 with both parts
    assert status == 200 and set(out["results"]) == {"a"} and out["errors"]["gamma"]["status"] == 500
    status, out = await fan([{"name": "gamma"}])  # all fail alike: their status
    assert status == 500 and out["results"] == {}
    status, out = await fan([{"name": "nope"}, {"name": "nope2"}])  # all 404: a 404
    assert status == 404 and out["results"] == {} and set(out["errors"]) == {"nope", "nope2"}
    status, out = await fan([{"name": "nope"}, {"name": "deadm"}])  # 404 + 503: a 502
    assert status == 502 and out["errors"]["deadm"]["status"] == 503
    status, out = await fan([{"name": "junk"}, {"name": "b"}])  # garbage from upstream: that target is a 502
    assert status == 200 and out["errors"]["junk"]["status"] == 502 and "undecodable" in out["errors"]["junk"]["error"]
    assert sample(root["state"], "trimmer_root_errors_total", model="junk", kind="bad_upstream_body") == 1


@pytest.mark.parametrize("models, needle", [
    ([{"name": "a"}, {"name": "a"}], "listed twice"),
    ([{"name": n} for n in "abcde"], "max_fanout_targets"),
    ([], "empty"),
    ("a", "must be a list"),
    ([{"name": "a", "colour": 1}], "must be a list"),
    ([{"name": "a"}, {"name": "a", "version": "default"}], "share the result key"),
    ([{"name": "../x"}], "model name"),
])
async def test_bad_fanout_requests_are_400(root, models, needle):
    status, out = await post(root["url"] + "/v1/score", msgpack.packb({"models": models, "features": FEATURES}))
    assert status == 400 and needle in out["error"], out


async def test_fanout_without_models_is_400(root):
    status, out = await post(root["url"] + "/v1/score", msgpack.packb({"features": FEATURES}))
    assert status == 400 and '"models"' in out["error"]


def test_target_keys_and_fanout_status_rules():
    refs = [ModelRef("a"), ModelRef("b", "1"), ModelRef("a", "2")]
    assert target_keys(refs) == ["a/default", "b", "a/2"]
    with pytest.raises(PayloadError):
        target_keys([ModelRef("a"), ModelRef("a", "default")])
    assert fanout_status({"x": {"status": 404}, "y": {"status": 404}}) == 404
    assert fanout_status({"x": {"status": 404}, "y": {"status": 400}}) == 400
    assert fanout_status({"x": {"status": 404}, "y": {"status": 503}}) == 502
    assert fanout_status({"x": {"status": 500}, "y": {"status": 503}}) == 502
    assert fanout_status({"x": {"status": 404}, "y": {"status": 500}}) == 502  # a 500 is not the client's fault
    assert fanout_status({"x": {"status": 499}, "y": {"status": 400}}) == 400
