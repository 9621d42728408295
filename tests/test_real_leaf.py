"""The trim's promises checked against a real leaf, with tiny real archives whose answers are known arithmetic.

Every model here adds its inputs (plus a per-archive offset), so each expected answer is computed by
hand, not by the code under test. A recording tap sits between the root and the leaf: it forwards every
request unchanged and keeps what the leaf was sent, so a test compares those bytes with an independent
`msgpack.packb` of only the kept features, byte for byte. The leaf's own drift counters
(`trimmer_leaf_features_unused_total`) are the second, independent witness: under enforce they never move.

Also here, because they need a real leaf and no timing: declared defaults on both conversion paths,
version order (9 < 10) and `.pt2` over `.pt`, a failing request inside a batch, `unknown_models.policy:
passthrough`, mixed fan-out failures (502) and a replica that hangs up mid-request (not retried).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import yaml

from loadtest.procs import free_port, start
from trimmer.codec import decode_msgpack
from trimmer.tensor import Tensor
from upstreams import HangUp, Tap
from promtext import scrape

MP = {"Content-Type": "application/msgpack"}
SUM = {"input_names": ["x", "y"], "output_names": ["score"]}
TYPED = {**SUM,
         "inputs": {"x": {"dtype": "float32", "shape": [2]}, "y": {"dtype": "float32", "shape": [2], "default": 2.5}}}
UNTYPED_DEFAULT = {**SUM, "inputs": {"y": {"default": 2.5}}}
GATHER = {"input_names": ["ids"], "output_names": ["score"], "inputs": {"ids": {"dtype": "int64", "shape": [-1]}}}


# ---------------------------------------------------------------------- archives
def _save(path: Path, module, info: dict, fmt: str = "pt") -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(info)
    if fmt == "pt":
        torch.jit.save(torch.jit.script(module), str(path), _extra_files={"module_info.json": text})
    else:
        ep = torch.export.export(module, (torch.zeros(2), torch.zeros(2)))
        torch.export.save(ep, str(path), extra_files={"module_info.json": text})


def build_repo(repo: Path) -> None:
    import torch

    class Offset(torch.nn.Module):
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.offset = offset

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y + self.offset

    class Gather(torch.nn.Module):
        """Looks ids up in a 10-row table: an id >= 10 makes the forward raise (inside a batch too)."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.arange(10, dtype=torch.float32) * 10)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.table[ids]

    _save(repo / "m1" / "1" / "model.pt", Offset(0.0), {**SUM, "input_names": ["f1", "f2"]})
    _save(repo / "m2" / "1" / "model.pt", Offset(0.0), {**SUM, "input_names": ["f2", "f3"]})
    _save(repo / "untyped" / "1" / "model.pt", Offset(0.0), UNTYPED_DEFAULT)
    _save(repo / "typed" / "1" / "model.pt", Offset(0.0), TYPED)
    _save(repo / "ver" / "9" / "model.pt", Offset(9.0), SUM)
    _save(repo / "ver" / "10" / "model.pt", Offset(10.0), SUM)
    _save(repo / "fmt" / "1" / "model.pt", Offset(0.0), SUM, "pt")
    _save(repo / "fmt" / "1" / "model.pt2", Offset(100.0), SUM, "pt2")
    _save(repo / "gather" / "1" / "model.pt", Gather(), GATHER)


