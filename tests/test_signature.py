"""Signature reading from real .pt / .pt2 archives and every documented failure."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from archives import save_archive
from trimmer.errors import SignatureError
from trimmer.signature import MAX_SIGNATURE_BYTES, parse_signature, read_signature

INFO = {
    "input_names": ["user_age", "cand_ctr"],
    "output_names": ["score"],
    "inputs": {"cand_ctr": {"dtype": "float32", "shape": [-1]},
               "user_age": {"dtype": "int64", "shape": [], "default": 0}},
}


@pytest.mark.parametrize("fmt", ["pt", "pt2"])
def test_reads_real_archives_saved_to_a_path(tmp_path: Path, fmt: str) -> None:
    path = save_archive(tmp_path / f"ranker_v3.{fmt}", INFO, fmt)
    assert any(n.startswith("ranker_v3/extra/") for n in zipfile.ZipFile(path).namelist())
    sig = read_signature(path)
    assert sig.input_names == ("user_age", "cand_ctr")
    assert sig.output_names == ("score",)
    assert sig.inputs["cand_ctr"].shape == (-1,)
    assert sig.inputs["user_age"].has_default and sig.inputs["user_age"].default == 0
    assert sig.to_json() == INFO


@pytest.mark.parametrize("fmt", ["pt", "pt2"])
def test_reads_archives_saved_to_a_buffer(fmt: str) -> None:
    import torch

    from archives import _module

    buf = io.BytesIO()
    if fmt == "pt":
        torch.jit.save(torch.jit.script(_module(2)), buf, _extra_files={"module_info.json": json.dumps(INFO)})
    else:
        ep = torch.export.export(_module(2), (torch.zeros(2), torch.zeros(2)))
        torch.export.save(ep, buf, extra_files={"module_info.json": json.dumps(INFO)})
    buf.seek(0)
    assert any(n.startswith("archive/extra/") for n in zipfile.ZipFile(io.BytesIO(buf.getvalue())).namelist())
    assert read_signature(buf).input_names == ("user_age", "cand_ctr")


def test_minimal_two_key_form() -> None:
    sig = parse_signature(b'{"input_names": ["a"], "output_names": ["y"]}')
    assert sig.allowlist == frozenset({"a"}) and sig.inputs == {}


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _good() -> bytes:
    return _zip({"m/data.pkl": b"\x80\x04N.", "m/extra/module_info.json": json.dumps(INFO).encode()})


def _bomb_with_lying_sizes() -> bytes:
    """A deflated entry that declares 100 bytes but inflates to MAX+1 MiB."""
    data = bytearray(_zip({"m/extra/module_info.json": b" " * (MAX_SIGNATURE_BYTES + (1 << 20))}, zipfile.ZIP_DEFLATED))
    for sig, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(sig)
        struct.pack_into("<I", data, at + size_at, 100)
    return bytes(data)


BAD_ARCHIVES = {
    "not a zip": (b"this is not a zip file at all", "not a valid zip archive"),
    "truncated zip": (_good()[:-30], "not a valid zip archive"),
    "no module_info.json": (_zip({"m/data.pkl": b"x"}), "no <prefix>/extra/module_info.json"),
    "two module_info.json": (
        _zip({"a/extra/module_info.json": b"{}", "b/extra/module_info.json": b"{}"}),
        "more than one module_info.json",
    ),
    "path traversal prefix": (_zip({"../extra/module_info.json": json.dumps(INFO).encode()}), "no <prefix>/extra"),
    "invalid utf-8": (_zip({"m/extra/module_info.json": b"\xff\xfe{}"}), "not valid UTF-8"),
    "invalid json": (_zip({"m/extra/module_info.json": b"{input_names:"}), "not valid JSON"),
    "top level list": (_zip({"m/extra/module_info.json": b"[]"}), "must be a JSON object"),
    "missing input_names": (_zip({"m/extra/module_info.json": b'{"output_names": []}'}),
                            "missing required key 'input_names'"),
    "input_names not a list": (
        _zip({"m/extra/module_info.json": b'{"input_names": "a", "output_names": []}'}),
        "'input_names' must be a list of non-empty strings",
    ),
    "empty name": (_zip({"m/extra/module_info.json": b'{"input_names": [""], "output_names": []}'}),
                   "non-empty strings"),
    "duplicate names": (
        _zip({"m/extra/module_info.json": b'{"input_names": ["a", "b", "a"], "output_names": []}'}),
        "duplicate names in 'input_names': a",
    ),
    "bad input spec dtype": (
        _zip({"m/extra/module_info.json":
              b'{"input_names": ["a"], "output_names": [], "inputs": {"a": {"dtype": "float128"}}}'}),
        "dtype 'float128' is not one of",
    ),
    "spec for unknown input": (
        _zip({"m/extra/module_info.json": b'{"input_names": ["a"], "output_names": [], "inputs": {"b": {}}}'}),
        "describes names not in input_names: b",
    ),
    "oversized declared entry": (
        _zip({"m/extra/module_info.json": b" " * (MAX_SIGNATURE_BYTES + 1)}, zipfile.ZIP_DEFLATED),
        "over the 4194304 limit",
    ),
    "zip bomb with lying sizes": (_bomb_with_lying_sizes(), "m/extra/module_info.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archives_raise_one_line_errors(tmp_path: Path, case: str) -> None:
    data, expected = BAD_ARCHIVES[case]
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    with pytest.raises(SignatureError) as info:
        read_signature(path)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and message.startswith(str(path))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="no such file"):
        read_signature(tmp_path / "nope.pt")
    with pytest.raises(SignatureError, match="is a directory"):
        read_signature(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trimmer", *args], capture_output=True, text=True, timeout=60)


def test_inspect_prints_signature_json(tmp_path: Path) -> None:
    path = save_archive(tmp_path / "m.pt", INFO, "pt")
    out = _cli("inspect", str(path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == INFO


@pytest.mark.parametrize("case", ["not a zip", "truncated zip", "invalid json", "duplicate names"])
def test_inspect_bad_input_one_line_nonzero(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(BAD_ARCHIVES[case][0])
    out = _cli("inspect", str(path))
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and BAD_ARCHIVES[case][1] in lines[0] and "Traceback" not in out.stderr


def test_reading_never_imports_torch(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(_good())
    code = (f"import sys; from trimmer.signature import read_signature; read_signature({str(path)!r}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
