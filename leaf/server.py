"""aiohttp endpoints of the leaf: native score, OIP v2 infer / metadata / readiness, health, metrics.

Native: POST /v1/models/{name}[/versions/{v}]/score, msgpack or JSON (docs/protocol.md); the response uses
the request's media type: {"model", "version", ["request_id"], "outputs": {output name: typed tensor}}.
OIP v2: POST /v2/models/{name}[/versions/{v}]/infer, JSON or Triton's binary tensor extension (leaf/oip.py);
GET /v2 server metadata.
Every error is JSON {"error": "..."[, "code": "..."]}: 400 bad payload, invalid name/version, or a dtype the
model rejects for an input whose dtype the signature does not declare (code dtype_mismatch), 404 unknown
model/version, 412 allowlist handshake mismatch (nothing ran), 413 too large, 415 unsupported content
type/encoding, 500 model failure, 503 version not ready, leaf still loading, or version replaced mid-request.

Every name and version is checked (trimmer.names) before anything else: aiohttp hands handlers decoded
segments, so `%2e%2e` or `1%2F..%2Fmetrics` arrive as `..` / `1/../metrics` and must not reach a lookup.
The version a request runs on is looked up again after its body is read, right before conversion and
enqueueing with no await in between, so a swap during the read cannot send it to a drained batcher, and
the handshake digest is compared with exactly that version (trimmer/handshake.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from trimmer import codec
from trimmer.codec import AUDIT_HEADER
from trimmer.compression import BodyTooLarge, UnsupportedEncoding
from trimmer.compression import decompress as _decompress
from trimmer.errors import PayloadError
from trimmer.lograte import RateLimitedLog
from trimmer.handshake import MISMATCH_CODE, MISMATCH_HEADER, MISMATCH_STATUS, SIGNATURE_HEADER
from trimmer.http_errors import HttpError, error_middleware
from trimmer.names import check_name
from trimmer.settings import describe as settings_describe
from trimmer.tensor import Tensor

from . import oip
from .batcher import DtypeMismatch, ModelError, Unavailable
from .config import LeafConfig
from .convert import output_to_wire
from .metrics import LeafMetrics
from .models import ModelStore, VersionState

log = logging.getLogger("leaf.server")

OIP_TO_WIRE, WIRE_TO_OIP = oip.OIP_TO_WIRE, oip.WIRE_TO_OIP
STORE = web.AppKey("store", ModelStore)
METRICS = web.AppKey("metrics", LeafMetrics)
CONFIG = web.AppKey("config", LeafConfig)
BOUND = web.AppKey("bound_metrics", dict)


RETRY_AFTER_S = "1"  # on retryable 503s (loading, version replaced mid-request)
MISMATCH_LOG_INTERVAL_S = 10.0  # at most one allowlist-mismatch warning per model version per interval
MODEL_ERROR_LOG_INTERVAL_S = 10.0  # at most one model-failure ERROR (and one dtype-mismatch WARNING) per model version


MISMATCH_LOG = web.AppKey("mismatch_log", RateLimitedLog)
MODEL_ERROR_LOG = web.AppKey("model_error_log", RateLimitedLog)
DTYPE_LOG = web.AppKey("dtype_log", RateLimitedLog)


# Every error leaves as JSON {"error": ...[, "code": ...]}; a 500 names the exception and its first line.
errors_middleware = error_middleware(log, internal_detail=True)


# ---------------------------------------------------------------------- body handling
def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Content-Encoding through the shared bounded decoders (trimmer/compression.py): 413 past `limit`, 400, 415."""
    try:
        return _decompress(body, encoding, limit)
    except BodyTooLarge as exc:
        raise HttpError(413, str(exc)) from None
    except UnsupportedEncoding as exc:
        raise HttpError(415, str(exc)) from None


class VersionMetrics:
    """A model version's per-request metric children, bound once (labels() costs a lock and a lookup)."""

    def __init__(self, m: LeafMetrics, model: str, version: str) -> None:
        self.model, self.version = model, version
        self.bad_request = m.failures.labels(model, version, "bad_request")
        self.model_error = m.failures.labels(model, version, "model_error")
        self.unavailable = m.failures.labels(model, version, "unavailable")
        self.allowlist_mismatch = m.allowlist_mismatches.labels(model, version)
        self.convert_seconds = m.convert_seconds.labels(model, version)
        self.encode_seconds = m.encode_seconds.labels(model, version)
        self.request_seconds = m.request_seconds.labels(model, version)
        self.received_bytes = m.received_bytes.labels(model, version)
        self.features_received = m.features_received.labels(model, version)
        self.features_unused = m.features_unused.labels(model, version)
        self.inputs_defaulted = m.inputs_defaulted.labels(model, version)
        self.requests = {e: m.requests.labels(model, version, e) for e in ("score", "infer")}


