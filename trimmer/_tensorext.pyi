"""Types of the C msgspec ext hook for wire tensors (trimmer/_tensorext.c). Use it through trimmer.codec.ext_hook."""

from collections.abc import Callable
from typing import Any

def configure(tensor_cls: type, dtypes: dict[int, tuple[str, int]], max_ndim: int, ext_code: int,
              fallback: Callable[[int, memoryview], Any], /) -> None: ...
def hook(code: int, data: memoryview, /) -> Any: ...  # a tensor_cls instance, or whatever fallback returns or raises
