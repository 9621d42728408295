"""Never a wrong answer: real root and leaf processes under model swaps, traversal names and huge fan-outs.

The swap test is the promise itself. Model `m` version 1 is replaced in place,
back and forth, while clients send requests through the root on both the
shortcut route (the body is released once trimmed) and the fan-out route (the
body is held). The two archives read different inputs and compute different
functions, so the value of every 200 says which model ran and whether it ran
with every input it reads:

    old: reads a, b (b defaults to 0)   score = a + b   -> 1 + 5 = 6
    new: reads a                        score = 3 a     -> 3
    old run on a body trimmed for new:  score = a + 0   -> 1   (the wrong answer)

Any 200 other than 6 or 3 is a wrong answer; the root and leaf must turn the
race into a re-send (fan-out) or a retryable 503 (shortcut), never into a 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import aiohttp
import msgpack
import pytest

from loadtest.procs import free_port, start
from trimmer.codec import decode_msgpack
from trimmer.handshake import input_digest
from promtext import scrape

MP = {"Content-Type": "application/msgpack"}
OLD = {"input_names": ["a", "b"], "output_names": ["score"],
       "inputs": {"a": {"dtype": "float32", "shape": []}, "b": {"dtype": "float32", "shape": [], "default": 0.0}}}
NEW = {"input_names": ["a"], "output_names": ["score"], "inputs": {"a": {"dtype": "float32", "shape": []}}}
FEATURES = {"a": 1.0, "b": 5.0, "unused": [0.5] * 64}  # `unused` makes every trim drop something
RIGHT = {6.0, 3.0}  # old with b, new


def _save(path: Path, info: dict, two_inputs: bool) -> None:
    import torch

    class Old(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    class New(torch.nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return a * 3.0

    path.parent.mkdir(parents=True, exist_ok=True)
    module = torch.jit.script(Old() if two_inputs else New())
    torch.jit.save(module, str(path), _extra_files={"module_info.json": json.dumps(info)})


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def swap_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swap")
    repo = tmp / "models"
    archives = tmp / "archives"
    _save(archives / "old.pt", OLD, True)
    _save(archives / "new.pt", NEW, False)
    (repo / "m" / "1").mkdir(parents=True)
    shutil.copy(archives / "old.pt", repo / "m" / "1" / "model.pt")
    lport = free_port()
    leaf = start("leaf", ["leaf", "--repo", str(repo), "--port", str(lport)], lport,
                 "/v2/health/ready", tmp, timeout=120)
    cfg = tmp / "root.yaml"
    cfg.write_text(json.dumps({
        "repositories": [str(repo)], "watch": True, "admin": {"on_service_port": True},
        "partitions": {"leaves": {"replicas": [leaf.url]}}, "models": {"m": "leaves"},
        "timeouts": {"request_s": 20, "health_interval_s": 0.5}}))
    rport = free_port()
    root = start("root", ["root", "--config", str(cfg), "--port", str(rport)], rport, "/readyz", tmp, timeout=60)
    try:
        yield {"leaf": leaf, "root": root, "repo": repo, "archives": archives, "tmp": tmp}
    finally:
        root.stop()
        leaf.stop()


def _install(stack: dict, which: str) -> None:
    """Replace m/1/model.pt in place, atomically (rename over it), as a deploy tool would."""
    dst = stack["repo"] / "m" / "1" / "model.pt"
    tmp = dst.with_name(".model.pt.tmp")
    shutil.copy(stack["archives"] / f"{which}.pt", tmp)
    os.replace(tmp, dst)


def _converged(stack: dict, info: dict) -> bool:
    want = input_digest(info["input_names"])
    root_side = _get_json(stack["root"].url + "/admin/allowlists")["models"]["m"]["versions"]["1"]["signature_digest"]
    leaf_side = _get_json(stack["leaf"].url + "/v2/models/m/versions/1")
    return root_side == want and want in json.dumps(leaf_side)


async def _client(s: aiohttp.ClientSession, url: str, fanout: bool, stop: asyncio.Event, seen: dict) -> None:
    body = msgpack.packb(
        {"request_id": "r", **({"models": [{"name": "m", "version": "1"}]} if fanout else {}), "features": FEATURES})
    while not stop.is_set():
        async with s.post(url, data=body, headers=MP) as r:
            raw = await r.read()
            status = r.status
        if status != 200:
            seen["status"][status] = seen["status"].get(status, 0) + 1
            continue
        doc = decode_msgpack(raw)
        out = doc["results"]["m"] if fanout else doc
        value = float(out["outputs"]["score"].to_numpy().reshape(-1)[0])
        seen["values"][value] = seen["values"].get(value, 0) + 1


async def test_model_swapped_in_place_under_load_never_gives_a_wrong_answer(swap_stack):
    stack = swap_stack
    root = stack["root"].url
    stop = asyncio.Event()
    seen: dict = {"status": {}, "values": {}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        clients = [asyncio.create_task(_client(s, root + ("/v1/score" if i % 2 else "/v1/models/m/versions/1/score"),
                                               bool(i % 2), stop, seen))
                   for i in range(8)]
        try:
            # Both directions, twice: a feature dropped (old -> new), a feature added (new -> old).
            async def answers_grow(by: int) -> None:  # load runs across each step: counted, not timed
                target = sum(seen["values"].values()) + sum(seen["status"].values()) + by
                deadline = time.monotonic() + 60
                while sum(seen["values"].values()) + sum(seen["status"].values()) < target:
                    assert time.monotonic() < deadline, seen
                    await asyncio.sleep(0.02)

            for which, info in (("new", NEW), ("old", OLD), ("new", NEW), ("old", OLD)):
                await answers_grow(40)
                _install(stack, which)
                deadline = time.monotonic() + 60
                while not await asyncio.to_thread(_converged, stack, info):
                    assert time.monotonic() < deadline, f"root and leaf never both loaded the {which} archive"
                    await asyncio.sleep(0.1)
            await answers_grow(40)
        finally:
            stop.set()
            await asyncio.gather(*clients)
    answered = sum(seen["values"].values())
    wrong = {v: n for v, n in seen["values"].items() if v not in RIGHT}
    assert answered >= 150, seen  # 5 x 40 answers counted across the steps, at most a few of them 503
    assert not wrong, f"wrong 200 answers (value: count): {wrong}; all: {seen}"
    assert set(seen["status"]) <= {503}, seen  # the only other answer: retryable, the body was already released
    # The race did happen and was caught by the handshake, not dodged.
    assert scrape(root, "trimmer_root_allowlist_mismatches_total") > 0


def _raw(base: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """Send `path` byte for byte (aiohttp's and urllib's clients normalise `%2e%2e` and `..` away)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=MP if body is not None else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_traversal_names_and_versions_are_refused_and_leaf_routes_unreachable(swap_stack):
    root = swap_stack["root"].url
    body = msgpack.packb({"features": FEATURES})
    for path in ("/v1/models/m/versions/%2e%2e/score", "/v1/models/m/versions/1%2F..%2F..%2Fmetrics/score",
                 "/v1/models/..%2Fv1%2Fmodels/score", "/v2/models/m/versions/%2e%2e/infer",
                 "/v1/models/m/versions/../score"):
        status, raw = _raw(root, "POST", path, body)
        assert status == 400, (path, status, raw[:200])
        assert "error" in json.loads(raw), raw[:200]
    for path in ("/v2/models/m/versions/1%2F..%2F..%2F..%2F..%2F..%2Fmetrics",
                 "/v2/models/m/versions/1%2F..%2F..%2F..%2Fv1%2Fmodels",
                 "/v2/models/%2e%2e/ready", "/v2/models/m/versions/1/..%2F..%2Fmetrics"):
        status, raw = _raw(root, "GET", path)
        text = raw.decode("utf-8", "replace")
        assert status == 400, (path, status, text[:200])
        assert "trimmer_leaf" not in text and str(swap_stack["repo"]) not in text
    # Fan-out: `a{i}/../1` style versions once ran the model once per spelling, untrimmed.
    fan = msgpack.packb({"models": [{"name": "m", "version": f"a{i}/../1"} for i in range(20)], "features": FEATURES})
    status, raw = _raw(root, "POST", "/v1/score", fan)
    assert status == 400, raw[:200]
    leaf = swap_stack["leaf"].url
    refused = scrape(leaf, "trimmer_leaf_bad_requests_total", reason="bad_name")
    for path in ("/v1/models/m/versions/%2e%2e/score", "/v2/models/m/versions/1%2F..%2F..%2Fmetrics/infer"):
        status, raw = _raw(leaf, "POST", path, body)
        assert status == 400, (path, status, raw[:200])
    assert scrape(leaf, "trimmer_leaf_bad_requests_total", reason="bad_name") == refused + 2  # counted, by reason


