"""Model failures that explain themselves.

Why: a torch.export or TorchScript model whose signature lists only input names gets its inputs in whatever
dtype the values arrived as (JSON integers become int64), and the model then fails with an error such as
"Tensor dtype mismatch! Expected: Float, Got: long int" or "mat1 and mat2 must have the same dtype, but got
Long and Float" that names neither the input nor the fix. When such an error names a dtype and some input
had no declared dtype, the failure becomes a `DtypeMismatch` that names those inputs, the dtypes they were
sent in, and the fix (declare `inputs.<name>.dtype` in the signature, or send the dtype the model expects).
The leaf answers it with 400 (docs/leaf.md): the request is what the model cannot take, and re-sending the
same request would fail the same way. Every other model failure stays a 500.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

# torch's C++ and Python spellings of scalar types -> wire dtype names
_TORCH_NAMES = {
    "float": "float32", "float32": "float32", "double": "float64", "float64": "float64", "half": "float16",
    "float16": "float16", "bfloat16": "bfloat16", "long": "int64", "long int": "int64", "int64": "int64",
    "int": "int32", "int32": "int32", "short": "int16", "int16": "int16", "char": "int8", "signed char": "int8",
    "int8": "int8", "byte": "uint8", "unsigned char": "uint8", "uint8": "uint8", "bool": "bool",
}
_DTYPE_WORDS = re.compile(r"dtype|scalar type", re.IGNORECASE)
_GOT = re.compile(r"(?:\bgot:?|\bfound)\s+(?:torch\.)?(unsigned char|signed char|long int|[A-Za-z0-9]+)", re.IGNORECASE)
_ARG = re.compile(r"args\[(\d+)\]")


class ModelError(RuntimeError):
    """The model raised or returned something unusable (HTTP 500)."""


class DtypeMismatch(ModelError):
    """The model rejected the dtype of inputs whose dtype the signature does not declare (HTTP 400)."""

    def __init__(self, message: str, inputs: list[str]) -> None:
        super().__init__(message)
        self.inputs = inputs


def first_line(exc: BaseException) -> str:
    """`Type: message` on one line. A TorchScript error's first line only says that an operation failed; the
    error the model raised is its last line (`builtins.RuntimeError: ...`)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return lines[-1].strip().removeprefix("builtins.")
    return f"{type(exc).__name__}: {lines[0]}"


def explain_forward_failure(exc: BaseException, names: Sequence[str], declared: Sequence[str | None],
                            sent: Sequence[Any]) -> ModelError:
    """The ModelError to raise for `exc` from the model's forward. names/declared/sent: per input, its name, the
    signature's dtype (None when undeclared) and the torch dtype it was sent as."""
    detail = first_line(exc)
    text = str(exc)
    undeclared = [i for i, d in enumerate(declared) if d is None]
    if not undeclared or not _DTYPE_WORDS.search(text):
        return ModelError(f"model forward failed: {detail}")
    sent_names = [str(t).replace("torch.", "") for t in sent]
    suspects = undeclared
    m = _ARG.search(text)
    if m and int(m.group(1)) in undeclared:
        suspects = [int(m.group(1))]
    else:
        g = _GOT.search(text)
        got = _TORCH_NAMES.get(g.group(1).lower()) if g else None
        narrowed = [i for i in undeclared if got is not None and i < len(sent_names) and sent_names[i] == got]
        suspects = narrowed or undeclared
    inputs = [names[i] for i in suspects]
    described = ", ".join(
        f"{names[i]} (sent as {sent_names[i]})" if i < len(sent_names) else names[i] for i in suspects)
    fix = " and ".join(f"inputs.{n}.dtype" for n in inputs)
    return DtypeMismatch(f"the model rejected the dtype of input {described}: {detail}. The signature declares no "
                         f"dtype for {'it' if len(inputs) == 1 else 'them'}, so the leaf passed the values as they "
                         f"came; declare {fix} in the model's signature (module_info.json), or send the dtype the "
                         "model expects", inputs)
