"""The root's aiohttp application: routes, background tasks, graceful serve loop.

Request handlers only read the body, split it (no feature value decoded),
trim per target and await upstreams; everything slow (registry reloads,
health checks, metadata refresh) runs in background tasks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Coroutine

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from trimmer.codec import JSON, media_type
from trimmer.compression import BodyTooLarge, Decoder, DecompressError, UnsupportedEncoding, normalize
from trimmer.edge import BodyBudget, EdgeLimits, EdgeMetrics, Lease, handler_args
from trimmer.edge import install as install_edge
from trimmer.errors import DECODE_FAILURES, ConfigError, PayloadError
from trimmer.http_errors import error_middleware, error_response
from trimmer import oip_binary
from trimmer.capture import CaptureWriter
from trimmer.names import check_name
from trimmer.registry import BundleSource, Registry, RepositorySource
from trimmer.settings import describe as settings_describe
from trimmer.settings import settings
from trimmer.trim import IMPLEMENTATION as TRIM_ENGINE
from trimmer.trim import StreamTrim

from .audit import Auditor
from .config import RootConfig
from .drift import gather_drift
from .front import FrontServer
from .dataplane import SCORING_ROUTES, Body, DataPlane, NativeFormat, PreparedBody, RouteError, timeout_for
from .logs import REQUEST_ID_HEADER, request_id, request_id_for
from .metadata import MetadataSource, metadata_sources
from .metrics import Metrics
from .pipeline import pipeline_handler
from .upstream import Partition, UpstreamError

log = logging.getLogger("trimmer.root")
from trimmer.cli import package_version  # noqa: E402

VERSION = package_version()

# Binary-tensor OIP requests carry this header (trimmer/oip_binary.py trims them; the header is rewritten).
OIP_BINARY_HEADER = oip_binary.HEADER


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")


class RootState:
    """Everything one root process holds: config, registry, partitions, metrics, background tasks."""

    def __init__(self, cfg: RootConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        sources = [BundleSource(p) for p in cfg.bundles] + [RepositorySource(p) for p in cfg.repositories]
        defaults = {m: mc.default_version for m, mc in cfg.models.items() if mc.default_version is not None}
        policies, default_policy = cfg.version_policies()
        self.registry = Registry(sources, None, defaults, policies, default_policy)
        if cfg.overrides:
            self.registry.use_overrides_file(cfg.overrides)  # hot-reloaded with the bundles
        self.registry.reload()
        failed = [st for st in self.registry.sources if st.data is None]
        if failed:
            st = failed[0]
            raise ConfigError(f"{cfg.path}: allowlist source {st.source.name} failed to load: {st.last_error}")
        rejected = self.registry.snapshot.rejected_allowlists
        if rejected:  # at start a typo'd allowlist is a config error; on a reload the last good one stays
            raise ConfigError(f"{cfg.overrides}: {rejected[0]}")
        self.metrics.registry_reloads.inc()
        self.partitions = {n: Partition(pc, cfg.timeouts, self.metrics) for n, pc in cfg.partitions.items()}
        self.meta_sources: list[MetadataSource] = metadata_sources(
            self.partitions, cfg.partitions, {m: mc.default_version for m, mc in cfg.models.items()})
        self.auditor = Auditor(cfg.audit_sample_rate, cfg.audit_max_concurrent, self.metrics, cfg.timeouts.request_s,
                               cfg.deadline_header, cfg.audit_tolerance)
        self.plane = DataPlane(cfg, self.registry, self.partitions, self.metrics, self.auditor)
        self.capture = (CaptureWriter(cfg.capture_path, cfg.capture_sample_rate, cfg.capture_max_bytes)
                        if cfg.capture_path is not None else None)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.draining = False
        self.started = time.time()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._stop = asyncio.Event()
        for p in self.partitions.values():
            await p.start()
        await asyncio.gather(*(p.check_health() for p in self.partitions.values()))
        for src in self.meta_sources:
            await src.refresh(self.cfg.timeouts.request_s)
            self.registry.add_source(src)
        self.metrics.registry_reloads.inc()
        for p in self.partitions.values():
            self._spawn(p.health_loop(self.cfg.timeouts.health_interval_s, self._stop), f"health:{p.name}")
        for src in self.meta_sources:
            self._spawn(self._metadata_loop(src), f"metadata:{src.name}")
        if self.cfg.watch:
            self._spawn(self._watch(), "registry-watch")

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.auditor.stop()
        if self.capture is not None:
            self.capture.close()
        for p in self.partitions.values():
            await p.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    async def _watch(self) -> None:
        gen = self.registry.snapshot.generation
        try:
            task = asyncio.ensure_future(self.registry.watch(self._stop))
            while not task.done():
                await asyncio.sleep(0.5)
                self.metrics.sync_sources(self.registry.source_states())  # per-source reload metrics, every worker
                if self.registry.snapshot.generation != gen:
                    gen = self.registry.snapshot.generation
                    self.metrics.registry_reloads.inc()
            task.result()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("allowlist hot reload stopped; allowlists stay as last loaded")

    async def _metadata_loop(self, src: MetadataSource) -> None:
        meta = self.cfg.partitions[src.partition.name].metadata
        assert meta is not None  # a MetadataSource exists only for a partition with metadata settings
        interval = meta.refresh_s
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
                return
            except asyncio.TimeoutError:
                pass
            try:
                if await src.refresh(self.cfg.timeouts.request_s):
                    self.registry.reload([src.name])
                    self.metrics.registry_reloads.inc()
            except Exception:
                log.exception("metadata refresh of %s failed", src.name)

    def reload(self) -> None:
        """Re-read the overrides file and every file source (POST /admin/reload)."""
        self.registry.reload_overrides()
        self.registry.reload(
            [st.source.name for st in self.registry.sources if not isinstance(st.source, MetadataSource)])
        self.metrics.registry_reloads.inc()

    # ------------------------------------------------------------------ readiness
    def readiness(self) -> tuple[bool, list[str]]:
        problems = []
        if self.draining:
            problems.append("shutting down")
        for st in self.registry.sources:
            if st.data is None and not isinstance(st.source, MetadataSource):
                problems.append(self.public_text(f"allowlist source {st.source.name} not loaded: {st.last_error}"))
        for p in self.partitions.values():
            if not p.any_up:
                problems.append(f"partition {p.name}: no reachable replica")
        return not problems, problems


    def public_text(self, text: str) -> str:
        """`text` without this host's absolute paths: the config's directory becomes `.`, other sources their file
        name."""
        base = str(Path(self.cfg.path).absolute().parent)
        text = text.replace(base + os.sep, "./")
        for _, st in self.registry.source_states():
            name = st.source.name
            if os.path.isabs(name):
                text = text.replace(name, ".../" + os.path.basename(name))
        return text


# ---------------------------------------------------------------------- handlers
STATE = web.AppKey("state", RootState)
# Routes whose requests `capture:` samples (trimmer/capture.py): the scoring routes, not metadata or admin.
CAPTURED_ROUTES = frozenset(name for _, name, _ in SCORING_ROUTES)
BUDGET = web.AppKey("body_budget", BodyBudget)  # set by serve(): limits.max_inflight_body_bytes across the process


def _timeout(request: web.Request, cfg: RootConfig) -> float:
    return timeout_for(request.headers, cfg)


def _busy(budget: BodyBudget) -> web.HTTPServiceUnavailable:
    return web.HTTPServiceUnavailable(
        reason=f"server busy: request bodies in flight are at limits.max_inflight_body_bytes ({budget.cap} bytes); "
               "retry shortly",
        headers={"Retry-After": "1"})


async def _pipeline_body(request: web.Request) -> bytes:
    return (await _read_body(request, "pipeline")).joined()


async def _read_body(request: web.Request, route: str, stream: StreamTrim | None = None) -> Body:
    """The request body, plain: within limits.max_body_bytes (also after decompression) and the process's body budget.

    aiohttp's own inflation is off (trimmer/edge.py handler_args): a Content-Encoding body is decoded here,
    chunk by chunk through trimmer/compression.py, and then trimmed like a plain one.
    """
    state = request.app[STATE]
    limit = state.cfg.max_body_bytes
    n = request.content_length
    if n is not None and n > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=n)
    budget = request.app.get(BUDGET)
    lease = None
    if budget is not None:
        lease = budget.lease()
        task = asyncio.current_task()
        assert task is not None  # a request handler runs in a task
        task.add_done_callback(lease.close)  # held until the response is written
        if n is not None and not lease.take(n):
            raise _busy(budget)
    try:
        encoding = normalize(request.headers.get("Content-Encoding"))
    except UnsupportedEncoding as exc:
        _count_decode(request, "other", "unsupported")  # not the client's string: labels stay bounded
        raise web.HTTPUnsupportedMediaType(reason=str(exc)) from None
    if n is not None and encoding is None and "chunked" not in request.headers.get("Transfer-Encoding", ""):
        body = await read_chunks(request, n, stream.feed if stream is not None else None)  # as received: no copy
        received = len(body)
    else:
        body, received = await _read_streamed(request, limit, encoding, lease if n is None else None, lease, stream)
    state.metrics.add(state.metrics.client_bytes, (route,), received)
    capture = state.capture
    if capture is not None and request.match_info.route.name in CAPTURED_ROUTES and capture.sample():
        # The body as decoded; raw path (already validated or refused by the handler's checks on replay).
        if capture.record(request.rel_url.raw_path, request.headers.get("Content-Type", "application/msgpack"),
                          body.joined(), dict(request.headers)):
            state.metrics.captured.inc()
    return body


async def read_chunks(request: web.Request, n: int, on_chunk: Callable[[bytes], None] | None = None) -> Body:
    """Exactly the Content-Length bytes of a plain (not chunked, not encoded) body, without joining them.

    `on_chunk` sees each chunk as it arrives (the streaming trim scans it then).
    """
    chunks: list[bytes] = []
    got = 0
    content = request.content
    try:
        while got < n:
            chunk, _ = await content.readchunk()
            if not chunk:
                raise PayloadError(f"request body truncated: Content-Length {n}, got {got} bytes")
            chunks.append(chunk)
            got += len(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
    except ConnectionError:  # the client went away mid-body: its error, not a 500 with a traceback
        raise PayloadError(f"request body truncated: client closed the connection before {n} bytes arrived") from None
    if got > n:  # the parser never hands out more than Content-Length; guard anyway
        raise PayloadError(f"request body longer than its Content-Length {n}")
    return Body(chunks)


def _count_decode(request: web.Request, encoding: str, outcome: str) -> None:
    budget = request.app.get(BUDGET)
    if budget is not None and budget.metrics is not None:
        budget.metrics.decoded.labels(encoding or "?", outcome).inc()


async def _read_streamed(request: web.Request, limit: int, encoding: str | None, raw_lease: Lease | None,
                         out_lease: Lease | None, stream: StreamTrim | None) -> tuple[Body, int]:
    """A chunked and/or Content-Encoding body: (plain body, bytes received). Raw and decoded sizes both stop at
    `limit`."""
    decoder = Decoder(encoding, limit) if encoding is not None else None
    chunks: list[bytes] = []
    raw = 0
    n = request.content_length

    def keep(pieces: list[bytes]) -> None:
        if decoder is not None and out_lease is not None and not out_lease.take(sum(map(len, pieces))):
            raise _busy(out_lease.budget)
        for piece in pieces:
            chunks.append(piece)
            if stream is not None:
                stream.feed(piece)

    try:
        content = request.content
        while True:
            chunk = await content.readany()
            if not chunk:
                break
            raw += len(chunk)
            if raw > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=raw)
            if raw_lease is not None and not raw_lease.take(len(chunk)):
                raise _busy(raw_lease.budget)
            keep(decoder.feed(chunk) if decoder is not None else [chunk])
        if n is not None and raw < n:
            raise PayloadError(f"request body truncated: Content-Length {n}, got {raw} bytes")
        if decoder is not None:
            keep(decoder.finish())
            _count_decode(request, encoding or "", "ok")
    except (ConnectionError, RequestPayloadError):  # the client went away mid-body: its error, not a 500
        raise PayloadError("request body truncated: client closed the connection mid-body") from None
    except BodyTooLarge as exc:
        _count_decode(request, exc.encoding, "too_large")
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=exc.decoded) from None
    except DecompressError:
        _count_decode(request, encoding or "", "corrupt")
        raise
    return Body(chunks), raw


def _outcome_response(out) -> web.Response:
    resp = web.Response(body=out.body, status=out.status)
    resp.headers["Content-Type"] = out.content_type
    for name in ("Retry-After", OIP_BINARY_HEADER):  # binary OIP outputs: the client needs the JSON header's length
        value = out.headers.get(name)
        if value is not None:
            resp.headers[name] = value
    return resp


async def handle_fanout(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _read_body(request, "fanout")
    media = media_type(request.content_type)
    prepared = PreparedBody(body, media)
    if prepared.base is not body:
        body.release()  # each target is trimmed from the copy without `models`; the client's bytes are not read again
    plan = state.plane.plan_fanout(media, _timeout(request, state.cfg))
    status, out = await state.plane.fan_out(plan, prepared, len(body))
    return web.Response(body=out, status=status, content_type=media)


async def handle_model_score(request: web.Request) -> web.Response:
    """The shortcut route, for connections root/front.py handed over (or all of them with `front: aiohttp`)."""
    state = request.app[STATE]
    media = media_type(request.content_type)
    plan = state.plane.plan_single("model", request.match_info["name"], request.match_info.get("version"),
                                   NativeFormat(media), media, _timeout(request, state.cfg))
    # The allowlist is known before the body arrives: msgpack is trimmed chunk by chunk as each chunk is read.
    stream = plan.stream_trim(min(request.content_length or 0, state.cfg.max_body_bytes))
    if stream is not None:
        state.metrics.eager_trims.inc()
    body = await _read_body(request, "model", stream)
    return _outcome_response(await state.plane.score(plan, body, stream))


async def handle_oip_infer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await _read_body(request, "oip")
    plan = state.plane.plan_oip(request.match_info["name"], request.match_info.get("version"), request.headers,
                                _timeout(request, state.cfg))
    return _outcome_response(await state.plane.score(plan, body))


async def handle_oip_get(request: web.Request) -> web.Response:
    """Model metadata and readiness: proxied to the model's partition."""
    model = request.match_info["name"]
    version = request.match_info.get("version")
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "")
    if request.match_info.route.name in ("oip_model_ready", "oip_model_version_ready"):
        path += "/ready"
    return await _proxy(request, model, version, path)


