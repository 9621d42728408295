"""The root's service listener: HTTP/1.1 on asyncio's BufferedProtocol, bodies received where they are trimmed.

Why not aiohttp's server for the scoring routes: a 1.77 MB body went through
uvloop's read buffer, the parser's chunk copies, a StreamReader and a list of
chunks before the trim saw it, and aiohttp's client copied it again on the way
out. Measured side by side (issue 14), the root then spent 2.0 ms of CPU per
passthrough request where nginx spends 0.77 ms. Here the kernel writes the
body straight into a pooled buffer (`recv_into`), the C trim scans each slice
where it landed, and the trimmed bytes (or the buffer itself) go upstream in
one `writelines`:

    socket ──recv_into──> head buffer ──httptools (llhttp) parses the head──> Plan (root/dataplane.py)
          ──recv_into──> pooled body buffer ──StreamTrim.feed(slice)──┐
                                                                      v
    client <──one write── response <── DataPlane.score / fan_out ── Partition.request (root/upstream.py)

This listener serves POST `/v1/score`, `/v1/models/{m}[/versions/{v}]/score`
and `/v2/models/{m}[/versions/{v}]/infer` with a Content-Length body. Every
other request (other routes and methods, chunked or Content-Encoding bodies,
`Expect: 100-continue`, HTTP/1.0, percent-encoded names) hands the connection
and the bytes read so far to the aiohttp application through two public
seams, `transport.set_protocol()` and aiohttp's low-level `web.Server`
protocol factory; that connection stays with aiohttp (and trimmer/edge.py's
watchdog) from then on. `trimmer_root_front_handoffs_total{reason}` counts
them, so a client that ends up on the slow path shows.

The client limits are the same as aiohttp's connections get (trimmer/edge.py):
header timeout, body timeout with a minimum rate, keep-alive timeout, the
connection cap (shared with handed-over connections), max_body_bytes (413
before a byte of the body is read) and the process's body budget (503 +
Retry-After).

Backpressure: the declared bytes of the bodies being read, from their head
until their request starts running, are capped (limits.max_receiving_body_bytes,
8 MiB). A body that does not fit waits in FIFO order with its connection's
reading paused, so a flood queues in the kernel's socket buffers, not in this
process; it waits at most client_body_s, then gets 503 + Retry-After. 64
connections flooding 1.77 MB bodies peaked at 108 MiB RSS with it, 182 MiB
without it, and 138-148 MiB for the aiohttp-only root before issue 14
(`trimmer root bench --proxies`).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import termios
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Callable

import httptools
from multidict import CIMultiDict

from trimmer.codec import media_type
from trimmer.edge import BodyBudget, Edge, EdgeLimits, EdgeMetrics, Lease
from trimmer.errors import PayloadError
from trimmer.lograte import RateLimitedLog

from .dataplane import (Body, NativeFormat, Outcome, Plan, PreparedBody, RouteError, error_outcome, match_scoring_route,
                        timeout_for)
from .logs import REQUEST_ID_HEADER, request_id, request_id_for

log = logging.getLogger("trimmer.root.front")

HEAD_MAX = 64 * 1024  # request line + headers; past it: 431
HEAD_START = 8 * 1024  # a connection's head buffer to begin with (doubled up to HEAD_MAX): 4,096 idle ones hold 32 MiB
POOL_BYTES = 16 * 1024 * 1024  # idle body buffers kept for reuse (8 reference bodies: c8 passthrough holds 8)
_ALIGN = 64 * 1024
# While a large body arrives, the kernel wakes this process only once this many bytes are queued (SO_RCVLOWAT) or
# the body's last byte is in. Waking per 64-128 KiB that loopback delivers at a time cost a wake-up, a read and two
# Python callbacks each; a whole-body low mark instead loses the scan's overlap with the arrival. Measured side by
# side on the reference payload (wrk -c1): p50 through the trim 1.05 -> 0.98 ms, CPU per request -2 % at -c8; 128 KiB
# gave 1.01 ms, 1 MiB 1.12 ms.
RCVLOWAT = 256 * 1024
# QUEUED: head read, body waiting for room under limits.max_receiving_body_bytes (reading paused)
HEAD, QUEUED, BODY, BUSY, WAIT, LINGER, GONE = "head", "queued", "body", "busy", "wait", "linger", "gone"
# after an early error answer: unread body bytes are read and dropped this long, as nginx lingering_close
LINGER_S = 2.0
LINGER_BYTES = 16 * 1024 * 1024
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class BufferPool:
    """Body buffers for reuse.

    A new 1.8 MB `bytearray` costs its zero-fill (~90 us) and, taken from a heap
    that has given pages back, page faults. The pool also keeps the heap from
    fragmenting: with a 4 MiB pool, 64 bodies in flight peaked at 161 MiB
    RSS, against 106 MiB with 16 MiB. Anonymous mmaps instead of
    bytearrays were tried and dropped: a fresh mapping faults its pages in as
    the body lands, about 0.75 ms per 1.8 MB buffer, so every pool miss cost a
    request's worth of CPU, for no RSS gain once reception was capped.
    """

    def __init__(self, cap_bytes: int = POOL_BYTES) -> None:
        self.cap = cap_bytes
        self.free: list[bytearray] = []
        self.held = 0

    def take(self, n: int) -> bytearray:
        for i, buf in enumerate(self.free):
            if n <= len(buf) <= 2 * n + _ALIGN:
                del self.free[i]
                self.held -= len(buf)
                return buf
        return bytearray(-(-max(n, 1) // _ALIGN) * _ALIGN)

    def give(self, buf: bytearray) -> None:
        if self.held + len(buf) > self.cap:
            return
        self.free.append(buf)
        self.held += len(buf)


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self.second = 0
        self.value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = formatdate(now, usegmt=True).encode()
        return self.value


class FrontServer:
    """One service listener: its connections, limits, body buffers and the aiohttp server it hands over to."""

    def __init__(self, state: Any, aiohttp_server: Callable[[], asyncio.Protocol], edge: Edge, limits: EdgeLimits,
                 metrics: EdgeMetrics, budget: BodyBudget | None) -> None:
        self.state = state
        self.plane = state.plane
        self.aiohttp_server = aiohttp_server
        self.edge = edge  # aiohttp's watchdog: its open connections count towards the same cap
        self.limits = limits
        self.edge_metrics = metrics
        self.budget = budget
        self.conns: set[FrontConnection] = set()
        self.pool = BufferPool()
        # Receive admission: declared bytes of the bodies being received, and the heads waiting for room (FIFO).
        self.receive_cap: int = state.cfg.max_receiving_body_bytes
        self.receiving = 0
        self.queue: deque[FrontConnection] = deque()
        self.date = _Date()
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.busy = 0
        self.loop = asyncio.get_running_loop()
        self.timeout_log = RateLimitedLog(log)
        m = state.metrics
        self.handoffs = m.front_handoffs
        self.body_waits = m.front_body_waits

    def __call__(self) -> FrontConnection:
        return FrontConnection(self)

    def room_for(self, need: int) -> bool:
        """Whether a body of `need` bytes may start now: in order, within the cap (a body alone always may)."""
        return not self.queue and (not self.receiving or self.receiving + need <= self.receive_cap)

    def received(self, need: int) -> None:
        """A body's reception ended (its request started, or its connection went): its room goes to waiting ones."""
        self.receiving -= need
        self.admit()

    def admit(self) -> None:
        """Admit waiting bodies, in order, while they fit."""
        queue = self.queue
        while queue:
            conn = queue[0]
            if self.receiving and self.receiving + conn.need > self.receive_cap:
                return
            queue.popleft()
            conn._admit()

    async def drain(self, timeout_s: float) -> None:
        """After the listening socket closed: finish requests in progress (up to `timeout_s`), then close the rest."""
        self.draining = True
        for conn in list(self.conns):
            if conn.phase in (WAIT, HEAD) and conn.head_len == 0:
                conn.close()
        if self.busy:
            try:
                await asyncio.wait_for(self.idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                log.warning("front: %d requests still in progress after %.1fs of draining", self.busy, timeout_s)
        for conn in list(self.conns):
            conn.close()


class FrontConnection(asyncio.BufferedProtocol):
    """One client connection while this listener serves it (until it closes or is handed to aiohttp)."""

    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.transport: Any = None
        self.phase = HEAD
        self.head = bytearray(HEAD_START)
        self.head_view = memoryview(self.head)
        self.head_len = 0
        self.scan_from = 0
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.window_bytes = 0
        self.keep_alive = True
        self.eof = False
        # The request being received
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.buf: bytearray | None = None
        self.body_view: memoryview | None = None
        self.need = 0
        self.got = 0
        self.head_end = 0  # where the body starts in the head buffer, while QUEUED
        self.reserved = 0  # this body's bytes in the server's `receiving`, while it is read
        self.stream: Any = None
        self.lowat = 1  # the socket's SO_RCVLOWAT now (see RCVLOWAT)
        self.sock: Any = None
        self.lease: Lease | None = None
        self.request: dict[str, Any] = {}

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: Any) -> None:
        srv = self.server
        if len(srv.conns) + len(srv.edge.conns) >= srv.limits.max_connections:
            self.phase = GONE
            srv.edge.refuse(transport)
            return
        self.transport = transport
        self.sock = transport.get_extra_info("socket")
        srv.conns.add(self)
        srv.edge_metrics.open.inc()
        self._arm(srv.limits.header_timeout_s)  # a silent new connection gets the header timeout, as in nginx

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == GONE:
            return
        self._forget()

    def eof_received(self) -> bool:
        self.keep_alive = False
        if self.phase == BODY:  # the client half-closed before its Content-Length arrived: its error, answered
            self.eof = True
            self._reject(400, f"request body truncated: Content-Length {self.need}, got {self.got} bytes",
                         route=self.request.get("name", "other"))
            return True
        return self.phase == BUSY  # half-closed while its request runs: the answer can still be written

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.phase == LINGER:
            return self.head_view
        if self.phase == BODY:
            return self.body_view[self.got:self.need]  # type: ignore[index]
        return self.head_view[self.head_len:]  # never empty: reading pauses when the head buffer is full

    def buffer_updated(self, n: int) -> None:
        if self.phase == BODY:
            start = self.got
            self.got += n
            self.window_bytes += n
            if self.stream is not None:
                self.stream.feed(self.body_view[start:self.got])  # type: ignore[index]
            if self.got >= self.need:
                if self.lowat > 1:
                    self._set_lowat(1)
                self._body_complete()
            elif self.lowat > self.need - self.got:
                self._set_lowat(self.need - self.got)
            return
        if self.phase == LINGER:
            self.window_bytes += n
            if self.window_bytes > LINGER_BYTES:
                self.close()
            return
        if self.phase == GONE:
            return
        if self.phase == WAIT:  # the first bytes of the next request's head
            self.phase = HEAD
            self._arm(self.server.limits.header_timeout_s)
        self.head_len += n
        if self.head_len == len(self.head) and self.head_len < HEAD_MAX:
            self._grow_head()
        if self.phase == HEAD:
            self._scan_head()
        elif self.head_len >= HEAD_MAX:  # busy, and a pipelining client filled the head buffer: wait for the answer
            self.transport.pause_reading()

    def _set_lowat(self, n: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self.lowat = n
        except (OSError, AttributeError):  # not supported here: wake per arrival, as without it
            self.lowat = 1

    def _queued(self) -> int:
        """Bytes the kernel holds for this socket, not read yet (FIONREAD); 0 when it cannot tell."""
        try:
            return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, AttributeError, ValueError):
            return 0

    def _grow_head(self) -> None:
        head = bytearray(
            min(2 * len(self.head), HEAD_MAX))  # a new buffer: the old one may still be lent to the transport
        head[:self.head_len] = self.head_view[:self.head_len]
        self.head, self.head_view = head, memoryview(head)

    # ------------------------------------------------------------------ head
    def _scan_head(self) -> None:
        end = self.head.find(b"\r\n\r\n", max(0, self.scan_from - 3), self.head_len)
        if end < 0:
            self.scan_from = self.head_len
            if self.head_len >= HEAD_MAX:
                self._reject(431, f"request head larger than {HEAD_MAX} bytes")
            return
        head_end = end + 4
        self.url, self.headers = b"", []
        parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(self.head_view[:head_end])
        except httptools.HttpParserUpgrade:
            return self._hand_off("upgrade")
        except httptools.HttpParserError as exc:
            return self._reject(400, f"malformed request head: {exc}")
        route = _route(parser.get_method(), parser.get_http_version(), self.url)
        if route is None:
            return self._hand_off("route")
        if not self._plain_body():
            return self._hand_off("body_framing")
        self.keep_alive = bool(parser.should_keep_alive())
        self._start_body(route, head_end)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def _plain_body(self) -> bool:
        """A Content-Length body with no transfer or content coding and no 100-continue: what this listener serves."""
        length = False
        for name, value in self.headers:
            low = name.lower()
            if low == b"content-length":
                length = value.strip().isdigit()
            elif low in (b"transfer-encoding", b"expect") or (
                low == b"content-encoding" and value.strip().lower() != b"identity"):
                return False
        return length

    def _start_body(self, route: tuple[str, str, str | None, str | None], head_end: int) -> None:
        srv = self.server
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in self.headers)
        need = int(headers["Content-Length"])
        limit = srv.state.cfg.max_body_bytes
        name, kind, model, version = route
        if need > limit:
            return self._reject(413, f"request body too large (Maximum request body size {limit} exceeded, actual body "
                                     f"size {need}); limits.max_body_bytes is {limit}", route=name)
        if srv.budget is not None:
            self.lease = srv.budget.lease()
            if not self.lease.take(need):
                self.lease = None
                return self._reject(503, f"server busy: request bodies in flight are at limits.max_inflight_body_bytes "
                                         f"({srv.budget.cap} bytes); retry shortly", {"Retry-After": "1"}, name)
        self.request = {"name": name, "kind": kind, "headers": headers,
                        "path": self.url.split(b"?", 1)[0].decode("latin-1")}
        self.request["plan"] = plan = self._plan(kind, model, version, headers)
        self.stream = plan.stream_trim(need) if isinstance(plan, Plan) else None
        if self.stream is not None:
            srv.state.metrics.add(srv.state.metrics.eager_trims, ())
        self.need, self.head_end = need, head_end
        if not srv.room_for(need):  # backpressure: the client's bytes wait in the kernel, not in this process
            self.phase = QUEUED
            self.transport.pause_reading()
            srv.queue.append(self)
            self._arm(srv.limits.body_timeout_s)
            return
        self._receive()

    def _admit(self) -> None:
        """Room under the receive cap: this queued body may be read now."""
        self.server.body_waits.labels("admitted").inc()
        self.transport.resume_reading()
        self._receive()

    def _leave_queue(self, outcome: str) -> None:
        srv = self.server
        srv.queue.remove(self)
        srv.body_waits.labels(outcome).inc()
        srv.admit()  # the head of the queue may have changed

    def _receive(self) -> None:
        """Start reading the body (admitted): its buffer, the bytes that came with the head, the body timer."""
        srv = self.server
        need, head_end = self.need, self.head_end
        srv.receiving += need
        self.reserved = need
        self.buf = srv.pool.take(need)
        self.body_view = memoryview(self.buf)[:need]
        self.got = 0
        # Body bytes that came with the head; anything past the body is the next (pipelined) request's.
        early = min(self.head_len - head_end, need)
        if early:
            self.body_view[:early] = self.head_view[head_end:head_end + early]
            self.got = early
            if self.stream is not None:
                self.stream.feed(self.body_view[:early])
        rest = self.head_len - head_end - early
        if rest:
            self.head_view[:rest] = self.head_view[head_end + early:self.head_len]
        self.head_len, self.scan_from = rest, 0
        if self.got >= need:
            return self._body_complete()
        self.phase = BODY
        self.window_bytes = 0
        if need - self.got > RCVLOWAT:
            self._set_lowat(RCVLOWAT)
        self._arm(srv.limits.body_timeout_s)

    def _plan(self, kind: str, model: str | None, version: str | None,
              headers: CIMultiDict[str]) -> Plan | PayloadError:
        """The request's plan from its route and headers; a bad header is answered once the body is in."""
        state = self.server.state
        try:
            plane = self.server.plane
            timeout_s = timeout_for(headers, state.cfg)
            if kind == "oip":
                return plane.plan_oip(model, version, headers, timeout_s)  # type: ignore[arg-type]
            media = media_type(headers.get("Content-Type"))
            if kind == "fanout":
                return plane.plan_fanout(media, timeout_s)  # its targets come from its body
            return plane.plan_single("model", model, version, NativeFormat(media), media, timeout_s)  # type: ignore[arg-type]
        except PayloadError as exc:
            return exc

    # ------------------------------------------------------------------ body and answer
    def _body_complete(self) -> None:
        # reading goes on into the head buffer (a pipelined request); no timer while the answer is made
        self.phase = BUSY
        srv = self.server
        srv.busy += 1
        srv.idle.clear()
        view, buf = self.body_view, self.buf
        assert view is not None and buf is not None  # a body was being read
        srv.loop.create_task(self._answer(self.request, view, buf, self.stream, self.lease, self.reserved))
        self.request, self.body_view, self.buf, self.stream, self.lease, self.reserved = {}, None, None, None, None, 0

    async def _answer(self, req: dict[str, Any], view: memoryview, buf: bytearray,
                      stream: Any, lease: Lease | None, reserved: int) -> None:
        srv = self.server
        # Its room under the receive cap is given back only now: bodies that are complete but not yet trimmed or sent
        # (waiting for the CPU under load) count towards it too, so that a flood queues in the kernel, not here.
        srv.received(reserved)
        state = srv.state
        headers: CIMultiDict[str] = req["headers"]
        rid = request_id_for(headers)
        request_id.set(rid)

        def recycle() -> None:
            try:
                view.release()  # BufferError while anything still holds a view of it: then it is never reused
            except BufferError:
                return
            srv.pool.give(buf)

        body = Body([view] if len(view) else [], recycle)
        try:
            state.metrics.add(state.metrics.client_bytes, (req["kind"],), len(view))
            capture = state.capture
            if capture is not None and capture.sample():
                if capture.record(req["path"], headers.get("Content-Type", "application/msgpack"),
                                  bytes(view), dict(headers)):
                    state.metrics.captured.inc()
            out = await self._run(req, body, stream)
        except Exception as exc:  # a bug: one line to the client, traceback to the log
            log.exception("unhandled error on POST %s", req["path"])
            out = error_outcome(500, f"internal error: {type(exc).__name__}")
        finally:
            if lease is not None:
                lease.close()
        stream = None  # the trim and its views of the buffer go before the buffer is recycled
        state.metrics.add(state.metrics.client_requests, (req["name"], str(out.status)))
        self._respond(out, rid)
        body.release()  # back to the pool now, unless a trim released it earlier (before the upstream answered)
        srv.busy -= 1
        if not srv.busy:
            srv.idle.set()

    async def _run(self, req: dict[str, Any], body: Body, stream: Any) -> Outcome:
        plan = req["plan"]
        if isinstance(plan, PayloadError):
            return error_outcome(400, str(plan))
        plane = self.server.plane
        try:
            if plan.route == "fanout":
                status, data = await plane.fan_out(plan, PreparedBody(body, plan.content_type), len(body))
                return Outcome(status, data, plan.content_type, {})
            return await plane.score(plan, body, stream)
        except PayloadError as exc:
            return error_outcome(400, str(exc))
        except RouteError as exc:
            return error_outcome(exc.status, exc.message, exc.headers)

    def _respond(self, out: Outcome, rid: str, close: bool = False, linger: bool = False) -> None:
        if self.phase == GONE or self.transport is None or self.transport.is_closing():
            self._forget()
            return
        srv = self.server
        keep = self.keep_alive and not close and not srv.draining
        parts = [b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n%s: %s\r\n" % (
            out.status, _REASONS.get(out.status, b"Unknown"), out.content_type.encode("latin-1"), len(out.body),
            srv.date(), REQUEST_ID_HEADER.encode(), rid.encode("latin-1"))]
        for name in ("Retry-After", "Inference-Header-Content-Length"):
            value = out.headers.get(name)
            if value is not None:
                parts.append(b"%s: %s\r\n" % (name.encode(), str(value).encode("latin-1")))
        if not keep:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        if len(out.body) < 65536:
            self.transport.write(head + out.body)
        else:
            self.transport.writelines([head, out.body])
        if not keep and linger and not self.eof and self.transport.can_write_eof():
            self.transport.write_eof()
            self.phase, self.window_bytes, self.head_len = LINGER, 0, 0
            self._arm(LINGER_S)
            return
        if not keep:
            self.close()
            return
        self.phase = WAIT
        if self.head_len >= HEAD_MAX:
            self.transport.resume_reading()
        if self.head_len:  # a pipelined request already here
            self.phase = HEAD
            self._arm(srv.limits.header_timeout_s)
            self._scan_head()
            return
        self._arm(srv.limits.keepalive_timeout_s)

    def _end_receive(self) -> None:
        if self.reserved:
            need, self.reserved = self.reserved, 0
            self.server.received(need)

    def _reject(self, status: int, message: str, headers: dict[str, str] | None = None, route: str = "other") -> None:
        """An error before the body is read: answered with Connection: close. The body still on its way is read and
        dropped for up to LINGER_S (so the client sees the answer, not a reset), then the connection closes."""
        self._end_receive()
        if self.lease is not None:  # nothing will hold this body: its budget is free now, not after the linger
            self.lease.close()
            self.lease = None
        self.phase = BUSY
        self._disarm()
        self.server.state.metrics.add(self.server.state.metrics.client_requests, (route, str(status)))
        self.keep_alive = False
        self._respond(error_outcome(status, message, headers), request_id_for({}), close=True, linger=True)

    def _hand_off(self, reason: str) -> None:
        """Give the connection, with every byte read so far, to aiohttp's server; it keeps it from now on."""
        srv = self.server
        srv.handoffs.labels(reason).inc()
        data = bytes(self.head_view[:self.head_len])
        transport = self.transport
        self._forget()
        proto = srv.aiohttp_server()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if not transport.is_closing():
            proto.data_received(data)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._forget()

    def _forget(self) -> None:
        if self.phase == GONE:
            return
        if self.phase == QUEUED:
            self._leave_queue("gone")
        self._end_receive()
        self.phase = GONE
        self._disarm()
        srv = self.server
        if self in srv.conns:
            srv.conns.discard(self)
            srv.edge_metrics.open.dec()
        if self.lease is not None:
            self.lease.close()
            self.lease = None
        self.stream = None
        if self.body_view is not None:
            self.body_view.release()
            self.body_view = None
        self.buf = None

    # ------------------------------------------------------------------ timeouts (as trimmer/edge.py's watchdog)
    def _arm(self, seconds: float) -> None:
        loop = self.server.loop
        self.deadline = loop.time() + seconds
        if self.timer is not None and self.timer.when() <= self.deadline:
            return  # fires first and re-arms for the later deadline
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_at(self.deadline, self._expire)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        if self.phase in (BUSY, GONE):
            return  # the answer re-arms
        srv = self.server
        now = srv.loop.time()
        if now < self.deadline:
            self.timer = srv.loop.call_at(self.deadline, self._expire)
            return
        lim = srv.limits
        if self.phase in (WAIT, LINGER):
            return self.close()  # keep-alive timeout, or the end of a lingering close: nothing to count
        if self.phase == QUEUED:
            self._leave_queue("timed_out")
            self.transport.resume_reading()  # the lingering close reads and drops the body
            return self._reject(503, f"server busy: request bodies being received are at "
                                     f"limits.max_receiving_body_bytes ({srv.receive_cap} bytes) and this one waited "
                                     f"{lim.body_timeout_s:g} s (timeouts.client_body_s); retry shortly",
                                {"Retry-After": "1"}, self.request.get("name", "other"))
        if self.phase == BODY:
            credited = 0
            if self.lowat > 1:
                # Bytes that arrived but stay under the low mark were not read yet: they count as progress now (and
                # not again once read). A body this slow is read as it comes from now on.
                credited = self._queued()
                self.window_bytes += credited
                self._set_lowat(1)
            if self.window_bytes > 0 and self.window_bytes >= lim.body_min_rate * lim.body_timeout_s:
                self.window_bytes = -credited
                return self._arm(lim.body_timeout_s)
            phase = "body"
            what = (f"{self.window_bytes} body bytes in {lim.body_timeout_s:g} s "
                    f"(body_timeout_s, body_min_rate {lim.body_min_rate} B/s)")
        else:
            phase = "header"
            what = f"no complete request head within {lim.header_timeout_s:g} s (header_timeout_s)"
        srv.edge_metrics.timed_out.labels(phase).inc()
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        srv.timeout_log(None, "root: closed a connection from %s: %s",
                        f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?", what)
        self.close()


def _route(method: bytes, version: str, url: bytes) -> tuple[str, str, str | None, str | None] | None:
    """A scoring route this listener serves (root/dataplane.py's table), from the raw path; None: aiohttp's."""
    if method != b"POST" or version != "1.1":
        return None
    path = url.split(b"?", 1)[0]
    if b"%" in path:
        return None  # aiohttp decodes and routes these; the names are validated there
    return match_scoring_route(path.decode("latin-1"))


__all__ = ["FrontServer", "FrontConnection", "BufferPool"]
