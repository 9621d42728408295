"""Root metrics noted on the request path and applied in one batch (root/metrics.py Metrics.add/observe/flush).

The values a scrape shows are the point: after the loop turns, or at once through a scrape, never lost when a loop
closes before its flush ran. Expected values are the sums written out here.
"""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from root.metrics import Metrics

LABELS = ("m", "1", "p")


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels or None)


def scraped(m: Metrics, name: str) -> float:
    text = m.exposition()[0].decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def test_updates_land_after_the_callback_summed_and_a_scrape_never_lags():
    m = Metrics()
    labels = dict(zip(("model", "version", "partition"), LABELS))
    m.add(m.requests, LABELS)
    m.add(m.sent_bytes, LABELS, 1000)
    m.add(m.sent_bytes, LABELS, 234)
    m.observe(m.trim_seconds, LABELS, 0.002)
    m.add(m.inflight, ("p", "http://r"), 1)
    m.add(m.inflight, ("p", "http://r"), -1)
    assert value(m, "trimmer_root_requests_total", **labels) in (None, 0.0)  # not yet: still on the request's path
    await asyncio.sleep(0)  # the loop turns: the batch is applied
    assert value(m, "trimmer_root_requests_total", **labels) == 1.0
    assert value(m, "trimmer_root_upstream_sent_bytes_total", **labels) == 1234.0
    assert value(m, "trimmer_root_trim_seconds_count", **labels) == 1.0
    assert value(m, "trimmer_root_trim_seconds_sum", **labels) == 0.002
    assert value(m, "trimmer_root_upstream_inflight", partition="p", replica="http://r") == 0.0
    m.add(m.requests, LABELS, 2)
    assert scraped(m, "trimmer_root_requests_total") == 3.0  # a scrape applies what is pending first


def test_without_a_loop_updates_apply_at_once_and_a_closed_loop_loses_nothing():
    m = Metrics()
    labels = dict(zip(("model", "version", "partition"), LABELS))
    m.add(m.requests, LABELS)
    assert value(m, "trimmer_root_requests_total", **labels) == 1.0

    async def note_and_stop() -> None:
        m.add(m.requests, LABELS, 5)  # a flush is scheduled on this loop...
        asyncio.get_running_loop().stop()  # ...which stops before its next turn, and closes
        await asyncio.Event().wait()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(note_and_stop())
    except RuntimeError:  # "Event loop stopped before Future completed."
        pass
    loop.close()
    assert value(m, "trimmer_root_requests_total", **labels) == 1.0  # the 5 are pending, not lost

    async def note() -> None:
        m.add(m.requests, LABELS, 5)
        await asyncio.sleep(0)

    asyncio.run(note())  # a new loop: the next update schedules a flush again, which applies both
    assert value(m, "trimmer_root_requests_total", **labels) == 11.0
