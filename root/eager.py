"""Start a request's trim while aiohttp's parser is still producing its body.

uvloop reads a burst of socket data (up to 32 reads of 256 KiB) before the
handler runs, so by the time `handle_model_score` sees the first chunk the
whole megabyte body has been copied twice (uvloop, then the HTTP parser) and
its early chunks have left the CPU caches: the scan then waits for a cache
miss per feature (an immediate second scan of the same chunks takes 40 % of
the first's time). Scanning each chunk right after the parser has copied it
costs less: measured side by side on the reference payload, the root's CPU
per trimmed request falls by 3-5 %.

How: the server's protocol factory makes `EagerRequestHandler`s. After each
`data_received`, a request whose headers just arrived and that the shortcut
route will stream-trim (POST `/v1/models/{m}[/versions/{v}]/score`, msgpack,
Content-Length, no Content-Encoding, a routable model whose allowlist is in a
trimming mode) gets a `StreamTrim`, and every body chunk the parser appends
is fed to it there and then. The handler reads the body as before, without
feeding it, and `take`s the stream once the body is in.

This reads two private aiohttp attributes (the handler's message queue and
the body reader's chunk deque) and never changes them. Where they are not as
expected, nothing is registered (or the stream is marked broken and not
used) and the handler trims as it reads: the same bytes, only slower.
TRIMMER_EAGER_TRIM=0 turns it off; `trimmer_root_eager_trims_total` counts
the trims it fed.
"""

from __future__ import annotations

import collections
import logging
import re
from typing import Callable

from aiohttp import web, web_protocol
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from trimmer.codec import MSGPACK, media_type
from trimmer.errors import PayloadError
from trimmer.settings import settings
from trimmer.trim import ACCELERATED, StreamTrim

log = logging.getLogger("trimmer.root.eager")

_SCORE = re.compile(r"/v1/models/([^{}/]+)(?:/versions/([^{}/]+))?/score")
# From a request's headers alone: (model, version or None, Content-Length) -> the trim to start, or None.
StreamFactory = Callable[[str, "str | None", int], "StreamTrim | None"]


def _msgpack(content_type: str | None) -> bool:
    try:
        return media_type(content_type) == MSGPACK
    except PayloadError:
        return False


def supported() -> bool:
    """Whether the installed aiohttp has the (private) attributes this reads; checked again on each use."""
    slots = getattr(web_protocol.RequestHandler, "__slots__", ())
    reader_slots = getattr(StreamReader, "__slots__", ())
    return "_messages" in slots and "_buffer" in reader_slots and "total_bytes" in reader_slots


def enabled() -> bool:
    return ACCELERATED and settings().eager_trim and supported()


class _Pending:
    __slots__ = ("payload", "stream", "fed", "broken")

    def __init__(self, payload: StreamReader, stream: StreamTrim) -> None:
        self.payload = payload
        self.stream = stream
        self.fed = 0  # body bytes handed to the stream so far
        self.broken = False  # the chunk deque was not as expected: this stream must not be used


class EagerRequestHandler(web_protocol.RequestHandler):
    __slots__ = ("eager_factory", "_eager")

    def __init__(self, *args, eager_factory: StreamFactory, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eager_factory = eager_factory
        self._eager: _Pending | None = None  # HTTP/1.1: one request's body arrives at a time

    def data_received(self, data: bytes) -> None:
        messages = getattr(self, "_messages", None)
        before = len(messages) if isinstance(messages, collections.deque) else -1
        super().data_received(data)
        if self._eager is not None:
            self._feed(self._eager)
        if before >= 0 and len(messages) > before:
            msg, payload = messages[-1]  # only the newest can be receiving a body now
            if isinstance(msg, RawRequestMessage):
                self._start(msg, payload)

    def streaming(self, payload: StreamReader) -> bool:
        """Whether a trim is being fed with this body as it arrives (then the reader must not feed it again)."""
        return self._eager is not None and self._eager.payload is payload and not self._eager.broken

    def take(self, payload: StreamReader) -> StreamTrim | None:
        """Once the body is read: the trim fed with all of it, or None (then trim from the chunks read)."""
        pending = self._eager
        if pending is None or pending.payload is not payload:
            return None
        self._eager = None
        self._feed(pending)
        return pending.stream if not pending.broken and pending.fed == payload.total_bytes else None

    def _start(self, msg: RawRequestMessage, payload: StreamReader) -> None:
        self._eager = None  # a previous request's, unclaimed (pipelined): its handler trims from its chunks
        if msg.method != "POST" or msg.chunked or not isinstance(getattr(payload, "_buffer", None), collections.deque):
            return
        m = _SCORE.fullmatch(msg.url.path)
        length = msg.headers.get("Content-Length")
        if m is None or msg.headers.get("Content-Encoding") or not (length or "").isdigit() or not _msgpack(msg.headers.get("Content-Type")):
            return
        try:
            stream = self.eager_factory(m.group(1), m.group(2), int(length))
        except Exception:  # a bug must not break the connection from inside the protocol: the handler decides again
            log.exception("eager trim: could not start a trim for %s", msg.url.path)
            return
        if stream is not None:
            self._eager = _Pending(payload, stream)
            self._feed(self._eager)

    def _feed(self, pending: _Pending) -> None:
        """Hand the stream the chunks appended since the last call: the newest ones, at the deque's end."""
        new = pending.payload.total_bytes - pending.fed
        if new <= 0 or pending.broken:
            return
        chunks: list[bytes] = []
        got = 0
        for chunk in reversed(pending.payload._buffer):
            if got >= new:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got != new:  # some of the new bytes were read already: not the layout this relies on
            pending.broken = True
            return
        try:
            for chunk in reversed(chunks):
                pending.stream.feed(chunk)
        except Exception:  # (out of memory): never break the connection from inside the protocol
            log.exception("eager trim failed; the handler trims from the chunks it reads")
            pending.broken = True
            return
        pending.fed += got


class EagerServer(web.Server):
    """aiohttp's low-level server, making `EagerRequestHandler`s."""

    eager_factory: StreamFactory

    def __call__(self) -> web_protocol.RequestHandler:
        return EagerRequestHandler(self, loop=self._loop, eager_factory=self.eager_factory, **self._kwargs)


def install(runner: web.BaseRunner, factory: StreamFactory) -> bool:
    """Make the runner's server start trims as bodies arrive (call after `runner.setup()`). True if installed."""
    server = runner.server
    if not enabled() or type(server) is not web.Server or not hasattr(server, "_kwargs") or not hasattr(server, "_loop"):
        return False
    server.__class__ = EagerServer
    server.eager_factory = factory  # type: ignore[attr-defined]
    return True


def handler_of(request: web.BaseRequest) -> EagerRequestHandler | None:
    proto = request.protocol
    return proto if isinstance(proto, EagerRequestHandler) else None


__all__ = ["EagerRequestHandler", "EagerServer", "install", "handler_of", "enabled", "supported"]
