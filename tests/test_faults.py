"""Faults and reloads under load, with real processes on loopback.

One root sits in front of stand-in upstreams (`python -m loadtest.sink`, which
reports the feature names it received, so every response proves what the
root forwarded). Each test drives a bounded load (count and time) while it
breaks something: a replica killed, an upstream slower than the deadline,
an upstream answering 500 or garbage, a bundle replaced by a corrupt file,
an archive truncated, a repository removed, and 20 bundle swaps. The root
must keep serving, count each fault, and never let a request outlive its
deadline. Status codes per fault are summarised in docs/hardening.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgpack
import msgspec
import pytest

from loadtest.procs import ManagedProcess, free_port, start
from trimmer.bundle import BUNDLE_FORMAT, BUNDLE_KIND
from promtext import metric_sum as metric

MP = {"Content-Type": "application/msgpack"}
FEATURES = {f"f{i}": i for i in range(12)}
BODY = msgspec.msgpack.encode({"request_id": "r", "features": FEATURES})
ALLOW_A = ("f0", "f2", "f4", "f6", "f8")
ALLOW_B = ("f1", "f2", "f3", "f10", "f11")
FIXED = ("f5", "f7")
REPO_ALLOW = ("f3", "f9")
REQUEST_S = 0.5  # the root's upstream timeout; the slow sink sleeps far longer
HEALTH_S = 0.3


def bundle_doc(swap: tuple[str, ...]) -> dict:
    models = {"swap": {"1": list(swap)}, "fixed": {"1": list(FIXED)}, "pairm": {"1": ["f1"]}, "solom": {"1": ["f1"]},
              "sleepy": {"1": ["f1"]}, "gamma": {"1": ["f1"]}, "junk": {"1": ["f1"]}}
    return {"kind": BUNDLE_KIND, "format": BUNDLE_FORMAT, "models": {
        m: {"versions": {v: {"input_names": names, "output_names": ["score"]} for v, names in vs.items()}}
        for m, vs in models.items()}}


def kept_sha(names: tuple[str, ...]) -> str:
    """sha256 of the body the upstream must receive for BODY trimmed to `names`: msgpack-python's encoding of
    the request with only those features (independent of the trim), so value bytes are checked too."""
    return hashlib.sha256(
        msgpack.packb({"request_id": "r", "features": {k: v for k, v in FEATURES.items() if k in names}})).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def fake_archive(inputs: tuple[str, ...]) -> bytes:
    """What the root reads of a model archive: a zip with <prefix>/extra/module_info.json (no weights needed)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model/extra/module_info.json",
                    json.dumps({"input_names": list(inputs), "output_names": ["score"]}))
        zf.writestr("model/data.pkl", b"\x80\x04N." * 256)
    return buf.getvalue()


def start_sink(tmp: Path, name: str, *extra: str, port: int | None = None) -> ManagedProcess:
    port = port or free_port()
    mp = ManagedProcess(name, [sys.executable, "-m", "loadtest.sink", "--port", str(port), *extra],
                        f"http://127.0.0.1:{port}", tmp / f"{name}.log")
    mp.start()
    mp.wait_ready("/v2/health/ready", timeout=30)
    return mp


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    bundle = tmp / "bundle.json"
    atomic_write(bundle, json.dumps(bundle_doc(ALLOW_A)).encode())
    repo = tmp / "repo"
    (repo / "repo_m" / "1").mkdir(parents=True)
    (repo / "repo_m" / "1" / "model.pt").write_bytes(fake_archive(REPO_ALLOW))
    sinks = {
        "s1": start_sink(tmp, "s1"), "s2": start_sink(tmp, "s2"), "solo": start_sink(tmp, "solo"),
        "slow": start_sink(tmp, "slow", "--delay-ms", "5000"),
        "main": start_sink(tmp, "main", "--fail-model", "gamma", "--garbage-model", "junk"),
    }
    config = {
        "bundles": [str(bundle)], "repositories": [str(repo)], "watch": True,
        "admin": {"on_service_port": True}, "partitions": {
            "pair": {"replicas": [sinks["s1"].url, sinks["s2"].url]},
            "solo": {"replicas": [sinks["solo"].url]},
            "slow": {"replicas": [sinks["slow"].url]},
            "main": {"replicas": [sinks["main"].url]},
        },
        "models": {"pairm": "pair", "solom": "solo", "sleepy": "slow", "swap": "main", "fixed": "main", "gamma": "main",
                   "junk": "main", "repo_m": "main"},
        "timeouts": {"request_s": REQUEST_S, "connect_s": 0.2, "health_interval_s": HEALTH_S, "drain_s": 2},
    }
    for m, p in list(config["models"].items()):
        config["models"][m] = {"partition": p, "default_version": "1"}
    cfg_path = tmp / "root.yaml"
    cfg_path.write_text(json.dumps(config))
    port = free_port()
    root = start("root", ["root", "--config", str(cfg_path), "--port", str(port)], port, "/readyz", tmp, timeout=60)
    try:
        yield {"root": root, "sinks": sinks, "bundle": bundle, "repo": repo, "tmp": tmp}
    finally:
        root.stop()
        for s in sinks.values():
            s.stop(grace=2)


