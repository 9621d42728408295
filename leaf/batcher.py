"""Dynamic batching per model version, inference off the event loop.

Calling convention (batched, docs/leaf.md): every input gets a leading row axis. Per-candidate inputs
(spec shape with -1) are concatenated along their candidate axis; per-request inputs (no -1, e.g. user
features) are repeated once per row of their request (an `expand` view for a single request, one
repeat_interleave for a batch); raw request buffers are joined once per input per batch.
Models without a candidate dimension have one row per request. Every output's leading axis is split back
by rows; for models without a candidate dimension the row axis is dropped again. Any mix of requests can
therefore share a batch, and each request gets exactly what it would get alone.

Signatures that lack dtype/shape for some input cannot use that convention: such versions run one
request per call with the inputs exactly as converted.

Versions with max_batch_size 1 (configured so, or a signature without dtype/shape specs) have no batch to
form: a request skips the queue and the collector task, and its forward runs right on the event loop thread
while the model is cheap (INLINE_MAX_S), since handing a sub-millisecond forward to the model thread and back
costs more than the forward itself; slower models still run in the model thread.

Every job taken in is answered: closing a batcher (version replaced, removed, leaf stopping) stops taking
new jobs, runs the ones already queued or in a batch, and fails whatever is left after a bounded drain
with `Unavailable` (a retryable 503). A job never waits on a future nobody will resolve, so a reload
under load cannot leave a request hanging and a stopping leaf cannot wait on one forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trimmer.tensor import Tensor

from .convert import WIRE_DTYPES, Converted, Converter, as_tensor
from .failures import DtypeMismatch, ModelError, explain_forward_failure
from .wire import make_tensor

log = logging.getLogger("leaf.batcher")
__all__ = ["Batcher", "Runner", "ModelError", "DtypeMismatch", "Unavailable", "INLINE_MAX_S"]
# Un-batched versions (max_batch_size 1) run a request's forward on the event loop thread, skipping the hand-off
# to the model thread, when the model's recent cost per row (moving average) times the request's rows is below
# this; slower models or bigger requests, and any request while another is in the model thread, go to the model
# thread (CPU devices only).
INLINE_MAX_S = 0.002


class Unavailable(RuntimeError):
    """This version stopped serving before the job ran (replaced, unloaded, leaf stopping): retryable 503."""


_STOP: Any = object()  # queued by close(): everything queued before it still runs


@dataclass
class Job:
    conv: Converted
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    assemble_s: float = 0.0
    compute_s: float = 0.0


class Runner:
    """Assembles a batch and splits its outputs (event loop thread); runs the module under inference_mode
    (model thread)."""

    def __init__(self, module: Callable[..., Any], converter: Converter,
                 output_names: tuple[str, ...], device: torch.device) -> None:
        self.module = module
        self.converter = converter
        self.output_names = output_names
        self.device = device
        self.cuda = device.type == "cuda"

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t
        return t.contiguous().pin_memory().to(self.device, non_blocking=True)

    def assemble(self, convs: list[Converted]) -> list[torch.Tensor]:
        """One tensor per input for the whole batch: raw parts are joined once and wrapped once (one copy,
        no per-request torch ops); per-request inputs get one row per candidate (an expand view for a
        single request, one strided copy (or repeat_interleave when candidate counts differ) for a batch)."""
        n = len(convs)
        cand = self.converter.has_candidates
        rows = [c.rows for c in convs]
        total = sum(rows)
        repeats: torch.Tensor | None = None
        uniform = rows.count(rows[0]) == n  # expand + reshape is ~2x cheaper than repeat_interleave
        all_raw = all(c.all_raw for c in convs)
        inputs = []
        for i, plan in enumerate(self.converter.plans):
            dtype = plan.torch_dtype
            assert dtype is not None
            if n == 1:
                c = convs[0]
                t = as_tensor(c.parts[i], dtype, c.shapes[i])  # type: ignore[index]
                if plan.cand_axis is None:
                    t = t.unsqueeze(0).expand(c.rows, *t.shape) if cand else t.unsqueeze(0)
                inputs.append(self._to_device(t))
                continue
            parts = [c.parts[i] for c in convs]
            if plan.cand_axis in (None, 0) and (all_raw or not any(isinstance(p, torch.Tensor) for p in parts)):
                buf = b"".join(parts)
                if plan.cand_axis == 0:
                    t = as_tensor(buf, dtype, (total, *plan.rest))
                else:
                    t = as_tensor(buf, dtype, (n, *plan.rest))
                    if cand:
                        if uniform:  # every request has the same candidate count: one strided copy
                            t = t.unsqueeze(1).expand(n, rows[0], *plan.rest).reshape(total, *plan.rest)
                        else:
                            if repeats is None:
                                repeats = torch.tensor(rows)
                            t = t.repeat_interleave(repeats, dim=0, output_size=total)
            else:  # values sent as lists, or a candidate axis that is not the first: per-request tensors
                ts = [as_tensor(p, dtype, c.shapes[i]) for p, c in zip(parts, convs)]  # type: ignore[index]
                if plan.cand_axis is not None:
                    t = torch.cat(ts, dim=plan.cand_axis)
                elif cand:
                    t = torch.cat([x.unsqueeze(0).expand(r, *x.shape) for x, r in zip(ts, rows)], dim=0)
                else:
                    t = torch.stack(ts, dim=0)
            inputs.append(self._to_device(t))
        return inputs

    def _outputs(self, raw: Any) -> list[torch.Tensor]:
        outs = list(raw) if isinstance(raw, (tuple, list)) else [raw]
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise ModelError(f"model returned {type(raw).__name__}, not a tensor or tuple of tensors")
        if self.output_names and len(outs) != len(self.output_names):
            raise ModelError(f"model returned {len(outs)} outputs, signature names {len(self.output_names)}")
        return [o.detach().to("cpu") if o.device.type != "cpu" else o.detach() for o in outs]

    def split(self, outs: list[torch.Tensor], rows: list[int]) -> list[list[Tensor]]:
        """Batch outputs -> per-request wire tensors: one contiguous CPU buffer per output, sliced by rows
        (memoryview slices, no per-request torch ops); models without a candidate dim lose the row axis."""
        total = sum(rows)
        names = self.output_names or tuple(f"output{i}" for i in range(len(outs)))
        cand = self.converter.has_candidates
        per_req: list[list[Tensor]] = [[] for _ in rows]
        for name, o in zip(names, outs):
            if o.dim() == 0 or o.shape[0] != total:
                raise ModelError(
                    f"output {name!r} has shape {list(o.shape)}; its leading axis must be the {total} batch rows")
            wire = WIRE_DTYPES.get(o.dtype)
            if wire is None:
                o, wire = o.to(torch.float32), "float32"
            o = o.contiguous()
            rest = tuple(int(d) for d in o.shape[1:])
            row_bytes = o.element_size() * math.prod(rest)
            # numpy declares its buffer protocol (__buffer__) to type checkers only for Python 3.12+
            mv = memoryview(o.reshape(-1).view(torch.uint8).numpy()) if o.numel() else memoryview(b"")  # type: ignore[arg-type]
            start = 0
            for req, r in zip(per_req, rows):
                end = start + r * row_bytes
                req.append(make_tensor(wire, (r, *rest) if cand else rest, mv[start:end]))
                start = end
        return per_req

    def forward(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """The model call (model thread): device copies, forward under inference_mode, outputs on the CPU.
        Nothing else runs here, so the model thread and the event loop hand the GIL to each other about
        twice per batch rather than once per tensor op (thread hand-offs are what cost most on few cores)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            inputs = [self._to_device(t) for t in inputs] if self.cuda else inputs
            try:
                raw = self.module(*inputs)
            except Exception as exc:  # noqa: BLE001 - any model failure becomes a 500 for this batch (400: dtype)
                sig = self.converter.signature
                raise explain_forward_failure(exc, sig.input_names, [p.spec.dtype for p in self.converter.plans],
                                              [getattr(t, "dtype", None) for t in inputs]) from None
            outs = self._outputs(raw)
        return outs, time.perf_counter() - t0

    def prepare(self, convs: list[Converted]) -> list[torch.Tensor]:
        """Batch inputs (event loop thread): assembled for the batched convention, or one request as is."""
        with torch.inference_mode():
            return self.assemble(convs) if self.converter.batchable else convs[0].tensors

    def finish(self, outs: list[torch.Tensor], convs: list[Converted]) -> list[list[Any]]:
        """Per-request outputs (event loop thread): wire tensors (batched) or the torch tensors (one request)."""
        return self.split(outs, [c.rows for c in convs]) if self.converter.batchable else [outs]

    def run(self, convs: list[Converted], stats: BatchStats) -> list[list[Any]]:
        """prepare + forward + finish in the calling thread (warm-up runs). assemble_s is CPU time."""
        c0 = time.thread_time()
        inputs = self.prepare(convs)
        c1 = time.thread_time()
        outs, stats.compute_s = self.forward(inputs)
        c2 = time.thread_time()
        per_req = self.finish(outs, convs)
        stats.assemble_s = (c1 - c0) + (time.thread_time() - c2)
        return per_req


