"""The msgpack trim of trimmer/_fasttrim.c in Python: the same API, the same bytes, the same errors.

Why: the root must work (more slowly) where the C extension did not build, or with TRIMMER_NO_EXTENSIONS=1
(trimmer/extensions.py), and a client must not see a different body because of how the root was installed.
Why a port and not msgspec (decode the maps as `Raw` values, re-encode the kept ones): re-encoding rewrites a
key sent in a longer form than it needs (str8 for a 3-byte name) and merges repeated keys, so its bytes differ
from the C trim's on such bodies, which the C trim copies as they came. This reads the same grammar as
msgpack_format.h, in the same order, so a malformed body gets the same one-line ValueError.

It scans the joined body at finish(): nothing overlaps the body's arrival, as the C Trimmer's feed() does.
"""

from __future__ import annotations

from typing import AbstractSet

MAX_DEPTH = 256  # containers nested deeper are refused (as the C reader's MAX_DEPTH)

# The grammar, as msgpack_format.h writes it: (first type byte, last, kind, head, length width, length in the type
# byte). head: the bytes before the payload (a scalar's whole size); width 0: the type byte carries the length.
_SCALAR, _STR, _BIN, _EXT, _ARRAY, _MAP, _INVALID = range(7)
_GRAMMAR = (
    (0x00, 0x7F, _SCALAR, 1, 0, False),  # positive fixint
    (0x80, 0x8F, _MAP, 1, 0, True),  # fixmap
    (0x90, 0x9F, _ARRAY, 1, 0, True),  # fixarray
    (0xA0, 0xBF, _STR, 1, 0, True),  # fixstr
    (0xC0, 0xC0, _SCALAR, 1, 0, False),  # nil
    (0xC1, 0xC1, _INVALID, 1, 0, False),  # never used
    (0xC2, 0xC3, _SCALAR, 1, 0, False),  # false, true
    (0xC4, 0xC4, _BIN, 2, 1, False), (0xC5, 0xC5, _BIN, 3, 2, False), (0xC6, 0xC6, _BIN, 5, 4, False),
    (0xC7, 0xC7, _EXT, 3, 1, False), (0xC8, 0xC8, _EXT, 4, 2, False), (0xC9, 0xC9, _EXT, 6, 4, False),
    (0xCA, 0xCA, _SCALAR, 5, 0, False), (0xCB, 0xCB, _SCALAR, 9, 0, False),  # float 32/64
    (0xCC, 0xCC, _SCALAR, 2, 0, False), (0xCD, 0xCD, _SCALAR, 3, 0, False),  # uint 8/16
    (0xCE, 0xCE, _SCALAR, 5, 0, False), (0xCF, 0xCF, _SCALAR, 9, 0, False),  # uint 32/64
    (0xD0, 0xD0, _SCALAR, 2, 0, False), (0xD1, 0xD1, _SCALAR, 3, 0, False),  # int 8/16
    (0xD2, 0xD2, _SCALAR, 5, 0, False), (0xD3, 0xD3, _SCALAR, 9, 0, False),  # int 32/64
    (0xD4, 0xD4, _SCALAR, 3, 0, False), (0xD5, 0xD5, _SCALAR, 4, 0, False), (0xD6, 0xD6, _SCALAR, 6, 0, False),
    (0xD7, 0xD7, _SCALAR, 10, 0, False), (0xD8, 0xD8, _SCALAR, 18, 0, False),  # fixext 1/2/4/8/16
    (0xD9, 0xD9, _STR, 2, 1, False), (0xDA, 0xDA, _STR, 3, 2, False), (0xDB, 0xDB, _STR, 5, 4, False),
    (0xDC, 0xDC, _ARRAY, 3, 2, False), (0xDD, 0xDD, _ARRAY, 5, 4, False),
    (0xDE, 0xDE, _MAP, 3, 2, False), (0xDF, 0xDF, _MAP, 5, 4, False),
    (0xE0, 0xFF, _SCALAR, 1, 0, False),  # negative fixint
)
_KIND, _HEAD, _LENW, _N, _FIXED = ([0] * 256 for _ in range(5))
for _first, _last, _kind, _head, _lenw, _in_byte in _GRAMMAR:
    for _t in range(_first, _last + 1):
        _KIND[_t], _HEAD[_t], _LENW[_t] = _kind, _head, _lenw
        _N[_t] = _t - _first if _in_byte else 0
        # the whole size when the type byte gives it (scalars, fixstr): one lookup skips them
        _FIXED[_t] = _head if _kind == _SCALAR else _head + _N[_t] if _kind == _STR and _in_byte else 0

