"""Equivalence audit: prove in production that trimming never changes a model's answer.

For `audit_sample_rate` of the requests the root trimmed (enforce mode, at
least one feature dropped), the untrimmed body is sent again to the same
replica and version path, after the client already has its answer, in a
bounded background task. Both responses' `outputs` are compared bit for bit
(dtype, shape and tensor bytes for native msgpack/JSON answers; datatype,
shape and data for OIP v2). A leaf that batches requests may batch the two
copies differently, which can change float summation order in the last bits;
float outputs within `audit_tolerance` (relative) count as near matches, not
mismatches (`audit_tolerance: 0` makes every bit difference a mismatch). A difference means the allowlist dropped a
feature
the model reads (a wrong override, a stale bundle): it is counted per
model/version, logged with the differing outputs, and kept in a short list
served at GET /admin/audit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass
from typing import AbstractSet, Any

import aiohttp
import msgspec
import numpy as np

from trimmer.codec import AUDIT_HEADER, decode, is_msgpack
from trimmer.errors import DECODE_FAILURES, TrimmerError
from trimmer.tensor import Tensor

from .metrics import Metrics
from .upstream import Partition

log = logging.getLogger("trimmer.root.audit")

RECENT = 50  # mismatches kept for GET /admin/audit (per worker process)


@dataclass(frozen=True, slots=True)
class AuditJob:
    """What one audit needs: where the trimmed request went, its answer, and the untrimmed body."""

    model: str
    version: str | None
    labels: tuple[str, str, str]
    partition: Partition
    replica: str
    path: str
    untrimmed: bytes
    content_type: str
    trimmed_status: int
    trimmed_body: bytes
    trimmed_content_type: str
    allowlist: AbstractSet[str]


@dataclass(frozen=True, slots=True)
class OutputDiff:
    name: str
    reason: str  # missing_trimmed | missing_untrimmed | dtype | shape | values
    detail: str
    max_abs_diff: float | None = None
    differing: int | None = None  # elements that differ
    size: int | None = None
    within_tolerance: bool = False  # float values all within audit_tolerance (batching / float order noise)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}  # type: ignore[attr-defined]


class AuditError(Exception):
    """The audit could not compare (one line)."""


# ----------------------------------------------------------------------------- comparison
def _outputs(body: bytes, content_type: str) -> dict[str, Any]:
    """The response's outputs as {name: value}; OIP `outputs` lists become {name: {datatype, shape, data}}."""
    try:
        doc = decode(body, content_type)
    except TrimmerError as exc:
        raise AuditError(f"undecodable {content_type} answer: {exc}") from None
    if not isinstance(doc, dict) or "outputs" not in doc:
        raise AuditError("answer has no `outputs`")
    outs = doc["outputs"]
    if isinstance(outs, dict):
        return outs
    if isinstance(outs, list) and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs):
        return {
            o["name"]: {"datatype": o.get("datatype"), "shape": o.get("shape"), "data": o.get("data")} for o in outs}
    raise AuditError("answer `outputs` is neither a map nor an OIP list")


def _numeric_diff(a: Any, b: Any, tolerance: float) -> tuple[float | None, int | None, int | None, bool]:
    """(max |a-b|, differing elements, size, all within tolerance) for equal-shaped numeric arrays, else Nones/False.

    Within tolerance: float values only, |a-b| <= tolerance * max(1, |b|) everywhere and NaNs in the same places.
    """
    try:
        x = np.asarray(a.to_numpy() if isinstance(a, Tensor) else a)
        y = np.asarray(b.to_numpy() if isinstance(b, Tensor) else b)
        if x.shape != y.shape or x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
            return None, None, None, False
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        nan_x, nan_y = np.isnan(x64), np.isnan(y64)
        neq = ~((x64 == y64) | (nan_x & nan_y))
        absdiff = np.abs(x64 - y64)
        diff = absdiff[neq]
        mx = float(np.nanmax(diff)) if diff.size and not np.all(np.isnan(diff)) else None
        within = (tolerance > 0 and x.dtype.kind == "f" and y.dtype.kind == "f" and bool(np.array_equal(nan_x, nan_y))
                  and bool(np.all(absdiff[~nan_x] <= tolerance * np.maximum(1.0, np.abs(y64[~nan_x])))))
        return mx, int(neq.sum()), int(x.size), within
    except (ValueError, TypeError):
        return None, None, None, False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and bytes(a.data) == bytes(b.data)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    # Plain values (OIP data lists, scalars): compare their canonical encoding, so 1 vs 1.0 and NaN are exact.
    return msgspec.msgpack.encode(a) == msgspec.msgpack.encode(b)


