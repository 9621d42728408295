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
from typing import Annotated, Any, Literal, Optional, Union
from urllib.parse import urlsplit

import msgspec

from trimmer.configschema import Count, Name, NonNegative, Positive, Section, convert
from trimmer.errors import ConfigError
from trimmer.overrides import load_yaml

from .payload import KINDS, PROFILES, REFERENCE_MIX
from .runner import LoadSpec
from .scenarios import SCENARIOS

_SCENARIO_NAMES = tuple(SCENARIOS)
# Literals built from the runtime tables (scenarios.py, payload.py): mypy sees plain strings.
Kind = Literal[KINDS]  # type: ignore[valid-type]
Profile = Literal[PROFILES]  # type: ignore[valid-type]
Scenario = Annotated[Literal[_SCENARIO_NAMES],  # type: ignore[valid-type]
                     msgspec.Meta(extra={"error": f"unknown scenario {{value!r}}; known: {', '.join(SCENARIOS)}"})]


def _default_models() -> list[str | ModelEntry]:
    return ["ranker"]


# ---------------------------------------------------------------- the file (schema: docs/schema/loadtest.json)
class ModelEntry(Section, frozen=True):
    """A target model (a bare name is short for {name: ...})."""

    name: Name  # a model in the repository
    version: Union[str, int, None] = None  # default: the highest in the repository


class PayloadFile(Section, frozen=True):
    """The generated requests (loadtest/payload.py)."""

    usage_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.2  # share of the features each model reads
    candidates: Count = 256  # size of the candidate dimension
    seed: Annotated[int, msgspec.Meta(ge=0)] = 0  # generator seed (the same seed gives the same bytes)
    distinct: Count = 8  # distinct request bodies cycled
    mix: Annotated[dict[Kind, NonNegative],
                   msgspec.Meta(min_length=1, extra_json_schema={"default": REFERENCE_MIX})] = \
        msgspec.field(default_factory=lambda: dict(REFERENCE_MIX))  # feature kind -> weight
    profile: Profile = "random"  # value distributions: random (incompressible) | realistic


class LoadFile(Section, frozen=True):
    """How requests are sent (loadtest/runner.py)."""

    # open (arrival rate) or closed (concurrency)
    mode: Annotated[Literal["open", "closed"], msgspec.Meta(extra={"error": "must be open or closed"})] = "open"
    rate: Positive = 50.0  # open loop: requests per second
    concurrency: Count = 8  # closed loop: workers
    duration_s: Optional[Positive] = 10.0  # null: bounded by count only
    count: Optional[Count] = None  # stop after this many measured requests
    warmup_s: NonNegative = 2.0  # unmeasured seconds first
    timeout_s: Positive = 10.0  # per request
    max_inflight: Count = 1024  # open loop safety bound


class RootSettings(Section, frozen=True):
    """The roots the matrix starts."""

    workers: Count = 1  # root processes
    max_connections: Count = 64  # per partition replica
    extra: dict[str, Any] = {}  # merged into every generated root config


class LoadtestFile(Section, frozen=True):
    """The load test's YAML config (configs/loadtest.yaml); docs/loadtest.md."""

    out: Name = "out/loadtest"  # report directory (relative: to the current directory)
    repo: Optional[Name] = None  # model repository; null = build the demo repository into <out>/models
    leaf_url: Optional[str] = None  # http://host:port of a running leaf to use instead of starting one (then set repo)
    models: Annotated[Union[Name, Annotated[list[Union[Name, ModelEntry]], msgspec.Meta(min_length=1)]],
                      msgspec.Meta(extra_json_schema={"default": ["ranker"]})] = msgspec.field(
                          default_factory=_default_models)
    payload: PayloadFile = msgspec.field(default_factory=PayloadFile)
    load: LoadFile = msgspec.field(default_factory=LoadFile)
    scenarios: Annotated[Union[str, Annotated[list[Scenario], msgspec.Meta(min_length=1)]],  # or "a,b,c"
                         msgspec.Meta(extra_json_schema={"default": list(SCENARIOS)})] = msgspec.field(
                             default_factory=lambda: list(SCENARIOS))
    link_rates: Union[str, list[str]] = []  # e.g. [1gbit, 100mbit]: repeat the matrix behind a shaped veth (needs root)
    root: RootSettings = msgspec.field(default_factory=RootSettings)
    sample_rss_s: NonNegative = 0.0  # > 0: sample root and leaf RSS every N seconds (soak)


# ---------------------------------------------------------------- what the load test reads
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


def _scenarios(value: str | list[str], path: str) -> tuple[str, ...]:
    scen = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
    for s in scen:
        if s not in SCENARIOS:
            raise ConfigError(f"{path}: scenarios: unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    if len(set(scen)) != len(scen):
        raise ConfigError(f"{path}: scenarios: duplicate scenario")
    return tuple(scen)


def _leaf_url(url: str | None, repo: Path | None, path: str) -> None:
    if url is None:
        return
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or not port or parts.path.strip("/"):
        raise ConfigError(f"{path}: leaf_url: must be http://host:port, got {url!r}")
    if repo is None:
        raise ConfigError(f"{path}: leaf_url: also set repo (the leaf's model repository, for the root's allowlists)")


def parse_loadtest_config(doc: Any, path: str = "loadtest.yaml", base: Path | None = None) -> LoadtestConfig:
    base = base if base is not None else Path.cwd()
    f: LoadtestFile = convert(doc, LoadtestFile, path)
    repo = None
    if f.repo is not None:
        repo = Path(os.path.expanduser(f.repo))
        repo = repo if repo.is_absolute() else base / repo
        if not repo.is_dir():
            raise ConfigError(f"{path}: repo: {f.repo}: no such directory")
    models = [ModelEntry(name=m) if isinstance(m, str) else m
              for m in ([f.models] if isinstance(f.models, str) else f.models)]
    p = f.payload
    if sum(p.mix.values()) <= 0:
        raise ConfigError(f"{path}: payload.mix: weights must sum to > 0")
    ld = f.load
    try:
        load = LoadSpec(mode=ld.mode, rate=ld.rate, concurrency=ld.concurrency, duration_s=ld.duration_s,
                        count=ld.count, warmup_s=ld.warmup_s, timeout_s=ld.timeout_s, max_inflight=ld.max_inflight)
    except ValueError as exc:  # LoadSpec's own cross-field checks (duration_s or count)
        raise ConfigError(f"{path}: {exc}") from None
    rates = [f.link_rates] if isinstance(f.link_rates, str) else f.link_rates
    for r in rates:
        parse_rate(r, f"{path}: link_rates")
    _leaf_url(f.leaf_url, repo, path)
    return LoadtestConfig(
        path=path,
        out=Path(f.out) if Path(f.out).is_absolute() else Path.cwd() / f.out,
        repo=repo,
        models=tuple(ModelTarget(m.name, None if m.version is None else str(m.version)) for m in models),
        payload=PayloadSpec(p.usage_ratio, p.candidates, p.seed, p.distinct, dict(p.mix), p.profile),
        load=load,
        scenarios=_scenarios(f.scenarios, path),
        link_rates=tuple(rates),
        root_workers=f.root.workers,
        root_max_connections=f.root.max_connections,
        root_extra=f.root.extra,
        leaf_url=f.leaf_url,
        sample_rss_s=f.sample_rss_s,
    )


def load_loadtest_config(path: str | os.PathLike[str]) -> LoadtestConfig:
    """Relative `out` and `repo` resolve against the current directory (configs are run from the project root)."""
    p = Path(path)
    return parse_loadtest_config(load_yaml(p), str(p), Path.cwd())
