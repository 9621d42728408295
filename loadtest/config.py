"""The load test's YAML config (configs/loadtest.yaml); every defect is a one-line ConfigError.

Schema (all keys optional except where noted; see docs/loadtest.md):

    out: out/loadtest              # report directory (relative: to the current directory)
    repo: null                     # model repository; null = build the demo repository into <out>/models
    leaf_url: null                 # http://host:port of a running leaf to use instead of starting one
    models:                        # target models; 1 = native per-model endpoint, >1 = fan-out POST /v1/score
      - {name: ranker, version: null}
    payload: {usage_ratio: 0.2, candidates: 256, seed: 0, distinct: 8, mix: {float_col: .4, ...}}
    load: {mode: open, rate: 50, concurrency: 8, duration_s: 10, count: null, warmup_s: 2, timeout_s: 10}
    scenarios: [passthrough, lz4, zstd, trim, trim+lz4, shadow]
    link_rates: []                 # e.g. [1gbit, 100mbit]: repeat the matrix behind a shaped veth (needs root)
    root: {workers: 1, max_connections: 64, extra: {}}   # extra: merged into every generated root config
    sample_rss_s: 0                # > 0: sample root and leaf RSS every N seconds (soak)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trimmer.errors import ConfigError
from trimmer.overrides import check_section as _section
from trimmer.overrides import load_yaml

from .payload import KINDS, PROFILES, REFERENCE_MIX
from .runner import LoadSpec
from .scenarios import SCENARIOS

_TOP = {"out", "repo", "leaf_url", "models", "payload", "load", "scenarios", "link_rates", "root", "sample_rss_s"}
_PAYLOAD = {"usage_ratio", "candidates", "seed", "distinct", "mix", "profile"}
_LOAD = {"mode", "rate", "concurrency", "duration_s", "count", "warmup_s", "timeout_s", "max_inflight"}
_ROOT = {"workers", "max_connections", "extra"}
_MODEL = {"name", "version"}


@dataclass(frozen=True)
class ModelTarget:
    name: str
    version: str | None = None


@dataclass(frozen=True)
class PayloadSpec:
    usage_ratio: float = 0.2
    candidates: int = 256
    seed: int = 0
    distinct: int = 8
    mix: dict[str, float] = field(default_factory=lambda: dict(REFERENCE_MIX))
    profile: str = "random"  # value distributions: random (incompressible) | realistic (loadtest/payload.py)


@dataclass(frozen=True)
class LoadtestConfig:
    path: str
    out: Path
    repo: Path | None
    models: tuple[ModelTarget, ...]
    payload: PayloadSpec
    load: LoadSpec
    scenarios: tuple[str, ...]
    link_rates: tuple[str, ...] = ()
    root_workers: int = 1
    root_max_connections: int = 64
    root_extra: dict[str, Any] = field(default_factory=dict)
    sample_rss_s: float = 0.0
    leaf_url: str | None = None  # use this running leaf instead of starting one (then `repo` must hold its models)


def _number(value: Any, where: str, default: Any, *, integer: bool = False, minimum: float | None = None,
            positive: bool = False, optional: bool = False) -> Any:
    if value is None:
        return None if optional else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{where}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum:g}, got {value!r}")
    return value


def parse_rate(text: Any, where: str = "link rate") -> int:
    """'1gbit', '100mbit', '500kbit', '2.5gbit' -> bits per second (tc's units)."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: must be a string like 1gbit or 100mbit, got {text!r}")
    t = text.strip().lower()
    for suffix, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if t.endswith(suffix):
            try:
                value = float(t[: -len(suffix)])
            except ValueError:
                break
            if value > 0:
                return int(value * mult)
            break
    raise ConfigError(f"{where}: {text!r} is not a rate like 1gbit, 100mbit or 500kbit")


def parse_loadtest_config(doc: Any, path: str = "loadtest.yaml", base: Path | None = None) -> LoadtestConfig:
    base = base if base is not None else Path.cwd()
    doc = _section(doc, _TOP, path)
    out = doc.get("out", "out/loadtest")
    if not isinstance(out, str) or not out:
        raise ConfigError(f"{path}: out: must be a directory path")
    repo = doc.get("repo")
    if repo is not None:
        if not isinstance(repo, str) or not repo:
            raise ConfigError(f"{path}: repo: must be a directory path or null (build the demo repository)")
        repo_p = Path(os.path.expanduser(repo))
        repo_p = repo_p if repo_p.is_absolute() else base / repo_p
        if not repo_p.is_dir():
            raise ConfigError(f"{path}: repo: {repo}: no such directory")
    else:
        repo_p = None

    raw_models = doc.get("models", [{"name": "ranker"}])
    if isinstance(raw_models, str):
        raw_models = [raw_models]
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(f"{path}: models: must be a non-empty list of model names or {{name, version}} maps")
    models = []
    for i, m in enumerate(raw_models):
        if isinstance(m, str):
            m = {"name": m}
        m = _section(m, _MODEL, f"{path}: models[{i}]")
        name, version = m.get("name"), m.get("version")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: models[{i}].name: required, a model name")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))):
            raise ConfigError(f"{path}: models[{i}].version: must be a string")
        models.append(ModelTarget(name, None if version is None else str(version)))

    p = _section(doc.get("payload"), _PAYLOAD, f"{path}: payload")
    ratio = _number(p.get("usage_ratio"), f"{path}: payload.usage_ratio", 0.2, positive=True)
    if ratio > 1:
        raise ConfigError(f"{path}: payload.usage_ratio: must be in (0, 1], got {ratio!r}")
    mix = p.get("mix", dict(REFERENCE_MIX))
    if not isinstance(mix, dict) or not mix or not all(k in KINDS for k in mix):
        raise ConfigError(f"{path}: payload.mix: must map feature kinds ({', '.join(KINDS)}) to weights")
    mix = {k: float(_number(v, f"{path}: payload.mix.{k}", 0.0, minimum=0)) for k, v in mix.items()}
    if sum(mix.values()) <= 0:
        raise ConfigError(f"{path}: payload.mix: weights must sum to > 0")
    payload = PayloadSpec(
        usage_ratio=float(ratio),
        candidates=_number(p.get("candidates"), f"{path}: payload.candidates", 256, integer=True, minimum=1),
        seed=_number(p.get("seed"), f"{path}: payload.seed", 0, integer=True, minimum=0),
        distinct=_number(p.get("distinct"), f"{path}: payload.distinct", 8, integer=True, minimum=1),
        mix=mix,
        profile=_profile(p.get("profile"), f"{path}: payload.profile"),
    )

    ld = _section(doc.get("load"), _LOAD, f"{path}: load")
    try:
        load = LoadSpec(
            mode=str(ld.get("mode", "open")),
            rate=float(_number(ld.get("rate"), f"{path}: load.rate", 50.0, positive=True)),
            concurrency=_number(ld.get("concurrency"), f"{path}: load.concurrency", 8, integer=True, minimum=1),
            duration_s=_number(ld.get("duration_s", 10.0), f"{path}: load.duration_s", 10.0, positive=True, optional=True),
            count=_number(ld.get("count"), f"{path}: load.count", None, integer=True, minimum=1, optional=True),
            warmup_s=float(_number(ld.get("warmup_s"), f"{path}: load.warmup_s", 2.0, minimum=0)),
            timeout_s=float(_number(ld.get("timeout_s"), f"{path}: load.timeout_s", 10.0, positive=True)),
            max_inflight=_number(ld.get("max_inflight"), f"{path}: load.max_inflight", 1024, integer=True, minimum=1),
        )
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: {exc}") from None

    scen = doc.get("scenarios", list(SCENARIOS))
    if isinstance(scen, str):
        scen = [s.strip() for s in scen.split(",")]
    if not isinstance(scen, list) or not scen:
        raise ConfigError(f"{path}: scenarios: must be a non-empty list from {', '.join(SCENARIOS)}")
    for s in scen:
        if s not in SCENARIOS:
            raise ConfigError(f"{path}: scenarios: unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    if len(set(scen)) != len(scen):
        raise ConfigError(f"{path}: scenarios: duplicate scenario")

    rates = doc.get("link_rates") or []
    if isinstance(rates, str):
        rates = [rates]
    if not isinstance(rates, list):
        raise ConfigError(f"{path}: link_rates: must be a list like [1gbit, 100mbit]")
    for r in rates:
        parse_rate(r, f"{path}: link_rates")

    leaf_url = doc.get("leaf_url")
    if leaf_url is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(leaf_url) if isinstance(leaf_url, str) else None
        if parts is None or parts.scheme != "http" or not parts.hostname or not parts.port or parts.path.strip("/"):
            raise ConfigError(f"{path}: leaf_url: must be http://host:port, got {leaf_url!r}")
        if repo_p is None:
            raise ConfigError(f"{path}: leaf_url: also set repo (the leaf's model repository, for the root's allowlists)")
    rt = _section(doc.get("root"), _ROOT, f"{path}: root")
    extra = rt.get("extra") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: root.extra: must be a mapping merged into each generated root config")
    return LoadtestConfig(
        path=path,
        out=Path(out) if Path(out).is_absolute() else Path.cwd() / out,
        repo=repo_p,
        models=tuple(models),
        payload=payload,
        load=load,
        scenarios=tuple(scen),
        link_rates=tuple(str(r) for r in rates),
        root_workers=_number(rt.get("workers"), f"{path}: root.workers", 1, integer=True, minimum=1),
        root_max_connections=_number(rt.get("max_connections"), f"{path}: root.max_connections", 64, integer=True, minimum=1),
        root_extra=extra,
        leaf_url=leaf_url,
        sample_rss_s=float(_number(doc.get("sample_rss_s"), f"{path}: sample_rss_s", 0.0, minimum=0)),
    )


def _profile(value: Any, where: str) -> str:
    if value is None:
        return "random"
    if value not in PROFILES:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(PROFILES)}")
    return value


def load_loadtest_config(path: str | os.PathLike[str]) -> LoadtestConfig:
    """Relative `out` and `repo` resolve against the current directory (configs are run from the project root)."""
    p = Path(path)
    return parse_loadtest_config(load_yaml(p), str(p), Path.cwd())