# ---------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("realleaf")
    repo = tmp / "repo"
    build_repo(repo)
    leaf_cfg = tmp / "leaf.yaml"
    # gather: a batch of 2 is dispatched only when full (the delay is far longer than any test), so the two
    # requests of the batch test share one batch without any timing on the test's side
    leaf_cfg.write_text(yaml.safe_dump({"models": {"gather": {"max_batch_size": 2, "max_queue_delay_ms": 60000}}}))
    lport = free_port()
    leaf = start("leaf",
                 ["leaf", "--config", str(leaf_cfg), "--repo", str(repo), "--port", str(lport), "--torch-threads", "1"],
                 lport, "/v2/health/ready", tmp, timeout=180)
    tap = Tap(leaf.url)
    hang = [HangUp(), HangUp()]
    root = None
    try:
        cfg = {"repositories": [str(repo)], "watch": False, "admin": {"on_service_port": True},
               "partitions": {"leaves": {"replicas": [tap.url]},
                              "dead": {"replicas": [f"http://127.0.0.1:{free_port()}"]},
                              "hangup": {"replicas": [h.url for h in hang], "balance": "round_robin"}},
               "models": {"m1": "leaves", "m2": "leaves", "untyped": "leaves", "typed": "leaves", "gather": "leaves",
                          "deadm": "dead", "hang": "hangup"},
               # ver and fmt are not listed: they reach the leaf through the passthrough policy
               "unknown_models": {"policy": "passthrough", "partition": "leaves"},
               "timeouts": {"request_s": 30, "connect_s": 1.0}}
        path = tmp / "root.yaml"
        path.write_text(json.dumps(cfg))
        port = free_port()
        root = start("root", ["root", "--config", str(path), "--port", str(port)], port, "/healthz", tmp, timeout=60)
        yield {"leaf": leaf, "root": root, "tap": tap, "hang": hang, "tmp": tmp}
    finally:
        if root is not None:
            root.stop()
        tap.close()
        for h in hang:
            h.close()
        leaf.stop()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or MP, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def score_of(body: bytes) -> list[float]:
    out = decode_msgpack(body)["outputs"]["score"]
    return out.to_numpy().reshape(-1).tolist() if isinstance(out, Tensor) else list(np.asarray(out).reshape(-1))


