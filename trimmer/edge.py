"""Client-side limits for the root's and the leaf's HTTP servers: timeouts, a connection cap, a body budget.

Why: aiohttp bounds none of what a slow or hostile client can hold. Measured
before this module (issue 11): dribbled headers, a body dribbled at 1 byte per
100 ms, a stalled body and silent sockets were all still open after 100 s;
~22k silent sockets used up the file descriptors (new clients got a reset,
nothing was logged); 8 clients stalling 60 MB bodies pinned ~428 MB that was
never given back. nginx and Envoy ship limits for exactly these; so do we:

- header timeout (nginx `client_header_timeout`): from a connection's start,
  or from the first byte of a request's head, to its last header;
- body timeout (nginx `client_body_timeout`, plus a minimum rate as in
  Kestrel's MinRequestBodyDataRate): while a body is being received, every
  window of `body_timeout_s` must bring at least `body_min_rate` bytes/s on
  average, or the connection is closed. A stalled body brings none; a body
  dribbled at 1 byte per 100 ms (which a pure idle timeout never catches)
  brings too few. Windows in which the server itself paused reading are not
  held against the client (that is backpressure);
- keep-alive idle timeout: aiohttp's own `keepalive_timeout` handler argument;
- a maximum of concurrent connections: one past it is closed at once,
  counted (`*_connections_refused_total`) and logged (at most one line per
  10 s), with a gauge of open connections; the process's descriptor limit is
  raised to fit (`ensure_fd_limit`);
- `BodyBudget`: request body bytes held across the whole process (the root
  reserves a body's Content-Length, or its bytes as they arrive, before it
  reads them); past the cap a request gets 503 + Retry-After. When the held
  bytes fall well below their peak, free heap pages go back to the kernel
  (`trimmer.malloc.release_free_memory`), so RSS comes back after slow
  clients leave.

aiohttp has no header or body-read timeout and no connection cap, so the
timeouts and the cap live in a connection-level watchdog: the runner's
server makes request handlers of a subclass whose `connection_made` /
`data_received` / `connection_lost` keep one deadline per connection (one
lazily re-armed timer handle each). It watches the leaf's connections and
the root's admin listener and the connections the root's fast listener
(root/front.py, which applies the same limits itself) hands to aiohttp.
Everything it touches is public (the transport, `StreamReader.is_eof`,
`RequestHandler.force_close`) except one private attribute: the handler's
queue of parsed messages (`RequestHandler._messages`), whose growth during
`data_received` is the moment a request's headers are complete; pyproject
pins aiohttp to the range the suite has run against. `supported()` checks it at install; without
it only the connection cap and the keep-alive timeout apply (a warning says
so), and tests/test_edge_limits.py fails (it does not skip) so an aiohttp
upgrade that changes it is noticed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol
from prometheus_client import CollectorRegistry, Counter, Gauge

from .errors import ConfigError
from .lograte import RateLimitedLog
from .malloc import release_free_memory

log = logging.getLogger("trimmer.edge")

HEADERS, BODY, WAIT = "header", "body", "wait"  # a connection's phase; only the first two have a deadline
TRIM_MIN_DROP = 32 * 1024 * 1024  # give free heap back once held body bytes fell this far below their peak
GIVE_BACK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class EdgeLimits:
    """Per-listener client limits; defaults follow nginx's spirit (its header/body timeouts are 60 s, keep-alive 75
    s)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 4096
    # bytes/s a body must average over each body_timeout_s window (0: only a full stall closes)
    body_min_rate: int = 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name}: must be a number > 0, got {v!r}")
        if isinstance(self.max_connections, bool) or not isinstance(
            self.max_connections, int) or self.max_connections < 1:
            raise ConfigError(f"max_connections: must be an integer >= 1, got {self.max_connections!r}")
        if isinstance(self.body_min_rate, bool) or not isinstance(self.body_min_rate, int) or self.body_min_rate < 0:
            raise ConfigError(f"body_min_rate: must be an integer >= 0 (bytes/s), got {self.body_min_rate!r}")


