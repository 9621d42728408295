"""Fuzzing the codec: random structures, truncations and random bytes never raise anything but PayloadError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimmer.codec import decode_request, encode_json, encode_msgpack, media_type
from trimmer.errors import PayloadError
from trimmer.tensor import TENSOR_EXT_CODE

leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                   st.text(max_size=10), st.binary(max_size=20),
                   st.builds(msgpack.ExtType, st.integers(0, 5), st.binary(max_size=40)))
trees = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                     st.dictionaries(st.one_of(st.text(max_size=5),
                                                                               st.integers(-1000, 1000)), inner,
                                                                               max_size=5)),
                     max_leaves=25)


def _decode_or_payload_error(body: bytes, content_type: str) -> None:
    try:
        decode_request(body, content_type)
    except PayloadError as exc:
        assert "\n" not in str(exc) and str(exc)


@settings(max_examples=300, deadline=None)
@given(tree=trees, cut=st.integers(0, 4096))
def test_random_msgpack_structures(tree: object, cut: int) -> None:
    body = msgpack.packb({"features": tree} if cut % 2 else tree, use_bin_type=True, strict_types=False)
    _decode_or_payload_error(body, "application/msgpack")
    _decode_or_payload_error(body[: cut % (len(body) + 1)], "application/msgpack")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _decode_or_payload_error(data, "application/msgpack")
    _decode_or_payload_error(data, "application/json")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_random_json_text(text: str) -> None:
    _decode_or_payload_error(text.encode("utf-8", "surrogatepass"), "application/json")


@pytest.mark.parametrize("payload, message", [
    (msgpack.ExtType(TENSOR_EXT_CODE, bytes([8, 1]) + (4).to_bytes(4, "little") + b"\x00" * 15),
     "needs 16 bytes, got 15"),
    (msgpack.ExtType(TENSOR_EXT_CODE, bytes([42, 0])), "unknown tensor dtype code 42"),
    (msgpack.ExtType(TENSOR_EXT_CODE, bytes([8, 9])), "at most 8"),
    (msgpack.ExtType(TENSOR_EXT_CODE, bytes([8, 2, 1])), "truncated inside its shape header"),
    (msgpack.ExtType(7, b"xx"), "unknown msgpack ext type 7"),
])
def test_bad_tensors(payload: msgpack.ExtType, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        decode_request(msgpack.packb({"features": {"t": payload}}), "application/msgpack")


@pytest.mark.parametrize("body, message", [
    (b'{"features": {"t": {"$tensor": {"dtype": "float32", "shape": [2], "data": "AAAA"}}}}', "needs 8 bytes, got 3"),
    (b'{"features": {"t": {"$tensor": {"dtype": "float32", "shape": [1], "data": "!!"}}}}', "not valid base64"),
    (b'{"features": {"t": {"$tensor": [1]}}}', "exactly dtype, shape and data"),
    (b'{"features": [1]}', '"features" must be a map'),
    (b'[1, 2]', "must be a map at the top level"),
    (b'{"features": {"": 1}}', "non-empty strings"),
    (b'[' * 10_000 + b']' * 10_000, "malformed JSON"),
])
def test_bad_json_requests(body: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        decode_request(body, "application/json")


def test_content_types() -> None:
    assert media_type("application/msgpack") == media_type("application/x-msgpack; charset=binary")
    assert media_type("application/json; charset=utf-8") == "application/json"
    with pytest.raises(PayloadError, match="unsupported content type 'text/plain'"):
        media_type("text/plain")
    with pytest.raises(PayloadError, match=r"\(none\)"):
        media_type(None)


def test_encoders_roundtrip_non_feature_keys() -> None:
    req = {"request_id": "r", "models": [{"name": "m"}], "features": {"a": 1.5, "b": [1, 2], "c": "s"}}
    assert decode_request(encode_msgpack(req), "application/msgpack") == req
    assert decode_request(encode_json(req), "application/json") == req
