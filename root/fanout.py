"""Per-target trim and send, and the native fan-out on top of it.

Each target's body is `trimmer.trim.trim` of the client body (for the fan-out:
without its `models` key): feature values are never decoded, kept values'
bytes are copied verbatim, and msgpack goes through the C accelerator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AbstractSet, Any, Mapping

import msgspec

from trimmer.codec import MSGPACK
from trimmer.errors import PayloadError
from trimmer.lograte import RateLimitedLog
from trimmer.handshake import MISMATCH_HEADER, MISMATCH_STATUS, SIGNATURE_HEADER
from trimmer.names import check_name
from trimmer.registry import Registry, Resolution
from trimmer.trim import StreamTrim, trim, trim_msgpack_chunks

from .audit import Auditor, AuditJob
from .body import Body
from .config import RootConfig
from .metrics import Metrics
from .upstream import Partition, UpstreamError

Raw = msgspec.Raw
log = logging.getLogger("trimmer.root")

# Why a request went upstream untrimmed: the `reason` label of trimmer_root_untrimmed_forwards_total.
NO_VERSION = "no_version"  # no version named and none resolvable: no allowlist to pick
NO_ALLOWLIST = "no_allowlist"  # the (model, version) has no known allowlist
MODE_OFF = "mode_off"
SHADOW = "shadow"  # trimmed for measurement only
SIGNATURE_MISMATCH = "signature_mismatch"  # the leaf runs another signature (handshake): re-sent whole
UNPARSED_ENCODING = "unparsed_encoding"  # a body format the root does not trim


class ModelRef(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    version: str | int | None = None


_DECODERS = {
    MSGPACK: (msgspec.msgpack.Decoder(dict[str, Raw]), msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(list[ModelRef]), "msgpack"),
    "application/json": (msgspec.json.Decoder(dict[str, Raw]), msgspec.json.Encoder(), msgspec.json.Decoder(list[ModelRef]), "JSON"),
}


class PreparedBody:
    """A client body, trimmed per allowlist by trimmer.trim (the C accelerator for msgpack).

    Only the fan-out needs the top level split (to read and drop `models`); the
    shortcut route forwards the client's chunks untouched when it does not trim,
    and trims msgpack straight from them.
    """

    __slots__ = ("media", "models_raw", "stream_seconds", "_base", "_stream")

    def __init__(self, body: Body, media: str, strip_models: bool, stream: StreamTrim | None = None) -> None:
        self._stream = stream  # a trim already fed with the body as it arrived (shortcut route only)
        self.stream_seconds = 0.0  # trim time spent while the body arrived, when that trim was used
        self.media = media
        self.models_raw: Raw | None = None
        self._base = body
        if strip_models:
            dec, enc, _, fmt = _DECODERS[media]
            try:
                top = dec.decode(body.joined())
            except msgspec.ValidationError as exc:
                raise PayloadError(f"request must be a map with string keys ({exc})") from None
            except msgspec.DecodeError as exc:
                raise PayloadError(f"malformed {fmt} body: {exc}") from None
            except RecursionError:
                raise PayloadError(f"malformed {fmt} body: nested too deeply") from None
            models_raw = top.pop("models", None)
            if models_raw is not None:
                # Its own bytes: a Raw is a view that would keep the whole joined client body alive.
                self.models_raw = models_raw.copy()
                # One copy of the body without `models` (Raw values are written back verbatim).
                self._base = Body.of(enc.encode(top))

    def models(self) -> list[ModelRef]:
        if self.models_raw is None:
            raise PayloadError('fan-out request has no "models" list; send [{"name": ...}, ...] or use /v1/models/{name}/score')
        try:
            refs = _DECODERS[self.media][2].decode(self.models_raw)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            raise PayloadError(f'"models" must be a list of {{"name": str, "version": str?}} ({exc})') from None
        if not refs:
            raise PayloadError('"models" is empty')
        return refs

    def untrimmed(self) -> Body:
        """The body as forwarded without trimming (the fan-out drops its `models` key)."""
        return self._base

    def trim(self, allow: AbstractSet[str]) -> tuple[bytes, int, int]:
        """(body, features_in, features_kept) keeping only allowlisted features, values untouched."""
        stream, self._stream = self._stream, None
        if stream is not None and stream.allow is allow:  # else the allowlists were reloaded meanwhile
            r = stream.finish(self._base.chunks)
            self.stream_seconds = stream.seconds
        elif self.media == MSGPACK:
            r = trim_msgpack_chunks(self._base.chunks, allow)
        else:
            r = trim(self._base.joined(), allow, self.media)
        return r.body, r.features_in, r.features_kept


@dataclass(frozen=True, slots=True)
class Outcome:
    """One target's answer: an upstream response, or a root-made error."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str]  # an upstream's: case-insensitive (root/upstream.py); the root's own: canonical names
    error: str | None = None  # set when the root made the error (or upstream answered non-2xx)


