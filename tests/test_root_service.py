"""The root as a real process against real stand-in upstreams (loadtest.sink) on loopback.

The sink reports exactly which features / keys / bytes it received, so these
tests see what the root forwarded. Tests against the real leaf live in
test_root_leaf.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgpack
import msgspec
import pytest

from loadtest.procs import ManagedProcess, free_port, start
from trimmer.bundle import BUNDLE_KIND, BUNDLE_FORMAT
from promtext import metric_sum as metric

ROOT_DIR = Path(__file__).resolve().parent.parent


def write_bundle(path: Path, models: dict[str, dict[str, list[str]]]) -> None:
    doc = {"kind": BUNDLE_KIND, "format": BUNDLE_FORMAT, "models": {
        m: {"versions": {v: {"input_names": names, "output_names": ["score"]} for v, names in vs.items()}}
        for m, vs in models.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def start_sink(tmp: Path, name: str, *extra: str) -> ManagedProcess:
    port = free_port()
    mp = ManagedProcess(name, [sys.executable, "-m", "loadtest.sink", "--port", str(port), *extra],
                        f"http://127.0.0.1:{port}", tmp / f"{name}.log")
    mp.start()
    mp.wait_ready("/v2/health/ready", timeout=30)
    return mp


def start_root(tmp: Path, name: str, config: dict, *args: str) -> ManagedProcess:
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    return start(name, ["root", "--config", str(cfg_path), "--port", str(port), *args], port,
                 "/readyz", tmp, timeout=30)


FEATURES = {f"f{i}": i for i in range(10)}


def body(models=None, **extra) -> bytes:
    doc = {"request_id": "r1", **({"models": models} if models is not None else {}), "features": FEATURES, **extra}
    return msgspec.msgpack.encode(doc)


MP = {"Content-Type": "application/msgpack"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def kept_body(doc: dict, allow: set[str]) -> bytes:
    """The oracle for a trimmed msgpack body, independent of trimmer.trim: msgpack-python's encoding of the same
    document with only the allowlisted features (key order kept)."""
    return msgpack.packb({k: ({n: v for n, v in doc["features"].items() if n in allow} if k == "features" else v)
                          for k, v in doc.items()})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("root")
    bundle = tmp / "bundle.json"
    write_bundle(bundle, {"alpha": {"1": ["f1", "f2"], "2": ["f1", "f2", "f3"]}, "beta": {"1": ["f3", "f4"]},
                          "gamma": {"1": ["f5"]}, "shadowed": {"1": ["f6"]}, "oipm": {"1": ["f1"]},
                          "alpha_lz4": {"1": ["f1", "f2"]}, "alpha_zstd": {"1": ["f1", "f2"]}, "fo": {"1": ["f1"]},
                          "sleepy": {"1": ["f1"]}})
    overrides = tmp / "allowlists.yaml"
    overrides.write_text("models:\n  shadowed:\n    mode: shadow\n")
    sink = start_sink(tmp, "sink", "--fail-model", "gamma", "--oip-inputs", "meta=f7,f8")
    slow = start_sink(tmp, "slow", "--delay-ms", "600")
    dead = f"http://127.0.0.1:{free_port()}"
    config = {
        "bundles": [str(bundle)], "overrides": str(overrides),
        "admin": {"on_service_port": True}, "partitions": {
            "main": {"replicas": [sink.url]},
            "lz4": {"replicas": [sink.url], "compression": "lz4"},
            "zstd": {"replicas": [sink.url], "compression": "zstd"},
            "failover": {"replicas": [dead, sink.url], "balance": "round_robin"},
            "slow": {"replicas": [slow.url]},
            "oip": {"replicas": [sink.url], "protocol": "oip",
                    "allowlists_from_metadata": {"models": ["meta"], "refresh_s": 1}},
        },
        "models": {"alpha": {"partition": "main", "default_version": "1"}, "beta": "main", "gamma": "main",
                   "shadowed": "main",
                   "nolist": "main", "alpha_lz4": "lz4", "alpha_zstd": "zstd", "fo": "failover", "sleepy": "slow",
                   "meta": "oip", "oipm": "main"},
        "timeouts": {"request_s": 0.3, "health_interval_s": 0.5},
    }
    for m in ("beta", "gamma", "shadowed", "alpha_lz4", "alpha_zstd", "fo", "sleepy", "oipm"):
        config["models"][m] = {"partition": config["models"][m], "default_version": "1"}
    root = start_root(tmp, "root", config)
    yield {"root": root, "sink": sink, "tmp": tmp, "bundle": bundle, "config": config}
    root.stop()
    sink.stop()
    slow.stop()


async def post(url: str, data: bytes, headers=MP) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=data, headers=headers) as r:
            raw = await r.read()
            ctype = r.headers.get("Content-Type", "")
            return r.status, (msgspec.msgpack.decode(raw) if "msgpack" in ctype else msgspec.json.decode(raw))


async def get_text(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await r.text()


async def test_fanout_trims_per_model_and_keeps_other_keys(env):
    url = env["root"].url + "/v1/score"
    status, out = await post(url, body([{"name": "alpha"}, {"name": "beta", "version": "1"},
                                        {"name": "alpha", "version": "2"}], context={"x": 1}))
    assert status == 200, out
    assert out["errors"] == {}
    a1, a2, b = out["results"]["alpha/default"], out["results"]["alpha/2"], out["results"]["beta"]
    assert a1["features"] == ["f1", "f2"] and a1["version"] == "1"  # default version made explicit upstream
    assert a2["features"] == ["f1", "f2", "f3"] and a2["version"] == "2"
    assert b["features"] == ["f3", "f4"]
    assert a1["keys"] == ["request_id", "features", "context"]  # `models` is not forwarded; order kept


async def test_fanout_one_failing_model_returns_the_others(env):
    status, out = await post(env["root"].url + "/v1/score",
                             body([{"name": "alpha"}, {"name": "gamma"}, {"name": "nope"}]))
    assert status == 200
    assert set(out["results"]) == {"alpha"}
    assert out["errors"]["gamma"]["status"] == 500 and "failed on purpose" in out["errors"]["gamma"]["error"]
    assert out["errors"]["nope"]["status"] == 404 and "nope" in out["errors"]["nope"]["error"]


async def test_fanout_json_and_shortcut(env):
    doc = json.dumps({"models": [{"name": "beta"}], "features": {"f3": 1, "f9": 2}}).encode()
    status, out = await post(env["root"].url + "/v1/score", doc, {"Content-Type": "application/json"})
    assert status == 200 and out["results"]["beta"]["features"] == ["f3"]
    status, out = await post(env["root"].url + "/v1/models/alpha/versions/2/score", body())
    assert status == 200 and out["features"] == ["f1", "f2", "f3"] and out["version"] == "2"
    status, out = await post(env["root"].url + "/v1/models/unknown/score", body())
    assert status == 404 and "unknown" in out["error"]


async def test_megabyte_bodies_are_trimmed_and_forwarded_from_their_chunks(env):
    """A body that arrives in many chunks: trimmed while it arrives (enforce), forwarded chunk by chunk (miss,
    shadow)."""
    big = {**FEATURES, **{f"pad{i:03d}": bytes([i % 251]) * 10_000 for i in range(300)}}
    doc = {"request_id": "big", "features": big, "tail": "end"}
    data = msgspec.msgpack.encode(doc)
    assert len(data) > 3_000_000
    expected_trim = kept_body(doc, {"f1", "f2"})
    status, out = await post(env["root"].url + "/v1/models/alpha/score", data)
    assert status == 200, out
    assert out["features"] == ["f1", "f2"] and out["keys"] == ["request_id", "features", "tail"]
    assert out["body_bytes"] == len(expected_trim) and out["body_sha256"] == sha(expected_trim)
    for model in ("nolist", "shadowed"):  # untrimmed: every byte arrives
        status, out = await post(env["root"].url + f"/v1/models/{model}/score", data)
        assert status == 200, out
        assert out["body_bytes"] == len(data) and out["body_sha256"] == sha(data) and out["features"] == list(big)
    truncated = data[: len(data) // 2]  # a body cut off mid-feature is a 400, not a partial trim
    status, out = await post(env["root"].url + "/v1/models/alpha/score", truncated)
    assert status == 400 and "truncated" in out["error"]


@pytest.mark.parametrize("data,ctype,needle", [
    (b"\xc1garbage", "application/msgpack", "malformed"),
    (msgspec.msgpack.encode([1, 2]), "application/msgpack", "map"),
    (msgspec.msgpack.encode({"models": "alpha", "features": {}}), "application/msgpack", "models"),
    (msgspec.msgpack.encode({"features": {}}), "application/msgpack", "models"),
    (b"{}", "text/plain", "content type"),
])
async def test_bad_requests_are_400_with_one_line_json(env, data, ctype, needle):
    status, out = await post(env["root"].url + "/v1/score", data, {"Content-Type": ctype})
    assert status == 400, out
    assert needle in out["error"] and "\n" not in out["error"]


async def test_shadow_miss_and_byte_metrics(env):
    url = env["root"].url
    _, before = await get_text(url + "/metrics")
    status, out = await post(url + "/v1/score", body([{"name": "shadowed"}, {"name": "nolist"}, {"name": "alpha"}]))
    assert status == 200 and not out["errors"]
    assert out["results"]["shadowed"]["features"] == list(FEATURES)  # shadow: sent untrimmed
    assert out["results"]["nolist"]["features"] == list(FEATURES)  # no allowlist: fail open
    _, after = await get_text(url + "/metrics")

    def delta(name, **lb):
        return metric(after, name, **lb) - metric(before, name, **lb)

    assert delta("trimmer_root_shadow_features_dropped_total", model="shadowed") == 9
    assert delta("trimmer_root_allowlist_misses_total", model="nolist") == 1
    assert delta("trimmer_root_features_dropped_total", model="alpha", version="1") == 8
    for m in ("shadowed", "nolist", "alpha"):
        assert delta("trimmer_root_upstream_sent_bytes_total", model=m) == out["results"][m]["wire_bytes"]
    assert delta("trimmer_root_untrimmed_bytes_total", model="alpha") == out["results"]["nolist"]["body_bytes"]
    assert delta("trimmer_root_client_bytes_total", route="fanout") == len(
        body([{"name": "shadowed"}, {"name": "nolist"}, {"name": "alpha"}]))


@pytest.mark.parametrize("model,encoding", [("alpha_lz4", "lz4"), ("alpha_zstd", "zstd")])
async def test_compression_counts_wire_bytes(env, model, encoding):
    url = env["root"].url
    big = {f"f{i}": "x" * 2000 for i in range(10)}
    data = msgspec.msgpack.encode({"models": [{"name": model}], "features": big})
    _, before = await get_text(url + "/metrics")
    status, out = await post(url + "/v1/score", data)
    assert status == 200, out
    r = out["results"][model]
    assert r["encoding"] == encoding and r["features"] == ["f1", "f2"] and r["wire_bytes"] < r["body_bytes"]
    _, after = await get_text(url + "/metrics")
    sent = metric(after, "trimmer_root_upstream_sent_bytes_total", model=model) - metric(
        before, "trimmer_root_upstream_sent_bytes_total", model=model)
    assert sent == r["wire_bytes"]


async def test_dead_replica_fails_over(env):
    for _ in range(6):
        status, out = await post(env["root"].url + "/v1/models/fo/score", body())
        assert status == 200, out
        assert out["features"] == ["f1"]


async def test_timeout_is_504_and_deadline_propagates(env):
    status, out = await post(env["root"].url + "/v1/models/sleepy/score", body())
    assert status == 504 and "sleepy" in out["error"] and "slow" in out["error"]
    status, out = await post(env["root"].url + "/v1/models/alpha/score", body(), {**MP, "X-Deadline-Ms": "250"})
    assert status == 200 and 0 < int(out["deadline_ms"]) <= 250
    status, out = await post(env["root"].url + "/v1/models/alpha/score", body(), {**MP, "X-Deadline-Ms": "soon"})
    assert status == 400 and "X-Deadline-Ms" in out["error"]


async def test_oip_infer_trimmed_with_bundle_and_metadata_allowlists(env):
    url = env["root"].url
    req = {"id": "q",
           "inputs": [{"name": n, "datatype": "FP32", "shape": [1], "data": [1.0]} for n in ("f1", "f7", "f8", "f9")]}
    status, out = await post(url + "/v2/models/meta/infer", json.dumps(req).encode(),
                             {"Content-Type": "application/json"})
    assert status == 200, out
    assert out["outputs"][0]["data"] == ["f7", "f8"] and out["id"] == "q"  # allowlist from the upstream's metadata
    status, out = await post(url + "/v2/models/oipm/infer", json.dumps(req).encode(),
                             {"Content-Type": "application/json"})
    assert status == 200 and out["outputs"][0]["data"] == ["f1"]  # allowlist from the bundle
    status, meta = await get_text(url + "/v2/models/meta")
    assert status == 200 and json.loads(meta)["inputs"][0]["name"] == "f7"
    status, out = await post(url + "/v1/models/meta/score", body())
    assert status == 400 and "Open Inference Protocol" in out["error"]
    status, text = await get_text(url + "/admin/allowlists")
    doc = json.loads(text)
    assert doc["models"]["meta"]["versions"]["1"]["allowlist_size"] == 2
    assert any(s["kind"] == "oip_metadata" for s in doc["sources"])


async def test_oip_binary_tensor_requests_are_trimmed_segment_by_segment(env):
    """tritonclient's default encoding: JSON header + raw segments; the upstream gets only the allowed inputs."""
    import numpy as np

    url = env["root"].url
    arrays = {n: np.arange(i * 10, i * 10 + 64, dtype=np.float32) for i, n in enumerate(("f1", "f7", "f8", "f9"))}
    header = json.dumps({"id": "b", "inputs": [{"name": n, "datatype": "FP32", "shape": [64],
                                                "parameters": {"binary_data_size": a.nbytes}}
                                               for n, a in arrays.items()]}).encode()
    data = header + b"".join(a.tobytes() for a in arrays.values())
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    status, out = await post(url + "/v2/models/meta/infer", data, headers)
    assert status == 200, out
    got = {o["name"]: o["data"] for o in out["outputs"]}
    # only f7 and f8, and only their segments
    assert got["received"] == ["f7", "f8"] and got["binary_bytes"] == [2 * 64 * 4]
    status, out = await post(url + "/v2/models/meta/infer", data,
                             {**headers, "Inference-Header-Content-Length": "999999"})
    assert status == 400 and "Inference-Header-Content-Length" in out["error"]


