"""`trimmer leaf` (serve), `trimmer leaf build-demo`. torch is imported lazily; `trimmer leaf bench` comes from
loadtest."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from trimmer.errors import ConfigError

ORDER = 10  # place among the `trimmer` commands (trimmer/cli.py)


def _config(args: argparse.Namespace):
    from .config import Batching, load_config

    cfg = load_config(args.config)
    kw: dict[str, Any] = {}
    if args.repo is not None:
        kw["repo"] = Path(args.repo).resolve()
    for key in ("host", "port", "device", "torch_threads", "log_level"):
        value = getattr(args, key)
        if value is not None:
            kw[key] = value
    b = cfg.batching
    if args.max_batch_size is not None or args.max_queue_delay_ms is not None:
        b = Batching(args.max_batch_size if args.max_batch_size is not None else b.max_batch_size,
                     args.max_queue_delay_ms if args.max_queue_delay_ms is not None else b.max_queue_delay_ms,
                     b.max_batch_rows)
        kw["batching"] = b
        kw["models"] = {}  # command-line batching applies to every model
    if args.compile:
        kw["compile"], kw["compile_models"] = True, {}  # the flag compiles every model
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise ConfigError("--max-batch-size must be at least 1")
    return replace(cfg, **kw)


def _serve(args: argparse.Namespace) -> int:
    from trimmer.settings import settings

    settings()  # every TRIMMER_* variable parsed once: a bad value is a one-line error before torch is imported
    from .app import main

    return main(_config(args))


def _build_demo(args: argparse.Namespace) -> int:
    if args.items < 1000:
        raise ConfigError("--items must be at least 1000")
    from .demo_cache import build_cached
    from .demo_models import build_demo

    build_cached(args.out, lambda out: build_demo(out, n_items=args.items), items=args.items)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaf", help="run the leaf worker (models from a repository); see docs/leaf.md",
                       description="Serve every model version in a repository over HTTP (native score + OIP v2).")
    p.add_argument("--config", help="YAML config (configs/leaf.yaml); flags override it")
    p.add_argument("--repo", help="model repository <repo>/<model>/<version>/model.pt|model.pt2")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8001)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--max-batch-size", type=int, help="requests per batch, every model (1 disables batching)")
    p.add_argument("--max-queue-delay-ms", type=float, help="longest wait to fill a batch")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model before it is marked ready (eager if that fails)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.set_defaults(func=_serve)
    lsub = p.add_subparsers(dest="leaf_command", metavar="ACTION")
    b = lsub.add_parser("build-demo", help="write the demo repository (retrieval + ranker, .pt and .pt2)")
    b.add_argument("--out", required=True, help="repository directory to write")
    b.add_argument("--items", type=int, default=100_000, help="retrieval catalogue size (default 100000)")
    b.set_defaults(func=_build_demo)
