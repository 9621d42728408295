"""Bundles: the small JSON artifact a root deploys instead of model archives.

A bundle maps model -> version -> signature and may hold several versions of a
model (current and pending), so roots can roll out before leaves do.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import BundleError, SignatureError
from .repository import scan_repository
from .signature import Signature, parse_signature

BUNDLE_KIND = "feature-trimmer/bundle"
BUNDLE_FORMAT = 1
MAX_BUNDLE_BYTES = 64 * 1024 * 1024

Allowlists = dict[tuple[str, str], Signature]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_bundle(repos: list[str | os.PathLike[str]]) -> dict[str, Any]:
    """Aggregate repositories; any unreadable archive or cross-repo conflict fails the build."""
    models: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, str], Signature] = {}
    for repo in repos:
        try:
            scan = scan_repository(repo)
        except SignatureError as exc:
            raise BundleError(str(exc)) from None
        if scan.errors:
            first = next(iter(scan.errors.values()))
            raise BundleError(f"{len(scan.errors)} archive(s) unreadable; first: {first}")
        for key, mv in sorted(scan.versions.items()):
            if key in seen and seen[key] != mv.signature:
                raise BundleError(
                    f"model {key[0]!r} version {key[1]!r} appears in two repositories with different signatures")
            seen[key] = mv.signature
            entry = mv.signature.to_json()
            entry["source"] = str(mv.path)
            entry["sha256"] = _sha256(mv.path)
            models.setdefault(key[0], {"versions": {}})["versions"][key[1]] = entry
    return {
        "kind": BUNDLE_KIND,
        "format": BUNDLE_FORMAT,
        "created_unix": int(time.time()),
        "models": models,
    }


def write_bundle(bundle: dict[str, Any], out: str | os.PathLike[str]) -> None:
    """Write atomically (temp file + rename) so a watching root never reads half a bundle."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    # mkstemp creates 0600; a bundle (feature names, no secrets) is read by a root running as another
    # user (a container's uid 10001, a mounted volume), so make it world-readable like any written file.
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(bundle, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, out)


def parse_bundle(data: bytes, where: str) -> tuple[Allowlists, dict[str, str]]:
    """Returns (allowlists, default versions). Raises BundleError with one line on any defect."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != BUNDLE_KIND:
        raise BundleError(f"{where}: not a bundle (expected \"kind\": \"{BUNDLE_KIND}\")")
    if doc.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{where}: unsupported bundle format {doc.get('format')!r}; this version reads {BUNDLE_FORMAT}")
    models = doc.get("models")
    if not isinstance(models, dict):
        raise BundleError(f"{where}: 'models' must be an object")
    out: Allowlists = {}
    defaults: dict[str, str] = {}
    for model, entry in models.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("versions"), dict):
            raise BundleError(f"{where}: model {model!r} must have a 'versions' object")
        if entry.get("default_version") is not None:
            defaults[model] = str(entry["default_version"])
        for version, sig in entry["versions"].items():
            if not isinstance(sig, dict):
                raise BundleError(f"{where}: {model}/{version} must be an object")
            core = {k: sig[k] for k in ("input_names", "output_names", "inputs") if k in sig}
            try:
                out[(model, str(version))] = parse_signature(json.dumps(core).encode(), f"{where}:{model}/{version}")
            except SignatureError as exc:
                raise BundleError(str(exc)) from None
    return out, defaults


def read_bundle(path: str | os.PathLike[str]) -> tuple[Allowlists, dict[str, str]]:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise BundleError(f"{path}: {size} bytes, over the {MAX_BUNDLE_BYTES} byte bundle limit")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: no such bundle file") from None
    except IsADirectoryError:
        raise BundleError(f"{path}: is a directory, not a bundle file") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_bundle(data, str(path))
