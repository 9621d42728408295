"""`trimmer root bench`: what the root costs and saves on the reference payload, measured side by side.

One root process serves two models with the same allowlist (20 % of the
reference payload's 2,000 features): `ref` in enforce mode (trimmed) and
`ref_pass` in off mode (forwarded untrimmed). Upstream is the stand-in sink
(`loadtest.sink --small`: reads the body, answers a tiny fixed reply), so the
figures are the root's own. Reported:

- root CPU seconds per 1,000 requests, trim vs passthrough (target <= 0.8);
- p50 latency added by the root (sequential requests: via root minus direct to
  the sink), trim and passthrough (target <= 1 ms);
- upstream bytes per request.

Phases alternate (pass, trim) over ROUNDS short rounds so drift hits both alike;
the spread of the per-round ratios shows how noisy the machine was.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trimmer.bundle import BUNDLE_FORMAT, BUNDLE_KIND

ROUNDS = 5


def write_root_config(tmp: Path, allow: frozenset[str], partitions: dict[str, dict[str, Any]], models: dict[str, str],
                      **settings: Any) -> Path:
    """The reference root for the benchmarks: every model with `allow` as its version 1's inputs, `ref_pass` in
    mode off (the others enforce), each routed to its partition with version 1 as default; `settings` on top."""
    bundle = tmp / "bundle.json"
    sig = {"input_names": sorted(allow), "output_names": ["score"]}
    bundle.write_text(json.dumps({"kind": BUNDLE_KIND, "format": BUNDLE_FORMAT,
                                  "models": {m: {"versions": {"1": sig}} for m in models}}))
    (tmp / "overrides.yaml").write_text("models:\n  ref_pass:\n    mode: \"off\"\n")
    cfg = tmp / "root.yaml"
    cfg.write_text(json.dumps({
        "bundles": [str(bundle)], "overrides": str(tmp / "overrides.yaml"), "watch": False,
        "admin": {"on_service_port": True}, "partitions": partitions,
        "models": {m: {"partition": p, "default_version": "1"} for m, p in models.items()}, **settings,
    }))
    return cfg


async def _load(url: str, body: bytes, n: int, concurrency: int) -> list[float]:
    import aiohttp

    lat: list[float] = []
    it = iter(range(n))
    headers = {"Content-Type": "application/msgpack"}

    async def worker(s: aiohttp.ClientSession) -> None:
        for _ in it:
            t0 = time.perf_counter()
            async with s.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status}")
            lat.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return lat


def _cpu(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run_bench(requests: int = 2000, concurrency: int = 8, warmup: int = 200,
              out: str | None = None, seed: int = 0) -> int:
    import psutil

    from loadtest.payload import reference_payload
    from loadtest.procs import ManagedProcess, free_port, start

    body, allow = reference_payload(seed)
    with tempfile.TemporaryDirectory(prefix="root-bench-") as d:
        tmp = Path(d)
        sport = free_port()
        sink = ManagedProcess("sink", [sys.executable, "-m", "loadtest.sink", "--port", str(sport), "--small"],
                              f"http://127.0.0.1:{sport}", tmp / "sink.log").start()
        root = None
        try:
            sink.wait_ready("/v2/health/ready", 30)
            cfg = write_root_config(tmp, allow, {"sink": {"replicas": [sink.url]}}, {"ref": "sink", "ref_pass": "sink"})
            rport = free_port()
            root = start("root", ["root", "--config", str(cfg), "--port", str(rport)], rport,
                         "/readyz", tmp, timeout=30)
            rproc, sproc = psutil.Process(root.pid), psutil.Process(sink.pid)
            urls = {"direct": sink.url + "/v1/models/ref/versions/1/score",
                    "pass": root.url + "/v1/models/ref_pass/score", "trim": root.url + "/v1/models/ref/score"}
            for u in urls.values():
                asyncio.run(_load(u, body, warmup, concurrency))
            cpu = {"pass": 0.0, "trim": 0.0}
            sink_cpu = {"pass": 0.0, "trim": 0.0}
            wall = {"pass": 0.0, "trim": 0.0}
            round_ratios: list[float] = []
            per_phase = max(1, requests // ROUNDS)
            for _ in range(ROUNDS):  # short alternating phases: a noisy stretch of the machine hits both modes alike
                phase_cpu = {}
                for mode in ("pass", "trim"):
                    c0, s0, t0 = _cpu(rproc), _cpu(sproc), time.perf_counter()
                    asyncio.run(_load(urls[mode], body, per_phase, concurrency))
                    phase_cpu[mode] = _cpu(rproc) - c0
                    cpu[mode] += phase_cpu[mode]
                    sink_cpu[mode] += _cpu(sproc) - s0
                    wall[mode] += time.perf_counter() - t0
                round_ratios.append(phase_cpu["trim"] / phase_cpu["pass"])
            requests = per_phase * ROUNDS
            seq = max(200, requests // 4)
            p50: dict[str, float] = {}
            for mode in ("direct", "pass", "trim", "direct", "pass", "trim"):
                lat = asyncio.run(_load(urls[mode], body, seq // 2, 1))
                p50.setdefault(mode, [])  # type: ignore[arg-type]
                p50[mode] += lat  # type: ignore[operator]
            med = {k: statistics.median(v) * 1000 for k, v in p50.items()}  # type: ignore[arg-type]
            metrics = upstream_bytes_per_request(root.url)
        finally:
            if root is not None:
                root.stop()
            sink.stop()
    per_k = {m: cpu[m] / requests * 1000 for m in cpu}
    result: dict[str, Any] = {
        "payload_bytes": len(body), "features": 2000, "allowlist": len(allow), "requests_per_mode": requests,
        "concurrency": concurrency, "root_cpu_s_per_1k": per_k, "cpu_ratio_trim_vs_pass": per_k["trim"] / per_k["pass"],
        "cpu_ratio_per_round": round_ratios,
        "upstream_cpu_s_per_1k": {m: sink_cpu[m] / requests * 1000 for m in sink_cpu},
        "throughput_rps": {m: requests / wall[m] for m in wall},
        "p50_ms": med, "added_p50_ms": {"pass": med["pass"] - med["direct"], "trim": med["trim"] - med["direct"]},
        "upstream_bytes_per_request": metrics,
    }
    print(f"reference payload: {len(body):,} bytes, 2,000 features, {len(allow)} allowlisted; {requests} requests per "
          f"mode, concurrency {concurrency}")
    print(f"root CPU s / 1k requests   passthrough {per_k['pass']:.3f}   trim {per_k['trim']:.3f}   ratio "
          f"{result['cpu_ratio_trim_vs_pass']:.2f} (target <= 0.8)"
          f"   per round {min(round_ratios):.2f}-{max(round_ratios):.2f}")
    up = result["upstream_cpu_s_per_1k"]
    both = {m: per_k[m] + up[m] for m in per_k}
    result["root_plus_upstream_ratio"] = both["trim"] / both["pass"]
    print(f"upstream CPU s / 1k        passthrough {up['pass']:.3f}   trim {up['trim']:.3f}")
    print(f"root + upstream CPU s / 1k passthrough {both['pass']:.3f}   trim {both['trim']:.3f}   ratio "
          f"{result['root_plus_upstream_ratio']:.2f}")
    print(f"throughput req/s           passthrough {result['throughput_rps']['pass']:.0f}   trim "
          f"{result['throughput_rps']['trim']:.0f}")
    print(f"p50 ms (sequential)        direct {med['direct']:.3f}   via root pass {med['pass']:.3f}   via root trim "
          f"{med['trim']:.3f}")
    print(f"added p50 ms               passthrough {result['added_p50_ms']['pass']:.3f}   trim "
          f"{result['added_p50_ms']['trim']:.3f} (target <= 1)")
    if metrics:
        print(f"upstream bytes / request   passthrough {metrics.get('ref_pass', 0):,.0f}   trim "
              f"{metrics.get('ref', 0):,.0f}")
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return 0


def upstream_bytes_per_request(url: str) -> dict[str, float]:
    """Upstream bytes per request per model, from the root's own metrics."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    sent: dict[str, float] = {}
    reqs: dict[str, float] = {}
    for line in text.splitlines():
        for name, into in (("trimmer_root_upstream_sent_bytes_total{", sent), ("trimmer_root_requests_total{", reqs)):
            if line.startswith(name):
                model = line.split('model="', 1)[1].split('"', 1)[0]
                into[model] = into.get(model, 0.0) + float(line.rsplit(" ", 1)[1])
    return {m: sent[m] / reqs[m] for m in sent if reqs.get(m)}


__all__ = ["run_bench", "upstream_bytes_per_request", "write_root_config"]
