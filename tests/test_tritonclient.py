"""tritonclient, the official Triton HTTP client, as a real peer of the leaf and of the root.

tritonclient's defaults send every input with the binary tensor extension (`set_data_from_numpy`, header
`Inference-Header-Content-Length`) and ask for binary outputs (`InferRequestedOutput(name)`). These tests run a
real leaf and a real root on loopback and check: the defaults work against the leaf and through the root; the
root drops inputs the model does not declare (bytes sent upstream, from the root's own metric, within 5% of the
declared inputs' bytes); outputs through the root are bit-identical to a direct call; JSON inputs work too.
Oracles: numpy re-implementations of the tiny models below, and tritonclient's own response parsing.
Also here: the leaf's binary-path errors, GET /v2, and model failures that explain themselves.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("tritonclient.http")
import tritonclient.http as th  # noqa: E402

from loadtest.procs import free_port, start  # noqa: E402
from promtext import scrape

torch = pytest.importorskip("torch")

ROWS = 256  # candidates per request: the declared inputs' bytes dwarf the JSON header
DIM = 16


class Scorer(torch.nn.Module):
    """score = x.sum(1) * (1 + u.sum()) + 0.5 * ids + flag; aux = 2 * ids. In the leaf's batched calling convention
    (docs/leaf.md) the per-request inputs u and flag arrive with one row per candidate: [rows, 3] and [rows]."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, flag: torch.Tensor):
        score = x.sum(1) * (1.0 + u.sum(-1)) + 0.5 * ids.to(torch.float32) + flag.to(torch.float32)
        return score, ids * 2


class Failing(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() < 0):
            raise RuntimeError("negative input sum")
        return x * 2


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.lin(a)


SCORER_INFO = {
    "input_names": ["x", "ids", "u", "flag"], "output_names": ["score", "aux"],
    "inputs": {"x": {"dtype": "float32", "shape": [-1, DIM]}, "ids": {"dtype": "int64", "shape": [-1]},
               "u": {"dtype": "float32", "shape": [3], "default": 0.0},
               "flag": {"dtype": "bool", "shape": [], "default": False}},
}


def oracle(x: np.ndarray, ids: np.ndarray, u: np.ndarray, flag: bool) -> tuple[np.ndarray, np.ndarray]:
    # float32 arithmetic, in the model's order of operations
    score = x.sum(1, dtype=np.float32) * np.float32(1.0 + u.sum(dtype=np.float32)) \
        + np.float32(0.5) * ids.astype(np.float32) + np.float32(flag)
    return score.astype(np.float32), ids * 2


def _save(path: Path, module: torch.nn.Module, info: dict, fmt: str = "pt", example: tuple = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(info)
    if fmt == "pt":
        torch.jit.save(torch.jit.script(module), str(path), _extra_files={"module_info.json": text})
    else:
        torch.export.save(torch.export.export(module, example), str(path), extra_files={"module_info.json": text})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tritonclient")
    repo = tmp / "models"
    _save(repo / "scorer" / "1" / "model.pt", Scorer(), SCORER_INFO)
    _save(repo / "failing" / "1" / "model.pt", Failing(), {"input_names": ["x"], "output_names": ["y"]})
    _save(repo / "untyped" / "1" / "model.pt2", Linear(), {"input_names": ["a"], "output_names": ["y"]}, "pt2",
          (torch.zeros(3, 2),))  # exported for 3 rows exactly
    lport = free_port()
    leaf = start("leaf", ["leaf", "--repo", str(repo), "--port", str(lport), "--torch-threads", "1"], lport,
                 "/v2/health/ready", tmp, timeout=180)
    root = None
    try:
        rport = free_port()
        cfg = {"listen": {"host": "127.0.0.1", "port": rport}, "admin": {"on_service_port": True},
               "repositories": [str(repo)], "watch": False,
               "partitions": {"leaves": {"replicas": [leaf.url], "protocol": "native"}},
               "models": {"scorer": {"partition": "leaves"}}, "unknown_models": {"policy": "reject"}}
        (tmp / "root.yaml").write_text(yaml.safe_dump(cfg))
        root = start("root", ["root", "--config", str(tmp / "root.yaml"), "--port", str(rport)], rport,
                     "/readyz", tmp, timeout=60)
        yield {"leaf": leaf, "root": root, "tmp": tmp}
    finally:
        if root is not None:
            root.stop()
        leaf.stop()


def client(url: str) -> th.InferenceServerClient:
    return th.InferenceServerClient(url=url.split("://", 1)[1], network_timeout=60.0, connection_timeout=10.0)


def data(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((ROWS, DIM)).astype(np.float32),
            "ids": rng.integers(-1000, 1000, ROWS).astype(np.int64),
            "u": rng.standard_normal(3).astype(np.float32), "flag": np.array(True)}


DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.bool_): "BOOL"}