def version_metrics(request: web.Request, vs: VersionState) -> VersionMetrics:
    cache = request.app[BOUND]
    vm = cache.get((vs.model, vs.version))
    if vm is None:
        vm = cache[(vs.model, vs.version)] = VersionMetrics(request.app[METRICS], vs.model, vs.version)
    return vm


def resolve(request: web.Request, need_ready: bool = True) -> VersionState:
    """The version this request addresses: 400 bad name/version, 503 still loading, 404 unknown, 503 not ready."""
    store = request.app[STORE]
    version = request.match_info.get("version")
    try:
        name = check_name("model name", request.match_info["name"])
        if version is not None:
            check_name("model version", version)
    except PayloadError:
        request.app[METRICS].bad_requests.labels("bad_name").inc()
        raise
    if not store.initial_done:
        raise HttpError(503, "the leaf is loading its models; retry shortly", code="loading",
                        headers={"Retry-After": RETRY_AFTER_S})
    vs = store.resolve(name, version)
    if vs is None:
        request.app[METRICS].not_found.inc()
        if version is None or not store.model_versions(name):
            raise HttpError(
                404, f"unknown model {name!r}; loaded: {', '.join(sorted({m for m, _ in store.versions})) or 'none'}")
        raise HttpError(
            404, f"unknown version {version!r} of model {name!r}; versions: {', '.join(store.model_versions(name))}")
    if need_ready and not vs.ready:
        raise HttpError(503, f"model {vs.model!r} version {vs.version!r} is not ready: {vs.state.lower()}"
                        + (f" ({vs.error})" if vs.error else ""))
    return vs


async def run_model(request: web.Request, vs: VersionState, vm: VersionMetrics, features: dict[str, Any],
                    t_convert: float, request_id: Any = None) -> list:
    """Convert, count, batch, run; returns the per-request outputs in output order. A model failure is a 500 and one
    rate-limited ERROR line (model, version, request id, exception); a dtype the model rejects for an input without
    a declared dtype is a 400 that names the input and the fix (leaf/failures.py)."""
    assert vs.converter is not None and vs.batcher is not None
    t0 = time.thread_time()
    try:
        conv = vs.converter.convert(features)
    except PayloadError:
        vm.bad_request.inc()
        raise
    vm.convert_seconds.observe(t_convert + time.thread_time() - t0)
    vm.features_received.inc(conv.n_features)
    if request.headers.get(AUDIT_HEADER) == "1":
        pass  # the root's untrimmed audit copy: not client traffic, so not drift (docs/root.md)
    elif conv.unused:
        metrics = request.app[METRICS]
        vm.features_unused.inc(len(conv.unused))
        metrics.features_unused_by_feature.add(vs.model, vs.version, conv.unused)
    if conv.defaulted and request.headers.get(AUDIT_HEADER) != "1":
        metrics = request.app[METRICS]
        vm.inputs_defaulted.inc(len(conv.defaulted))
        metrics.inputs_defaulted_by_feature.add(vs.model, vs.version, conv.defaulted)
    try:
        return await vs.batcher.submit(conv)
    except DtypeMismatch as exc:
        vm.bad_request.inc()
        request.app[DTYPE_LOG]((vs.model, vs.version), "model %s version %s, request %s: %s", vs.model, vs.version,
                                    _request_id(request, request_id), exc)
        raise HttpError(400, f"model {vs.model!r} version {vs.version!r}: {exc}", code="dtype_mismatch") from None
    except ModelError as exc:
        vm.model_error.inc()
        request.app[MODEL_ERROR_LOG]((vs.model, vs.version), "model %s version %s failed on request %s: %s", vs.model,
                                          vs.version, _request_id(request, request_id), exc)
        raise HttpError(500, f"model {vs.model!r} version {vs.version!r}: {exc}") from None
    except Unavailable as exc:
        vm.unavailable.inc()
        raise HttpError(503, str(exc), code="unavailable", headers={"Retry-After": RETRY_AFTER_S}) from None


