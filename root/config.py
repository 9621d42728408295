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
from typing import Annotated, Any, Literal, Optional, Union, get_args
from urllib.parse import urlsplit

import msgspec

from trimmer.configschema import Count, Host, Name, Port, Positive, Section, convert
from trimmer.errors import ConfigError
from trimmer.names import valid_name
from trimmer.overrides import load_yaml

from .pipeline_config import PipelineConfig, PipelineSpec, build_pipelines

Protocol = Literal["native", "oip"]
Compression = Literal["none", "lz4", "zstd"]
Balance = Literal["least_inflight", "round_robin"]
UnknownPolicy = Literal["reject", "passthrough"]
VersionPolicy = Literal["latest", "explicit"]
PROTOCOLS, COMPRESSIONS, BALANCES = get_args(Protocol), get_args(Compression), get_args(Balance)
UNKNOWN_POLICIES, VERSION_POLICIES = get_args(UnknownPolicy), get_args(VersionPolicy)
DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_ADMIN_PORT = 9901  # Envoy's admin port: loopback only unless admin.host says otherwise
MiB = 1024 * 1024

Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
Paths = Union[Name, list[Name]]  # one path or a list; relative to the config file


# ---------------------------------------------------------------- the file (schema: docs/schema/root.json)
class Listen(Section, frozen=True):
    """The service listener (the leaf's `listen:` has the same shape)."""

    host: Host = "127.0.0.1"  # loopback by default; 0.0.0.0 to serve other hosts
    port: Port = 8080


class Admin(Section, frozen=True):
    """/metrics and /admin/*: their own loopback listener by default."""

    enabled: bool = True  # false: no /metrics or /admin/* at all
    host: Optional[Host] = None  # default 127.0.0.1 (DEFAULT_ADMIN_HOST)
    port: Optional[Port] = None  # default 9901 (DEFAULT_ADMIN_PORT)
    on_service_port: bool = False  # serve them on `listen` instead (then no host/port here)


class MetadataSpec(Section, frozen=True):
    """Allowlists from the upstream's OIP `GET /v2/models/{name}` inputs, for models without archives."""

    models: Annotated[list[Name], msgspec.Meta(min_length=1)]  # models whose OIP metadata `inputs` are their allowlists
    refresh_s: Positive = 60.0  # seconds between refreshes


class PartitionSpec(Section, frozen=True):
    """A pool of interchangeable upstream replicas."""

    replicas: Union[str, Annotated[list[str], msgspec.Meta(min_length=1)]]  # base URLs http(s)://host:port[/prefix]
    protocol: Protocol = "native"  # native: our leaf (/v1 and /v2 routes); oip: any OIP v2 server (/v2 only)
    compression: Compression = "none"  # request body compression to the replicas (Content-Encoding)
    balance: Balance = "least_inflight"  # how a replica is picked
    # GET every timeouts.health_interval_s; 200 = up
    health_path: Annotated[str, msgspec.Meta(pattern="^/", extra={"error": "must start with '/'"})] = "/v2/health/ready"
    max_connections: Count = 64  # pooled connections per replica
    # model names, or {models, refresh_s}: allowlists from GET /v2/models/{name}
    allowlists_from_metadata: Union[Annotated[list[Name], msgspec.Meta(min_length=1)], MetadataSpec, None] = None
    version_policy: VersionPolicy = "latest"  # a request without a version: the highest known, or `explicit`
    versioned_paths: bool = True  # name a configured default version in upstream paths (off for unversioned servers)


class ModelSpec(Section, frozen=True):
    """Where one model routes (`models: {name: partition}` is short for `{name: {partition: ...}}`)."""

    partition: Name  # a key of partitions
    default_version: Union[str, int, None] = None  # the version a request without one gets
    version_policy: Optional[VersionPolicy] = None  # None: the partition's


class UnknownModels(Section, frozen=True):
    """Models not under `models`: rejected (404), or sent untrimmed-by-name to one partition."""

    policy: UnknownPolicy = "reject"  # reject: 404; passthrough: forward to `partition`
    partition: Optional[Name] = None  # required when policy is passthrough


