"""The root's data plane: one plan per request, then trim and measure, then send. No HTTP server in here.

Both transports (root/front.py's fast listener and the aiohttp handlers in
root/app.py) turn a request into a `Plan` once, from its route and headers:
the targets (model, version as named, partition, the registry's resolution,
metric labels, upstream path), the body format that knows how to trim it,
the timeout, and whether to trim while the body streams in. Everything after
runs the plan; nothing resolves the registry a second time:

    route + headers ──plan_single()/plan_fanout()──> Plan
    Plan + body     ──DataPlane.send()/fan_out()──> trim, measure, handshake ──> Partition.request (root/upstream.py)

Each target's body is a trim of the client body (for the fan-out: without its
`models` key): feature values are never decoded, kept values' bytes are
copied verbatim, and msgpack goes through the C accelerator. Errors are typed
(`RouteError` carries its status), so adapters only map them to responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Callable, Mapping

import msgspec

from trimmer import oip_binary
from trimmer.codec import MSGPACK, is_json, is_msgpack
from trimmer.errors import DECODE_FAILURES, PayloadError, decode_errors
from trimmer.http_errors import HttpError
from trimmer.handshake import MISMATCH_HEADER, MISMATCH_STATUS, SIGNATURE_HEADER
from trimmer.lograte import RateLimitedLog
from trimmer.names import check_name
from trimmer.registry import Registry, Resolution
from trimmer.trim import StreamTrim, TrimResult, trim, trim_msgpack_chunks, trim_oip

from .audit import Auditor, AuditJob
from .config import RootConfig
from .metrics import Metrics
from .upstream import Body, Partition, UpstreamError

Raw = msgspec.Raw
log = logging.getLogger("trimmer.root")

# Why a request went upstream untrimmed: the `reason` label of trimmer_root_untrimmed_forwards_total.
NO_VERSION = "no_version"  # no version named and none resolvable: no allowlist to pick
NO_ALLOWLIST = "no_allowlist"  # the (model, version) has no known allowlist
MODE_OFF = "mode_off"
SHADOW = "shadow"  # trimmed for measurement only
SIGNATURE_MISMATCH = "signature_mismatch"  # the leaf runs another signature (handshake): re-sent whole
UNPARSED_ENCODING = "unparsed_encoding"  # a body format the root does not trim

OIP_BINARY_HEADER = oip_binary.HEADER


class ModelRef(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    version: str | int | None = None


# media type -> (decoder of the top-level map, encoder, decoder of the `models` list, format name)
_DECODERS: dict[str, tuple[Any, Any, Any, str]] = {
    MSGPACK: (msgspec.msgpack.Decoder(dict[str, Raw]), msgspec.msgpack.Encoder(),
              msgspec.msgpack.Decoder(list[ModelRef]), "msgpack"),
    "application/json": (msgspec.json.Decoder(dict[str, Raw]), msgspec.json.Encoder(),
                         msgspec.json.Decoder(list[ModelRef]), "JSON"),
}


# ---------------------------------------------------------------------- bodies and body formats
@dataclass(frozen=True, slots=True)
class Trimmed:
    body: bytes
    features_in: int
    features_kept: int
    headers: Mapping[str, str] | None = None  # headers that change with the trim (binary OIP's JSON length)


class BodyFormat:
    """How bodies of one route are trimmed. `None` from `trim` means: this format is forwarded untrimmed."""

    def trim(self, body: Body, allow: AbstractSet[str], stream: StreamTrim | None) -> Trimmed | None:
        raise NotImplementedError


class NativeFormat(BodyFormat):
    """`{"features": {...}}` in msgpack (C trim over the received chunks, or the stream fed as they landed) or JSON."""

    def __init__(self, media: str) -> None:
        self.media = media

    def trim(self, body: Body, allow: AbstractSet[str], stream: StreamTrim | None) -> Trimmed:
        if stream is not None:
            r: TrimResult = stream.finish(body.chunks)
        elif self.media == MSGPACK:
            r = trim_msgpack_chunks(body.chunks, allow)
        else:
            r = trim(body.joined(), allow, self.media)
        return Trimmed(r.body, r.features_in, r.features_kept)


class OipJsonFormat(BodyFormat):
    def trim(self, body: Body, allow: AbstractSet[str], stream: StreamTrim | None) -> Trimmed:
        r = trim_oip(body.joined(), allow)
        return Trimmed(r.body, r.features_in, r.features_kept)


class OipBinaryFormat(BodyFormat):
    """Binary-tensor OIP: the JSON header is trimmed, kept segments copied verbatim, the length header rewritten."""

    def __init__(self, header_value: str) -> None:
        self.header_value = header_value

    def trim(self, body: Body, allow: AbstractSet[str], stream: StreamTrim | None) -> Trimmed:
        header_len = oip_binary.header_length(self.header_value, len(body))
        out, n_in, n_kept, new_len = oip_binary.trim_binary(body.joined(), header_len, allow)
        return Trimmed(out, n_in, n_kept, {OIP_BINARY_HEADER: str(new_len)})


class UntrimmedFormat(BodyFormat):
    def trim(self, body: Body, allow: AbstractSet[str], stream: StreamTrim | None) -> None:
        return None


UNTRIMMED = UntrimmedFormat()


# ---------------------------------------------------------------------- routes and plans
# The scoring routes: (path pattern, route name, kind). The aiohttp app registers them from this table and
# root/front.py matches them with it, so the two listeners cannot disagree on what is a scoring request.
SCORING_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("/v1/score", "fanout", "fanout"),
    ("/v1/models/{name}/score", "model", "model"),
    ("/v1/models/{name}/versions/{version}/score", "model_version", "model"),
    ("/v2/models/{name}/infer", "oip_infer", "oip"),
    ("/v2/models/{name}/versions/{version}/infer", "oip_infer_version", "oip"),
)


def match_scoring_route(path: str) -> tuple[str, str, str | None, str | None] | None:
    """(route name, kind, model, version) of a raw request path, or None. Segments are matched as they are."""
    parts = path.split("/")
    for pattern, name, kind in _SPLIT_ROUTES:
        if len(pattern) != len(parts):
            continue
        params: dict[str, str] = {}
        for want, got in zip(pattern, parts):
            if want.startswith("{"):
                if not got:
                    break
                params[want[1:-1]] = got
            elif want != got:
                break
        else:
            return name, kind, params.get("name"), params.get("version")
    return None


_SPLIT_ROUTES = [(tuple(p.split("/")), name, kind) for p, name, kind in SCORING_ROUTES]



@dataclass(slots=True)
class Target:
    """One upstream call: resolved once, when the plan is made."""

    model: str
    version: str | None  # as the client named it
    partition: Partition
    resolution: Resolution
    labels: tuple[str, str, str]
    path: str  # built only from validated parts


@dataclass(slots=True)
class Plan:
    """Everything decided about a request before its body is read."""

    route: str  # client-side metric label: model | oip | fanout | pipeline
    fmt: BodyFormat
    content_type: str
    timeout_s: float
    targets: list[Target] = field(default_factory=list)  # a fan-out's come from its body (`models`)
    extra_headers: dict[str, str] | None = None
    error: "RouteError | None" = None  # answered once the body is in (received and counted like any body)

    def stream_trim(self, size_hint: int) -> StreamTrim | None:
        """A trim to feed while the body arrives: one msgpack target in a trimming mode (the C engine scans each piece
        as
        it is fed; the Python twin keeps them and scans at the end)."""
        if self.error is not None or len(self.targets) != 1:
            return None
        fmt = self.fmt
        res = self.targets[0].resolution
        if not isinstance(fmt, NativeFormat) or fmt.media != MSGPACK or res.allowlist is None or res.mode == "off":
            return None
        return StreamTrim(res.allowlist, size_hint)


def error_outcome(status: int, message: str, headers: Mapping[str, str] | None = None) -> Outcome:
    """A root-made error answer: `{"error": message}` as JSON."""
    return Outcome(status, msgspec.json.encode({"error": message}), "application/json", headers or {}, message)


def timeout_for(headers: Mapping[str, str], cfg: RootConfig) -> float:
    """A request's budget: the config timeout, shortened by the client's deadline header (ms remaining)."""
    raw = headers.get(cfg.deadline_header)
    if raw is None:
        return cfg.timeouts.request_s
    try:
        ms = float(raw)
    except ValueError:
        raise PayloadError(f"{cfg.deadline_header} must be a number of milliseconds, got {raw[:40]!r}") from None
    if not ms > 0:
        raise PayloadError(f"{cfg.deadline_header} must be > 0 milliseconds, got {raw[:40]!r}")
    return min(cfg.timeouts.request_s, ms / 1000.0)


def native_path(model: str) -> Callable[[str | None], str]:
    def build(version: str | None) -> str:
        return f"/v1/models/{model}/score" if version is None else f"/v1/models/{model}/versions/{version}/score"
    return build


def oip_path(model: str) -> Callable[[str | None], str]:
    def build(version: str | None) -> str:
        return f"/v2/models/{model}/infer" if version is None else f"/v2/models/{model}/versions/{version}/infer"
    return build


class PreparedBody:
    """A fan-out body split once: its `models` list apart, and one copy of the rest for every target to trim."""

    __slots__ = ("media", "models_raw", "base")

    def __init__(self, body: Body, media: str) -> None:
        self.media = media
        self.models_raw: Raw | None = None
        self.base = body
        dec, enc, _, fmt = _DECODERS[media]
        with decode_errors(f"{fmt} body", shape="request must be a map with string keys"):
            top = dec.decode(body.joined())
        models_raw = top.pop("models", None)
        if models_raw is not None:
            # Its own bytes: a Raw is a view that would keep the whole joined client body alive.
            self.models_raw = models_raw.copy()
            # One copy of the body without `models` (Raw values are written back verbatim).
            self.base = Body.of(enc.encode(top))

    def models(self) -> list[ModelRef]:
        if self.models_raw is None:
            raise PayloadError(
                'fan-out request has no "models" list; send [{"name": ...}, ...] or use /v1/models/{name}/score')
        with decode_errors(f"{_DECODERS[self.media][3]} models list",
                           shape='"models" must be a list of {"name": str, "version": str?}'):
            refs = _DECODERS[self.media][2].decode(self.models_raw)
        if not refs:
            raise PayloadError('"models" is empty')
        return refs


@dataclass(slots=True)
class _Outgoing:
    """One target's upstream body: the client's (untrimmed) or its trim, and what came with the trim."""

    body: Body | bytes
    headers: Mapping[str, str] | None = None  # headers the trim changed (binary OIP's JSON length)
    dropped_any: bool = False  # the trim removed at least one feature: the handshake applies
    audit_body: bytes | None = None  # a copy for the equivalence audit (and a re-send after release)
    released: bool = False  # the client body was released once trimmed


@dataclass(frozen=True, slots=True)
class Outcome:
    """One target's answer: an upstream response, or a root-made error."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str]  # an upstream's: case-insensitive (root/upstream.py); the root's own: canonical names
    error: str | None = None  # set when the root made the error (or upstream answered non-2xx)


