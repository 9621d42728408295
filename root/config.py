"""The root's YAML config: parsed once at start, every defect a one-line ConfigError.

Validation is strict (unknown keys, bad URLs, missing files, dangling
partition names) because a typo in a routing config should stop the service
at start, not misroute traffic later. See configs/root.yaml for a commented
example and docs/root.md for the schema.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from trimmer.errors import ConfigError
from trimmer.names import valid_name
from trimmer.overrides import check_section as _section
from trimmer.overrides import load_yaml

from .pipeline_config import PipelineConfig, parse_pipelines

PROTOCOLS = ("native", "oip")
COMPRESSIONS = ("none", "lz4", "zstd")
BALANCES = ("least_inflight", "round_robin")
UNKNOWN_POLICIES = ("reject", "passthrough")
DEFAULT_ADMIN_PORT = 9901  # Envoy's admin port: loopback only unless admin.host says otherwise

_TOP = {"listen", "admin", "workers", "bundles", "repositories", "overrides", "watch", "partitions", "models",
        "unknown_models", "timeouts", "limits", "deadline_header", "audit_sample_rate", "audit_max_concurrent",
        "audit_tolerance", "pipelines", "capture"}
_CAPTURE = {"path", "sample_rate", "max_bytes"}
_LISTEN = {"host", "port"}
_ADMIN = {"enabled", "host", "port", "on_service_port"}
_PARTITION = {"replicas", "protocol", "compression", "balance", "health_path", "max_connections",
              "allowlists_from_metadata", "version_policy", "versioned_paths"}
_METADATA = {"models", "refresh_s"}
_MODEL = {"partition", "default_version", "version_policy"}
VERSION_POLICIES = ("latest", "explicit")
_UNKNOWN = {"policy", "partition"}
_TIMEOUTS = {"connect_s", "request_s", "drain_s", "health_interval_s", "client_header_s", "client_body_s", "client_body_min_rate",
             "client_keepalive_s"}
_LIMITS = {"max_body_bytes", "max_connections", "max_inflight_body_bytes", "max_fanout_targets"}


@dataclass(frozen=True)
class MetadataAllowlists:
    """Fetch allowlists from the upstream's OIP `GET /v2/models/{name}` inputs (models without archives)."""

    models: tuple[str, ...]
    refresh_s: float = 60.0


@dataclass(frozen=True)
class PartitionConfig:
    name: str
    replicas: tuple[str, ...]
    protocol: str = "native"
    compression: str = "none"
    balance: str = "least_inflight"
    health_path: str = "/v2/health/ready"
    max_connections: int = 64
    metadata: MetadataAllowlists | None = None
    version_policy: str = "latest"  # a request without a version: the highest known version, or `explicit`
    versioned_paths: bool = True  # name a configured default version in upstream paths (off for unversioned servers)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    partition: str
    default_version: str | None = None
    version_policy: str | None = None  # None: the partition's


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 1.0
    request_s: float = 5.0
    drain_s: float = 10.0
    health_interval_s: float = 2.0
    # Client side (trimmer/edge.py), like nginx's client_header_timeout / client_body_timeout / keepalive_timeout.
    client_header_s: float = 10.0  # connection start or first byte of a request head -> whole head
    client_body_s: float = 30.0  # each window this long must bring client_body_min_rate bytes/s of body (0 bytes: stalled)
    client_body_min_rate: int = 1024  # bytes/s; 0: only a full stall closes
    client_keepalive_s: float = 75.0  # idle keep-alive connection


@dataclass(frozen=True)
class RootConfig:
    path: str
    host: str = "127.0.0.1"
    port: int = 8080
    admin_enabled: bool = True
    admin_host: str | None = "127.0.0.1"  # None: admin endpoints on the main listener (admin.on_service_port)
    admin_port: int | None = DEFAULT_ADMIN_PORT
    workers: int = 1
    bundles: tuple[Path, ...] = ()
    repositories: tuple[Path, ...] = ()
    overrides: Path | None = None
    watch: bool = True
    partitions: dict[str, PartitionConfig] = field(default_factory=dict)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    unknown_policy: str = "reject"
    unknown_partition: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_body_bytes: int = 64 * 1024 * 1024
    max_fanout_targets: int = 64  # models one /v1/score request may list; more -> 400
    capture_path: Path | None = None  # a sample of requests written here for `trimmer loadtest --replay` (trimmer/capture.py)
    capture_sample_rate: float = 0.001
    capture_max_bytes: int = 256 * 1024 * 1024
    max_connections: int = 4096  # concurrent client connections per process; more are closed at once and counted
    max_inflight_body_bytes: int = 4 * 64 * 1024 * 1024  # request body bytes held per process; past it 503 + Retry-After
    deadline_header: str = "X-Deadline-Ms"
    audit_sample_rate: float = 0.0  # fraction of trimmed requests also sent untrimmed and compared (root/audit.py)
    audit_max_concurrent: int = 8  # audits in flight at once; more are dropped and counted
    audit_tolerance: float = 1e-5  # float outputs within this relative difference are near matches, not mismatches
    pipelines: dict[str, PipelineConfig] = field(default_factory=dict)  # multi-stage requests (root/pipeline_config.py)

    def version_policies(self) -> tuple[dict[str, str], str]:
        """(model -> policy for configured models, policy for the rest): a model's own, else its partition's."""
        per = {m: mc.version_policy or self.partitions[mc.partition].version_policy for m, mc in self.models.items()}
        rest = self.partitions[self.unknown_partition].version_policy if self.unknown_partition else "latest"
        return per, rest

    def partition_for(self, model: str) -> str | None:
        """The partition a model routes to, or None when the unknown-model policy rejects it."""
        mc = self.models.get(model)
        if mc is not None:
            return mc.partition
        return self.unknown_partition if self.unknown_policy == "passthrough" else None


