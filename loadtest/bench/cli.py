"""The benchmark commands: `trimmer bench trim`, `trimmer root bench`, `trimmer leaf bench`.

The benchmarks drive real root and leaf processes with the load test's reference payload, so they live
with the load test, above the services; the command names stay where users look for them (under `root`
and `leaf`). Registered after root.cli and leaf.cli (loadtest.cli's ORDER), onto their parsers. Imports stay
light: each benchmark module is imported only when its command runs.
"""

from __future__ import annotations

import argparse

from trimmer.cli import actions
from trimmer.errors import ConfigError


def _bench_trim(args: argparse.Namespace) -> int:
    from .trim import run_trim_bench

    run_trim_bench(iterations=args.iterations, seed=args.seed)
    return 0


def _root_bench(args: argparse.Namespace) -> int:
    if args.proxies:
        from .proxies import run_proxy_bench

        return run_proxy_bench(seconds=args.seconds, connections=args.concurrency, out=args.out,
                               baseline_python=args.baseline_python)
    from .root import run_bench

    return run_bench(requests=args.requests, concurrency=args.concurrency, warmup=args.warmup, out=args.out)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _leaf_bench(args: argparse.Namespace) -> int:
    if args.what == "diversify":
        if args.k < 1 or args.requests < 1 or args.repeats < 1 or args.bench_threads < 1 or args.gamma < 0:
            raise ConfigError("--k, --requests, --repeats and --threads must be at least 1 and --gamma non-negative")
        if min(args.sizes) < args.k:
            raise ConfigError(f"--sizes must each be at least --k ({args.k})")
        from .leaf_diversify import run_diversify_bench

        return run_diversify_bench(args)
    if args.what == "compile":
        from .leaf_compile import run_compile_bench

        return run_compile_bench(args)
    from .leaf import run_bench

    return run_bench(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="micro-benchmarks, figures printed side by side")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    b = bsub.add_parser("trim", help="trim vs naive unpack/filter/pack vs plain copy on the reference payload")
    b.add_argument("--iterations", type=int, default=200)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_bench_trim)

    if "root" in sub.choices:
        rsub = actions(sub.choices["root"], "root_command")
        b = rsub.add_parser("bench", help="root CPU per 1,000 requests trim vs passthrough, and added p50 latency, on "
                                          "the reference payload")
        b.add_argument("--requests", type=int, default=2000, help="requests per measured phase")
        b.add_argument("--concurrency", type=int, default=8)
        b.add_argument("--warmup", type=int, default=200)
        b.add_argument("--out", help="also write the figures as JSON here")
        b.add_argument("--proxies", action="store_true",
                       help="side by side with nginx and HAProxy passthrough, load from wrk (needs wrk and nginx; "
                            "haproxy optional)")
        b.add_argument("--seconds", type=float, default=5.0, help="--proxies: seconds per measured phase (3 rounds)")
        b.add_argument("--baseline-python",
                       help="--proxies: also run a root from another build, started by this interpreter")
        b.set_defaults(func=_root_bench)

    if "leaf" not in sub.choices:
        return
    lsub = actions(sub.choices["leaf"], "leaf_command")
    bb = lsub.add_parser("bench",
                         help="batching (default): throughput with vs without batching, conversion share (real leaf "
                         "processes); diversify: SSD vs DPP; compile: torch.compile vs eager")
    bb.add_argument("what", nargs="?", choices=("batching", "diversify", "compile"), default="batching",
                    help="which benchmark (default batching)")
    bb.add_argument("--repo", dest="bench_repo", help="demo repository (default: build one in a temp dir)")
    bb.add_argument("--model", default="ranker", help="model to drive (default ranker)")
    bb.add_argument("--version", default="1", help="model version (demo: 1 = TorchScript .pt, 2 = torch.export .pt2)")
    bb.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    bb.add_argument("--seconds", type=float, default=8.0, help="measured seconds per configuration (default 8)")
    bb.add_argument("--candidates", type=int, default=256, help="candidates per ranker request (default 256)")
    bb.add_argument("--max-batch-size", dest="bench_batch", type=int, default=32,
                    help="batched configuration (default 32)")
    bb.add_argument("--mode", choices=("batching", "oip"), default="batching",
                    help="batching (default): batched vs batch size 1, native msgpack; oip: native msgpack vs OIP JSON "
                         "vs OIP binary on one leaf, req/s and ratio to native")
    bb.add_argument("--oip-batches", type=lambda v: [int(x) for x in v.split(",")], default=[32, 1],
                    help="--mode oip: comma-separated max_batch_size values, one leaf each (default 32,1)")
    bb.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    d = bb.add_argument_group("diversify and compile")
    d.add_argument("--sizes", type=_ints, default=[256, 1000], help="candidate counts C (default 256,1000)")
    d.add_argument("--windows", type=_ints, default=[5, 10], help="SSD windows w (default 5,10)")
    d.add_argument("--k", type=int, default=50, help="slate size (default 50)")
    d.add_argument("--gamma", type=float, default=0.5, help="SSD diversity weight (default 0.5)")
    d.add_argument("--alpha", type=float, default=3.0,
                   help="DPP relevance weight, q = exp(alpha * relevance) (default 3)")
    d.add_argument("--requests", type=int, default=4, help="seeded catalogues per cell (default 4)")
    d.add_argument("--repeats", type=int, default=3, help="timed runs per catalogue (default 3)")
    d.add_argument("--threads", dest="bench_threads", type=int, default=1,
                   help="diversify/compile: torch threads (default 1)")
    d.add_argument("--models", dest="bench_models", default="ranker,retrieval,diversifier",
                   help="compile: demo models to compare (default ranker,retrieval,diversifier; the diversifier "
                        "compiles for minutes on 2 cores)")
    d.add_argument("--compile", dest="bench_compile", action="store_true",
                   help="diversify: also time SSD under torch.compile (compiling the unrolled k-step loop takes "
                        "minutes on CPU)")
    bb.set_defaults(func=_leaf_bench)
