"""The leaf's hot-path msgpack request decoding and response tensors.

Same wire format and the same checks as trimmer.codec.decode_request / trimmer.tensor (docs/protocol.md),
with a leaner ext hook: one precompiled struct per rank and no re-validation of what was just parsed.
Anything unusual (unknown dtype code, truncated header, byte length not matching the shape) is handed to
trimmer's own parser so the error text is the library's. JSON bodies go through trimmer.codec unchanged.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgspec

from trimmer import codec
from trimmer.errors import PayloadError
from trimmer.tensor import DTYPES, MAX_NDIM, TENSOR_EXT_CODE, Tensor

_BY_CODE: dict[int, tuple[str, int]] = {code: (name, size) for name, (code, size, _) in DTYPES.items()}
_SHAPES = [struct.Struct(f"<{n}I") for n in range(MAX_NDIM + 1)]
_new = object.__new__


def make_tensor(dtype: str, shape: tuple[int, ...], data: Any) -> Tensor:
    """A wire Tensor whose dtype, shape and byte length are already known to agree (skips re-validation)."""
    t = _new(Tensor)
    t.dtype, t.shape, t.data = dtype, shape, data
    return t


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == TENSOR_EXT_CODE and len(data) >= 2:
        info = _BY_CODE.get(data[0])
        ndim = data[1]
        head = 2 + 4 * ndim
        if info is not None and ndim <= MAX_NDIM and len(data) >= head:
            shape = _SHAPES[ndim].unpack_from(data, 2)
            if len(data) - head == math.prod(shape) * info[1]:
                return make_tensor(info[0], shape, data[head:])
    return codec._ext_hook(code, data)  # raises the library's PayloadError for whatever is wrong


_decoder = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


def decode_request(body: bytes | memoryview, media_type: str) -> dict[str, Any]:
    """trimmer.codec.decode_request for a normalised media type, faster for msgpack."""
    if media_type != codec.MSGPACK:
        return codec.decode_request(body, media_type)
    try:
        obj = _decoder.decode(body)
    except PayloadError:
        raise
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, RecursionError) as exc:
        raise PayloadError(f"malformed msgpack body: {codec._error_text(exc)}") from None
    return codec.check_request(obj)
