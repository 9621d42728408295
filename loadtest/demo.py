"""`trimmer demo` (`make demo`): the whole story in under two minutes on two cores.

Builds the demo model repository, starts one leaf and, per scenario, one root
on free loopback ports, runs a short open-loop matrix that fans each request
out to the ranker, retrieval and the diversifier, prints the table and the report's location, then sends a
few requests through the root's retrieval -> ranker -> diversifier pipeline (loadtest/pipeline_demo.py). Every
process is stopped on success, failure or Ctrl-C (loadtest.procs.running).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console

from .config import LoadtestConfig, ModelTarget, PayloadSpec
from .runner import LoadSpec
from .scenarios import SCENARIOS

DEMO_RATE = 40.0  # req/s: sustainable by passthrough on 2 cores, so the modes are compared at equal offered load
DEMO_DURATION_S = 5.0
DEMO_WARMUP_S = 1.0


def demo_config(out: Path, duration_s: float | None = None) -> LoadtestConfig:
    return LoadtestConfig(
        path="(trimmer demo)",
        out=out,
        repo=None,  # build the demo repository into <out>/models
        models=(ModelTarget("ranker"), ModelTarget("retrieval"), ModelTarget("diversifier")),
        # Realistic values (quantised, sparse, repeated ids, short vocabularies), so lz4 and zstd are
        # compared with trimming on data they can compress; `payload.profile: random` in a loadtest config for the worst
        # case.
        payload=PayloadSpec(usage_ratio=0.2, candidates=256, seed=0, distinct=8, profile="realistic"),
        load=LoadSpec(mode="open", rate=DEMO_RATE, duration_s=duration_s or DEMO_DURATION_S,
                      warmup_s=DEMO_WARMUP_S, timeout_s=10.0),
        scenarios=tuple(SCENARIOS),
    )


def run_demo(out: Path | None = None, duration_s: float | None = None) -> int:
    from .session import run_and_report

    console = Console()
    out = out or Path(tempfile.mkdtemp(prefix="trimmer-demo-"))
    cfg = demo_config(out, duration_s)
    console.print(f"[bold]trimmer demo[/bold]: building demo models, then {len(cfg.scenarios)} scenarios x "
                  f"{cfg.load.duration_s:g} s at {cfg.load.rate:g} req/s (fan-out to ranker + retrieval + "
                  f"diversifier), then the retrieval -> ranker -> diversifier pipeline; output in {out}")
    t0 = time.monotonic()
    rc = run_and_report(cfg, out, console=console)
    from .pipeline_demo import run_pipeline_demo

    rc = max(rc, run_pipeline_demo(out / "models", out, console))
    console.print(f"demo finished in {time.monotonic() - t0:.0f} s; leaf and roots stopped.")
    return rc
