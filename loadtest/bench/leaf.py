"""`trimmer leaf bench`: dynamic batching vs batch size 1, and the share of leaf time spent converting;
`trimmer leaf bench --mode oip`: the same request as native msgpack, OIP JSON and OIP binary (tritonclient's
default encoding), side by side against one leaf process, as req/s, leaf CPU per request and ratios to native.

Both configurations run as real leaf processes, one after the other in one run, driven by the same
64-client closed loop with the same payload; figures are ratios measured side by side, not absolute
targets. Conversion = decode + features-to-tensors (per request) + batch concatenation/split; its share is
given against the leaf's busy time (convert + assemble + compute + encode) and against the leaf
process's CPU time over the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from loadtest.payload import make_request, universe_for_models
from loadtest.procs import free_port, start
from trimmer.codec import encode_msgpack
from trimmer.errors import ConfigError
from trimmer.repository import archive_path
from trimmer.signature import read_signature

SUMS = ("convert", "assemble", "compute", "encode", "queue", "request")


def _scrape(url: str, model: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    pat = re.compile(r'^trimmer_leaf_(\w+?)_(sum|count)\{[^}]*model="' + re.escape(model) + r'"[^}]*\} (\S+)$')
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            key = f"{m.group(1)}_{m.group(2)}"
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


class _Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection replaying a prebuilt request in a closed loop. Deliberately lean
    (no HTTP library): the load generator shares the machine's cores with the leaf and must not be the
    bottleneck that hides the difference between the two leaf configurations."""

    def __init__(self, request: bytes, stop_at: float, done: asyncio.Future, counts: list[int]) -> None:
        self.request, self.stop_at, self.done, self.counts = request, stop_at, done, counts
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(self.buf[:head_end]).lower()
            i = head.find(b"\r\ncontent-length:")  # not inference-header-content-length
            length = int(head[i + 17:].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(self.buf) < head_end + 4 + length:
                return
            self.counts[0 if head[9:12] == b"200" else 1] += 1
            del self.buf[:head_end + 4 + length]
            if time.perf_counter() >= self.stop_at:
                self.transport.close()  # type: ignore[union-attr]
                return
            self.transport.write(self.request)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _drive(url: str, path: str, body: bytes, clients: int, seconds: float,
                 headers: dict[str, str] | None = None) -> tuple[int, int, float]:
    """`clients` connections, each one request in flight, for `seconds`: (ok, errors, wall seconds)."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {"Content-Type": "application/msgpack"}).items())
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    counts = [0, 0]
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    dones = [loop.create_future() for _ in range(clients)]
    for d in dones:
        await loop.create_connection(functools.partial(_Client, request, stop_at, d, counts), host, int(port))
    await asyncio.wait_for(asyncio.gather(*dones), seconds + 60)
    return counts[0], counts[1], time.perf_counter() - t0


def _run(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


def _measure(repo: Path, model: str, version: str, batch: int, body: bytes, clients: int,
             seconds: float, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    proc = start(f"leaf-bench-b{batch}",
                 ["leaf", "--repo", str(repo), "--port", str(port), "--max-batch-size", str(batch),
                                          "--max-queue-delay-ms", "2", "--torch-threads", "1",
                                          "--log-level", "WARNING"],
                 port, "/v2/health/ready", log_dir, timeout=120)
    try:
        ps = psutil.Process(proc.pid)
        # warm-up is inside _drive; metrics/CPU deltas are taken around the whole drive, so subtract the warm-up by
        # scraping after it: simpler to drive twice (short warm-up drive first).
        _run(_drive(proc.url, f"/v1/models/{model}/versions/{version}/score", body, clients, 1.0))
        before, cpu0 = _scrape(proc.url, model), sum(ps.cpu_times()[:2])
        done, errors, wall = _run(
            _drive(proc.url, f"/v1/models/{model}/versions/{version}/score", body, clients, seconds))
        after, cpu1 = _scrape(proc.url, model), sum(ps.cpu_times()[:2])
    finally:
        proc.stop()
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    busy = sum(d.get(f"{k}_seconds_sum", 0.0) for k in ("convert", "assemble", "compute", "encode"))
    conversion = d.get("convert_seconds_sum", 0.0) + d.get("assemble_seconds_sum", 0.0)
    batches = d.get("batch_size_count", 0.0)
    return {"max_batch_size": batch, "requests": done, "errors": errors, "seconds": round(wall, 2),
            "throughput_rps": round(done / wall, 1),
            "mean_batch": round(d.get("batch_size_sum", 0.0) / batches, 2) if batches else None,
            "mean_latency_ms": round(1000 * d.get("request_seconds_sum",
                                                  0.0) / max(1.0, d.get("request_seconds_count", 0.0)), 2),
            "leaf_cpu_s": round(cpu1 - cpu0, 2),
            "conversion_s": round(conversion, 3), "compute_s": round(d.get("compute_seconds_sum", 0.0), 3),
            "conversion_share_of_busy": round(conversion / busy, 4) if busy else None,
            "conversion_share_of_cpu": round(conversion / (cpu1 - cpu0), 4) if cpu1 > cpu0 else None}


def _signature(repo: Path, model: str) -> Any:
    vdirs = sorted((repo / model).glob("*")) if (repo / model).is_dir() else []
    archives = [p for p in (archive_path(v) for v in vdirs) if p is not None]
    if not archives:
        raise ConfigError(f"{repo}: no versions of model {model!r}")
    return read_signature(archives[-1])


def _repo_and_request(args: argparse.Namespace, tmp: Path, console: Any) -> tuple[Path, dict]:
    """The model repository (--bench-repo, else the demo models built under `tmp`) and one request for the model."""
    repo = Path(args.bench_repo) if args.bench_repo else tmp / "repo"
    if not args.bench_repo:
        from leaf.demo_models import build_demo

        build_demo(repo, log=lambda msg: console.print(msg))
    universe = universe_for_models([_signature(repo, args.model)], usage_ratio=1.0)
    return repo, make_request(universe, candidates=args.candidates, seed=1)


def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "mode", "batching") == "oip":
        return run_oip_bench(args)
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="leaf-bench-") as tmp:
        repo, req = _repo_and_request(args, Path(tmp), console)
        body = encode_msgpack(req)
        rows = [_measure(repo, args.model, args.version, b, body, args.clients, args.seconds, Path(tmp) / "logs")
                for b in (args.bench_batch, 1)]
    batched, single = rows
    speedup = batched["throughput_rps"] / single["throughput_rps"] if single["throughput_rps"] else float("inf")
    table = Table(title=f"leaf bench: {args.model}/{args.version}, {args.clients} clients, {args.candidates} "
                        f"candidates/request, {len(body)} B payload, CPU, torch threads 1")
    for col in ("max_batch_size", "throughput_rps", "mean_batch", "mean_latency_ms", "errors",
                "conversion_share_of_busy", "conversion_share_of_cpu"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c])
                        for c in ("max_batch_size", "throughput_rps", "mean_batch", "mean_latency_ms", "errors",
                                             "conversion_share_of_busy", "conversion_share_of_cpu")))
    console.print(table)
    console.print(f"batching speed-up: {speedup:.2f}x (target >= 3x); conversion share (batched): "
                  f"{batched['conversion_share_of_busy']:.1%} of busy time, {batched['conversion_share_of_cpu']:.1%} "
                  "of leaf CPU (target <= 10%)")
    result = {"model": args.model, "version": args.version, "clients": args.clients, "candidates": args.candidates,
              "payload_bytes": len(body), "speedup": round(speedup, 2), "runs": rows}
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------------- native vs OIP (--mode oip)
OIP_DATATYPES = {"bool": "BOOL", "int8": "INT8", "uint8": "UINT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
                 "float16": "FP16", "float32": "FP32", "float64": "FP64"}


def oip_bodies(features: dict[str, Any], request_id: str) -> tuple[bytes, tuple[bytes, int]]:
    """The same features as an OIP JSON body and as a binary-extension body (header length), the latter as
    tritonclient sends by default: every input binary, every output asked for binary (binary_data_output)."""
    import numpy as np

    from trimmer.tensor import Tensor

    json_inputs, bin_inputs, segments = [], [], []
    for name, value in features.items():
        arr = value.to_numpy() if isinstance(value, Tensor) else np.asarray(
            value, dtype=np.float32 if isinstance(value, float) else None)
        dt = OIP_DATATYPES[arr.dtype.name]
        json_inputs.append({"name": name, "shape": list(arr.shape), "datatype": dt, "data": arr.reshape(-1).tolist()})
        raw = np.ascontiguousarray(arr).tobytes()
        bin_inputs.append(
            {"name": name, "shape": list(arr.shape), "datatype": dt, "parameters": {"binary_data_size": len(raw)}})
        segments.append(raw)
    json_body = json.dumps({"id": request_id, "inputs": json_inputs}).encode()
    header = json.dumps({"id": request_id, "inputs": bin_inputs, "parameters": {"binary_data_output": True}}).encode()
    return json_body, (header + b"".join(segments), len(header))


def _measure_routes(repo: Path, model: str, version: str, batch: int,
                    routes: list[tuple[str, str, bytes, dict[str, str]]],
                    clients: int, seconds: float, log_dir: Path) -> list[dict[str, Any]]:
    """One leaf process; each route driven in turn (1 s warm-up, then `seconds`): req/s and leaf CPU per request."""
    port = free_port()
    proc = start(f"leaf-bench-oip-b{batch}",
                 ["leaf", "--repo", str(repo), "--port", str(port), "--max-batch-size", str(batch),
                                              "--max-queue-delay-ms", "2", "--torch-threads", "1",
                                              "--log-level", "WARNING"],
                 port, "/v2/health/ready", log_dir, timeout=120)
    rows = []
    try:
        ps = psutil.Process(proc.pid)
        for label, path, body, headers in routes:
            _run(_drive(proc.url, path, body, clients, 1.0, headers))
            before, cpu0 = _scrape(proc.url, model), sum(ps.cpu_times()[:2])
            done, errors, wall = _run(_drive(proc.url, path, body, clients, seconds, headers))
            after, cpu1 = _scrape(proc.url, model), sum(ps.cpu_times()[:2])
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            rows.append({"route": label, "max_batch_size": batch, "payload_bytes": len(body), "requests": done,
                         "errors": errors, "throughput_rps": round(done / wall, 1),
                         "leaf_cpu_us_per_request": round(1e6 * (cpu1 - cpu0) / done, 1) if done else None,
                         "convert_us_per_request": round(1e6 * d.get("convert_seconds_sum", 0.0) / done, 1) if done
                         else None,
                         "encode_us_per_request": round(1e6 * d.get("encode_seconds_sum", 0.0) / done, 1) if done
                         else None})
    finally:
        proc.stop()
    return rows


def run_oip_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="leaf-bench-") as tmp:
        repo, req = _repo_and_request(args, Path(tmp), console)
        native = encode_msgpack(req)
        json_body, (bin_body, header_len) = oip_bodies(req["features"], req["request_id"])
        base = f"/models/{args.model}/versions/{args.version}"
        routes = [("native msgpack", f"/v1{base}/score", native, {"Content-Type": "application/msgpack"}),
                  ("OIP JSON", f"/v2{base}/infer", json_body, {"Content-Type": "application/json"}),
                  ("OIP binary", f"/v2{base}/infer", bin_body, {"Content-Type": "application/octet-stream",
                                                                "Inference-Header-Content-Length": str(header_len)})]
        rows = []
        for batch in args.oip_batches:
            rows += _measure_routes(repo, args.model, args.version, batch, routes, args.clients,
                                    args.seconds, Path(tmp) / "logs")
    for r in rows:
        nat = next(x for x in rows if x["max_batch_size"] == r["max_batch_size"] and x["route"] == "native msgpack")
        r["ratio_to_native"] = round(r["throughput_rps"] / nat["throughput_rps"], 3) if nat["throughput_rps"] else None
    cols = ("route", "max_batch_size", "payload_bytes", "throughput_rps", "ratio_to_native", "leaf_cpu_us_per_request",
            "convert_us_per_request", "encode_us_per_request", "errors")
    table = Table(title=f"leaf bench --mode oip: {args.model}/{args.version}, {args.clients} clients, "
                        f"{args.candidates} candidates/request, "
                        "CPU, torch threads 1")
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols))
    console.print(table)
    console.print("target: OIP binary >= 0.7x native msgpack req/s")
    result = {"mode": "oip", "model": args.model, "version": args.version, "clients": args.clients,
              "candidates": args.candidates, "runs": rows}
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0
