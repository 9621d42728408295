"""Decode and encode whole requests (msgpack primary, JSON accepted).

This is the full decode the leaf needs; the root's trim path lives in
`trimmer.trim` and never decodes feature values.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import PayloadError, decode_errors, first_line
from .tensor import DTYPES, JSON_TENSOR_KEY, MAX_NDIM, TENSOR_EXT_CODE, Tensor

MSGPACK = "application/msgpack"
JSON = "application/json"
_MSGPACK_ALIASES = {MSGPACK, "application/x-msgpack", "application/vnd.msgpack"}
# Set to "1" on the root's untrimmed audit copy of a request, so leaves and
# proxies can tell it from client traffic (e.g. keep it out of drift counts).
AUDIT_HEADER = "X-Trimmer-Audit"


def _base(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def media_type(content_type: str | None) -> str:
    """Normalise a Content-Type header to MSGPACK or JSON, or raise PayloadError."""
    base = _base(content_type)
    if base in _MSGPACK_ALIASES:
        return MSGPACK
    if base == JSON or base.endswith("+json"):
        return JSON
    raise PayloadError(
        f"unsupported content type {content_type or '(none)'!r}; use {MSGPACK} or {JSON}"
    )


def is_msgpack(content_type: str | None) -> bool:
    """Whether a Content-Type names msgpack (any alias, any case, parameters ignored); never raises.

    For answers and stored records, which are read as JSON when they are not msgpack; a request's own
    Content-Type goes through `media_type`, which refuses anything else with a 415/400.
    """
    return _base(content_type) in _MSGPACK_ALIASES


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON (application/json or any +json type, any case); never raises."""
    base = _base(content_type)
    return base == JSON or base.endswith("+json")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == TENSOR_EXT_CODE:
        return Tensor.from_ext_payload(data)
    raise PayloadError(f"unknown msgpack ext type {code}")


def _fast_ext_hook() -> Any:
    """The C hook (trimmer/_tensorext.c) when it was built and not switched off (trimmer/extensions.py): same
    Tensors, same errors (it defers to _ext_hook for anything malformed), about ten times cheaper per tensor."""
    from .extensions import load

    _tensorext = load("_tensorext")
    if _tensorext is None:
        return _ext_hook
    _tensorext.configure(Tensor, {code: (name, size) for name, (code, size, _) in DTYPES.items()}, MAX_NDIM,
                         TENSOR_EXT_CODE, _ext_hook)
    return _tensorext.hook


ext_hook = _fast_ext_hook()


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return msgspec.msgpack.Ext(TENSOR_EXT_CODE, obj.ext_payload())
    if hasattr(obj, "__array__") and hasattr(obj, "dtype"):
        return _enc_hook(Tensor.from_numpy(obj))
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def _json_enc_hook(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.to_json_obj()
    if hasattr(obj, "__array__") and hasattr(obj, "dtype"):
        return Tensor.from_numpy(obj).to_json_obj()
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


_msgpack_decoder = msgspec.msgpack.Decoder(ext_hook=ext_hook)
_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_json_decoder = msgspec.json.Decoder()
_json_encoder = msgspec.json.Encoder(enc_hook=_json_enc_hook)


def decode_msgpack(body: bytes | memoryview) -> Any:
    with decode_errors("msgpack body"):
        try:
            return _msgpack_decoder.decode(body)
        except TypeError as exc:  # an ext payload ext_hook cannot take
            raise PayloadError(f"malformed msgpack body: {first_line(exc)}") from None


def _json_tensors(obj: Any) -> Any:
    """Turn {"$tensor": {...}} objects into Tensor, bounded by the depth JSON decoding already allowed."""
    if isinstance(obj, dict):
        if len(obj) == 1 and JSON_TENSOR_KEY in obj:
            return Tensor.from_json_obj(obj[JSON_TENSOR_KEY])
        return {k: _json_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_tensors(v) for v in obj]
    return obj


def decode_json(body: bytes | memoryview) -> Any:
    with decode_errors("JSON body"):
        obj = _json_decoder.decode(body)
    try:
        return _json_tensors(obj)
    except RecursionError:
        raise PayloadError("JSON body nested too deeply") from None


def decode(body: bytes | memoryview, content_type: str | None) -> Any:
    return decode_msgpack(body) if media_type(content_type) == MSGPACK else decode_json(body)


def encode_msgpack(obj: Any) -> bytes:
    return _msgpack_encoder.encode(obj)


def encode_json(obj: Any) -> bytes:
    return _json_encoder.encode(obj)


def encode(obj: Any, content_type: str) -> bytes:
    return encode_msgpack(obj) if media_type(content_type) == MSGPACK else encode_json(obj)


def decode_request(body: bytes | memoryview, content_type: str | None) -> dict[str, Any]:
    """Decode a request and check the protocol's shape: a map whose `features` is a map with string keys."""
    return check_request(decode(body, content_type))


def check_request(obj: Any) -> dict[str, Any]:
    """The protocol's shape for any decoder: a map whose `features` is a map with non-empty string keys."""
    if not isinstance(obj, dict):
        raise PayloadError(f"request must be a map at the top level, got {type(obj).__name__}")
    features = obj.get("features", {})
    if not isinstance(features, dict):
        raise PayloadError(f'"features" must be a map of feature name to value, got {type(features).__name__}')
    for key in features:
        if type(key) is not str or not key:
            raise PayloadError(f'"features" keys must be non-empty strings, got {key!r}')
    return obj
