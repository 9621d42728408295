"""Response tensors built without re-validation (the leaf's hot path).

Request decoding is trimmer.codec.decode_request: its msgpack ext hook is C when built
(trimmer/_tensorext.c), so the leaf no longer keeps a faster copy of its own.
"""

from __future__ import annotations

from typing import Any

from trimmer.tensor import Tensor

_new = object.__new__


def make_tensor(dtype: str, shape: tuple[int, ...], data: Any) -> Tensor:
    """A wire Tensor whose dtype, shape and byte length are already known to agree (skips re-validation)."""
    t = _new(Tensor)
    t.dtype, t.shape, t.data = dtype, shape, data
    return t
