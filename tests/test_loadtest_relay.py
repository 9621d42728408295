"""The byte-counting relay counts exactly the bytes that cross it, and the runner drives real HTTP load."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from loadtest.relay import Relay, RelayThread
from loadtest.runner import LoadSpec, Target, run_load


async def _echo_server() -> tuple[web.AppRunner, int]:
    async def score(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=str(len(body)).encode(), content_type="text/plain")

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.05)
        return web.Response(body=b"ok")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/models/{name}/score", score)
    app.router.add_post("/slow", slow)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


async def test_relay_counts_exact_bytes_each_way_and_attributes_requests() -> None:
    runner, port = await _echo_server()
    relay = await Relay("127.0.0.1", port).start()
    try:
        bodies = [b"x" * 1000, bytes(range(256)) * 300, b""]
        wire = b""
        for i, b in enumerate(bodies):
            wire += (f"POST /v1/models/m{i}/score?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: {len(b)}\r\n"
                     f"Content-Type: application/msgpack\r\n\r\n").encode() + b
        chunks = [b"hello", b"w" * 70000]
        chunked = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"
        chunk_head = b"POST /v1/models/c/score HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        health = b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        wire += chunk_head + chunked + health
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        for i in range(0, len(wire), 777):  # odd-sized writes split heads and bodies across reads
            writer.write(wire[i:i + 777])
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), 10)  # server closes after the health request
        writer.close()
        deadline = asyncio.get_running_loop().time() + 10  # the relay's last counts land as its sockets close
        s = relay.snapshot()
        while (s.up_bytes, s.down_bytes) != (len(wire), len(received)) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
            s = relay.snapshot()
        assert s.up_bytes == len(wire)
        assert s.down_bytes == len(received)
        assert received.count(b"HTTP/1.1 200") == 5
        assert s.parse_errors == 0
        for i, b in enumerate(bodies):
            p = s.paths[f"/v1/models/m{i}/score"]
            assert p.requests == 1 and p.body_bytes == len(b)
        assert s.paths["/v1/models/c/score"].body_bytes == len(chunked)
        assert s.paths["/v1/models/c/score"].header_bytes == len(chunk_head)
        assert s.paths["/health"].requests == 1 and s.paths["/health"].body_bytes == 0
        assert sum(p.total_bytes for p in s.paths.values()) == len(wire)
        score = s.matching(lambda path: path.endswith("/score"))
        assert score.requests == 4
    finally:
        await relay.close()
        await runner.cleanup()


async def test_relay_counts_match_what_a_client_sends_and_windows_subtract() -> None:
    runner, port = await _echo_server()
    relay = await Relay("127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(relay.url + "/health") as r:
                assert r.status == 200
            before = relay.snapshot()
            for n in (10, 100_000, 3_000_000):
                async with session.post(relay.url + "/v1/models/m/score", data=b"a" * n) as r:
                    assert await r.read() == str(n).encode()
        d = relay.snapshot() - before
        assert d.paths["/v1/models/m/score"].requests == 3
        assert d.paths["/v1/models/m/score"].body_bytes == 3_100_010
        assert "/health" not in d.paths
        assert d.up_bytes == d.paths["/v1/models/m/score"].total_bytes
    finally:
        await relay.close()
        await runner.cleanup()


async def test_relay_thread_forwards_and_stops() -> None:
    runner, port = await _echo_server()
    rt = RelayThread("127.0.0.1", port)
    relay = rt.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(relay.url + "/v1/models/m/score", data=b"z" * 5000) as r:
                assert await r.read() == b"5000"
        s = rt.snapshot()
        assert s.paths["/v1/models/m/score"].body_bytes == 5000
    finally:
        rt.stop()
        await runner.cleanup()


async def test_open_loop_runner_sends_on_schedule_and_excludes_warmup() -> None:
    """Open loop: request i is due at t0 + i/rate whatever the machine's speed, so the counts follow from the
    schedule alone (1.3 s at 200/s: 260 sent, the 60 due in the 0.3 s warm-up not recorded). No rate or
    latency is asserted: those are measurements, and measurements belong to benchmarks."""
    runner, port = await _echo_server()
    try:
        target = Target(f"http://127.0.0.1:{port}/v1/models/m/score", [b"a" * 100, b"b" * 200])
        res = await run_load(target, LoadSpec(mode="open", rate=200, duration_s=1.0, warmup_s=0.3))
        assert res.errors == {}
        assert res.sent == res.completed
        assert abs(res.sent - 260) <= 1 and abs(res.measured - 200) <= 1  # +-1: float rounding at the window edges
        assert res.sent - res.measured == round(0.3 * 200)
        assert res.histogram.get_total_count() == res.measured
    finally:
        await runner.cleanup()


def test_latency_counts_from_the_intended_send_time() -> None:
    """No coordinated omission: a request due at t and answered at t + 0.5 s records 500 ms, however late it was
    actually sent; one due before the measured window counts as completed but is not recorded."""
    from hdrh.histogram import HdrHistogram

    from loadtest.runner import HIGHEST_US, LOWEST_US, SIG_DIGITS, RunResult, _Recorder

    result = RunResult(HdrHistogram(LOWEST_US, HIGHEST_US, SIG_DIGITS))
    rec = _Recorder(result, measure_from=100.0)
    rec.record(intended=99.0, done=99.5, status=200)   # warm-up
    rec.record(intended=100.0, done=100.5, status=200)  # queued behind a slow server: still 500 ms from intended
    rec.record(intended=101.0, done=101.002, status=200)
    rec.record(intended=102.0, done=102.1, status=503)
    rec.record(intended=103.0, done=103.1, status="timeout")
    assert result.completed == 4 and result.measured == 2  # a timeout is not a completed HTTP exchange
    assert dict(result.errors) == {503: 1, "timeout": 1}
    assert result.histogram.get_max_value() == pytest.approx(500_000, rel=0.01)
    assert result.histogram.get_min_value() == pytest.approx(2_000, rel=0.01)


async def test_closed_loop_runs_exactly_the_count() -> None:
    runner, port = await _echo_server()
    try:
        target = Target(f"http://127.0.0.1:{port}/slow", [b"x"])
        closed = await run_load(target, LoadSpec(mode="closed", concurrency=1, duration_s=None, count=5, warmup_s=0))
        assert closed.measured == 5 and closed.errors == {} and closed.histogram.get_total_count() == 5
    finally:
        await runner.cleanup()


async def test_runner_counts_errors_by_status() -> None:
    runner, port = await _echo_server()
    try:
        target = Target(f"http://127.0.0.1:{port}/nope", [b"x"])
        res = await run_load(target, LoadSpec(mode="closed", concurrency=2, duration_s=None, count=6, warmup_s=0))
        assert res.measured == 0 and sum(res.errors.values()) >= 6 and set(res.errors) == {404}
    finally:
        await runner.cleanup()
