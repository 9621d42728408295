"""A bundle written by `trimmer bundle build` is readable by a root running as another user (container uid)."""

from __future__ import annotations

import stat
from pathlib import Path

from trimmer.bundle import write_bundle


def test_written_bundle_is_world_readable(tmp_path: Path) -> None:
    out = tmp_path / "bundle.json"
    write_bundle({"kind": "feature-trimmer/bundle", "format": 1, "models": {}}, out)
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode & stat.S_IROTH and mode & stat.S_IRGRP and not mode & (stat.S_IWOTH | stat.S_IWGRP)
