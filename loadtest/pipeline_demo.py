"""The demo's pipeline step: retrieval -> item_features -> ranker -> diversifier in one root request.

Why a separate short step and not a load-test target: the matrix compares trimming modes on fan-out load;
the pipeline shows something else, each hop of one request trimmed to its own model, so a handful of
requests through one leaf and one root, and the root's per-model byte counters, tell it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from trimmer.codec import decode_msgpack, encode_msgpack
from trimmer.repository import archive_path
from trimmer.signature import read_signature
from trimmer.tensor import Tensor

from .payload import make_request, universe_for_models
from .procs import free_port, running, start

STAGES: list[dict[str, Any]] = [
    {"model": "retrieval"},
    {"model": "item_features", "inputs": {"cand_item_id": "retrieval.item_ids"}},
    {"model": "ranker", "inputs": {"cand_item_id": "retrieval.item_ids", "cand_emb": "item_features.cand_emb",
                                   "cand_ctr": "item_features.cand_ctr",
                                   "cand_age_hours": "item_features.cand_age_hours",
                                   "cand_price": "item_features.cand_price"}},
    {"model": "diversifier", "inputs": {"cand_emb": "item_features.cand_emb", "cand_score": "ranker.score",
                                        "cand_category": "item_features.cand_category"}},
]
MODELS = [s["model"] for s in STAGES]


def per_model(url: str) -> dict[tuple[str, str], float]:
    """(sample name, model label) -> value, summed over the other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode("utf-8", "replace")
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            key = (smp.name, smp.labels.get("model", ""))
            out[key] = out.get(key, 0.0) + float(smp.value)
    return out


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/msgpack"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_pipeline_demo(repo: Path, out: Path, console: Console, requests: int = 5) -> int:
    missing = [m for m in MODELS if archive_path(repo / m / "2") is None]
    if missing:
        console.print(f"pipeline step skipped: the repository has no version 2 of {', '.join(missing)}")
        return 0
    log_dir = out / "logs"
    # client features: what retrieval and the ranker's user side read, plus 80 % features nobody reads
    universe = universe_for_models([read_signature(archive_path(repo / "retrieval" / "2"))], usage_ratio=0.2, seed=5)  # type: ignore[arg-type]
    lport, rport = free_port(), free_port()
    leaf = start("pipeline-leaf", ["leaf", "--repo", str(repo), "--port", str(lport), "--log-level", "WARNING"], lport,
                 "/v2/health/ready", log_dir, timeout=180)
    with running(leaf):
        cfg = {"repositories": [str(repo)], "watch": False, "admin": {"on_service_port": True},
               "partitions": {"leaf": {"replicas": [leaf.url]}},
               "models": {m: {"partition": "leaf", "default_version": "2"} for m in MODELS},
               "timeouts": {"request_s": 30}, "pipelines": {"feed": {"stages": STAGES}}}
        path = out / "root-pipeline.yaml"
        path.write_text(json.dumps(cfg))
        root = start("pipeline-root", ["root", "--config", str(path), "--port", str(rport)], rport,
                     "/readyz", log_dir, timeout=60)
        with running(root):
            failures = 0
            slate: Any = None
            for i in range(requests):
                req = make_request(universe, candidates=1, seed=i)
                rng = np.random.default_rng(i)  # plausible user features, so retrieval finds eligible items
                req["features"].update(user_recent_items=Tensor.from_numpy(rng.integers(0, 3000, 20)),
                                       user_country=i % 8, user_language=i % 6, query_content_class=-1)
                status, body = _post(root.url + "/v1/pipelines/feed/score", encode_msgpack(req))
                if status != 200:
                    failures += 1
                    console.print(f"pipeline request {i}: {status} {body[:300]!r}")
                    continue
                slate = decode_msgpack(body)["outputs"]["slate"].to_numpy()
            metrics = per_model(root.url)
    table = Table(title=f"pipeline feed (POST /v1/pipelines/feed/score): {requests} requests, bytes per hop, as sent "
                        "vs untrimmed")
    for col in ("stage", "requests", "untrimmed B/req", "sent B/req", "features dropped/req"):
        table.add_column(col)

    def metric(name: str, model: str) -> float:
        return metrics.get((name, model), 0.0)

    for m in MODELS:
        n = metric("trimmer_root_requests_total", m) or 1.0
        table.add_row(m, str(int(n)), f"{metric('trimmer_root_untrimmed_bytes_total', m) / n:,.0f}",
                      f"{metric('trimmer_root_trimmed_bytes_total', m) / n:,.0f}",
                      f"{metric('trimmer_root_features_dropped_total', m) / n:,.0f}")
    console.print(table)
    if slate is not None:
        console.print(f"last slate (indices into retrieval's item_ids, SSD diversified): {slate.tolist()}")
    return 1 if failures else 0
