"""A build cache for `trimmer leaf build-demo`, used by the test suite (TRIMMER_DEMO_CACHE=DIR).

Building the demo repository trains two small models and exports each as .pt
and .pt2: about 30 CPU seconds. A dozen test modules each need one, so without
a cache the suite spends minutes rebuilding identical, seeded repositories.
The key covers the arguments and the source of every leaf module, so a change
to the demo models invalidates it. Entries are written to a temporary name and
renamed into place, so a concurrent or interrupted build never leaves half a
repository behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from trimmer.settings import ENV_VARS, settings

CACHE_ENV = ENV_VARS["demo_cache"]  # TRIMMER_DEMO_CACHE, read once (trimmer/settings.py)


def _key(**params: object) -> str:
    h = hashlib.sha256(repr(sorted(params.items())).encode())
    for src in sorted(Path(__file__).parent.glob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:20]


def build_cached(out: str | os.PathLike[str], build: Callable[[Path], object], **params: object) -> bool:
    """Copy a cached build into `out` when $TRIMMER_DEMO_CACHE has one, else build (and fill the cache).

    Returns True on a cache hit. Without the variable this is just `build(out)`.
    """
    out = Path(out)
    cache_root = settings().demo_cache
    if not cache_root:
        build(out)
        return False
    entry = Path(cache_root) / _key(**params)
    if entry.is_dir():
        shutil.copytree(entry, out, dirs_exist_ok=True)
        return True
    build(out)
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".building-"))
    shutil.copytree(out, tmp, dirs_exist_ok=True)
    try:
        os.rename(tmp, entry)
    except OSError:  # another process filled it first
        shutil.rmtree(tmp, ignore_errors=True)
    return False


__all__ = ["build_cached", "CACHE_ENV"]
