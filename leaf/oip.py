"""Open Inference Protocol (v2) request and response bodies at the leaf: JSON, and Triton's binary tensor extension.

Why a module of its own: OIP bodies never hold the native protocol's `$tensor` objects, so walking every
decoded value for them (trimmer.codec.decode_json) cost more than the JSON decode itself. Here a body is
decoded once into typed msgspec Structs, each input's `data` kept as raw JSON text (msgspec.Raw) and decoded
straight into a flat list of the datatype's Python type, then into one numpy array (no per-element Python
loop of ours). The leaf then sees wire Tensors, exactly as from a native msgpack request, so OIP requests take
the converter's fast path and share batches with native ones.

Binary tensor extension (what tritonclient sends by default; Triton's HTTP protocol):

    request:  | JSON header (Inference-Header-Content-Length bytes) | seg(in0) | seg(in2) | ... |
              an input with `parameters.binary_data_size` has its raw little-endian values in the next
              segment, in `inputs` order; others carry JSON `data`. BYTES elements are 4-byte LE length + bytes.
    response: the same layout when any output is binary: JSON header, then each binary output's raw bytes,
              header length in the `Inference-Header-Content-Length` response header, each binary output
              with `parameters.binary_data_size` and no `data`.

An output is binary when its requested entry says `parameters.binary_data: true`, or when the request says
`parameters.binary_data_output: true` and the output's entry does not say `binary_data: false` (the
per-output setting wins). A request without `outputs` gets every output. Binary segments become Tensors over
the received body without a copy (the converter wraps them with torch.frombuffer).
Shared-memory inputs and outputs are not supported by the leaf (400).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np

from trimmer import __version__
from trimmer.errors import DECODE_FAILURES, PayloadError, decode_errors
from trimmer.oip_binary import HEADER, header_length
from trimmer.tensor import DTYPES, Tensor

from .wire import make_tensor

__all__ = ["HEADER", "OIP_TO_WIRE", "WIRE_TO_OIP", "InferRequest", "parse_request", "check_outputs", "encode_response",
           "server_metadata"]

OIP_TO_WIRE = {"BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
               "FP16": "float16", "BF16": "bfloat16", "FP32": "float32", "FP64": "float64"}
WIRE_TO_OIP = {v: k for k, v in OIP_TO_WIRE.items()}
BYTES_PLACEHOLDER = "<bytes>"  # BYTES inputs: only valid for features the model does not read (the converter says so)
EXTENSIONS = ["binary_tensor_data"]


class TensorParams(msgspec.Struct):
    binary_data_size: int | None = None
    binary_data: bool | None = None
    shared_memory_region: str | None = None


class RequestParams(msgspec.Struct):
    binary_data_output: bool | None = None


_NO_DATA = msgspec.Raw()


class RequestInput(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    parameters: TensorParams | None = None
    data: msgspec.Raw = _NO_DATA


class RequestedOutput(msgspec.Struct):
    name: str
    parameters: TensorParams | None = None


class InferRequest(msgspec.Struct):
    inputs: list[RequestInput]
    id: Any = None
    parameters: RequestParams | None = None
    outputs: list[RequestedOutput] | None = None


_request = msgspec.json.Decoder(InferRequest)
_any = msgspec.json.Decoder()
_flat_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    "f": msgspec.json.Decoder(list[float]), "i": msgspec.json.Decoder(list[int]),
    "u": msgspec.json.Decoder(list[int]), "b": msgspec.json.Decoder(list[bool])}
_encode = msgspec.json.Encoder().encode
_NP = {name: np.dtype(np_str) for name, (_, _, np_str) in DTYPES.items() if np_str}
try:  # optional accelerator for JSON number lists (the leaf extra installs it); without it msgspec does the job
    import simdjson as _simdjson

    _parser = _simdjson.Parser()
except ImportError:  # pragma: no cover - depends on the install
    _simdjson = None  # type: ignore[assignment]


# ---------------------------------------------------------------------- requests
def parse_request(body: bytes | memoryview, binary_header: str | None) -> tuple[InferRequest, dict[str, Any]]:
    """A JSON or binary-extension OIP body -> (request, {input name: wire Tensor}). PayloadError (400) on anything
    malformed: bad JSON, wrong types, shapes that disagree with the values, segments that do not add up."""
    view = memoryview(body)
    header_len = len(view) if binary_header is None else header_length(binary_header, len(view))
    with decode_errors("JSON body", shape="bad inference request"):
        req = _request.decode(view[:header_len])
    features: dict[str, Any] = {}
    offset = header_len
    for inp in req.inputs:
        name = inp.name
        if not name:
            raise PayloadError("inputs: 'name' must be a non-empty string")
        if name in features:
            raise PayloadError(f"input {name!r} appears more than once")
        shape = inp.shape
        for d in shape:
            if d < 0:
                raise PayloadError(f"input {name!r}: 'shape' must be a list of non-negative integers")
        params = inp.parameters
        if params is not None and params.shared_memory_region is not None:
            raise PayloadError(f"input {name!r}: shared-memory inputs are not supported by this server; send the data")
        size = params.binary_data_size if params is not None else None
        dtype = inp.datatype
        wire = OIP_TO_WIRE.get(dtype)
        if wire is None and dtype != "BYTES":
            raise PayloadError(
                f"input {name!r}: unsupported datatype {dtype!r}; use one of {', '.join([*OIP_TO_WIRE, 'BYTES'])}")
        if size is not None:
            if binary_header is None:
                raise PayloadError(f"input {name!r} has binary_data_size but the request has no {HEADER} header")
            if size < 0 or offset + size > len(view):
                raise PayloadError(f"binary input {name!r}: binary_data_size {size} runs past the body")
            seg = view[offset:offset + size]
            offset += size
            features[name] = BYTES_PLACEHOLDER if wire is None else _binary_tensor(name, wire, shape, seg)
        elif len(inp.data) == 0:
            raise PayloadError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        else:
            features[name] = BYTES_PLACEHOLDER if wire is None else _json_tensor(name, dtype, wire, shape, inp.data)
    if offset != len(view):
        raise PayloadError(f"binary inference request: {len(view) - offset} bytes after the last input's segment")
    return req, features


def _binary_tensor(name: str, wire: str, shape: list[int], seg: memoryview) -> Tensor:
    want = math.prod(shape) * DTYPES[wire][1]
    if len(seg) != want:
        raise PayloadError(f"binary input {name!r}: binary_data_size {len(seg)} does not fit {WIRE_TO_OIP[wire]} of "
                           f"shape {shape} ({want} bytes)")
    if wire == "bool" and len(seg) and int(np.frombuffer(seg, np.uint8).max()) > 1:
        raise PayloadError(f"binary input {name!r}: BOOL values must be bytes 0 or 1")
    return make_tensor(wire, tuple(shape), seg)


def _json_tensor(name: str, dtype: str, wire: str, shape: list[int], raw: msgspec.Raw) -> Tensor:
    """JSON `data` (flat, or nested row-major) -> a wire Tensor of `wire` dtype, refusing lossy or unrelated values
    (floats for integer types, numbers for BOOL, ...) and out-of-range integers."""
    np_t = _NP.get(wire, np.dtype(np.float32))  # BF16 goes through float32
    kind = np_t.kind
    arr = _simd_values(raw, np_t) if _simdjson is not None and kind != "b" else None
    if arr is None:
        try:
            values = _flat_decoders[kind].decode(raw)
        except DECODE_FAILURES:
            values = _nested(name, dtype, kind, raw)
        try:
            arr = np.array(values, dtype=np_t)
        except (OverflowError, ValueError, TypeError):
            raise PayloadError(f"input {name!r}: 'data' holds values out of range for {dtype}") from None
    n = math.prod(shape)
    if arr.size != n:
        raise PayloadError(f"input {name!r}: 'data' has {arr.size} values, shape {shape} needs {n}")
    if wire == "bfloat16":
        import torch

        raw_bf16 = torch.from_numpy(arr.reshape(-1)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        return Tensor("bfloat16", tuple(shape), raw_bf16)
    return make_tensor(wire, tuple(shape), arr.tobytes())


_ALLOWED = {"f": (int, float), "i": (int,), "u": (int,), "b": (bool,)}  # exact types: a bool is not an int here


def _simd_values(raw: msgspec.Raw, np_t: np.dtype) -> np.ndarray | None:
    """A flat JSON list of numbers straight into an array of `np_t` with simdjson (C, no Python object per value),
    or None whenever anything is unusual (not a flat list, a value of the wrong JSON type, out of range, simdjson
    missing): the msgspec path then decides, with its error messages. Same values as that path: both parse each
    number to the correctly rounded double (or exact int64), then numpy casts."""
    global _parser
    try:
        try:
            arr = _parser.parse(bytes(raw))
        except RuntimeError:  # a proxy from an earlier parse is still alive somewhere: use a fresh parser
            _parser = _simdjson.Parser()
            arr = _parser.parse(bytes(raw))
        if not isinstance(arr, _simdjson.Array):
            return None
        n = len(arr)
        buf = arr.as_buffer(of_type="d" if np_t.kind == "f" else "i")
    except (ValueError, TypeError, RuntimeError):  # invalid JSON, wrong element types, numbers out of range
        return None
    finally:
        arr = None  # release the document before the next parse
    flat = np.frombuffer(buf, dtype=np.float64 if np_t.kind == "f" else np.int64)
    if flat.size != n:  # nested lists: the strict path checks that the rows are regular
        return None
    if np_t.kind in "iu" and np_t != np.int64 and flat.size:
        info = np.iinfo(np_t)
        if int(flat.min()) < info.min or int(flat.max()) > info.max:
            return None
    return flat.astype(np_t)


def _nested(name: str, dtype: str, kind: str, raw: msgspec.Raw) -> list:
    """`data` that is not a flat list of the datatype's values (the slow path): nested row-major lists are
    accepted, anything else (ragged lists, strings, booleans for numbers, floats for integers) is a 400."""
    want = {"f": "numbers", "i": "integers", "u": "integers", "b": "booleans"}[kind]
    bad = PayloadError(f"input {name!r}: 'data' must be a (row-major, possibly nested) list of {dtype} values ({want})")
    try:
        obj = _any.decode(raw)
    except DECODE_FAILURES:
        raise bad from None
    if not isinstance(obj, list):
        raise bad
    try:
        flat = np.asarray(obj, dtype=object).reshape(-1).tolist()
    except ValueError:  # ragged
        raise bad from None
    allowed = _ALLOWED[kind]
    if not all(type(v) in allowed for v in flat):
        raise bad
    return flat


def check_outputs(req: InferRequest, names: tuple[str, ...] | list[str]) -> None:
    """400 before anything runs when the request asks for an output the model does not have (as Triton does)."""
    if not req.outputs or not names:
        return
    for o in req.outputs:
        if o.name not in names:
            raise PayloadError(f"unknown output {o.name!r} requested; the model's outputs: {', '.join(names)}")
        if o.parameters is not None and o.parameters.shared_memory_region is not None:
            raise PayloadError(f"output {o.name!r}: shared-memory outputs are not supported by this server")


# ---------------------------------------------------------------------- responses
def _flat(t: Tensor) -> list:
    """A wire tensor's values as a flat list (OIP JSON `data`)."""
    if t.dtype == "bfloat16":
        import torch

        return torch.frombuffer(bytearray(t.data), dtype=torch.bfloat16).float().tolist() if t.nbytes else []
    return t.to_numpy().reshape(-1).tolist()