class DataPlane:
    """Plans requests (partition, allowlist, labels: once), trims and measures, sends, and counts."""

    def __init__(self, cfg: RootConfig, registry: Registry, partitions: dict[str, Partition], metrics: Metrics,
                 auditor: Auditor | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.partitions = partitions
        self.metrics = metrics
        self.auditor = auditor  # equivalence audit of sampled trimmed requests (root/audit.py)
        self._known: tuple[int, set[str]] = (-1, set())
        self._warn = RateLimitedLog(log)

    # -- planning
    def labels(self, model: str, version: str | None, partition: str) -> tuple[str, str, str]:
        """Bounded label values: unlisted names from clients collapse to one value each."""
        snap = self.registry.snapshot
        if self._known[0] != snap.generation:
            self._known = (snap.generation, {k[0] for k in snap.entries} | set(snap.default_versions)
                           | set(snap.fallbacks) | set(self.cfg.models))
        mlabel = model if model in self._known[1] else "_unlisted"
        if version is None:
            vlabel = ""
        elif (model, version) in snap.entries:
            vlabel = version
        else:
            vlabel = "_unlisted"
        return mlabel, vlabel, partition

    def route(self, model: str) -> Partition:
        name = self.cfg.partition_for(model)
        if name is None:
            raise RouteError(404,
                             f"unknown model {model!r}: not in the root config and unknown_models.policy is reject")
        return self.partitions[name]

    def target(self, model: str, version: str | None, path_for: Callable[[str | None], str],
               protocol: str | None = None) -> Target:
        """Validate names, pick the partition, resolve the allowlist: the one resolution this target gets."""
        try:
            check_name("model name", model)
            if version is not None:
                check_name("version", version)
        except PayloadError as exc:
            raise RouteError(400, str(exc)) from None
        part = self.route(model)
        if protocol == "native" and part.cfg.protocol != "native":
            raise RouteError(400, f"model {model!r} is served by partition {part.name!r}, which speaks the Open "
                                  f"Inference Protocol; use /v2/models/{model}/infer")
        res = self.registry.resolve(model, version)
        # The root is authoritative for the default version: metrics carry the version whose allowlist it used.
        eff_version = version if version is not None else res.version
        # A version the client named goes upstream as named; a resolved one only when it is a configured default
        # (pinned) and the partition's server is versioned. `latest` leaves the choice to the upstream's own
        # rule (the same highest version); the handshake catches the moments the two differ.
        path = path_for(
            version if version is not None else (res.version if res.pin and part.cfg.versioned_paths else None))
        return Target(model, version, part, res, self.labels(model, eff_version, part.name), path)

    def plan_single(self, route: str, model: str, version: str | None, fmt: BodyFormat, content_type: str,
                    timeout_s: float, extra_headers: dict[str, str] | None = None) -> Plan:
        """The plan of a one-model route; a routing error is kept in the plan, answered once the body is read."""
        plan = Plan(route, fmt, content_type, timeout_s, extra_headers=extra_headers)
        try:
            plan.targets.append(self.target(model, version, native_path(model) if route == "model" else oip_path(model),
                                            "native" if route == "model" else None))
        except RouteError as exc:
            plan.error = exc
        return plan

    def plan_oip(self, model: str, version: str | None, headers: Mapping[str, str], timeout_s: float) -> Plan:
        """An OIP infer request: JSON, or binary tensors with their JSON header's length in a header."""
        binary = headers.get(OIP_BINARY_HEADER)
        content_type = headers.get("Content-Type", "")
        fmt: BodyFormat
        if binary is not None:
            fmt, ctype, extra = OipBinaryFormat(binary), content_type or "application/json", {OIP_BINARY_HEADER: binary}
        else:
            fmt, ctype, extra = OipJsonFormat(), "application/json", None
        plan = self.plan_single("oip", model, version, fmt, ctype, timeout_s, extra)
        media = content_type.split(";", 1)[0].strip().lower()
        if plan.error is None and binary is None and media not in ("application/octet-stream", "") \
                and not is_json(media):
            plan.error = RouteError(415,
                                    f"inference requests are JSON (or binary with {OIP_BINARY_HEADER}); got {media!r}")
        return plan

    def plan_fanout(self, media: str, timeout_s: float) -> Plan:
        """A fan-out's plan from its headers: its targets come from the body's `models` list (`fan_out`)."""
        return Plan("fanout", NativeFormat(media), media, timeout_s)

    def error(self, status: int, message: str, kind: str, labels: tuple[str, str, str] | None,
              headers: Mapping[str, str] | None = None) -> Outcome:
        if labels is not None:
            self.metrics.add(self.metrics.errors, (*labels, kind))
        return error_outcome(status, message, headers)

    # -- execution
    def refused(self, exc: RouteError) -> Outcome:
        """A target the plan could not route (bad name, unknown model, wrong protocol): counted without labels."""
        return self.error(exc.status, exc.message, "bad_request" if exc.status == 400 else "unknown_model", None)

    async def score(self, plan: Plan, body: Body, stream: StreamTrim | None = None) -> Outcome:
        """A one-model plan: its body is read; nothing else reads it, so once trimmed it is released."""
        if plan.error is not None:
            return self.refused(plan.error)
        return await self.send(plan, plan.targets[0], body, len(body), sole_target=True, stream=stream)

    async def fan_out(self, plan: Plan, prepared: PreparedBody, client_bytes: int) -> tuple[int, bytes]:
        """Plan every target of a fan-out body, send them concurrently; one failing target never fails the others."""
        refs = prepared.models()
        cap = self.cfg.max_fanout_targets
        if len(refs) > cap:
            raise PayloadError(f'"models" lists {len(refs)} targets; limits.max_fanout_targets is {cap}')
        seen: set[tuple[str, str | None]] = set()
        for r in refs:  # linear: a 20,000-name body is refused by the cap above before any of this
            check_name('"models": model name', r.name)
            if isinstance(r.version, int):
                r.version = str(r.version)
            if r.version is not None:
                check_name(f'"models": version of {r.name!r}', r.version)
            if (r.name, r.version) in seen:
                raise PayloadError(f'"models": {r.name!r} version {r.version!r} listed twice')
            seen.add((r.name, r.version))
        keys = target_keys(refs)
        planned: list[Target | RouteError] = []
        for r in refs:
            try:
                planned.append(self.target(r.name, r.version, native_path(r.name)))  # type: ignore[arg-type]
            except RouteError as exc:
                planned.append(exc)
        plan.targets = [t for t in planned if isinstance(t, Target)]

        async def one(t: Target | RouteError) -> Outcome:
            return self.refused(t) if isinstance(t, RouteError) else await self.send(
                plan, t, prepared.base, client_bytes)

        outcomes = await asyncio.gather(*(one(t) for t in planned))
        return self._merge(prepared.media, refs, keys, planned, outcomes)

    def _merge(self, media: str, refs: list[ModelRef], keys: list[str], planned: list[Target | RouteError],
               outcomes: list[Outcome]) -> tuple[int, bytes]:
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        for ref, key, t, out in zip(refs, keys, planned, outcomes):
            if out.error is None and out.status < 300:
                try:
                    if is_msgpack(out.content_type) == (media == MSGPACK):
                        # The leaf's bytes verbatim (bit-identical outputs), once their structure checks out: a broken
                        # peer's garbage must not corrupt the whole answer. Values are skipped, not decoded.
                        _DECODERS[media][0].decode(out.body)
                        results[key] = Raw(out.body)
                    else:
                        results[key] = _decode_any(out.body, out.content_type)
                except DECODE_FAILURES:
                    errors[key] = {"status": 502,
                                   "error": f"model {ref.name!r}: upstream sent an undecodable {out.content_type} body"}
                    if isinstance(t, Target):
                        self.metrics.errors.labels(*t.labels, "bad_upstream_body").inc()
            else:
                errors[key] = {"status": out.status, "error": out.error or f"upstream answered {out.status}"}
        body = _DECODERS[media][1].encode({"results": results, "errors": errors})
        if results or not errors:
            return 200, body
        return fanout_status(errors), body

    async def send(self, plan: Plan, target: Target, body: Body, client_bytes: int, sole_target: bool = False,
                   stream: StreamTrim | None = None) -> Outcome:
        """Trim for one target and measure, then send (with the handshake and its re-send) and count.

        `sole_target`: nothing else reads the client body, so once trimmed it is released (an audit keeps a
        copy) instead of being held, five times the size of what is sent, for as long as the model takes.
        `stream`: a trim already fed with the body as it arrived, for this target's allowlist.
        """
        m = self.metrics
        labels = target.labels
        res = target.resolution
        m.add(m.requests, labels)
        m.add(m.model_client_bytes, labels, client_bytes)
        m.add(m.mode_requests, (*labels, res.mode if res.allowlist is not None else "miss"))
        try:
            out = self._trim(plan, target, body, stream)
        except PayloadError as exc:
            return self.error(400, str(exc), "bad_request", labels)
        # Drawn now: an audit needs the untrimmed body. Bodies whose headers change with the trim are not audited.
        audit = out.dropped_any and out.headers is None and self.auditor is not None and self.auditor.sample()
        out.audit_body = body.joined() if audit else None  # its own bytes: the client body's buffer may be reused
        if sole_target and out.body is not body:
            body.release()
            out.released = True
        return await self._deliver(plan, target, body, out)

    def _trim(self, plan: Plan, target: Target, body: Body, stream: StreamTrim | None) -> "_Outgoing":
        """What goes upstream for this target, with the trim's metrics; PayloadError for a malformed body."""
        m = self.metrics
        labels = target.labels
        res = target.resolution
        t0 = time.perf_counter()
        out = _Outgoing(body)
        reason: str | None = None
        if res.allowlist is None:
            m.add(m.allowlist_misses, labels)
            reason = NO_VERSION if (target.version is None and res.version is None) else NO_ALLOWLIST
        elif res.mode == "off":
            reason = MODE_OFF
        else:
            result = plan.fmt.trim(body, res.allowlist, stream)
            if result is None:
                reason = UNPARSED_ENCODING
            else:
                m.add(m.features_in, labels, result.features_in)
                m.add(m.trimmed_bytes, labels, len(result.body))
                if res.mode == "enforce":
                    out.body, out.headers = result.body, result.headers
                    out.dropped_any = result.features_kept < result.features_in
                    m.add(m.features_dropped, labels, result.features_in - result.features_kept)
                else:  # shadow: measure, send untrimmed
                    reason = SHADOW
                    m.add(m.shadow_features_dropped, labels, result.features_in - result.features_kept)
        if reason is not None and reason != SHADOW:
            m.add(m.trimmed_bytes, labels, len(body))
        m.add(m.untrimmed_bytes, labels, len(body))
        m.observe(m.trim_seconds, labels, time.perf_counter() - t0 + (stream.seconds if stream is not None else 0.0))
        if reason is not None:
            self._count_untrimmed(labels, reason)
        return out

    async def _deliver(self, plan: Plan, target: Target, body: Body, out: "_Outgoing") -> Outcome:
        """Send `out`; a handshake refusal (the replica runs another signature) re-sends the whole body."""
        m = self.metrics
        labels = target.labels
        res = target.resolution
        part = target.partition
        headers = {"Content-Type": plan.content_type, "Accept": plan.content_type, **(plan.extra_headers or {})}
        sent_headers = {**headers, **out.headers} if out.headers else headers
        # The handshake (trimmer/handshake.py): only a body that lost features can give a wrong answer.
        handshake = out.dropped_any and res.digest is not None
        if handshake:
            sent_headers = {**sent_headers, SIGNATURE_HEADER: res.digest}  # type: ignore[dict-item]
        t1 = time.perf_counter()
        try:
            resp = await part.request("POST", target.path, out.body, sent_headers, plan.timeout_s, labels,
                                      self.cfg.deadline_header)
            if handshake and resp.status == MISMATCH_STATUS and resp.headers.get(MISMATCH_HEADER) == "allowlist":
                # Reloaded at different moments (a model swapped in place). Nothing ran; the whole body is right.
                whole = out.audit_body if out.released else body
                m.add(m.allowlist_mismatches, (*labels, "refused" if whole is None else "resent"))
                self._warn((target.model, labels[1], "mismatch"),
                           "model %s version %s: replica %s runs another signature than the "
                           "allowlist's (digest %s); %s", target.model, labels[1], resp.replica, res.digest,
                           "answered 503, body already released" if whole is None else "re-sent untrimmed")
                if whole is None:
                    m.observe(m.upstream_seconds, labels, time.perf_counter() - t1)
                    return self.error(503, f"model {target.model!r}: the model version changed while this request was "
                                           "in flight; retry",
                                      "signature_mismatch", labels, {"Retry-After": "1"})
                self._count_untrimmed(labels, SIGNATURE_MISMATCH)
                out.audit_body = None
                resp = await part.request("POST", target.path, whole, headers,
                                          max(0.001, plan.timeout_s - (time.perf_counter() - t1)),
                                          labels, self.cfg.deadline_header)
        except UpstreamError as exc:
            m.observe(m.upstream_seconds, labels, time.perf_counter() - t1)
            return self.error(exc.status, f"model {target.model!r} (partition {part.name!r}): {exc}", exc.kind, labels)
        m.observe(m.upstream_seconds, labels, time.perf_counter() - t1)
        if resp.status >= 400:
            m.add(m.errors, (*labels, f"upstream_{resp.status // 100}xx"))
            return Outcome(resp.status, resp.body, resp.content_type, resp.headers,
                           upstream_error_text(resp.body, resp.content_type, resp.status))
        if out.audit_body is not None and self.auditor is not None:
            # After the answer is in hand and in the background: the client never waits for an audit.
            version = target.version if target.version is not None else res.version
            self.auditor.submit(AuditJob(target.model, version, labels, part, resp.replica, target.path, out.audit_body,
                                         plan.content_type, resp.status, resp.body, resp.content_type, res.allowlist))  # type: ignore[arg-type]
        return Outcome(resp.status, resp.body, resp.content_type, resp.headers)

    def _count_untrimmed(self, labels: tuple[str, str, str], reason: str) -> None:
        self.metrics.add(self.metrics.untrimmed_forwards, (*labels, reason))
        if reason in (NO_VERSION, NO_ALLOWLIST, UNPARSED_ENCODING):
            self._warn((*labels, reason), "model %s version %s (partition %s) forwarded untrimmed: %s", labels[0],
                       labels[1] or "(none)", labels[2], reason)


# A typed error carries its status (and headers): the same class the aiohttp middleware answers with.
RouteError = HttpError


def upstream_error_text(body: bytes, content_type: str, status: int) -> str:
    """The upstream's own `error` message when it sent one, else a short description."""
    try:
        if is_msgpack(content_type):
            obj = msgspec.msgpack.decode(body)
        else:
            obj = msgspec.json.decode(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
    except DECODE_FAILURES:
        pass
    text = body[:200].decode("utf-8", "replace").strip()
    return f"upstream answered {status}" + (f": {text}" if text else "")


def target_keys(refs: list[ModelRef]) -> list[str]:
    """Result keys: `name`, or `name/version` (`name/default` for no version) for a model listed with several
    versions. One pass, linear in targets; a version literally named `default` beside a version-less entry of
    the same model would share its key, so that request is refused (400) rather than losing one answer."""
    counts: dict[str, int] = {}
    for r in refs:
        counts[r.name] = counts.get(r.name, 0) + 1
    keys = [r.name if counts[r.name] == 1 else f"{r.name}/{r.version if r.version is not None else 'default'}"
            for r in refs]
    if len(set(keys)) != len(keys):
        raise PayloadError('"models": a version named "default" and a version-less entry of the same model share the '
                           'result key name/default; name the default version explicitly')
    return keys


def fanout_status(errors: dict[str, Any]) -> int:
    """The status of a fan-out that wholly failed: the targets' own status when they agree; 400 when all
    failed with client errors (the request is at fault); 502 otherwise."""
    statuses = {e["status"] for e in errors.values()}
    if len(statuses) == 1:
        return statuses.pop()
    if all(400 <= s < 500 for s in statuses):
        return 400
    return 502


def _decode_any(body: bytes, content_type: str) -> Any:
    if is_msgpack(content_type):
        return msgspec.msgpack.decode(body)
    return msgspec.json.decode(body)


__all__ = ["Body", "DataPlane", "SCORING_ROUTES", "match_scoring_route", "Plan", "Target", "PreparedBody", "Outcome",
           "RouteError", "ModelRef", "BodyFormat", "NativeFormat", "timeout_for", "error_outcome",
           "OipJsonFormat", "OipBinaryFormat", "UNTRIMMED", "native_path", "oip_path", "upstream_error_text",
           "target_keys", "fanout_status"]