async def test_the_whole_oip_surface_is_proxied_to_the_models_partition(env):
    url = env["root"].url
    status, text = await get_text(url + "/v2/models/meta/config")
    assert status == 200 and json.loads(text)["route"] == "/v2/models/meta/config"
    status, text = await get_text(url + "/v2/models/meta/versions/1/stats")
    assert status == 200 and json.loads(text)["route"] == "/v2/models/meta/versions/1/stats"
    status, text = await get_text(url + "/v2/models/meta/versions/1%2F..%2F..%2Fhealth/stats")
    assert status == 400
    status, text = await get_text(url + "/v2")
    doc = json.loads(text)
    assert status == 200 and doc["name"] == "feature-trimmer-root" and doc["upstreams"]["oip"]["name"] == "sink"
    status, index = await post(url + "/v2/repository/index", b"{}", {"Content-Type": "application/json"})
    assert status == 200 and {"name": "meta", "version": "1", "state": "READY", "partition": "oip"} in index


async def test_all_replicas_down_is_503_naming_model_and_partition(tmp_path):
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    bundle = tmp_path / "b.json"
    write_bundle(bundle, {"m": {"1": ["f1"]}})
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps({"bundles": [str(bundle)], "admin": {"on_service_port": True},
                                    "partitions": {"p": {"replicas": dead}}, "models": {"m": "p"}}))
    port = free_port()
    root = ManagedProcess("root-dead",
                          [sys.executable, "-m", "trimmer", "root", "--config", str(cfg_path), "--port", str(port)],
                          f"http://127.0.0.1:{port}", tmp_path / "root.log").start()
    try:
        root.wait_ready("/healthz", timeout=30)
        status, _ = await get_text(root.url + "/readyz")
        assert status == 503  # no reachable replica
        status, out = await post(root.url + "/v1/models/m/score", body())
        assert status == 503 and "'m'" in out["error"] and "'p'" in out["error"]
    finally:
        root.stop()


