"""`POST /v1/pipelines/{name}/score`: one client request through several models in order.

Why in the root: the root already holds every model's allowlist, routes and counts per model, and sits
next to the leaves; chaining there saves the client a round trip per stage and, more to the point for this
project, each hop is trimmed like any other request: a stage's request is the client's features plus the
earlier stages' outputs mapped to feature names (root/pipeline_config.py), and `DataPlane.send` cuts it down to
that stage's model allowlist (or forwards it untrimmed, counted, when none is known: fail open).

Values are never decoded: feature values and stage outputs travel as raw msgpack / JSON bytes (msgspec
Raw), so an output tensor becomes the next stage's feature byte for byte. Responses:

    {"pipeline": name, ["request_id"], "outputs": <last stage's outputs>,
     "stages": {stage name: {"model", "version", "outputs"}}}

Errors name the failing stage: {"error": "pipeline 'feed' stage 3/4 'ranker' (model 'ranker'): ...",
"stage": "ranker"}, with the stage's status (a root-made 502 when an output it needs is missing, 504 when the
pipeline's time budget ran out before the stage).
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import msgspec
from aiohttp import web
from prometheus_client import Counter

from trimmer.codec import MSGPACK, is_msgpack, media_type
from trimmer.errors import PayloadError, decode_errors
from trimmer.names import check_name

from .dataplane import Body, NativeFormat
from .pipeline_config import PipelineConfig

Raw = msgspec.Raw
_CODECS: dict[str, tuple[Any, Any, str]] = {  # media type -> (decoder, encoder, format name)
    MSGPACK: (msgspec.msgpack.Decoder(dict[str, Raw]), msgspec.msgpack.Encoder(), "msgpack"),
    "application/json": (msgspec.json.Decoder(dict[str, Raw]), msgspec.json.Encoder(), "JSON"),
}


class StageError(Exception):
    def __init__(self, status: int, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.stage = stage


class PipelineMetrics:
    """Per pipeline and stage outcomes; the per-hop bytes and trims are the data plane's per-model metrics."""

    def __init__(self, registry: Any) -> None:
        self.stages = Counter("trimmer_root_pipeline_stages", "Pipeline stage calls by outcome (ok, error)",
                              ("pipeline", "stage", "outcome"), registry=registry)
        self.requests = Counter("trimmer_root_pipeline_requests",
                                "Pipeline requests by outcome (ok, or the failing stage's name)",
                                ("pipeline", "outcome"), registry=registry)


def _decode(data: bytes | Raw, media: str, what: str) -> dict[str, Raw]:
    dec, _, fmt = _CODECS[media]
    with decode_errors(f"{fmt} {what}", shape=f"{what} must be a map with string keys"):
        return dec.decode(data)


async def run_pipeline(state: Any, pm: PipelineMetrics, pipe: PipelineConfig, body: bytes,
                       media: str, budget_s: float) -> bytes:
    """Every stage in order; returns the encoded response or raises StageError / PayloadError."""
    top = _decode(body, media, "request")
    features = _decode(top.pop("features"), media, '"features"') if "features" in top else {}
    enc = _CODECS[media][1]
    outputs: dict[str, dict[str, Raw]] = {}
    stages_out: dict[str, dict[str, Raw]] = {}
    deadline = time.monotonic() + budget_s
    n = len(pipe.stages)
    for i, stage in enumerate(pipe.stages, 1):
        where = f"pipeline {pipe.name!r} stage {i}/{n} {stage.name!r} (model {stage.model!r})"
        try:
            feats = dict(features)
            for feat, src, out in stage.inputs:
                value = outputs[src].get(out)
                if value is None:
                    raise StageError(502,
                                     f"input {feat!r} wants output {out!r} of stage {src!r}, which answered without it "
                                          f"(outputs: {', '.join(outputs[src]) or 'none'})")
                feats[feat] = value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StageError(504, f"the pipeline's time budget ({budget_s:.3g} s) ran out before this stage")
            stage_body = enc.encode({**top, "features": feats})
            plan = state.plane.plan_single("model", stage.model, stage.version, NativeFormat(media), media, remaining)
            res = await state.plane.score(plan, Body.of(stage_body))
            if res.error is not None or res.status >= 300:
                raise StageError(res.status, res.error or f"upstream answered {res.status}")
            if is_msgpack(res.content_type) != (media == MSGPACK):
                raise StageError(502, f"answered {res.content_type}, not the request's {media}")
            try:
                answer = _decode(res.body, media, "answer")
                outs = _decode(answer["outputs"], media, "outputs") if "outputs" in answer else {}
            except PayloadError as exc:
                raise StageError(502, f"undecodable answer: {exc}") from None
        except StageError as exc:
            pm.stages.labels(pipe.name, stage.name, "error").inc()
            pm.requests.labels(pipe.name, stage.name).inc()
            raise StageError(exc.status, f"{where}: {exc}", stage.name) from None
        pm.stages.labels(pipe.name, stage.name, "ok").inc()
        outputs[stage.name] = outs
        stages_out[stage.name] = {"model": answer.get("model", Raw(enc.encode(stage.model))),
                                  **({"version": answer["version"]} if "version" in answer else {}),
                                  "outputs": answer.get("outputs", Raw(enc.encode({})))}
    pm.requests.labels(pipe.name, "ok").inc()
    resp: dict[str, Any] = {"pipeline": pipe.name}
    if "request_id" in top:
        resp["request_id"] = top["request_id"]
    last = pipe.stages[-1].name
    resp["outputs"] = stages_out[last]["outputs"]
    resp["stages"] = stages_out
    return enc.encode(resp)


def pipeline_handler(state_key: Any, timeout_for: Callable[[web.Request, Any], float],
                     read_body: Callable[[web.Request], Awaitable[bytes]]) -> Callable[[web.Request], Any]:
    """The aiohttp handler (root/app.py registers it; the state key, deadline rule and body reader are passed in, not
    imported). `read_body` is the scoring routes' reader: the body limit, the body budget and Content-Encoding."""
    async def handle(request: web.Request) -> web.Response:
        state = request.app[state_key]
        pm = getattr(state, "pipeline_metrics", None)
        if pm is None:  # registered once per root state, on its metrics registry
            pm = state.pipeline_metrics = PipelineMetrics(state.metrics.registry)
        name = check_name("pipeline name", request.match_info["name"])
        pipe = state.cfg.pipelines.get(name)
        body = await read_body(request)
        if pipe is None:
            known = ", ".join(sorted(state.cfg.pipelines)) or "none configured"
            return web.json_response({"error": f"unknown pipeline {name!r}; pipelines: {known}"}, status=404)
        media = media_type(request.content_type)
        try:
            out = await run_pipeline(state, pm, pipe, body, media, timeout_for(request, state.cfg))
        except StageError as exc:
            return web.Response(body=msgspec.json.encode({"error": str(exc), "stage": exc.stage}), status=exc.status,
                                content_type="application/json")
        return web.Response(body=out, content_type=media)

    return handle


__all__ = ["pipeline_handler", "run_pipeline", "PipelineMetrics", "StageError"]
