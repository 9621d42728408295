"""Types of the C trim (trimmer/_fasttrim.c). Use it through trimmer.trim, which falls back to trimmer._trim_py."""

from typing_extensions import Buffer
from typing import AbstractSet, final

_Result = tuple[bytes, int, int] | None  # None: the request map has no "features"

@final
class Names:
    """An allowlist compiled once into the C lookup table; pass it wherever `allow` is taken."""

    @property
    def allow(self) -> frozenset[str] | None: ...  # the frozenset it was built from
    def __init__(self, allow: frozenset[str]) -> None: ...

@final
class Trimmer:
    """A trim fed chunk by chunk; finish() gives what trim() gives for the chunks joined."""

    @property
    def rescanned(self) -> int: ...  # bytes scanned, then rewound to wait for the rest of an entry
    def __init__(self, allow: AbstractSet[str] | Names, size_hint: int = 0) -> None: ...
    def feed(self, chunk: Buffer, /) -> None: ...
    def finish(self) -> _Result: ...  # raises ValueError (one line) on a malformed body

def trim(body: Buffer, allow: AbstractSet[str] | Names, /) -> _Result: ...  # raises ValueError on a malformed body
