"""Upstream partitions: one pooled ClientSession each, replica choice, failover, compression.

A replica is marked down by a failed connect or health check and up again by
a passing health check or a 2xx answer (a 4xx, such as a restarting leaf's
404 or 503 while it loads, proves nothing). Choice prefers replicas that are up (least in-flight or
round-robin); when all are down the root still tries them, so recovery does
not wait for the next health check. Only a connect failure is retried (once,
on another replica): nothing reached the model, so a retry cannot run it twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Mapping

import aiohttp
from multidict import CIMultiDict

from trimmer.compression import compressor as _compressor

from .body import Body, outgoing
from .config import PartitionConfig, Timeouts
from .metrics import Metrics

log = logging.getLogger("trimmer.root.upstream")

# Hop-by-hop and recomputed headers never copied from an upstream response.
_DROP_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding", "date", "server"}


class UpstreamError(Exception):
    """A failure talking to a partition; `status` is the HTTP status the root answers with."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind  # metric label: timeout | unavailable


@dataclass
class Replica:
    url: str
    inflight: int = 0
    up: bool = True  # optimistic until the first health check says otherwise
    last_error: str | None = None
    last_change: float = 0.0


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str]  # case-insensitive (CIMultiDict), as HTTP header names are
    replica: str
    sent_bytes: int


class Partition:
    def __init__(self, cfg: PartitionConfig, timeouts: Timeouts, metrics: Metrics) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.timeouts = timeouts
        self.metrics = metrics
        self.replicas = [Replica(u) for u in cfg.replicas]
        self._rr = itertools.count()
        self._compress = _compressor(cfg.compression)
        self.session: aiohttp.ClientSession | None = None
        for r in self.replicas:
            metrics.replica_up.labels(self.name, r.url).set(1)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.cfg.max_connections * len(self.replicas), limit_per_host=self.cfg.max_connections,
                                         ttl_dns_cache=300, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # ------------------------------------------------------------------ health
    @property
    def any_up(self) -> bool:
        return any(r.up for r in self.replicas)

    def _mark(self, replica: Replica, up: bool, error: str | None = None) -> None:
        if replica.up != up:
            log.warning("partition %s replica %s is %s%s", self.name, replica.url, "up" if up else "down", f": {error}" if error else "")
            replica.last_change = time.time()
        replica.up = up
        replica.last_error = error
        self.metrics.child(self.metrics.replica_up, (self.name, replica.url)).set(1 if up else 0)

    async def check_health(self) -> None:
        """One GET of health_path on every replica, concurrently; bounded by the connect and request timeouts."""
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=max(self.timeouts.connect_s, 1.0))

        async def one(r: Replica) -> None:
            try:
                async with self.session.get(r.url + self.cfg.health_path, timeout=timeout) as resp:
                    await resp.read()
                    self._mark(r, resp.status == 200, None if resp.status == 200 else f"health check answered {resp.status}")
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
            "replicas": [{"url": r.url, "up": r.up, "inflight": r.inflight, "last_error": r.last_error} for r in self.replicas],
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
    async def request(self, method: str, path: str, body: Body | bytes | None, headers: dict[str, str], timeout_s: float,
                      labels: tuple[str, str, str] | None = None, deadline_header: str | None = None) -> UpstreamResponse:
        """Send to one replica, failing over once on a connect failure. Raises UpstreamError (503/504)."""
        assert self.session is not None, "partition not started"
        if body is not None and self._compress is not None:
            body = self._compress(body.joined() if isinstance(body, Body) else body)
            headers = {**headers, "Content-Encoding": self.cfg.compression}
        sent = len(body) if body is not None else 0
        data = outgoing(body, headers.get("Content-Type", "application/octet-stream"))
        deadline = time.monotonic() + timeout_s
        order = self._order()
        errors: list[str] = []
        for attempt, replica in enumerate(order[:2]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            h = headers
            if deadline_header:
                h = {**headers, deadline_header: str(max(1, int(remaining * 1000)))}
            replica.inflight += 1
            gauge = self.metrics.child(self.metrics.inflight, (self.name, replica.url))
            gauge.inc()
            try:
                async with self.session.request(method, replica.url + path, data=data, headers=h,
                                                timeout=aiohttp.ClientTimeout(total=remaining, sock_connect=min(remaining, self.timeouts.connect_s))) as resp:
                    data = await resp.read()
                    ctype = resp.headers.get("Content-Type", "application/octet-stream")
                    out_headers = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS)
                self._count_attempt(replica, "ok" if resp.status < 500 else "http_error")
                if not replica.up and 200 <= resp.status < 300:
                    # Only a success is proof of health: a restarting leaf answers 404/503 while it loads.
                    self._mark(replica, True)
                if labels is not None:
                    self.metrics.child(self.metrics.sent_bytes, labels).inc(sent)
                    self.metrics.child(self.metrics.received_bytes, labels).inc(len(data))
                return UpstreamResponse(resp.status, data, ctype, out_headers, replica.url, sent)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                self._count_attempt(replica, "connect_error")
                self._mark(replica, False, f"connect failed: {type(exc).__name__}: {exc}")
                errors.append(f"{replica.url}: connect failed")
                continue
            except asyncio.TimeoutError:
                self._count_attempt(replica, "timeout")
                if labels is not None:  # connected, so the body went out (or began to)
                    self.metrics.child(self.metrics.sent_bytes, labels).inc(sent)
                raise UpstreamError(504, "timeout", f"upstream timed out after {timeout_s:.3g}s at {replica.url}") from None
            except aiohttp.ClientError as exc:
                # Reached the replica (or may have): not retried, the model may have run.
                self._count_attempt(replica, "error")
                if labels is not None:
                    self.metrics.child(self.metrics.sent_bytes, labels).inc(sent)
                raise UpstreamError(502, "bad_gateway", f"upstream {replica.url} failed: {type(exc).__name__}: {str(exc)[:200]}") from None
            finally:
                replica.inflight -= 1
                gauge.dec()
        if not errors:
            raise UpstreamError(504, "timeout", f"deadline of {timeout_s:.3g}s expired before a replica was reached")
        raise UpstreamError(503, "unavailable", "no replica reachable (" + "; ".join(errors) + ")")

    def _count_attempt(self, replica: Replica, outcome: str) -> None:
        self.metrics.child(self.metrics.attempts, (self.name, replica.url, outcome)).inc()


__all__ = ["Partition", "Replica", "UpstreamError", "UpstreamResponse"]
