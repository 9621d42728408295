"""Run the scenario matrix: one leaf and one byte-counting relay for the whole run, a fresh root per scenario.

Why a fresh root per scenario: its byte counters, CPU accounting and upstream
connection pool then cover exactly one scenario, so the relay's count and the
root's `trimmer_root_upstream_sent_bytes` can be compared directly and the CPU
figure is the root process's own (psutil on its pid and its children).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from trimmer.codec import encode_msgpack
from trimmer.errors import ConfigError, TrimmerError
from trimmer.repository import scan_repository
from trimmer.signature import Signature

from . import procs
from .config import LoadtestConfig, ModelTarget, parse_rate
from .payload import make_request, universe_for_models
from .relay import RelayStats, RelayThread
from .runner import Target, run_load
from .scenarios import SCENARIOS, Scenario, write_scenario_configs

LEAF_READY = "/v2/health/ready"
ROOT_READY = "/readyz"
SENT_METRIC = "trimmer_root_upstream_sent_bytes"
AUDIT_PREFIX = "trimmer_root_audit"
AUDIT_OUTCOMES = ("matches", "near_matches", "mismatches", "errors")
CROSSCHECK_TOLERANCE_PCT = 1.0


def is_load_path(path: str) -> bool:
    """Upstream paths that carry load (not health probes or metadata)."""
    return path.endswith("/score") or path.endswith("/infer")


@dataclass
class Workload:
    """The pre-encoded request pool and its reference sizes."""

    url_path: str
    bodies: list[bytes]
    features: int
    used: int
    usage_ratio: float
    candidates: int
    body_bytes: float  # mean client body
    untrimmed_bytes: float  # mean bytes the root forwards untrimmed, summed over targets
    min_bytes: float  # mean bytes with only the kept features, summed over targets
    targets: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"features": self.features, "used": self.used, "usage_ratio": round(self.usage_ratio, 4),
                "candidates": self.candidates,
                "distinct_bodies": len(self.bodies), "body_bytes": round(self.body_bytes, 1),
                "untrimmed_bytes": round(self.untrimmed_bytes, 1), "min_bytes": round(self.min_bytes, 1),
                "targets": self.targets, "url_path": self.url_path}


def _pick_version(model: str,
                  available: dict[tuple[str, str], Signature], version: str | None) -> tuple[str, Signature]:
    versions = sorted((v for (m, v) in available if m == model), key=lambda v: (0, int(v)) if v.isdigit() else (1, v))
    if not versions:
        raise ConfigError(f"model {model!r} has no readable version in the repository")
    v = version if version is not None else versions[-1]
    if (model, v) not in available:
        raise ConfigError(f"model {model!r} has no version {v!r}; available: {', '.join(versions)}")
    return v, available[(model, v)]


def build_workload(cfg: LoadtestConfig, repo: Path) -> Workload:
    """Universe from the target models' signatures plus unused features; sizes computed by encoding only the kept
    features (independent of trimmer.trim)."""
    scan = scan_repository(repo)
    sigs = {k: mv.signature for k, mv in scan.versions.items()}
    chosen: list[tuple[ModelTarget, str, Signature]] = []
    for t in cfg.models:
        v, sig = _pick_version(t.name, sigs, t.version)
        chosen.append((t, v, sig))
    p = cfg.payload
    universe = universe_for_models([s for _, _, s in chosen], p.usage_ratio, p.mix, p.seed)
    fan_out = len(cfg.models) > 1
    if fan_out:
        url_path = "/v1/score"
    else:
        t = cfg.models[0]
        url_path = (f"/v1/models/{t.name}/score" if t.version is None
                    else f"/v1/models/{t.name}/versions/{t.version}/score")
    bodies, untrimmed, minimum = [], 0, 0
    for i in range(p.distinct):
        plain = make_request(universe, p.candidates, p.seed + i, profile=p.profile)
        forwarded = encode_msgpack(plain)  # what the root forwards untrimmed (fan-out strips "models")
        req = plain
        if fan_out:
            req = {**plain,
                   "models": [{"name": t.name, **({"version": t.version} if t.version else {})} for t in cfg.models]}
        bodies.append(encode_msgpack(req))
        for _, _, sig in chosen:
            untrimmed += len(forwarded)
            # The floor, computed without the trim under test: the request encoded with only the kept features.
            kept = {k: v for k, v in plain["features"].items() if k in sig.allowlist}
            minimum += len(encode_msgpack({**plain, "features": kept}))
    n = len(bodies)
    return Workload(
        url_path=url_path, bodies=bodies, features=len(universe.features), used=len(universe.used),
        usage_ratio=universe.usage_ratio,
        candidates=p.candidates, body_bytes=sum(map(len, bodies)) / n, untrimmed_bytes=untrimmed / n,
        min_bytes=minimum / n,
        targets=[{"model": t.name, "version": v, "inputs": len(sig.input_names)} for t, v, sig in chosen],
    )


def scrape_metrics(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Sum every sample of the root's /metrics by sample name (labels summed away)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:
        text = resp.read().decode("utf-8", "replace")
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def _tree_sum(pid: int, measure: Callable[[psutil.Process], float]) -> float:
    """Sum `measure` over a process and its live children (root workers); 0 once it is gone."""
    try:
        p = psutil.Process(pid)
        procs_ = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for q in procs_:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += measure(q)
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process tree."""
    return _tree_sum(pid, lambda q: q.cpu_times().user + q.cpu_times().system)


