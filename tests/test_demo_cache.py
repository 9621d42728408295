"""leaf/demo_cache.py: a hit is a byte-identical copy; other parameters or no cache variable build anew."""

from __future__ import annotations

from pathlib import Path

from leaf.demo_cache import CACHE_ENV, build_cached
from trimmer.settings import settings


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_hits_copy_the_first_build_and_other_parameters_miss(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    settings.cache_clear()  # the variable is read once per process (trimmer/settings.py): read it again
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "m" / "1").mkdir(parents=True)
        (out / "m" / "1" / "model.pt").write_bytes(b"weights %d" % len(calls))

    assert build_cached(tmp_path / "a", build, items=1000) is False
    assert build_cached(tmp_path / "b", build, items=1000) is True
    assert len(calls) == 1 and _tree(tmp_path / "a") == _tree(tmp_path / "b") == {"m/1/model.pt": b"weights 1"}
    assert build_cached(tmp_path / "c", build, items=2000) is False  # another size: built, not copied
    assert _tree(tmp_path / "c") == {"m/1/model.pt": b"weights 2"}
    monkeypatch.delenv(CACHE_ENV)
    settings.cache_clear()
    assert build_cached(tmp_path / "d", build, items=1000) is False and len(calls) == 3
    monkeypatch.undo()
    settings.cache_clear()  # later tests see the suite's own cache variable again