class Batcher:
    """Collects jobs for one model version into batches of at most max_batch_size requests / max_batch_rows rows."""

    def __init__(self, key: tuple[str, str], runner: Runner, executor: concurrent.futures.Executor, metrics: Any,
                 max_batch_size: int, max_queue_delay_ms: float, max_batch_rows: int) -> None:
        self.key = key
        self.runner = runner
        self.executor = executor
        self.metrics = metrics
        self.max_batch_size = max(1, max_batch_size if runner.converter.batchable else 1)
        self.delay = max(0.0, max_queue_delay_ms) / 1000.0
        self.max_rows = max(1, max_batch_rows)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()  # Job, or _STOP once closing
        self._carry: Any = None  # a Job that did not fit the last batch, or _STOP
        self._inflight: list[Job] = []  # the batch being collected or run: failed if the loop is cancelled
        self._task: asyncio.Task | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._inline_ok = runner.device.type == "cpu"  # a GPU forward waits on the device: never on the event loop
        self._in_thread = 0  # direct requests in the model thread now (none: the next cheap one may run inline)
        self._row_cost: float | None = None  # moving average of direct forwards' seconds per row
        # metric children bound once: labels() costs a lock and a dict lookup per call
        self._queue_s = metrics.queue_seconds.labels(*key)
        self._batch_size = metrics.batch_size.labels(*key)
        self._batch_rows = metrics.batch_rows.labels(*key)
        self._compute_s = metrics.compute_seconds.labels(*key)
        self._assemble_s = metrics.assemble_seconds.labels(*key)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.key[0]}-{self.key[1]}")

    @property
    def closing(self) -> bool:
        return self._closing

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs; run those already queued or in a batch; after `timeout` seconds (None: no bound)
        fail what is left with Unavailable. Every job taken in is answered. Safe to call more than once."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.queue.put_nowait(_STOP)
        task = self._task
        try:
            if task is not None and not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), timeout)
                except asyncio.TimeoutError:
                    log.warning(
                        "%s/%s: drain not done after %.1fs; failing the jobs left with 503", *self.key, timeout or 0)
                except Exception:  # noqa: BLE001 - _loop never raises; if it did, the jobs are failed below
                    log.exception("%s/%s: batcher stopped with an error", *self.key)
        finally:  # also when close() itself is cancelled: nothing may be left waiting
            if task is not None and not task.done():
                task.cancel()
                try:
                    await asyncio.wait_for(asyncio.shield(task), 5.0)  # cancellation is prompt; bound it anyway
                except (asyncio.CancelledError, asyncio.TimeoutError, Exception):  # noqa: BLE001
                    pass
            self._fail_pending(Unavailable(f"model {self.key[0]!r} version {self.key[1]!r} stopped serving "
                                           "(replaced, unloaded or leaf stopping); retry"))
            self._closed.set()

    def _fail_pending(self, exc: Exception) -> None:
        jobs = list(self._inflight)
        if isinstance(self._carry, Job):
            jobs.append(self._carry)
        self._inflight, self._carry = [], None
        while not self.queue.empty():
            jobs.append(self.queue.get_nowait())
        for job in jobs:
            if isinstance(job, Job) and not job.future.done():
                job.future.set_exception(exc)

    async def submit(self, conv: Converted) -> list[torch.Tensor]:
        if self._closing or self._task is None or self._task.done():
            raise Unavailable(
                f"model {self.key[0]!r} version {self.key[1]!r} is not taking requests (replaced or unloaded); retry")
        if self.max_batch_size == 1:
            return await self._direct(conv)
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(Job(conv, fut))
        return await fut

    def _prepare(self, convs: list[Converted]) -> Any:
        try:
            return self.runner.prepare(convs)
        except Exception as exc:  # noqa: BLE001 - inputs the model cannot take become a 500
            raise ModelError(f"cannot assemble the batch: {exc}") from None

    async def _direct(self, conv: Converted) -> list[Any]:
        """One request, no batch to form (max_batch_size 1): no queue, no collector task; the forward runs inline
        when the model is cheap (INLINE_MAX_S), else in the model thread. Same metrics, same errors as a batch."""
        self._queue_s.observe(0.0)
        convs = [conv]
        stats = BatchStats()
        try:
            c0 = time.thread_time()
            inputs = self._prepare(convs)
            c1 = time.thread_time()
            # a big request is not cheap
            cheap = self._row_cost is not None and self._row_cost * conv.rows < INLINE_MAX_S
            if cheap and self._inline_ok and self._in_thread == 0:
                outs, stats.compute_s = self.runner.forward(inputs)
            else:
                self._in_thread += 1
                try:
                    outs, stats.compute_s = await asyncio.get_running_loop().run_in_executor(
                        self.executor, self.runner.forward, inputs)
                finally:
                    self._in_thread -= 1
            cost, per_row = self._row_cost, stats.compute_s / max(1, conv.rows)
            self._row_cost = per_row if cost is None else 0.8 * cost + 0.2 * per_row
            c2 = time.thread_time()
            per_req = self.runner.finish(outs, convs)
            stats.assemble_s = (c1 - c0) + (time.thread_time() - c2)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"model failed: {exc}") from None
        self._observe(1, conv.rows, stats)
        return per_req[0]

    async def _collect(self) -> list[Job] | None:
        """The next batch (None once _STOP is reached). Jobs are in self._inflight from the moment they leave
        the queue, so a cancelled collect cannot lose them."""
        first = self._carry if self._carry is not None else await self.queue.get()
        self._carry = None
        if first is _STOP:
            return None
        batch, rows = [first], first.conv.rows
        self._inflight = batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.delay
        while len(batch) < self.max_batch_size:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                job = self.queue.get_nowait()
            if job is _STOP or rows + job.conv.rows > self.max_rows:
                self._carry = job
                break
            batch.append(job)
            rows += job.conv.rows
        return [j for j in batch if not j.future.done()]  # drop requests whose client went away

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if batch is None:
                return
            if not batch:
                self._inflight = []
                continue
            try:
                start = time.perf_counter()
                observe = self._queue_s.observe
                for job in batch:
                    observe(start - job.enqueued)
                results = await self._execute(loop, batch)
            except Exception as exc:  # noqa: BLE001 - never leave a job unanswered
                log.exception("%s/%s: batch failed unexpectedly", *self.key)
                results = [ModelError(f"batch failed: {type(exc).__name__}")] * len(batch)
            for job, res in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(res, BaseException):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(res)
            self._inflight = []

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> list[Any]:
        """Assemble here (loop thread), forward in the model thread, split here."""
        stats = BatchStats()
        convs = [j.conv for j in batch]
        try:
            c0 = time.thread_time()
            inputs = self._prepare(convs)
            c1 = time.thread_time()
            outs, stats.compute_s = await loop.run_in_executor(self.executor, self.runner.forward, inputs)
            c2 = time.thread_time()
            per_req = self.runner.finish(outs, convs)
            stats.assemble_s = (c1 - c0) + (time.thread_time() - c2)
            self._observe(len(batch), sum(c.rows for c in convs), stats)
            return per_req
        except Exception as exc:  # noqa: BLE001
            if len(batch) == 1:
                return [exc if isinstance(exc, ModelError) else ModelError(f"model failed: {exc}")]
        # a failing batch is retried one request at a time so one bad request fails alone
        log.warning("batch of %d failed on %s/%s; retrying one by one", len(batch), *self.key)
        results: list[Any] = []
        for job in batch:
            results.extend(await self._execute(loop, [job]))
        return results

    def _observe(self, n: int, rows: int, stats: BatchStats) -> None:
        self._batch_size.observe(n)
        self._batch_rows.observe(rows)
        self._compute_s.observe(stats.compute_s)
        self._assemble_s.observe(stats.assemble_s)
