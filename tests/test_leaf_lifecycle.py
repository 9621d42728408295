"""Leaf model lifecycle, readiness, the allowlist handshake and edge validation, against real leaf processes.

Issue 11: a reload under load must answer every request (no hang) and the leaf must still stop on SIGTERM;
a changed archive swaps in only once loaded, a broken one leaves the old model serving; the leaf is not
ready (and model routes answer a retryable 503, not 404) until its initial load is done; a request whose
X-Trimmer-Signature differs from the version that would run gets 412 without running; names and versions
that are not plain (`..`, percent-encoded separators) get 400 on every route.

Models are tiny TorchScript / torch.export modules built here: score = a * scale (+ b), so every answer has
an independent oracle (numpy) and tells which archive ran. No timing assertions: events, polling, generous
deadlines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yarl

from loadtest.procs import free_port, start, trimmer_cmd, ManagedProcess
from trimmer.codec import decode_msgpack, encode_msgpack
from trimmer.handshake import input_digest
from trimmer.tensor import Tensor
from promtext import scrape as metric

MSGPACK = {"Content-Type": "application/msgpack"}
SPEC = {"dtype": "float32", "shape": [-1]}
REQUEST_TIMEOUT_S = 10.0  # the per-request bound the load clients enforce (the root's default is 5 s)


# ---------------------------------------------------------------------- models
def _module(inputs: tuple[str, ...], scale: float):
    import torch

    if inputs == ("a", "b"):
        class AB(torch.nn.Module):
            def __init__(self, s: float) -> None:
                super().__init__()
                self.s = s

            def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return a * self.s + b

        return AB(scale)
    assert inputs == ("a",)

    class A(torch.nn.Module):
        def __init__(self, s: float) -> None:
            super().__init__()
            self.s = s

        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return a * self.s

    return A(scale)


def write_model(path: Path, inputs: tuple[str, ...] = ("a", "b"), scale: float = 1.0, fmt: str = "pt",
                specs: bool = True, info: str | None = None) -> Path:
    """Write atomically (temp file + rename in the same directory, as a deploy would)."""
    import torch

    if info is None:
        sig: dict[str, Any] = {"input_names": list(inputs), "output_names": ["score"]}
        if specs:
            sig["inputs"] = {n: dict(SPEC, **({"default": 0.0} if n == "b" else {})) for n in inputs}
        info = json.dumps(sig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}"
    module = _module(inputs, scale).eval()
    if fmt == "pt":
        torch.jit.save(torch.jit.script(module), str(tmp), _extra_files={"module_info.json": info})
    else:
        rows = torch.export.Dim("rows", min=1, max=1 << 16)
        ep = torch.export.export(module, tuple(torch.zeros(3) for _ in inputs),
                                 dynamic_shapes=tuple({0: rows} for _ in inputs))
        torch.export.save(ep, str(tmp), extra_files={"module_info.json": info})
    os.replace(tmp, path)
    return path


def leaf_config(tmp: Path, **extra: Any) -> Path:
    cfg = tmp / "leaf.yaml"
    lines = ["rescan_interval_s: 0.5", "drain_timeout_s: 20"] + [f"{k}: {v}" for k, v in extra.items()]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def start_leaf(repo: Path, tmp: Path, name: str = "leaf", delay_ms: int = 20, wait: bool = True) -> ManagedProcess:
    port = free_port()
    args = ["leaf", "--config", str(leaf_config(tmp)), "--repo", str(repo), "--port", str(port),
            "--max-queue-delay-ms", str(delay_ms), "--torch-threads", "1"]
    if wait:
        return start(name, args, port, "/readyz", tmp, timeout=90)
    mp = ManagedProcess(name, trimmer_cmd(*args), f"http://127.0.0.1:{port}", tmp / f"{name}.log")
    return mp.start()


# ---------------------------------------------------------------------- HTTP helpers
def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_for(cond, what: str, timeout: float = 60.0, proc: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{proc.log_tail()}" if proc else ""))


def features(seed: int, rows: int = 4) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(rows).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32)
    return {"a": Tensor.from_numpy(a), "b": Tensor.from_numpy(b)}, a, b


class Load:
    """`clients` keep-alive clients posting to one model until stopped; every outcome is recorded.

    Outcomes: ("ok", scale seen), ("status", code, body), ("timeout",), ("conn", error type). A 200 whose
    score is not a*s+b for the scale of some archive in `scales` is recorded as ("wrong", ...)."""

    def __init__(self, url: str, path: str, clients: int, scales: set[float], max_requests: int = 200_000) -> None:
        self.url, self.path, self.clients, self.scales = url, path, clients, scales
        self.max_requests = max_requests
        self.outcomes: list[tuple] = []
        self.stop = asyncio.Event()
        self.ok = 0

    async def _client(self, i: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while not self.stop.is_set() and len(self.outcomes) < self.max_requests:
            feats, a, b = features(i * 1_000_003 + n, rows=1 + (n % 5))
            n += 1
            try:
                async with session.post(self.url + self.path,
                                        data=encode_msgpack({"features": feats}), headers=MSGPACK) as r:
                    body = await r.read()
                    if r.status != 200:
                        self.outcomes.append(("status", r.status, body[:300]))
                        continue
            except asyncio.TimeoutError:
                self.outcomes.append(("timeout",))
                continue
            except aiohttp.ClientError as exc:
                self.outcomes.append(("conn", type(exc).__name__))
                await asyncio.sleep(0.05)
                continue
            score = decode_msgpack(body)["outputs"]["score"].to_numpy()
            for s in self.scales:
                if score.shape == a.shape and np.allclose(score, a * np.float32(s) + b, rtol=1e-5, atol=1e-5):
                    self.outcomes.append(("ok", s))
                    self.ok += 1
                    break
            else:
                self.outcomes.append(("wrong", score.tolist(), a.tolist(), b.tolist()))

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=self.clients)) as s:
            await asyncio.gather(*(self._client(i, s) for i in range(self.clients)))

    async def wait_ok(self, more: int, timeout: float = 60.0) -> None:
        target = self.ok + more
        deadline = time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"load made no progress: {self.summary()}"
            await asyncio.sleep(0.05)

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            key = o[0] if o[0] != "status" else f"status {o[1]}"
            out[key] = out.get(key, 0) + 1
        return out

    def failures(self) -> list[tuple]:
        return [o for o in self.outcomes if o[0] != "ok"]


async def poll(cond, what: str, timeout: float = 60.0, proc: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(cond):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{proc.log_tail()}" if proc else ""))


def loads(url: str, model: str, version: str) -> float:
    return metric(url, "trimmer_leaf_loads_total", model=model, version=version)


def touch(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


# ---------------------------------------------------------------------- reload / SIGTERM under load
async def test_reload_under_load_answers_every_request(tmp_path):
    repo = tmp_path / "repo"
    archive = write_model(repo / "m" / "1" / "model.pt", scale=3.0)
    leaf = start_leaf(repo, tmp_path)
    try:
        load = Load(leaf.url, "/v1/models/m/versions/1/score", clients=16, scales={3.0})
        runner = asyncio.create_task(load.run())
        await load.wait_ok(50)
        for i in range(3):  # `touch` = a changed fingerprint: a full reload while 16 clients keep sending
            before = loads(leaf.url, "m", "1")
            touch(archive)
            await poll(lambda: loads(leaf.url, "m", "1") > before, f"reload {i + 1}", proc=leaf)  # noqa: B023
            await load.wait_ok(50)  # the new version serves
        load.stop.set()
        await asyncio.wait_for(runner, REQUEST_TIMEOUT_S * 3)
        assert load.failures() == [], (load.summary(), load.failures()[:5], leaf.log_tail())
        assert load.ok > 150
        assert loads(leaf.url, "m", "1") == 4
        assert metric(leaf.url, "trimmer_leaf_failures_total") == 0
    finally:
        leaf.stop()


async def test_sigterm_under_load_stops_promptly_and_answers_in_flight(tmp_path):
    repo = tmp_path / "repo"
    archive = write_model(repo / "m" / "1" / "model.pt", scale=2.0)
    leaf = start_leaf(repo, tmp_path)
    try:
        load = Load(leaf.url, "/v1/models/m/score", clients=16, scales={2.0})
        runner = asyncio.create_task(load.run())
        await load.wait_ok(50)
        before = loads(leaf.url, "m", "1")
        touch(archive)  # the sequence: a reload under load, then SIGTERM
        await poll(lambda: loads(leaf.url, "m", "1") > before, "reload", proc=leaf)
        await load.wait_ok(50)
        os.killpg(leaf.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30  # generous; the drain bound (drain_timeout_s) is 20 s in this config
        while leaf.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        rc = leaf.proc.poll()
        load.stop.set()
        await asyncio.wait_for(runner, REQUEST_TIMEOUT_S * 3)
        assert rc == 0, f"leaf still running or failed after SIGTERM (rc={rc}):\n{leaf.log_tail()}"
        # in flight at SIGTERM: answered; after it: refused or closed connections; never a timeout or an error status
        bad = [o for o in load.outcomes if o[0] not in ("ok", "conn")]
        assert bad == [], (load.summary(), bad[:5], leaf.log_tail())
        assert "leaf stopped" in leaf.log_path.read_text()
    finally:
        leaf.stop()


# ---------------------------------------------------------------------- broken archives keep the old model
async def test_corrupt_archive_keeps_old_model_serving_and_reports(tmp_path):
    repo = tmp_path / "repo"
    archive = write_model(repo / "m" / "1" / "model.pt", scale=5.0)
    good = archive.read_bytes()
    leaf = start_leaf(repo, tmp_path)
    try:
        load = Load(leaf.url, "/v1/models/m/score", clients=8, scales={5.0, 7.0})
        runner = asyncio.create_task(load.run())
        await load.wait_ok(30)

        def reload_error() -> str | None:
            return get(leaf.url + "/v2/models/m/ready")[1].get("reload_error")

        # 1. truncated zip
        tmp = archive.parent / ".tmp"
        tmp.write_bytes(good[: len(good) // 2])
        os.replace(tmp, archive)
        await poll(lambda: reload_error() is not None, "reload_error after a truncated archive", proc=leaf)
        await load.wait_ok(50)
        status, ready = get(leaf.url + "/v2/models/m/ready")
        assert status == 200 and ready["ready"] is True and ready["state"] == "READY", ready
        status, meta = get(leaf.url + "/v2/models/m")
        assert status == 200 and meta["reload_error"] == ready["reload_error"] \
            and "m/1/model.pt" in meta["reload_error"]
        assert str(tmp_path) not in meta["reload_error"]  # repository-relative: no absolute paths in public output
        assert get(leaf.url + "/v2/health/ready")[1]["reload_errors"] == {"m/1": ready["reload_error"]}
        assert metric(leaf.url, "trimmer_leaf_load_failures_total", model="m", version="1") == 1
        assert metric(leaf.url, "trimmer_leaf_reload_failed", model="m", version="1") == 1
        assert metric(leaf.url, "trimmer_leaf_model_ready", model="m", version="1") == 1
        assert "keeps serving" in leaf.log_path.read_text()

        # 2. a valid zip whose signature is garbled
        write_model(archive, scale=9.0, info='{"input_names": ["a", "b"], "output_names": ')
        await poll(lambda: metric(leaf.url, "trimmer_leaf_load_failures_total", model="m", version="1") == 2,
                   "second load failure", proc=leaf)
        await load.wait_ok(50)
        assert "module_info.json" in (reload_error() or "")

        # 3. a good archive again (new weights): swapped in, the error clears
        write_model(archive, scale=7.0)
        await poll(lambda: reload_error() is None, "reload_error cleared by a good archive", proc=leaf)
        await load.wait_ok(50)
        load.stop.set()
        await asyncio.wait_for(runner, REQUEST_TIMEOUT_S * 3)
        assert load.failures() == [], (load.summary(), load.failures()[:5], leaf.log_tail())
        seen = [o[1] for o in load.outcomes]
        assert seen[0] == 5.0 and seen[-1] == 7.0 and 9.0 not in seen
        assert seen.index(7.0) > 0 and all(s == 7.0 for s in seen[seen.index(7.0):])  # never back to the old one
        assert metric(leaf.url, "trimmer_leaf_reload_failed", model="m", version="1") == 0

        # 4. the swap drops input b: a body trimmed for the old inputs is refused, one for the new ones runs
        old_digest = get(leaf.url + "/v2/models/m")[1]["parameters"]["trimmer_signature"]
        assert old_digest == oracle_digest(["a", "b"])
        write_model(archive, ("a",), scale=11.0)
        await poll(lambda: get(leaf.url + "/v2/models/m")[1]["parameters"]["trimmer_signature"] == oracle_digest(["a"]),
                   "the swap to inputs [a]", proc=leaf)
        body, headers = _score_req("", [1.0], [1.0])
        st, resp_headers, _ = post(leaf.url + "/v1/models/m/score", body,
                                   {**headers, "X-Trimmer-Signature": old_digest})
        assert st == 412 and resp_headers.get("X-Trimmer-Mismatch") == "allowlist"
        st, _, out = post(leaf.url + "/v1/models/m/score", body,
                          {**headers, "X-Trimmer-Signature": oracle_digest(["a"])})
        assert st == 200 and decode_msgpack(out)["outputs"]["score"].to_numpy().tolist() == [11.0]
    finally:
        leaf.stop()


def test_failed_first_load_still_reported_as_failed(tmp_path):
    """No previous archive to keep: the version is FAILED (503), as before."""
    repo = tmp_path / "repo"
    write_model(repo / "ok" / "1" / "model.pt")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    leaf = start_leaf(repo, tmp_path)
    try:
        status, body = get(leaf.url + "/v2/models/broken/ready")
        assert status == 503 and body["state"] == "FAILED" and body["error"]
        assert "broken/1" in get(leaf.url + "/readyz")[1]["failed"]
    finally:
        leaf.stop()


# ---------------------------------------------------------------------- readiness during the initial load
def test_not_ready_and_503_not_404_during_initial_load(tmp_path):
    repo = tmp_path / "repo"
    first = write_model(repo / "m" / "1" / "model.pt")
    # enough versions that the initial load takes seconds, so its progress is observable from outside
    for v in range(2, 301):
        (repo / "m" / str(v)).mkdir(parents=True)
        shutil.copyfile(first, repo / "m" / str(v) / "model.pt")
    leaf = start_leaf(repo, tmp_path, wait=False)
    body = encode_msgpack({"features": features(1)[0]})
    seen: dict[str, list[int]] = {"readyz": [], "oip_ready": [], "model_ready": [], "score": [], "infer": []}
    loading_bodies = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert leaf.proc.poll() is None, leaf.log_tail()
            try:
                ready, _ = get(leaf.url + "/readyz")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
                continue  # not listening yet
            # readiness first, then the model routes: a 200 on a model route after a 503 readiness is fine,
            # a 200 readiness followed by a not-ready model route is not
            results = {
                "oip_ready": get(leaf.url + "/v2/health/ready")[0],
                "model_ready": get(leaf.url + "/v2/models/m/ready")[0],
            }
            st, headers, out = post(leaf.url + "/v1/models/m/score", body, MSGPACK)
            results["score"] = st
            if st != 200:
                loading_bodies.append((st, headers.get("Retry-After"), json.loads(out)))
            st, _, out = post(leaf.url + "/v2/models/m/versions/1/infer",
                              json.dumps({"inputs": [{"name": "a", "shape": [1],
                                                      "datatype": "FP32", "data": [1.0]}]}).encode(),
                              {"Content-Type": "application/json"})
            results["infer"] = st
            if st != 200:
                loading_bodies.append((st, None, json.loads(out)))
            seen["readyz"].append(ready)
            for k, v in results.items():
                seen[k].append(v)
            if ready == 200:
                break
            time.sleep(0.05)
        assert seen["readyz"] and seen["readyz"][-1] == 200, (seen, leaf.log_tail())
        assert 503 in seen["readyz"], "the initial load was never observed in progress"
        for k, codes in seen.items():
            assert set(codes) <= {200, 503}, (k, codes)  # never a 404 "unknown model"
        for st, _retry, out in loading_bodies:
            assert st == 503 and out["code"] == "loading", out
        assert any(retry == "1" for _, retry, _ in loading_bodies)
        # once ready, everything is
        assert get(leaf.url + "/v2/health/ready")[0] == 200 and get(leaf.url + "/v2/models/m/ready")[0] == 200
        st, _, out = post(leaf.url + "/v1/models/m/score", body, MSGPACK)
        assert st == 200 and decode_msgpack(out)["version"] == "300"
    finally:
        leaf.stop()


# ---------------------------------------------------------------------- handshake, validation, version order
@pytest.fixture(scope="module")
def shared_leaf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shared")
    repo = tmp / "repo"
    write_model(repo / "m" / "1" / "model.pt", ("a", "b"), scale=1.0)
    write_model(repo / "m" / "2" / "model.pt", ("a",), scale=2.0)  # highest: unversioned requests run this one
    write_model(repo / "raw" / "1" / "model.pt", ("a",), scale=3.0, specs=False)  # no dtype/shape: the non-batched path
    write_model(repo / "order" / "9" / "model.pt", ("a",), scale=9.0)
    write_model(repo / "order" / "10" / "model.pt", ("a",), scale=10.0)
    write_model(repo / "both" / "1" / "model.pt", ("a",), scale=1.0, fmt="pt")
    write_model(repo / "both" / "1" / "model.pt2", ("a",), scale=2.0, fmt="pt2")
    write_model(repo / "bad name" / "1" / "model.pt", ("a",))  # not addressable: skipped with a warning
    leaf = start_leaf(repo, tmp, name="leaf-shared", delay_ms=1)
    yield leaf
    leaf.stop()


def oracle_digest(names: list[str]) -> str:
    """trimmer/handshake.py's documented rule, computed independently."""
    return hashlib.sha256("\n".join(sorted(set(names))).encode()).hexdigest()[:16]