class Timeouts(Section, frozen=True):
    """Upstream and client-side timeouts, seconds (client side: trimmer/edge.py, like nginx's)."""

    connect_s: Positive = 1.0  # TCP connect to a replica
    request_s: Positive = 5.0  # whole upstream round trip; expiry answers 504
    drain_s: Positive = 10.0  # on SIGTERM: bound on waiting for in-flight requests
    health_interval_s: Positive = 2.0  # replica health checks
    client_header_s: Positive = 10.0  # connection start or first byte of a request head -> whole head
    # each window this long must bring client_body_min_rate bytes/s of body (0 bytes: stalled)
    client_body_s: Positive = 30.0
    client_body_min_rate: Annotated[int, msgspec.Meta(ge=0)] = 1024  # bytes/s; 0: only a full stall closes
    client_keepalive_s: Positive = 75.0  # idle keep-alive connection


class Limits(Section, frozen=True):
    """Per-process bounds on what clients may send."""

    max_body_bytes: Count = 64 * MiB  # larger request bodies (also after decompression) get 413
    max_connections: Count = 4096  # concurrent client connections; more are closed at once and counted
    max_inflight_body_bytes: Optional[Count] = None  # default 4 x max_body_bytes; past it 503 + Retry-After
    # declared body bytes the fast listener receives at once; a body past it waits (reading paused: TCP backpressure)
    # until one completes, up to timeouts.client_body_s, then 503 + Retry-After; a body alone is always received
    max_receiving_body_bytes: Count = 8 * MiB
    max_fanout_targets: Count = 64  # models one /v1/score request may list; more -> 400


class Capture(Section, frozen=True):
    """A sample of scoring requests appended to a file, for `trimmer loadtest --replay` (trimmer/capture.py)."""

    path: Name  # relative to the config file
    sample_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.001  # share of requests captured, (0, 1]
    max_bytes: Count = 256 * MiB  # the file's bound; capturing stops there


class RootFile(Section, frozen=True):
    """The root's YAML config (configs/root.yaml); docs/root.md."""

    partitions: Annotated[dict[str, PartitionSpec], msgspec.Meta(min_length=1)]
    listen: Listen = msgspec.field(default_factory=Listen)
    admin: Admin = msgspec.field(default_factory=Admin)
    workers: Count = 1  # >1: processes sharing the port (SO_REUSEPORT)
    bundles: Paths = []  # files built by `trimmer bundle build`
    repositories: Paths = []  # <repo>/<model>/<version>/model.pt[2]
    overrides: Optional[Paths] = None  # one allowlists.yaml
    watch: bool = True  # hot-reload bundles and repositories when they change
    # model -> partition name, or {partition, default_version, version_policy}
    models: dict[str, Union[Name, ModelSpec]] = {}
    unknown_models: UnknownModels = msgspec.field(default_factory=UnknownModels)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    limits: Limits = msgspec.field(default_factory=Limits)
    deadline_header: Name = "X-Deadline-Ms"  # remaining budget in ms, read from clients and sent upstream
    audit_sample_rate: Fraction = 0.0  # fraction of trimmed requests also sent untrimmed and compared (root/audit.py)
    audit_max_concurrent: Count = 8  # audits in flight at once; more are dropped and counted
    # float outputs this close (relative) are near matches
    audit_tolerance: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 1e-5
    pipelines: dict[str, PipelineSpec] = {}  # multi-stage requests (root/pipeline_config.py)
    capture: Optional[Capture] = None


# ---------------------------------------------------------------- what the service reads
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
    version_policy: str = "latest"
    versioned_paths: bool = True


@dataclass(frozen=True)
class ModelConfig:
    name: str
    partition: str
    default_version: str | None = None
    version_policy: str | None = None  # None: the partition's