async def handle_oip_model_proxy(request: web.Request) -> web.Response:
    """Every other `/v2/models/{m}/...` and `/v2/repository/models/{m}/...` route (Triton's config, stats,
    trace settings, load/unload): proxied to the model's partition, path rebuilt from validated segments."""
    model = request.match_info["name"]
    segments = request.match_info["tail"].split("/")
    try:
        for seg in segments:
            check_name("path segment", seg)
    except PayloadError as exc:
        return error_response(400, str(exc))
    prefix = "/v2/repository/models" if request.path.startswith("/v2/repository/") else "/v2/models"
    return await _proxy(request, model, None, f"{prefix}/{model}/" + "/".join(segments))


async def _proxy(request: web.Request, model: str, version: str | None, path: str) -> web.Response:
    state = request.app[STATE]
    try:
        part = state.plane.target(model, version, lambda v: path).partition
    except RouteError as exc:
        return error_response(exc.status, exc.message)
    body = None
    headers = {"Accept": request.headers.get("Accept", "application/json")}
    if request.method == "POST":
        body = (await _read_body(request, "oip")).joined()
        headers["Content-Type"] = request.headers.get("Content-Type", JSON)
    try:
        resp = await part.request(request.method, path, body, headers, _timeout(request, state.cfg))
    except UpstreamError as exc:
        return error_response(exc.status, f"model {model!r} (partition {part.name!r}): {exc}")
    out = web.Response(body=resp.body, status=resp.status)
    out.headers["Content-Type"] = resp.content_type
    return out


