"""Typed tensors on the wire: dtype + shape + raw little-endian bytes.

msgpack form: ExtType code 1, payload = u8 dtype code, u8 ndim, ndim x u32le
dims, then the raw data. The leaf wraps the data in place (no copy); the root
never looks inside.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

from .errors import PayloadError

TENSOR_EXT_CODE = 1
JSON_TENSOR_KEY = "$tensor"

# name -> (wire code, itemsize, numpy dtype string or None)
DTYPES: dict[str, tuple[int, int, str | None]] = {
    "bool": (0, 1, "|b1"),
    "int8": (1, 1, "|i1"),
    "uint8": (2, 1, "|u1"),
    "int16": (3, 2, "<i2"),
    "int32": (4, 4, "<i4"),
    "int64": (5, 8, "<i8"),
    "float16": (6, 2, "<f2"),
    "bfloat16": (7, 2, None),
    "float32": (8, 4, "<f4"),
    "float64": (9, 8, "<f8"),
}
_CODE_TO_NAME = {code: name for name, (code, _, _) in DTYPES.items()}
MAX_NDIM = 8


class Tensor:
    """A view over raw tensor bytes; `data` may be a memoryview into the received body.

    Deliberately not a dataclass: msgspec would encode a dataclass as a plain
    map, while a Tensor must go through the ext hook.
    """

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape: tuple[int, ...], data: bytes | memoryview) -> None:
        if dtype not in DTYPES:
            raise PayloadError(f"unknown tensor dtype {dtype!r}; known: {', '.join(DTYPES)}")
        shape = tuple(shape)
        if len(shape) > MAX_NDIM or any((not isinstance(d, int)) or d < 0 for d in shape):
            raise PayloadError(f"bad tensor shape {list(shape)!r}: at most {MAX_NDIM} non-negative dims")
        expected = math.prod(shape) * DTYPES[dtype][1]
        if len(data) != expected:
            raise PayloadError(
                f"tensor of dtype {dtype} and shape {list(shape)} needs {expected} bytes, got {len(data)}")
        self.dtype, self.shape, self.data = dtype, shape, data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return self.dtype == other.dtype and self.shape == other.shape and bytes(self.data) == bytes(other.data)

    def __hash__(self) -> int:
        return hash((self.dtype, self.shape, bytes(self.data)))

    def __repr__(self) -> str:
        return f"Tensor(dtype={self.dtype!r}, shape={self.shape!r}, nbytes={len(self.data)})"

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @classmethod
    def from_numpy(cls, array: Any) -> "Tensor":
        import numpy as np

        arr = np.asarray(array)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # np.ascontiguousarray would also turn 0-d into shape [1]
        name = arr.dtype.name
        if name not in DTYPES or DTYPES[name][2] is None:
            raise PayloadError(f"numpy dtype {arr.dtype} has no wire dtype")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return cls(name, tuple(int(d) for d in arr.shape), arr.tobytes())

    def to_numpy(self) -> Any:
        """A read-only numpy view over the raw bytes (no copy)."""
        import numpy as np

        np_dtype = DTYPES[self.dtype][2]
        if np_dtype is None:
            raise PayloadError(f"dtype {self.dtype} has no numpy equivalent")
        return np.frombuffer(self.data, dtype=np_dtype).reshape(self.shape)

    # --- msgpack ext payload -------------------------------------------------
    def ext_payload(self) -> bytes:
        code = DTYPES[self.dtype][0]
        header = struct.pack(f"<BB{len(self.shape)}I", code, len(self.shape), *self.shape)
        return header + bytes(self.data)

    @classmethod
    def from_ext_payload(cls, payload: memoryview | bytes) -> "Tensor":
        mv = memoryview(payload)
        if len(mv) < 2:
            raise PayloadError("tensor ext payload shorter than its 2-byte header")
        code, ndim = mv[0], mv[1]
        name = _CODE_TO_NAME.get(code)
        if name is None:
            raise PayloadError(f"unknown tensor dtype code {code}")
        if ndim > MAX_NDIM:
            raise PayloadError(f"tensor has {ndim} dims; at most {MAX_NDIM} allowed")
        header_len = 2 + 4 * ndim
        if len(mv) < header_len:
            raise PayloadError("tensor ext payload truncated inside its shape header")
        shape = struct.unpack_from(f"<{ndim}I", mv, 2) if ndim else ()
        return cls(name, tuple(shape), mv[header_len:])

    # --- JSON form -----------------------------------------------------------
    def to_json_obj(self) -> dict[str, Any]:
        return {
            JSON_TENSOR_KEY: {
                "dtype": self.dtype,
                "shape": list(self.shape),
                "data": base64.b64encode(bytes(self.data)).decode("ascii"),
            }
        }

    @classmethod
    def from_json_obj(cls, obj: Any) -> "Tensor":
        if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
            raise PayloadError(f'"{JSON_TENSOR_KEY}" must be an object with exactly dtype, shape and data')
        dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
        if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(data, str):
            raise PayloadError(f'"{JSON_TENSOR_KEY}": dtype must be a string, shape a list, data a base64 string')
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise PayloadError(f'"{JSON_TENSOR_KEY}": shape must be a list of integers')
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise PayloadError(f'"{JSON_TENSOR_KEY}": data is not valid base64 ({exc})') from None
        return cls(dtype, tuple(shape), raw)