def compare_outputs(trimmed: dict[str, Any], untrimmed: dict[str, Any], tolerance: float = 0.0) -> list[OutputDiff]:
    """Every output that is not bit-identical between the two answers (empty list = bit-identical).

    A float output whose values all differ by at most `tolerance` (relative, absolute below 1) is still
    listed, with `within_tolerance` set; names, dtypes, shapes and integer values must match exactly.
    """
    diffs: list[OutputDiff] = []
    for name in list(dict.fromkeys([*untrimmed, *trimmed])):
        if name not in trimmed:
            diffs.append(OutputDiff(name, "missing_trimmed", "output absent from the trimmed request's answer"))
            continue
        if name not in untrimmed:
            diffs.append(OutputDiff(name, "missing_untrimmed", "output absent from the untrimmed request's answer"))
            continue
        a, b = trimmed[name], untrimmed[name]
        if _same(a, b):
            continue
        va: Any
        vb: Any
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if a.dtype != b.dtype:
                diffs.append(OutputDiff(name, "dtype", f"{a.dtype} (trimmed) vs {b.dtype} (untrimmed)"))
                continue
            if tuple(a.shape) != tuple(b.shape):
                diffs.append(OutputDiff(name, "shape", f"{list(a.shape)} (trimmed) vs {list(b.shape)} (untrimmed)"))
                continue
            va, vb = a, b
        elif isinstance(a, dict) and isinstance(b, dict) and "data" in a:  # OIP output
            if a.get("datatype") != b.get("datatype"):
                diffs.append(
                    OutputDiff(name, "dtype", f"{a.get('datatype')} (trimmed) vs {b.get('datatype')} (untrimmed)"))
                continue
            if a.get("shape") != b.get("shape"):
                diffs.append(OutputDiff(name, "shape", f"{a.get('shape')} (trimmed) vs {b.get('shape')} (untrimmed)"))
                continue
            va, vb = a.get("data"), b.get("data")
        else:
            va, vb = a, b
        mx, n, size, within = _numeric_diff(va, vb, tolerance)
        detail = "values differ" if n is None else f"{n} of {size} values differ" + (
            "" if mx is None else f", max abs diff {mx:.6g}")
        diffs.append(OutputDiff(name, "values", detail, mx, n, size, within))
    return diffs


_UNREADABLE: tuple[type[Exception], ...] = (*DECODE_FAILURES, TypeError, AttributeError)


def dropped_features(untrimmed: bytes, content_type: str, allowlist: AbstractSet[str], limit: int = 32) -> list[str]:
    """Names of the features the allowlist removed (for the mismatch log; decoded only on a mismatch)."""
    try:
        fmt = msgspec.msgpack if is_msgpack(content_type) else msgspec.json
        doc = fmt.decode(untrimmed, type=dict[str, msgspec.Raw])
        raw = doc.get("features")
        if raw is not None:
            names = list(fmt.decode(raw, type=dict[str, msgspec.Raw]))
        else:  # OIP: inputs list
            names = [i.get("name") for i in msgspec.json.decode(doc.get("inputs", b"[]")) if isinstance(i, dict)]
    except _UNREADABLE:
        return []
    out = sorted(n for n in names if isinstance(n, str) and n not in allowlist)
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


