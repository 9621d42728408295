"""Prometheus metrics of the leaf (own registry, served at GET /metrics).

Per-feature counters (features received but unused, inputs defaulted; labels model, version, feature)
are kept in plain Counters updated from the event loop and exported by a custom collector at scrape
time: a prometheus_client child per feature per request would cost microseconds per feature on the hot
path. Their label cardinality is capped (`feature_series_limit`); overflow is counted under
feature="__other__". The root's drift report reads these two families.

Names follow the root's (root/metrics.py, docs/metrics.md): the unit last (`received_bytes`, `request_seconds`),
counted things plural and first (`features_unused`, `inputs_defaulted`); a per-feature breakdown of an
aggregate has the aggregate's name plus `_by_feature`.
"""

from __future__ import annotations

from collections import Counter as TallyCounter
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

OTHER_FEATURE = "__other__"
_LAT = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class FeatureTallies:
    """(model, version, feature) -> count, exported as a counter family."""

    def __init__(self, name: str, doc: str, limit: int) -> None:
        self.name, self.doc, self.limit = name, doc, limit
        self.counts: dict[tuple[str, str], TallyCounter[str]] = {}
        self.series = 0

    def add(self, model: str, version: str, features: Iterable[str]) -> None:
        tally = self.counts.get((model, version))
        if tally is None:
            tally = self.counts[(model, version)] = TallyCounter()
        before = len(tally)
        tally.update(features)
        self.series += len(tally) - before
        if self.series > self.limit:
            self._fold(tally)

    def _fold(self, tally: TallyCounter[str]) -> None:
        """Move the newest keys of this tally into __other__ until under the limit."""
        while self.series > self.limit and len(tally) > 1:
            key = next(reversed(tally))  # dicts keep insertion order
            if key == OTHER_FEATURE:
                break
            n = tally.pop(key)
            had_other = OTHER_FEATURE in tally
            tally[OTHER_FEATURE] += n
            self.series -= 0 if not had_other else 1

    def collect(self) -> Iterable[CounterMetricFamily]:
        fam = CounterMetricFamily(self.name, self.doc, labels=["model", "version", "feature"])
        for (model, version), tally in list(self.counts.items()):
            for feature, n in list(tally.items()):
                fam.add_metric([model, version, feature], n)
        yield fam


class LeafMetrics:
    def __init__(self, feature_series_limit: int = 20000) -> None:
        r = self.registry = CollectorRegistry()
        mv = ["model", "version"]
        self.requests = Counter("trimmer_leaf_requests", "Inference requests per model version",
                                mv + ["endpoint"], registry=r)
        self.failures = Counter("trimmer_leaf_failures", "Failed requests per model version and reason",
                                mv + ["reason"], registry=r)
        self.not_found = Counter("trimmer_leaf_not_found", "Requests for an unknown model or version", registry=r)
        self.bad_requests = Counter("trimmer_leaf_bad_requests",
                                    "Requests rejected before a model was chosen", ["reason"], registry=r)
        self.request_seconds = Histogram("trimmer_leaf_request_seconds", "Wall time in the leaf per request", mv,
                                         buckets=_LAT, registry=r)
        self.convert_seconds = Histogram("trimmer_leaf_convert_seconds", "Decode + features-to-tensors per request "
                                                                         "(CPU time of the event-loop thread)", mv,
                                                                         buckets=_LAT, registry=r)
        self.assemble_seconds = Histogram("trimmer_leaf_assemble_seconds", "Batch concatenation + output split per "
                                                                           "batch (CPU time of the event-loop thread)",
                                                                           mv, buckets=_LAT, registry=r)
        self.encode_seconds = Histogram("trimmer_leaf_encode_seconds", "Response encoding per request", mv,
                                        buckets=_LAT, registry=r)
        self.queue_seconds = Histogram("trimmer_leaf_queue_seconds", "Time a request waited for its batch to start", mv,
                                       buckets=_LAT, registry=r)
        self.compute_seconds = Histogram("trimmer_leaf_compute_seconds", "Model forward time per batch", mv,
                                         buckets=_LAT, registry=r)
        self.batch_size = Histogram("trimmer_leaf_batch_size", "Requests per executed batch", mv,
                                    buckets=_BATCH, registry=r)
        self.batch_rows = Histogram("trimmer_leaf_batch_rows", "Rows (candidates) per executed batch", mv,
                                    buckets=(1, 16, 64, 256, 1024, 4096, 16384, 65536), registry=r)
        self.received_bytes = Counter("trimmer_leaf_received_bytes",
                                      "Request body bytes as received (before decompression)", mv, registry=r)
        self.features_received = Counter("trimmer_leaf_features_received", "Features received", mv, registry=r)
        self.features_unused = Counter("trimmer_leaf_features_unused",
                                       "Features received that the model does not read", mv, registry=r)
        self.inputs_defaulted = Counter("trimmer_leaf_inputs_defaulted",
                                        "Model inputs filled from their declared default", mv, registry=r)
        self.model_ready = Gauge("trimmer_leaf_model_ready",
                                 "1 when a model version is loaded and serving, 0 when it failed", mv, registry=r)
        self.load_failures = Counter("trimmer_leaf_load_failures", "Model version load failures", mv, registry=r)
        self.loads = Counter("trimmer_leaf_loads", "Model version loads", mv, registry=r)
        self.reload_failed = Gauge("trimmer_leaf_reload_failed",
                                   "1 while a newer archive of a serving version failed to load "
                                   "(the previous archive keeps serving)", mv, registry=r)
        self.allowlist_mismatches = Counter("trimmer_leaf_allowlist_mismatches", "Requests answered 412: their "
                                            "X-Trimmer-Signature differs from the inputs of the version that would run",
                                            mv, registry=r)
        # features_unused / inputs_defaulted again, per feature (capped): summed by (model, version) they equal those
        # two.
        self.features_unused_by_feature = FeatureTallies(
            "trimmer_leaf_features_unused_by_feature",
            "Per-feature count of features received but not read by the model", feature_series_limit)
        self.inputs_defaulted_by_feature = FeatureTallies(
            "trimmer_leaf_inputs_defaulted_by_feature",
            "Per-feature count of inputs filled from their default", feature_series_limit)
        r.register(self.features_unused_by_feature)
        r.register(self.inputs_defaulted_by_feature)

    def render(self) -> bytes:
        return generate_latest(self.registry)