@dataclass(frozen=True, kw_only=True)
class RootConfig:
    """The resolved config (defaults: RootFile): paths absolute, shorthands expanded, cross-references checked."""

    path: str
    host: str
    port: int
    admin_enabled: bool
    admin_host: str | None  # None: admin endpoints on the main listener (admin.on_service_port)
    admin_port: int | None
    workers: int
    bundles: tuple[Path, ...]
    repositories: tuple[Path, ...]
    overrides: Path | None
    watch: bool
    partitions: dict[str, PartitionConfig]
    models: dict[str, ModelConfig]
    unknown_policy: str
    unknown_partition: str | None
    timeouts: Timeouts
    max_body_bytes: int
    max_fanout_targets: int
    capture_path: Path | None  # requests sampled here for `trimmer loadtest --replay` (trimmer/capture.py)
    capture_sample_rate: float
    capture_max_bytes: int
    max_connections: int
    max_inflight_body_bytes: int
    max_receiving_body_bytes: int
    deadline_header: str
    audit_sample_rate: float
    audit_max_concurrent: int
    audit_tolerance: float
    pipelines: dict[str, PipelineConfig] = field(default_factory=dict)

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


def _paths(value: str | list[str], where: str, base: Path, kind: str) -> tuple[Path, ...]:
    out = []
    for v in [value] if isinstance(value, str) else value:
        p = Path(os.path.expandvars(os.path.expanduser(v)))
        p = (p if p.is_absolute() else (base / p)).resolve()
        if kind == "file" and not p.is_file():
            raise ConfigError(f"{where}: {v}: no such file")
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{where}: {v}: no such directory")
        out.append(p)
    return tuple(out)


def _partition(name: str, spec: PartitionSpec, path: str) -> PartitionConfig:
    w = f"{path}: partitions.{name}"
    replicas = [spec.replicas] if isinstance(spec.replicas, str) else spec.replicas
    urls = tuple(check_url(u, f"{w}.replicas[{i}]") for i, u in enumerate(replicas))
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{w}.replicas: duplicate URL")
    meta = spec.allowlists_from_metadata
    if isinstance(meta, list):
        meta = MetadataSpec(models=meta)
    return PartitionConfig(name, urls, spec.protocol, spec.compression, spec.balance, spec.health_path,
                           spec.max_connections,
                           None if meta is None else MetadataAllowlists(tuple(meta.models), meta.refresh_s),
                           spec.version_policy, spec.versioned_paths)


def _models(raw: dict[str, str | ModelSpec],
            partitions: dict[str, PartitionConfig], path: str) -> dict[str, ModelConfig]:
    models: dict[str, ModelConfig] = {}
    for name, spec in raw.items():
        w = f"{path}: models.{name}"
        if not valid_name(name):
            raise ConfigError(
                f"{w}: invalid model name; use 1-128 characters from A-Z a-z 0-9 _ . -, not starting with '.' or '-'")
        spec = ModelSpec(partition=spec) if isinstance(spec, str) else spec
        if spec.partition not in partitions:
            raise ConfigError(
                f"{w}.partition: no partition named {spec.partition!r}; known: {', '.join(sorted(partitions))}")
        dv = spec.default_version
        if dv is not None and not valid_name(str(dv)):
            raise ConfigError(f"{w}.default_version: must be a version string (A-Z a-z 0-9 _ . -), got {dv!r}")
        models[name] = ModelConfig(name, spec.partition, None if dv is None else str(dv), spec.version_policy)
    return models


def _check_routes(f: RootFile, partitions: dict[str, PartitionConfig],
                  models: dict[str, ModelConfig], path: str) -> None:
    """unknown_models needs a partition to pass through to; a metadata model must route to the partition asked."""
    um = f.unknown_models
    if um.policy == "passthrough":
        if um.partition is None:
            raise ConfigError(f"{path}: unknown_models.partition: required when policy is passthrough")
        if um.partition not in partitions:
            raise ConfigError(f"{path}: unknown_models.partition: no partition named {um.partition!r}")
    for pc in partitions.values():
        for m in pc.metadata.models if pc.metadata else ():
            owner = models.get(m)
            if owner is not None and owner.partition != pc.name:
                raise ConfigError(f"{path}: partitions.{pc.name}.allowlists_from_metadata: model {m!r} routes to "
                                  f"partition {owner.partition!r}")


