"""The trim: keep only allowlisted features without decoding any feature value.

msgpack (the primary encoding): a byte-level scan copies each kept feature
entry and every non-feature key verbatim, so the output equals encoding the
kept features alone. Its engine is the C extension trimmer/_fasttrim.c, or
where that is off or not built (trimmer/extensions.py) its Python twin
trimmer/_trim_py.py: the same bytes and the same errors, slower.

JSON and OIP: msgspec's `Raw` gives each value as a view of its original
bytes; the kept views are written back verbatim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AbstractSet, Sequence

import msgspec

from . import _trim_py
from .codec import JSON, MSGPACK, media_type
from .errors import PayloadError
from .extensions import load as load_extension

Raw = msgspec.Raw

_js_map = msgspec.json.Decoder(dict[str, Raw])
_js_list = msgspec.json.Decoder(list[Raw])
_js_encoder = msgspec.json.Encoder()


class _NamedInput(msgspec.Struct):
    """Only the `name` of an Open Inference Protocol input; other fields are skipped, not decoded."""

    name: str


_js_named = msgspec.json.Decoder(_NamedInput)


@dataclass(frozen=True, slots=True)
class TrimResult:
    body: bytes
    features_in: int
    features_kept: int


def _split(decoder: msgspec.msgpack.Decoder | msgspec.json.Decoder,
           data: bytes | Raw, what: str, fmt: str) -> dict[str, Raw]:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise PayloadError(f"{what} must be a map with string keys ({exc})") from None
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # ValueError: invalid UTF-8 in a string
        raise PayloadError(f"malformed {fmt} body: {exc}") from None


def _trim_map(body: bytes, allow: AbstractSet[str], decoder, encoder, fmt: str) -> TrimResult:
    top = _split(decoder, body, "request", fmt)
    features_raw = top.get("features")
    if features_raw is None:
        return TrimResult(body, 0, 0)
    features = _split(decoder, features_raw, '"features"', fmt)
    kept = {name: value for name, value in features.items() if name in allow}
    top["features"] = Raw(encoder.encode(kept))
    return TrimResult(encoder.encode(top), len(features), len(kept))


# The msgpack trim's engine: the C module, or its Python twin (trimmer/_trim_py.py: the same API, bytes and errors).
_fasttrim = load_extension("_fasttrim")
ACCELERATED = _fasttrim is not None
IMPLEMENTATION = "c" if ACCELERATED else "python"  # for logs and status: which engine this process trims with
ENGINES = {"c": _fasttrim, "python": _trim_py} if _fasttrim is not None else {"python": _trim_py}
_ENGINE = ENGINES[IMPLEMENTATION]


def _trim_with(engine, body: bytes, allow: AbstractSet[str]) -> TrimResult:
    try:
        out = engine.trim(body, _compiled_names(allow, engine))
    except ValueError as exc:
        raise PayloadError(f"malformed msgpack body: {exc}") from None
    if out is None:
        return TrimResult(body, 0, 0)
    return TrimResult(*out)


def trim_msgpack_py(body: bytes, allow: AbstractSet[str]) -> TrimResult:
    """The pure-Python engine, whatever TRIMMER_NO_EXTENSIONS says."""
    return _trim_with(_trim_py, body, allow)


def trim_msgpack_c(body: bytes, allow: AbstractSet[str]) -> TrimResult:
    """The C engine (only where ACCELERATED)."""
    return _trim_with(_fasttrim, body, allow)


_COMPILED_MAX = 1024
_compiled: dict[int, object] = {}


def _compiled_names(allow: AbstractSet[str], engine=_ENGINE):
    """The C lookup table for an allowlist, built once per frozenset (registry allowlists are frozensets)."""
    if not isinstance(allow, frozenset):
        return allow if isinstance(allow, set) else frozenset(allow)
    if engine is not _fasttrim:
        return allow  # the Python engine looks names up in the frozenset itself
    names = _compiled.get(id(allow))
    if names is None or names.allow is not allow:  # type: ignore[attr-defined]
        if len(_compiled) >= _COMPILED_MAX:  # reloads make new frozensets; drop the old tables wholesale
            _compiled.clear()
        names = _compiled[id(allow)] = _fasttrim.Names(allow)  # holds `allow`, so its id is not reused meanwhile
    return names


# A piece of a received body: bytes, or a memoryview of the buffer the receiving listener reuses (root/front.py).
Chunk = bytes | memoryview


class StreamTrim:
    """A msgpack trim fed chunk by chunk while the body arrives.

    With the C engine each chunk is scanned as soon as it is received, so the
    scan overlaps the body's arrival instead of adding to the latency after it,
    and the body is never joined into one buffer just to be trimmed. The Python
    engine keeps the chunks and trims them at finish().
    """

    __slots__ = ("allow", "seconds", "_trimmer")

    def __init__(self, allow: AbstractSet[str], size_hint: int = 0, *, engine=None) -> None:
        """`size_hint`: the body's length when known (Content-Length). The trimmed body is written as the scan
        goes into one buffer sized from it (times what this allowlist kept last time), then shrunk.
        `engine`: a module of ENGINES (tests); by default the one this process selected."""
        engine = engine or _ENGINE
        self.allow = allow
        self.seconds = 0.0  # spent in feed(): the part of the trim that overlapped the body's arrival
        self._trimmer = engine.Trimmer(_compiled_names(allow, engine), size_hint)

    def feed(self, chunk: Chunk) -> None:
        t0 = time.perf_counter()
        self._trimmer.feed(chunk)
        self.seconds += time.perf_counter() - t0

    def finish(self, chunks: Sequence[Chunk]) -> TrimResult:
        """The trim of everything fed; `chunks` (the same bytes) only for a body without "features"."""
        try:
            out = self._trimmer.finish()
        except ValueError as exc:
            raise PayloadError(f"malformed msgpack body: {exc}") from None
        if out is None:
            return TrimResult(b"".join(chunks), 0, 0)
        return TrimResult(*out)


def _chunks_with(engine, chunks: Sequence[Chunk], allow: AbstractSet[str]) -> TrimResult:
    stream = StreamTrim(allow, sum(map(len, chunks)), engine=engine)
    for chunk in chunks:
        stream.feed(chunk)
    return stream.finish(chunks)


def trim_msgpack_chunks_c(chunks: Sequence[Chunk], allow: AbstractSet[str]) -> TrimResult:
    return _chunks_with(_fasttrim, chunks, allow)


def trim_msgpack_chunks_py(chunks: Sequence[Chunk], allow: AbstractSet[str]) -> TrimResult:
    return _chunks_with(_trim_py, chunks, allow)


trim_msgpack = trim_msgpack_c if ACCELERATED else trim_msgpack_py
# A body as the server received it (a list of chunks), trimmed without joining it first (C engine).
trim_msgpack_chunks = trim_msgpack_chunks_c if ACCELERATED else trim_msgpack_chunks_py


def trim_json(body: bytes, allow: AbstractSet[str]) -> TrimResult:
    return _trim_map(body, allow, _js_map, _js_encoder, "JSON")


def trim(body: bytes, allow: AbstractSet[str], content_type: str | None) -> TrimResult:
    """Trim a native request (`features` map) in its own encoding."""
    if media_type(content_type) == MSGPACK:
        return trim_msgpack(body, allow)
    return trim_json(body, allow)


def trim_oip(body: bytes, allow: AbstractSet[str]) -> TrimResult:
    """Trim an Open Inference Protocol v2 JSON request: keep `inputs` whose `name` is allowed."""
    top = _split(_js_map, body, "request", "JSON")
    inputs_raw = top.get("inputs")
    if inputs_raw is None:
        raise PayloadError('inference request has no "inputs"')
    try:
        inputs = _js_list.decode(inputs_raw)
        names = [_js_named.decode(item).name for item in inputs]
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        raise PayloadError(f'"inputs" must be a list of objects each with a string "name" ({exc})') from None
    kept = [item for item, name in zip(inputs, names) if name in allow]
    top["inputs"] = Raw(_js_encoder.encode(kept))
    return TrimResult(_js_encoder.encode(top), len(inputs), len(kept))


__all__ = ["ACCELERATED", "IMPLEMENTATION", "TrimResult", "StreamTrim", "trim", "trim_msgpack", "trim_msgpack_chunks",
           "trim_json", "trim_oip", "MSGPACK", "JSON"]
