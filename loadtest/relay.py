"""A byte-counting TCP relay placed between the root and a leaf.

The load test counts bytes on the wire itself instead of trusting the root's
metrics: every byte the root writes to the leaf (HTTP framing included) passes
through here. A light HTTP/1.1 parser on the root->leaf direction attributes
bytes to requests by path (header bytes and body bytes separately), so load
traffic can be told apart from health probes; the raw counters never depend
on the parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class PathStats:
    requests: int = 0
    header_bytes: int = 0
    body_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.body_bytes


@dataclass
class RelayStats:
    """Counters since the relay started; take two snapshots and subtract for a window."""

    up_bytes: int = 0  # client -> upstream (root -> leaf), raw TCP payload
    down_bytes: int = 0  # upstream -> client (leaf -> root)
    connections: int = 0
    parse_errors: int = 0  # connections whose stream was not parseable HTTP/1.1 (raw counts still exact)
    paths: dict[str, PathStats] = field(default_factory=dict)

    def copy(self) -> "RelayStats":
        return RelayStats(self.up_bytes, self.down_bytes, self.connections, self.parse_errors,
                          {k: PathStats(v.requests, v.header_bytes, v.body_bytes) for k, v in self.paths.items()})

    def __sub__(self, other: "RelayStats") -> "RelayStats":
        paths = {}
        for k, v in self.paths.items():
            o = other.paths.get(k, PathStats())
            d = PathStats(v.requests - o.requests, v.header_bytes - o.header_bytes, v.body_bytes - o.body_bytes)
            if d.requests or d.total_bytes:
                paths[k] = d
        return RelayStats(self.up_bytes - other.up_bytes, self.down_bytes - other.down_bytes,
                          self.connections - other.connections, self.parse_errors - other.parse_errors, paths)

    def matching(self, predicate) -> PathStats:
        """Sum of the per-path stats whose path satisfies `predicate(path)`."""
        out = PathStats()
        for k, v in self.paths.items():
            if predicate(k):
                out.requests += v.requests
                out.header_bytes += v.header_bytes
                out.body_bytes += v.body_bytes
        return out

    def to_json(self) -> dict:
        return {"up_bytes": self.up_bytes, "down_bytes": self.down_bytes, "connections": self.connections,
                "parse_errors": self.parse_errors,
                "paths": {k: {"requests": v.requests, "header_bytes": v.header_bytes, "body_bytes": v.body_bytes} for k,
                          v in sorted(self.paths.items())}}


class _HttpRequestParser:
    """Incremental HTTP/1.1 request-stream parser that only measures (Content-Length and chunked bodies)."""

    MAX_HEAD = 1 << 20

    def __init__(self, stats: RelayStats) -> None:
        self.stats = stats
        self.buf = bytearray()
        self.state = "head"  # head | body | chunk_size | chunk_data | chunk_crlf | trailers | broken
        self.remaining = 0
        self.current: PathStats | None = None

    def feed(self, data: bytes) -> None:
        if self.state == "broken":
            return
        view = memoryview(data)
        while view:
            if self.state == "body" or self.state == "chunk_data":
                n = min(self.remaining, len(view))
                self.current.body_bytes += n  # type: ignore[union-attr]
                self.remaining -= n
                view = view[n:]
                if self.remaining == 0:
                    self.state = "head" if self.state == "body" else "chunk_crlf"
                    if self.state == "chunk_crlf":
                        self.remaining = 2
                continue
            if self.state == "chunk_crlf":
                n = min(self.remaining, len(view))
                self.current.body_bytes += n  # type: ignore[union-attr]
                self.remaining -= n
                view = view[n:]
                if self.remaining == 0:
                    self.state = "chunk_size"
                continue
            # line/head oriented states: buffer until the delimiter
            delim = b"\r\n\r\n" if self.state in ("head", "trailers") else b"\r\n"
            start = max(0, len(self.buf) - len(delim) + 1)
            self.buf += view
            idx = self.buf.find(delim, start)
            if idx < 0:
                if len(self.buf) > self.MAX_HEAD:
                    self._broken()
                return
            end = idx + len(delim)
            consumed_from_view = end - (len(self.buf) - len(view))
            chunk = bytes(self.buf[:end])
            self.buf.clear()
            view = view[consumed_from_view:]
            if self.state == "head":
                if not self._head(chunk):
                    return
            elif self.state == "trailers":
                self.current.body_bytes += len(chunk)  # type: ignore[union-attr]
                self.state = "head"
            else:  # chunk_size
                self.current.body_bytes += len(chunk)  # type: ignore[union-attr]
                try:
                    size = int(chunk.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self._broken()
                    return
                if size == 0:
                    # last chunk: trailers (possibly empty) end with CRLF; an empty trailer section is a bare CRLF
                    self.state = "trailers"
                    self.buf += b"\r\n"  # pretend the size line's CRLF precedes so "\r\n\r\n" ends an empty trailer
                    self.current.body_bytes -= 2  # type: ignore[union-attr]  # that synthetic CRLF is not on the wire
                else:
                    self.state = "chunk_data"
                    self.remaining = size

    def _head(self, raw: bytes) -> bool:
        head = raw[2:] if raw.startswith(b"\r\n") else raw  # tolerate a stray CRLF between requests
        try:
            text = head.decode("latin-1")
            request_line, *header_lines = text.split("\r\n")
            method, target, _version = request_line.split(" ", 2)
        except ValueError:
            self._broken()
            return False
        path = target.split("?", 1)[0]
        ps = self.stats.paths.setdefault(path, PathStats())
        ps.requests += 1
        ps.header_bytes += len(raw)
        self.current = ps
        length = 0
        chunked = False
        for line in header_lines:
            name, _, value = line.partition(":")
            lname = name.strip().lower()
            if lname == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    self._broken()
                    return False
            elif lname == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            self.state = "chunk_size"
        elif length > 0:
            self.state, self.remaining = "body", length
        else:
            self.state = "head"
        return True

    def _broken(self) -> None:
        self.state = "broken"
        self.buf.clear()
        self.stats.parse_errors += 1


class Relay:
    """Listen on 127.0.0.1:`port` and forward each connection to `upstream` (host, port), counting bytes."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0, host: str = "127.0.0.1",
                 bufsize: int = 256 * 1024) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host, self.port = host, port
        self.bufsize = bufsize
        self.stats = RelayStats()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> "Relay":
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=self.bufsize)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def snapshot(self) -> RelayStats:
        return self.stats.copy()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream, limit=self.bufsize), 10)
            except (OSError, asyncio.TimeoutError):
                writer.close()
                return
            for w in (writer, up_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            parser = _HttpRequestParser(self.stats)
            up = asyncio.ensure_future(self._pipe(reader, up_writer, "up_bytes", parser))
            down = asyncio.ensure_future(self._pipe(up_reader, writer, "down_bytes", None))
            try:
                await asyncio.gather(up, down)
            finally:
                up.cancel()
                down.cancel()
                for w in (writer, up_writer):
                    with contextlib.suppress(Exception):
                        w.close()
        finally:
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str,
                    parser: _HttpRequestParser | None) -> None:
        try:
            while True:
                data = await reader.read(self.bufsize)
                if not data:
                    break
                setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
                if parser is not None:
                    parser.feed(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()


class RelayThread:
    """A Relay on its own event loop in a daemon thread, for synchronous callers (demo, CLI)."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0) -> None:
        self.relay = Relay(upstream_host, upstream_port, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Relay:
        def run() -> None:
            try:
                import uvloop

                loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
                loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.relay.start())
            except BaseException as exc:  # surfaced to the caller below
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self.relay.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="byte-relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"relay could not start: {self._error}")
        return self.relay

    def snapshot(self) -> RelayStats:
        """A consistent copy of the counters, taken on the relay's own loop."""
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self._snap(), self._loop)
        return fut.result(5)

    async def _snap(self) -> RelayStats:
        return self.relay.snapshot()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
