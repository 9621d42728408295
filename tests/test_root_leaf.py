"""Real root processes in front of a real leaf with the demo models, on loopback.

Outputs through the trimming root must be bit-identical to the leaf's outputs
for the untrimmed payload, for every demo model and version, natively, through
the fan-out and over OIP v2; with compression, a dead replica and a bundle
replaced while requests flow.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest

from loadtest.payload import make_request, universe_for_models
from loadtest.procs import free_port, start, trimmer_cmd
from trimmer.bundle import build_bundle, write_bundle
from trimmer.codec import encode_msgpack
from trimmer.repository import scan_repository
from trimmer.tensor import Tensor

MP = {"Content-Type": "application/msgpack"}
WIRE_TO_OIP = {"bool": "BOOL", "int8": "INT8", "uint8": "UINT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
               "float16": "FP16", "float32": "FP32", "float64": "FP64"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import subprocess

    tmp = tmp_path_factory.mktemp("rootleaf")
    repo = tmp / "models"
    subprocess.run(trimmer_cmd("leaf", "build-demo", "--out", str(repo), "--items", "3000"), check=True,
                   capture_output=True, timeout=240)
    bundle = tmp / "bundle.json"
    write_bundle(build_bundle([repo]), bundle)
    lport = free_port()
    leaf = start("leaf", ["leaf", "--repo", str(repo), "--port", str(lport), "--max-batch-size", "1"], lport,
                 "/v2/health/ready", tmp, timeout=180)
    scan = scan_repository(repo)
    models = sorted({m for m, _ in scan.versions})
    roots = {}
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        for name, source, compression, replicas in (
            ("repo", {"repositories": [str(repo)]}, "none", [leaf.url]),
            ("lz4", {"bundles": [str(bundle)]}, "lz4", [dead, leaf.url]),
            ("zstd", {"bundles": [str(bundle)]}, "zstd", [leaf.url]),
        ):
            cfg = {**source, "admin": {"on_service_port": True},
                   "partitions": {"leaves": {"replicas": replicas, "compression": compression,
                                             "balance": "round_robin"}},
                   "models": {m: "leaves" for m in models}, "timeouts": {"request_s": 30}}
            path = tmp / f"root-{name}.yaml"
            path.write_text(json.dumps(cfg))
            port = free_port()
            roots[name] = start(f"root-{name}", ["root", "--config", str(path), "--port", str(port)], port,
                                "/readyz", tmp, timeout=60)
        yield {"leaf": leaf, "roots": roots, "scan": scan, "bundle": bundle, "tmp": tmp}
    finally:
        for r in roots.values():
            r.stop()
        leaf.stop()


def payload(sig, seed: int) -> dict:
    return make_request(universe_for_models([sig], usage_ratio=0.25, seed=seed), candidates=8, seed=seed)


async def post(s: aiohttp.ClientSession, url: str, data: bytes, headers=MP) -> tuple[int, bytes]:
    async with s.post(url, data=data, headers=headers) as r:
        return r.status, await r.read()


async def test_every_demo_model_bit_identical_through_the_root(stack):
    leaf = stack["leaf"]
    async with aiohttp.ClientSession() as s:
        for (model, version), mv in sorted(stack["scan"].versions.items()):
            req = payload(mv.signature, seed=int(version) * 10 + len(model))
            assert set(req["features"]) > set(mv.signature.input_names)  # the payload carries unused features
            body = encode_msgpack(req)
            path = f"/v1/models/{model}/versions/{version}/score"
            status, direct = await post(s, leaf.url + path, body)
            assert status == 200, direct[:300]
            for name, root in stack["roots"].items():
                status, via = await post(s, root.url + path, body)
                assert status == 200, (name, via[:300])
                assert via == direct, (model, version, name)
            # fan-out: the leaf's bytes are embedded verbatim
            fan = encode_msgpack({"models": [{"name": model, "version": version}], **req})
            status, out = await post(s, stack["roots"]["repo"].url + "/v1/score", fan)
            assert status == 200
            doc = msgspec.msgpack.decode(out, type=dict[str, dict[str, msgspec.Raw]])
            assert doc["errors"] == {} and bytes(doc["results"][model]) == direct


async def test_bytes_actually_trimmed(stack):
    root = stack["roots"]["repo"]
    async with aiohttp.ClientSession() as s:
        async with s.get(root.url + "/metrics") as r:
            text = await r.text()
    sent = untrimmed = 0.0
    for line in text.splitlines():
        if line.startswith("trimmer_root_upstream_sent_bytes_total{"):
            sent += float(line.rsplit(" ", 1)[1])
        if line.startswith("trimmer_root_untrimmed_bytes_total{"):
            untrimmed += float(line.rsplit(" ", 1)[1])
    assert 0 < sent < untrimmed


def to_oip(features: dict) -> list[dict]:
    out = []
    for name, v in features.items():
        if isinstance(v, Tensor):
            arr = v.to_numpy()
            out.append({"name": name, "datatype": WIRE_TO_OIP[v.dtype], "shape": list(arr.shape),
                        "data": arr.reshape(-1).tolist()})
        elif isinstance(v, str):
            out.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [v]})
        elif isinstance(v, list):
            out.append({"name": name, "datatype": "INT64", "shape": [len(v)], "data": v})
        elif isinstance(v, float):
            out.append({"name": name, "datatype": "FP64", "shape": [], "data": [v]})
        else:
            out.append({"name": name, "datatype": "INT64", "shape": [], "data": [v]})
    return out


async def test_oip_end_to_end(stack):
    leaf, root = stack["leaf"], stack["roots"]["repo"]
    async with aiohttp.ClientSession() as s:
        for (model, version), mv in sorted(stack["scan"].versions.items()):
            req = payload(mv.signature, seed=7)
            doc = json.dumps({"id": "q1", "inputs": to_oip(req["features"])}).encode()
            path = f"/v2/models/{model}/versions/{version}/infer"
            status, direct = await post(s, leaf.url + path, doc, {"Content-Type": "application/json"})
            assert status == 200, direct[:300]
            status, via = await post(s, root.url + path, doc, {"Content-Type": "application/json"})
            assert status == 200, via[:300]
            assert via == direct
        async with s.get(root.url + f"/v2/models/{model}") as r:
            assert r.status == 200 and (await r.json())["name"] == model
        async with s.get(root.url + f"/v2/models/{model}/ready") as r:
            assert r.status == 200


async def test_fanout_with_one_failing_model_returns_the_others(stack):
    sigs = {m: mv.signature for (m, v), mv in stack["scan"].versions.items() if v == "1"}
    req = make_request(universe_for_models(sigs.values(), seed=3), candidates=8, seed=3)
    refs = [{"name": m, "version": "1"} for m in sorted(sigs)] + [{"name": "ranker", "version": "99"}]
    async with aiohttp.ClientSession() as s:
        status, out = await post(s, stack["roots"]["repo"].url + "/v1/score", encode_msgpack({"models": refs, **req}))
    doc = msgspec.msgpack.decode(out)
    assert status == 200
    assert set(doc["results"]) == {"ranker/1"} | (set(sigs) - {"ranker"}) and all(
        "outputs" in r for r in doc["results"].values())
    assert list(doc["errors"]) == ["ranker/99"] and doc["errors"]["ranker/99"]["status"] == 404


async def test_dead_replica_fails_over_and_bundle_replacement_loses_nothing(stack):
    """The lz4 root has a dead first replica (round robin) and reads a bundle we keep replacing."""
    root, bundle = stack["roots"]["lz4"], stack["bundle"]
    (model, version), mv = sorted(stack["scan"].versions.items())[0]
    body = encode_msgpack(payload(mv.signature, seed=11))
    path = f"/v1/models/{model}/versions/{version}/score"
    original = json.loads(bundle.read_text())
    async with aiohttp.ClientSession() as s:
        status, expected = await post(s, stack["leaf"].url + path, body)
        assert status == 200
        stop = asyncio.Event()
        bad: list = []
        done = [0]

        async def client() -> int:
            n = 0
            while not stop.is_set() and n < 1000:
                status, out = await post(s, root.url + path, body)
                if status != 200 or out != expected:
                    bad.append((status, out[:200]))
                n += 1
                done[0] += 1
            return n

        async def reloads() -> int:
            async with s.get(root.url + "/admin/allowlists") as r:
                return (await r.json())["sources"][0]["reloads"]

        async def until(pred, what: str) -> None:  # polling with a generous deadline, no fixed sleeps
            deadline = time.monotonic() + 30
            while not await pred() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert await pred(), what

        tasks = [asyncio.create_task(client()) for _ in range(3)]
        for i in range(5):
            seen, served = await reloads(), done[0]
            original["created_unix"] = int(time.time()) + i
            write_bundle(original, bundle)  # atomic replace, same allowlists
            await until(lambda: _gt(reloads(), seen), f"replacement {i} picked up")  # noqa: B023 - awaited here

            async def more() -> bool:
                return done[0] >= served + 3  # noqa: B023 - awaited in this iteration
            await until(more, f"requests served across replacement {i}")
        stop.set()
        counts = await asyncio.gather(*tasks)
        async with s.get(root.url + "/admin/allowlists") as r:
            status_doc = await r.json()
    assert not bad, bad[:3]
    assert sum(counts) == done[0] >= 15
    src = status_doc["sources"][0]
    assert src["reloads"] >= 5 and src["last_error"] is None  # every replacement was picked up
    dead = [r for r in status_doc["partitions"]["leaves"]["replicas"] if not r["up"]]
    assert len(dead) == 1


async def _gt(value, than: int) -> bool:
    return await value > than


def test_root_processes_never_load_torch(stack):
    for root in stack["roots"].values():
        maps = Path(f"/proc/{root.pid}/maps").read_text()
        assert "torch" not in maps, root.name
    assert "torch" in Path(f"/proc/{stack['leaf'].pid}/maps").read_text()  # the check can fail