# ---------------------------------------------------------------------- bounded load
@dataclass
class Load:
    """Outcomes of a bounded closed-loop load: status, client-side latency, features the upstream got."""

    results: list[tuple[int, float, tuple[str, ...] | None, bytes, str | None]] = field(default_factory=list)

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for st, *_ in self.results:
            out[st] = out.get(st, 0) + 1
        return out

    @property
    def failed(self) -> list:
        return [r for r in self.results if r[0] != 200]


async def run_load(url: str, stop: asyncio.Event, clients: int = 4, max_requests: int = 3000, max_s: float = 20.0,
                   headers: dict[str, str] = MP, body: bytes = BODY, load: Load | None = None) -> Load:
    """`load`: pass one in to watch its results grow while the load runs (tests step on counts, not on time)."""
    load = load if load is not None else Load()
    deadline = time.monotonic() + max_s

    async def client(s: aiohttp.ClientSession) -> None:
        while not stop.is_set() and len(load.results) < max_requests and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                async with s.post(url, data=body, headers=headers) as r:
                    raw = await r.read()
                    status = r.status
            except aiohttp.ClientError as exc:  # the ROOT never drops a connection: this is a failure too
                load.results.append((-1, time.monotonic() - t0, None, repr(exc).encode(), None))
                continue
            dt = time.monotonic() - t0
            doc = msgspec.msgpack.decode(raw) if status == 200 else {}
            load.results.append((status, dt, tuple(doc.get("features", ())) if status == 200 else None,
                                 raw[:300], doc.get("body_sha256")))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        await asyncio.gather(*(client(s) for _ in range(clients)))
    return load


