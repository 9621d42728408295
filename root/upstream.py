"""Upstream partitions: replica choice, failover, compression, and the pooled HTTP/1.1 connections that carry them.

A replica is marked down by a failed connect or health check and up again by
a passing health check or a 2xx answer (a 4xx, such as a restarting leaf's
404 or 503 while it loads, proves nothing). Choice prefers replicas that are up (least in-flight or
round-robin); when all are down the root still tries them, so recovery does
not wait for the next health check. Only a connect failure is retried (once,
on another replica): nothing reached the model, so a retry cannot run it twice.

Why our own client connections rather than aiohttp's ClientSession on this
path: the session builds a request object, a payload writer, a response
object and a stream reader per request, ~150 µs of Python for a body the
root has already laid out in memory. Here a request is one `writelines` of
a head we format and the body's buffers as they are (no copy in Python), and
the response is parsed by llhttp through `httptools` (the parser uvicorn
uses), whose callbacks collect it into a list:

    Partition.request ──> ReplicaPool.acquire ──> UpstreamConnection.exchange
         (failover,           (idle keep-alive        (writelines(head, *body);
          metrics)             LIFO, bounded)          httptools parses the reply)

Background requests that are not on the request path (health checks, the
audit's re-send, drift scrapes) keep the partition's aiohttp session.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import aiohttp
import httptools
from multidict import CIMultiDict

from trimmer.compression import BodyTooLarge, DecompressError, UnsupportedEncoding, decompress
from trimmer.compression import compressor as _compressor
from trimmer.errors import ConfigError

from .config import PartitionConfig, Timeouts
from .metrics import Metrics

log = logging.getLogger("trimmer.root.upstream")

# Hop-by-hop and recomputed headers never copied from an upstream response.
_DROP_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive",
                          "content-encoding", "date", "server"}
MAX_RESPONSE_BYTES = 256 * 1024 * 1024  # an upstream answer past this (decoded) is a 502, not an unbounded buffer


class UpstreamError(Exception):
    """A failure talking to a partition; `status` is the HTTP status the root answers with."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind  # metric label: timeout | unavailable | bad_gateway


class _ConnectFailed(Exception):
    """No connection could be opened: nothing was sent, so another replica may be tried."""


class _Timeout(Exception):
    pass


class _Broken(Exception):
    """The connection failed after the request was (or may have been) sent."""


class _Stale(_Broken):
    """A reused keep-alive connection closed before a byte of the answer: the replica closed it as idle while the
    request was on its way, so the request was not processed there (HTTP servers close only idle connections).
    Sent again once, on a new connection, as Go's net/http and urllib3 do."""


@dataclass
class Replica:
    url: str
    inflight: int = 0
    up: bool = True  # optimistic until the first health check says otherwise
    last_error: str | None = None
    last_change: float = 0.0
    pool: "ReplicaPool | None" = None


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str]  # case-insensitive (CIMultiDict), as HTTP header names are
    replica: str
    sent_bytes: int