def counter(url: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples matching `labels`, read from a process's /metrics."""
    return scrape(url, name, timeout=30, **labels)


def leaf_counter(leaf_url: str, name: str, model: str) -> float:
    return counter(leaf_url, name, model=model)


def tensor_ext(arr: np.ndarray) -> msgpack.ExtType:
    """A typed tensor as the wire carries it (ext type 1), for msgpack.packb."""
    from trimmer.tensor import TENSOR_EXT_CODE

    return msgpack.ExtType(TENSOR_EXT_CODE, Tensor.from_numpy(arr).ext_payload())


def client_features() -> dict:
    """Feature values of every msgpack kind; which survive depends on the target's allowlist."""
    return {
        "f1": [1.0, 2.0],
        "pad_str": "x" * 300,
        "f2": [10.0, 20.0],
        "pad_bin": b"\x00\x01" * 500,
        "pad_map": {"k": [1, -2, 3.5], "n": None},
        "f3": tensor_ext(np.array([100.0, 200.0], np.float32)),
        "pad_ext": tensor_ext(np.arange(64, dtype=np.float32)),
        "pad_int": -(2**40),
    }


def kept(features: dict, allow: set[str]) -> dict:
    return {k: v for k, v in features.items() if k in allow}


# ---------------------------------------------------------------------- what the leaf receives
def test_fanout_sends_each_target_exactly_its_allowlist(stack):
    """The bug this catches: the fan-out sending the untrimmed body while its metrics say "trimmed" (the leaf
    ignores extra features, so only what it was sent can tell)."""
    leaf, root, tap = stack["leaf"], stack["root"], stack["tap"]
    feats = client_features()
    unused_before = {m: leaf_counter(leaf.url, "trimmer_leaf_features_unused_total", m) for m in ("m1", "m2")}
    n_before = {m: len(tap.bodies(f"/models/{m}/")) for m in ("m1", "m2")}
    body = msgpack.packb({"request_id": "fan-1", "models": [{"name": "m1"}, {"name": "m2"}], "features": feats})
    status, out = post(root.url + "/v1/score", body)
    assert status == 200, out[:300]
    doc = decode_msgpack(out)
    assert doc["errors"] == {}
    for model, allow, want in (("m1", {"f1", "f2"}, [11.0, 22.0]), ("m2", {"f2", "f3"}, [110.0, 220.0])):
        sent = tap.bodies(f"/models/{model}/")[n_before[model]:]
        assert len(sent) == 1, (model, len(sent))
        expected = msgpack.packb({"request_id": "fan-1", "features": kept(feats, allow)})  # independent encoding
        assert sent[0] == expected, model
        assert doc["results"][model]["outputs"]["score"].to_numpy().tolist() == want
        assert leaf_counter(leaf.url, "trimmer_leaf_features_unused_total", model) == unused_before[model]


def test_native_route_sends_exactly_the_allowlist(stack):
    leaf, root, tap = stack["leaf"], stack["root"], stack["tap"]
    feats = client_features()
    body = msgpack.packb({"request_id": "one", "features": feats})
    before = len(tap.bodies("/models/m1/"))
    unused = leaf_counter(leaf.url, "trimmer_leaf_features_unused_total", "m1")
    status, out = post(root.url + "/v1/models/m1/score", body)
    assert status == 200, out[:300]
    assert score_of(out) == [11.0, 22.0]
    sent = tap.bodies("/models/m1/")[before:]
    assert sent == [msgpack.packb({"request_id": "one", "features": kept(feats, {"f1", "f2"})})]
    assert leaf_counter(leaf.url, "trimmer_leaf_features_unused_total", "m1") == unused
    # the witness can fail: the same body sent straight to the leaf moves the counter by the unused features
    status, _ = post(leaf.url + "/v1/models/m1/score", body)
    assert status == 200
    assert leaf_counter(leaf.url, "trimmer_leaf_features_unused_total", "m1") == unused + len(feats) - 2


def test_unknown_model_passthrough_forwards_and_trims_what_it_knows(stack):
    """`ver` is not in the root's `models` but is in its repository: routed to the passthrough partition and
    trimmed; `ghost` is known to no allowlist source: forwarded whole, counted as untrimmed."""
    root, tap = stack["root"], stack["tap"]
    feats = {"x": [1.0, 2.0], "y": [0.5, 0.5], "extra": "drop me"}
    before = len(tap.bodies("/models/ver/"))
    status, out = post(root.url + "/v1/models/ver/score", msgpack.packb({"features": feats}))
    assert status == 200, out[:300]
    assert score_of(out) == [11.5, 12.5]  # version 10 (offset 10), the latest
    assert tap.bodies("/models/ver/")[before:] == [msgpack.packb({"features": kept(feats, {"x", "y"})})]
    body = msgpack.packb({"features": feats})
    untrimmed = counter(root.url, "trimmer_root_untrimmed_forwards_total", reason="no_version")
    status, out = post(root.url + "/v1/models/ghost/score", body)
    assert status == 404, out[:300]
    assert "unknown_models.policy" not in json.loads(out)["error"]  # the leaf's 404, not the root's refusal
    assert tap.bodies("/models/ghost/")[-1] == body  # forwarded whole
    assert counter(root.url, "trimmer_root_untrimmed_forwards_total", reason="no_version") == untrimmed + 1


# ---------------------------------------------------------------------- the leaf alone
@pytest.mark.parametrize("model, x, y", [
    ("untyped", [1.0, 2.0], 2.5),                       # no dtype/shape: the one-request (non-batched) path
    ("typed", [1.0, 2.0], [2.5, 2.5]),                  # dtype and shape: the batched path, values sent as lists
    ("typed", Tensor.from_numpy(np.array([1.0, 2.0], np.float32)),
     Tensor.from_numpy(np.array([2.5, 2.5], np.float32))),  # the batched fast path (typed tensors)
])
def test_omitting_a_defaulted_input_equals_sending_its_default(stack, model, x, y):
    from trimmer.codec import encode_msgpack

    leaf = stack["leaf"].url
    url = f"{leaf}/v1/models/{model}/score"
    status, omitted = post(url, encode_msgpack({"features": {"x": x}}))
    assert status == 200, omitted[:300]
    status, sent = post(url, encode_msgpack({"features": {"x": x, "y": y}}))
    assert status == 200, sent[:300]
    assert score_of(omitted) == score_of(sent) == [3.5, 4.5]  # x + 2.5, the declared default


def test_version_order_is_numeric_and_pt2_wins(stack):
    leaf = stack["leaf"].url
    assert get_json(leaf + "/v2/models/ver")["version"] == "10"  # "10" < "9" as strings
    body = msgpack.packb({"features": {"x": [1.0, 2.0], "y": [0.0, 0.0]}})
    status, out = post(leaf + "/v1/models/ver/score", body)
    assert status == 200 and score_of(out) == [11.0, 12.0]
    status, out = post(leaf + "/v1/models/ver/versions/9/score", body)
    assert status == 200 and score_of(out) == [10.0, 11.0]  # the older version is still served when named
    meta = get_json(leaf + "/v2/models/fmt/versions/1")
    assert meta["platform"] == "pytorch_export"
    status, out = post(leaf + "/v1/models/fmt/versions/1/score", body)
    assert status == 200 and score_of(out) == [101.0, 102.0]  # model.pt2 (offset 100), not model.pt


def test_a_failing_request_in_a_batch_fails_only_itself(stack):
    """gather batches exactly 2 requests: the one with an out-of-range id fails, its batch-mate is answered."""
    from concurrent.futures import ThreadPoolExecutor

    from trimmer.codec import encode_msgpack

    leaf = stack["leaf"]
    url = leaf.url + "/v1/models/gather/score"
    good = encode_msgpack({"features": {"ids": Tensor.from_numpy(np.array([1, 2, 3], np.int64))}})
    bad = encode_msgpack({"features": {"ids": Tensor.from_numpy(np.array([4, 99], np.int64))}})
    with ThreadPoolExecutor(2) as pool:
        fg, fb = pool.submit(post, url, good), pool.submit(post, url, bad)
        (gs, gout), (bs, bout) = fg.result(timeout=120), fb.result(timeout=120)
    assert gs == 200, gout[:300]
    assert score_of(gout) == [10.0, 20.0, 30.0]
    assert bs >= 400 and "error" in json.loads(bout)
    # they did share the batch (a batch of 2 is only ever dispatched full here, and the leaf logs the failed batch)
    deadline = time.monotonic() + 30
    while "batch of 2" not in leaf.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "batch of 2" in leaf.log_path.read_text()


# ---------------------------------------------------------------------- fan-out failures
def test_mixed_fanout_failures_answer_502(stack):
    """One target 404 (the leaf has no version 99), one 503 (its only replica is down): no agreement, not all
    client errors, so the whole fan-out is a 502 carrying both errors."""
    root = stack["root"]
    body = msgpack.packb({"models": [{"name": "m1", "version": "99"}, {"name": "deadm"}],
                          "features": {"f1": [1.0], "f2": [1.0]}})
    status, out = post(root.url + "/v1/score", body)
    doc = msgpack.unpackb(out)
    assert status == 502, doc
    assert doc["results"] == {}
    assert doc["errors"]["m1"]["status"] == 404 and doc["errors"]["deadm"]["status"] == 503


def test_a_replica_that_hangs_up_mid_request_is_not_retried(stack):
    """Connected and sent: the model may have run, so the root answers 502 and never re-sends to the other
    replica (each of the two hang-up replicas counts the POSTs it received)."""
    root, hang = stack["root"], stack["hang"]
    before = sum(h.posts for h in hang)
    status, out = post(root.url + "/v1/models/hang/score", msgpack.packb({"features": {"a": 1}}))
    assert status == 502, out[:300]
    assert "failed" in json.loads(out)["error"]
    assert sum(h.posts for h in hang) - before == 1