def _check_admin(admin: Admin, path: str) -> None:
    if admin.on_service_port and (admin.host is not None or admin.port is not None):
        raise ConfigError(f"{path}: admin: on_service_port: true serves /metrics and /admin/* on listen; drop "
                          "admin.host and admin.port")


def _check_limits(limits: Limits, path: str) -> int:
    """max_inflight_body_bytes (default 4 x max_body_bytes), which must hold one largest body."""
    inflight = limits.max_inflight_body_bytes or 4 * limits.max_body_bytes
    if inflight < limits.max_body_bytes:
        raise ConfigError(f"{path}: limits.max_inflight_body_bytes ({inflight}) must be >= limits.max_body_bytes "
                          f"({limits.max_body_bytes}): one largest body must fit")
    return inflight


_NO_CAPTURE = Capture(path="-")  # its defaults, for RootConfig's capture_* when there is no capture section


def parse_config(doc: Any, path: str = "root.yaml", base: Path | None = None) -> RootConfig:
    base = base if base is not None else Path(path).absolute().parent
    f: RootFile = convert(doc, RootFile, path)
    partitions = {n: _partition(n, spec, path) for n, spec in f.partitions.items()}
    models = _models(f.models, partitions, path)
    _check_routes(f, partitions, models, path)
    _check_admin(f.admin, path)
    inflight = _check_limits(f.limits, path)
    if isinstance(f.overrides, list) and len(f.overrides) > 1:
        raise ConfigError(f"{path}: overrides: one file, not a list")
    overrides = _paths(f.overrides, f"{path}: overrides", base, "file") if f.overrides is not None else ()
    passthrough = f.unknown_models.partition if f.unknown_models.policy == "passthrough" else None
    on_service = f.admin.on_service_port
    return RootConfig(
        path=path,
        host=f.listen.host,
        port=f.listen.port,
        admin_enabled=f.admin.enabled,
        admin_host=None if on_service else f.admin.host or DEFAULT_ADMIN_HOST,
        admin_port=None if on_service else DEFAULT_ADMIN_PORT if f.admin.port is None else f.admin.port,
        workers=f.workers,
        bundles=_paths(f.bundles, f"{path}: bundles", base, "file"),
        repositories=_paths(f.repositories, f"{path}: repositories", base, "dir"),
        overrides=overrides[0] if overrides else None,
        watch=f.watch,
        partitions=partitions,
        models=models,
        unknown_policy=f.unknown_models.policy,
        unknown_partition=passthrough,
        timeouts=f.timeouts,
        max_body_bytes=f.limits.max_body_bytes,
        max_fanout_targets=f.limits.max_fanout_targets,
        capture_path=(base / f.capture.path) if f.capture else None,
        capture_sample_rate=(f.capture or _NO_CAPTURE).sample_rate,
        capture_max_bytes=(f.capture or _NO_CAPTURE).max_bytes,
        max_connections=f.limits.max_connections,
        max_inflight_body_bytes=inflight,
        max_receiving_body_bytes=f.limits.max_receiving_body_bytes,
        deadline_header=f.deadline_header,
        audit_sample_rate=f.audit_sample_rate,
        audit_max_concurrent=f.audit_max_concurrent,
        audit_tolerance=f.audit_tolerance,
        pipelines=build_pipelines(f.pipelines, path, lambda m: models[m].partition if m in models else passthrough,
                                  lambda p: partitions[p].protocol),
    )


def load_config(path: str | os.PathLike[str]) -> RootConfig:
    """Relative paths inside the file resolve against the file's own directory."""
    p = Path(path)
    return parse_config(load_yaml(p), str(p), p.absolute().parent)


__all__ = ["RootConfig", "RootFile", "PartitionConfig", "ModelConfig", "Timeouts", "MetadataAllowlists", "load_config",
           "parse_config", "check_url", "PROTOCOLS", "COMPRESSIONS", "BALANCES"]