def encode_response(model: str, version: str, names: list[str] | tuple[str, ...], outs: list[Tensor],
                    req: InferRequest) -> tuple[bytes, dict[str, str]]:
    """(body, headers): JSON, or the binary layout when any selected output is binary (see the module docstring)."""
    by_name = dict(zip(names, outs))
    default_binary = bool(req.parameters is not None and req.parameters.binary_data_output)
    if req.outputs:
        check_outputs(req, list(names))
        selected = []
        for o in req.outputs:
            flag = o.parameters.binary_data if o.parameters is not None else None
            selected.append((o.name, default_binary if flag is None else flag))
    else:
        selected = [(n, default_binary) for n in names]
    outputs: list[dict[str, Any]] = []
    segments: list[Any] = []
    for n, binary in selected:
        t = by_name[n]
        entry: dict[str, Any] = {"name": n, "datatype": WIRE_TO_OIP.get(t.dtype, "FP32"), "shape": list(t.shape)}
        if binary:
            entry["parameters"] = {"binary_data_size": t.nbytes}
            segments.append(t.data)
        else:
            entry["data"] = _flat(t)
        outputs.append(entry)
    resp: dict[str, Any] = {"model_name": model, "model_version": version}
    if req.id is not None:
        resp["id"] = req.id
    resp["outputs"] = outputs
    header = _encode(resp)
    if not segments:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *segments]), {"Content-Type": "application/octet-stream", HEADER: str(len(header))}


def server_metadata() -> dict[str, Any]:
    """`GET /v2`: the OIP server metadata (name, version, extensions)."""
    return {"name": "trimmer-leaf", "version": __version__, "extensions": list(EXTENSIONS)}