def inputs_for(values: dict[str, np.ndarray], binary: bool = True, extras: int = 0) -> list[th.InferInput]:
    out = []
    for name, arr in values.items():
        inp = th.InferInput(name, list(arr.shape), DATATYPES[arr.dtype])
        inp.set_data_from_numpy(arr, binary_data=binary)
        out.append(inp)
    rng = np.random.default_rng(99)
    for i in range(extras):  # features the model does not declare: the root must drop them
        arr = rng.standard_normal((ROWS, DIM)).astype(np.float32)
        inp = th.InferInput(f"extra_{i}", list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr, binary_data=binary)
        out.append(inp)
    return out


def check_oracle(result: th.InferResult, values: dict[str, np.ndarray]) -> None:
    score, aux = oracle(values["x"], values["ids"], values["u"], bool(values["flag"]))
    np.testing.assert_allclose(result.as_numpy("score"), score, rtol=1e-5, atol=1e-5)
    assert result.as_numpy("score").dtype == np.float32 and result.as_numpy("score").shape == (ROWS,)
    np.testing.assert_array_equal(result.as_numpy("aux"), aux)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# ---------------------------------------------------------------------- tritonclient, defaults
def test_defaults_against_the_leaf(stack):
    values = data(1)
    c = client(stack["leaf"].url)
    # binary inputs; binary outputs asked per output (InferRequestedOutput's default)
    result = c.infer("scorer", inputs_for(values),
                     outputs=[th.InferRequestedOutput("score"), th.InferRequestedOutput("aux")], request_id="r-1")
    check_oracle(result, values)
    resp = result.get_response()
    assert resp["id"] == "r-1" and resp["model_name"] == "scorer" and resp["model_version"] == "1"
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in resp["outputs"]}
    assert sizes == {"score": ROWS * 4, "aux": ROWS * 8} and all("data" not in o for o in resp["outputs"])
    # no outputs named: tritonclient sets binary_data_output, every output comes back binary
    result = c.infer("scorer", inputs_for(values), model_version="1")
    check_oracle(result, values)
    assert all(o["parameters"]["binary_data_size"] > 0 for o in result.get_response()["outputs"])


def test_json_inputs_and_outputs_against_the_leaf_and_through_the_root(stack):
    values = data(2)
    for url in (stack["leaf"].url, stack["root"].url):
        result = client(url).infer("scorer", inputs_for(values, binary=False),
                                   outputs=[th.InferRequestedOutput("score", binary_data=False),
                                            th.InferRequestedOutput("aux", binary_data=False)])
        check_oracle(result, values)
        assert all("data" in o and "parameters" not in o for o in result.get_response()["outputs"])


def test_defaults_through_the_root_drop_extras_and_answer_as_the_leaf(stack):
    leaf, root = stack["leaf"], stack["root"]
    values = data(3)
    declared = sum(a.nbytes for a in values.values())
    direct = client(leaf.url).infer("scorer", inputs_for(values))
    sent0 = scrape(root.url, "trimmer_root_upstream_sent_bytes_total", model="scorer")
    via = client(root.url).infer("scorer", inputs_for(values, extras=10))
    sent = scrape(root.url, "trimmer_root_upstream_sent_bytes_total", model="scorer") - sent0
    assert 0 < sent <= 1.05 * declared, (sent, declared)
    check_oracle(via, values)
    for name in ("score", "aux"):  # bit-identical to the direct call
        a, b = direct.as_numpy(name), via.as_numpy(name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert via.get_response()["outputs"][0]["parameters"]["binary_data_size"] == ROWS * 4


def test_defaults_against_the_leaf_ignore_undeclared_and_bytes_inputs(stack):
    values = data(4)
    extra = th.InferInput("names", [2], "BYTES")
    extra.set_data_from_numpy(np.array([b"a", b"bc"], dtype=object))
    result = client(stack["leaf"].url).infer("scorer", inputs_for(values, extras=2) + [extra])
    check_oracle(result, values)


# ---------------------------------------------------------------------- the binary format, by hand
def binary_body(values: dict[str, np.ndarray], params: dict | None = None,
                outputs: list | None = None) -> tuple[bytes, int]:
    header: dict = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": DATATYPES[a.dtype],
                                "parameters": {"binary_data_size": a.nbytes}} for n, a in values.items()]}
    if params:
        header["parameters"] = params
    if outputs is not None:
        header["outputs"] = outputs
    h = json.dumps(header).encode()
    return h + b"".join(a.tobytes() for a in values.values()), len(h)