class Router:
    """Resolves a (model, version) to a partition and an allowlist, trims, sends, and counts."""

    def __init__(self, cfg: RootConfig, registry: Registry, partitions: dict[str, Partition], metrics: Metrics,
                 auditor: Auditor | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.partitions = partitions
        self.metrics = metrics
        self.auditor = auditor  # equivalence audit of sampled trimmed requests (root/audit.py)
        self._known: tuple[int, set[str]] = (-1, set())
        self._warn = RateLimitedLog(log)

    def labels(self, model: str, version: str | None, partition: str) -> tuple[str, str, str]:
        """Bounded label values: unlisted names from clients collapse to one value each."""
        snap = self.registry.snapshot
        if self._known[0] != snap.generation:
            self._known = (snap.generation, {k[0] for k in snap.entries} | set(snap.default_versions) | set(snap.fallbacks) | set(self.cfg.models))
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
            raise RouteError(404, f"unknown model {model!r}: not in the root config and unknown_models.policy is reject")
        return self.partitions[name]

    def error(self, status: int, message: str, kind: str, labels: tuple[str, str, str] | None) -> Outcome:
        if labels is not None:
            self.metrics.child(self.metrics.errors, (*labels, kind)).inc()
        return Outcome(status, msgspec.json.encode({"error": message}), "application/json", {}, message)

    async def send(self, model: str, version: str | None, path_for, prepared: PreparedBody | None, raw_body: Body | None,
                   content_type: str, timeout_s: float, trim_fn=None, extra_headers: dict[str, str] | None = None,
                   client_bytes: int = 0, sole_target: bool = False) -> Outcome:
        """Trim for one target and send it. `path_for(version)` builds the upstream path.

        Either `prepared` (native) or `raw_body` + `trim_fn(body, allow) -> (body, in, kept)` (OIP) is given.
        `sole_target`: nothing else reads the client body, so once trimmed it is released (unless audited)
        instead of being held, five times the size of what is sent, for as long as the model takes.
        """
        try:
            check_name("model name", model)
            if version is not None:
                check_name("version", version)
            part = self.route(model)
        except PayloadError as exc:
            return self.error(400, str(exc), "bad_request", None)
        except RouteError as exc:
            return self.error(exc.status, exc.message, "unknown_model", None)
        res: Resolution = self.registry.resolve(model, version)
        # The root is authoritative for the default version: send the version whose allowlist it used.
        eff_version = version if version is not None else res.version
        labels = self.labels(model, eff_version, part.name)
        m = self.metrics
        m.child(m.requests, labels).inc()
        m.child(m.model_client_bytes, labels).inc(client_bytes)
        m.child(m.mode_requests, (*labels, res.mode if res.allowlist is not None else "miss")).inc()

        t0 = time.perf_counter()
        dropped_any = False
        untrimmed_reason: str | None = None
        trimmed_headers: dict[str, str] | None = None
        try:
            if prepared is not None:
                untrimmed_fn = prepared.untrimmed
                trim_call = prepared.trim
            else:
                untrimmed_fn = lambda: raw_body  # noqa: E731
                trim_call = lambda allow: trim_fn(raw_body, allow)  # noqa: E731
            untrimmed = untrimmed_fn()
            if res.allowlist is None or (prepared is None and trim_fn is None):
                body = untrimmed
                if res.allowlist is None:
                    m.child(m.allowlist_misses, labels).inc()
                    untrimmed_reason = NO_VERSION if eff_version is None else NO_ALLOWLIST
                else:
                    untrimmed_reason = UNPARSED_ENCODING
                m.child(m.trimmed_bytes, labels).inc(len(untrimmed))
            elif res.mode == "off":
                body = untrimmed
                untrimmed_reason = MODE_OFF
                m.child(m.trimmed_bytes, labels).inc(len(untrimmed))
            else:
                result = trim_call(res.allowlist)
                trimmed, n_in, n_kept = result[0], result[1], result[2]
                trimmed_headers = result[3] if len(result) > 3 else None  # e.g. a new Inference-Header-Content-Length
                m.child(m.features_in, labels).inc(n_in)
                m.child(m.trimmed_bytes, labels).inc(len(trimmed))
                if res.mode == "enforce":
                    body = trimmed
                    dropped_any = n_kept < n_in
                    m.child(m.features_dropped, labels).inc(n_in - n_kept)
                else:  # shadow: measure, send untrimmed
                    body = untrimmed
                    untrimmed_reason = SHADOW
                    m.child(m.shadow_features_dropped, labels).inc(n_in - n_kept)
        except PayloadError as exc:
            return self.error(400, str(exc), "bad_request", labels)
        m.child(m.untrimmed_bytes, labels).inc(len(untrimmed))
        m.child(m.trim_seconds, labels).observe(time.perf_counter() - t0 + (prepared.stream_seconds if prepared is not None else 0.0))
        if untrimmed_reason is not None:
            self._count_untrimmed(labels, untrimmed_reason)
        # Drawn now: an audit needs the untrimmed body. Bodies whose headers change with the trim are not audited.
        audit = dropped_any and trimmed_headers is None and self.auditor is not None and self.auditor.sample()
        released = False
        if sole_target and body is not untrimmed and not audit:
            untrimmed.release()
            released = True

        headers = {"Content-Type": content_type, "Accept": content_type}
        if extra_headers:
            headers.update(extra_headers)
        # The handshake (trimmer/handshake.py): only a body that lost features can give a wrong answer.
        handshake = dropped_any and res.digest is not None
        t1 = time.perf_counter()
        # A version the client named goes upstream as named; a resolved one only when it is a configured default
        # (pinned) and the partition's server is versioned. `latest` leaves the choice to the upstream's own
        # rule (the same highest version); the handshake catches the moments the two differ.
        path = path_for(version if version is not None else (res.version if res.pin and part.cfg.versioned_paths else None))
        try:
            sent_headers = {**headers, **trimmed_headers} if trimmed_headers and body is not untrimmed else headers
            resp = await part.request("POST", path, body, {**sent_headers, SIGNATURE_HEADER: res.digest} if handshake else sent_headers,
                                      timeout_s, labels, self.cfg.deadline_header)
            if handshake and resp.status == MISMATCH_STATUS and resp.headers.get(MISMATCH_HEADER) == "allowlist":
                # The replica runs another signature than the allowlist's (a model swapped, root and leaf
                # reloaded at different moments). Nothing ran; the whole body is always a right answer.
                m.child(m.allowlist_mismatches, (*labels, "refused" if released else "resent")).inc()
                self._warn((model, eff_version, "mismatch"), "model %s version %s: replica %s runs another signature than the "
                           "allowlist's (digest %s); %s", model, eff_version, resp.replica, res.digest,
                           "answered 503, body already released" if released else "re-sent untrimmed")
                if released:
                    m.child(m.upstream_seconds, labels).observe(time.perf_counter() - t1)
                    out = self.error(503, f"model {model!r}: the model version changed while this request was in flight; retry",
                                     "signature_mismatch", labels)
                    return Outcome(out.status, out.body, out.content_type, {"Retry-After": "1"}, out.error)
                self._count_untrimmed(labels, SIGNATURE_MISMATCH)
                body, audit = untrimmed, False
                resp = await part.request("POST", path, body, headers, max(0.001, timeout_s - (time.perf_counter() - t1)),
                                          labels, self.cfg.deadline_header)
        except UpstreamError as exc:
            m.child(m.upstream_seconds, labels).observe(time.perf_counter() - t1)
            return self.error(exc.status, f"model {model!r} (partition {part.name!r}): {exc}", exc.kind, labels)
        m.child(m.upstream_seconds, labels).observe(time.perf_counter() - t1)
        if resp.status >= 400:
            m.child(m.errors, (*labels, f"upstream_{resp.status // 100}xx")).inc()
            return Outcome(resp.status, resp.body, resp.content_type, resp.headers, upstream_error_text(resp.body, resp.content_type, resp.status))
        if audit:
            # After the answer is in hand and in the background: the client never waits for an audit.
            self.auditor.submit(AuditJob(model, eff_version, labels, part, resp.replica, path, untrimmed.joined(), content_type,
                                         resp.status, resp.body, resp.content_type, res.allowlist))  # type: ignore[arg-type]
        return Outcome(resp.status, resp.body, resp.content_type, resp.headers)

    def _count_untrimmed(self, labels: tuple[str, str, str], reason: str) -> None:
        self.metrics.child(self.metrics.untrimmed_forwards, (*labels, reason)).inc()
        if reason in (NO_VERSION, NO_ALLOWLIST, UNPARSED_ENCODING):
            self._warn((*labels, reason), "model %s version %s (partition %s) forwarded untrimmed: %s", labels[0],
                       labels[1] or "(none)", labels[2], reason)


class RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def upstream_error_text(body: bytes, content_type: str, status: int) -> str:
    """The upstream's own `error` message when it sent one, else a short description."""
    try:
        if "msgpack" in content_type:
            obj = msgspec.msgpack.decode(body)
        else:
            obj = msgspec.json.decode(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):
        pass
    text = body[:200].decode("utf-8", "replace").strip()
    return f"upstream answered {status}" + (f": {text}" if text else "")


def native_path(model: str):
    def build(version: str | None) -> str:
        return f"/v1/models/{model}/score" if version is None else f"/v1/models/{model}/versions/{version}/score"
    return build


def target_keys(refs: list[ModelRef]) -> list[str]:
    """Result keys: `name`, or `name/version` (`name/default` for no version) for a model listed with several
    versions. One pass, linear in targets; a version literally named `default` beside a version-less entry of
    the same model would share its key, so that request is refused (400) rather than losing one answer."""
    counts: dict[str, int] = {}
    for r in refs:
        counts[r.name] = counts.get(r.name, 0) + 1
    keys = [r.name if counts[r.name] == 1 else f"{r.name}/{r.version if r.version is not None else 'default'}" for r in refs]
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
    if "msgpack" in content_type:
        return msgspec.msgpack.decode(body)
    return msgspec.json.decode(body)


async def fan_out(router: Router, prepared: PreparedBody, content_type: str, timeout_s: float,
                  extra_headers: dict[str, str], client_bytes: int) -> tuple[int, bytes]:
    """Send every target concurrently; one failing target never fails the others. Returns (status, body)."""
    refs = prepared.models()
    cap = router.cfg.max_fanout_targets
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
    outcomes = await asyncio.gather(*(
        router.send(r.name, r.version, native_path(r.name), prepared, None, content_type, timeout_s,
                    extra_headers=extra_headers, client_bytes=client_bytes)
        for r in refs
    ))
    results: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for ref, key, out in zip(refs, keys, outcomes):
        if out.error is None and out.status < 300:
            try:
                if ("msgpack" in out.content_type) == (prepared.media == MSGPACK):
                    # The leaf's bytes verbatim (bit-identical outputs), once their structure checks out: a broken
                    # peer's garbage must not corrupt the whole answer. Values are skipped, not decoded.
                    _DECODERS[prepared.media][0].decode(out.body)
                    results[key] = Raw(out.body)
                else:
                    results[key] = _decode_any(out.body, out.content_type)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):
                errors[key] = {"status": 502, "error": f"model {ref.name!r}: upstream sent an undecodable {out.content_type} body"}
                part = router.cfg.partition_for(ref.name) or ""
                router.metrics.errors.labels(*router.labels(ref.name, ref.version, part), "bad_upstream_body").inc()
        else:
            errors[key] = {"status": out.status, "error": out.error or f"upstream answered {out.status}"}
    enc = _DECODERS[prepared.media][1]
    body = enc.encode({"results": results, "errors": errors})
    if results or not errors:
        return 200, body
    return fanout_status(errors), body


__all__ = ["PreparedBody", "Router", "Outcome", "fan_out", "native_path", "RouteError", "ModelRef", "upstream_error_text",
           "target_keys", "fanout_status"]