async def test_a_20000_name_fanout_is_refused_while_healthz_answers(swap_stack):
    root = swap_stack["root"].url
    body = msgpack.packb({"models": [{"name": f"m{i}"} for i in range(20_000)], "features": FEATURES})
    async with aiohttp.ClientSession() as s:
        async def health() -> int:
            async with s.get(root + "/healthz") as r:
                return r.status

        big = asyncio.ensure_future(s.post(root + "/v1/score", data=body, headers=MP))
        statuses = await asyncio.gather(*(health() for _ in range(5)))
        async with await big as r:
            assert r.status == 400
            assert "max_fanout_targets" in (await r.json())["error"]
    assert statuses == [200] * 5


async def test_untrimmed_forwards_are_counted_by_reason(swap_stack):
    root = swap_stack["root"].url
    before = scrape(root, "trimmer_root_untrimmed_forwards_total", reason="no_allowlist")
    async with aiohttp.ClientSession() as s:
        # A version no allowlist source knows: forwarded whole (fail open), and counted with its reason.
        async with s.post(root + "/v1/models/m/versions/7/score",
                          data=msgpack.packb({"features": FEATURES}), headers=MP) as r:
            await r.read()
    assert scrape(root, "trimmer_root_untrimmed_forwards_total", reason="no_allowlist") == before + 1


