"""`trimmer root`: run the root service; `trimmer drift`: a running root's allowlist drift report.

Imports here stay light (no aiohttp, no torch): `trimmer --help` loads every
subcommand module. With `--workers N` this process becomes a small
supervisor of N worker processes sharing the port through SO_REUSEPORT and
one PROMETHEUS_MULTIPROC_DIR, so /metrics on any worker covers all of them.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from trimmer.errors import ConfigError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Coroutine

MAX_RESTARTS = 10
ORDER = 20  # place among the `trimmer` commands (trimmer/cli.py); `trimmer root bench` comes from loadtest (ORDER 30)


def _load(args: argparse.Namespace):
    from .config import load_config

    cfg = load_config(args.config)
    changes = {}
    if args.host is not None:
        changes["host"] = args.host
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port: must be 0..65535, got {args.port}")
        changes["port"] = args.port
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
        changes["workers"] = args.workers
    return replace(cfg, **changes) if changes else cfg


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _run_root(args: argparse.Namespace) -> int:
    from trimmer.settings import settings

    # every TRIMMER_* variable parsed once: a bad value is a one-line error here, before anything starts
    env = settings()
    level = (args.log_level or env.log_level).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: {level!r} is not one of {', '.join(LOG_LEVELS)}")
    from .logs import configure as configure_logs

    configure_logs(args.log_format, level)
    cfg = _load(args)
    if cfg.workers > 1 and not args.worker:
        return _supervise(args, cfg)
    # Import the server only now: uvloop and aiohttp stay out of `trimmer --help`.
    import asyncio

    from trimmer.malloc import tune_for_large_bodies

    from .app import serve

    tune_for_large_bodies()

    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # uvloop is optional on platforms without it
        loop_factory = asyncio.new_event_loop
    try:
        _run(serve(cfg, reuse_port=args.worker or cfg.workers > 1), loop_factory)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            # One line, like the leaf: the port is the user's to change, not a bug to trace.
            raise ConfigError(f"cannot listen: {exc.strerror or exc} ({str(exc).split(': ', 1)[0]}); "
                              f"free the port or pick another with --port / listen.port / admin.port") from None
        raise
    return 0


def _run(coro: Coroutine[Any, Any, None], loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Run `coro` on a loop from `loop_factory`: asyncio.Runner where there is one (3.11+); on 3.10, which
    requires-python allows, asyncio.run under a policy that makes that loop."""
    import asyncio

    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(coro)
        return

    class _Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return loop_factory()

    asyncio.set_event_loop_policy(_Policy())
    asyncio.run(coro)


def _supervise(args: argparse.Namespace, cfg) -> int:
    """Start N workers, forward SIGTERM/SIGINT, restart a crashed worker (bounded), clean the metrics dir."""
    from trimmer.settings import settings

    from .metrics import MULTIPROC_ENV, mark_process_dead

    if cfg.port == 0:
        raise ConfigError("--workers > 1 needs a fixed port (listen.port or --port), not 0")
    log = logging.getLogger("trimmer.root")
    own_dir = MULTIPROC_ENV not in os.environ
    mp_dir = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="trimmer-root-metrics-")
    env = {**os.environ, MULTIPROC_ENV: mp_dir}
    os.environ[MULTIPROC_ENV] = mp_dir  # so mark_process_dead here sees it
    cmd = [sys.executable, "-m", "trimmer", "root", "--config", args.config, "--worker", "--host", cfg.host, "--port",
           str(cfg.port), "--workers", str(cfg.workers), *(["--log-level", args.log_level] if args.log_level else [])]
    stopping = False

    def on_signal(signum, frame):  # noqa: ARG001
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [subprocess.Popen(cmd, env=env) for _ in range(cfg.workers)]
    log.info("root supervisor (pid %d): %d workers on %s:%d, metrics dir %s", os.getpid(), cfg.workers,
             cfg.host, cfg.port, mp_dir)
    log.info("settings: %s", settings().line())  # once here; the workers (reuse_port) do not repeat it
    restarts, rc = 0, 0
    try:
        while not stopping:
            time.sleep(0.2)
            for i, w in enumerate(workers):
                code = w.poll()
                if code is None or stopping:
                    continue
                mark_process_dead(w.pid)
                if restarts >= MAX_RESTARTS:
                    log.error("worker %d exited with %s; restart budget spent, stopping", w.pid, code)
                    stopping, rc = True, 1
                    break
                restarts += 1
                log.error("worker %d exited with %s; restarting (%d/%d)", w.pid, code, restarts, MAX_RESTARTS)
                workers[i] = subprocess.Popen(cmd, env=env)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + cfg.timeouts.drain_s + 5
        for w in workers:
            try:
                w.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(timeout=5)
            mark_process_dead(w.pid)
        if own_dir:
            shutil.rmtree(mp_dir, ignore_errors=True)
    return rc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("root", help="run the root: trim per model and fan out to leaf / OIP upstreams")
    p.add_argument("--config", help="root YAML config (see configs/root.yaml and docs/root.md)")
    p.add_argument("--host", help="override listen.host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="override listen.port (default 8080)")
    p.add_argument("--workers", type=int, help="worker processes sharing the port (SO_REUSEPORT); overrides workers")
    p.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper,
                   help="log level (default: TRIMMER_LOG_LEVEL, else INFO)")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="text (default) or json: one object per line with the request id (env TRIMMER_LOG_FORMAT)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_root_entry)

    d = sub.add_parser(
        "drift", help="allowlist drift report of a running root: inputs its leaves defaulted, features sent but unused")
    d.add_argument("--root", required=True, help="the root's admin base URL: http://127.0.0.1:9901 by default "
                                                 "(admin.host/admin.port), the service URL with admin.on_service_port")
    d.add_argument("--json", action="store_true", help="print the raw JSON report")
    d.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the root (default 15)")
    d.set_defaults(func=_run_drift)