def test_digest_rule_and_metadata(shared_leaf):
    assert input_digest(["b", "a", "a"]) == oracle_digest(["a", "b"])
    for path, names in [("/v2/models/m/versions/1", ["a", "b"]), ("/v2/models/m/versions/2", ["a"]),
                        ("/v2/models/m", ["a"]), ("/v2/models/raw", ["a"])]:
        status, meta = get(shared_leaf.url + path)
        assert status == 200 and meta["parameters"]["trimmer_signature"] == oracle_digest(names), meta
    versions = {v["version"]: v for v in get(shared_leaf.url + "/v1/models")[1]["versions"] if v["model"] == "m"}
    assert versions["1"]["trimmer_signature"] == oracle_digest(["a", "b"])


def _score_req(path: str, a: list[float], b: list[float] | None = None) -> tuple[bytes, dict[str, str]]:
    feats = {"a": Tensor.from_numpy(np.asarray(a, np.float32))}
    if b is not None:
        feats["b"] = Tensor.from_numpy(np.asarray(b, np.float32))
    return encode_msgpack({"features": feats}), dict(MSGPACK)


def _infer_req(path: str, a: list[float], b: list[float] | None = None) -> tuple[bytes, dict[str, str]]:
    inputs = [{"name": "a", "shape": [len(a)], "datatype": "FP32", "data": a}]
    if b is not None:
        inputs.append({"name": "b", "shape": [len(b)], "datatype": "FP32", "data": b})
    return json.dumps({"inputs": inputs}).encode(), {"Content-Type": "application/json"}