async def test_bundle_replacement_while_requests_flow_loses_none(env):
    url = env["root"].url + "/v1/models/beta/score"
    bundle = env["bundle"]
    original = bundle.read_text()
    seen: set[tuple[str, ...]] = set()
    latest: list[tuple[str, ...] | None] = [None]
    failures: list = []
    stop = asyncio.Event()

    async def client(s: aiohttp.ClientSession) -> int:
        n = 0
        while not stop.is_set() and n < 2000:
            async with s.post(url, data=body(), headers=MP) as r:
                raw = await r.read()
                if r.status != 200:
                    failures.append((r.status, raw[:200]))
                else:
                    latest[0] = tuple(msgspec.msgpack.decode(raw)["features"])
                    seen.add(latest[0])
            n += 1
        return n

    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(client(s)) for _ in range(4)]
        doc = json.loads(original)
        for i in range(6):
            want = ("f3", "f4") if i % 2 else ("f3", "f4", "f5")
            doc["models"]["beta"]["versions"]["1"]["input_names"] = list(want)
            tmp = bundle.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, bundle)
            # the next replacement only once this one is being served (polling, generous deadline)
            deadline = time.monotonic() + 20
            while latest[0] != want and time.monotonic() < deadline and not failures:
                await asyncio.sleep(0.02)
            assert latest[0] == want, (i, latest[0], failures[:3])
        stop.set()
        counts = await asyncio.gather(*tasks)
    bundle.write_text(original)
    assert not failures, failures[:3]
    assert sum(counts) > 20
    assert ("f3", "f4", "f5") in seen and ("f3", "f4") in seen
    assert seen <= {("f3", "f4"), ("f3", "f4", "f5")}