_FIXMAP, _FIXMAP_MAX, _MAP16, _MAP32 = 0x80, 0x0F, 0xDE, 0xDF  # the map headers the trim writes
_FIXSTR, _FIXSTR_LAST = 0xA0, 0xBF

TRUNCATED = "truncated msgpack body"


def _header(b: bytes, pos: int, t: int) -> tuple[int, int]:
    """The length or count that the header at pos (type byte t) declares, and the position after the header."""
    w = _LENW[t]
    if not w:
        return _N[t], pos + 1
    end = pos + _HEAD[t]
    if end > len(b):
        raise ValueError(TRUNCATED)
    return int.from_bytes(b[pos + 1:pos + 1 + w], "big"), end


def _skip_one(b: bytes, pos: int, depth: int) -> int:
    """The position after the object at pos. One frame per nesting level (MAX_DEPTH bounds the recursion)."""
    if depth > MAX_DEPTH:
        raise ValueError("msgpack body nested too deeply")
    n = len(b)
    if pos >= n:
        raise ValueError(TRUNCATED)
    t = b[pos]
    k = _FIXED[t]
    if k:
        if pos + k > n:
            raise ValueError(TRUNCATED)
        return pos + k
    kind = _KIND[t]
    if kind == _INVALID:
        raise ValueError("invalid msgpack type byte 0xc1")
    length, pos = _header(b, pos, t)
    if kind != _ARRAY and kind != _MAP:  # str, bin, ext: that many bytes
        if pos + length > n:
            raise ValueError(TRUNCATED)
        return pos + length
    count = length if kind == _ARRAY else 2 * length
    if count > n - pos:  # every object takes at least one byte
        raise ValueError("truncated msgpack body (container declares more items than bytes remain)")
    if count:
        # All items encoded alike (a list of float64, of small ints, ...): checked in one slice, not one by one.
        t0 = b[pos]
        e0 = _FIXED[t0]
        end = pos + count * e0
        if e0 and end <= n and b[pos:end:e0].count(t0) == count:
            return end
    depth += 1
    for _ in range(count):
        if pos >= n:
            raise ValueError(TRUNCATED)
        k = _FIXED[b[pos]]
        if k:
            if pos + k > n:
                raise ValueError(TRUNCATED)
            pos += k
        else:
            pos = _skip_one(b, pos, depth)
    return pos


def _read_map_header(b: bytes, pos: int) -> tuple[int, int] | None:
    """(count, position after the header), or None when the object there is not a map."""
    if pos >= len(b):
        raise ValueError(TRUNCATED)
    t = b[pos]
    return _header(b, pos, t) if _KIND[t] == _MAP else None


def _read_str(b: bytes, pos: int) -> tuple[str, int] | None:
    """(the str, position after it), or None when the object there is not a str."""
    if pos >= len(b):
        raise ValueError(TRUNCATED)
    t = b[pos]
    if _KIND[t] != _STR:
        return None
    k, pos = _header(b, pos, t)
    end = pos + k
    if end > len(b):
        raise ValueError(TRUNCATED)
    try:
        return b[pos:end].decode("utf-8"), end  # strict, as the C check: no overlongs, surrogates or > U+10FFFF
    except UnicodeDecodeError:
        raise ValueError("map key is not valid UTF-8") from None


def _map_header(c: int) -> bytes:
    """The shortest map header for c entries (what msgpack encoders write)."""
    if c <= _FIXMAP_MAX:
        return bytes((_FIXMAP | c,))
    if c <= 0xFFFF:
        return bytes((_MAP16,)) + c.to_bytes(2, "big")
    return bytes((_MAP32,)) + (c & 0xFFFFFFFF).to_bytes(4, "big")