def _answer(path: str, out: bytes) -> list[float]:
    if path.endswith("/score"):
        return decode_msgpack(out)["outputs"]["score"].to_numpy().tolist()
    return json.loads(out)["outputs"][0]["data"]


HANDSHAKE = [  # path, inputs of the version that runs, a, b, expected score
    ("/v1/models/m/versions/1/score", ["a", "b"], [1.0, 2.0], [0.5, 0.5], [1.5, 2.5]),
    ("/v1/models/m/score", ["a"], [1.0, 2.0], None, [2.0, 4.0]),
    ("/v2/models/m/versions/1/infer", ["a", "b"], [1.0, 2.0], [0.5, 0.5], [1.5, 2.5]),
    ("/v2/models/m/infer", ["a"], [1.0, 2.0], None, [2.0, 4.0]),
    ("/v1/models/raw/score", ["a"], [1.0, 2.0], None, [3.0, 6.0]),
    ("/v2/models/raw/versions/1/infer", ["a"], [1.0, 2.0], None, [3.0, 6.0]),
]


@pytest.mark.parametrize("path,names,a,b,expected", HANDSHAKE, ids=[h[0] for h in HANDSHAKE])
def test_handshake_match_mismatch_and_absent(shared_leaf, path, names, a, b, expected):
    url = shared_leaf.url
    make = _score_req if path.endswith("/score") else _infer_req
    body, headers = make(path, a, b)
    version = path.split("/versions/")[1].split("/")[0] if "/versions/" in path else "2" if "/m/" in path else "1"
    model = path.split("/")[3]
    batches = lambda: metric(url, "trimmer_leaf_batch_size_count", model=model, version=version)  # noqa: E731

    # no header: as before
    st, _, out = post(url + path, body, headers)
    assert st == 200 and _answer(path, out) == expected
    # matching digest: runs
    st, _, out = post(url + path, body, {**headers, "X-Trimmer-Signature": oracle_digest(names)})
    assert st == 200 and _answer(path, out) == expected
    # any other digest (another version's inputs, a superset, garbage): 412, nothing runs
    ran_before = batches()
    mismatches_before = metric(url, "trimmer_leaf_allowlist_mismatches_total", model=model, version=version)
    wrong = [oracle_digest(["a", "b"] if names == ["a"] else ["a"]), oracle_digest(names + ["c"]), "garbage", ""]
    for digest in wrong:
        st, resp_headers, out = post(url + path, body, {**headers, "X-Trimmer-Signature": digest})
        assert st == 412, out
        err = json.loads(out)
        assert err["code"] == "allowlist_mismatch" and err["error"], err
        assert resp_headers.get("X-Trimmer-Mismatch") == "allowlist"
    assert batches() == ran_before  # the model did not run
    assert metric(url, "trimmer_leaf_allowlist_mismatches_total",
                  model=model, version=version) == mismatches_before + len(wrong)