def _request_id(request: web.Request, request_id: Any) -> str:
    """The id to log: the body's (native request_id, OIP id), else an X-Request-Id header, else '-'."""
    rid = request_id if request_id is not None else request.headers.get("X-Request-Id")
    return "-" if rid is None else repr(rid)[:80]


def version_to_run(request: web.Request,
                   first: VersionState, vm: VersionMetrics) -> tuple[VersionState, VersionMetrics]:
    """Look the version up again once the body is in (it may have been swapped meanwhile) and check the allowlist
    handshake against it. The caller converts and enqueues with no await in between."""
    vs = resolve(request)
    if vs is not first:
        vm = version_metrics(request, vs)
    sent = request.headers.get(SIGNATURE_HEADER)
    if sent is not None and sent != vs.digest:
        vm.allowlist_mismatch.inc()
        request.app[MISMATCH_LOG](
            (vs.model, vs.version),
            "allowlist mismatch on %s/%s: request trimmed for inputs %r, this version reads %s; "
            "answered %d without running the model", vs.model, vs.version, sent[:64], vs.digest, MISMATCH_STATUS)
        raise HttpError(MISMATCH_STATUS,
                        f"the request was trimmed for inputs with signature {sent[:64]!r}; model {vs.model!r} version "
                        f"{vs.version!r} reads inputs with signature {vs.digest!r}; nothing ran: re-send it untrimmed",
                        code=MISMATCH_CODE, headers={MISMATCH_HEADER: "allowlist"})
    return vs, vm


async def read_body(request: web.Request, vm: VersionMetrics) -> bytes:
    try:
        body = await request.read()
    except ConnectionError:  # the client went away mid-body: its error, not a 500 with a traceback
        raise PayloadError("request body truncated: client closed the connection mid-body") from None
    vm.received_bytes.inc(len(body))
    return decompress(body, request.headers.get("Content-Encoding"), request.app[CONFIG].max_body_bytes)


def _wire(o: Any) -> Tensor:
    return o if isinstance(o, Tensor) else output_to_wire(o)


# ---------------------------------------------------------------------- native
async def score(request: web.Request) -> web.Response:
    t_start = time.perf_counter()
    vs = resolve(request)
    vm = version_metrics(request, vs)
    vm.requests["score"].inc()
    try:
        mtype = codec.media_type(request.headers.get("Content-Type"))
    except PayloadError as exc:
        vm.bad_request.inc()
        raise HttpError(415, str(exc)) from None
    try:
        body = await read_body(request, vm)
        vs, vm = version_to_run(request, vs, vm)  # from here to the enqueue: no await
        t0 = time.thread_time()  # CPU time of this thread: GIL waits behind the model thread are not conversion
        req = codec.decode_request(body, mtype)
    except PayloadError:
        vm.bad_request.inc()
        raise
    t_decode = time.thread_time() - t0
    outs = await run_model(request, vs, vm, req.get("features", {}), t_decode, req.get("request_id"))
    t1 = time.perf_counter()
    names = vs.signature.output_names if vs.signature and vs.signature.output_names else [
        f"output{i}" for i in range(len(outs))]
    resp: dict[str, Any] = {"model": vs.model, "version": vs.version}
    if "request_id" in req:
        resp["request_id"] = req["request_id"]
    resp["outputs"] = {n: _wire(o) for n, o in zip(names, outs)}
    data = codec.encode(resp, mtype)
    t2 = time.perf_counter()
    vm.encode_seconds.observe(t2 - t1)
    vm.request_seconds.observe(t2 - t_start)
    return web.Response(body=data, content_type=mtype)


# ---------------------------------------------------------------------- OIP v2
async def infer(request: web.Request) -> web.Response:
    """JSON or binary tensor extension in (Inference-Header-Content-Length), JSON or binary out (leaf/oip.py)."""
    t_start = time.perf_counter()
    vs = resolve(request)
    vm = version_metrics(request, vs)
    vm.requests["infer"].inc()
    binary = request.headers.get(oip.HEADER)
    try:
        body = await read_body(request, vm)
        vs, vm = version_to_run(request, vs, vm)  # from here to the enqueue: no await
        t0 = time.thread_time()
        req, features = oip.parse_request(body, binary)
        names = vs.signature.output_names if vs.signature is not None else ()
        oip.check_outputs(req, names)
    except PayloadError:
        vm.bad_request.inc()
        raise
    outs = await run_model(request, vs, vm, features, time.thread_time() - t0, req.id)
    t1 = time.perf_counter()
    names = names or tuple(f"output{i}" for i in range(len(outs)))
    try:
        data, headers = oip.encode_response(vs.model, vs.version, names, [_wire(o) for o in outs], req)
    except PayloadError:  # an output name checked only now (signature without output names)
        vm.bad_request.inc()
        raise
    vm.encode_seconds.observe(time.perf_counter() - t1)
    vm.request_seconds.observe(time.perf_counter() - t_start)
    return web.Response(body=data, headers=headers)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(oip.server_metadata())


