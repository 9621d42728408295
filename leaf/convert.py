"""Features -> torch tensors, driven by the model's signature (module_info.json).

Input order is `input_names`; dtype / shape / default come from the optional `inputs` specs. Typed tensors
are wrapped in place with torch.frombuffer (no copy; the buffer is the received body, read-only, so the
tensors must never be written in place: the batcher only reads them or concatenates into new memory).
Features the model does not read are ignored and reported; missing inputs take their declared default or
fail with a 400 that names every missing feature.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, cast

import numpy as np
import torch

from trimmer.errors import PayloadError
from trimmer.signature import InputSpec, Signature
from trimmer.tensor import DTYPES, Tensor

# torch.frombuffer warns (once per process, TORCH_WARN_ONCE) on read-only buffers; we never write to them.
# Trigger that one warning here, silenced, so it can never surface later whatever the warning filters.
warnings.filterwarnings("ignore", message="The given buffer is not writable")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0\0\0\0", dtype=torch.uint8)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float64": torch.float64,
}
WIRE_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
_NP = {name: np.dtype(np_str) for name, (_, _, np_str) in DTYPES.items() if np_str}


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "any" if shape is None else "[" + ", ".join("C" if d == -1 else str(d) for d in shape) + "]"


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype} and shape {list(value.shape)}"
    if isinstance(value, (str, bytes)):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a map"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class InputPlan:
    """How one model input is built, precomputed once per model version so the per-request path is a few
    comparisons. cand_axis: where the candidate dim (-1) sits, None if per-request."""

    name: str
    spec: InputSpec
    torch_dtype: torch.dtype | None
    cand_axis: int | None
    shape: tuple[int, ...] | None = None      # declared shape
    rest: tuple[int, ...] = ()                # declared shape without the candidate dim
    item_bytes: int = 0                       # bytes per candidate row (cand inputs) or per value (others)
    default_raw: bytes | None = None          # the default, encoded once: one row (cand inputs) or the whole value

    @property
    def expected(self) -> str:
        dtype = self.spec.dtype or "any dtype"
        return f"{dtype} of shape {_shape_text(self.spec.shape)}"

    def match(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The per-request shape a typed tensor of `shape` stands for, or None if it does not fit."""
        want = self.shape
        if want is None:
            return shape
        if shape == want:
            return shape
        if len(shape) == len(want):
            for w, s in zip(want, shape):
                if w != -1 and w != s:
                    return None
            return shape
        if not want and all(d == 1 for d in shape):  # one-element value for a declared scalar
            return ()
        return None


