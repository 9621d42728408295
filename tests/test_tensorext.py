"""The C tensor ext hook (trimmer/_tensorext.c) gives the same Tensor, or the same error, as the Python one."""

from __future__ import annotations

import os
import struct

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimmer import codec
from trimmer.errors import PayloadError
from trimmer.tensor import DTYPES, TENSOR_EXT_CODE, Tensor


NO_EXTENSIONS = os.environ.get("TRIMMER_NO_EXTENSIONS", "").strip() not in ("", "0")
# Both hooks where the C one is built and not switched off; the decoder tests run with each.
HOOKS = {"python": codec._ext_hook, **({"c": codec.ext_hook} if codec.ext_hook is not codec._ext_hook else {})}


def test_hook_follows_the_switch() -> None:
    if NO_EXTENSIONS:  # the no-extension test run: the Python hook decodes every tensor
        assert codec.ext_hook is codec._ext_hook
    else:
        # `make test` installs with a compiler; a silent fallback would cost ~1.4 us per tensor on every request
        assert codec.ext_hook is not codec._ext_hook


def _outcome(hook, code: int, payload: bytes):
    try:
        t = hook(code, memoryview(payload))
    except PayloadError as exc:
        return ("error", str(exc))
    assert isinstance(t, Tensor)
    assert isinstance(t.data, memoryview) and t.data.obj is not None  # zero-copy view
    return ("tensor", t.dtype, t.shape, bytes(t.data))


@settings(max_examples=400, deadline=None)
@given(code=st.sampled_from([TENSOR_EXT_CODE, TENSOR_EXT_CODE, TENSOR_EXT_CODE, 2, 7]),
       dtype_code=st.integers(0, 12), dims=st.lists(st.integers(0, 6), max_size=10), extra=st.integers(-3, 3),
       ndim_lie=st.integers(-1, 1), tail=st.binary(max_size=3))
def test_c_hook_matches_python_hook(code, dtype_code, dims, extra, ndim_lie, tail) -> None:
    size = next((s for c, s, _ in DTYPES.values() if c == dtype_code), 1)
    n = max(0, int(np.prod(dims, dtype=np.int64)) * size + extra) if dims else max(0, size + extra)
    header = struct.pack(f"<BB{len(dims)}I", dtype_code, max(0, len(dims) + ndim_lie), *dims)
    for payload in (header + bytes(n), header[: len(header) // 2], (header + bytes(n))[:1], header + bytes(n) + tail):
        assert _outcome(codec.ext_hook, code, payload) == _outcome(codec._ext_hook, code, payload)


@pytest.mark.parametrize("hook", sorted(HOOKS))
@pytest.mark.parametrize("dtype", ["float32", "int64", "bool", "uint8", "float16", "float64"])
def test_roundtrip_through_the_decoder(dtype: str, hook: str) -> None:
    arr = (np.arange(24) % 3).astype(dtype).reshape(2, 3, 4)
    body = codec.encode_msgpack({"features": {"x": Tensor.from_numpy(arr), "s": Tensor.from_numpy(np.float32(2.5))}})
    f = msgspec.msgpack.Decoder(ext_hook=HOOKS[hook]).decode(body)["features"]
    assert isinstance(f["x"].data, memoryview) and f["x"].data.obj is body  # zero-copy with either hook
    assert f["x"].dtype == dtype and f["x"].shape == (2, 3, 4)
    assert np.array_equal(f["x"].to_numpy(), arr)
    assert f["s"].shape == () and float(f["s"].to_numpy()) == 2.5


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_bad_tensor_in_a_request_reads_as_the_library_error(hook: str) -> None:
    body = msgspec.msgpack.encode(
        {"features": {"x": msgspec.msgpack.Ext(TENSOR_EXT_CODE, b"\x08\x01\x05\x00\x00\x00abc")}})
    with pytest.raises(PayloadError, match="needs 20 bytes, got 3"):
        msgspec.msgpack.Decoder(ext_hook=HOOKS[hook]).decode(body)
    with pytest.raises(PayloadError, match="needs 20 bytes, got 3"):
        codec.decode_request(body, codec.MSGPACK)
