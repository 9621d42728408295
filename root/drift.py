"""Allowlist drift report: what the leaves say about the features the root sends them.

Every native leaf counts, per model/version and feature, features it received
but the model does not read (`trimmer_leaf_features_unused_by_feature_total`) and inputs it
filled from their declared default because the request lacked them
(`trimmer_leaf_inputs_defaulted_by_feature_total`). The root scrapes GET /metrics of
every replica of every native partition, sums the counters over replicas and
sets them next to its own allowlist for the (model, version):

- needed but not received (defaulted): the model ran on a default value. When
  the root's allowlist lacks that feature, trimming caused it (a wrong allowlist
  or override); otherwise the client never sent it.
- sent but unused: bytes on the wire for nothing. Under `enforce` with a correct
  allowlist this reads 0; a non-zero count means the mode is off/shadow, the
  allowlist is broader than the model's inputs (`keep`, an override), or the
  model's signature changed since the bundle was built.

Counters are cumulative since each leaf started (a leaf restart resets its share).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from trimmer.registry import Registry

from .upstream import Partition

UNUSED = "trimmer_leaf_features_unused_by_feature"
DEFAULTED = "trimmer_leaf_inputs_defaulted_by_feature"
REQUESTS = "trimmer_leaf_requests"
RECEIVED = "trimmer_leaf_features_received"
# The names leaves used before the rename (docs/metrics.md, "Renamed"): a leaf exports one or the other, never
# both, so a root reads leaves of either release during a rolling upgrade.
OLD_UNUSED, OLD_DEFAULTED = "trimmer_leaf_feature_unused", "trimmer_leaf_feature_defaulted"
_FAMILIES = {UNUSED: "unused", DEFAULTED: "defaulted", REQUESTS: "requests", RECEIVED: "features_received",
             OLD_UNUSED: "unused", OLD_DEFAULTED: "defaulted"}
MAX_METRICS_BYTES = 64 * 1024 * 1024  # a leaf's /metrics larger than this is refused, not parsed

Tallies = dict[tuple[str, str], dict[str, Any]]


def _empty() -> dict[str, Any]:
    return {"requests": 0.0, "features_received": 0.0, "unused": Counter(), "defaulted": Counter()}


def parse_leaf_metrics(text: str) -> Tallies:
    """(model, version) -> {requests, features_received, unused: Counter, defaulted: Counter} from one leaf's
    /metrics."""
    out: Tallies = {}
    for fam in text_string_to_metric_families(text):
        key = _FAMILIES.get(fam.name)
        if key is None:
            continue
        for s in fam.samples:
            if not s.name.endswith("_total"):
                continue  # *_created
            mv = (s.labels.get("model", ""), s.labels.get("version", ""))
            t = out.setdefault(mv, _empty())
            if key in ("unused", "defaulted"):
                t[key][s.labels.get("feature", "")] += s.value
            else:
                t[key] += s.value
    return out


def merge(into: Tallies, other: Tallies) -> None:
    for mv, t in other.items():
        dst = into.setdefault(mv, _empty())
        dst["requests"] += t["requests"]
        dst["features_received"] += t["features_received"]
        dst["unused"].update(t["unused"])
        dst["defaulted"].update(t["defaulted"])


async def _scrape(session: aiohttp.ClientSession, url: str, timeout_s: float) -> str:
    async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET /metrics answered {resp.status}")
        if resp.content_length is not None and resp.content_length > MAX_METRICS_BYTES:
            raise RuntimeError(f"/metrics is {resp.content_length} bytes, over {MAX_METRICS_BYTES}")
        # read to the end: one read(n) returns whatever has arrived, which cut bigger /metrics pages mid-line
        chunks, total = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            total += len(chunk)
            if total > MAX_METRICS_BYTES:
                raise RuntimeError(f"/metrics is over {MAX_METRICS_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")


def _counts(c: Counter) -> dict[str, int]:
    return {k: int(v) for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) if v > 0}


async def gather_drift(partitions: dict[str, Partition], registry: Registry, timeout_s: float) -> dict[str, Any]:
    """Scrape every native replica concurrently (bounded by timeout_s) and build the JSON report."""
    jobs: list[tuple[str, str, Partition]] = []
    skipped: dict[str, str] = {}
    for name, p in partitions.items():
        if p.cfg.protocol != "native":
            skipped[name] = f"protocol {p.cfg.protocol}: not our leaf, it exports no per-feature counters"
            continue
        jobs.extend((name, r.url, p) for r in p.replicas)

    async def one(part_name: str, url: str, p: Partition) -> tuple[dict[str, Any], Tallies]:
        if p.session is None:
            return {"partition": part_name, "replica": url, "ok": False, "error": "partition not started"}, {}
        try:
            tallies = parse_leaf_metrics(await _scrape(p.session, url, timeout_s))
        except asyncio.TimeoutError:
            return {"partition": part_name, "replica": url, "ok": False,
                    "error": f"timed out after {timeout_s:.3g}s"}, {}
        except (aiohttp.ClientError, OSError, RuntimeError, ValueError) as exc:
            return {"partition": part_name, "replica": url, "ok": False,
                    "error": f"{type(exc).__name__}: {str(exc)[:200]}"}, {}
        return {"partition": part_name, "replica": url, "ok": True, "error": None}, tallies

    results = await asyncio.gather(*(one(*j) for j in jobs))
    total: Tallies = {}
    seen_by: dict[tuple[str, str], list[str]] = {}
    for info, tallies in results:
        merge(total, tallies)
        for mv in tallies:
            seen_by.setdefault(mv, []).append(info["replica"])

    models: dict[str, dict[str, Any]] = {}
    for (model, version), t in sorted(total.items()):
        res = registry.resolve(model, version or None)
        allow = res.allowlist
        defaulted, unused = _counts(t["defaulted"]), _counts(t["unused"])
        models.setdefault(model, {})[version] = {
            "requests": int(t["requests"]),
            "features_received": int(t["features_received"]),
            "mode": res.mode if allow is not None else "miss",
            "allowlist_size": None if allow is None else len(allow),
            "needed_but_defaulted": defaulted,
            "defaulted_count": sum(defaulted.values()),
            # defaulted inputs the root's allowlist does not forward: trimming took them away
            "defaulted_not_in_allowlist": [] if allow is None else sorted(f for f in defaulted if f not in allow),
            "sent_but_unused": unused,
            "sent_but_unused_count": sum(unused.values()),
            # unused features the allowlist still forwards (keep, an override, a stale signature)
            "unused_in_allowlist": [] if allow is None else sorted(f for f in unused if f in allow),
            "replicas": seen_by.get((model, version), []),
        }
    replicas = [info for info, _ in results]
    return {
        "generated_unix": round(time.time(), 3),
        "replicas": replicas,
        "replicas_ok": sum(1 for r in replicas if r["ok"]),
        "replicas_failed": sum(1 for r in replicas if not r["ok"]),
        "skipped_partitions": skipped,
        "models": models,
    }


__all__ = ["gather_drift", "parse_leaf_metrics", "merge", "UNUSED", "DEFAULTED"]
