"""Loopback upstreams for the cases the real leaf cannot produce on demand, each in a thread of the test process.

`Tap` forwards to a real upstream unchanged and keeps what it was sent (so a test sees the exact bytes a real
leaf received); `HangUp` reads a request and closes without answering (a replica dying mid-request); `Gate`
holds every request until the test opens it (an in-flight request without a sleep or a timing guess).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
import urllib.error
import urllib.request

import msgspec
import numpy as np


class Tap:
    """A pass-through HTTP proxy in a thread: forwards each request to the leaf, keeps (method, path, body)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()
        tap = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if self.command == "POST":
                    with tap.lock:
                        tap.seen.append((self.command, self.path, body or b""))
                headers = {k: v for k,
                           v in self.headers.items() if k.lower() not in ("host", "connection", "content-length")}
                req = urllib.request.Request(tap.target + self.path, data=body, headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, out, rh = resp.status, resp.read(), resp.headers
                except urllib.error.HTTPError as exc:
                    status, out, rh = exc.code, exc.read(), exc.headers
                self.send_response(status)
                for k, v in rh.items():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _forward

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self, path_part: str) -> list[bytes]:
        with self.lock:
            return [b for _, p, b in self.seen if path_part in p]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HangUp:
    """Accepts a connection, reads the request head, counts POSTs, and closes without answering."""

    def __init__(self) -> None:
        self.posts = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(5)
                head = b""
                try:
                    while b"\r\n\r\n" not in head and len(head) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                except OSError:
                    pass
                if head.startswith(b"POST "):
                    self.posts += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


class Gate:
    """Holds each POST until the test lets it through, then answers msgpack {"features": [names received],
    "outputs": {"score": [f1]}} (a value from the bytes it was sent, so an audit can compare two answers).

    `open(n)` lets n requests through, `release` (an Event) lets every request through; `arrived` is set when a
    request is in, `posts` counts them. Bounded: a request never let through is answered 503 after `hold_s`.
    """

    def __init__(self, hold_s: float = 60.0, hold=lambda features: True) -> None:
        """`hold(features)`: whether a request with these features waits for the test (default: every one)."""
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.posts = 0
        self._permits = threading.Semaphore(0)
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, body: bytes, ctype: str = "application/msgpack") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # health checks
                self._answer(200, b'{"ready": true}', "application/json")

            def do_POST(self) -> None:
                from trimmer.codec import encode_msgpack
                from trimmer.tensor import Tensor

                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                gate.posts += 1
                gate.arrived.set()
                feats = msgspec.msgpack.decode(raw).get("features", {})
                deadline = time.monotonic() + hold_s
                while hold(feats) and not gate.release.is_set() and not gate._permits.acquire(timeout=0.05):
                    if time.monotonic() > deadline:
                        self._answer(503, b'{"error": "gate never opened"}', "application/json")
                        return
                out = {"features": list(feats)}
                if isinstance(feats.get("f1"), (int, float)):
                    out["outputs"] = {"score": Tensor.from_numpy(np.array([feats["f1"]], np.float32))}
                self._answer(200, encode_msgpack(out))

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def open(self, n: int) -> None:
        for _ in range(n):
            self._permits.release()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