def split_response(headers: dict[str, str], body: bytes) -> tuple[dict, bytes]:
    n = int(headers["Inference-Header-Content-Length"])
    return json.loads(body[:n]), body[n:]


def test_per_output_binary_false_wins_over_request_binary_data_output(stack):
    values = data(5)
    body, n = binary_body(values, {"binary_data_output": True},
                          [{"name": "aux", "parameters": {"binary_data": False}}, {"name": "score"}])
    status, headers, out = post(stack["leaf"].url + "/v2/models/scorer/infer", body,
                                {"Inference-Header-Content-Length": str(n)})
    assert status == 200, out
    head, rest = split_response(headers, out)
    score, aux = oracle(values["x"], values["ids"], values["u"], True)
    by = {o["name"]: o for o in head["outputs"]}
    assert [o["name"] for o in head["outputs"]] == ["aux", "score"]
    assert by["aux"]["data"] == aux.tolist() and "parameters" not in by["aux"]
    assert by["score"]["parameters"] == {"binary_data_size": ROWS * 4} and len(rest) == ROWS * 4
    np.testing.assert_allclose(np.frombuffer(rest, np.float32), score, rtol=1e-5, atol=1e-5)
    # nothing binary asked: a plain JSON answer, no header
    body, n = binary_body(values)
    status, headers, out = post(stack["leaf"].url + "/v2/models/scorer/infer", body,
                                {"Inference-Header-Content-Length": str(n)})
    assert status == 200 and "Inference-Header-Content-Length" not in headers
    assert json.loads(out)["outputs"][1]["data"] == aux.tolist()


def test_binary_requests_keep_the_allowlist_handshake(stack):
    from trimmer.handshake import input_digest

    url = stack["leaf"].url + "/v2/models/scorer/versions/1/infer"
    body, n = binary_body(data(6), {"binary_data_output": True})
    h = {"Inference-Header-Content-Length": str(n)}
    status, headers, out = post(url, body, {**h, "X-Trimmer-Signature": input_digest(["x", "ids"])})
    assert status == 412 and json.loads(out)["code"] == "allowlist_mismatch" and headers.get(
        "X-Trimmer-Mismatch") == "allowlist"
    status, _, out = post(url, body, {**h, "X-Trimmer-Signature": input_digest(SCORER_INFO["input_names"])})
    assert status == 200, out


def _bad_binary(case: str) -> tuple[bytes, dict[str, str], str]:
    values = data(7)
    body, n = binary_body(values)
    h = {"Inference-Header-Content-Length": str(n)}
    if case == "header past body":
        return body, {"Inference-Header-Content-Length": str(len(body) + 1)}, "Inference-Header-Content-Length"
    if case == "not a number":
        return body, {"Inference-Header-Content-Length": "12x"}, "Inference-Header-Content-Length"
    if case == "segment short":
        return body[:-8], h, "runs past the body"
    if case == "trailing bytes":
        return body + b"\0" * 4, h, "after the last input"
    if case == "size does not fit shape":
        header = json.loads(body[:n])
        header["inputs"][0]["shape"] = [ROWS, DIM + 1]
        hb = json.dumps(header).encode()
        return hb + body[n:], {"Inference-Header-Content-Length": str(len(hb))}, "does not fit"
    if case == "bool not 0/1":
        return body[:-1] + b"\x02", h, "BOOL"
    if case == "unknown output":
        body, n = binary_body(values, outputs=[{"name": "nope"}])
        return body, {"Inference-Header-Content-Length": str(n)}, "unknown output"
    if case == "shared memory":
        header = {
            "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"shared_memory_region": "r"}}]}
        return json.dumps(header).encode(), {}, "shared-memory"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["header past body", "not a number", "segment short", "trailing bytes",
                                  "size does not fit shape", "bool not 0/1", "unknown output", "shared memory"])
def test_bad_binary_requests_get_400(stack, case):
    body, headers, words = _bad_binary(case)
    status, _, out = post(stack["leaf"].url + "/v2/models/scorer/infer", body, headers)
    assert status == 400, out
    assert words.lower() in json.loads(out)["error"].lower()