def test_root_process_never_imports_torch(env):
    maps = Path(f"/proc/{env['root'].pid}/maps").read_text()
    assert "torch" not in maps
    code = ("import sys, root.app, root.cli, loadtest.bench.root, loadtest.sink, trimmer.cli; "
            "trimmer.cli.build_parser(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT_DIR)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def small_config(tmp: Path, replica: str, **over) -> dict:
    bundle = tmp / "small-bundle.json"
    write_bundle(bundle, {"alpha": {"1": ["f1", "f2"]}})
    return {"bundles": [str(bundle)], "admin": {"on_service_port": True}, "partitions": {"p": {"replicas": [replica]}},
            "models": {"alpha": {"partition": "p", "default_version": "1"}}, **over}


async def test_workers_share_the_port_and_metrics_add_up(env, tmp_path):
    import psutil

    root = start_root(tmp_path, "root-w2", small_config(tmp_path, env["sink"].url), "--workers", "2")
    try:
        children = psutil.Process(root.pid).children()
        assert len(children) == 2
        n = 40
        for _ in range(n):  # a new connection each time, so the kernel spreads them over both workers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.post(root.url + "/v1/models/alpha/score", data=body(), headers=MP) as r:
                    assert r.status == 200
        for _ in range(6):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.get(root.url + "/metrics") as r:
                    text = await r.text()
            assert metric(text, "trimmer_root_requests_total", model="alpha") == n
    finally:
        assert root.stop() == 0
    assert not any(c.is_running() for c in children)


async def test_workers_supervisor_restarts_a_crashed_worker(env, tmp_path):
    """SIGKILL one of two workers: the supervisor starts a replacement, which listens on the shared port and
    serves; the supervisor still exits 0 on SIGTERM."""
    import signal

    import psutil

    root = start_root(tmp_path, "root-crash", small_config(tmp_path, env["sink"].url), "--workers", "2")
    port = int(root.url.rsplit(":", 1)[1])
    try:
        sup = psutil.Process(root.pid)
        first = {c.pid for c in sup.children()}
        assert len(first) == 2
        victim = min(first)
        os.kill(victim, signal.SIGKILL)

        def live_listeners() -> set[int]:
            out = set()
            for c in sup.children():
                try:
                    if c.status() != psutil.STATUS_ZOMBIE and any(
                            conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
                            for conn in c.net_connections("tcp")):
                        out.add(c.pid)
                except psutil.NoSuchProcess:
                    pass
            return out

        deadline = time.monotonic() + 60
        now = live_listeners()
        while not (len(now) == 2 and victim not in now) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now = live_listeners()
        assert len(now) == 2 and victim not in now and len(now - first) == 1, (first, now)
        for _ in range(20):  # new connections: the kernel spreads them over both listening workers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.post(root.url + "/v1/models/alpha/score", data=body(), headers=MP) as r:
                    assert r.status == 200
        assert "restarting (1/" in root.log_tail()
    finally:
        assert root.stop() == 0


async def test_sigterm_drains_in_flight_requests_and_readyz_turns_503(tmp_path):
    """SIGTERM with a request held in flight by the upstream (a gate the test opens, no sleeps): /readyz on the
    admin listener answers 503 while the request drains, the request still gets its answer, the root exits 0."""
    from upstreams import Gate

    gate = Gate()
    aport = free_port()
    cfg = small_config(tmp_path, gate.url, timeouts={"request_s": 60, "drain_s": 60})
    cfg["admin"] = {"port": aport}
    root = start_root(tmp_path, "root-drain", cfg)
    admin = f"http://127.0.0.1:{aport}"
    try:
        assert (await get_text(admin + "/readyz"))[0] == 200
        pending = asyncio.create_task(post(root.url + "/v1/models/alpha/score", body()))
        assert await asyncio.to_thread(gate.arrived.wait, 30)  # the request is in flight upstream
        root.proc.send_signal(15)
        seen: list[int] = []
        deadline = time.monotonic() + 30
        while 503 not in seen and time.monotonic() < deadline:
            seen.append((await get_text(admin + "/readyz"))[0])
            await asyncio.sleep(0.05)
        assert seen[-1] == 503 and set(seen) <= {200, 503}, seen
        assert not pending.done()
        gate.release.set()
        status, out = await pending
        assert status == 200 and out["features"] == ["f1", "f2"]
        assert root.proc.wait(timeout=30) == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            await get_text(root.url + "/healthz")
    finally:
        root.stop()
        gate.close()


async def test_untrimmed_chunked_body_is_resent_whole_on_failover(env):
    """A multi-chunk body goes upstream chunk by chunk; when the replica tried first refuses the connection,
    the same chunks go to the next replica in full (the partition, in-process, against the real sink)."""
    from root.dataplane import Body
    from root.config import PartitionConfig, Timeouts
    from root.metrics import Metrics
    from root.upstream import Partition

    data = msgspec.msgpack.encode(
        {"request_id": "fo", "features": {f"pad{i:03d}": bytes([i]) * 10_000 for i in range(200)}})
    chunks = [data[i:i + 256_000] for i in range(0, len(data), 256_000)]
    dead = f"http://127.0.0.1:{free_port()}"
    metrics = Metrics()
    part = Partition(PartitionConfig("p", (dead, env["sink"].url), balance="round_robin"), Timeouts(), metrics)
    await part.start()
    try:
        for _ in range(4):  # round robin: every other request starts at the dead replica (marked up: never checked)
            for r in part.replicas:
                r.up = True
            resp = await part.request("POST", "/v1/models/x/score", Body(chunks), dict(MP), 5.0, ("x", "", "p"))
            assert resp.status == 200 and resp.replica == env["sink"].url
            assert msgspec.msgpack.decode(resp.body)["body_bytes"] == len(data)
    finally:
        await part.close()
    refused = metrics.registry.get_sample_value("trimmer_root_upstream_attempts_total",
                                                {"partition": "p", "replica": dead, "outcome": "connect_error"})
    assert refused is not None and refused >= 2


async def test_body_dripped_in_small_pieces_is_trimmed_exactly(env):
    """A slow client: the body arrives in hundreds of small reads, so most features straddle reads and are
    rescanned when the rest arrives; the upstream still gets exactly the trimmed body."""
    big = {**FEATURES, **{f"pad{i:04d}": [i % 200] * 40 for i in range(2000)}}
    doc = {"request_id": "drip", "features": big}
    data = msgspec.msgpack.encode(doc)
    assert len(data) > 100_000  # > 100 pieces
    expected = kept_body(doc, {"f1", "f2"})
    host, port = env["root"].url.split("://", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"POST /v1/models/alpha/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/msgpack\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
        for i in range(0, len(data), 997):  # a prime step: keys and headers land across every kind of boundary
            writer.write(data[i:i + 997])
            await writer.drain()
            await asyncio.sleep(0.001)
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    out = msgspec.msgpack.decode(payload)
    assert out["features"] == ["f1", "f2"] and out["body_sha256"] == sha(expected)


@pytest.mark.parametrize("path, ctype, model, audit_rate, released", [
    ("/v1/models/alpha/score", "application/msgpack", "alpha", 0.0, True),      # enforce: nothing else needs the body
    ("/v1/models/alpha/score", "application/json", "alpha", 0.0, True),         # the same for JSON
    ("/v2/models/oipm/infer", "application/json", "oipm", 0.0, True),           # and for an OIP request
    ("/v1/models/alpha/score",
     "application/msgpack", "alpha", 1.0, True),      # audited: the audit keeps a copy of its own
    ("/v1/models/shadowed/score",
     "application/msgpack", "shadowed", 0.0, False),  # shadow: the whole body goes upstream
    ("/v1/models/nolist/score", "application/msgpack", "nolist", 0.0, False),   # no allowlist: forwarded untrimmed
])
async def test_a_trimmed_body_is_released_before_the_upstream_answers(
        env, monkeypatch, path, ctype, model, audit_rate, released):
    """One target: once the trim is taken, the client's chunks are dropped instead of being held for the model's
    whole latency; whatever still needs them (shadow, miss, audit) keeps them. Through the real handlers of an
    in-process root (build_apps) against the real sink; Body.release is wrapped only to record that it ran, and
    whether the answer had reached the client by then."""
    from aiohttp import web

    from root.app import RootState, build_apps
    from root.dataplane import Body
    from root.config import parse_config

    answered = asyncio.Event()
    calls: list[tuple[int, bool]] = []
    real_release = Body.release

    def release(self) -> None:
        calls.append((self.size, answered.is_set()))
        real_release(self)

    monkeypatch.setattr(Body, "release", release)
    cfg = parse_config({**env["config"], "audit_sample_rate": audit_rate}, str(env["tmp"] / "root.yaml"))
    state = RootState(cfg)
    await state.start()
    main, _ = build_apps(state)
    runner = web.AppRunner(main, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        pad = "x" * 300_000
        if path.startswith("/v2"):
            data = json.dumps({"id": "rel", "inputs": [{"name": n, "datatype": "BYTES", "shape": [1],
                                                        "data": [pad if n == "pad" else n]}
                                                        for n in ("f1", "pad", "f2")]}).encode()
        elif ctype == "application/json":
            data = json.dumps({"request_id": "rel", "features": {**FEATURES, "pad": pad}}).encode()
        else:
            data = msgspec.msgpack.encode({"request_id": "rel", "features": {**FEATURES, "pad": pad}})
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": ctype}) as r:
                raw = await r.read()
                answered.set()
                assert r.status == 200, raw[:300]
    finally:
        await runner.cleanup()
        await state.stop()
    client_releases = [c for c in calls if c[0] == len(data)]
    if released:
        assert client_releases == [(len(data), False)]  # released once, before the answer came back
    else:
        assert client_releases == []


def test_fanout_prepared_body_keeps_no_view_into_the_client_body():
    """The fan-out trims every target from its copy without `models`, so the client's bytes can go at once:
    nothing it keeps (not even the `models` value) may be a view that pins the joined client body."""
    import sys as _sys

    from root.dataplane import Body
    from root.dataplane import PreparedBody

    data = body(models=[{"name": "alpha"}, {"name": "beta"}], pad=b"x" * 100_000)
    client = Body([data[:40_000], data[40_000:]])
    joined = client.joined()
    prepared = PreparedBody(client, "application/msgpack")
    client.release()
    assert _sys.getrefcount(joined) == 2  # this local and getrefcount's argument: nothing else holds the joined body
    assert [r.name for r in prepared.models()] == ["alpha", "beta"]
    assert msgspec.msgpack.decode(prepared.base.joined())["pad"] == b"x" * 100_000


def _big_request(tag: str) -> tuple[bytes, bytes]:
    """(body, the body alpha v1 should receive): a multi-chunk body, so its trim is fed as it arrives."""
    feats = {**FEATURES, **{f"pad{i:03d}": bytes([i]) * 3000 for i in range(200)}}
    doc = {"request_id": tag, "features": feats}
    return msgspec.msgpack.encode(doc), kept_body(doc, {"f1", "f2"})


async def _eager_trims(root_url: str) -> float:
    return metric((await get_text(root_url + "/metrics"))[1], "trimmer_root_eager_trims_total")


async def test_shortcut_trims_are_scanned_as_the_body_arrives(env):
    """The shortcut route's msgpack trim is fed each slice of the body where it landed (root/front.py), and what
    goes upstream is exactly the trim; a JSON body and an unknown model are trimmed (or refused) once read."""
    url = env["root"].url
    before = await _eager_trims(url)
    for i in range(4):
        data, expected = _big_request(f"eager{i}")
        status, out = await post(url + "/v1/models/alpha/score", data)
        assert status == 200 and out["features"] == ["f1", "f2"] and out["body_sha256"] == sha(expected)
    status, _ = await post(url + "/v1/models/alpha/versions/2/score", body())
    assert status == 200
    status, _ = await post(url + "/v1/models/alpha/score", json.dumps({"features": FEATURES}).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200
    status, _ = await post(url + "/v1/models/nosuch/score", body())
    assert status == 404
    assert await _eager_trims(url) - before == 5


async def test_pipelined_requests_on_one_connection_are_each_trimmed_exactly(env):
    """Two requests written back to back before any answer: the second's headers can arrive while the first is
    being handled; each still gets exactly its own trim."""
    host, port = env["root"].url.split("://", 1)[1].rsplit(":", 1)
    reqs = [_big_request("p1"), _big_request("p2")]
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for data, _ in reqs:
            writer.write(f"POST /v1/models/alpha/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                         f"application/msgpack\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        for _, expected in reqs:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            out = msgspec.msgpack.decode(await asyncio.wait_for(reader.readexactly(length), 10))
            assert out["features"] == ["f1", "f2"] and out["body_sha256"] == sha(expected)
    finally:
        writer.close()


async def test_without_the_fast_listener_aiohttp_serves_the_same_bytes(env, tmp_path):
    """TRIMMER_FAST_LISTENER=0: aiohttp serves every request; its handler feeds the trim as it reads the body, and
    upstream gets exactly the same bytes (checked against the independent encoding of the kept features)."""
    cfg_path = tmp_path / "plain.yaml"
    cfg_path.write_text(json.dumps(env["config"]))
    port = free_port()
    root = start("plain", ["root", "--config", str(cfg_path), "--port", str(port)], port, "/readyz", tmp_path,
                 timeout=30, env={"TRIMMER_FAST_LISTENER": "0"})
    try:
        data, expected = _big_request("plain")
        status, out = await post(root.url + "/v1/models/alpha/score", data)
        assert status == 200 and out["features"] == ["f1", "f2"] and out["body_sha256"] == sha(expected)
        text = (await get_text(root.url + "/metrics"))[1]
        assert metric(text, "trimmer_root_front_handoffs_total") == 0  # nothing went through the fast listener
        assert metric(text, "trimmer_root_eager_trims_total") == 1  # the handler fed it chunk by chunk
    finally:
        root.stop()


async def test_a_connection_handed_to_aiohttp_gets_the_same_bytes(env):
    """A connection whose first request is not a scoring route is handed to the aiohttp server (root/front.py) and
    stays there: its later scoring requests are trimmed by the aiohttp handler, to exactly the same bytes."""
    url = env["root"].url
    before = metric((await get_text(url + "/metrics"))[1], "trimmer_root_front_handoffs_total", reason="route")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, force_close=False)) as s:
        async with s.get(url + "/healthz") as r:
            assert r.status == 200
        for i in range(2):
            data, expected = _big_request(f"handed{i}")
            async with s.post(url + "/v1/models/alpha/score", data=data,
                              headers={"Content-Type": "application/msgpack"}) as r:
                out = msgspec.msgpack.decode(await r.read())
                assert r.status == 200 and out["features"] == ["f1", "f2"] and out["body_sha256"] == sha(expected)
    text = (await get_text(url + "/metrics"))[1]
    after = metric(text, "trimmer_root_front_handoffs_total", reason="route")
    assert after - before >= 1