# ----------------------------------------------------------------------------- the auditor
class Auditor:
    """Samples trimmed requests and runs their audits as bounded background tasks (never on the client's path)."""

    def __init__(self, rate: float, max_concurrent: int, metrics: Metrics, timeout_s: float,
                 deadline_header: str | None = None, tolerance: float = 0.0, seed: int | None = None) -> None:
        self.rate = rate
        self.tolerance = tolerance
        self.max_concurrent = max_concurrent
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.deadline_header = deadline_header
        self._random = random.Random(seed).random
        self._tasks: set[asyncio.Task] = set()
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self.counts = {"sampled": 0, "run": 0, "matches": 0, "near_matches": 0, "mismatches": 0,
                       "errors": 0, "dropped": 0}
        metrics.audit_sample_rate.set(rate)

    @property
    def enabled(self) -> bool:
        return self.rate > 0.0

    def sample(self) -> bool:
        return self.rate > 0.0 and (self.rate >= 1.0 or self._random() < self.rate)

    def submit(self, job: AuditJob) -> bool:
        """Start the audit in the background; drop (and count) it when max_concurrent are in flight."""
        self.counts["sampled"] += 1
        if len(self._tasks) >= self.max_concurrent:
            self.counts["dropped"] += 1
            self.metrics.audits_dropped.labels(*job.labels).inc()
            return False
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"audit:{job.model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, job: AuditJob) -> None:
        m = self.metrics
        m.audits.labels(*job.labels).inc()  # every audit started ends as exactly one match, mismatch or error
        self.counts["run"] += 1
        try:
            status, body, ctype = await self._send(job)
            if status != job.trimmed_status:
                raise AuditError(f"untrimmed copy answered {status}, trimmed request {job.trimmed_status}")
            diffs = compare_outputs(_outputs(job.trimmed_body, job.trimmed_content_type),
                                    _outputs(body, ctype), self.tolerance)
        except asyncio.CancelledError:
            raise
        except AuditError as exc:
            self._error(job, str(exc))
            return
        except Exception as exc:  # a bug in the audit must never reach the serving path
            log.exception("audit of %s version %s failed", job.model, job.version)
            self._error(job, f"{type(exc).__name__}: {exc}")
            return
        if not diffs:
            self.counts["matches"] += 1
            m.audit_matches.labels(*job.labels).inc()
            return
        if all(d.within_tolerance for d in diffs):
            # Float noise only (a leaf batching the two copies differently changes summation order): not a lost feature.
            self.counts["near_matches"] += 1
            m.audit_near_matches.labels(*job.labels).inc()
            log.debug("audit near match %s version %s: %s", job.model, job.version,
                      "; ".join(f"{d.name}: {d.detail}" for d in diffs))
            return
        self.counts["mismatches"] += 1
        m.audit_mismatches.labels(*job.labels).inc()
        record: dict[str, Any] = {
            "time_unix": round(time.time(), 3), "model": job.model, "version": job.version,
            "partition": job.partition.name,
            "replica": job.replica, "path": job.path, "outputs": [d.to_json() for d in diffs],
            "dropped_features": dropped_features(job.untrimmed, job.content_type, job.allowlist),
        }
        self.recent.append(record)
        log.warning("audit MISMATCH %s version %s at %s: outputs %s differ (%s); the allowlist dropped %s",
                    job.model, job.version, job.replica, ", ".join(d.name for d in diffs),
                    "; ".join(f"{d.name}: {d.detail}" for d in diffs),
                    ", ".join(record["dropped_features"]) or "(none)")

    def _error(self, job: AuditJob, message: str) -> None:
        self.counts["errors"] += 1
        self.metrics.audit_errors.labels(*job.labels).inc()
        log.info("audit of %s version %s could not compare: %s", job.model, job.version, message)

    async def _send(self, job: AuditJob) -> tuple[int, bytes, str]:
        """The untrimmed body to the replica that served the trimmed request (uncompressed; no failover)."""
        session = job.partition.session
        if session is None:
            raise AuditError("partition closed")
        headers = {"Content-Type": job.content_type, "Accept": job.content_type, AUDIT_HEADER: "1"}
        if self.deadline_header:
            headers[self.deadline_header] = str(max(1, int(self.timeout_s * 1000)))
        self.metrics.audit_sent_bytes.labels(*job.labels).inc(len(job.untrimmed))
        try:
            async with session.post(job.replica + job.path, data=job.untrimmed, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                return resp.status, await resp.read(), resp.headers.get("Content-Type", "application/octet-stream")
        except asyncio.TimeoutError:
            raise AuditError(f"untrimmed copy timed out after {self.timeout_s:.3g}s at {job.replica}") from None
        except aiohttp.ClientError as exc:
            raise AuditError(
                f"untrimmed copy to {job.replica} failed: {type(exc).__name__}: {str(exc)[:200]}") from None

    def status(self) -> dict[str, Any]:
        """JSON for GET /admin/audit (this worker process's view; Prometheus has the totals over workers)."""
        return {"sample_rate": self.rate, "max_concurrent": self.max_concurrent, "tolerance": self.tolerance,
                "in_flight": len(self._tasks),
                "counts": dict(self.counts), "recent_mismatches": list(reversed(self.recent))}


__all__ = ["Auditor", "AuditJob", "OutputDiff", "compare_outputs", "dropped_features", "AUDIT_HEADER"]