def rss_bytes(pid: int) -> int:
    return int(_tree_sum(pid, lambda q: q.memory_info().rss))


FLAT_PCT = 10.0  # soak verdict: RSS after warm-up may grow at most this much by the end of the run


class RssSampler:
    """Samples root and leaf RSS every `interval` seconds in a daemon thread (soak runs)."""

    def __init__(self, pids: dict[str, int], interval: float) -> None:
        self.pids, self.interval = pids, interval
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            self.samples.append(
                {"t_s": round(time.monotonic() - t0, 2), **{k: rss_bytes(p) for k, p in self.pids.items()}})
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self, settle_s: float = 0.0) -> dict[str, Any]:
        """Start/end/max per process, and the soak verdict: `flat` when the end is within FLAT_PCT of the
        baseline, the first sample after `settle_s` (warm-up: first requests allocate buffers and pools once)."""
        out: dict[str, Any] = {"interval_s": self.interval, "samples": self.samples, "flat_pct": FLAT_PCT}
        for k in self.pids:
            vals = [s[k] for s in self.samples if s.get(k)]
            if vals:
                base = next((s[k] for s in self.samples if s.get(k) and s["t_s"] >= settle_s), vals[0])
                growth_pct = round(100.0 * (vals[-1] - base) / base, 1)
                out[k] = {"start_mb": round(vals[0] / 2**20, 1), "end_mb": round(vals[-1] / 2**20, 1),
                          "max_mb": round(max(vals) / 2**20, 1),
                          "growth_mb": round((vals[-1] - vals[0]) / 2**20, 1), "baseline_mb": round(base / 2**20, 1),
                          "growth_pct": growth_pct, "flat": growth_pct <= FLAT_PCT}
        return out


def build_demo_repo(out: Path, log_dir: Path) -> Path:
    """`trimmer leaf build-demo --out <out>` in a subprocess (torch stays out of this process)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "build-demo.log").open("wb") as log:
        try:
            rc = subprocess.run(procs.trimmer_cmd("leaf", "build-demo", "--out", str(out)), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600).returncode
        except subprocess.TimeoutExpired:
            raise TrimmerError("building the demo model repository took over 600 s") from None
    if rc != 0:
        tail = (log_dir / "build-demo.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise TrimmerError(
            f"building the demo model repository failed (exit {rc}): {tail[0]} (log: {log_dir / 'build-demo.log'})")
    return out


ProgressFactory = Callable[[str], Callable[[float], None]]


@dataclass
class MatrixContext:
    cfg: LoadtestConfig
    out: Path
    repo: Path
    workload: Workload
    leaf_url: str  # where the relay forwards (the leaf, possibly inside a network namespace)
    relay: RelayThread
    leaf_pid: int
    log_dir: Path


def run_scenario(ctx: MatrixContext, scenario: Scenario, progress: Callable[[float], None] | None = None,
                 link_rate: str | None = None) -> dict[str, Any]:
    """Start a root for `scenario`, drive the load through it, stop it, and return the scenario's row."""
    cfg = ctx.cfg
    port = procs.free_port()
    suffix = scenario.name.replace("+", "_") + (f"-{link_rate}" if link_rate else "")
    conf_dir = ctx.out / "configs"
    root_cfg = write_scenario_configs(
        scenario, conf_dir, port=port, upstream_url=ctx.relay.relay.url, repo=ctx.repo.resolve(),
        models={t["model"]: t["version"] for t in ctx.workload.targets}, workers=cfg.root_workers,
        max_connections=cfg.root_max_connections, extra=cfg.root_extra, tag=suffix,
    )
    before = ctx.relay.snapshot()
    root = procs.start(f"root-{suffix}", ["root", "--config", str(root_cfg)], port, ROOT_READY, ctx.log_dir, timeout=60)
    with procs.running(root):
        target = Target(root.url + ctx.workload.url_path, ctx.workload.bodies)
        cpu: dict[str, float] = {}
        cpu_start = lambda: cpu.setdefault("start", cpu_seconds(root.pid))  # noqa: E731
        pids = {"root": root.pid, **({"leaf": ctx.leaf_pid} if ctx.leaf_pid else {})}
        sampler = RssSampler(pids, cfg.sample_rss_s) if cfg.sample_rss_s > 0 else None
        with sampler or contextlib.nullcontext():
            result = _run_async(run_load(target, cfg.load, progress, cpu_start))
        cpu_end = cpu_seconds(root.pid)
        metrics = _settled_metrics(root.url)
        after = ctx.relay.snapshot()
    if root.proc is not None and root.proc.returncode not in (0, None, -15):
        pass  # an unclean root exit is visible in its log; the figures above were taken while it ran
    return _row(ctx, scenario, link_rate, result, after - before, metrics, cpu, cpu_end, sampler)