async def model_metadata(request: web.Request) -> web.Response:
    vs = resolve(request, need_ready=False)
    store = request.app[STORE]
    out: dict[str, Any] = {"name": vs.model, "versions": store.model_versions(vs.model), "version": vs.version,
                           "platform": vs.platform, "state": vs.state}
    if vs.error:
        out["error"] = vs.error
    if vs.reload_error:
        out["reload_error"] = vs.reload_error
    if vs.digest:
        out["parameters"] = {"trimmer_signature": vs.digest}  # what X-Trimmer-Signature must equal (docs/leaf.md)
    if vs.signature is not None:
        sig = vs.signature
        out["inputs"] = [{"name": n,
                          "datatype": WIRE_TO_OIP.get(sig.inputs[n].dtype or "", "") if n in sig.inputs else "",
                          "shape": list(sig.inputs[n].shape or ()) if n in sig.inputs else [],
                          **({"default": sig.inputs[n].default} if n in sig.inputs and sig.inputs[n].has_default
                             else {})}
                         for n in sig.input_names]
        out["outputs"] = [{**o, "datatype": WIRE_TO_OIP.get(o.get("datatype", ""), "")} if "datatype" in o else o
                          for o in vs.outputs_meta]
        out["signature"] = sig.to_json()
    return web.json_response(out)


async def model_ready(request: web.Request) -> web.Response:
    vs = resolve(request, need_ready=False)
    body = {"name": vs.model, "version": vs.version, "ready": vs.ready, "state": vs.state}
    if vs.error:
        body["error"] = vs.error
    if vs.reload_error:  # still ready: the previous archive serves
        body["reload_error"] = vs.reload_error
    return web.json_response(body, status=200 if vs.ready else 503)


async def health_live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def health_ready(request: web.Request) -> web.Response:
    store = request.app[STORE]
    versions = list(store.versions.values())
    failed = {f"{vs.model}/{vs.version}": vs.error for vs in versions if vs.state == "FAILED"}
    ready = sorted(f"{vs.model}/{vs.version}" for vs in versions if vs.ready)
    body: dict[str, Any] = {"ready": store.ready, "initial_load_done": store.initial_done,
                            "models": ready, "failed": failed}
    reload_errors = {f"{vs.model}/{vs.version}": vs.reload_error for vs in versions if vs.reload_error}
    if reload_errors:
        body["reload_errors"] = reload_errors
    if store.stopping:
        body["stopping"] = True
    return web.json_response(body, status=200 if store.ready else 503)


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(request.app[STORE].status())


async def metrics_endpoint(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def settings_endpoint(request: web.Request) -> web.Response:
    """The runtime switches in force (trimmer/settings.py, docs/settings.md)."""
    return web.json_response(settings_describe())


def make_app(store: ModelStore, metrics: LeafMetrics, config: LeafConfig) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=config.max_body_bytes)
    app[STORE], app[METRICS], app[CONFIG] = store, metrics, config
    app[BOUND] = {}
    app[MISMATCH_LOG] = RateLimitedLog(log, MISMATCH_LOG_INTERVAL_S)
    app[MODEL_ERROR_LOG] = RateLimitedLog(log, MODEL_ERROR_LOG_INTERVAL_S, logging.ERROR)
    app[DTYPE_LOG] = RateLimitedLog(log, MODEL_ERROR_LOG_INTERVAL_S)
    r = app.router
    for prefix in ("/v1/models/{name}", "/v1/models/{name}/versions/{version}"):
        r.add_post(prefix + "/score", score)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_post(prefix + "/infer", infer)
        r.add_get(prefix, model_metadata)
        r.add_get(prefix + "/ready", model_ready)
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", health_live)
    r.add_get("/v2/health/ready", health_ready)
    r.add_get("/healthz", health_live)
    r.add_get("/readyz", health_ready)
    r.add_get("/v1/models", list_models)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/admin/settings", settings_endpoint)
    return app