async def handle_repository_index(request: web.Request) -> web.Response:
    """`POST /v2/repository/index`: every partition's index, concatenated (each entry gains its `partition`)."""
    state = request.app[STATE]
    body = (await _read_body(request, "oip")).joined() or b"{}"
    timeout = _timeout(request, state.cfg)

    async def one(part: Partition) -> list:
        try:
            resp = await part.request("POST", "/v2/repository/index", body,
                                      {"Content-Type": JSON, "Accept": JSON}, timeout)
            entries = msgspec.json.decode(resp.body) if resp.status == 200 else []
        except _UPSTREAM_OR_DECODE:
            return []
        return [{**e, "partition": part.name} for e in entries if isinstance(e, dict)] if isinstance(
            entries, list) else []

    lists = await asyncio.gather(*(one(p) for p in state.partitions.values()))
    return json_response([e for lst in lists for e in lst])


async def handle_server_metadata(request: web.Request) -> web.Response:
    """The root's own OIP server metadata, with each partition's (`GET /v2` of a replica) beside it."""
    state = request.app[STATE]
    timeout = min(_timeout(request, state.cfg), 2.0)

    async def one(part: Partition) -> Any:
        try:
            resp = await part.request("GET", "/v2", None, {"Accept": JSON}, timeout)
            return msgspec.json.decode(resp.body) if resp.status == 200 else {
                "error": f"GET /v2 answered {resp.status}"}
        except _UPSTREAM_OR_DECODE as exc:
            return {"error": str(exc)[:200]}

    metas = await asyncio.gather(*(one(p) for p in state.partitions.values()))
    return json_response({"name": "feature-trimmer-root", "version": VERSION, "extensions": ["binary_tensor_data"],
                          "upstreams": dict(zip(state.partitions, metas))})