def _audits_pending(metrics: dict[str, float]) -> bool:
    started = metrics.get("trimmer_root_audits_total", 0.0)
    return started > sum(metrics.get(f"{AUDIT_PREFIX}_{k}_total", 0.0) for k in AUDIT_OUTCOMES)


def _settled_metrics(url: str, wait_s: float = 5.0) -> dict[str, float]:
    """The root's metrics once its background equivalence audits have finished (bounded wait)."""
    metrics = scrape_metrics(url)
    deadline = time.monotonic() + wait_s
    while _audits_pending(metrics) and time.monotonic() < deadline:
        time.sleep(0.1)
        metrics = scrape_metrics(url)
    return metrics


def audit_summary(metrics: dict[str, float]) -> dict[str, Any] | None:
    """The root's equivalence-audit counters (None when audit_sample_rate is 0 or the root predates audits)."""
    rate = metrics.get(f"{AUDIT_PREFIX}_sample_rate")
    if not rate:
        return None
    out: dict[str, Any] = {"sample_rate": rate, "run": int(metrics.get("trimmer_root_audits_total", 0.0)),
                           "dropped": int(metrics.get("trimmer_root_audits_dropped_total", 0.0)),
                           "sent_bytes": int(metrics.get(f"{AUDIT_PREFIX}_sent_bytes_total", 0.0))}
    out.update({k: int(metrics.get(f"{AUDIT_PREFIX}_{k}_total", 0.0)) for k in AUDIT_OUTCOMES})
    return out


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(coro)
    return uvloop.run(coro)


def _row(ctx: MatrixContext, scenario: Scenario, link_rate: str | None, result, delta: RelayStats,
         metrics: dict[str, float],
         cpu: dict[str, float], cpu_end: float, sampler: RssSampler | None) -> dict[str, Any]:
    w = ctx.workload
    load = delta.matching(is_load_path)
    audit = audit_summary(metrics)
    if audit and audit["run"] and load.requests > audit["run"]:
        # Audit copies (untrimmed, same paths) pass the relay too: take them out of the per-request figures,
        # headers estimated at the mean header size. Their bytes stay visible under `audit.sent_bytes`.
        hdr = load.header_bytes / load.requests
        load = type(load)(load.requests - audit["run"], max(0, round(load.header_bytes - hdr * audit["run"])),
                          max(0, load.body_bytes - audit["sent_bytes"]))
    n_targets = len(ctx.cfg.models)
    per_upstream = load.total_bytes / load.requests if load.requests else None
    wire = per_upstream * n_targets if per_upstream is not None else None
    body = load.body_bytes / load.requests * n_targets if load.requests else None
    root_sent = metrics.get(f"{SENT_METRIC}_total")
    agreement = None
    if root_sent:
        agreement = round(100.0 * abs(load.body_bytes - root_sent) / root_sent, 3)
    answered = result.measured + sum(result.errors.values())
    cpu_delta = cpu_end - cpu["start"] if "start" in cpu else None
    row: dict[str, Any] = {
        "scenario": scenario.name, "compression": scenario.compression, "mode": scenario.mode, "link_rate": link_rate,
        "wire_bytes_per_request": None if wire is None else round(wire, 1),
        "body_bytes_per_request": None if body is None else round(body, 1),
        "down_bytes_per_request": round(delta.down_bytes / max(1, result.completed), 1),
        "ratio_to_min": None if wire is None else round(wire / w.min_bytes, 4),
        "body_ratio_to_min": None if body is None else round(body / w.min_bytes, 4),
        "upstream_requests": load.requests, "client_requests": result.sent,
        "root_cpu_s": None if cpu_delta is None else round(cpu_delta, 3),
        "root_cpu_s_per_1k": None if cpu_delta is None or not answered else round(cpu_delta / answered * 1000, 3),
        "root_process_cpu_seconds_total": metrics.get("process_cpu_seconds_total"),
        "crosscheck": {"relay_body_bytes": load.body_bytes, "relay_wire_bytes": load.total_bytes,
                       "relay_up_bytes_all": delta.up_bytes,
                       "root_upstream_sent_bytes": root_sent, "agreement_pct": agreement,
                       "ok": agreement is not None and agreement <= CROSSCHECK_TOLERANCE_PCT},
        "root_metrics": {k: metrics.get(f"trimmer_root_{k}_total")
                         for k in ("untrimmed_bytes", "trimmed_bytes", "upstream_sent_bytes",
                                                                               "features_dropped",
                                                                               "shadow_features_dropped",
                                                                               "allowlist_misses")},
        **result.to_json(),
    }
    if audit is not None:
        row["audit"] = audit
    if sampler is not None:
        row["rss"] = sampler.summary(settle_s=ctx.cfg.load.warmup_s)
    return row


