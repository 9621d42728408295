"""Leaf configuration: YAML file (configs/leaf.yaml) plus command-line overrides.

`LeafFile` is the file's schema (msgspec, trimmer/configschema.py; JSON Schema: docs/schema/leaf.json);
`LeafConfig` is what the worker reads, with the per-model sections resolved against `batching`.
The listener is `listen: {host, port}`, the shape the root uses; the older flat `host:` / `port:` still
load, with a one-line deprecation warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import msgspec

from trimmer.configschema import Count, Host, Name, NonNegative, Port, Positive, Section, convert
from trimmer.errors import ConfigError
from trimmer.overrides import load_yaml

log = logging.getLogger("leaf")


class Batching(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Dynamic batching, per model version: requests concatenated along the candidate axis."""

    max_batch_size: Count = 32  # requests per batch; 1 disables batching
    max_queue_delay_ms: NonNegative = 2.0  # longest a request waits for others to fill its batch
    max_batch_rows: Count = 16384  # cap on candidate rows per batch (one oversized request still runs alone)


# ---------------------------------------------------------------- the file (schema: docs/schema/leaf.json)
class Listen(Section, frozen=True):
    """The service listener (the root's `listen:` has the same shape)."""

    host: Host = "127.0.0.1"
    port: Port = 8001


class ModelSettings(Section, frozen=True):
    """Per-model overrides of `batching` (unset keys inherit from it), plus `compile`."""

    max_batch_size: Optional[Count] = None  # default: batching.max_batch_size
    max_queue_delay_ms: Optional[NonNegative] = None  # default: batching.max_queue_delay_ms
    max_batch_rows: Optional[Count] = None  # default: batching.max_batch_rows
    compile: Optional[bool] = None  # None: the top-level `compile`


class LeafFile(Section, frozen=True):
    """The leaf worker's YAML config (configs/leaf.yaml); docs/leaf.md. Relative paths: against this file."""

    repo: Optional[Name] = None  # <repo>/<model>/<version>/model.pt | model.pt2
    build_demo_if_missing: bool = False  # a missing repo is filled with the demo models
    listen: Optional[Listen] = None  # default 127.0.0.1:8001
    host: Optional[Host] = None  # deprecated: listen.host
    port: Optional[Port] = None  # deprecated: listen.port
    device: Name = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0 = torch's default
    batching: Batching = msgspec.field(default_factory=Batching)
    models: dict[str, ModelSettings] = {}  # model name -> batching overrides and compile
    compile: bool = False  # torch.compile every model (leaf/compile.py)
    max_body_bytes: Count = 64 * 1024 * 1024  # request body limit, also after decompression (413 above it)
    header_timeout_s: Positive = 10.0  # client limits (trimmer/edge.py): head within this
    body_timeout_s: Positive = 30.0  # each window this long must bring body_min_rate bytes/s
    keepalive_timeout_s: Positive = 75.0  # idle keep-alive connections closed after this
    max_connections: Count = 4096  # client connections open at once; more are closed at once
    body_min_rate: Annotated[int, msgspec.Meta(ge=0)] = 1024  # bytes/s; 0: only a full stall closes
    rescan_interval_s: Positive = 2.0  # periodic repository rescan, a fallback to file events
    drain_timeout_s: Positive = 30.0  # bound on finishing a replaced/removed version's queued jobs, and on SIGTERM
    watch: bool = True  # pick up new/changed version directories via file events
    feature_series_limit: Count = 20000  # cap on per-feature metric series
    log_level: Name = "INFO"  # DEBUG, INFO, WARNING, ERROR


# ---------------------------------------------------------------- what the worker reads
@dataclass(frozen=True)
class LeafConfig:
    repo: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8001
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = 0  # 0 = torch's default
    batching: Batching = field(default_factory=Batching)
    models: dict[str, Batching] = field(default_factory=dict)  # per-model batching overrides
    compile: bool = False  # torch.compile every model (leaf/compile.py) ...
    compile_models: dict[str, bool] = field(default_factory=dict)  # ... or per model: models.<name>.compile
    max_body_bytes: int = 64 * 1024 * 1024
    # Client limits (trimmer/edge.py): head within header_timeout_s, no body pause over body_timeout_s,
    # idle keep-alive connections closed after keepalive_timeout_s, at most max_connections open.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 4096
    body_min_rate: int = 1024  # bytes/s each body_timeout_s window must average
    rescan_interval_s: float = 2.0
    drain_timeout_s: float = 30.0  # bound on finishing a replaced/removed version's queued jobs, and on SIGTERM
    watch: bool = True
    feature_series_limit: int = 20000
    build_demo_if_missing: bool = False
    log_level: str = "INFO"

    def batching_for(self, model: str) -> Batching:
        return self.models.get(model, self.batching)

    def compile_for(self, model: str) -> bool:
        return self.compile_models.get(model, self.compile)


def _listen(f: LeafFile, where: str) -> Listen:
    """`listen:`, or the deprecated flat host/port (one warning line); both at once is a mistake."""
    if f.host is None and f.port is None:
        return f.listen or Listen()
    if f.listen is not None:
        raise ConfigError(f"{where}: host/port and listen: both set; keep listen: {{host, port}}")
    log.warning(
        "%s: top-level host/port are deprecated; write listen: {host: ..., port: ...} (as the root does)", where)
    default = Listen()
    return Listen(host=f.host or default.host, port=default.port if f.port is None else f.port)


def _models(f: LeafFile) -> tuple[dict[str, Batching], dict[str, bool]]:
    """Each model's batching (unset keys from the top-level `batching`) and its own compile flag, if any."""
    models: dict[str, Batching] = {}
    compile_models: dict[str, bool] = {}
    for name, m in f.models.items():
        overrides = {k: getattr(m, k) for k in Batching.__struct_fields__ if getattr(m, k) is not None}
        models[name] = msgspec.structs.replace(f.batching, **overrides)
        if m.compile is not None:
            compile_models[name] = m.compile
    return models, compile_models


def load_config(path: str | None) -> LeafConfig:
    if path is None:
        return LeafConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    f: LeafFile = convert(load_yaml(p), LeafFile, str(p))
    listen = _listen(f, str(p))
    models, compile_models = _models(f)
    repo = None if f.repo is None else Path(f.repo)
    return LeafConfig(
        repo=None if repo is None else repo if repo.is_absolute()
        else (p.parent / repo).resolve(),  # relative to the config file
        host=listen.host, port=listen.port, device=f.device, torch_threads=f.torch_threads, batching=f.batching,
        models=models, compile=f.compile, compile_models=compile_models, max_body_bytes=f.max_body_bytes,
        header_timeout_s=f.header_timeout_s,
        body_timeout_s=f.body_timeout_s, keepalive_timeout_s=f.keepalive_timeout_s, max_connections=f.max_connections,
        body_min_rate=f.body_min_rate, rescan_interval_s=f.rescan_interval_s, drain_timeout_s=f.drain_timeout_s,
        watch=f.watch, feature_series_limit=f.feature_series_limit, build_demo_if_missing=f.build_demo_if_missing,
        log_level=f.log_level,
    )
