"""`trimmer loadtest`, `trimmer demo` and the benchmarks (bench/cli.py). Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from .bench import cli as bench_cli

ORDER = 30  # after root.cli and leaf.cli (trimmer/cli.py): the benchmarks add `root bench` and `leaf bench` to them


def _loadtest(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from trimmer.errors import ConfigError

    if args.target is not None:
        if args.config is not None:
            raise ConfigError(
                "--target and --config are exclusive: --target loads a running root, --config runs the mode matrix")
        from .field import run_target

        return run_target(args)
    if args.config is None:
        raise ConfigError(
            "--config (the mode matrix, e.g. configs/loadtest.yaml) or --target URL (a running root) is required")

    from .config import load_loadtest_config, parse_rate
    from .scenarios import SCENARIOS

    cfg = load_loadtest_config(args.config)
    load = cfg.load
    if args.duration is not None:
        if args.duration <= 0:
            raise ConfigError("--duration must be > 0")
        load = replace(load, duration_s=args.duration)
    if args.rate is not None:
        if args.rate <= 0:
            raise ConfigError("--rate must be > 0")
        load = replace(load, rate=args.rate, mode="open")
    if args.count is not None:
        if args.count < 1:
            raise ConfigError("--count must be >= 1")
        load = replace(load, count=args.count)
    scenarios = cfg.scenarios
    if args.scenarios:
        scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
        bad = [s for s in scenarios if s not in SCENARIOS]
        if bad or not scenarios:
            raise ConfigError(
                f"--scenarios: unknown scenario {', '.join(bad) or '(none)'}; known: {', '.join(SCENARIOS)}")
    repo = cfg.repo
    if args.repo is not None:
        repo = Path(args.repo).absolute()
        if not repo.is_dir():
            raise ConfigError(f"--repo: {args.repo}: no such directory")
    link_rates = tuple(args.link_rate) if args.link_rate else cfg.link_rates
    for r in link_rates:
        parse_rate(r, "--link-rate")
    out = Path(args.out).absolute() if args.out else cfg.out
    cfg = replace(cfg, load=load, scenarios=scenarios, repo=repo, out=out)
    from .session import run_and_report

    return run_and_report(cfg, out, link_rates, plots=not args.no_plots)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out).absolute() if args.out else None, duration_s=args.duration)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loadtest", help="bytes, latency, throughput and root CPU by mode (passthrough, lz4, zstd, "
                                        "trim, trim+lz4, shadow)")
    p.add_argument("--config", help="load test YAML for the mode matrix (see configs/loadtest.yaml, docs/loadtest.md)")
    p.add_argument("--out", help="report directory (default: the config's `out`)")
    p.add_argument("--repo", help="model repository (default: the config's `repo`, or build the demo repository)")
    p.add_argument("--scenarios", help="comma-separated subset of the matrix, e.g. passthrough,trim")
    p.add_argument("--duration", type=float, help="measured seconds per scenario (overrides load.duration_s)")
    p.add_argument("--rate", type=float,
                   help="open-loop requests per second (overrides load.rate, sets load.mode open)")
    p.add_argument("--count", type=int, help="measured requests per scenario (overrides load.count)")
    p.add_argument("--link-rate", action="append", metavar="RATE",
                   help="also run with the leaf behind a veth shaped to RATE (e.g. 1gbit; repeatable; needs root, "
                        "skipped otherwise)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    f = p.add_argument_group("field mode (--target): load a running root or leaf; starts no processes")
    f.add_argument("--target", help="base URL of a running root (or leaf), e.g. http://127.0.0.1:8080")
    f.add_argument("--models", help="models to load, name[:version], comma-separated; >1 uses the fan-out /v1/score")
    f.add_argument("--replay",
                   help="replay a capture file written by the root's `capture:` (docs/loadtest.md) instead of --models")
    f.add_argument("--profile", default="realistic", help="feature values: realistic (default) or random")
    f.add_argument("--usage-ratio", type=float, default=0.2,
                   help="features the models read / features sent (default 0.2)")
    f.add_argument("--candidates", type=int, default=256, help="candidates per request (default 256)")
    f.add_argument("--distinct", type=int, default=8, help="distinct pre-encoded requests, cycled (default 8)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--concurrency", type=int, help="closed loop with this many workers (instead of --rate)")
    f.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds, sent but not measured (default 2)")
    f.add_argument("--timeout", type=float, default=10.0, help="per-request timeout seconds (default 10)")
    f.add_argument("--json", help="also write the result as JSON here")
    p.set_defaults(func=_loadtest)

    p = sub.add_parser("demo", help="build demo models, start leaf and root, run a short matrix, print the table")
    p.add_argument("--out", help="directory for the models, logs and report (default: a new temp directory)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per scenario (default 5)")
    p.set_defaults(func=_demo)

    bench_cli.register(sub)
