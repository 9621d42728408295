"""Prometheus metrics of the root; names are a stable interface (docs/metrics.md).

With `--workers N` each worker process writes its samples to the shared
PROMETHEUS_MULTIPROC_DIR (set by the parent before the workers start, since
prometheus_client picks its value store at import) and `/metrics` on any
worker aggregates all of them, so a scrape through SO_REUSEPORT sees the
whole service, not one random worker.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "trimmer_root"
MODEL_LABELS = ("model", "version", "partition")

_LAT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TRIM_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """All root metrics on one registry (the default one in multiprocess mode, as prometheus_client requires)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._children: dict = {}
        self._pending: list[tuple[Any, tuple[str, ...], float, bool]] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on
        r = self.registry
        m = MODEL_LABELS
        self.client_requests = Counter(f"{PREFIX}_client_requests", "HTTP requests received, by route and status",
                                       ("route", "status"), registry=r)
        self.front_handoffs = Counter(f"{PREFIX}_front_handoffs",
                                      "Connections the fast listener handed to the aiohttp server, by the "
                                      "reason of their first such request (route, body_framing, upgrade)", ("reason",),
                                      registry=r)
        self.front_body_waits = Counter(
            f"{PREFIX}_front_body_waits",
            "Request bodies that waited for room under limits.max_receiving_body_bytes (their connection's reading "
            "paused), by how the wait ended: admitted, timed_out (answered 503) or gone (the client left)",
            ("outcome",), registry=r)
        self.client_bytes = Counter(f"{PREFIX}_client_bytes", "Request body bytes received from clients, each request "
                                                              "once, by route", ("route",), registry=r)
        self.requests = Counter(f"{PREFIX}_requests",
                                "Per-model upstream requests attempted (one per fan-out target)", m, registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Per-model failures by kind", (*m, "kind"), registry=r)
        self.model_client_bytes = Counter(
            f"{PREFIX}_model_client_bytes", "Client body bytes attributed to each target model (a fan-out to 3 models "
                                            "counts its body 3 times)", m, registry=r)
        self.untrimmed_bytes = Counter(
            f"{PREFIX}_untrimmed_bytes",
            "Body bytes the root would have sent upstream without trimming (uncompressed)", m, registry=r)
        self.trimmed_bytes = Counter(
            f"{PREFIX}_trimmed_bytes",
            "Body bytes after trimming, before compression (in shadow mode: what enforce would send)", m, registry=r)
        self.sent_bytes = Counter(
            f"{PREFIX}_upstream_sent_bytes", "Body bytes actually sent upstream on the wire, after trim and "
                                             "compression, each attempt that reached a replica", m, registry=r)
        self.received_bytes = Counter(f"{PREFIX}_upstream_received_bytes",
                                      "Response body bytes received from upstream", m, registry=r)
        self.features_in = Counter(f"{PREFIX}_features_in",
                                   "Features in client requests, per target model", m, registry=r)
        self.features_dropped = Counter(f"{PREFIX}_features_dropped",
                                        "Features removed from bodies sent upstream (enforce mode)", m, registry=r)
        self.shadow_features_dropped = Counter(
            f"{PREFIX}_shadow_features_dropped",
            "Features trimming would have removed in shadow mode (sent untrimmed)", m, registry=r)
        self.allowlist_misses = Counter(
            f"{PREFIX}_allowlist_misses",
            "Requests forwarded untrimmed because no allowlist is known for the (model, version)", m, registry=r)
        self.untrimmed_forwards = Counter(
            f"{PREFIX}_untrimmed_forwards",
            "Requests sent upstream untrimmed, by reason (no_version, no_allowlist, mode_off, shadow, "
            "signature_mismatch, unparsed_encoding): every fail-open is counted", (*m, "reason"), registry=r)
        self.allowlist_mismatches = Counter(
            f"{PREFIX}_allowlist_mismatches",
            "Trimmed requests a replica refused (412) because it runs another signature than the "
            "allowlist's; action: resent (untrimmed) or refused (503, body already released)",
            (*m, "action"), registry=r)
        self.captured = Counter(f"{PREFIX}_captured_requests",
                                "Requests written to the capture file (capture:, for loadtest --replay)", registry=r)
        self.mode_requests = Counter(f"{PREFIX}_mode_requests", "Per-model requests by trimming mode applied",
                                     (*m, "mode"), registry=r)
        self.eager_trims = Counter(
            f"{PREFIX}_eager_trims", "Trims fed slice by slice while the body arrived (root/front.py, or the handler "
                                     "as it read chunks); the rest ran once the body was in", registry=r)
        self.trim_seconds = Histogram(f"{PREFIX}_trim_seconds", "Time to trim one body for one model", m,
                                      buckets=_TRIM_BUCKETS, registry=r)
        self.upstream_seconds = Histogram(
            f"{PREFIX}_upstream_seconds", "Upstream round trip (send body, read whole response), including a failover "
                                          "retry", m, buckets=_LAT_BUCKETS, registry=r)
        self.attempts = Counter(
            f"{PREFIX}_upstream_attempts", "Upstream attempts per replica by outcome (ok, http_error, connect_error, "
                                           "timeout, error)", ("partition", "replica", "outcome"), registry=r)
        self.inflight = Gauge(
            f"{PREFIX}_upstream_inflight", "Requests in flight per replica", ("partition", "replica"), registry=r,
            multiprocess_mode="livesum")
        self.replica_up = Gauge(
            f"{PREFIX}_replica_up", "1 when the replica's last health check or request succeeded",
            ("partition", "replica"), registry=r, multiprocess_mode="max")
        # Equivalence audit (root/audit.py): a sampled trimmed request re-sent untrimmed, outputs compared.
        self.audit_sample_rate = Gauge(
            f"{PREFIX}_audit_sample_rate", "Configured audit_sample_rate (fraction of trimmed requests audited)",
            registry=r, multiprocess_mode="max")
        self.audits = Counter(f"{PREFIX}_audits",
                              "Equivalence audits run: the untrimmed copy was sent upstream", m, registry=r)
        self.audit_matches = Counter(f"{PREFIX}_audit_matches",
                                     "Audits whose trimmed and untrimmed outputs are bit-identical", m, registry=r)
        self.audit_near_matches = Counter(
            f"{PREFIX}_audit_near_matches", "Audits whose float outputs differ only within audit_tolerance (batching / "
                                            "float order noise)", m, registry=r)
        self.audit_mismatches = Counter(f"{PREFIX}_audit_mismatches", "Audits whose outputs differ: the allowlist "
                                                                      "dropped a feature the model reads", m,
                                                                      registry=r)
        self.audit_errors = Counter(
            f"{PREFIX}_audit_errors",
            "Audits that could not compare (untrimmed copy failed, timed out, or an undecodable answer)", m, registry=r)
        self.audits_dropped = Counter(f"{PREFIX}_audits_dropped", "Sampled audits not run because audit_max_concurrent "
                                                                  "were in flight", m, registry=r)
        self.audit_sent_bytes = Counter(f"{PREFIX}_audit_sent_bytes", "Body bytes of untrimmed audit copies sent "
                                                                      "upstream (not in upstream_sent_bytes)", m,
                                                                      registry=r)
        self.registry_reloads = Counter(f"{PREFIX}_allowlist_reloads",
                                        "Allowlist registry rebuilds (start, hot reload, metadata refresh)", registry=r)
        # Per allowlist source (bundle, repository, overrides file, OIP metadata), synced from the registry's
        # source states (sync_sources): a reload that fails keeps the last good allowlists, so only these show it.
        self.source_reload_failures = Counter(
            f"{PREFIX}_allowlist_reload_failures", "Failed loads of an allowlist source (last good kept), by source",
            ("source", "kind"), registry=r)
        self.source_last_reload = Gauge(
            f"{PREFIX}_allowlist_last_reload_timestamp_seconds",
            "Unix time of the last successful load of an allowlist source",
            ("source", "kind"), registry=r, multiprocess_mode="max")
        self._failures_seen: dict[tuple[str, str], int] = {}

    def child(self, metric, key: tuple[str, ...]):
        """`metric.labels(*key)`, memoised: labels() validates and locks (about 1.5 us), a dict hit costs ~0.1 us.

        Label values are bounded (unlisted model names collapse to `_unlisted`), so the memo is too.
        """
        try:
            return self._children[metric, key]
        except KeyError:
            child = self._children[metric, key] = metric.labels(*key) if key else metric
            return child

    # -- updates off the request's path
    #
    # A scoring request makes about 20 counter, gauge and histogram updates; each takes a lock and a few checks,
    # about 30 us in all. Made where they happen, they sit between the body's arrival and its bytes going upstream,
    # and between the answer's arrival and its write to the client. `add` and `observe` only note the update; one
    # `flush`, scheduled right after the current event-loop callback, applies them (summed per series: under load a
    # flush carries several requests). So they run while the request waits on the network, and every scrape
    # (`exposition`) flushes first, so what a scrape shows is never behind.

    def add(self, metric, key: tuple[str, ...], amount: float = 1.0) -> None:
        """`child(metric, key).inc(amount)` (a gauge may take a negative amount), applied by the next flush."""
        self._pending.append((metric, key, amount, False))
        if self._flush_on is None or self._flush_on.is_closed():  # (a loop closed before its flush ran)
            self._schedule_flush()

    def observe(self, metric, key: tuple[str, ...], value: float) -> None:
        """`child(metric, key).observe(value)` of a histogram, applied by the next flush."""
        self._pending.append((metric, key, value, True))
        if self._flush_on is None or self._flush_on.is_closed():  # (a loop closed before its flush ran)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous caller): now
            self.flush()
            return
        loop.call_soon(self.flush)
        self._flush_on = loop

    def flush(self) -> None:
        """Apply every noted update."""
        self._flush_on = None
        pending, self._pending = self._pending, []
        sums: dict[tuple[Any, tuple[str, ...]], float] = {}
        for metric, key, amount, histogram in pending:
            if histogram:
                self.child(metric, key).observe(amount)
            else:
                sums[metric, key] = sums.get((metric, key), 0.0) + amount
        for (metric, key), amount in sums.items():
            self.child(metric, key).inc(amount)

    def sync_sources(self, states) -> None:
        """Bring the per-source reload metrics up to date from `Registry.source_states()` (idempotent)."""
        for kind, st in states:
            key = (st.source.name, kind)
            counter = self.child(self.source_reload_failures, key)  # the series exists (at 0) from the first sync
            new = st.failures - self._failures_seen.get(key, 0)
            if new > 0:
                counter.inc(new)
                self._failures_seen[key] = st.failures
            if st.last_reload is not None:
                self.child(self.source_last_reload, key).set(st.last_reload)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics; aggregated over all workers in multiprocess mode."""
        self.flush()
        if multiprocess():
            from prometheus_client import multiprocess as mp

            reg = CollectorRegistry()
            mp.MultiProcessCollector(reg)
            return generate_latest(reg), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (multiprocess mode)."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(pid)


__all__ = ["Metrics", "MULTIPROC_ENV", "multiprocess", "mark_process_dead", "MODEL_LABELS"]