def _num(value: Any, where: str, default: float, minimum: float = 0.0, integer: bool = False) -> Any:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{where}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum or (not integer and value <= 0 and minimum == 0.0):
        raise ConfigError(f"{where}: must be {'>=' if integer else '>'} {minimum}, got {value!r}")
    return value


def _bool(value: Any, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    return value


def _str(value: Any, where: str, choices: tuple[str, ...] | None = None, default: str | None = None) -> str | None:
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a non-empty string, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _port(value: Any, where: str, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{where}: must be a port number 0..65535, got {value!r}")
    return value


def check_url(url: Any, where: str) -> str:
    """A replica base URL: http(s)://host[:port][/prefix], no query or fragment; returned without trailing slash."""
    if not isinstance(url, str):
        raise ConfigError(f"{where}: must be a URL string, got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: bad URL {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: bad URL {url!r}; expected http://host:port")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: bad URL {url!r}; a base URL has no query or fragment")
    del port
    return url.rstrip("/")


def _paths(value: Any, where: str, base: Path, kind: str) -> tuple[Path, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: must be a list of paths")
    out = []
    for v in value:
        p = Path(os.path.expandvars(os.path.expanduser(v)))
        p = (p if p.is_absolute() else (base / p)).resolve()
        if kind == "file" and not p.is_file():
            raise ConfigError(f"{where}: {v}: no such file")
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{where}: {v}: no such directory")
        out.append(p)
    return tuple(out)


def _partition(name: str, raw: Any) -> PartitionConfig:
    w = f"partitions.{name}"
    raw = _section(raw, _PARTITION, w)
    replicas = raw.get("replicas")
    if isinstance(replicas, str):
        replicas = [replicas]
    if not isinstance(replicas, list) or not replicas:
        raise ConfigError(f"{w}.replicas: must be a non-empty list of base URLs")
    urls = tuple(check_url(u, f"{w}.replicas[{i}]") for i, u in enumerate(replicas))
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{w}.replicas: duplicate URL")
    health = _str(raw.get("health_path"), f"{w}.health_path", default="/v2/health/ready")
    if not health.startswith("/"):
        raise ConfigError(f"{w}.health_path: must start with '/', got {health!r}")
    meta = None
    if raw.get("allowlists_from_metadata") is not None:
        m = raw["allowlists_from_metadata"]
        if isinstance(m, list):
            m = {"models": m}
        m = _section(m, _METADATA, f"{w}.allowlists_from_metadata")
        models = m.get("models")
        if not isinstance(models, list) or not models or not all(isinstance(x, str) and x for x in models):
            raise ConfigError(f"{w}.allowlists_from_metadata.models: must be a non-empty list of model names")
        meta = MetadataAllowlists(tuple(models), float(_num(m.get("refresh_s"), f"{w}.allowlists_from_metadata.refresh_s", 60.0)))
    return PartitionConfig(
        name=name,
        replicas=urls,
        protocol=_str(raw.get("protocol"), f"{w}.protocol", PROTOCOLS, "native"),
        compression=_str(raw.get("compression"), f"{w}.compression", COMPRESSIONS, "none"),
        balance=_str(raw.get("balance"), f"{w}.balance", BALANCES, "least_inflight"),
        health_path=health,
        max_connections=_num(raw.get("max_connections"), f"{w}.max_connections", 64, 1, integer=True),
        metadata=meta,
        version_policy=_str(raw.get("version_policy"), f"{w}.version_policy", VERSION_POLICIES, "latest"),
        versioned_paths=_bool(raw.get("versioned_paths"), f"{w}.versioned_paths", True),
    )


def parse_config(doc: Any, path: str = "root.yaml", base: Path | None = None) -> RootConfig:
    base = base if base is not None else Path(path).absolute().parent
    doc = _section(doc, _TOP, path)
    listen = _section(doc.get("listen"), _LISTEN, f"{path}: listen")
    admin = _section(doc.get("admin"), _ADMIN, f"{path}: admin")
    timeouts = _section(doc.get("timeouts"), _TIMEOUTS, f"{path}: timeouts")
    limits = _section(doc.get("limits"), _LIMITS, f"{path}: limits")
    unknown = _section(doc.get("unknown_models"), _UNKNOWN, f"{path}: unknown_models")

    raw_parts = doc.get("partitions")
    if not isinstance(raw_parts, dict) or not raw_parts:
        raise ConfigError(f"{path}: partitions: must be a non-empty mapping of partition name to settings")
    try:
        partitions = {str(n): _partition(str(n), r) for n, r in raw_parts.items()}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None

    raw_models = doc.get("models") or {}
    if not isinstance(raw_models, dict):
        raise ConfigError(f"{path}: models: must be a mapping of model name to settings")
    models: dict[str, ModelConfig] = {}
    for name, raw in raw_models.items():
        w = f"{path}: models.{name}"
        if not valid_name(str(name)):
            raise ConfigError(f"{w}: invalid model name; use 1-128 characters from A-Z a-z 0-9 _ . -, not starting with '.' or '-'")
        if isinstance(raw, str):
            raw = {"partition": raw}
        raw = _section(raw, _MODEL, w)
        part = _str(raw.get("partition"), f"{w}.partition")
        if part is None:
            raise ConfigError(f"{w}.partition: required")
        if part not in partitions:
            raise ConfigError(f"{w}.partition: no partition named {part!r}; known: {', '.join(sorted(partitions))}")
        dv = raw.get("default_version")
        if dv is not None and (isinstance(dv, bool) or not isinstance(dv, (str, int)) or not valid_name(str(dv))):
            raise ConfigError(f"{w}.default_version: must be a version string (A-Z a-z 0-9 _ . -), got {dv!r}")
        models[str(name)] = ModelConfig(str(name), part, None if dv is None else str(dv),
                                        _str(raw.get("version_policy"), f"{w}.version_policy", VERSION_POLICIES))

    policy = _str(unknown.get("policy"), f"{path}: unknown_models.policy", UNKNOWN_POLICIES, "reject")
    upart = _str(unknown.get("partition"), f"{path}: unknown_models.partition")
    if policy == "passthrough":
        if upart is None:
            raise ConfigError(f"{path}: unknown_models.partition: required when policy is passthrough")
        if upart not in partitions:
            raise ConfigError(f"{path}: unknown_models.partition: no partition named {upart!r}")
    for pc in partitions.values():
        if pc.metadata:
            for m in pc.metadata.models:
                owner = models.get(m)
                if owner is not None and owner.partition != pc.name:
                    raise ConfigError(f"{path}: partitions.{pc.name}.allowlists_from_metadata: model {m!r} routes to partition {owner.partition!r}")

    admin_enabled = admin.get("enabled", True)
    if not isinstance(admin_enabled, bool):
        raise ConfigError(f"{path}: admin.enabled: must be true or false")
    on_service_port = admin.get("on_service_port", False)
    if not isinstance(on_service_port, bool):
        raise ConfigError(f"{path}: admin.on_service_port: must be true or false")
    if on_service_port and ("host" in admin or "port" in admin):
        raise ConfigError(f"{path}: admin: on_service_port: true serves /metrics and /admin/* on listen; drop admin.host and admin.port")
    admin_port: int | None = None
    admin_host: str | None = None
    if not on_service_port:
        admin_port = _port(admin.get("port"), f"{path}: admin.port", DEFAULT_ADMIN_PORT)
        admin_host = _str(admin.get("host"), f"{path}: admin.host", default="127.0.0.1")
    watch = doc.get("watch", True)
    if not isinstance(watch, bool):
        raise ConfigError(f"{path}: watch: must be true or false")
    audit_rate = doc.get("audit_sample_rate", 0.0)
    if isinstance(audit_rate, bool) or not isinstance(audit_rate, (int, float)) or not 0.0 <= audit_rate <= 1.0:
        raise ConfigError(f"{path}: audit_sample_rate: must be a number from 0 to 1, got {audit_rate!r}")
    audit_tol = doc.get("audit_tolerance", 1e-5)
    if isinstance(audit_tol, bool) or not isinstance(audit_tol, (int, float)) or not 0.0 <= audit_tol < 1.0:
        raise ConfigError(f"{path}: audit_tolerance: must be a number >= 0 and < 1 (0: bit for bit), got {audit_tol!r}")
    capture = _section(doc.get("capture"), _CAPTURE, f"{path}: capture")
    capture_rate = capture.get("sample_rate", 0.001)
    if isinstance(capture_rate, bool) or not isinstance(capture_rate, (int, float)) or not 0.0 < capture_rate <= 1.0:
        raise ConfigError(f"{path}: capture.sample_rate: must be a number in (0, 1], got {capture_rate!r}")
    capture_path = _str(capture.get("path"), f"{path}: capture.path")
    if capture and capture_path is None:
        raise ConfigError(f"{path}: capture.path: required to capture (a file to append to)")
    overrides = _paths(doc.get("overrides"), f"{path}: overrides", base, "file")
    max_body = _num(limits.get("max_body_bytes"), f"{path}: limits.max_body_bytes", 64 * 1024 * 1024, 1, integer=True)
    inflight = _num(limits.get("max_inflight_body_bytes"), f"{path}: limits.max_inflight_body_bytes", 4 * max_body, 1, integer=True)
    if inflight < max_body:
        raise ConfigError(f"{path}: limits.max_inflight_body_bytes ({inflight}) must be >= limits.max_body_bytes ({max_body}): "
                          "one largest body must fit")
    if len(overrides) > 1:
        raise ConfigError(f"{path}: overrides: one file, not a list")

    return RootConfig(
        path=path,
        host=_str(listen.get("host"), f"{path}: listen.host", default="127.0.0.1"),
        port=_port(listen.get("port"), f"{path}: listen.port", 8080),
        admin_enabled=admin_enabled,
        admin_host=admin_host,
        admin_port=admin_port,
        workers=_num(doc.get("workers"), f"{path}: workers", 1, 1, integer=True),
        bundles=_paths(doc.get("bundles"), f"{path}: bundles", base, "file"),
        repositories=_paths(doc.get("repositories"), f"{path}: repositories", base, "dir"),
        overrides=overrides[0] if overrides else None,
        watch=watch,
        partitions=partitions,
        models=models,
        unknown_policy=policy,
        unknown_partition=upart if policy == "passthrough" else None,
        timeouts=Timeouts(
            connect_s=float(_num(timeouts.get("connect_s"), f"{path}: timeouts.connect_s", 1.0)),
            request_s=float(_num(timeouts.get("request_s"), f"{path}: timeouts.request_s", 5.0)),
            drain_s=float(_num(timeouts.get("drain_s"), f"{path}: timeouts.drain_s", 10.0)),
            health_interval_s=float(_num(timeouts.get("health_interval_s"), f"{path}: timeouts.health_interval_s", 2.0)),
            client_header_s=float(_num(timeouts.get("client_header_s"), f"{path}: timeouts.client_header_s", 10.0)),
            client_body_s=float(_num(timeouts.get("client_body_s"), f"{path}: timeouts.client_body_s", 30.0)),
            client_body_min_rate=_num(timeouts.get("client_body_min_rate"), f"{path}: timeouts.client_body_min_rate", 1024, 0, integer=True),
            client_keepalive_s=float(_num(timeouts.get("client_keepalive_s"), f"{path}: timeouts.client_keepalive_s", 75.0)),
        ),
        max_fanout_targets=_num(limits.get("max_fanout_targets"), f"{path}: limits.max_fanout_targets", 64, 1, integer=True),
        capture_path=(base / capture_path) if capture_path is not None else None,
        capture_sample_rate=float(capture_rate),
        capture_max_bytes=_num(capture.get("max_bytes"), f"{path}: capture.max_bytes", 256 * 1024 * 1024, 1, integer=True),
        max_body_bytes=max_body,
        max_connections=_num(limits.get("max_connections"), f"{path}: limits.max_connections", 4096, 1, integer=True),
        max_inflight_body_bytes=inflight,
        deadline_header=_str(doc.get("deadline_header"), f"{path}: deadline_header", default="X-Deadline-Ms"),
        audit_sample_rate=float(audit_rate),
        audit_tolerance=float(audit_tol),
        audit_max_concurrent=_num(doc.get("audit_max_concurrent"), f"{path}: audit_max_concurrent", 8, 1, integer=True),
        pipelines=parse_pipelines(doc.get("pipelines"), path, lambda m: models[m].partition if m in models else upart if policy == "passthrough" else None,
                                  lambda p: partitions[p].protocol),
    )


def load_config(path: str | os.PathLike[str]) -> RootConfig:
    """Relative paths inside the file resolve against the file's own directory."""
    p = Path(path)
    return parse_config(load_yaml(p), str(p), p.absolute().parent)


__all__ = ["RootConfig", "PartitionConfig", "ModelConfig", "Timeouts", "MetadataAllowlists", "load_config", "parse_config",
           "check_url", "PROTOCOLS", "COMPRESSIONS", "BALANCES"]
