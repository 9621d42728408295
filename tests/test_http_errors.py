"""trimmer/http_errors.py on a real aiohttp server (loopback, in-process): every failure is one-line JSON with
the right status; counting and request ids as the root uses them. Also codec.is_msgpack."""

from __future__ import annotations

import contextvars
import json
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from trimmer.codec import is_json, is_msgpack
from trimmer.errors import PayloadError
from trimmer.http_errors import HttpError, error_middleware

log = logging.getLogger("test.http_errors")
rid_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("test_rid", default=None)


async def deliberate(request: web.Request) -> web.Response:
    raise HttpError(503, "loading; retry shortly", code="loading", headers={"Retry-After": "1"})


async def bad_payload(request: web.Request) -> web.Response:
    raise PayloadError("feature 'x': not a tensor")


async def read_all(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


async def busy(request: web.Request) -> web.Response:
    raise web.HTTPServiceUnavailable(headers={"Retry-After": "2", "X-Other": "dropped"})


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ok")


async def bug(request: web.Request) -> web.Response:
    raise ValueError("first line\nsecond line")


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"rid": rid_var.get()})


async def client_for(**kw) -> TestClient:
    app = web.Application(middlewares=[error_middleware(log, **kw)], client_max_size=10)
    for path, h in (("/deliberate", deliberate), ("/payload", bad_payload), ("/busy", busy), ("/redirect", redirect),
                    ("/bug", bug), ("/ok", ok)):
        app.router.add_get(path, h, name=path.strip("/"))
    app.router.add_post("/read", read_all, name="read")
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def _get(client: TestClient, path: str, **kw) -> tuple[int, dict, CIMultiDict]:
    async with client.request(kw.pop("method", "GET"), path, allow_redirects=False, **kw) as r:
        text = await r.text()
        return r.status, (json.loads(text) if r.content_type == "application/json" else {"text": text}), CIMultiDict(
            r.headers)


async def test_each_failure_kind_is_one_line_json_with_its_status(caplog):
    client = await client_for()
    try:
        assert (await _get(client, "/deliberate"))[:2] == (503, {"error": "loading; retry shortly", "code": "loading"})
        assert (await _get(client, "/deliberate"))[2]["Retry-After"] == "1"
        assert (await _get(client, "/payload"))[:2] == (400, {"error": "feature 'x': not a tensor"})
        status, body, headers = await _get(client, "/busy")
        assert (status, body, headers["Retry-After"]) == (
            503, {"error": "Service Unavailable"}, "2") and "X-Other" not in headers
        assert (await _get(client, "/nowhere"))[:2] == (404, {"error": "Not Found"})
        status, body, _ = await _get(client, "/read", method="POST", data=b"x" * 100)
        assert status == 413 and body["error"].startswith("request body too large (") and "\n" not in body["error"]
        assert (await _get(client, "/redirect"))[0] == 302  # not an error: passed on
        with caplog.at_level(logging.ERROR, logger="test.http_errors"):
            status, body, _ = await _get(client, "/bug")
        assert (status, body) == (500, {"error": "internal error: ValueError"})
        assert any(r.exc_info and "GET /bug" in r.getMessage() for r in caplog.records)  # the traceback went to the log
    finally:
        await client.close()


async def test_options_the_leaf_and_the_root_use():
    counted: list[tuple[str, int]] = []

    def count(request: web.Request, status: int) -> None:
        counted.append((request.match_info.route.name or "other", status))

    client = await client_for(internal_detail=True, too_large_hint=lambda req: "limits.max_body_bytes is 10",
                              count=count,
                              request_ids=lambda h: h.get("X-Request-Id") or "generated", request_id_var=rid_var)
    try:
        assert (await _get(client, "/bug"))[1] == {"error": "internal error: ValueError: first line"}
        assert (await _get(client, "/read", method="POST", data=b"x" * 100))[1]["error"].endswith(
            "; limits.max_body_bytes is 10")
        status, body, headers = await _get(client, "/ok", headers={"X-Request-Id": "req-7"})
        # set for the handler, echoed
        assert (status, body, headers["X-Request-Id"]) == (200, {"rid": "req-7"}, "req-7")
        assert (await _get(client, "/payload"))[2]["X-Request-Id"] == "generated"  # error answers carry it too
        await _get(client, "/nowhere")
        assert counted == [("bug", 500), ("read", 413), ("ok", 200), ("payload", 400), ("other", 404)]
    finally:
        await client.close()


async def test_the_roots_request_ids_plug_in():
    from root.logs import REQUEST_ID_HEADER, request_id, request_id_for

    client = await client_for(request_ids=request_id_for, request_id_var=request_id,
                              request_id_header=REQUEST_ID_HEADER)
    try:
        sane = (await _get(client, "/ok", headers={"X-Request-Id": "abc-1"}))[2][REQUEST_ID_HEADER]
        fresh = (await _get(client, "/ok", headers={"X-Request-Id": "x" * 500}))[2][REQUEST_ID_HEADER]
        assert sane == "abc-1" and len(fresh) == 16 and fresh != "x" * 500
    finally:
        await client.close()


@pytest.mark.parametrize("ctype, expected", [
    ("application/msgpack", True), ("application/x-msgpack", True), ("application/vnd.msgpack", True),
    ("Application/MsgPack; charset=binary", True), (" application/msgpack ", True),
    ("application/json", False), ("application/problem+json", False), ("text/plain", False), ("", False), (None, False),
    ("application/msgpackx", False),
])
def test_is_msgpack(ctype, expected):
    assert is_msgpack(ctype) is expected


@pytest.mark.parametrize("ctype, expected", [
    ("application/json", True), ("Application/JSON; charset=utf-8", True), ("application/problem+json", True),
    ("application/msgpack", False), ("text/json-ish", False), ("", False), (None, False),
    ("application/octet-stream", False),
])
def test_is_json(ctype, expected):
    assert is_json(ctype) is expected
