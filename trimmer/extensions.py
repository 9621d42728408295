"""One switch for the optional C extensions (trimmer/_fasttrim.c, trimmer/_tensorext.c).

Why: each extension has a pure-Python twin with the same output (trimmer/_trim_py.py, trimmer.codec._ext_hook),
so the service works, more slowly, where no compiler was at install time. TRIMMER_NO_EXTENSIONS=1 selects the
twins even where the extensions are built (as aiohttp's AIOHTTP_NO_EXTENSIONS): to run the tests in both modes,
or to rule an extension out while chasing a problem. Child processes inherit it with the environment.

The switch is read once per process, when the first module that needs an extension is imported.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

ENV = "TRIMMER_NO_EXTENSIONS"

log = logging.getLogger(__name__)


@functools.cache
def enabled() -> bool:
    """False when TRIMMER_NO_EXTENSIONS is on (trimmer/settings.py: 1, true, yes, on; a bad value is a ConfigError)."""
    from .settings import settings

    if not settings().no_extensions:
        return True
    log.warning("%s=%s: C extensions off, the pure-Python trim and tensor hook run instead (same output, slower)",
                ENV, os.environ.get(ENV, ""))
    return False


@functools.cache
def load(name: str) -> ModuleType | None:
    """The extension trimmer.<name>, or None (use the Python twin): switched off, or not built (one log line)."""
    if not enabled():
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError as exc:
        log.warning(
            "C extension trimmer.%s unavailable (%s): using its pure-Python twin (same output, slower)", name, exc)
        return None