def handler_args(limits: EdgeLimits) -> dict[str, Any]:
    """Keyword arguments for `web.AppRunner`: our keep-alive timeout, and no automatic request inflation
    (bodies are decoded by trimmer/compression.py under the body limit)."""
    return {"keepalive_timeout": limits.keepalive_timeout_s, "auto_decompress": False}


def supported() -> bool:
    """Whether aiohttp's request handler still keeps its parsed messages where the watchdog looks."""
    return "_messages" in getattr(web_protocol.RequestHandler, "__slots__", ())


class EdgeMetrics:
    """The edge's counters on the service's registry; `prefix` is trimmer_root or trimmer_leaf."""

    def __init__(self, prefix: str, registry: CollectorRegistry) -> None:
        r = registry
        self.open = Gauge(f"{prefix}_connections_open", "Client connections open now", registry=r,
                          multiprocess_mode="livesum")
        self.refused = Counter(f"{prefix}_connections_refused",
                               "Client connections closed at once because max_connections were open", registry=r)
        self.timed_out = Counter(
            f"{prefix}_connections_timed_out",
            "Client connections closed by a timeout: phase header (head not complete in time) or body (no body bytes)",
            ("phase",), registry=r)
        self.body_inflight = Gauge(f"{prefix}_body_bytes_inflight",
                                   "Request body bytes held by requests in progress (BodyBudget)", registry=r,
                                   multiprocess_mode="livesum")
        self.budget_rejections = Counter(f"{prefix}_body_budget_rejections", "Requests answered 503 because the body "
                                                                             "bytes in flight were at the cap",
                                                                             registry=r)
        self.memory_releases = Counter(f"{prefix}_memory_releases", "Times free heap was handed back to the kernel "
                                                                    "after held body bytes fell", registry=r)
        self.decoded = Counter(f"{prefix}_decoded_bodies", "Compressed request bodies by Content-Encoding and outcome "
                                                           "(ok, too_large, corrupt, unsupported)",
                               ("encoding", "outcome"), registry=r)


def ensure_fd_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `needed` (up to the hard limit); returns the soft limit.

    Connections past max_connections are refused by the watchdog, but only if
    accept() still gets a descriptor; a warning says when the limit is too low.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return -1
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open-file limit %d is below max_connections + headroom (%d): past it new clients get a reset, not "
                    "a counted refusal; raise `ulimit -n` or lower max_connections", soft, needed)
    return soft


