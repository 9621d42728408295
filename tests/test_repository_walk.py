"""trimmer.repository.iter_versions: the one repository walk the root, `trimmer inspect` and the leaf share.

The tree is written by hand here and the expected walk is spelled out, not computed by the code under test.
Archives are empty files: the walk looks at names only, never inside.
"""

from __future__ import annotations

from pathlib import Path

from trimmer.repository import iter_versions


def _tree(root: Path, files: list[str]) -> None:
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"")


def test_walk_sorted_visible_with_archives_only(tmp_path: Path) -> None:
    _tree(tmp_path,
          ["b/2/model.pt", "b/10/model.pt2", "a/1/model.pt", "a/1/model.pt2", "a/3/readme.txt", ".hidden/1/model.pt",
                     "a/.tmp/model.pt", "c/1/model.pt/inner", "loose.pt"])
    (tmp_path / "empty").mkdir()
    got = [(v.model, v.version, v.path.relative_to(tmp_path).as_posix(), [p.name for p in v.archives])
           for v in iter_versions(tmp_path)]
    assert got == [
        ("a", "1", "a/1", ["model.pt2", "model.pt"]),  # both present: .pt2 first (the one served)
        ("b", "10", "b/10", ["model.pt2"]),  # directory names sort as strings; "latest" is resolved elsewhere
        ("b", "2", "b/2", ["model.pt"]),
    ]


def test_keep_filters_models_and_versions(tmp_path: Path) -> None:
    _tree(tmp_path, ["ok/1/model.pt", "ok/bad version/model.pt", "bad model/1/model.pt"])
    asked: list[str] = []

    def keep(p: Path) -> bool:
        asked.append(p.relative_to(tmp_path).as_posix())
        return " " not in p.name

    assert [(v.model, v.version) for v in iter_versions(tmp_path, keep=keep)] == [("ok", "1")]
    assert asked == ["bad model", "ok", "ok/1", "ok/bad version"]  # a rejected model's versions are never visited


def test_missing_repository_walks_nothing(tmp_path: Path) -> None:
    assert list(iter_versions(tmp_path / "absent")) == []