async def test_a_wholly_failed_fanout_takes_its_targets_client_status(swap_stack):
    root = swap_stack["root"].url
    body = msgpack.packb({"models": [{"name": "nope1"}, {"name": "nope2"}], "features": FEATURES})
    async with aiohttp.ClientSession() as s:
        async with s.post(root + "/v1/score", data=body, headers=MP) as r:
            assert r.status == 404, await r.text()  # both unknown: 404, not 502
        clash = msgpack.packb({"models": [{"name": "m"}, {"name": "m", "version": "default"}], "features": FEATURES})
        async with s.post(root + "/v1/score", data=clash, headers=MP) as r:
            assert r.status == 400 and "default" in (await r.json())["error"]


def test_admin_output_shows_no_absolute_paths(swap_stack):
    with urllib.request.urlopen(swap_stack["root"].url + "/admin/allowlists", timeout=10) as r:
        text = r.read().decode()
    assert str(swap_stack["tmp"]) not in text and '"/' not in text


async def _load_through(url: str, stop: asyncio.Event, seen: dict, fanout: bool = False) -> None:
    body = msgpack.packb(
        {"request_id": "r", **({"models": [{"name": "m", "version": "1"}]} if fanout else {}), "features": FEATURES})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        while not stop.is_set():
            async with s.post(url, data=body, headers=MP) as r:
                raw = await r.read()
                seen[r.status] = seen.get(r.status, 0) + 1
                if r.status == 200:
                    doc = decode_msgpack(raw)
                    out = doc["results"]["m"] if fanout else doc
                    value = float(out["outputs"]["score"].to_numpy().reshape(-1)[0])
                    seen.setdefault("values", set()).add(value)
            await asyncio.sleep(0.005)


