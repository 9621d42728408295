"""glibc malloc tuning for megabyte bodies: applied by default, off by env, a no-op elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CODE = "from trimmer.malloc import tune_for_large_bodies; print(tune_for_large_bodies())"


def _run(env_value: str | None) -> str:
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["TRIMMER_MALLOC_TUNING"] = env_value
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True,
                          text=True, env=env, timeout=60).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_applied_on_glibc_by_default() -> None:
    assert _run(None) == "True"


def test_switched_off_by_env() -> None:
    assert _run("0") == "False"