def _scan(b: bytes, allow: AbstractSet[str]) -> tuple[bytes, int, int] | None:
    n = len(b)
    top = _read_map_header(b, 0)
    if top is None:
        raise ValueError("request must be a map at the top level")
    n_top, pos = top
    top_hdr_end = pos
    found = None  # (start of the "features" value, its end, declared entries, kept entries)
    for _ in range(n_top):
        key = _read_str(b, pos)
        if key is None:
            raise ValueError("request keys must be strings")
        name, pos = key
        if name != "features":
            pos = _skip_one(b, pos, 1)
            continue
        if found is not None:
            raise ValueError('duplicate "features" key in request')
        start = pos
        feats = _read_map_header(b, pos)
        if feats is None:
            raise ValueError('"features" must be a map of feature name to value')
        n_feat, pos = feats
        if n_feat > n - pos:
            raise ValueError(TRUNCATED)
        kept: list[bytes] = []
        for _ in range(n_feat):
            mark = pos
            end = pos + 1 + (b[pos] - _FIXSTR) if pos < n and _FIXSTR <= b[pos] <= _FIXSTR_LAST else 0
            if 0 < end <= n:  # the common key, a whole fixstr: read here (what _read_str does, without the calls)
                try:
                    name = b[pos + 1:end].decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError("map key is not valid UTF-8") from None
                pos = end
            else:
                key = _read_str(b, pos)
                if key is None:
                    raise ValueError('"features" keys must be strings')
                name, pos = key
            k = _FIXED[b[pos]] if pos < n else 0
            if k and pos + k <= n:  # a scalar value: skipped here (what _skip_one does, without the call)
                pos += k
            else:
                pos = _skip_one(b, pos, 2)
            if name in allow:
                kept.append(b[mark:pos])  # the entry's bytes as they came
        found = (start, pos, n_feat, kept)
    if pos != n:
        raise ValueError("trailing bytes after the msgpack request map")
    if found is None:
        return None
    start, end, n_feat, kept = found
    out = b"".join((_map_header(n_top), b[top_hdr_end:start], _map_header(len(kept)), *kept, b[end:]))
    return out, n_feat, len(kept)


def _names(allow: object) -> AbstractSet[str]:
    if isinstance(allow, Names):
        return allow.allow
    if not isinstance(allow, (set, frozenset)):
        raise TypeError("allow must be a set or frozenset of str, or Names")
    return allow


def _bytes(body: object) -> bytes:
    return body if type(body) is bytes else memoryview(body).tobytes()  # type: ignore[arg-type]


def trim(body: object, allow: object, /) -> tuple[bytes, int, int] | None:
    """None when the request map has no "features", else (trimmed body, features in, features kept)."""
    names = _names(allow)
    return _scan(_bytes(body), names)


class Names:
    """The allowlist as the C module's `Names` takes it (there, a compiled lookup table; here, the frozenset)."""

    __slots__ = ("allow",)

    def __init__(self, allow: frozenset[str]) -> None:
        if not isinstance(allow, frozenset):
            raise TypeError("Names(allow): allow must be a frozenset of str (a set could change under the table)")
        self.allow = allow


class Trimmer:
    """The C `Trimmer`'s API: feed() keeps the chunks, finish() trims them joined."""

    __slots__ = ("_allow", "_chunks", "_done", "rescanned")

    def __init__(self, allow: object, size_hint: int = 0) -> None:  # noqa: ARG002 - the C one sizes its output by it
        self._allow = _names(allow)
        self._chunks: list[memoryview] = []
        self._done = False
        self.rescanned = 0

    def feed(self, chunk: object, /) -> None:
        if self._done:
            raise RuntimeError("Trimmer.feed after finish")
        self._chunks.append(memoryview(chunk))  # type: ignore[arg-type] # a view, as the C one holds: no copy yet

    def finish(self) -> tuple[bytes, int, int] | None:
        if self._done:
            raise RuntimeError("Trimmer.finish called twice")
        self._done = True
        chunks, self._chunks = self._chunks, []
        return _scan(b"".join(chunks), self._allow)

