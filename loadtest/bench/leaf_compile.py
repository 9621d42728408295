"""`trimmer leaf bench compile`: torch.compile against eager for the demo ranker, retrieval and diversifier.

In-process, on the torch.export (.pt2, version 2) modules the leaf would serve, compiled exactly as the
leaf does it (leaf/compile.py: dynamic shapes, warm-up, agreement check). Per model: compile + warm-up
seconds, median forward latency eager and compiled on one realistic call (ranker: one request of
`--candidates` rows; retrieval: a batch of 8 queries; diversifier: one request of `--candidates`
candidates), and the largest output difference on those inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from trimmer.errors import ConfigError
from trimmer.repository import archive_path
from trimmer.signature import read_signature

from leaf.compile import compile_module, warmup_inputs
from leaf.convert import Converter

MODELS = ("ranker", "retrieval", "diversifier")


def _inputs(converter: Converter, rows: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for plan in converter.plans:
        assert plan.spec.shape is not None and plan.torch_dtype is not None  # the demo models are typed
        shape = [rows if d == -1 else d for d in plan.spec.shape]
        if converter.batchable and plan.cand_axis is None:
            shape = [rows] + shape
        if plan.torch_dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(plan.torch_dtype))
        else:
            out.append(torch.randint(0, 8, shape, generator=g).to(plan.torch_dtype))
    return out


def _time(fn: Any, args: list[torch.Tensor], repeats: int) -> float:
    with torch.inference_mode():
        fn(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _max_diff(a: Any, b: Any) -> float:
    a = list(a) if isinstance(a, (tuple, list)) else [a]
    b = list(b) if isinstance(b, (tuple, list)) else [b]
    worst = 0.0
    for x, y in zip(a, b):
        if x.is_floating_point():
            worst = max(worst, float((x.double() - y.double()).abs().max()))
        else:
            worst = max(worst, float((x != y).sum()))  # integer outputs: count of differing values
    return worst


def compare_model(path: Path, rows: int, repeats: int) -> dict[str, Any]:
    sig = read_signature(path)
    converter = Converter(sig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.export.load(str(path)).module()
    compiled, info = compile_module(module, warmup_inputs(converter, torch.device("cpu")), path.parent.parent.name)
    args = _inputs(converter, rows, seed=1)
    with torch.inference_mode():
        diff = _max_diff(compiled(*args), module(*args))
    eager_s = _time(module, args, repeats)
    compiled_s = _time(compiled, args, repeats) if info["compiled"] else float("nan")
    return {"model": path.parent.parent.name, "rows": rows, "compiled": info["compiled"],
            "reason": info.get("reason", ""), "compile_s": info.get("seconds"), "eager_ms": round(1000 * eager_s, 3),
            "compiled_ms": round(1000 * compiled_s, 3) if info["compiled"] else None,
            "speedup": round(eager_s / compiled_s, 2) if info["compiled"] else None, "max_abs_diff": diff}


def run_compile_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    wanted = [m.strip() for m in args.bench_models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown or not wanted:
        raise ConfigError(
            f"--models: unknown demo model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    console = Console(stderr=True, width=max(150, Console(stderr=True).width))
    torch.set_num_threads(args.bench_threads)
    rows_for = {"ranker": args.candidates, "retrieval": 8, "diversifier": args.candidates}
    results = []
    with tempfile.TemporaryDirectory(prefix="leaf-bench-compile-") as tmp:
        repo = Path(args.bench_repo) if args.bench_repo else Path(tmp) / "repo"
        if not args.bench_repo:
            from leaf.demo_models import build_demo

            build_demo(repo, n_items=20_000, log=lambda msg: console.print(msg))
        for model in wanted:
            path = archive_path(repo / model / "2")
            if path is None or path.suffix != ".pt2":
                console.print(f"{model}: no .pt2 at {repo / model / '2'}; skipped")
                continue
            r = compare_model(path, rows_for[model], args.repeats * 10)
            console.print(f"  {model}: {r}")
            results.append(r)
    table = Table(title=f"torch.compile (inductor, dynamic shapes) vs eager, torch.export modules, CPU, torch threads "
                        f"{torch.get_num_threads()}, median of {args.repeats * 10} calls")
    cols = ("model", "rows", "compile_s", "eager_ms", "compiled_ms", "speedup", "max_abs_diff", "reason")
    for c in cols:
        table.add_column(c, no_wrap=c != "reason")
    for r in results:
        table.add_row(*(str(r[c]) for c in cols))
    console.print(table)
    print(json.dumps({"runs": results}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"runs": results}, indent=2))
    return 0
