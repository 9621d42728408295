"""leaf/failures.py: which inputs a dtype error blames, from the error texts torch versions actually produce.
The real-leaf path (400 dtype_mismatch, 500 + ERROR line) is in tests/test_tritonclient.py; torch 2.13 (the one
installed here) no longer emits the issue's "Tensor dtype mismatch!" text, so those texts are fed in here."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from leaf.failures import DtypeMismatch, ModelError, explain_forward_failure, first_line  # noqa: E402

NAMES = ["a", "b", "c"]
SENT = [torch.int64, torch.float32, torch.int64]


@pytest.mark.parametrize("text,declared,blamed", [
    ("Tensor dtype mismatch! Expected: Float, Got: long int", [None, None, None], ["a", "c"]),  # both int64 inputs
    ("Tensor dtype mismatch! Expected: Float, Got: long int", [None, None, "int64"], ["a"]),
    ("Expected input at *args[2].dtype to be equal to torch.float32, but got torch.int64", [None, None, None], ["c"]),
    ("mat1 and mat2 must have the same dtype, but got Long and Float", [None, "float32", None], ["a", "c"]),
    ("expected scalar type Float but found Double", [None, None, None], ["a", "b", "c"]),  # nothing sent as float64
])
def test_dtype_errors_blame_the_undeclared_inputs_sent_in_the_wrong_dtype(text, declared, blamed):
    err = explain_forward_failure(RuntimeError(text), NAMES, declared, SENT)
    assert isinstance(err, DtypeMismatch) and err.inputs == blamed
    msg = str(err)
    assert all(f"inputs.{n}.dtype" in msg for n in blamed) and text in msg


@pytest.mark.parametrize("text,declared", [
    ("Tensor dtype mismatch! Expected: Float, Got: long int", ["int64", "float32", "int64"]),  # every dtype declared
    ("index 7 is out of bounds for dimension 0 with size 3", [None, None, None]),  # not about dtypes
])
def test_other_failures_stay_model_errors(text, declared):
    err = explain_forward_failure(RuntimeError(text), NAMES, declared, SENT)
    assert type(err) is ModelError and "RuntimeError: " + text.split("\n")[0] in str(err)


def test_torchscript_errors_are_reduced_to_the_raised_error():
    text = ("The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript (most recent "
            "call last):\n  File \"code/__torch__.py\", line 9, in forward\n    "
            "ops.prim.RaiseException(\"boom\")\nbuiltins.ValueError: boom\n")
    assert first_line(RuntimeError(text)) == "ValueError: boom"
    assert first_line(RuntimeError("")) == "RuntimeError"
