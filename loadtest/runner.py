"""Load generation: open-loop constant arrival rate and closed-loop concurrency.

Open loop: request i is *intended* to go out at t0 + i / rate whether or not
earlier ones have finished, and its latency is measured from that intended
time, so a stalled server shows up as latency instead of silently lowering the
offered load (coordinated omission). Closed loop: `concurrency` workers send
back to back; latency is from the actual send. Requests whose intended send
time falls in the warm-up are sent but not recorded. Latencies go into an HDR
histogram (microseconds, 3 significant digits).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import aiohttp
from hdrh.histogram import HdrHistogram

LOWEST_US, HIGHEST_US, SIG_DIGITS = 1, 3_600_000_000, 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class LoadSpec:
    mode: str = "open"  # open | closed
    rate: float = 50.0  # open loop: requests per second
    concurrency: int = 8  # closed loop: workers
    duration_s: float | None = 10.0  # measured time after the warm-up (None: bounded by count only)
    count: int | None = None  # measured requests (None: bounded by duration only)
    warmup_s: float = 2.0
    timeout_s: float = 10.0
    max_inflight: int = 1024  # open loop safety bound; a request that cannot start in time still counts its wait

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"load.mode must be open or closed, not {self.mode!r}")
        if self.duration_s is None and self.count is None:
            raise ValueError("load: set duration_s, count, or both")
        if self.mode == "open" and not self.rate > 0:
            raise ValueError("load.rate must be > 0")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("load.concurrency must be >= 1")


@dataclass(frozen=True)
class Target:
    url: str
    bodies: Sequence[bytes | Replayed]  # cycled; pre-encoded so generation cost stays out of the measurement
    content_type: str = "application/msgpack"


@dataclass(frozen=True)
class Replayed:
    """A captured request (trimmer/capture.py): its own URL and headers, sent as it came."""

    url: str
    body: bytes
    headers: dict[str, str]


@dataclass
class RunResult:
    histogram: HdrHistogram
    sent: int = 0  # every request sent, warm-up included
    completed: int = 0  # every request that got a response, warm-up included
    measured: int = 0  # recorded in the histogram (status 2xx after warm-up)
    errors: Counter = field(default_factory=Counter)  # status code or exception name -> count (measured window)
    measured_s: float = 0.0  # wall time of the measured window
    target_rate: float | None = None
    warmup_s: float = 0.0
    window: tuple[float, float] = (0.0, 0.0)  # monotonic start/end of the measured window

    @property
    def achieved_rate(self) -> float:
        return (self.measured + sum(self.errors.values())) / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def ok_rate(self) -> float:
        return self.measured / self.measured_s if self.measured_s > 0 else 0.0

    def percentiles_ms(self) -> dict[str, float]:
        if self.histogram.get_total_count() == 0:
            return {f"p{p:g}": float("nan") for p in PERCENTILES}
        return {f"p{p:g}": self.histogram.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES}

    def to_json(self) -> dict:
        h = self.histogram
        empty = h.get_total_count() == 0
        return {
            "sent": self.sent, "completed": self.completed, "measured": self.measured,
            "errors": {str(k): v for k, v in sorted(self.errors.items(), key=lambda kv: str(kv[0]))},
            "measured_s": round(self.measured_s, 4), "warmup_s": self.warmup_s,
            "target_rate": self.target_rate, "achieved_rate": round(self.achieved_rate, 3),
            "ok_rate": round(self.ok_rate, 3),
            "latency_ms": {**{k: round(v, 3) for k, v in self.percentiles_ms().items()},
                           "mean": None if empty else round(h.get_mean_value() / 1000.0, 3),
                           "max": None if empty else round(h.get_max_value() / 1000.0, 3)},
        }


Progress = Callable[[float], None]  # fraction done in [0, 1]


class _Recorder:
    def __init__(self, result: RunResult, measure_from: float) -> None:
        self.result = result
        self.measure_from = measure_from

    def record(self, intended: float, done: float, status: int | str) -> None:
        r = self.result
        r.completed += isinstance(status, int)
        if intended < self.measure_from:
            return
        if isinstance(status, int) and 200 <= status < 300:
            r.measured += 1
            r.histogram.record_value(max(LOWEST_US, min(HIGHEST_US, int((done - intended) * 1e6))))
        else:
            r.errors[status] += 1


async def _one(session: aiohttp.ClientSession, target: Target, body: bytes | Replayed, intended: float, rec: _Recorder,
               timeout: aiohttp.ClientTimeout) -> None:
    status: int | str
    if isinstance(body, Replayed):
        url, data, headers = body.url, body.body, body.headers
    else:
        url, data, headers = target.url, body, {"Content-Type": target.content_type}
    try:
        async with session.post(url, data=data, headers=headers, timeout=timeout) as resp:
            await resp.read()
            status = resp.status
    except asyncio.TimeoutError:
        status = "timeout"
    except aiohttp.ClientError as exc:
        status = type(exc).__name__
    rec.record(intended, time.monotonic(), status)


async def run_load(target: Target, spec: LoadSpec, progress: Progress | None = None,
                   on_measure_start: Callable[[], object] | None = None) -> RunResult:
    """Drive `target` per `spec`; `on_measure_start` fires once when the warm-up ends (e.g. to snapshot CPU)."""
    if not target.bodies:
        raise ValueError("no request bodies")
    result = RunResult(HdrHistogram(LOWEST_US, HIGHEST_US, SIG_DIGITS), warmup_s=spec.warmup_s,
                       target_rate=spec.rate if spec.mode == "open" else None)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    limit = spec.max_inflight if spec.mode == "open" else spec.concurrency
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        t0 = time.monotonic()
        measure_from = t0 + spec.warmup_s
        rec = _Recorder(result, measure_from)
        # hard stop: the duration bound, or a generous bound for count-only runs, so every loop ends
        if spec.duration_s is not None:
            measure_until = measure_from + spec.duration_s
        else:
            est = (spec.count or 0) / spec.rate if spec.mode == "open" else (spec.count or 0) * spec.timeout_s
            measure_until = measure_from + max(1.0, est) * 10
        started_measure = False

        def measuring(now: float) -> None:
            nonlocal started_measure
            if not started_measure and now >= measure_from:
                started_measure = True
                result.window = (now, now)
                if on_measure_start is not None:
                    on_measure_start()

        def done_enough(now: float, measured_sent: int) -> bool:
            if now >= measure_until:
                return True
            return spec.count is not None and measured_sent >= spec.count

        def report(now: float, measured_sent: int) -> None:
            if progress is None:
                return
            if spec.duration_s is not None:
                frac = (now - t0) / max(1e-9, measure_until - t0)
            else:
                frac = 0.0
            if spec.count is not None:
                frac = max(frac, measured_sent / spec.count)
            progress(min(1.0, max(0.0, frac)))

        measured_sent = 0
        if spec.mode == "open":
            tasks: set[asyncio.Task] = set()
            i = 0
            interval = 1.0 / spec.rate
            while True:
                intended = t0 + i * interval
                now = time.monotonic()
                if intended > now:
                    await asyncio.sleep(intended - now)
                    now = time.monotonic()
                measuring(intended)
                if done_enough(intended, measured_sent):
                    break
                body = target.bodies[i % len(target.bodies)]
                t = asyncio.ensure_future(_one(session, target, body, intended, rec, timeout))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                result.sent += 1
                measured_sent += intended >= measure_from
                i += 1
                if i % 16 == 0:
                    report(now, measured_sent)
            if tasks:
                await asyncio.wait(tasks, timeout=spec.timeout_s + 5)
            end = time.monotonic()  # after the drain: under overload the window stretches to the last response
        else:
            stop = False
            counter = {"i": 0}

            async def worker() -> None:
                nonlocal stop, measured_sent
                while not stop:
                    now = time.monotonic()
                    measuring(now)
                    if done_enough(now, measured_sent):
                        stop = True
                        return
                    i = counter["i"]
                    counter["i"] += 1
                    result.sent += 1
                    measured_sent += now >= measure_from
                    await _one(session, target, target.bodies[i % len(target.bodies)], now, rec, timeout)
                    if i % 16 == 0:
                        report(time.monotonic(), measured_sent)

            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
            end = time.monotonic()
        if not started_measure:
            result.window = (measure_from, measure_from)
        result.window = (result.window[0], end)
        result.measured_s = max(0.0, end - result.window[0])
        if progress is not None:
            progress(1.0)
    return result