# ---------------------------------------------------------------------- bodies and connections
class Body:
    """A request body as the chunks it was received in, joined only when something needs one buffer.

    A megabyte body joined costs a full copy per request; the msgpack trim reads
    the chunks in place and a passthrough writes them upstream as they are.
    `chunks` are bytes, or memoryviews of a buffer the receiving listener reuses (root/front.py): `joined()`
    is then a copy of its own, and `pinned` is set when an upstream connection was closed with them unsent."""

    __slots__ = ("chunks", "size", "pinned", "recycle", "_joined")

    def __init__(self, chunks: list[bytes] | list[memoryview], recycle: Callable[[], None] | None = None) -> None:
        self.chunks = chunks
        self.size = sum(map(len, chunks))
        self.pinned = False
        self.recycle = recycle  # gives the chunks' buffer back for reuse, once nothing reads it any more
        self._joined: bytes | None = chunks[0] if len(chunks) == 1 and type(chunks[0]) is bytes else None  # type: ignore[assignment]

    @classmethod
    def of(cls, data: bytes) -> Body:
        return cls([data])

    def __len__(self) -> int:
        return self.size

    def joined(self) -> bytes:
        """One buffer (one copy, made once) for the paths that decode or compress the whole body."""
        if self._joined is None:
            if self.size and not self.chunks:
                raise RuntimeError("request body used after release()")
            self._joined = b"".join(self.chunks)
        return self._joined

    def release(self) -> None:
        """Drop the bytes, keep the size: a trimmed request need not hold its whole body while the model runs."""
        self.chunks = []
        self._joined = None
        recycle, self.recycle = self.recycle, None
        if recycle is not None and not self.pinned:  # pinned: an aborted upstream connection may still hold them
            recycle()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a replica, one exchange at a time; llhttp (httptools) parses replies."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # kept: asyncio.get_running_loop() costs a getpid() syscall per call
        self.transport: asyncio.Transport | None = None
        self.limit = limit
        self.closed = False
        self._parser: Any = None
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._parts: list[bytes] = []
        self._size = 0
        self.keep_alive = False
        self.reused = False  # taken from the idle pool for this exchange
        self.answered = False  # a byte of the current exchange's answer arrived

    # -- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.answered = True
        if self._parser is None:  # bytes on an idle connection: not a state we can reuse
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(_Broken(f"malformed response: {exc}"))
        except _Broken as exc:  # raised by on_body past the limit
            self._fail(exc)

    def eof_received(self) -> bool | None:
        self.closed = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.reused and not self.answered:
            self._fail(_Stale("a reused keep-alive connection was closed by the upstream before any answer"))
        else:
            self._fail(_Broken("connection closed by the upstream before its answer was complete"))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.limit:
            raise _Broken(f"response body larger than {self.limit} bytes")
        self._parts.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = bool(self._parser.should_keep_alive())
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._parser.get_status_code())

    # -- use
    async def exchange(self, head: bytes, body: Sequence[bytes | memoryview],
                       deadline: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Write one request, await its whole answer: (status, raw headers, body). Raises _Broken or _Timeout."""
        loop = self.loop
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._parts, self._size = [], [], 0
        self.answered = False
        self.keep_alive = False  # set by on_message_complete: an exchange cut short never goes back to the pool
        self._waiter = waiter = loop.create_future()
        self._timer = loop.call_at(deadline, self._expire)
        assert self.transport is not None
        try:
            if body:
                self.transport.writelines([head, *body])
            else:
                self.transport.write(head)
            status = await waiter
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._waiter = None
            self._parser = None
        parts = self._parts
        self._parts = []
        return status, self._headers, parts[0] if len(parts) == 1 else b"".join(parts)

    def drained(self) -> bool:
        """Whether every byte written has left (a reply may come before the request body was read)."""
        return self.transport is not None and self.transport.get_write_buffer_size() == 0

    def _expire(self) -> None:
        self._timer = None
        self._fail(_Timeout())

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self.closed = True
            waiter.set_exception(exc)
            if self.transport is not None:
                self.transport.abort()


class ReplicaPool:
    """Idle keep-alive connections to one replica (most recent first) and a cap on those open at once."""

    def __init__(self, url: str, max_connections: int, connect_s: float, response_limit: int) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"replica {url!r}: expected http(s)://host[:port][/prefix]")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")  # a replica served under a path prefix: every request path gets it
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.authority = f"{parts.hostname}:{self.port}".encode("latin-1")
        self.connect_s = connect_s
        self.response_limit = response_limit
        self.max_connections = max_connections
        self.idle: list[UpstreamConnection] = []
        self._slots: asyncio.Semaphore | None = None

    async def acquire(self, loop: asyncio.AbstractEventLoop, deadline: float,
                      fresh: bool = False) -> UpstreamConnection:
        """A slot and a connection (an idle one unless `fresh`, else a new one). _ConnectFailed if none could be
        opened."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise _Timeout() from None
        else:
            await self._slots.acquire()
        while self.idle and not fresh:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self.response_limit, loop),
                                       self.host, self.port, ssl=self.tls),
                max(0.001, min(self.connect_s, deadline - loop.time())))
        except (OSError, asyncio.TimeoutError) as exc:
            self._slots.release()
            raise _ConnectFailed(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        return conn  # type: ignore[return-value]

    def release(self, conn: UpstreamConnection) -> None:
        """Its slot back; the connection back to the idle list if its exchange completed and everything was sent."""
        if self._slots is not None:
            self._slots.release()
        if conn.keep_alive and not conn.closed and conn.drained():
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.closed = True
            conn.transport.abort()

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


def _request_head(method: str, path: str, authority: bytes, headers: Mapping[str, str], length: int | None) -> bytes:
    """An HTTP/1.1 request head. Values come from llhttp-parsed client headers or the root itself; CR/LF is refused."""
    lines = [f"{method} {path} HTTP/1.1\r\n".encode("latin-1"), b"Host: " + authority + b"\r\n"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} carries a line break")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if length is not None:
        lines.append(b"Content-Length: %d\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines)


# ---------------------------------------------------------------------- partitions
class Partition:
    def __init__(self, cfg: PartitionConfig, timeouts: Timeouts, metrics: Metrics,
                 response_limit: int = MAX_RESPONSE_BYTES) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.timeouts = timeouts
        self.metrics = metrics
        self.replicas = [Replica(u) for u in cfg.replicas]
        for r in self.replicas:
            r.pool = ReplicaPool(r.url, cfg.max_connections, timeouts.connect_s, response_limit)
        self.response_limit = response_limit
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, from the first request
        self._rr = itertools.count()
        self._compress = _compressor(cfg.compression)
        self.session: aiohttp.ClientSession | None = None  # background requests: health, audit, drift
        for r in self.replicas:
            metrics.replica_up.labels(self.name, r.url).set(1)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=4 * len(self.replicas), limit_per_host=4, ttl_dns_cache=300,
                                         enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s),
        )

    async def close(self) -> None:
        for r in self.replicas:
            if r.pool is not None:
                r.pool.close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    # ------------------------------------------------------------------ health
    @property
    def any_up(self) -> bool:
        return any(r.up for r in self.replicas)

    def _mark(self, replica: Replica, up: bool, error: str | None = None) -> None:
        if replica.up != up:
            log.warning("partition %s replica %s is %s%s", self.name, replica.url, "up" if up else "down",
                        f": {error}" if error else "")
            replica.last_change = time.time()
        replica.up = up
        replica.last_error = error
        self.metrics.child(self.metrics.replica_up, (self.name, replica.url)).set(1 if up else 0)

    async def check_health(self) -> None:
        """One GET of health_path on every replica, concurrently; bounded by the connect and request timeouts."""
        session = self.session
        assert session is not None
        timeout = aiohttp.ClientTimeout(total=max(self.timeouts.connect_s, 1.0))

        async def one(r: Replica) -> None:
            try:
                async with session.get(r.url + self.cfg.health_path, timeout=timeout) as resp:
                    await resp.read()
                    self._mark(r, resp.status == 200,
                               None if resp.status == 200 else f"health check answered {resp.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                self._mark(r, False, f"health check failed: {type(exc).__name__}")

        await asyncio.gather(*(one(r) for r in self.replicas))

    async def health_loop(self, interval: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check_health()
            except Exception:  # never let the loop die; the next round retries
                log.exception("health check of partition %s failed", self.name)
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass

    def status(self) -> dict:
        return {
            "protocol": self.cfg.protocol,
            "compression": self.cfg.compression,
            "balance": self.cfg.balance,
            "replicas": [{"url": r.url, "up": r.up, "inflight": r.inflight, "last_error": r.last_error}
                         for r in self.replicas],
        }

    # ------------------------------------------------------------------ choice
    def _order(self) -> list[Replica]:
        """Replicas in the order to try: preferred first; down replicas last."""
        reps = self.replicas
        if len(reps) == 1:
            return reps
        if self.cfg.balance == "round_robin":
            start = next(self._rr) % len(reps)
            ordered = reps[start:] + reps[:start]
        else:
            start = next(self._rr) % len(reps)  # rotate first so ties spread evenly
            ordered = sorted(reps[start:] + reps[:start], key=lambda r: r.inflight)
        return sorted(ordered, key=lambda r: not r.up)  # stable: keeps the balance order among up replicas

    # ------------------------------------------------------------------ send
    async def request(self, method: str, path: str, body: Body | bytes | None, headers: dict[str, str],
                      timeout_s: float, labels: tuple[str, str, str] | None = None,
                      deadline_header: str | None = None) -> UpstreamResponse:
        """Send to one replica, failing over once on a connect failure. Raises UpstreamError (502/503/504)."""
        if body is not None and self._compress is not None:
            body = self._compress(body.joined() if isinstance(body, Body) else body)
            headers = {**headers, "Content-Encoding": self.cfg.compression}
        parts: Sequence[bytes | memoryview] = (() if body is None
                                               else body.chunks if isinstance(body, Body) else (body,))
        sent = len(body) if body is not None else 0
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        errors: list[str] = []
        # (replica, whether to open a new connection): the preferred two; a stale keep-alive connection (_Stale) adds
        # one more try of the same replica on a new connection, once per request
        tries = [(replica, False) for replica in self._order()[:2]]
        stale_retried = False
        while tries:
            replica, fresh = tries.pop(0)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            h = {**headers, deadline_header: str(max(1, int(remaining * 1000)))} if deadline_header else headers
            pool = replica.pool
            assert pool is not None
            try:
                head = _request_head(method, pool.prefix + path, pool.authority, h,
                                     sent if body is not None or method == "POST" else None)
            except ValueError as exc:
                raise UpstreamError(400, "bad_request", str(exc)) from None
            replica.inflight += 1
            gauge_key = (self.name, replica.url)
            self.metrics.add(self.metrics.inflight, gauge_key)
            conn: UpstreamConnection | None = None
            try:
                conn = await pool.acquire(loop, deadline, fresh)
                status, raw_headers, data = await conn.exchange(head, parts, deadline)
            except _ConnectFailed as exc:
                self._count_attempt(replica, "connect_error")
                self._mark(replica, False, f"connect failed: {exc}")
                errors.append(f"{replica.url}: connect failed")
                continue
            except _Timeout:
                self._count_attempt(replica, "timeout")
                if labels is not None and conn is not None:  # connected, so the body went out (or began to)
                    self.metrics.add(self.metrics.sent_bytes, labels, sent)
                raise UpstreamError(504, "timeout",
                                    f"upstream timed out after {timeout_s:.3g}s at {replica.url}") from None
            except _Broken as exc:
                stale = isinstance(exc, _Stale)
                self._count_attempt(replica, "stale_connection" if stale else "error")
                if labels is not None:
                    self.metrics.add(self.metrics.sent_bytes, labels, sent)
                if stale and not stale_retried:  # closed as idle by the replica: nothing ran there
                    stale_retried = True
                    tries.insert(0, (replica, True))
                    continue
                # Reached the replica (or may have): not retried, the model may have run.
                raise UpstreamError(502, "bad_gateway", f"upstream {replica.url} failed: {str(exc)[:200]}") from None
            finally:
                replica.inflight -= 1
                self.metrics.add(self.metrics.inflight, gauge_key, -1)
                if conn is not None:
                    if isinstance(body, Body) and not conn.drained():
                        body.pinned = True  # its buffers may still be queued on a connection that is being closed
                    pool.release(conn)
            try:
                ctype, out_headers, data = self._decoded(status, raw_headers, data)
            except UpstreamError:
                self._count_attempt(replica, "error")
                raise
            self._count_attempt(replica, "ok" if status < 500 else "http_error")
            if not replica.up and 200 <= status < 300:
                # Only a success is proof of health: a restarting leaf answers 404/503 while it loads.
                self._mark(replica, True)
            if labels is not None:
                self.metrics.add(self.metrics.sent_bytes, labels, sent)
                self.metrics.add(self.metrics.received_bytes, labels, len(data))
            return UpstreamResponse(status, data, ctype, out_headers, replica.url, sent)
        if not errors:
            raise UpstreamError(504, "timeout", f"deadline of {timeout_s:.3g}s expired before a replica was reached")
        raise UpstreamError(503, "unavailable", "no replica reachable (" + "; ".join(errors) + ")")

    def _decoded(self, status: int,
                 raw_headers: list[tuple[bytes, bytes]], data: bytes) -> tuple[str, CIMultiDict[str], bytes]:
        """(Content-Type, the headers worth passing on, the body without its Content-Encoding)."""
        out_headers: CIMultiDict[str] = CIMultiDict()
        encoding = None
        ctype = "application/octet-stream"
        for k, v in raw_headers:
            name, value = k.decode("latin-1"), v.decode("latin-1")
            low = name.lower()
            if low == "content-type":
                ctype = value
            elif low == "content-encoding":
                encoding = value
            if low not in _DROP_RESPONSE_HEADERS:
                out_headers.add(name, value)
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            try:
                data = decompress(data, encoding, self.response_limit)
            except (DecompressError, BodyTooLarge, UnsupportedEncoding) as exc:
                raise UpstreamError(502, "bad_gateway",
                                    f"upstream answered {status} with an undecodable body: {exc}") from None
        return ctype, out_headers, data

    def _count_attempt(self, replica: Replica, outcome: str) -> None:
        self.metrics.add(self.metrics.attempts, (self.name, replica.url, outcome))


__all__ = ["Body", "Partition", "Replica", "ReplicaPool", "UpstreamConnection", "UpstreamError", "UpstreamResponse"]
