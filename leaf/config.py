"""Leaf configuration: YAML file (configs/leaf.yaml) plus command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from trimmer.edge import EdgeLimits
from trimmer.errors import ConfigError
from trimmer.overrides import check_section, load_yaml


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_batch_rows: int = 16384


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


_TOP = {f.name for f in fields(LeafConfig)} - {"compile_models"}
_BATCH = {f.name for f in fields(Batching)}


def _batching(raw: Any, where: str, base: Batching) -> Batching:
    if not isinstance(raw, dict):  # stricter than check_section: a null batching section is a mistake here
        raise ConfigError(f"{where} must be a mapping")
    check_section(raw, _BATCH, where)
    out = base
    for key, value in raw.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < (0 if key == "max_queue_delay_ms" else 1):
            raise ConfigError(f"{where}.{key} must be a {'non-negative' if key == 'max_queue_delay_ms' else 'positive'} number")
        out = replace(out, **{key: type(getattr(base, key))(value)})
    return out


def load_config(path: str | None) -> LeafConfig:
    if path is None:
        return LeafConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    raw = check_section(load_yaml(p), _TOP, str(p))
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key == "repo":
            repo = Path(str(value))
            kw["repo"] = repo if repo.is_absolute() else (p.parent / repo).resolve()  # relative to the config file
        elif key == "batching":
            kw["batching"] = _batching(value, f"{p}: batching", Batching())
        elif key == "models":
            if not isinstance(value, dict):
                raise ConfigError(f"{p}: models must map model name to batching settings")
            kw["models"] = value  # resolved below, after the global batching is known
        else:
            want = type(getattr(LeafConfig(), key))
            if want is bool and not isinstance(value, bool) or want in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))) \
                    or want is str and not isinstance(value, str):
                raise ConfigError(f"{p}: {key} must be a {want.__name__}")
            kw[key] = want(value)
    if kw.get("drain_timeout_s", 1.0) <= 0:
        raise ConfigError(f"{p}: drain_timeout_s must be a positive number of seconds")
    try:  # the client limits' own checks (> 0), with the file's name
        EdgeLimits(*(kw.get(k, getattr(LeafConfig, k)) for k in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s", "max_connections",
                                                                      "body_min_rate")))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    base = kw.get("batching", Batching())
    compile_models: dict[str, bool] = {}
    models: dict[str, Batching] = {}
    for m, v in kw.get("models", {}).items():
        if isinstance(v, dict) and "compile" in v:
            v = dict(v)
            flag = v.pop("compile")
            if not isinstance(flag, bool):
                raise ConfigError(f"{p}: models.{m}.compile must be true or false")
            compile_models[str(m)] = flag
        models[str(m)] = _batching(v, f"{p}: models.{m}", base)
    kw["models"], kw["compile_models"] = models, compile_models
    return LeafConfig(**kw)
