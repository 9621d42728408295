"""The byte-counting relay counts exactly the bytes that cross it, and the runner drives real HTTP load."""

from __future__ import annotations

import asyncio

import aiohttp
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
        await asyncio.sleep(0.05)
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


async def test_open_loop_runner_holds_rate_and_excludes_warmup() -> None:
    runner, port = await _echo_server()
    try:
        target = Target(f"http://127.0.0.1:{port}/v1/models/m/score", [b"a" * 100, b"b" * 200])
        res = await run_load(target, LoadSpec(mode="open", rate=200, duration_s=1.0, warmup_s=0.3))
        assert res.errors == {}
        assert res.sent == res.completed
        assert 150 <= res.measured <= 210  # ~1 s at 200/s; warm-up (~60 requests) not recorded
        assert res.sent - res.measured >= 50
        assert res.histogram.get_total_count() == res.measured
        assert 100 < res.achieved_rate < 260
    finally:
        await runner.cleanup()


async def test_open_loop_latency_counts_from_intended_send_time() -> None:
    """A server that takes 50 ms per request with one connection: queueing shows up as latency (no coordinated omission)."""
    runner, port = await _echo_server()
    try:
        target = Target(f"http://127.0.0.1:{port}/slow", [b"x"])
        res = await run_load(target, LoadSpec(mode="open", rate=40, duration_s=0.5, warmup_s=0, max_inflight=1))
        pct = res.percentiles_ms()
        # 20 requests at 40/s into a server that serves 20/s: the last ones wait ~0.5 s beyond their intended time
        assert pct["p99"] > 300
        closed = await run_load(target, LoadSpec(mode="closed", concurrency=1, duration_s=None, count=5, warmup_s=0))
        assert closed.measured == 5 and closed.percentiles_ms()["p99"] < 300
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