def test_mismatch_warning_is_rate_limited(shared_leaf):
    body, headers = _score_req("", [1.0], [1.0])
    for _ in range(30):
        st, _, _ = post(shared_leaf.url + "/v1/models/m/versions/1/score", body,
                        {**headers, "X-Trimmer-Signature": "0" * 16})
        assert st == 412
    lines = [ln for ln in shared_leaf.log_path.read_text().splitlines() if "allowlist mismatch on m/1" in ln]
    assert 1 <= len(lines) < 30 and all("WARNING" in ln for ln in lines)


async def _raw(url: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send `path` exactly as written (no client-side normalisation or re-encoding)."""
    async with aiohttp.ClientSession() as s:
        async with s.request(method, yarl.URL(url + path, encoded=True), data=body, headers=MSGPACK) as r:
            return r.status, await r.read()


TRAVERSAL = [
    ("POST", "/v1/models/m/versions/%2e%2e/score"),
    ("POST", "/v1/models/m/versions/%2E%2E/score"),
    ("POST", "/v1/models/m/versions/../score"),
    ("POST", "/v1/models/m/versions/./score"),
    ("POST", "/v1/models/%2e%2e/score"),
    ("POST", "/v1/models/m/versions/1%2F..%2F2/score"),
    ("POST", "/v1/models/m/versions/a%5Cb/score"),
    ("POST", "/v1/models/m%2Fversions%2F1/score"),
    ("POST", "/v1/models/m/versions/.hidden/score"),
    ("POST", "/v1/models/m/versions/-1/score"),
    ("POST", "/v1/models/m/versions/1%00/score"),
    ("POST", "/v2/models/m/versions/%2e%2e/infer"),
    ("POST", "/v2/models/..%2F..%2Fmetrics/infer"),
    ("GET", "/v2/models/m/versions/1%2F..%2F..%2F..%2F..%2F..%2Fmetrics"),
    ("GET", "/v2/models/m/versions/1%2F..%2F..%2F..%2Fv1%2Fmodels"),
    ("GET", "/v2/models/m/versions/%2e%2e/ready"),
    ("GET", "/v2/models/%2e%2e"),
    ("GET", "/v2/models/m%20x/ready"),
]


@pytest.mark.parametrize("method,path", TRAVERSAL, ids=[f"{m} {p}" for m, p in TRAVERSAL])
async def test_traversal_names_and_versions_get_400(shared_leaf, method, path):
    body = encode_msgpack({"features": {"a": 1.0}}) if method == "POST" else b""
    status, out = await _raw(shared_leaf.url, method, path, body)
    assert status == 400, out
    err = json.loads(out)
    assert "invalid model" in err["error"], err
    assert b"# HELP" not in out and b"\"repo\"" not in out  # neither /metrics nor /v1/models leaked


def test_numeric_versions_order_numerically(shared_leaf):
    st, meta = get(shared_leaf.url + "/v2/models/order")
    assert st == 200 and meta["version"] == "10" and meta["versions"] == ["9", "10"]
    body, headers = _score_req("", [1.0, 2.0])
    st, _, out = post(shared_leaf.url + "/v1/models/order/score", body, headers)
    res = decode_msgpack(out)
    assert st == 200 and res["version"] == "10" and res["outputs"]["score"].to_numpy().tolist() == [10.0, 20.0]


def test_pt2_preferred_over_pt_in_one_version(shared_leaf):
    st, meta = get(shared_leaf.url + "/v2/models/both")
    assert st == 200 and meta["platform"] == "pytorch_export"
    body, headers = _score_req("", [1.0, 2.0])
    st, _, out = post(shared_leaf.url + "/v1/models/both/score", body, headers)
    assert st == 200 and decode_msgpack(out)["outputs"]["score"].to_numpy().tolist() == [2.0, 4.0]  # the .pt2's scale


def test_unaddressable_directories_are_skipped(shared_leaf):
    assert "bad name" not in {v["model"] for v in get(shared_leaf.url + "/v1/models")[1]["versions"]}
    assert "'bad name' is not a valid model name" in shared_leaf.log_path.read_text()


def test_drain_timeout_must_be_positive(tmp_path):
    from leaf.config import load_config
    from trimmer.errors import ConfigError

    assert load_config(str(leaf_config(tmp_path))).drain_timeout_s == 20
    (tmp_path / "bad.yaml").write_text("drain_timeout_s: 0\n")
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        load_config(str(tmp_path / "bad.yaml"))


def test_readyz_and_healthz_routes(shared_leaf):
    assert get(shared_leaf.url + "/healthz") == (200, {"live": True})
    status, body = get(shared_leaf.url + "/readyz")
    assert status == 200 and body["ready"] is True and "m/2" in body["models"]


# ---------------------------------------------------------------------- Batcher.close, in process
def _batcher(forward_gate=None, delay_ms: float = 50.0):
    """A real Batcher over a real converter and a (Python) module score = a * 2, optionally gated."""
    import concurrent.futures
    import threading

    import torch

    from leaf.batcher import Batcher, Runner
    from leaf.convert import Converter
    from leaf.metrics import LeafMetrics
    from trimmer.signature import parse_signature

    sig = parse_signature(json.dumps({"input_names": ["a"], "output_names": ["score"], "inputs": {"a": SPEC}}).encode())
    converter = Converter(sig)
    entered = threading.Event()

    def module(a: torch.Tensor) -> torch.Tensor:
        entered.set()
        if forward_gate is not None:
            forward_gate.wait(60)
        return a * 2

    pool = concurrent.futures.ThreadPoolExecutor(1)
    b = Batcher(("m", "1"), Runner(module, converter, sig.output_names, torch.device("cpu")), pool, LeafMetrics(),
                max_batch_size=4, max_queue_delay_ms=delay_ms, max_batch_rows=1000)
    return b, converter, entered, pool


async def test_batcher_close_drains_queued_and_batched_jobs():
    from leaf.batcher import Unavailable

    b, conv, _, pool = _batcher()
    b.start()
    tasks = [asyncio.create_task(b.submit(conv.convert({"a": [float(i), 1.0]}))) for i in range(40)]
    await asyncio.sleep(0)  # the jobs are queued; the first batch is being collected (50 ms delay)
    await asyncio.wait_for(b.close(timeout=60), 60)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    for i, r in enumerate(results):
        assert not isinstance(r, BaseException), r
        assert r[0].to_numpy().tolist() == [2.0 * i, 2.0]
    with pytest.raises(Unavailable):  # closed: a late job is refused at once, never queued and forgotten
        await asyncio.wait_for(b.submit(conv.convert({"a": [1.0]})), 5)
    await b.close(timeout=1)  # idempotent
    pool.shutdown()


async def test_batcher_close_past_its_bound_fails_every_job_with_503():
    import threading

    from leaf.batcher import Unavailable

    gate = threading.Event()
    b, conv, entered, pool = _batcher(forward_gate=gate, delay_ms=0)
    b.start()
    try:
        tasks = [asyncio.create_task(b.submit(conv.convert({"a": [float(i)]}))) for i in range(20)]
        assert await asyncio.to_thread(entered.wait, 30)  # a batch is inside the (stuck) model
        await asyncio.wait_for(b.close(timeout=0.2), 30)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert all(isinstance(r, Unavailable) for r in results), results  # in the batch and queued: all answered
    finally:
        gate.set()
        pool.shutdown()


async def test_batcher_close_cancelled_still_answers_every_job():
    import threading

    gate = threading.Event()
    b, conv, entered, pool = _batcher(forward_gate=gate, delay_ms=0)
    b.start()
    try:
        tasks = [asyncio.create_task(b.submit(conv.convert({"a": [float(i)]}))) for i in range(10)]
        assert await asyncio.to_thread(entered.wait, 30)
        closer = asyncio.create_task(b.close(timeout=60))
        await asyncio.sleep(0.05)
        closer.cancel()  # e.g. shutdown abandoning a reload
        await asyncio.gather(closer, return_exceptions=True)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert all(isinstance(r, BaseException) for r in results)
    finally:
        gate.set()
        pool.shutdown()