def _fetch_json(url: str, timeout: float) -> dict:
    """GET a root admin URL; any failure is one TrimmerError line (unreachable, non-200, not JSON)."""
    import json
    import urllib.error
    import urllib.request

    from trimmer.errors import TrimmerError

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        hint = " (admin endpoints off, or on admin.port?)" if exc.code == 404 else ""
        raise TrimmerError(f"{url} answered {exc.code}{hint}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrimmerError(f"cannot reach the root at {url}: {reason}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise TrimmerError(f"{url} did not answer JSON") from None
    if not isinstance(doc, dict):
        raise TrimmerError(f"{url} did not answer a JSON object")
    return doc


def _top(counts: dict, n: int = 5) -> str:
    items = [f"{k} ({v:,})" for k, v in list(counts.items())[:n]]
    more = len(counts) - n
    return ", ".join(items) + (f", +{more} more" if more > 0 else "") if items else "-"


def _run_drift(args: argparse.Namespace) -> int:
    """`trimmer drift --root URL`: the root's allowlist drift report (GET /admin/drift) as a table or JSON."""
    import json

    from trimmer.errors import TrimmerError

    base = args.root.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise TrimmerError(f"--root: expected a URL like http://127.0.0.1:8080, got {args.root!r}")
    doc = _fetch_json(base + "/admin/drift", args.timeout)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the base install (no [loadtest] extra): the same report as JSON
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0

    console = Console()
    t = Table(title=f"allowlist drift at {base} (counts since each leaf started)", title_justify="left")
    for c in ("model", "version", "mode", "requests", "needed, not received (defaulted)", "trimmed by root",
              "sent but unused", "unused features"):
        t.add_column(c, justify="right" if c in ("requests", "sent but unused") else "left", overflow="fold")
    for model, versions in sorted((doc.get("models") or {}).items()):
        for version, v in sorted(versions.items()):
            t.add_row(model, version, str(v.get("mode")), f"{v.get('requests', 0):,}",
                      _top(v.get("needed_but_defaulted") or {}),
                      ", ".join(v.get("defaulted_not_in_allowlist") or []) or "-",
                      f"{v.get('sent_but_unused_count', 0):,}", _top(v.get("sent_but_unused") or {}))
    console.print(t)
    for r in doc.get("replicas") or []:
        if not r.get("ok"):
            console.print(f"[red]replica {r.get('replica')} (partition {r.get('partition')}) did not answer: "
                          f"{r.get('error')}[/red]")
    for name, why in (doc.get("skipped_partitions") or {}).items():
        console.print(f"partition {name} skipped: {why}")
    console.print(f"{doc.get('replicas_ok', 0)} replica(s) answered, {doc.get('replicas_failed', 0)} failed")
    return 0


def _root_entry(args: argparse.Namespace) -> int:
    if not args.config:
        raise ConfigError("--config is required (e.g. --config configs/root.yaml)")
    return _run_root(args)


__all__ = ["register"]