def _raw_default(spec: InputSpec, dtype: torch.dtype | None, cand_axis: int | None) -> bytes | None:
    """The declared default in the declared dtype, as raw bytes: one candidate row, or the whole value."""
    if not spec.has_default or dtype is None or spec.shape is None:
        return None
    shape = tuple(d for i, d in enumerate(spec.shape) if i != cand_axis)
    t = torch.full(shape, spec.default, dtype=dtype)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def as_tensor(part: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A raw buffer (read-only memoryview of the body, or bytes) -> tensor without a copy; tensors pass."""
    if isinstance(part, torch.Tensor):
        return part
    if len(part) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(part, dtype=dtype).view(shape)


@dataclass
class Converted:
    """One request's model inputs in input order, in their natural (per-request) shapes.

    `parts` holds, per input, either the raw little-endian bytes in the declared dtype (a zero-copy view
    of the request body for typed tensors, or a cached default) or a torch tensor (values sent as lists);
    the batcher turns the raw parts of a whole batch into one tensor per input with a single join.
    `tensors` materialises one request's tensors (zero-copy views) for callers that want them one by one.
    """

    parts: list[Any]
    rows: int  # candidates in this request, or 1 for models without a candidate dim
    defaulted: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    n_features: int = 0
    shapes: list[tuple[int, ...]] | None = None
    dtypes: list[torch.dtype] | None = None
    all_raw: bool = False  # no part is a torch tensor: the batcher joins every input's parts without checking

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self.shapes is None or self.dtypes is None:
            return self.parts
        return [as_tensor(p, d, s) for p, d, s in zip(self.parts, self.dtypes, self.shapes)]


class Converter:
    """Built once per model version from its signature; `convert` is the per-request hot path."""

    def __init__(self, signature: Signature) -> None:
        self.signature = signature
        self.plans: list[InputPlan] = []
        for name in signature.input_names:
            spec = signature.inputs.get(name, InputSpec())
            axis = spec.shape.index(-1) if spec.shape is not None and -1 in spec.shape else None
            dtype = TORCH_DTYPES.get(spec.dtype) if spec.dtype else None
            rest = tuple(d for i, d in enumerate(spec.shape or ()) if i != axis)
            item = (math.prod(rest) * DTYPES[spec.dtype][1]) if spec.dtype else 0
            self.plans.append(
                InputPlan(name, spec, dtype, axis, spec.shape, rest, item, _raw_default(spec, dtype, axis)))
        self.allow = frozenset(signature.input_names)
        # typed: every input has dtype and shape (fast conversion to raw parts). The batched calling convention
        # needs that, and a signature that does not ask for one request per call (batching: "request")
        self.typed = all(p.spec.dtype is not None and p.spec.shape is not None for p in self.plans)
        self.batchable = self.typed and signature.batching == "rows"
        self.has_candidates = any(p.cand_axis is not None for p in self.plans)
        # typed: every plan has a dtype
        self.dtypes = cast("list[torch.dtype]", [p.torch_dtype for p in self.plans]) if self.typed else None
        self._fast = [(p.name, p.spec.dtype, p, p.cand_axis) for p in self.plans]

    # ------------------------------------------------------------------ per request
    def convert(self, features: Mapping[str, Any]) -> Converted:
        if not self.typed:
            return self._convert_tensors(features)
        parts: list[Any] = []
        shapes: list[tuple[int, ...]] = []
        rows = -1
        found = 0
        defaulted: list[str] | None = None
        for name, dtype, plan, axis in self._fast:
            v = features.get(name, _MISSING)
            if v is _MISSING and plan.default_raw is not None:
                if defaulted is None:
                    defaulted = []
                defaulted.append(name)
                parts.append(None)
                shapes.append(plan.shape)  # type: ignore[arg-type]  # candidate dim filled in below
                continue
            if type(v) is not Tensor or v.dtype != dtype:
                return self._convert_slow(features)  # lists, missing without default, wrong dtype: slow path
            shape = plan.match(v.shape)
            if shape is None:
                return self._convert_slow(features)
            if axis is not None:
                c = shape[axis]
                if rows < 0:
                    rows = c
                elif c != rows:
                    return self._convert_slow(features)
            parts.append(v.data)
            shapes.append(shape)
            found += 1
        if not self.has_candidates:
            rows = 1
        elif rows <= 0:
            return self._convert_slow(features)  # no per-candidate feature, or zero candidates: the error
        if defaulted is not None:
            for i, plan in enumerate(self.plans):
                if parts[i] is None:
                    raw = cast(bytes, plan.default_raw)  # defaulted: it has one
                    parts[i] = raw * rows if plan.cand_axis is not None else raw
                    shapes[i] = tuple(rows if d == -1 else d for d in plan.shape)  # type: ignore[union-attr]
        n = len(features)
        unused = [] if n == found else [k for k in features if k not in self.allow]
        return Converted(parts, rows, defaulted or [], unused, n, shapes, self.dtypes, all_raw=True)

    def _convert_slow(self, features: Mapping[str, Any]) -> Converted:
        """Everything the fast path does not cover: defaults, unused features, lists, and every error."""
        conv = self._convert_tensors(features)
        parts: list[Any] = []
        shapes: list[tuple[int, ...]] = []
        for _plan, t in zip(self.plans, conv.tensors):
            if isinstance(t, _Default):
                parts.append(t.raw)
                shapes.append(t.shape)
            else:
                parts.append(t)
                shapes.append(tuple(t.shape))
        return Converted(parts, conv.rows, conv.defaulted, conv.unused, conv.n_features, shapes, self.dtypes)

    def _convert_tensors(self, features: Mapping[str, Any]) -> Converted:
        unused = [k for k in features if k not in self.allow]
        missing = [p.name for p in self.plans if p.name not in features and not p.spec.has_default]
        if missing:
            raise PayloadError(f"missing required feature(s) with no default: {', '.join(missing)}")
        errors: list[str] = []
        tensors: list[Any] = []
        defaulted: list[str] = []
        cand_sizes: dict[str, int] = {}
        for plan in self.plans:
            if plan.name not in features:
                tensors.append(None)
                defaulted.append(plan.name)
                continue
            try:
                t = self._tensor(plan, features[plan.name])
            except PayloadError as exc:
                errors.append(str(exc))
                tensors.append(None)
                continue
            if plan.cand_axis is not None:
                cand_sizes[plan.name] = int(t.shape[plan.cand_axis])
            tensors.append(t)
        if errors:
            raise PayloadError("; ".join(errors))
        rows = 1
        if self.has_candidates:
            sizes = set(cand_sizes.values())
            if len(sizes) > 1:
                detail = ", ".join(f"{n}: {c}" for n, c in cand_sizes.items())
                raise PayloadError(f"per-candidate features disagree on the number of candidates ({detail})")
            if not sizes:
                raise PayloadError("cannot tell the number of candidates: no per-candidate feature was sent "
                                   f"(send one of {', '.join(p.name for p in self.plans if p.cand_axis is not None)})")
            rows = sizes.pop()
            if rows == 0:
                raise PayloadError("request has zero candidates")
        for i, plan in enumerate(self.plans):
            if tensors[i] is None:
                tensors[i] = self._default(plan, rows)
        return Converted(tensors, rows, defaulted, unused, len(features))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _scalar_shape(plan: InputPlan, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A one-element value for a declared scalar (shape []) is that scalar: numpy-based senders
        (Tensor.from_numpy) turn 0-d arrays into shape [1]."""
        if plan.spec.shape == () and len(shape) > 0 and all(d == 1 for d in shape):
            return ()
        return tuple(shape)

    def _check_shape(self, plan: InputPlan, shape: tuple[int, ...], value: Any, as_array: bool = False) -> None:
        want = plan.spec.shape
        if want is None or (len(shape) == len(want) and all(w == -1 or w == s for w, s in zip(want, shape))):
            return
        got = f"{_describe(value)} of shape {list(shape)}" if as_array else _describe(value)
        raise PayloadError(f"feature {plan.name!r}: expected {plan.expected}, got {got}")

    def _tensor(self, plan: InputPlan, value: Any) -> torch.Tensor:
        if isinstance(value, Tensor):
            if plan.spec.dtype is not None and value.dtype != plan.spec.dtype:
                raise PayloadError(f"feature {plan.name!r}: expected {plan.expected}, got {_describe(value)}")
            shape = self._scalar_shape(plan, value.shape)
            self._check_shape(plan, shape, value)
            dtype = TORCH_DTYPES[value.dtype]
            if value.nbytes == 0:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(value.data, dtype=dtype).view(shape)
        if isinstance(value, bool) or isinstance(value, (int, float)) or isinstance(value, list):
            arr = self._array(plan, value)
            arr = arr.reshape(self._scalar_shape(plan, arr.shape))
            self._check_shape(plan, arr.shape, value, as_array=True)
            t = torch.from_numpy(arr)
            return t.to(torch.bfloat16) if plan.torch_dtype is torch.bfloat16 else t
        raise PayloadError(f"feature {plan.name!r}: expected {plan.expected}, got {_describe(value)}")

    def _array(self, plan: InputPlan, value: Any) -> np.ndarray:
        """Python scalars / (nested) lists -> an array of the declared dtype, refusing lossy casts."""
        try:
            arr = np.asarray(value)
        except (ValueError, OverflowError):
            raise PayloadError(
                f"feature {plan.name!r}: expected {plan.expected}, got a ragged or invalid list") from None
        kind = arr.dtype.kind
        if kind not in "biuf":
            raise PayloadError(f"feature {plan.name!r}: expected {plan.expected}, got non-numeric values")
        target = plan.spec.dtype or {"b": "bool", "i": "int64", "u": "int64", "f": "float32"}[kind]
        if target == "bfloat16":
            if kind == "b":
                raise PayloadError(f"feature {plan.name!r}: expected {plan.expected}, got booleans")
            return arr.astype(np.float32)  # _tensor casts to bfloat16 (numpy has no bfloat16)
        np_t = _NP[target]
        if np_t.kind in "iu":
            if kind == "f":
                raise PayloadError(f"feature {plan.name!r}: expected {plan.expected}, got floating-point values")
            if kind == "b":
                raise PayloadError(f"feature {plan.name!r}: expected {plan.expected}, got booleans")
            if arr.size:
                info = np.iinfo(np_t)
                if int(arr.min()) < info.min or int(arr.max()) > info.max:
                    raise PayloadError(f"feature {plan.name!r}: values out of range for {target}")
        elif np_t.kind == "b":
            if kind == "f" or (kind in "iu" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 1)):
                raise PayloadError(f"feature {plan.name!r}: expected {plan.expected}, got non-boolean values")
        return arr.astype(np_t)

    def _default(self, plan: InputPlan, rows: int) -> Any:
        spec = plan.spec
        shape = tuple(rows if d == -1 else d for d in (spec.shape or ()))
        if plan.default_raw is not None and self.typed:
            return _Default(plan.default_raw * rows if plan.cand_axis is not None else plan.default_raw, shape)
        dtype = plan.torch_dtype or (torch.float32 if isinstance(spec.default, float) else torch.int64)
        base = torch.tensor(spec.default, dtype=dtype)
        return base.expand(shape) if spec.shape is not None else base


class _Default:
    """A default value as raw bytes of the declared dtype (repeated per candidate row), with its shape."""

    __slots__ = ("raw", "shape")

    def __init__(self, raw: bytes, shape: tuple[int, ...]) -> None:
        self.raw, self.shape = raw, shape


_MISSING = object()


def output_to_wire(t: torch.Tensor) -> Tensor:
    """A CPU torch tensor -> typed wire tensor (one copy, into the response)."""
    name = WIRE_DTYPES.get(t.dtype)
    if name is None:
        t, name = t.to(torch.float32), "float32"
    t = t.detach().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return Tensor(name, tuple(int(d) for d in t.shape), raw)
