"""Hot reload through Kubernetes ConfigMap updates, on a real filesystem.

kubelet (pkg/volume/util/atomic_writer.go) never rewrites a mounted ConfigMap file in place. It
writes the new contents into a fresh timestamped directory, points a `..data_tmp` symlink at it,
renames `..data_tmp` over `..data` (the atomic step), and deletes the old directory. The visible
names are symlinks that never change: `allowlists.yaml -> ..data/allowlists.yaml`. So no event ever
names `allowlists.yaml` itself. `kubelet_swap` below performs exactly those steps; the registry
must reload the overrides file and a bundle mounted that way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from trimmer.registry import BundleSource, Registry, StaticSource
from trimmer.signature import Signature

_seq = itertools.count()


def kubelet_swap(mount: Path, files: dict[str, str]) -> None:
    """Publish `files` into a ConfigMap-style mount the way kubelet's AtomicWriter does."""
    mount.mkdir(parents=True, exist_ok=True)
    new = mount / f"..2026_01_01_00_00_{next(_seq):02d}.{os.getpid()}"
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    tmp = mount / "..data_tmp"
    os.symlink(new.name, tmp)
    os.rename(tmp, mount / "..data")  # atomic: readers see the old or the new set, never a mix
    for name in files:
        link = mount / name
        if not link.is_symlink():
            os.symlink(f"..data/{name}", link)
    if old is not None:
        shutil.rmtree(mount / old)


def bundle_text(models: dict[str, dict[str, list[str]]]) -> str:
    doc = {"kind": "feature-trimmer/bundle", "format": 1,
           "models": {m: {"versions": {v: {"input_names": names, "output_names": ["y"]} for v, names in vs.items()}}
                      for m, vs in models.items()}}
    return json.dumps(doc)


async def until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def test_kubelet_swap_layout(tmp_path: Path) -> None:
    """The helper builds kubelet's layout: stable symlinked names, one timestamped dir at a time."""
    mount = tmp_path / "cm"
    kubelet_swap(mount, {"a.yaml": "one"})
    kubelet_swap(mount, {"a.yaml": "two"})
    assert (mount / "a.yaml").is_symlink() and os.readlink(mount / "a.yaml") == "..data/a.yaml"
    assert (mount / "a.yaml").read_text() == "two"
    assert len([p for p in mount.iterdir() if p.name.startswith("..2026")]) == 1


@pytest.mark.parametrize("force_polling", [False, True], ids=["events", "polling"])
async def test_overrides_reload_on_configmap_swap(tmp_path: Path, force_polling: bool) -> None:
    mount = tmp_path / "overrides"
    kubelet_swap(mount, {"allowlists.yaml": "models:\n  m:\n    keep: [k1]\n"})
    reg = Registry([StaticSource("s", {("m", "1"): Signature(("a",), ("y",))})])
    reg.use_overrides_file(mount / "allowlists.yaml")
    reg.reload()
    assert reg.resolve("m", "1").allowlist == {"a", "k1"}
    stop = asyncio.Event()
    task = asyncio.create_task(reg.watch(stop, debounce_ms=50, force_polling=force_polling))
    try:
        await asyncio.sleep(0.5)  # let the watcher start
        kubelet_swap(mount, {"allowlists.yaml": "models:\n  m:\n    keep: [k2]\n    mode: shadow\n"})
        assert await until(lambda: reg.resolve("m", "1").allowlist == {"a", "k2"}), "ConfigMap swap not seen"
        assert reg.resolve("m", "1").mode == "shadow"
        # A bad edit through the same mechanism: counted, last good kept.
        kubelet_swap(mount, {"allowlists.yaml": "models:\n  m:\n    mode: trim-everything\n"})
        assert await until(lambda: any(s["kind"] == "overrides" and s["failures"] for s in reg.status()["sources"]))
        assert reg.resolve("m", "1").allowlist == {"a", "k2"}
        # And a fix after it.
        kubelet_swap(mount, {"allowlists.yaml": "models:\n  m:\n    keep: [k3]\n"})
        assert await until(lambda: reg.resolve("m", "1").allowlist == {"a", "k3"})
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("force_polling", [False, True], ids=["events", "polling"])
async def test_bundle_reload_on_configmap_swap(tmp_path: Path, force_polling: bool) -> None:
    mount = tmp_path / "bundles"
    kubelet_swap(mount, {"bundle.json": bundle_text({"m": {"1": ["a"]}})})
    reg = Registry([BundleSource(mount / "bundle.json")])
    reg.reload()
    assert reg.resolve("m", "1").allowlist == {"a"}
    stop = asyncio.Event()
    task = asyncio.create_task(reg.watch(stop, debounce_ms=50, force_polling=force_polling))
    try:
        await asyncio.sleep(0.5)
        kubelet_swap(mount, {"bundle.json": bundle_text({"m": {"1": ["a", "b"], "2": ["c"]}})})
        assert await until(lambda: reg.resolve("m", "2").allowlist == {"c"}), "ConfigMap swap not seen"
        assert reg.resolve("m", "1").allowlist == {"a", "b"}
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_unrelated_change_in_mount_does_not_reload(tmp_path: Path) -> None:
    """Only a change of what the watched name resolves to reloads; other files in the dir do not."""
    mount = tmp_path / "bundles"
    kubelet_swap(mount, {"bundle.json": bundle_text({"m": {"1": ["a"]}})})
    reg = Registry([BundleSource(mount / "bundle.json")])
    reg.reload()
    loads = reg.status()["sources"][0]["reloads"]
    stop = asyncio.Event()
    task = asyncio.create_task(reg.watch(stop, debounce_ms=50))
    try:
        await asyncio.sleep(0.5)
        (mount / "other.txt").write_text("x")
        # A swap that does change the bundle afterwards proves the watcher was running all along.
        kubelet_swap(mount, {"bundle.json": bundle_text({"m": {"1": ["z"]}})})
        assert await until(lambda: reg.resolve("m", "1").allowlist == {"z"})
        assert reg.status()["sources"][0]["reloads"] == loads + 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
