"""leaf/oip.py in process: OIP JSON and binary bodies become the same wire tensors as a native request, and every
malformed body is a PayloadError (400) that says what is wrong. Oracles: numpy arrays built here, tritonclient's
own request encoder, and Python's json module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
from leaf import oip  # noqa: E402
from loadtest.bench.leaf import oip_bodies  # noqa: E402
from trimmer.errors import PayloadError  # noqa: E402
from trimmer.tensor import Tensor  # noqa: E402


@pytest.fixture(params=["simdjson", "msgspec"], autouse=True)
def json_path(request, monkeypatch):
    """Every test runs with the simdjson accelerator and without it (the msgspec path): same results, same errors."""
    if request.param == "msgspec":
        monkeypatch.setattr(oip, "_simdjson", None)
    elif oip._simdjson is None:
        pytest.skip("pysimdjson not installed")
    return request.param


def features(seed: int = 0) -> dict[str, Tensor]:
    rng = np.random.default_rng(seed)
    return {"emb": Tensor.from_numpy(rng.standard_normal((5, 3)).astype(np.float32)),
            "ids": Tensor.from_numpy(rng.integers(-2**62, 2**62, 5).astype(np.int64)),
            "age": Tensor.from_numpy(np.array(31.5, dtype=np.float32)),
            "small": Tensor.from_numpy(np.array([-128, 127], dtype=np.int8)),
            "flags": Tensor.from_numpy(np.array([True, False, True])),
            "wide": Tensor.from_numpy(rng.standard_normal(4)),  # float64
            "half": Tensor.from_numpy(np.array([1.5, -2.0], dtype=np.float16))}


def same(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.data) == bytes(b.data)


def test_json_and_binary_bodies_give_the_native_tensors_bit_for_bit():
    f = features()
    json_body, (bin_body, n) = oip_bodies(f, "r1")
    for body, header in ((json_body, None), (bin_body, str(n))):
        req, got = oip.parse_request(body, header)
        assert req.id == "r1" and set(got) == set(f)
        for k in f:
            assert same(got[k], f[k]), k


def test_tritonclient_encoded_request_parses():
    th = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    f = features(1)
    inputs = []
    for i, (name, t) in enumerate(f.items()):
        arr = t.to_numpy()
        inp = th.InferInput(name, list(arr.shape), oip.WIRE_TO_OIP[t.dtype])
        inp.set_data_from_numpy(arr, binary_data=i % 2 == 0)  # a mix of binary and JSON inputs
        inputs.append(inp)
    s = th.InferInput("names", [2], "BYTES")
    s.set_data_from_numpy(np.array([b"a", b"bcd"], dtype=object))
    body, n = _get_inference_request(inputs + [s], "x", None, 0, False, False, 0, None, None)
    req, got = oip.parse_request(body, str(n))
    assert req.parameters is not None and req.parameters.binary_data_output is True
    assert got["names"] == oip.BYTES_PLACEHOLDER
    for k in f:
        assert same(got[k], f[k]), k


def body(inputs: list, **top) -> bytes:
    return json.dumps({"inputs": inputs, **top}).encode()


def test_nested_data_is_row_major():
    req, got = oip.parse_request(
        body([{"name": "a", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]), None)
    assert got["a"].to_numpy().tolist() == [[1, 2], [3, 4]]


def test_bf16_json_values_round_to_bfloat16():
    torch = pytest.importorskip("torch")
    _, got = oip.parse_request(body([{"name": "a", "shape": [3], "datatype": "BF16", "data": [1.0, 0.1, -3]}]), None)
    want = torch.tensor([1.0, 0.1, -3.0], dtype=torch.float32).to(torch.bfloat16)
    assert got["a"].dtype == "bfloat16" and bytes(got["a"].data) == want.view(torch.int16).numpy().tobytes()


BAD = [
    ("not json", b'{"inputs": [', None, "malformed JSON"),
    ("inputs not a list", b'{"inputs": 3}', None, "bad inference request"),
    ("no shape", body([{"name": "a", "datatype": "FP32", "data": [1]}]), None, "shape"),
    ("negative dim", body([{"name": "a", "shape": [-1], "datatype": "FP32", "data": [1]}]), None, "non-negative"),
    ("bad datatype", body([{"name": "a", "shape": [1], "datatype": "FP128", "data": [1]}]),
     None, "unsupported datatype"),
    ("count", body([{"name": "a", "shape": [3], "datatype": "FP32", "data": [1, 2]}]), None, "needs 3"),
    ("floats for ints", body([{"name": "a", "shape": [2], "datatype": "INT64", "data": [1, 2.5]}]), None, "integers"),
    ("bools for floats", body([{"name": "a", "shape": [2], "datatype": "FP32", "data": [1.0, True]}]), None, "numbers"),
    ("nested bools for floats",
     body([{"name": "a", "shape": [2, 1], "datatype": "FP32", "data": [[1.0], [True]]}]), None, "numbers"),
    ("ints for bools", body([{"name": "a", "shape": [2], "datatype": "BOOL", "data": [1, 0]}]), None, "booleans"),
    ("ragged", body([{"name": "a", "shape": [3], "datatype": "INT32", "data": [[1, 2], [3]]}]), None, "row-major"),
    ("strings", body([{"name": "a", "shape": [1], "datatype": "FP32", "data": ["1"]}]), None, "numbers"),
    ("int8 range", body([{"name": "a", "shape": [1], "datatype": "INT8", "data": [300]}]), None, "out of range"),
    ("int64 range", body([{"name": "a", "shape": [1], "datatype": "INT64", "data": [2**64]}]), None, "INT64"),
    ("duplicate", body([{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}] * 2), None, "more than once"),
    ("no data", body([{"name": "a", "shape": [1], "datatype": "FP32"}]), None, "neither"),
    ("binary size without header",
     body([{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]),
     None, "Inference-Header-Content-Length"),
]


@pytest.mark.parametrize("case,raw,header,words", BAD, ids=[b[0] for b in BAD])
def test_malformed_bodies_are_payload_errors(case, raw, header, words):
    with pytest.raises(PayloadError) as exc:
        oip.parse_request(raw, header)
    assert words.lower() in str(exc.value).lower()


def test_unknown_output_and_selection():
    req, _ = oip.parse_request(
        body([{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}], outputs=[{"name": "zz"}]), None)
    with pytest.raises(PayloadError, match="unknown output 'zz'"):
        oip.check_outputs(req, ("score",))
    outs = [Tensor.from_numpy(np.array([1.0, 2.0], dtype=np.float32)), Tensor.from_numpy(np.array([7], dtype=np.int64))]
    req, _ = oip.parse_request(
        body([{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}], outputs=[{"name": "b"}]), None)
    data, headers = oip.encode_response("m", "1", ("a", "b"), outs, req)
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(data)["outputs"] == [{"name": "b", "datatype": "INT64", "shape": [1], "data": [7]}]


def test_json_numbers_parse_to_the_same_bits_on_both_paths(json_path):
    """Tricky values: the shortest repr of float32s, subnormals, extremes, -0.0, ints at the int64 limits; each must
    come out as numpy's own cast of the correctly rounded double (the oracle)."""
    rng = np.random.default_rng(5)
    f32 = np.concatenate([rng.standard_normal(200).astype(np.float32),
                          np.array([0.1, -0.0, 1e-45, 3.4028235e38, -3.4028235e38,
                                                                                    1.17549435e-38, 16777217],
                                                                                    dtype=np.float32)])
    f64 = [0.1, 1e-320, 1.7976931348623157e308, 2.5e-308, 123456789.123456789, -0.0]
    ints = [-(2**63), 2**63 - 1, 0, -1, 12345678901234]
    text = ("{\"inputs\": [{\"name\": \"a\", \"shape\": [%d], \"datatype\": \"FP32\", \"data\": %s},"
            " {\"name\": \"b\", \"shape\": [%d], \"datatype\": \"FP64\", \"data\": %s},"
            " {\"name\": \"c\", \"shape\": [%d], \"datatype\": \"INT64\", \"data\": %s},"
            " {\"name\": \"d\", \"shape\": [2], \"datatype\": \"FP16\", \"data\": [1.0009765625, 65504]},"
            " {\"name\": \"e\", \"shape\": [2], \"datatype\": \"UINT8\", \"data\": [0, 255]}]}") % (
        f32.size, json.dumps(f32.astype(float).tolist()), len(f64), json.dumps(f64), len(ints), json.dumps(ints))
    _, got = oip.parse_request(text.encode(), None)
    assert bytes(got["a"].data) == np.array(
        json.loads(json.dumps(f32.astype(float).tolist())), dtype=np.float32).tobytes()
    assert bytes(got["b"].data) == np.array(f64, dtype=np.float64).tobytes()
    assert bytes(got["c"].data) == np.array(ints, dtype=np.int64).tobytes()
    assert bytes(got["d"].data) == np.array([1.0009765625, 65504.0], dtype=np.float16).tobytes()
    assert got["e"].dtype == "uint8" and bytes(got["e"].data) == bytes([0, 255])