async def handle_live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def handle_healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    ok, problems = request.app[STATE].readiness()
    return json_response({"ready": ok, "problems": problems}, 200 if ok else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.sync_sources(state.registry.source_states())
    body, ctype = state.metrics.exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = ctype
    return resp


async def handle_allowlists(request: web.Request) -> web.Response:
    state = request.app[STATE]
    status = state.registry.status()
    status["partitions"] = {n: p.status() for n, p in state.partitions.items()}
    status["routes"] = {m: mc.partition for m, mc in state.cfg.models.items()}
    return web.Response(body=state.public_text(msgspec.json.encode(status).decode()), content_type="application/json")


async def handle_audit(request: web.Request) -> web.Response:
    """Equivalence audit settings, this process's counts and its most recent mismatches (root/audit.py)."""
    return json_response(request.app[STATE].auditor.status())


async def handle_drift(request: web.Request) -> web.Response:
    """Per model/version: inputs the leaves defaulted and features they received unused (root/drift.py)."""
    state = request.app[STATE]
    return json_response(await gather_drift(state.partitions, state.registry, min(state.cfg.timeouts.request_s, 10.0)))


async def handle_settings(request: web.Request) -> web.Response:
    """The runtime switches in force (trimmer/settings.py, docs/settings.md)."""
    return json_response(settings_describe())


async def handle_reload(request: web.Request) -> web.Response:
    state = request.app[STATE]
    await asyncio.get_running_loop().run_in_executor(None, state.reload)
    return web.Response(body=state.public_text(msgspec.json.encode(state.registry.status()).decode()),
                        content_type="application/json")


# an upstream failed, or sent garbage
_UPSTREAM_OR_DECODE: tuple[type[Exception], ...] = (UpstreamError, *DECODE_FAILURES)


def _count_request(request: web.Request, status: int) -> None:
    metrics = request.app[STATE].metrics
    metrics.add(metrics.client_requests, (request.match_info.route.name or "other", str(status)))


# Every failure leaves as JSON {"error": ...} (trimmer/http_errors.py, shared with the leaf); counts requests by route
# and status; sets and echoes the request id.
errors_middleware = error_middleware(
    log, count=_count_request,
    too_large_hint=lambda request: f"limits.max_body_bytes is {request.app[STATE].cfg.max_body_bytes}",
    request_ids=request_id_for, request_id_var=request_id, request_id_header=REQUEST_ID_HEADER)


def build_apps(state: RootState) -> tuple[web.Application, web.Application | None]:
    """(main app, separate admin app or None). Admin routes: /metrics and /admin/*."""
    cfg = state.cfg
    main = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[errors_middleware],
                           handler_args={"max_field_size": 16384, "read_bufsize": 1 << 20})
    main[STATE] = state
    r = main.router
    scoring = {"fanout": handle_fanout, "model": handle_model_score, "oip": handle_oip_infer}
    for path, name, kind in SCORING_ROUTES:  # the table root/front.py matches too
        r.add_post(path, scoring[kind], name=name)
    r.add_post("/v1/pipelines/{name}/score", pipeline_handler(STATE, _timeout, _pipeline_body),
               name="pipeline")  # root/pipeline.py
    r.add_get("/v2/models/{name}", handle_oip_get, name="oip_metadata")
    r.add_get("/v2/models/{name}/ready", handle_oip_get, name="oip_model_ready")
    r.add_get("/v2/models/{name}/versions/{version}", handle_oip_get, name="oip_metadata_version")
    r.add_get("/v2/models/{name}/versions/{version}/ready", handle_oip_get, name="oip_model_version_ready")
    r.add_post("/v2/repository/index", handle_repository_index, name="oip_repository_index")
    for method in ("GET", "POST"):
        r.add_route(method, "/v2/models/{name}/{tail:.+}", handle_oip_model_proxy,
                    name=f"oip_model_other_{method.lower()}")
        r.add_route(method, "/v2/repository/models/{name}/{tail:.+}", handle_oip_model_proxy,
                    name=f"oip_repository_{method.lower()}")
    r.add_get("/v2", handle_server_metadata, name="oip_server")
    r.add_get("/v2/health/live", handle_live, name="oip_live")
    r.add_get("/v2/health/ready", handle_readyz, name="oip_ready")
    r.add_get("/healthz", handle_healthz, name="healthz")
    r.add_get("/readyz", handle_readyz, name="readyz")

    admin: web.Application | None = None
    if cfg.admin_enabled:
        if cfg.admin_port is not None:
            admin = web.Application(middlewares=[errors_middleware])
            admin[STATE] = state
            ar = admin.router
            ar.add_get("/healthz", handle_healthz, name="healthz")
            ar.add_get("/readyz", handle_readyz, name="readyz")
        else:
            ar = r
        ar.add_get("/metrics", handle_metrics, name="metrics")
        ar.add_get("/admin/allowlists", handle_allowlists, name="admin_allowlists")
        ar.add_post("/admin/reload", handle_reload, name="admin_reload")
        ar.add_get("/admin/audit", handle_audit, name="admin_audit")
        ar.add_get("/admin/settings", handle_settings, name="admin_settings")
        ar.add_get("/admin/drift", handle_drift, name="admin_drift")
    return main, admin