async def get_json(url: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.json()


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            return await r.text()


def source(status: dict, kind: str) -> dict:
    return next(s for s in status["sources"] if s["kind"] == kind)


async def results_reach(load: Load, n: int, timeout: float = 30.0) -> None:
    """Wait (polling, generous deadline) until the load has at least n outcomes."""
    deadline = time.monotonic() + timeout
    while len(load.results) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(load.results) >= n, f"only {len(load.results)} of {n} requests finished in {timeout}s"


async def wait_for(pred, timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(interval)
    return False


# ---------------------------------------------------------------------- tests
async def test_replica_killed_mid_load_fails_over_then_comes_back(env):
    root, sinks = env["root"], env["sinks"]
    url = root.url + "/v1/models/pairm/score"
    stop = asyncio.Event()
    load = Load()
    task = asyncio.create_task(run_load(url, stop, clients=4, max_s=60, load=load))
    await results_reach(load, 40)
    port = int(sinks["s1"].url.rsplit(":", 1)[1])
    sinks["s1"].kill()  # SIGKILL: in-flight requests on it break
    killed_at = len(load.results)
    await results_reach(load, killed_at + 60)  # enough that every client went to s1's turn after the kill
    stop.set()
    await task
    st = load.statuses()
    assert sum(1 for r in load.results[killed_at + 8:] if r[0] != 200) == 0, st  # after the in-flight ones: all served
    assert set(st) <= {200, 502, 503}, st  # a broken in-flight request is 502; never a 500 or a dropped connection
    assert len(load.failed) <= 8, st  # at most the requests in flight on s1 when it died (4 clients, one retry each)
    assert all(r[2] == ("f1",) and r[4] == kept_sha(("f1",)) for r in load.results if r[0] == 200)
    status = await get_json(root.url + "/admin/allowlists")
    reps = {r["url"]: r for r in status["partitions"]["pair"]["replicas"]}
    assert reps[sinks["s1"].url]["up"] is False and reps[sinks["s2"].url]["up"] is True
    text = await metrics(root.url)
    assert metric(text, "trimmer_root_upstream_attempts_total", replica=sinks["s1"].url, outcome="connect_error") >= 1 \
        or metric(text, "trimmer_root_errors_total", model="pairm") >= 1
    # the replica comes back on the same port: the health check marks it up again
    sinks["s1"] = start_sink(env["tmp"], "s1-again", port=port)

    async def s1_up() -> bool:
        doc = await get_json(root.url + "/admin/allowlists")
        return any(r["url"] == sinks["s1"].url and r["up"] for r in doc["partitions"]["pair"]["replicas"])

    assert await wait_for(s1_up, timeout=10)


async def test_only_replica_killed_is_503_then_recovers(env):
    root, sinks = env["root"], env["sinks"]
    url = root.url + "/v1/models/solom/score"
    port = int(sinks["solo"].url.rsplit(":", 1)[1])
    sinks["solo"].kill()
    stop = asyncio.Event()
    load = await run_load(url, stop, clients=2, max_requests=20, max_s=10)
    assert load.statuses().keys() <= {502, 503}, load.statuses()
    assert all(b"'solom'" in r[3] and b"'solo'" in r[3] for r in load.failed)  # names model and partition
    sinks["solo"] = start_sink(env["tmp"], "solo-again", port=port)
    load = await run_load(url, stop, clients=1, max_requests=5, max_s=10)
    assert set(load.statuses()) == {200}  # a dead replica is still tried when it is the only one: recovery is immediate


async def test_slow_upstream_is_504_and_no_request_outlives_its_deadline(env):
    root = env["root"]
    url = root.url + "/v1/models/sleepy/score"
    stop = asyncio.Event()
    # the sink sleeps 5 s before answering, so a 504 (not a late 200) is the deadline at work; no clock is read here
    load = await run_load(url, stop, clients=6, max_requests=18, max_s=60)
    assert set(load.statuses()) == {504} and len(load.results) >= 18, load.statuses()
    assert all(b"timed out after 0.5s" in r[3] and b"'sleepy'" in r[3] for r in load.results), load.results[0][3]
    # a shorter client deadline shortens the wait: the root's own message names the budget it used
    load = await run_load(url, stop, clients=3, max_requests=6, max_s=60, headers={**MP, "X-Deadline-Ms": "150"})
    assert set(load.statuses()) == {504}, load.statuses()
    assert all(b"timed out after 0.15s" in r[3] for r in load.results), load.results[0][3]
    text = await metrics(root.url)
    assert metric(text, "trimmer_root_errors_total", model="sleepy", kind="timeout") >= 24
    # the slow replica answered nothing in time but is not "down": it is still reachable
    assert (await get_json(root.url + "/readyz"))["ready"] is True


async def test_upstream_500_and_garbage_are_clear_errors_and_counted(env):
    root = env["root"]
    before = await metrics(root.url)
    async with aiohttp.ClientSession() as s:
        async with s.post(root.url + "/v1/models/gamma/score", data=BODY, headers=MP) as r:
            assert r.status == 500 and "failed on purpose" in (
                await r.json())["error"]  # the upstream's own answer, relayed
        fan = msgspec.msgpack.encode(
            {"models": [{"name": "gamma"}, {"name": "junk"}, {"name": "fixed"}], "features": FEATURES})
        async with s.post(root.url + "/v1/score", data=fan, headers=MP) as r:
            raw = await r.read()
            assert r.status == 200
    doc = msgspec.msgpack.decode(raw)  # the fan-out answer stays valid msgpack although one upstream sent garbage
    assert doc["results"]["fixed"]["features"] == list(FIXED)
    assert doc["errors"]["gamma"]["status"] == 500 and "failed on purpose" in doc["errors"]["gamma"]["error"]
    assert doc["errors"]["junk"]["status"] == 502 and "undecodable" in doc["errors"]["junk"]["error"]
    after = await metrics(root.url)
    def d(**lb: str) -> float:
        return metric(after, "trimmer_root_errors_total", **lb) - metric(before, "trimmer_root_errors_total", **lb)
    assert d(model="gamma", kind="upstream_5xx") == 2
    assert d(model="junk", kind="bad_upstream_body") == 1


async def test_corrupt_bundle_mid_load_keeps_last_good_allowlists(env):
    root, bundle = env["root"], env["bundle"]
    good = bundle.read_bytes()
    url = root.url + "/v1/models/fixed/score"
    stop = asyncio.Event()
    load = Load()
    task = asyncio.create_task(run_load(url, stop, clients=3, max_s=60, load=load))
    try:
        await results_reach(load, 10)
        # corrupt JSON, atomically in place
        atomic_write(bundle, b'{"kind": "feature-trimmer-bundle", "models": {"trunc')

        async def error_seen() -> bool:
            return source(await get_json(root.url + "/admin/allowlists"), "bundle")["last_error"] is not None

        assert await wait_for(error_seen, timeout=10)
        await results_reach(load, len(load.results) + 10)  # served while the corrupt file is in place
    finally:
        stop.set()
        await task
        atomic_write(bundle, good)
    assert not load.failed, load.failed[:3]
    assert {r[2] for r in load.results} == {FIXED}  # trimmed with the last good allowlist all along
    assert {r[4] for r in load.results} == {kept_sha(FIXED)}  # and exactly those bytes
    src = source(await get_json(root.url + "/admin/allowlists"), "bundle")
    assert src["failures"] >= 1

    async def recovered() -> bool:
        return source(await get_json(root.url + "/admin/allowlists"), "bundle")["last_error"] is None

    assert await wait_for(recovered, timeout=10)


async def test_truncated_archive_and_removed_repository_keep_last_good(env):
    root, repo = env["root"], env["repo"]
    url = root.url + "/v1/models/repo_m/score"
    archive = repo / "repo_m" / "1" / "model.pt"
    good = archive.read_bytes()
    stop = asyncio.Event()
    load = Load()
    task = asyncio.create_task(run_load(url, stop, clients=3, max_s=60, load=load))
    try:
        await results_reach(load, 10)
        archive.write_bytes(good[: len(good) // 3])  # truncated in place, the way a half-finished copy looks

        async def repo_error(fragment: str) -> bool:
            err = source(await get_json(root.url + "/admin/allowlists"), "repository")["last_error"]
            return err is not None and fragment in err

        assert await wait_for(lambda: repo_error("repo_m/1"), timeout=10)
        shutil.rmtree(repo)
        assert await wait_for(lambda: repo_error("not a directory"), timeout=10)
        await results_reach(load, len(load.results) + 10)  # served while the repository is gone
    finally:
        stop.set()
        await task
    assert not load.failed, load.failed[:3]
    assert {r[2] for r in load.results} == {REPO_ALLOW}  # last good allowlist kept through both faults
    assert {r[4] for r in load.results} == {kept_sha(REPO_ALLOW)}
    # put it back: the error clears
    (repo / "repo_m" / "1").mkdir(parents=True)
    atomic_write(repo / "repo_m" / "1" / "model.pt", good)
    async with aiohttp.ClientSession() as s:
        async with s.post(root.url + "/admin/reload") as r:
            assert r.status == 200
    assert source(await get_json(root.url + "/admin/allowlists"), "repository")["last_error"] is None


async def test_twenty_bundle_swaps_under_load_never_mix_allowlists(env):
    """A and B differ in 8 of 10 names: a request trimmed against a half-built map would show a mix."""
    root, bundle = env["root"], env["bundle"]
    good = bundle.read_bytes()
    docs = {ALLOW_A: json.dumps(bundle_doc(ALLOW_A)).encode(), ALLOW_B: json.dumps(bundle_doc(ALLOW_B)).encode()}
    url = root.url + "/v1/models/swap/score"
    stop = asyncio.Event()
    before = source(await get_json(root.url + "/admin/allowlists"), "bundle")["reloads"]
    load = Load()
    task = asyncio.create_task(run_load(url, stop, clients=4, max_requests=20000, max_s=120, load=load))
    try:
        for i in range(20):
            want = ALLOW_B if i % 2 == 0 else ALLOW_A
            atomic_write(bundle, docs[want])
            # the next swap only once this one is served (so none is coalesced away): polling, generous deadline
            deadline = time.monotonic() + 20
            while not (
                    load.results and load.results[-1][2] == want) and time.monotonic() < deadline and not load.failed:
                await asyncio.sleep(0.02)
            assert load.results[-1][2] == want, (i, load.results[-1][:3], load.failed[:3])
    finally:
        stop.set()
        await task
        atomic_write(bundle, good)
    after = source(await get_json(root.url + "/admin/allowlists"), "bundle")
    assert not load.failed, load.failed[:3]
    seen = {r[2] for r in load.results}
    assert seen <= {ALLOW_A, ALLOW_B}, seen - {ALLOW_A, ALLOW_B}
    assert seen == {ALLOW_A, ALLOW_B}
    assert {r[4] for r in load.results} == {kept_sha(ALLOW_A), kept_sha(ALLOW_B)}  # value bytes, not only names
    assert after["reloads"] - before >= 20 and after["last_error"] is None  # every swap was picked up


# ------------------------------------------------------- the same with real leaves
@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    """Two real leaf replicas serving the demo models behind one root."""
    import subprocess

    from trimmer.repository import scan_repository

    tmp = tmp_path_factory.mktemp("real-leaves")
    repo = tmp / "repo"
    subprocess.run([sys.executable, "-m", "trimmer", "leaf", "build-demo", "--out", str(repo), "--items", "2000"],
                   check=True, capture_output=True, timeout=240)
    procs = []
    try:
        for name in ("leaf-a", "leaf-b"):
            port = free_port()
            procs.append(start(name, ["leaf", "--repo", str(repo), "--port", str(port)], port,
                               "/v2/health/ready", tmp, timeout=120))
        cfg = tmp / "root.yaml"
        cfg.write_text(json.dumps({
            "repositories": [str(repo)], "watch": False,
            "admin": {"on_service_port": True},
            "partitions": {"leaves": {"replicas": [p.url for p in procs], "health_path": "/v2/health/ready"}},
            "models": {"ranker": {"partition": "leaves", "default_version": "1"}},
            "timeouts": {"connect_s": 0.5, "request_s": 5.0, "health_interval_s": 0.5},
        }))
        rport = free_port()
        procs.append(
            start("root-real", ["root", "--config", str(cfg), "--port", str(rport)], rport, "/readyz", tmp, timeout=60))
        signatures = [mv.signature for (m, _), mv in scan_repository(repo).versions.items() if m == "ranker"]
        yield {"tmp": tmp, "leaves": procs[:2], "root": procs[2], "signatures": signatures}
    finally:
        for p in reversed(procs):
            p.stop()


async def test_real_leaf_killed_mid_load_root_keeps_serving(leaves):
    from loadtest.payload import make_request, universe_for_models
    from trimmer.codec import encode_msgpack

    body = encode_msgpack(make_request(universe_for_models(leaves["signatures"], 0.5), candidates=16, seed=3))
    root = leaves["root"]
    stop = asyncio.Event()
    load = Load()
    task = asyncio.create_task(run_load(root.url + "/v1/models/ranker/score", stop, clients=4, max_s=120, body=body,
                                        max_requests=2000, load=load))
    await results_reach(load, 20, timeout=60)
    leaves["leaves"][0].kill()  # SIGKILL one replica mid-load
    killed_at = len(load.results)
    await results_reach(load, killed_at + 30, timeout=60)
    stop.set()
    await task
    st = load.statuses()
    assert sum(1 for r in load.results[killed_at + 8:] if r[0] != 200) == 0, st  # after the in-flight ones: all served
    assert set(st) <= {200, 502, 503}, st  # never a 500 and never a dropped client connection
    assert len(load.failed) <= 8, st  # only what was in flight on the killed leaf
    # and the root still serves through the surviving replica
    async with aiohttp.ClientSession() as s:
        async with s.post(root.url + "/v1/models/ranker/score", data=body, headers=MP) as r:
            assert r.status == 200
            assert "score" in msgspec.msgpack.decode(await r.read())["outputs"]