# ---------------------------------------------------------------------- body budget
class BodyBudget:
    """Request body bytes held across the process, capped; gives free heap back after a drop."""

    def __init__(self, cap: int, metrics: EdgeMetrics | None = None) -> None:
        self.cap = cap
        self.used = 0
        self.peak = 0
        self.metrics = metrics
        self._trim_scheduled = False
        self._next_trim = 0.0  # monotonic: at most one give-back per GIVE_BACK_INTERVAL_S

    def reserve(self, n: int) -> bool:
        if self.used + n > self.cap:
            if self.metrics is not None:
                self.metrics.budget_rejections.inc()
            return False
        self.used += n
        if self.used > self.peak:
            self.peak = self.used
        if self.metrics is not None:
            self.metrics.body_inflight.set(self.used)
        return True

    def release(self, n: int) -> None:
        self.used -= n
        if self.metrics is not None:
            self.metrics.body_inflight.set(self.used)
        if self.peak - self.used >= TRIM_MIN_DROP and self.used <= self.peak // 2 and not self._trim_scheduled:
            self._trim_scheduled = True
            delay = max(0.2, self._next_trim - time.monotonic())  # after the request's objects are gone
            try:
                asyncio.get_running_loop().call_later(delay, self._give_back)
            except RuntimeError:
                self._give_back()

    def _give_back(self) -> None:
        self._trim_scheduled = False
        self._next_trim = time.monotonic() + GIVE_BACK_INTERVAL_S
        self.peak = self.used
        # A body read that ended in an exception (a slow client closed by the body timeout) leaves its chunks in a
        # cycle (exception -> traceback -> the reading frame); collect it first, or the pages are still in use.
        gc.collect()
        if release_free_memory() and self.metrics is not None:
            self.metrics.memory_releases.inc()

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """One request's share of the budget; `close()` (idempotent) returns it."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> bool:
        if n <= 0:
            return True
        if not self.budget.reserve(n):
            return False
        self.held += n
        return True

    def close(self, *_: Any) -> None:
        if self.held:
            held, self.held = self.held, 0
            self.budget.release(held)


# ---------------------------------------------------------------------- connection watchdog
class _Conn:
    __slots__ = ("phase", "deadline", "handle", "when", "payload", "got")

    def __init__(self) -> None:
        self.phase = HEADERS
        self.deadline = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.when = 0.0  # when `handle` fires
        self.payload: Any = None  # the body being received (phase BODY)
        self.got = 0  # body bytes received in the current window


class Edge:
    """The watchdog of one listener: connections open, their deadlines, the cap."""

    def __init__(self, limits: EdgeLimits, metrics: EdgeMetrics, name: str, timeouts: bool = True) -> None:
        self.limits = limits
        self.metrics = metrics
        self.name = name
        self.timeouts = timeouts  # False where aiohttp's message queue is not as expected (supported())
        self.conns: dict[web_protocol.RequestHandler, _Conn] = {}
        self.refused = 0
        self._refuse_log = RateLimitedLog(log)
        self._timeout_log = RateLimitedLog(log)
        self._classes: dict[type, type] = {}
        self.loop = asyncio.get_running_loop()

    def handler_class(self, base: type) -> type:
        cls = self._classes.get(base)
        if cls is None:
            cls = self._classes[base] = type(f"Edge{base.__name__}", (_EdgeHandler, base),
                                             {"__slots__": (), "edge": self})
        return cls

    # -- called by the handler subclass
    def refuse(self, transport: asyncio.BaseTransport) -> None:
        self.refused += 1
        self.metrics.refused.inc()
        self._refuse_log(None, "%s: refusing a connection: %d open = max_connections; %d refused so far",
                                 self.name, len(self.conns), self.refused)
        transport.close()

    def opened(self, proto: web_protocol.RequestHandler) -> None:
        st = self.conns[proto] = _Conn()
        self.metrics.open.inc()
        if self.timeouts:  # a silent new connection gets the header timeout (as in nginx), not the keep-alive one
            self._arm(proto, st, self.loop.time() + self.limits.header_timeout_s)

    def closed(self, st: _Conn) -> None:
        if st.handle is not None:
            st.handle.cancel()
            st.handle = None
        st.payload = None
        self.metrics.open.dec()

    def progress(self, proto: web_protocol.RequestHandler, st: _Conn, before: int, data: bytes) -> None:
        messages = proto._messages  # noqa: SLF001 - see the module docstring and supported()
        # a request's head is complete (several, if pipelined: the last may still get a body)
        if len(messages) > before:
            payload = messages[-1][1]
            if payload.is_eof():
                st.phase, st.payload = WAIT, None
            else:
                st.phase, st.payload, st.got = BODY, payload, 0
                self._arm(proto, st, self.loop.time() + self.limits.body_timeout_s)
        elif st.phase == BODY:
            if st.payload.is_eof():
                st.phase, st.payload = WAIT, None
            else:
                st.got += len(data)  # judged when the window's timer fires
        elif data and st.phase == WAIT:  # the first bytes of the next request's head
            st.phase = HEADERS
            self._arm(proto, st, self.loop.time() + self.limits.header_timeout_s)

    # -- timers
    def _arm(self, proto: web_protocol.RequestHandler, st: _Conn, deadline: float) -> None:
        st.deadline = deadline
        if st.handle is not None and st.when <= deadline:
            return  # fires first and re-arms for the later deadline
        if st.handle is not None:
            st.handle.cancel()
        st.when = deadline
        st.handle = self.loop.call_at(deadline, self._expire, proto)

    def _expire(self, proto: web_protocol.RequestHandler) -> None:
        st = self.conns.get(proto)
        if st is None:
            return
        st.handle = None
        if st.phase == WAIT:
            return
        now = self.loop.time()
        if now < st.deadline:
            self._arm(proto, st, st.deadline)
            return
        transport = proto.transport
        lim = self.limits
        if st.phase == BODY:
            if st.payload is None or st.payload.is_eof():
                st.phase, st.payload = WAIT, None
                return
            paused = transport is not None and hasattr(transport, "is_reading") and not transport.is_reading()
            if paused or (st.got > 0 and st.got >= lim.body_min_rate * lim.body_timeout_s):
                # Enough bytes this window, or the server paused reading (flow control: not the client's stall): next
                # window.
                st.got = 0
                self._arm(proto, st, now + lim.body_timeout_s)
                return
            what = (f"{st.got} body bytes in {lim.body_timeout_s:g} s "
                    f"(body_timeout_s, body_min_rate {lim.body_min_rate} B/s)")
        else:
            what = f"no complete request head within {lim.header_timeout_s:g} s (header_timeout_s)"
        self.metrics.timed_out.labels(st.phase).inc()
        self._timeout_log(None, "%s: closed a connection from %s: %s", self.name, _peer(transport), what)
        proto.force_close()


def _peer(transport: Any) -> str:
    try:
        peer = transport.get_extra_info("peername") if transport is not None else None
    except Exception:  # noqa: BLE001
        peer = None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


class _EdgeHandler:
    """Mixed in before aiohttp's RequestHandler; state lives in `edge.conns`."""

    __slots__ = ()
    edge: Edge

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        edge = self.edge
        if len(edge.conns) >= edge.limits.max_connections:
            edge.refuse(transport)  # never started: no handler task, no parser state
            return
        super().connection_made(transport)  # type: ignore[misc]
        edge.opened(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: BaseException | None) -> None:
        edge = self.edge
        st = edge.conns.pop(self, None)  # type: ignore[call-overload]
        if st is None:
            return  # refused in connection_made
        edge.closed(st)
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        edge = self.edge
        st = edge.conns.get(self)  # type: ignore[call-overload]
        if st is None or not edge.timeouts:
            super().data_received(data)  # type: ignore[misc]
            return
        before = len(self._messages)  # type: ignore[attr-defined]
        super().data_received(data)  # type: ignore[misc]
        edge.progress(self, st, before, data)  # type: ignore[arg-type]


def install(runner: web.BaseRunner, limits: EdgeLimits, metrics: EdgeMetrics, name: str) -> Edge:
    """Watch every connection the runner's server accepts (call after `runner.setup()`)."""
    server = runner.server
    if server is None:
        raise RuntimeError("edge.install: call after runner.setup()")
    timeouts = supported()
    if not timeouts:
        log.warning("%s: this aiohttp keeps no RequestHandler._messages: header and body timeouts are OFF "
                    "(connection cap and keep-alive timeout still apply)", name)
    edge = Edge(limits, metrics, name, timeouts)
    base = type(server)

    def make_handler(self: web.Server) -> web_protocol.RequestHandler:
        proto = base.__call__(self)
        proto.__class__ = edge.handler_class(type(proto))  # same slots, one more base: the class swap is layout-safe
        return proto

    server.__class__ = type(f"Edge{base.__name__}", (base,), {"__call__": make_handler})
    ensure_fd_limit(limits.max_connections + 1024)
    return edge


__all__ = ["EdgeLimits", "EdgeMetrics", "Edge", "BodyBudget", "Lease", "install", "handler_args", "supported",
           "ensure_fd_limit"]