@contextlib.contextmanager
def leaf_and_relay(cfg: LoadtestConfig, repo: Path, out: Path, log_dir: Path,
                   link_rate: str | None = None) -> Iterator[tuple[str, RelayThread, int]]:
    """A leaf (behind a shaped veth when `link_rate` is set) and a relay in front of it; both always stopped."""
    if link_rate:
        from .netns import shaped_leaf

        with shaped_leaf(repo, parse_rate(link_rate), log_dir) as (host, port, pid):
            with _relay(host, port) as relay:
                yield f"http://{host}:{port}", relay, pid
        return
    if cfg.leaf_url:
        from urllib.parse import urlsplit

        parts = urlsplit(cfg.leaf_url)
        with _relay(parts.hostname or "127.0.0.1", parts.port or 80) as relay:
            yield cfg.leaf_url, relay, 0
        return
    port = procs.free_port()
    leaf = procs.start("leaf", ["leaf", "--repo", str(repo), "--port", str(port)], port,
                       LEAF_READY, log_dir, timeout=180)
    with procs.running(leaf), _relay("127.0.0.1", port) as relay:
        yield leaf.url, relay, leaf.pid


@contextlib.contextmanager
def _relay(host: str, port: int) -> Iterator[RelayThread]:
    rt = RelayThread(host, port)
    rt.start()
    try:
        yield rt
    finally:
        rt.stop()


def prepare(cfg: LoadtestConfig, out: Path) -> tuple[Path, Workload]:
    log_dir = out / "logs"
    repo = cfg.repo if cfg.repo is not None else build_demo_repo(out / "models", log_dir)
    return repo, build_workload(cfg, repo)


def run_matrix(cfg: LoadtestConfig, out: Path, progress_factory: ProgressFactory | None = None,
               link_rates: tuple[str, ...] = (), notes: list[str] | None = None) -> dict[str, Any]:
    """Every scenario on loopback, then again at each link rate; returns the report dict (not yet written)."""
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    repo, workload = prepare(cfg, out)
    rows: list[dict[str, Any]] = []
    for link in (None, *link_rates):
        with leaf_and_relay(cfg, repo, out, log_dir, link) as (leaf_url, relay, leaf_pid):
            ctx = MatrixContext(cfg, out, repo, workload, leaf_url, relay, leaf_pid, log_dir)
            for name in cfg.scenarios:
                label = name + (f" @ {link}" if link else "")
                prog = progress_factory(label) if progress_factory else None
                rows.append(run_scenario(ctx, SCENARIOS[name], prog, link))
    load = cfg.load
    return {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.path,
        "models": [f"{t['model']}/{t['version']}" for t in workload.targets],
        "payload": {**workload.to_json(), "profile": cfg.payload.profile},
        "load": {"mode": load.mode, "rate": load.rate, "concurrency": load.concurrency, "duration_s": load.duration_s,
                 "count": load.count, "warmup_s": load.warmup_s, "timeout_s": load.timeout_s},
        "scenarios": rows,
        "notes": list(notes or []),
    }
