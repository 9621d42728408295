"""`trimmer loadtest --target URL`: load a root (or a leaf) that is already running; starts nothing.

`trimmer loadtest --config` builds its own leaf, relay and roots to compare modes side by side.
In the field the question is different: how does *this* deployment behave under load, with
payloads shaped like the models it serves? So the payload comes from the target itself: each
model's signature is read from `GET /v2/models/{m}[/versions/{v}]` (the root proxies it to the
model's server), every input the models read is generated from its dtype and shape, and unused
features are added until `used / total == usage_ratio`, as the root would see from a feature
store that sends everything. One model: `POST /v1/models/{m}[/versions/{v}]/score`; several:
the fan-out `POST /v1/score`.

Reported: latency percentiles (open loop: from each request's intended send time), achieved
rate, errors by status, body bytes per request and the bytes with only the features the models
read (what trimming can reach). The root's own byte counters are at its `/metrics`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trimmer.client import OIP_TO_WIRE
from trimmer.codec import MSGPACK, encode_msgpack
from trimmer.errors import ConfigError, TrimmerError
from trimmer.signature import InputSpec, Signature
from trimmer.trim import trim

from .payload import PROFILES, REFERENCE_MIX, make_request, universe_for_models
from .runner import LoadSpec, Target, run_load

MAX_MODELS = 32
MAX_DISTINCT = 256


@dataclass(frozen=True)
class FieldTarget:
    model: str
    version: str | None


def parse_models(text: str) -> list[FieldTarget]:
    """`ranker,retrieval:2` -> targets (name[:version]), each once."""
    out: list[FieldTarget] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, version = item.partition(":")
        if not name:
            raise ConfigError(f"--models: empty model name in {text!r}")
        out.append(FieldTarget(name, version or None))
    if not out:
        raise ConfigError("--models: name at least one model, e.g. --models ranker,retrieval:2")
    if len(out) > MAX_MODELS:
        raise ConfigError(f"--models: at most {MAX_MODELS} models")
    if len(set(out)) != len(out):
        raise ConfigError("--models: a model is listed twice")
    return out


def signature_from_metadata(meta: Any, where: str) -> Signature:
    """An OIP model metadata document (`inputs`: name, datatype, shape[, default]) as a Signature."""
    if not isinstance(meta, dict) or not isinstance(meta.get("inputs"), list) or not meta["inputs"]:
        raise TrimmerError(f"{where}: metadata lists no inputs; cannot generate a payload")
    names: list[str] = []
    specs: dict[str, InputSpec] = {}
    for i, inp in enumerate(meta["inputs"]):
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or not inp["name"]:
            raise TrimmerError(f"{where}: inputs[{i}] has no name")
        name = inp["name"]
        datatype = inp.get("datatype")
        dtype = OIP_TO_WIRE.get(datatype) if isinstance(datatype, str) else None
        shape = inp.get("shape")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
            shape = None
        names.append(name)
        specs[name] = InputSpec(dtype, None if shape is None or dtype is None else tuple(shape),
                                inp.get("default"), "default" in inp)
    outputs = tuple(o["name"] for o in meta.get("outputs") or [] if isinstance(o, dict)
                    and isinstance(o.get("name"), str)) or ("output",)
    return Signature(tuple(dict.fromkeys(names)), outputs, specs)


async def fetch_signatures(base: str, targets: list[FieldTarget], timeout_s: float) -> dict[FieldTarget, Signature]:
    import aiohttp

    out: dict[FieldTarget, Signature] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        for t in targets:
            path = f"/v2/models/{t.model}" + (f"/versions/{t.version}" if t.version else "")
            try:
                async with s.get(base + path, headers={"Accept": "application/json"}) as r:
                    body = await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise TrimmerError(f"cannot reach {base}: {type(exc).__name__} {exc}".strip()) from None
            if status != 200:
                raise TrimmerError(
                    f"GET {base}{path} answered {status}: {body[:200].decode('utf-8', 'replace').strip()}")
            try:
                meta = json.loads(body)
            except ValueError:
                raise TrimmerError(f"GET {base}{path}: not JSON") from None
            out[t] = signature_from_metadata(meta, f"GET {base}{path}")
    return out


def build_bodies(targets: list[FieldTarget], sigs: dict[FieldTarget, Signature], *, usage_ratio: float, candidates: int,
                 distinct: int, seed: int, profile: str) -> tuple[str, list[bytes], float, float]:
    """(url path, msgpack bodies, mean body bytes, mean bytes with only the read features, summed over targets)."""
    universe = universe_for_models(sigs.values(), usage_ratio, REFERENCE_MIX, seed)
    fanout = len(targets) > 1
    if fanout:
        path = "/v1/score"
        extra: dict[str, Any] = {
            "models": [{"name": t.model, **({"version": t.version} if t.version else {})} for t in targets]}
    else:
        t = targets[0]
        path = f"/v1/models/{t.model}" + (f"/versions/{t.version}" if t.version else "") + "/score"
        extra = {}
    bodies, minimum = [], 0
    for i in range(distinct):
        req = make_request(universe, candidates, seed + i, profile=profile, **extra)
        bodies.append(encode_msgpack(req))
        req.pop("models", None)  # the root strips `models` before trimming for each target
        plain = encode_msgpack(req)
        minimum += sum(len(trim(plain, sigs[t].allowlist, MSGPACK).body) for t in targets)
    return path, bodies, sum(map(len, bodies)) / len(bodies), minimum / len(bodies)


def run_target(args: Any) -> int:
    """The `trimmer loadtest --target` command; TrimmerError/ConfigError leave as one line (trimmer.cli)."""
    base = args.target.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"--target: expected a URL like http://127.0.0.1:8080, got {args.target!r}")
    if not args.models and not args.replay:
        raise ConfigError("--target needs --models (e.g. --models ranker,retrieval:2) or --replay FILE")
    if args.models and args.replay:
        raise ConfigError("--models and --replay are exclusive: payloads come from the signatures or from the capture")
    targets = parse_models(args.models) if args.models else []
    if args.profile not in PROFILES:
        raise ConfigError(f"--profile: {args.profile!r} is not one of {', '.join(PROFILES)}")
    if not 0 < args.usage_ratio <= 1:
        raise ConfigError(f"--usage-ratio: must be in (0, 1], got {args.usage_ratio}")
    if args.candidates < 1 or not 1 <= args.distinct <= MAX_DISTINCT:
        raise ConfigError(f"--candidates must be >= 1 and --distinct 1..{MAX_DISTINCT}")
    for flag, value in (("--duration", args.duration), ("--rate", args.rate)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be > 0")
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be >= 1")
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError("--concurrency must be >= 1")
    duration = args.duration if args.duration is not None else (None if args.count is not None else 10.0)
    try:
        spec = LoadSpec(mode="closed" if args.concurrency is not None and args.rate is None else "open",
                        rate=args.rate or 20.0, concurrency=args.concurrency or 8, duration_s=duration,
                        count=args.count, warmup_s=args.warmup, timeout_s=args.timeout)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    if args.replay:
        return _replay(base, args, spec)
    sigs = asyncio.run(fetch_signatures(base, targets, min(args.timeout, 30.0)))
    path, bodies, body_bytes, min_bytes = build_bodies(targets, sigs, usage_ratio=args.usage_ratio,
                                                       candidates=args.candidates,
                                                       distinct=args.distinct, seed=args.seed, profile=args.profile)
    print(f"loadtest {base}{path}: {len(targets)} model(s), {args.profile} values, body {body_bytes / 1024:.1f} KiB, "
          f"read features only {min_bytes / 1024:.1f} KiB; "
          + (f"open loop {spec.rate:g} req/s" if spec.mode == "open" else f"closed loop, {spec.concurrency} workers")
          + (f", {spec.duration_s:g} s" if spec.duration_s else "") + (f", {spec.count} requests" if spec.count else "")
          + f" after {spec.warmup_s:g} s warm-up", file=sys.stderr)
    result = asyncio.run(run_load(Target(base + path, bodies), spec))
    doc = {"target": base, "path": path, "models": [t.model + (f":{t.version}" if t.version else "") for t in targets],
           "payload": {"profile": args.profile, "usage_ratio": args.usage_ratio, "candidates": args.candidates,
                       "distinct": len(bodies), "body_bytes": round(body_bytes, 1), "min_bytes": round(min_bytes, 1),
                       "features": {t.model: len(sigs[t].input_names) for t in targets}},
           "load": {"mode": spec.mode, "rate": spec.rate if spec.mode == "open" else None,
                    "concurrency": spec.concurrency if spec.mode == "closed" else None},
           **result.to_json()}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    lat = doc["latency_ms"]
    print(f"{result.measured} ok, errors {doc['errors'] or 'none'}; achieved {doc['achieved_rate']:g} req/s; "
          "latency ms " + ", ".join(f"{k} {v:g}" for k, v in lat.items() if v is not None))
    return 0 if result.measured > 0 and not result.errors else 1


def _replay(base: str, args: Any, spec: LoadSpec) -> int:
    """`--replay FILE`: the captured requests (trimmer/capture.py), cycled in order, each to its own path."""
    from collections import Counter

    from trimmer.capture import read_capture

    from .runner import Replayed

    records = read_capture(args.replay)
    reqs = [Replayed(base + r.path, r.body, {"Content-Type": r.content_type, **r.headers}) for r in records]
    paths = Counter(r.path for r in records)
    print(f"loadtest {base}: replaying {len(reqs)} captured request(s) from {args.replay} "
          f"({', '.join(f'{p} x{n}' for p, n in paths.most_common(3))}{', ...' if len(paths) > 3 else ''})",
          file=sys.stderr)
    result = asyncio.run(run_load(Target(base, reqs), spec))
    doc = {"target": base, "replay": str(args.replay), "records": len(reqs), "paths": dict(paths),
           "body_bytes": round(sum(len(r.body) for r in records) / len(records), 1), **result.to_json()}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    print(f"{result.measured} ok, errors {doc['errors'] or 'none'}; achieved {doc['achieved_rate']:g} req/s")
    return 0 if result.measured > 0 and not result.errors else 1


__all__ = ["run_target", "parse_models", "signature_from_metadata", "fetch_signatures", "build_bodies", "FieldTarget"]
