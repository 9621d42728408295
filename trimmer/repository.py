"""Scan a Triton-like model repository: <repo>/<model>/<version>/model.pt | model.pt2."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SignatureError
from .signature import Signature, read_signature

ARCHIVE_NAMES = ("model.pt2", "model.pt")  # preference order when both exist


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: str
    path: Path
    signature: Signature


@dataclass
class ScanResult:
    versions: dict[tuple[str, str], ModelVersion] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)


def archive_path(version_dir: Path) -> Path | None:
    for name in ARCHIVE_NAMES:
        candidate = version_dir / name
        if candidate.is_file():
            return candidate
    return None


def _visible_dirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def scan_repository(repo: str | os.PathLike[str]) -> ScanResult:
    """Read every version's signature; a bad archive is an error for that version only."""
    root = Path(repo)
    if not root.is_dir():
        raise SignatureError(f"{root}: model repository is not a directory")
    result = ScanResult()
    for model_dir in _visible_dirs(root):
        for version_dir in _visible_dirs(model_dir):
            key = (model_dir.name, version_dir.name)
            present = [version_dir / n for n in ARCHIVE_NAMES if (version_dir / n).is_file()]
            if not present:
                continue
            try:
                signatures = [read_signature(p) for p in present]
                if any(s != signatures[0] for s in signatures[1:]):
                    raise SignatureError(f"{version_dir}: model.pt and model.pt2 carry different signatures")
            except SignatureError as exc:
                result.errors[key] = str(exc)
                continue
            result.versions[key] = ModelVersion(key[0], key[1], present[0], signatures[0])
    return result
