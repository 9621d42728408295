"""One aiohttp error middleware for the root and the leaf: every failure leaves as one-line JSON.

Why shared: the root and the leaf each had their own middleware turning exceptions into
`{"error": ...}` answers, and they had drifted (one passed Retry-After through, one named the
exception's message in a 500, one counted requests). Here the mapping is written once and what
differs is a parameter:

- `HttpError(status, message, code=None, headers=None)`: a handler's deliberate answer; `code` is
  added to the body for errors a client should act on (`{"error": ..., "code": "loading"}`).
- `PayloadError` (trimmer.errors: a body that breaks the wire protocol) -> 400 with its message.
- aiohttp's `HTTPException` >= 400 -> its status and reason; 413 says "request body too large (...)",
  plus `too_large_hint(request)` (the root names `limits.max_body_bytes`); the headers named in
  `keep_headers` (Retry-After by default) are kept. Below 400 (redirects) it is re-raised.
- anything else is a bug: 500 with one line (`internal error: TypeName`, plus the first line of
  its message with `internal_detail=True`) and the traceback to `log`, never to the client.
- `count(request, status)`, when given, sees every answered request once (the root counts by route).
- `request_ids(headers) -> str`, when given, picks the request id; it is set in `request_id_var`
  (so log lines of the request and of the tasks it starts carry it) and sent back in
  `request_id_header` on every response not yet prepared. trimmer does not import root: the root
  passes its own `root.logs` functions.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, Awaitable, Callable, Mapping

import msgspec
from aiohttp import web

from .errors import PayloadError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpError(Exception):
    """An error answer a handler means to give: status, one-line message, optional `code` and headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers) if headers else None


def error_response(status: int, message: str, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    """`{"error": message[, "code": code]}` as application/json."""
    body: dict[str, Any] = {"error": message}
    if code is not None:
        body["code"] = code
    return web.Response(body=msgspec.json.encode(body), status=status, content_type="application/json", headers=headers)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def error_middleware(
    log: logging.Logger,
    *,
    count: Callable[[web.Request, int], None] | None = None,
    too_large_hint: Callable[[web.Request], str] | None = None,
    keep_headers: tuple[str, ...] = ("Retry-After",),
    internal_detail: bool = False,
    request_ids: Callable[[Mapping[str, str]], str] | None = None,
    request_id_var: contextvars.ContextVar[str | None] | None = None,
    request_id_header: str = "X-Request-Id",
) -> Any:
    """The middleware (module docstring); pass it in `web.Application(middlewares=[...])`."""

    def from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
        if exc.status == 413:
            message = f"request body too large ({exc.text.strip() if exc.text else exc.reason})"
            if too_large_hint is not None:
                message += f"; {too_large_hint(request)}"
        else:
            message = exc.reason or "error"
        kept = {h: exc.headers[h] for h in keep_headers if h in exc.headers}
        return error_response(exc.status, message, headers=kept or None)

    @web.middleware
    async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = None
        if request_ids is not None:
            rid = request_ids(request.headers)
            if request_id_var is not None:
                request_id_var.set(rid)  # this handler's context and the tasks it starts
        try:
            resp = await handler(request)
        except HttpError as exc:
            resp = error_response(exc.status, exc.message, exc.code, exc.headers)
        except PayloadError as exc:
            resp = error_response(400, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = from_http_exception(request, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: one line to the client, the traceback to the log
            log.exception("unhandled error on %s %s", request.method, request.path)
            message = f"internal error: {type(exc).__name__}"
            if internal_detail:
                message += f": {_first_line(exc)}"
            resp = error_response(500, message)
        if count is not None:
            count(request, resp.status)
        if rid is not None and not resp.prepared:
            resp.headers[request_id_header] = rid
        return resp

    return errors_middleware


__all__ = ["HttpError", "error_response", "error_middleware"]
