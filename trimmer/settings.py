"""Runtime switches from the environment: one typed object, read once per process (docs/settings.md).

Why one object: the switches used to be read by `os.environ.get` in six files, each with its own idea of
what a bad value means (`TRIMMER_GC_TUNING=maybe` silently meant "on"). Here every variable is parsed and
checked in one place when a service starts, so a typo is a one-line error and a non-zero exit, not a
switch quietly left on; the values in force are logged once (one INFO line) and served at
`GET /admin/settings` on the root's admin listener and on the leaf.

| variable                | field           | type               | default | effect |
|-------------------------|-----------------|--------------------|---------|--------|
| TRIMMER_FAST_LISTENER   | fast_listener   | bool               | true    | root: scoring routes on the
BufferedProtocol listener (root/front.py); off: aiohttp serves every request |
| TRIMMER_MALLOC_TUNING   | malloc_tuning   | bool               | true    | root, leaf: glibc malloc thresholds for
megabyte bodies (trimmer/malloc.py) |
| TRIMMER_GC_TUNING       | gc_tuning       | bool               | true    | leaf: young-generation GC threshold and
freeze after loads (leaf/gctune.py) |
| TRIMMER_LOG_LEVEL       | log_level       | DEBUG/INFO/WARNING/ERROR | INFO | root: log level when `--log-level` is
not given |
| TRIMMER_LOG_FORMAT      | log_format      | text/json          | text    | root: log line format when `--log-format`
is not given (root/logs.py) |
| TRIMMER_DEMO_CACHE      | demo_cache      | directory or unset | unset   | `trimmer leaf build-demo`: reuse demo
repository builds (leaf/demo_cache.py) |
| TRIMMER_NO_EXTENSIONS   | no_extensions   | bool               | false   | use the pure-Python code paths instead of
the compiled extensions |

Booleans accept 1/0, true/false, yes/no, on/off (any case); an empty value counts as unset.
PROMETHEUS_MULTIPROC_DIR is prometheus_client's own contract (root/metrics.py) and is not a setting.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Literal, Mapping

import msgspec

from .errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """The process's runtime switches; see the module docstring for the variable behind each field."""

    fast_listener: bool = True
    malloc_tuning: bool = True
    gc_tuning: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    demo_cache: str | None = None
    no_extensions: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Parse the TRIMMER_* variables of `environ` (default os.environ); ConfigError (one line) on a bad value."""
        env = os.environ if environ is None else environ
        kw: dict[str, Any] = {}
        for field, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            value = raw.strip()
            if field in _BOOLS:
                if value.lower() in _TRUE:
                    kw[field] = True
                elif value.lower() in _FALSE:
                    kw[field] = False
                else:
                    raise ConfigError(f"{var}={raw!r}: expected one of 1, 0, true, false, yes, no, on, off")
            elif field == "log_level":
                if value.upper() not in LOG_LEVELS:
                    raise ConfigError(f"{var}={raw!r}: expected one of {', '.join(LOG_LEVELS)}")
                kw[field] = value.upper()
            elif field == "log_format":
                if value.lower() not in LOG_FORMATS:
                    raise ConfigError(f"{var}={raw!r}: expected one of {', '.join(LOG_FORMATS)}")
                kw[field] = value.lower()
            else:
                kw[field] = value
        return cls(**kw)

    def describe(self) -> dict[str, Any]:
        """{field: {"value", "env", "default", "changed"}}: what is in force and where it came from (JSON-ready)."""
        out: dict[str, Any] = {}
        for field, var in ENV_VARS.items():
            value = getattr(self, field)
            default = _DEFAULTS[field]
            out[field] = {"value": value, "env": var, "default": default, "changed": value != default}
        return out

    def line(self) -> str:
        """One log line's worth: `fast_listener=True malloc_tuning=True ...`."""
        return " ".join(f"{f}={getattr(self, f)}" for f in ENV_VARS)


ENV_VARS: dict[str, str] = {
    "fast_listener": "TRIMMER_FAST_LISTENER",
    "malloc_tuning": "TRIMMER_MALLOC_TUNING",
    "gc_tuning": "TRIMMER_GC_TUNING",
    "log_level": "TRIMMER_LOG_LEVEL",
    "log_format": "TRIMMER_LOG_FORMAT",
    "demo_cache": "TRIMMER_DEMO_CACHE",
    "no_extensions": "TRIMMER_NO_EXTENSIONS",
}
_DEFAULTS: dict[str, Any] = {f: getattr(Settings(), f) for f in ENV_VARS}
_BOOLS = frozenset(f for f, d in _DEFAULTS.items() if isinstance(d, bool))
assert set(ENV_VARS) == set(Settings.__struct_fields__)


@functools.cache
def settings() -> Settings:
    """The settings of this process, read from os.environ on first use (`settings.cache_clear()` re-reads)."""
    return Settings.from_env(os.environ)


def describe() -> dict[str, Any]:
    """`settings().describe()`: the body of GET /admin/settings."""
    return settings().describe()


__all__ = ["Settings", "settings", "describe", "ENV_VARS", "LOG_LEVELS", "LOG_FORMATS"]
