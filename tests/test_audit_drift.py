"""Equivalence audit and allowlist drift report, with a real leaf (demo models) and real roots on loopback.

One leaf; an overrides file that gives retrieval version 1 a deliberately wrong
allowlist (it omits `user_dense`, an input with a default, so the leaf silently
runs on the default and the answer changes) and turns trimming off for ranker
version 1. Root `audit` samples every trimmed request; root `plain` never
audits, so ranker version 2 only ever reaches the leaf trimmed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import msgspec
import numpy as np
import pytest
import yaml

from loadtest.payload import make_request, universe_for_models
from loadtest.procs import free_port, start, trimmer_cmd
from root.audit import compare_outputs
from root.config import parse_config
from trimmer.codec import encode_json, encode_msgpack
from trimmer.errors import ConfigError
from trimmer.repository import scan_repository
from trimmer.tensor import Tensor
from promtext import metric_sum

MP = {"Content-Type": "application/msgpack"}
JS = {"Content-Type": "application/json"}
RETRIEVAL_WRONG = ["user_recent_items", "user_country", "user_language", "query_content_class"]  # no user_dense


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auditdrift")
    repo = tmp / "models"
    subprocess.run(trimmer_cmd("leaf", "build-demo", "--out", str(repo), "--items", "3000"), check=True,
                   capture_output=True, timeout=240)
    scan = scan_repository(repo)
    assert "user_dense" in scan.versions[("retrieval", "1")].signature.input_names
    assert scan.versions[("retrieval", "1")].signature.inputs["user_dense"].has_default
    overrides = tmp / "allowlists.yaml"
    overrides.write_text(yaml.safe_dump({
        "defaults": {"mode": "enforce"},
        "models": {"retrieval": {"versions": {"1": {"allowlist": RETRIEVAL_WRONG}}},
                   "ranker": {"versions": {"1": {"mode": "off"}}}},
    }))
    lport = free_port()
    leaf = start("leaf", ["leaf", "--repo", str(repo), "--port", str(lport)], lport,
                 "/v2/health/ready", tmp, timeout=180)
    roots = {}
    try:
        for name, extra in (("audit", {"audit_sample_rate": 1.0, "audit_max_concurrent": 64}), ("plain", {})):
            cfg = {"repositories": [str(repo)], "overrides": str(overrides), "watch": False,
                   "admin": {"on_service_port": True}, "partitions": {"leaves": {"replicas": [leaf.url]}},
                   "models": {"ranker": "leaves", "retrieval": "leaves"}, "timeouts": {"request_s": 30}, **extra}
            path = tmp / f"root-{name}.yaml"
            path.write_text(json.dumps(cfg))
            port = free_port()
            roots[name] = start(f"root-{name}", ["root", "--config", str(path), "--port", str(port)], port,
                                "/readyz", tmp, timeout=60)
        yield {"leaf": leaf, "roots": roots, "scan": scan, "tmp": tmp}
    finally:
        for r in roots.values():
            r.stop()
        leaf.stop()


def request(stack, model: str, version: str, seed: int) -> dict:
    sig = stack["scan"].versions[(model, version)].signature
    return make_request(universe_for_models([sig], usage_ratio=0.25, seed=seed), candidates=8, seed=seed)


async def post(s: aiohttp.ClientSession, url: str, data: bytes, headers=MP) -> tuple[int, bytes]:
    async with s.post(url, data=data, headers=headers) as r:
        return r.status, await r.read()


async def metric(s: aiohttp.ClientSession, root, name: str, **labels: str) -> float:
    async with s.get(root.url + "/metrics") as r:
        return metric_sum(await r.text(), name, **labels)


async def wait_audits(s, root, version: str, n: int) -> dict[str, float]:
    """Poll until n audits of retrieval/<version> finished (bounded: 20 s)."""
    lab = {"model": "retrieval", "version": version}
    deadline = time.monotonic() + 20
    while True:
        got = {k: await metric(s, root, f"trimmer_root_audit_{k}_total", **lab)
               for k in ("matches", "near_matches", "mismatches", "errors")}
        if sum(got.values()) >= n or time.monotonic() > deadline:
            got["run"] = await metric(s, root, "trimmer_root_audits_total", **lab)
            return got
        await asyncio.sleep(0.1)


def to_oip(features: dict) -> list[dict]:
    oip = {"int64": "INT64", "float32": "FP32"}
    out = []
    for name, v in features.items():
        if isinstance(v, Tensor) and v.dtype in oip:
            arr = v.to_numpy()
            out.append(
                {"name": name, "datatype": oip[v.dtype], "shape": list(arr.shape), "data": arr.reshape(-1).tolist()})
    return out


async def test_wrong_allowlist_is_caught_as_a_mismatch(stack):
    leaf, root = stack["leaf"], stack["roots"]["audit"]
    path = "/v1/models/retrieval/versions/1/score"
    async with aiohttp.ClientSession() as s:
        for seed in range(4):
            body = encode_msgpack(request(stack, "retrieval", "1", seed))
            status, via = await post(s, root.url + path, body)
            assert status == 200, via[:300]
            status, direct = await post(s, leaf.url + path, body)
            assert status == 200 and via != direct  # the wrong allowlist really changes the answer
        # one JSON request and one OIP request: the comparison handles every answer encoding
        req = request(stack, "retrieval", "1", 9)
        status, _ = await post(s, root.url + path, encode_json(req), JS)
        assert status == 200
        oip = json.dumps({"inputs": to_oip(req["features"])}).encode()
        status, out = await post(s, root.url + "/v2/models/retrieval/versions/1/infer", oip, JS)
        assert status == 200, out[:300]
        got = await wait_audits(s, root, "1", 6)
        async with s.get(root.url + "/admin/audit") as r:
            assert r.status == 200
            doc = await r.json()
    assert got == {"matches": 0, "near_matches": 0, "mismatches": 6, "errors": 0, "run": 6}, got
    recent = [m for m in doc["recent_mismatches"] if m["model"] == "retrieval" and m["version"] == "1"]
    assert len(recent) == 6 and doc["sample_rate"] == 1.0
    outs = {o["name"]: o for o in recent[-1]["outputs"]}
    assert "user_embedding" in outs and outs["user_embedding"]["reason"] == "values" \
        and outs["user_embedding"]["max_abs_diff"] > 0
    assert "user_dense" in recent[-1]["dropped_features"]
    # logged with its outputs
    assert "audit MISMATCH retrieval version 1" in (stack["tmp"] / "root-audit.log").read_text()


async def test_correct_allowlist_gives_zero_mismatches(stack):
    root = stack["roots"]["audit"]
    async with aiohttp.ClientSession() as s:
        for seed in range(4):
            req = request(stack, "retrieval", "2", seed)
            status, out = await post(s, root.url + "/v1/models/retrieval/versions/2/score", encode_msgpack(req))
            assert status == 200, out[:300]
        fan = encode_msgpack({"models": [{"name": "retrieval", "version": "2"}], **request(stack, "retrieval", "2", 5)})
        status, out = await post(s, root.url + "/v1/score", fan)
        assert status == 200 and msgspec.msgpack.decode(out)["errors"] == {}
        oip = json.dumps({"inputs": to_oip(request(stack, "retrieval", "2", 6)["features"])}).encode()
        status, out = await post(s, root.url + "/v2/models/retrieval/versions/2/infer", oip, JS)
        assert status == 200, out[:300]
        got = await wait_audits(s, root, "2", 6)
        plain = await metric(s, stack["roots"]["plain"], "trimmer_root_audits_total")
    # bit-identical, or float noise from the leaf batching the two copies differently (audit_tolerance)
    assert got["matches"] + got["near_matches"] == 6 and got["mismatches"] == 0 and got["errors"] == 0 \
        and got["run"] == 6, got
    assert plain == 0  # audit_sample_rate defaults to 0


def test_compare_outputs_reports_what_differs():
    a = {"s": Tensor.from_numpy(np.array([1.0, 2.0, 3.0], np.float32)),
         "k": Tensor.from_numpy(np.array([1, 2], np.int64))}
    same = {"s": Tensor.from_numpy(np.array([1.0, 2.0, 3.0], np.float32)),
            "k": Tensor.from_numpy(np.array([1, 2], np.int64))}
    assert compare_outputs(a, same) == []
    b = {"s": Tensor.from_numpy(np.array([1.0, 2.5, 3.0], np.float32)),
         "k": Tensor.from_numpy(np.array([1, 2], np.int32)), "extra": 1}
    diffs = {d.name: d for d in compare_outputs(a, b)}
    assert diffs["s"].reason == "values" and diffs["s"].max_abs_diff == 0.5 and diffs["s"].differing == 1
    assert diffs["k"].reason == "dtype" and diffs["extra"].reason == "missing_trimmed"
    noise = {"s": Tensor.from_numpy(np.array([1.0, 2.0000002, 3.0], np.float32)), "k": a["k"]}
    d = compare_outputs(a, noise, tolerance=1e-5)
    # 0 = bit for bit
    assert len(d) == 1 and d[0].within_tolerance and not compare_outputs(a, noise)[0].within_tolerance
    tol = {d.name: d for d in compare_outputs(a, b, tolerance=1e-5)}
    assert tol["s"].max_abs_diff == 0.5 and not tol["s"].within_tolerance  # 0.5 is far beyond a 1e-5 tolerance
    z = {"s": Tensor.from_numpy(np.array([0.0], np.float32))}
    # bit for bit
    assert compare_outputs(z, {"s": Tensor.from_numpy(np.array([-0.0], np.float32))})[0].reason == "values"


@pytest.mark.parametrize("value", [-0.1, 1.5, "half", True])
def test_audit_sample_rate_is_validated(value):
    with pytest.raises(ConfigError, match="audit_sample_rate"):
        parse_config({"partitions": {"p": {"replicas": ["http://127.0.0.1:1"]}}, "audit_sample_rate": value})


async def test_drift_report_untrimmed_vs_trimmed(stack):
    root = stack["roots"]["plain"]
    async with aiohttp.ClientSession() as s:
        for version in ("1", "2"):  # ranker 1: mode off (untrimmed); ranker 2: enforce
            for seed in range(3):
                status, out = await post(s, root.url + f"/v1/models/ranker/versions/{version}/score",
                                         encode_msgpack(request(stack, "ranker", version, seed)))
                assert status == 200, out[:300]
        status, out = await post(s, root.url + "/v1/models/retrieval/versions/1/score",
                                 encode_msgpack(request(stack, "retrieval", "1", 1)))
        assert status == 200
        async with s.get(root.url + "/admin/drift") as r:
            assert r.status == 200
            doc = await r.json()
    assert doc["replicas_ok"] == 1 and doc["replicas_failed"] == 0 \
        and doc["replicas"][0]["replica"] == stack["leaf"].url
    off, trimmed = doc["models"]["ranker"]["1"], doc["models"]["ranker"]["2"]
    assert off["mode"] == "off" and off["requests"] >= 3 and off["sent_but_unused"] and off["sent_but_unused_count"] > 0
    assert "ctx_hour_of_day" in off["sent_but_unused"] or len(off["sent_but_unused"]) >= 3
    assert trimmed["mode"] == "enforce" and trimmed["requests"] >= 3
    assert trimmed["sent_but_unused"] == {} and trimmed["sent_but_unused_count"] == 0
    wrong = doc["models"]["retrieval"]["1"]
    assert "user_dense" in wrong["needed_but_defaulted"] and wrong["defaulted_not_in_allowlist"] == ["user_dense"]


def test_drift_cli(stack):
    root, leaf = stack["roots"]["plain"], stack["leaf"]
    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "trimmer", "drift", *a], capture_output=True, text=True,
                              timeout=60)
    table = run("--root", root.url)
    assert table.returncode == 0, table.stderr
    assert "ranker" in table.stdout and "1 replica(s) answered, 0 failed" in table.stdout
    raw = run("--root", root.url, "--json")
    assert raw.returncode == 0 and "ranker" in json.loads(raw.stdout)["models"]
    for args, text in (((f"http://127.0.0.1:{free_port()}",), "cannot reach the root"), ((leaf.url,), "answered 404"),
                       (("not-a-url",), "expected a URL")):
        bad = run("--root", *args)
        assert bad.returncode == 2 and text in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


async def test_drift_reports_an_unreachable_replica(stack, tmp_path):
    """A second partition whose only replica is down: the report names it and still covers the live leaf."""
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = {"repositories": [str(stack["tmp"] / "models")], "watch": False,
           "admin": {"on_service_port": True},
           "partitions": {"leaves": {"replicas": [stack["leaf"].url]}, "gone": {"replicas": [dead]}},
           "models": {"ranker": "leaves", "retrieval": "gone"}}
    path = tmp_path / "root.yaml"
    path.write_text(json.dumps(cfg))
    port = free_port()
    root = start("root-dead", ["root", "--config", str(path), "--port", str(port)], port,
                 "/healthz", tmp_path, timeout=60)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(root.url + "/admin/drift") as r:
                assert r.status == 200
                doc = await r.json()
    finally:
        root.stop()
    assert doc["replicas_ok"] == 1 and doc["replicas_failed"] == 1
    failed = [r for r in doc["replicas"] if not r["ok"]]
    assert failed[0]["replica"] == dead and failed[0]["partition"] == "gone" and failed[0]["error"]
    assert "ranker" in doc["models"]


async def test_audits_over_the_cap_are_dropped_and_counted(tmp_path):
    """audit_max_concurrent 1: of six audits sampled while the first one's re-send is held upstream, one runs and
    five are dropped; the one that runs compares two real answers and matches. No timing: the upstream (a gate
    in the test, tests/upstreams.py) holds requests until the test lets them through."""
    from trimmer.bundle import BUNDLE_FORMAT, BUNDLE_KIND
    from upstreams import Gate

    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"kind": BUNDLE_KIND, "format": BUNDLE_FORMAT, "models": {
        "m": {"default_version": "1", "versions": {"1": {"input_names": ["f1"], "output_names": ["score"]}}}}}))
    gate = Gate(hold=lambda features: len(features) > 1)  # only the audit's untrimmed re-sends wait
    root = None
    try:
        cfg = {"bundles": [str(bundle)], "watch": False, "admin": {"on_service_port": True},
               "partitions": {"p": {"replicas": [gate.url]}},
               "models": {"m": "p"}, "audit_sample_rate": 1.0, "audit_max_concurrent": 1, "timeouts": {"request_s": 60}}
        path = tmp_path / "root.yaml"
        path.write_text(json.dumps(cfg))
        port = free_port()
        root = start("root-cap", ["root", "--config", str(path), "--port", str(port)], port,
                     "/readyz", tmp_path, timeout=60)
        body = encode_msgpack({"features": {"f1": 1, "f2": 2, "f3": 3}})
        async with aiohttp.ClientSession() as s:
            answers = await asyncio.gather(*(post(s, root.url + "/v1/models/m/score", body) for _ in range(6)))
            assert all(st == 200 for st, _ in answers)

            async def audit() -> dict:
                async with s.get(root.url + "/admin/audit") as r:
                    return await r.json()

            deadline = time.monotonic() + 30
            doc = await audit()
            while (doc["counts"]["sampled"], doc["counts"]["dropped"]) != (6, 5) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                doc = await audit()
            c = doc["counts"]
            assert (c["sampled"], c["dropped"], doc["in_flight"]) == (6, 5, 1), doc  # the one audit is held upstream
            gate.open(1)  # let it finish
            deadline = time.monotonic() + 30
            while await metric(s, root, "trimmer_root_audit_matches_total", model="m", version="1") < 1 \
                and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            async with s.get(root.url + "/admin/audit") as r:
                doc = await r.json()
            dropped = await metric(s, root, "trimmer_root_audits_dropped_total", model="m", version="1")
            matches = await metric(s, root, "trimmer_root_audit_matches_total", model="m", version="1")
    finally:
        if root is not None:
            root.stop()
        gate.close()
    c = doc["counts"]
    assert c["sampled"] == 6 and c["run"] == 1 and c["dropped"] == 5 and doc["in_flight"] == 0, doc
    assert dropped == 5 and matches == 1
    assert gate.posts == 7  # six trimmed requests and one untrimmed audit re-send
