"""`trimmer leaf` (serve), `trimmer leaf build-demo`, `trimmer leaf bench`. torch is imported lazily."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from trimmer.errors import ConfigError


def _config(args: argparse.Namespace):
    from .config import Batching, load_config

    cfg = load_config(args.config)
    kw = {}
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


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _bench(args: argparse.Namespace) -> int:
    if args.what == "diversify":
        if args.k < 1 or args.requests < 1 or args.repeats < 1 or args.bench_threads < 1 or args.gamma < 0:
            raise ConfigError("--k, --requests, --repeats and --threads must be at least 1 and --gamma non-negative")
        if min(args.sizes) < args.k:
            raise ConfigError(f"--sizes must each be at least --k ({args.k})")
        from .bench_diversify import run_diversify_bench

        return run_diversify_bench(args)
    if args.what == "compile":
        from .bench_compile import run_compile_bench

        return run_compile_bench(args)
    from .bench import run_bench

    return run_bench(args)


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
    p.add_argument("--compile", action="store_true", help="torch.compile every model before it is marked ready (eager if that fails)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.set_defaults(func=_serve)
    lsub = p.add_subparsers(dest="leaf_command", metavar="ACTION")
    b = lsub.add_parser("build-demo", help="write the demo repository (retrieval + ranker, .pt and .pt2)")
    b.add_argument("--out", required=True, help="repository directory to write")
    b.add_argument("--items", type=int, default=100_000, help="retrieval catalogue size (default 100000)")
    b.set_defaults(func=_build_demo)
    bb = lsub.add_parser("bench", help="batching (default): throughput with vs without batching, conversion share (real leaf "
                         "processes); diversify: SSD vs DPP; compile: torch.compile vs eager")
    bb.add_argument("what", nargs="?", choices=("batching", "diversify", "compile"), default="batching",
                    help="which benchmark (default batching)")
    bb.add_argument("--repo", dest="bench_repo", help="demo repository (default: build one in a temp dir)")
    bb.add_argument("--model", default="ranker", help="model to drive (default ranker)")
    bb.add_argument("--version", default="1", help="model version (demo: 1 = TorchScript .pt, 2 = torch.export .pt2)")
    bb.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    bb.add_argument("--seconds", type=float, default=8.0, help="measured seconds per configuration (default 8)")
    bb.add_argument("--candidates", type=int, default=256, help="candidates per ranker request (default 256)")
    bb.add_argument("--max-batch-size", dest="bench_batch", type=int, default=32, help="batched configuration (default 32)")
    bb.add_argument("--mode", choices=("batching", "oip"), default="batching",
                    help="batching (default): batched vs batch size 1, native msgpack; oip: native msgpack vs OIP JSON vs "
                         "OIP binary on one leaf, req/s and ratio to native")
    bb.add_argument("--oip-batches", type=lambda v: [int(x) for x in v.split(",")], default=[32, 1],
                    help="--mode oip: comma-separated max_batch_size values, one leaf each (default 32,1)")
    bb.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    d = bb.add_argument_group("diversify and compile")
    d.add_argument("--sizes", type=_ints, default=[256, 1000], help="candidate counts C (default 256,1000)")
    d.add_argument("--windows", type=_ints, default=[5, 10], help="SSD windows w (default 5,10)")
    d.add_argument("--k", type=int, default=50, help="slate size (default 50)")
    d.add_argument("--gamma", type=float, default=0.5, help="SSD diversity weight (default 0.5)")
    d.add_argument("--alpha", type=float, default=3.0, help="DPP relevance weight, q = exp(alpha * relevance) (default 3)")
    d.add_argument("--requests", type=int, default=4, help="seeded catalogues per cell (default 4)")
    d.add_argument("--repeats", type=int, default=3, help="timed runs per catalogue (default 3)")
    d.add_argument("--threads", dest="bench_threads", type=int, default=1, help="diversify/compile: torch threads (default 1)")
    d.add_argument("--models", dest="bench_models", default="ranker,retrieval,diversifier",
                   help="compile: demo models to compare (default ranker,retrieval,diversifier; the diversifier compiles for minutes on 2 cores)")
    d.add_argument("--compile", dest="bench_compile", action="store_true",
                   help="diversify: also time SSD under torch.compile (compiling the unrolled k-step loop takes minutes on CPU)")
    bb.set_defaults(func=_bench)
