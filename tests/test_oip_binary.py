"""Binary tensor extension trim: the header is rewritten, kept segments are byte-identical, nothing decoded.

The oracle builds the expected request independently: the JSON header of only
the kept inputs (as tritonclient writes it) followed by their raw bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from trimmer.errors import PayloadError
from trimmer.oip_binary import header_length, trim_binary


def binary_request(tensors: dict[str, np.ndarray], inline: dict[str, list] | None = None) -> tuple[bytes, int]:
    inputs, segs = [], []
    for name, arr in tensors.items():
        inputs.append({"name": name, "shape": list(arr.shape), "datatype": "FP32",
                       "parameters": {"binary_data_size": arr.nbytes}})
        segs.append(arr.tobytes())
    for name, data in (inline or {}).items():
        inputs.append({"name": name, "shape": [len(data)], "datatype": "INT64", "data": data})
    header = json.dumps(
        {"id": "7", "inputs": inputs, "outputs": [{"name": "score", "parameters": {"binary_data": True}}]}).encode()
    return header + b"".join(segs), len(header)


def test_kept_segments_are_verbatim_and_the_header_names_only_kept_inputs():
    rng = np.random.default_rng(3)
    tensors = {f"f{i}": rng.standard_normal(5 + i).astype(np.float32) for i in range(6)}
    body, hlen = binary_request(tensors, inline={"ids": [1, 2, 3], "other": [9]})
    allow = {"f1", "f4", "ids"}
    out, n_in, n_kept, new_hlen = trim_binary(body, hlen, allow)
    assert (n_in, n_kept) == (8, 3)
    header = json.loads(out[:new_hlen])
    assert [i["name"] for i in header["inputs"]] == ["f1", "f4", "ids"]
    assert header["id"] == "7" and header["outputs"] == [{"name": "score", "parameters": {"binary_data": True}}]
    assert header["inputs"][2]["data"] == [1, 2, 3]
    assert out[new_hlen:] == tensors["f1"].tobytes() + tensors["f4"].tobytes()


def test_nothing_allowed_keeps_no_segment_and_everything_allowed_is_the_same_request():
    tensors = {"a": np.arange(4, dtype=np.float32), "b": np.ones(3, dtype=np.float32)}
    body, hlen = binary_request(tensors)
    out, _, kept, new_hlen = trim_binary(body, hlen, set())
    assert kept == 0 and out[new_hlen:] == b"" and json.loads(out[:new_hlen])["inputs"] == []
    out, _, kept, new_hlen = trim_binary(body, hlen, {"a", "b"})
    assert kept == 2 and json.loads(out[:new_hlen]) == json.loads(body[:hlen]) and out[new_hlen:] == body[hlen:]


@pytest.mark.parametrize("mutate, needle", [
    (lambda b, h: (b[:-1], h), "runs past the body"),
    (lambda b, h: (b + b"x", h), "after the last input"),
    (lambda b, h: (b"{not json" + b[h:], 9), "bad JSON header"),
])
def test_segments_that_do_not_add_up_are_a_400(mutate, needle):
    body, hlen = binary_request({"a": np.arange(4, dtype=np.float32)})
    body, hlen = mutate(body, hlen)
    with pytest.raises(PayloadError, match=needle):
        trim_binary(body, hlen, {"a"})


@pytest.mark.parametrize("value", ["", "x", "0", "-5", "100000"])
def test_header_length_must_lie_inside_the_body(value):
    with pytest.raises(PayloadError, match="Inference-Header-Content-Length"):
        header_length(value, 1000)
