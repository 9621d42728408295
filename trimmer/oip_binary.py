"""Trim Open Inference Protocol requests that use the binary tensor extension, without decoding a value.

tritonclient sends tensors this way by default (`set_data_from_numpy(...,
binary_data=True)`): a small JSON header, then each binary input's raw bytes
back to back, in the order of `inputs`:

    | JSON header (Inference-Header-Content-Length bytes) | seg(in0) | seg(in2) | ... |
      {"inputs": [{"name": "in0", ..., "parameters": {"binary_data_size": 4096}},
                  {"name": "in1", ..., "data": [1, 2]},            <- inline JSON, no segment
                  {"name": "in2", ..., "parameters": {"binary_data_size": 800}}], ...}

The trim reads only the header, walks the segment sizes, and writes the
header with the allowed inputs (each input object's JSON bytes verbatim)
followed by the allowed inputs' segments verbatim. The caller sends the new
header length as Inference-Header-Content-Length. Shared-memory inputs
(`parameters.shared_memory_region`) carry no segment and pass like any other.
The header itself is bounded (MAX_HEADER_BYTES), so a hostile length costs
nothing before it is refused.
"""

from __future__ import annotations

from typing import AbstractSet

import msgspec

from .errors import PayloadError

HEADER = "Inference-Header-Content-Length"
MAX_HEADER_BYTES = 16 * 1024 * 1024

Raw = msgspec.Raw


class _Params(msgspec.Struct):
    binary_data_size: int | None = None


class _Input(msgspec.Struct):
    name: str
    parameters: _Params | None = None


_top = msgspec.json.Decoder(dict[str, Raw])
_inputs = msgspec.json.Decoder(list[Raw])
_input = msgspec.json.Decoder(_Input)
_encode = msgspec.json.Encoder().encode


def header_length(value: str | None, body_len: int) -> int:
    """The Inference-Header-Content-Length value as an int within the body, else PayloadError (400)."""
    try:
        n = int(value or "")
    except ValueError:
        raise PayloadError(f"{HEADER} must be a byte count, got {str(value)[:40]!r}") from None
    if not 0 < n <= min(body_len, MAX_HEADER_BYTES):
        raise PayloadError(f"{HEADER} {n} is outside the body (1..{min(body_len, MAX_HEADER_BYTES)} bytes)")
    return n


def trim_binary(body: bytes | memoryview, header_len: int, allow: AbstractSet[str]) -> tuple[bytes, int, int, int]:
    """(new body, inputs in, inputs kept, new header length). PayloadError when segments do not add up."""
    view = memoryview(body)
    try:
        top = _top.decode(view[:header_len])
        raw_inputs = _inputs.decode(top["inputs"]) if "inputs" in top else None
        if raw_inputs is None:
            raise PayloadError('inference request has no "inputs"')
        parsed = [_input.decode(item) for item in raw_inputs]
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PayloadError(f"binary inference request: bad JSON header ({exc})") from None
    offset = header_len
    kept_items: list[Raw] = []
    segments: list[memoryview] = []
    for item, inp in zip(raw_inputs, parsed):
        size = inp.parameters.binary_data_size if inp.parameters is not None else None
        seg = None
        if size is not None:
            if size < 0 or offset + size > len(view):
                raise PayloadError(f"binary input {inp.name!r}: binary_data_size {size} runs past the body")
            seg = view[offset:offset + size]
            offset += size
        if inp.name in allow:
            kept_items.append(item)
            if seg is not None:
                segments.append(seg)
    if offset != len(view):
        raise PayloadError(f"binary inference request: {len(view) - offset} bytes after the last input's segment")
    top["inputs"] = Raw(_encode(kept_items))
    header = _encode(top)
    return b"".join([header, *segments]), len(parsed), len(kept_items), len(header)


__all__ = ["HEADER", "trim_binary", "header_length", "MAX_HEADER_BYTES"]