async def test_a_leaf_restarting_behind_the_root_never_answers_404(tmp_path):
    """The leaf listens before its models are loaded; the root must not take its 503 'loading' for health."""
    repo = tmp_path / "models"
    _save(tmp_path / "old.pt", OLD, True)
    for v in ["1"] + [str(i) for i in range(2, 200)]:  # many versions: a load long enough to be seen
        (repo / "m" / v).mkdir(parents=True)
        shutil.copy(tmp_path / "old.pt", repo / "m" / v / "model.pt")
    lport = free_port()
    leaf = start("leaf", ["leaf", "--repo", str(repo), "--port", str(lport)], lport,
                 "/v2/health/ready", tmp_path, timeout=180)
    cfg = tmp_path / "root.yaml"
    cfg.write_text(json.dumps({"repositories": [str(repo)], "watch": False, "admin": {"on_service_port": True},
                               "partitions": {"leaves": {"replicas": [leaf.url]}}, "models": {"m": "leaves"},
                               "timeouts": {"request_s": 10, "health_interval_s": 0.3, "connect_s": 0.5}}))
    rport = free_port()
    root = start("root", ["root", "--config", str(cfg), "--port", str(rport)], rport, "/readyz", tmp_path, timeout=60)
    stop = asyncio.Event()
    seen: dict = {}
    try:
        task = asyncio.create_task(_load_through(root.url + "/v1/models/m/versions/1/score", stop, seen))
        await asyncio.sleep(0.5)
        leaf.stop()
        leaf.start()  # same port, cold: listens while it loads 199 versions
        await asyncio.to_thread(leaf.wait_ready, "/v2/health/ready", 180)
        deadline = time.monotonic() + 60
        before = seen.get(200, 0)
        while seen.get(200, 0) < before + 20:  # serving again after the restart
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.1)
        stop.set()
        await task
    finally:
        stop.set()
        root.stop()
        leaf.stop()
    assert 404 not in seen, seen
    assert 503 in seen, seen  # the restart was seen: a dead or loading leaf is a retryable 503, never a 404
    # 502: a request that raced the stopping leaf's close of a keep-alive connection (not retried: it may have run).
    assert set(k for k in seen if k != "values") <= {200, 502, 503}, seen
    assert seen["values"] == {6.0}, seen


async def test_a_corrupt_archive_swapped_in_costs_no_request(swap_stack):
    """Truncated archive, then a garbled signature: root keeps the last good allowlist, leaf the working model."""
    stack = swap_stack
    _install(stack, "old")
    deadline = time.monotonic() + 60
    while not await asyncio.to_thread(_converged, stack, OLD):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    stop = asyncio.Event()
    seen: dict = {}
    dst = stack["repo"] / "m" / "1" / "model.pt"
    good = (stack["archives"] / "old.pt").read_bytes()
    tasks = [asyncio.create_task(_load_through(stack["root"].url + ("/v1/score" if i % 2
                                                                    else "/v1/models/m/versions/1/score"), stop, seen,
                                               fanout=bool(i % 2))) for i in range(4)]
    try:
        for broken in (good[: len(good) // 2], good.replace(b'"input_names"', b'"input_namez"')):
            tmp = dst.with_name(".broken.tmp")
            tmp.write_bytes(broken)
            os.replace(tmp, dst)
            # Both sides must have seen it and reported it, while requests keep flowing.
            deadline = time.monotonic() + 60
            while True:
                leaf_meta = await asyncio.to_thread(_get_json, stack["leaf"].url + "/v2/models/m/versions/1")
                root_doc = await asyncio.to_thread(_get_json, stack["root"].url + "/admin/allowlists")
                if "reload_error" in json.dumps(leaf_meta) and any("m/1" in p for p in root_doc["problems"]):
                    break
                assert time.monotonic() < deadline, (leaf_meta, root_doc["problems"])
                await asyncio.sleep(0.2)
            n = seen.get(200, 0)
            while seen.get(200, 0) < n + 20:
                assert time.monotonic() < deadline, seen
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        _install(stack, "old")
    assert set(k for k in seen if k != "values") == {200}, seen
    assert seen["values"] == {6.0}, seen
