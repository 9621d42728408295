"""`trimmer leaf bench diversify`: SSD against a DPP baseline, side by side, on a seeded clustered catalogue.

Why in-process and not through a leaf: the question is the algorithm's cost and quality per slate, not
the serving path (the leaf's own bench measures that); both methods get the same inputs in one process.

Per candidate count C (default 256 and 1000), k = 50, windows w (default 5 and 10):
  latency per slate (median over the requests, after warm-up): SSD eager, TorchScript, torch.export, and
  torch.compile (`--compile`); DPP fast greedy MAP (Chen et al. 2018) without and with diagonal jitter;
  quality: intra-list distance (mean pairwise cosine distance), category coverage (distinct categories
  in the slate), relevance kept (slate relevance / relevance-only top-k's), slate length;
  robustness: the same on a catalogue made of near-duplicate groups (each item repeated with 1e-6
  noise): slates shorter than k (DPP stops when its Cholesky pivot vanishes) and slates with NaN.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from leaf.diversify import SSD, dpp_greedy

D = 64
N_CATEGORIES = 20
DUPLICATES = 25  # near-duplicate catalogue: groups of 25 copies, so C=1000 holds only 40 distinct items (< k)


def clustered_catalogue(n: int, seed: int, d: int = D, n_categories: int = N_CATEGORIES, spread: float = 0.1,
                        duplicates: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeddings [n, d], relevance [n], category [n]): items around per-category centres; relevance falls
    with the category's rank, so a relevance-only top-k crowds into the first few categories. duplicates > 1:
    n // duplicates distinct items, each repeated with 1e-6 noise (near-duplicate candidates)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_categories, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    m = -(-n // duplicates)
    cat = rng.integers(0, n_categories, m)
    emb = centres[cat] + spread * rng.standard_normal((m, d))
    rel = np.linspace(1.0, 0.5, n_categories)[cat] + 0.1 * rng.random(m)
    if duplicates > 1:
        emb = np.repeat(emb, duplicates, axis=0)[:n] + 1e-6 * rng.standard_normal((n, d))
        rel, cat = np.repeat(rel, duplicates)[:n], np.repeat(cat, duplicates)[:n]
    return (torch.from_numpy(emb.astype(np.float32)), torch.from_numpy(rel.astype(np.float32)),
            torch.from_numpy(cat.astype(np.int64)))


def intra_list_distance(emb: torch.Tensor, slate: torch.Tensor) -> float:
    if len(slate) < 2:
        return 0.0
    x = torch.nn.functional.normalize(emb[slate].double(), dim=1)
    sim = x @ x.T
    n = len(slate)
    return float((n * n - sim.sum()) / (n * (n - 1)))  # mean of 1 - cos over ordered pairs i != j


@dataclass
class Method:
    name: str
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, bool]]  # -> (slate, had_nan)


def _ssd_method(name: str, fn: Callable[..., Any]) -> Method:
    def run(emb: torch.Tensor, rel: torch.Tensor, cat: torch.Tensor) -> tuple[torch.Tensor, bool]:
        slate, scores = fn(emb, rel, cat)
        keep = slate >= 0
        return slate[keep], bool(torch.isnan(scores).any())

    return Method(name, run)


def ssd_methods(k: int, w: int, gamma: float, compile_too: bool, d: int = D,
                log: Callable[[str], None] = print) -> list[Method]:
    model = SSD(k=k, window=w, gamma=gamma).eval()
    out = [_ssd_method(f"SSD eager w={w}", model), _ssd_method(f"SSD TorchScript w={w}", torch.jit.script(model))]
    ex = clustered_catalogue(97, seed=0, d=d)
    dim = torch.export.Dim("c", min=1, max=1 << 16)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, ex, dynamic_shapes=tuple({0: dim} for _ in ex)).module()
    log(f"  exported SSD w={w} in {time.perf_counter() - t0:.1f} s")
    out.append(_ssd_method(f"SSD torch.export w={w}", exported))
    if compile_too:
        from leaf.compile import compile_module

        compiled, info = compile_module(model, [ex, clustered_catalogue(211, seed=1, d=d)], name=f"ssd-w{w}")
        log(f"  torch.compile SSD w={w}: {info}")
        if info.get("compiled"):
            out.append(_ssd_method(f"SSD compiled w={w}", compiled))
    return out


def dpp_methods(k: int, alpha: float) -> list[Method]:
    return [Method("DPP", lambda e, r, c: dpp_greedy(e, r, k, alpha=alpha)),
            Method("DPP jitter 1e-3", lambda e, r, c: dpp_greedy(e, r, k, alpha=alpha, jitter=1e-3))]


def _measure(method: Method,
             cases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int, repeats: int) -> dict[str, Any]:
    times: list[float] = []
    ild, cover, kept, length, short, nans, errors = [], [], [], [], 0, 0, 0
    with torch.inference_mode():
        for emb, rel, cat in cases:
            method.run(emb, rel, cat)  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                try:
                    slate, had_nan = method.run(emb, rel, cat)
                except Exception:  # noqa: BLE001 - a failing method is counted, not fatal
                    errors += 1
                    slate, had_nan = torch.empty(0, dtype=torch.long), False
                times.append(time.perf_counter() - t0)
            top = torch.topk(rel, k).indices
            ild.append(intra_list_distance(emb, slate))
            cover.append(len(set(cat[slate].tolist())))
            kept.append(float(rel[slate].sum() / rel[top].sum()))
            length.append(len(slate))
            short += len(slate) < k
            nans += had_nan
    return {"method": method.name, "ms_per_slate": round(1000 * statistics.median(times), 2),
            "ild": round(statistics.mean(ild), 3), "categories": round(statistics.mean(cover), 1),
            "relevance_kept": round(statistics.mean(kept), 3), "slate_len": round(statistics.mean(length), 1),
            "short_slates": short, "nan_slates": nans, "errors": errors, "slates": len(cases)}


def run_diversify_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=max(150, Console(stderr=True).width))
    torch.set_num_threads(args.bench_threads)  # one thread by default: steadier figures on a shared machine
    log = lambda msg: console.print(msg)  # noqa: E731
    k = args.k
    rows: list[dict[str, Any]] = []
    relevance_only = Method("relevance top-k", lambda e, r, c: (torch.topk(r, k).indices, False))
    for c in args.sizes:
        clean = [clustered_catalogue(c, seed=100 + i) for i in range(args.requests)]
        dups = [clustered_catalogue(c, seed=200 + i, duplicates=DUPLICATES) for i in range(args.requests)]
        for catalogue, cases in (("clustered", clean), ("near-dup", dups)):
            rows.append({"C": c, "catalogue": catalogue, "w": "-", **_measure(relevance_only, cases, k, 1)})
            for m in dpp_methods(k, args.alpha):
                rows.append({"C": c, "catalogue": catalogue, "w": "-", **_measure(m, cases, k, args.repeats)})
    for w in args.windows:
        methods = ssd_methods(k, w, args.gamma, args.bench_compile, log=log)
        for c in args.sizes:
            clean = [clustered_catalogue(c, seed=100 + i) for i in range(args.requests)]
            dups = [clustered_catalogue(c, seed=200 + i, duplicates=DUPLICATES) for i in range(args.requests)]
            for catalogue, cases in (("clustered", clean), ("near-dup", dups)):
                for m in methods:
                    rows.append({"C": c, "catalogue": catalogue, "w": w, **_measure(m, cases, k, args.repeats)})
    rows.sort(key=lambda r: (r["catalogue"] != "clustered", r["C"], str(r["w"]), r["method"]))
    cols = ("catalogue", "C", "w", "method", "ms_per_slate", "ild", "categories", "relevance_kept", "slate_len",
            "short_slates", "nan_slates", "errors")
    heads = ("catalogue", "C", "w", "method", "ms/slate", "ILD", "categories", "rel. kept", "len",
             "short", "NaN", "errors")
    table = Table(title=f"SSD vs DPP: k={k}, gamma={args.gamma}, DPP alpha={args.alpha}, d={D}, {N_CATEGORIES} "
                        f"categories, {args.requests} requests x {args.repeats} runs per cell, CPU, torch threads "
                        f"{torch.get_num_threads()}")
    for col in heads:
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols))
    console.print(table)
    result = {"k": k, "gamma": args.gamma, "alpha": args.alpha, "d": D, "rows": rows}
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0