async def serve(cfg: RootConfig, reuse_port: bool = False, ready_line: bool = True) -> None:
    """Run until SIGTERM/SIGINT, then stop accepting, drain in-flight requests (timeouts.drain_s) and close sessions."""
    state = RootState(cfg)
    await state.start()
    main, admin = build_apps(state)
    edge_metrics = EdgeMetrics("trimmer_root", state.metrics.registry)
    main[BUDGET] = BodyBudget(cfg.max_inflight_body_bytes, edge_metrics)
    t = cfg.timeouts
    limits = EdgeLimits(t.client_header_s, t.client_body_s, t.client_keepalive_s,
                        cfg.max_connections, t.client_body_min_rate)
    runners: list[web.AppRunner] = []
    fronts: list[tuple[asyncio.Server, FrontServer]] = []
    try:
        # The admin listener first: once the service port answers (readiness), the admin routes do too.
        for app, host, port in ((admin, cfg.admin_host, cfg.admin_port), (main, cfg.host, cfg.port)):
            if app is None:
                continue
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=cfg.timeouts.drain_s,
                                   access_log=None, **handler_args(limits))
            await runner.setup()
            # timeouts, connection cap
            edge = install_edge(runner, limits, edge_metrics, "root admin" if app is admin else "root")
            runners.append(runner)
            if app is main and settings().fast_listener:
                # The service port: the fast listener (root/front.py) serves the scoring routes and hands the rest to
                # aiohttp.
                assert runner.server is not None and port is not None  # the service port: cfg.port, an int
                front = FrontServer(state, runner.server, edge, limits, edge_metrics, main[BUDGET])
                server = await asyncio.get_running_loop().create_server(
                    front, host, port, reuse_port=reuse_port or None, backlog=1024)
                fronts.append((server, front))
                addrs = [s.getsockname()[:2] for s in server.sockets]
            else:
                site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
                await site.start()
                addrs = list(runner.addresses)
            if ready_line:
                log.info("root %s listening on %s (pid %d)", "admin" if app is admin else "service",
                         ", ".join(f"http://{a[0]}:{a[1]}" for a in addrs), os.getpid())
        if ready_line and not reuse_port:  # `--workers N`: the supervisor logs them once
            log.info("settings: %s; trim engine: %s", settings().line(), TRIM_ENGINE)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("root (pid %d) shutting down: draining in-flight requests for up to %.1fs",
                 os.getpid(), cfg.timeouts.drain_s)
        state.draining = True
    finally:
        for server, front in fronts:
            server.close()  # stop accepting; requests in progress finish (timeouts.drain_s)
            await front.drain(cfg.timeouts.drain_s)
        for runner in runners:
            await runner.cleanup()  # stops listening, waits for handlers (shutdown_timeout), then closes
        await state.stop()
        log.info("root (pid %d) stopped", os.getpid())


__all__ = ["RootState", "build_apps", "serve", "STATE"]
