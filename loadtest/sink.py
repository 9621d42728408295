"""A tiny stand-in upstream (native + OIP v2) for the root's tests and benchmark.

It reports what it received (feature / input names, top-level keys, body
size, headers) instead of running a model, so tests can see exactly what the
root forwarded, and the benchmark can measure the root without a model's cost.
`--echo-model M` answers M's requests with the exact (decoded) body received, so a test can compare
the bytes the root forwarded with an independent oracle.
Run: `python -m loadtest.sink --port N [--fail-model M] [--garbage-model M] [--echo-model M] [--delay-ms D]
[--oip-inputs model=a,b] [--unversioned]`.
Never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib

import msgspec
from aiohttp import web

from trimmer.compression import decompress
from trimmer.malloc import tune_for_large_bodies

_mp = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_js = msgspec.json.Decoder(dict[str, msgspec.Raw])


MAX_BODY = 1 << 30  # the largest body the sink accepts, raw and decoded

def build_app(fail_models: set[str], delay_ms: float, oip_inputs: dict[str, list[str]], small: bool,
              garbage_models: frozenset[str] = frozenset(), echo_models: frozenset[str] = frozenset(),
              unversioned: bool = False) -> web.Application:
    # auto_decompress off: aiohttp would try to decode zstd itself (needs backports.zstd); trimmer/compression.py
    # decodes here, with the root's and the leaf's bounded decoders.
    app = web.Application(client_max_size=MAX_BODY, handler_args={"auto_decompress": False})

    async def score(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        version = request.match_info.get("version")
        raw = await request.read()
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if name in fail_models:
            return web.json_response({"error": f"model {name} failed on purpose"}, status=500)
        if name in garbage_models:  # a broken peer: 200 with a body that is not what its Content-Type says
            return web.Response(body=b"\xc1\xc1 not msgpack {",
                                content_type=request.content_type or "application/msgpack")
        if small:
            return web.Response(body=b"\x81\xa2ok\xc3", content_type="application/msgpack")
        body = decompress(raw, request.headers.get("Content-Encoding"), MAX_BODY)
        if name in echo_models:
            return web.Response(body=body, content_type=request.content_type or "application/msgpack")
        is_mp = "msgpack" in (request.content_type or "")
        dec = _mp if is_mp else _js
        top = dec.decode(body)
        feats = dec.decode(top["features"]) if "features" in top else {}
        out = {"model": name, "version": version, "features": list(feats), "keys": list(top), "body_bytes": len(body),
               "body_sha256": hashlib.sha256(body).hexdigest(), "wire_bytes": len(raw),
               "encoding": request.headers.get("Content-Encoding"), "deadline_ms": request.headers.get("X-Deadline-Ms")}
        if is_mp:
            return web.Response(body=msgspec.msgpack.encode(out), content_type="application/msgpack")
        return web.Response(body=msgspec.json.encode(out), content_type="application/json")

    async def infer(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name in fail_models:
            return web.json_response({"error": f"model {name} failed on purpose"}, status=500)
        body = decompress(await request.read(), request.headers.get("Content-Encoding"), MAX_BODY)
        hlen = request.headers.get("Inference-Header-Content-Length")
        doc = msgspec.json.decode(body[:int(hlen)] if hlen is not None else body)
        names = [i["name"] for i in doc.get("inputs", [])]
        outputs = [{"name": "received", "datatype": "BYTES", "shape": [len(names)], "data": names}]
        if hlen is not None:  # binary tensor extension: also report the bytes after the JSON header
            outputs.append({"name": "binary_bytes", "datatype": "INT64", "shape": [1], "data": [len(body) - int(hlen)]})
        return web.json_response({"model_name": name, "model_version": request.match_info.get("version"),
                                  "id": doc.get("id"), "outputs": outputs})

    async def metadata(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in oip_inputs:
            return web.json_response({"error": f"unknown model {name}"}, status=404)
        return web.json_response({"name": name, "versions": [] if unversioned else ["1"], "platform": "sink",
                                  "inputs": [{"name": n, "datatype": "FP32", "shape": [-1]} for n in oip_inputs[name]],
                                  "outputs": [{"name": "received", "datatype": "BYTES", "shape": [-1]}]})

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def no_versions(request: web.Request) -> web.Response:
        # As Seldon MLServer 1.7 answers a versioned path for a model served without versions.
        return web.json_response({"error": f"Model {request.match_info['name']} with version "
                                           f"{request.match_info['version']} not found"},
                                 status=404)

    async def config(request: web.Request) -> web.Response:  # Triton's extension routes, as a stand-in
        return web.json_response({"name": request.match_info["name"], "platform": "sink", "max_batch_size": 0,
                                  "route": request.path})

    async def server(request: web.Request) -> web.Response:
        return web.json_response({"name": "sink", "version": "0", "extensions": ["model_configuration"]})

    async def index(request: web.Request) -> web.Response:
        return web.json_response([{"name": m, "version": "1", "state": "READY"} for m in sorted(oip_inputs)])

    if unversioned:
        score_v = infer_v = metadata_v = no_versions
    else:
        score_v, infer_v, metadata_v = score, infer, metadata
    r = app.router
    r.add_post("/v1/models/{name}/score", score)
    r.add_post("/v1/models/{name}/versions/{version}/score", score_v)
    r.add_post("/v2/models/{name}/infer", infer)
    r.add_post("/v2/models/{name}/versions/{version}/infer", infer_v)
    r.add_get("/v2/models/{name}", metadata)
    r.add_get("/v2/models/{name}/versions/{version}", metadata_v)
    r.add_get("/v2/models/{name}/ready", ready)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2/models/{name}/config", config)
    r.add_get("/v2/models/{name}/versions/{version}/stats", config)
    r.add_get("/v2", server)
    r.add_post("/v2/repository/index", index)
    r.add_get("/v2/health/live", ready)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.sink")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fail-model", action="append", default=[])
    p.add_argument("--garbage-model", action="append", default=[],
                   help="answer 200 with an undecodable body for this model")
    p.add_argument("--echo-model", action="append", default=[],
                   help="answer this model's requests with the body received")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--oip-inputs", action="append", default=[], help="model=name1,name2 (served as OIP metadata)")
    p.add_argument("--small", action="store_true", help="answer a fixed tiny body without decoding (benchmark)")
    p.add_argument("--unversioned", action="store_true",
                   help='serve models without versions, as MLServer does: metadata '
                   '"versions": [] and 404 on every versioned path')
    a = p.parse_args(argv)
    oip = {}
    for spec in a.oip_inputs:
        m, _, names = spec.partition("=")
        oip[m] = [n for n in names.split(",") if n]
    tune_for_large_bodies()  # as the real root and leaf do, so bench comparisons stay like for like
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(build_app(set(a.fail_model), a.delay_ms, oip, a.small, frozenset(a.garbage_model),
                          frozenset(a.echo_model), a.unversioned), host=a.host, port=a.port, print=None,
                          access_log=None,
                shutdown_timeout=2)


if __name__ == "__main__":
    main()
