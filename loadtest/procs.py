"""Start real root / leaf processes on free loopback ports and always stop them.

Used by `make demo`, the load test and the integration tests, so every caller
gets the same guarantees: bounded start-up wait, readiness over HTTP, and no
stray processes (the whole process group is terminated, then killed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def trimmer_cmd(*args: str) -> list[str]:
    """The `trimmer` CLI under the current interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "trimmer", *args]


@dataclass
class ManagedProcess:
    name: str
    cmd: list[str]
    url: str
    log_path: Path
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None  # relative paths in the command resolve here (default: the caller's)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env}, start_new_session=True, cwd=self.cwd,
        )
        log.close()
        return self

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        """Poll `url+path` until HTTP 200; fail with the process log tail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready at {self.url + path} after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the process group (graceful drain), SIGKILL after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def start(name: str, args: Sequence[str], port: int, ready_path: str, log_dir: Path, timeout: float = 60.0,
          env: dict[str, str] | None = None) -> ManagedProcess:
    """Start `trimmer <args>` that listens on 127.0.0.1:port and wait until ready_path answers 200."""
    mp = ManagedProcess(name, trimmer_cmd(*args), f"http://127.0.0.1:{port}",
                        Path(log_dir) / f"{name}.log", env=env or {})
    mp.start()
    try:
        mp.wait_ready(ready_path, timeout)
    except BaseException:
        mp.stop(grace=2)
        raise
    return mp


@contextlib.contextmanager
def running(*procs: ManagedProcess) -> Iterator[tuple[ManagedProcess, ...]]:
    """Stop every process on exit, also on Ctrl-C or an exception."""
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()
