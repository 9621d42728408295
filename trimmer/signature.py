"""Read a model's signature from its PyTorch archive without torch.

Both `torch.jit.save(..., _extra_files=...)` (.pt) and
`torch.export.save(..., extra_files=...)` (.pt2) store extra files as
`<prefix>/extra/<name>` inside a zip; the prefix is `archive` for buffers and
the file stem for paths, so any single top-level folder matches. Nothing is
unpickled and reads are bounded, so a hostile archive costs at most
MAX_SIGNATURE_BYTES of memory.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .errors import SignatureError
from .tensor import DTYPES

SIGNATURE_FILE = "module_info.json"
MAX_SIGNATURE_BYTES = 4 * 1024 * 1024
_ENTRY = re.compile(r"^([^/]+)/extra/module_info\.json$")
_SPEC_KEYS = {"dtype", "shape", "default"}
BATCHING_MODES = ("rows", "request")  # how the leaf may batch a model (docs/protocol.md)


@dataclass(frozen=True)
class InputSpec:
    """How the leaf turns one feature into a tensor. shape: -1 marks the candidate dimension."""

    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    default: Any = None
    has_default: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.has_default:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class Signature:
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    inputs: dict[str, InputSpec] = field(default_factory=dict)
    # "rows": requests may share a call along the row/candidate axis (the leaf's batched convention);
    # "request": one request per call (e.g. a slate model that looks at all of its candidates at once)
    batching: str = "rows"

    @property
    def allowlist(self) -> frozenset[str]:
        return frozenset(self.input_names)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input_names": list(self.input_names), "output_names": list(self.output_names)}
        if self.inputs:
            out["inputs"] = {name: spec.to_json() for name, spec in self.inputs.items()}
        if self.batching != "rows":
            out["batching"] = self.batching
        return out


def _names(info: dict[str, Any], key: str, where: str, allow_empty: bool) -> tuple[str, ...]:
    if key not in info:
        raise SignatureError(f"{where}: missing required key {key!r}")
    names = info[key]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise SignatureError(f"{where}: {key!r} must be a list of non-empty strings")
    if not names and not allow_empty:
        raise SignatureError(f"{where}: {key!r} is empty")
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dups:
        raise SignatureError(f"{where}: duplicate names in {key!r}: {', '.join(dups)}")
    return tuple(names)


def _spec(name: str, raw: Any, where: str) -> InputSpec:
    if not isinstance(raw, dict):
        raise SignatureError(f"{where}: inputs[{name!r}] must be an object")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise SignatureError(f"{where}: inputs[{name!r}] has unknown keys {sorted(unknown)}")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise SignatureError(f"{where}: inputs[{name!r}].dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    shape = raw.get("shape")
    if shape is not None:
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
            raise SignatureError(f"{where}: inputs[{name!r}].shape must be a list of integers >= -1")
        if shape.count(-1) > 1:
            raise SignatureError(f"{where}: inputs[{name!r}].shape may mark at most one dimension -1")
        shape = tuple(shape)
    default = raw.get("default")
    if default is not None and not isinstance(default, (int, float, bool, list)):
        raise SignatureError(f"{where}: inputs[{name!r}].default must be a number, bool or list")
    return InputSpec(dtype, shape, default, "default" in raw)


def parse_signature(data: bytes, where: str = "module_info.json") -> Signature:
    """Validate module_info.json bytes; the minimal two-key form is always accepted."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SignatureError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SignatureError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise SignatureError(f"{where}: must be a JSON object, got {type(info).__name__}")
    input_names = _names(info, "input_names", where, allow_empty=True)
    output_names = _names(info, "output_names", where, allow_empty=True)
    raw_inputs = info.get("inputs", {})
    if not isinstance(raw_inputs, dict):
        raise SignatureError(f"{where}: 'inputs' must be an object of input name to spec")
    stray = sorted(set(raw_inputs) - set(input_names))
    if stray:
        raise SignatureError(f"{where}: 'inputs' describes names not in input_names: {', '.join(stray)}")
    inputs = {name: _spec(name, raw_inputs[name], where) for name in input_names if name in raw_inputs}
    batching = info.get("batching", "rows")
    if batching not in BATCHING_MODES:
        raise SignatureError(f"{where}: 'batching' must be one of {', '.join(BATCHING_MODES)}, got {batching!r}")
    return Signature(input_names, output_names, inputs, batching)


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    if info.file_size > MAX_SIGNATURE_BYTES:
        raise SignatureError(
            f"{where}: {info.filename} declares {info.file_size} bytes, over the {MAX_SIGNATURE_BYTES} limit")
    with zf.open(info) as fh:
        data = fh.read(MAX_SIGNATURE_BYTES + 1)
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{where}: {info.filename} inflates past the {MAX_SIGNATURE_BYTES} byte limit (zip bomb?)")
    return data


def read_signature_bytes(source: str | os.PathLike[str] | BinaryIO, where: str | None = None) -> bytes:
    """The raw module_info.json bytes of an archive (path or binary file object)."""
    where = where or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "archive")
    try:
        with zipfile.ZipFile(source) as zf:
            matches = []
            for info in zf.infolist():
                m = _ENTRY.match(info.filename)
                if m and m.group(1) not in (".", ".."):
                    matches.append(info)
            if not matches:
                raise SignatureError(
                    f"{where}: no <prefix>/extra/{SIGNATURE_FILE} in archive (was the model saved with its signature?)")
            if len(matches) > 1:
                raise SignatureError(
                    f"{where}: more than one {SIGNATURE_FILE}: {', '.join(i.filename for i in matches)}")
            return _read_bounded(zf, matches[0], where)
    except SignatureError:
        raise
    except FileNotFoundError:
        raise SignatureError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise SignatureError(f"{where}: is a directory, not a model archive") from None
    except zipfile.BadZipFile as exc:
        raise SignatureError(f"{where}: not a valid zip archive ({exc})") from None
    except (EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        # truncated members, unsupported compression, encrypted entries, bad headers
        raise SignatureError(f"{where}: archive is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def read_signature(source: str | os.PathLike[str] | BinaryIO, where: str | None = None) -> Signature:
    where = where or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "archive")
    return parse_signature(read_signature_bytes(source, where), f"{where}:{SIGNATURE_FILE}")
