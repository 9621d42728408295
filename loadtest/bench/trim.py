"""`trimmer bench trim`: the trim against a naive unpack/filter/pack and a plain copy, side by side.

Target: trim <= 2x the plain copy of the whole payload (naive is about 15x).
Figures are ratios measured in one run on one machine, never test assertions.
"""

from __future__ import annotations

import time
from typing import Callable

import msgpack
from rich.console import Console
from rich.table import Table

from trimmer import trim as trim_mod
from trimmer.codec import decode_msgpack

from loadtest.payload import reference_payload

CHUNK = 256_000  # what aiohttp's parser hands the root per read


def _naive(body: bytes, allow: frozenset[str]) -> bytes:
    """What a root without this library does: decode everything, filter, encode again."""
    obj = msgpack.unpackb(body, raw=False)
    obj["features"] = {k: v for k, v in obj["features"].items() if k in allow}
    return msgpack.packb(obj, use_bin_type=True)


def _time(fn: Callable[[], object], iterations: int, rounds: int = 7) -> float:
    """Best-of-rounds mean seconds per call: the least disturbed estimate on a shared machine."""
    per_round = max(1, iterations // rounds)
    fn()
    best = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            fn()
        best.append((time.perf_counter() - start) / per_round)
    return min(best)


def run_trim_bench(iterations: int = 200, seed: int = 0, console: Console | None = None) -> dict[str, float]:
    console = console or Console()
    body, allow = reference_payload(seed=seed)
    trimmed = trim_mod.trim_msgpack(body, allow)
    expected = decode_msgpack(trimmed.body)["features"].keys()
    if set(expected) != set(allow) & set(decode_msgpack(body)["features"]):
        raise RuntimeError("trim produced the wrong feature set")  # guard: never report figures for a wrong trim
    chunks = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]
    candidates: dict[str, Callable[[], object]] = {
        "copy (whole payload)": lambda: memoryview(body).tobytes(),
        "trim": lambda: trim_mod.trim_msgpack(body, allow),
        "trim, fed in 256 KiB chunks (as the root receives it)": lambda: trim_mod.trim_msgpack_chunks(chunks, allow),
        "trim (pure-Python msgspec fallback)": lambda: trim_mod.trim_msgpack_py(body, allow),
        "naive unpack->filter->pack": lambda: _naive(body, allow),
    }
    times = {name: _time(fn, iterations if "naive" not in name else max(20, iterations // 5)) for name,
             fn in candidates.items()}
    copy = times["copy (whole payload)"]
    table = Table(title=f"trim bench: reference payload {len(body) / 1e6:.2f} MB in -> {len(trimmed.body) / 1e6:.2f} "
                        f"MB out, {trimmed.features_in} features, {trimmed.features_kept} kept"
                        + ("" if trim_mod.ACCELERATED else " [C accelerator NOT built]"))
    table.add_column("operation")
    table.add_column("time per payload", justify="right")
    table.add_column("x copy", justify="right")
    for name, t in times.items():
        table.add_row(name, f"{t * 1e6:,.0f} µs", f"{t / copy:.2f}")
    console.print(table)
    console.print(f"target: trim <= 2.00x copy -> {'met' if times['trim'] <= 2 * copy else 'NOT met'} "
                  f"({times['trim'] / copy:.2f}x); naive = {times['naive unpack->filter->pack'] / copy:.1f}x")
    return {**times, "bytes_in": len(body), "bytes_out": len(trimmed.body)}