def test_server_metadata(stack):
    with urllib.request.urlopen(stack["leaf"].url + "/v2", timeout=10) as r:
        meta = json.loads(r.read())
    assert meta["name"] and meta["version"] and "binary_tensor_data" in meta["extensions"]


# ---------------------------------------------------------------------- errors that explain themselves
def _infer_json(url: str, model: str, name: str, datatype: str, values: list, request_id: str) -> tuple[int, dict]:
    body = json.dumps({"id": request_id, "inputs": [{"name": name, "shape": [len(values) // 2, 2] if model == "untyped"
                                                     else [len(values)],
                                                     "datatype": datatype, "data": values}]}).encode()
    status, _, out = post(f"{url}/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
    return status, json.loads(out)


def test_model_failure_is_a_500_logged_once_per_interval_with_model_version_request_and_exception(stack):
    leaf = stack["leaf"]
    status, out = _infer_json(leaf.url, "failing", "x", "FP32", [1.0, 2.0], "ok-1")
    assert status == 200 and out["outputs"][0]["data"] == [2.0, 4.0]
    for i in range(12):
        status, out = _infer_json(leaf.url, "failing", "x", "FP32", [-1.0, -2.0], f"req-{i}")
        assert status == 500 and "negative input sum" in out["error"], out
    lines = [ln for ln in leaf.log_path.read_text().splitlines() if "negative input sum" in ln]
    assert 1 <= len(lines) < 12, lines
    first = lines[0]
    assert "ERROR" in first and "failing" in first and "version 1" in first and "'req-0'" in first \
        and "RuntimeError" in first
    # the TorchScript traceback is not in the log line or the answer: one line each
    assert "TorchScript" not in first and "TorchScript" not in out["error"]


def test_dtype_mismatch_names_the_input_and_the_signature_fix(stack):
    leaf = stack["leaf"]
    status, out = _infer_json(leaf.url, "untyped", "a", "FP32", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "f-1")
    assert status == 200, out
    status, out = _infer_json(leaf.url, "untyped", "a", "INT64", [1, 2, 3, 4, 5, 6], "i-1")
    assert status == 400, out
    assert out["code"] == "dtype_mismatch"
    assert "input a (sent as int64)" in out["error"] and "inputs.a.dtype" in out["error"], out
    lines = [ln for ln in leaf.log_path.read_text().splitlines() if "inputs.a.dtype" in ln]
    assert lines and "WARNING" in lines[0] and "untyped" in lines[0] and "'i-1'" in lines[0]


def test_gzip_compressed_binary_request_against_the_leaf(stack):
    """tritonclient's request_compression_algorithm: Inference-Header-Content-Length counts the decompressed body."""
    values = data(8)
    result = client(stack["leaf"].url).infer("scorer", inputs_for(values), request_compression_algorithm="gzip")
    check_oracle(result, values)


def test_concurrent_unbatched_requests_each_get_their_own_answer(stack):
    """`failing` has a spec-less signature, so it runs un-batched: cheap forwards inline on the event loop, others in
    the model thread. Many clients at once must never see another request's answer."""
    import concurrent.futures

    url = stack["leaf"].url

    def one(i: int) -> None:
        vals = [float(i), float(i) + 0.5]
        status, out = _infer_json(url, "failing", "x", "FP32", vals, f"c-{i}")
        assert status == 200 and out["id"] == f"c-{i}" and out["outputs"][0]["data"] == [2 * v for v in vals], out

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(200)))


def test_leaf_bench_oip_mode_runs_every_route_without_errors(stack):
    """`trimmer leaf bench --mode oip`, tiny: its native, OIP JSON and OIP binary bodies are all answered 200."""
    import subprocess

    from loadtest.procs import trimmer_cmd

    out = stack["tmp"] / "bench.json"
    proc = subprocess.run(trimmer_cmd("leaf", "bench", "--mode", "oip", "--repo", str(stack["tmp"] / "models"),
                                      "--model", "scorer",
                                      "--clients", "2", "--seconds", "0.5", "--candidates", "8", "--oip-batches", "4",
                                      "--json", str(out)), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["route"] for r in runs] == ["native msgpack", "OIP JSON", "OIP binary"]
    assert all(r["errors"] == 0 and r["requests"] > 0 and r["ratio_to_native"] is not None for r in runs), runs
