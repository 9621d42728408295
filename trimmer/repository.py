"""Scan a Triton-like model repository: <repo>/<model>/<version>/model.pt | model.pt2.

`iter_versions` is the one walk over a repository (the root's repository sources, `trimmer inspect`, the
leaf's loader), so every reader agrees on what counts as a model version: visible directories (no leading
dot), sorted, holding model.pt2 and/or model.pt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

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


class VersionDir(NamedTuple):
    model: str
    version: str
    path: Path  # <repo>/<model>/<version>
    archives: list[Path]  # the archives present, in ARCHIVE_NAMES order (never empty): archives[0] is the one served


def iter_versions(repo: str | os.PathLike[str], keep: Callable[[Path], bool] | None = None) -> Iterator[VersionDir]:
    """Every model version directory that holds an archive, sorted by model then version. `keep(dir)`, when
    given, is asked about each model and each version directory first; a False skips it (and a model's versions).
    An unreadable directory is passed over as empty."""
    for model_dir in _visible_dirs(Path(repo)):
        if keep is not None and not keep(model_dir):
            continue
        for version_dir in _visible_dirs(model_dir):
            if keep is not None and not keep(version_dir):
                continue
            present = [version_dir / n for n in ARCHIVE_NAMES if (version_dir / n).is_file()]
            if present:
                yield VersionDir(model_dir.name, version_dir.name, version_dir, present)


def scan_repository(repo: str | os.PathLike[str]) -> ScanResult:
    """Read every version's signature; a bad archive is an error for that version only."""
    root = Path(repo)
    if not root.is_dir():
        raise SignatureError(f"{root}: model repository is not a directory")
    result = ScanResult()
    for v in iter_versions(root):
        key = (v.model, v.version)
        try:
            signatures = [read_signature(p) for p in v.archives]
            if any(s != signatures[0] for s in signatures[1:]):
                raise SignatureError(f"{v.path}: model.pt and model.pt2 carry different signatures")
        except SignatureError as exc:
            result.errors[key] = str(exc)
            continue
        result.versions[key] = ModelVersion(v.model, v.version, v.archives[0], signatures[0])
    return result
