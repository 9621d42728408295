"""Dynamic batching per model version, inference off the event loop.

Calling convention (batched, docs/leaf.md): every input gets a leading row axis. Per-candidate inputs
(spec shape with -1) are concatenated along their candidate axis; per-request inputs (no -1, e.g. user
features) are repeated once per row of their request (an `expand` view, materialised by the concat).
Models without a candidate dimension have one row per request. Every output's leading axis is split back
by rows; for models without a candidate dimension the row axis is dropped again. Any mix of requests can
therefore share a batch, and each request gets exactly what it would get alone.

Signatures that lack dtype/shape for some input cannot use that convention: such versions run one
request per call with the inputs exactly as converted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .convert import Converted, Converter

log = logging.getLogger("leaf.batcher")


class ModelError(RuntimeError):
    """The model raised or returned something unusable (HTTP 500)."""


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
    """Assembles a batch, runs the module under inference_mode and splits the outputs (in a worker thread)."""

    def __init__(self, module: Callable[..., Any], converter: Converter, output_names: tuple[str, ...], device: torch.device) -> None:
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
        inputs = []
        for i, plan in enumerate(self.converter.plans):
            parts = [c.tensors[i] for c in convs]
            if plan.cand_axis is not None:
                t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=plan.cand_axis)
            else:
                views = [p.unsqueeze(0).expand(c.rows, *p.shape) for p, c in zip(parts, convs)]
                t = views[0] if len(views) == 1 else torch.cat(views, dim=0)
            inputs.append(self._to_device(t))
        return inputs

    def _outputs(self, raw: Any) -> list[torch.Tensor]:
        outs = list(raw) if isinstance(raw, (tuple, list)) else [raw]
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise ModelError(f"model returned {type(raw).__name__}, not a tensor or tuple of tensors")
        if self.output_names and len(outs) != len(self.output_names):
            raise ModelError(f"model returned {len(outs)} outputs, signature names {len(self.output_names)}")
        return [o.detach().to("cpu") if o.device.type != "cpu" else o.detach() for o in outs]

    def run(self, convs: list[Converted], stats: BatchStats) -> list[list[torch.Tensor]]:
        """Outputs per request, in order. assemble_s is this thread's CPU time (GIL waits excluded)."""
        c0 = time.thread_time()
        t0 = time.perf_counter()
        with torch.inference_mode():
            if not self.converter.batchable:
                inputs = [self._to_device(t) for t in convs[0].tensors]
                t1 = time.perf_counter()
                outs = self._outputs(self.module(*inputs))
                stats.compute_s = time.perf_counter() - t1
                stats.assemble_s = t1 - t0
                return [outs]
            inputs = self.assemble(convs)
            t1 = time.perf_counter()
            c1 = time.thread_time()
            try:
                raw = self.module(*inputs)
            except Exception as exc:  # noqa: BLE001 - any model failure becomes a 500 for this batch
                raise ModelError(f"model forward failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            outs = self._outputs(raw)
            t2 = time.perf_counter()
            c2 = time.thread_time()
            rows = [c.rows for c in convs]
            total = sum(rows)
            for name, o in zip(self.output_names or [f"output{i}" for i in range(len(outs))], outs):
                if o.dim() == 0 or o.shape[0] != total:
                    raise ModelError(f"output {name!r} has shape {list(o.shape)}; its leading axis must be the {total} batch rows")
            per_req = [list(parts) for parts in zip(*(o.split(rows, dim=0) for o in outs))]
            if not self.converter.has_candidates:
                per_req = [[p[0] for p in parts] for parts in per_req]
            stats.compute_s = t2 - t1
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
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self._carry: Job | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.key[0]}-{self.key[1]}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ModelError("model version was unloaded"))

    async def submit(self, conv: Converted) -> list[torch.Tensor]:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(Job(conv, fut))
        return await fut

    async def _collect(self) -> list[Job]:
        first = self._carry or await self.queue.get()
        self._carry = None
        batch, rows = [first], first.conv.rows
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
            if rows + job.conv.rows > self.max_rows:
                self._carry = job
                break
            batch.append(job)
            rows += job.conv.rows
        return [j for j in batch if not j.future.done()]  # drop requests whose client went away

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        labels = self.key
        while True:
            batch = await self._collect()
            if not batch:
                continue
            start = time.perf_counter()
            for job in batch:
                self.metrics.queue_seconds.labels(*labels).observe(start - job.enqueued)
            results = await self._execute(loop, batch)
            for job, res in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(res, BaseException):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(res)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> list[Any]:
        stats = BatchStats()
        try:
            outs = await loop.run_in_executor(self.executor, self.runner.run, [j.conv for j in batch], stats)
            self._observe(len(batch), sum(j.conv.rows for j in batch), stats)
            return outs
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
        m, labels = self.metrics, self.key
        m.batch_size.labels(*labels).observe(n)
        m.batch_rows.labels(*labels).observe(rows)
        m.compute_seconds.labels(*labels).observe(stats.compute_s)
        m.assemble_seconds.labels(*labels).observe(stats.assemble_s)
