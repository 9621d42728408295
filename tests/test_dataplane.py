"""The root's data plane without its HTTP server (root/dataplane.py): plans, trims, sends, typed errors.

Upstream is the real stand-in sink process (`--echo-model echo` answers with the exact body it received);
expected bodies come from msgpack.packb of the kept features (an independent encoder), never from the trim.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgpack
import pytest

from loadtest.procs import ManagedProcess, free_port
from root.app import RootState
from root.config import parse_config
from root.dataplane import NativeFormat, PreparedBody, RouteError
from root.upstream import Body
from tests.test_root_service import write_bundle

MP = "application/msgpack"
FEATURES = {"f1": [1.0, 2.0], "f2": b"\x00\x01", "f3": "three", "pad": b"x" * 4000}


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dataplane-sink")
    port = free_port()
    mp = ManagedProcess("sink", [sys.executable, "-m", "loadtest.sink", "--port", str(port), "--echo-model", "echo",
                                 "--oip-inputs", "oipm=f1"], f"http://127.0.0.1:{port}", tmp / "sink.log")
    mp.start()
    mp.wait_ready("/v2/health/ready", timeout=30)
    yield mp
    mp.stop()


@pytest.fixture
async def state(sink, tmp_path: Path):
    bundle = tmp_path / "bundle.json"
    write_bundle(bundle, {"echo": {"1": ["f1", "f2"], "2": ["f1", "f2", "f3"]}, "other": {"1": ["f3"]}})
    cfg = parse_config({
        "bundles": [str(bundle)], "watch": False, "admin": {"on_service_port": True},
        "partitions": {"main": {"replicas": [sink.url]}, "oip": {"replicas": [sink.url], "protocol": "oip"}},
        "models": {"echo": {"partition": "main"}, "other": {"partition": "main"}, "oipm": {"partition": "oip"}},
    }, str(tmp_path / "root.yaml"), tmp_path)
    st = RootState(cfg)
    await st.start()
    yield st
    await st.stop()


def request(features: dict) -> bytes:
    return msgpack.packb({"request_id": "r1", "features": features}, use_bin_type=True)


def kept(features: dict, names: set[str]) -> bytes:
    return msgpack.packb(
        {"request_id": "r1", "features": {k: v for k, v in features.items() if k in names}}, use_bin_type=True)


async def test_a_plan_resolves_once_and_its_allowlist_decides_the_bytes_sent(state, monkeypatch):
    calls: list[tuple[str, str | None]] = []
    real = state.registry.resolve

    def counting(model, version=None):
        calls.append((model, version))
        return real(model, version)

    monkeypatch.setattr(state.registry, "resolve", counting)
    plane = state.plane
    for version, names in ((None, {"f1", "f2", "f3"}), ("1", {"f1", "f2"})):  # latest is version 2
        calls.clear()
        plan = plane.plan_single("model", "echo", version, NativeFormat(MP), MP, 5.0)
        data = request(FEATURES)
        stream = plan.stream_trim(len(data))  # fed as an adapter feeds it: each piece as it lands
        assert stream is not None
        for i in range(0, len(data), 1000):
            stream.feed(data[i:i + 1000])
        out = await plane.score(plan, Body([data[i:i + 1000] for i in range(0, len(data), 1000)]), stream)
        assert out.status == 200 and out.body == kept(FEATURES, names)
        assert calls == [("echo", version)], calls  # planning resolved; trimming and sending did not again


@pytest.mark.parametrize("model, version, route, status", [
    ("nosuch", None, "model", 404),     # not configured, unknown_models.policy reject
    ("echo", "../2", "model", 400),     # a version that is no name
    ("e cho", None, "model", 400),      # a model that is no name
    ("oipm", None, "model", 400),       # an OIP partition on the native route
])
async def test_planning_errors_are_typed_and_answered_after_the_body(state, model, version, route, status):
    plan = state.plane.plan_single(route, model, version, NativeFormat(MP), MP, 5.0)
    assert isinstance(plan.error, RouteError) and plan.error.status == status and plan.targets == []
    out = await state.plane.score(plan, Body.of(request(FEATURES)))
    assert out.status == status and out.error == plan.error.message


async def test_fan_out_merges_answers_and_keeps_each_targets_error_apart(state):
    doc = {"models": [{"name": "echo", "version": "1"}, {"name": "other"}, {"name": "nosuch"}], "request_id": "r1",
           "features": FEATURES}
    prepared = PreparedBody(Body.of(msgpack.packb(doc, use_bin_type=True)), MP)
    status, data = await state.plane.fan_out(state.plane.plan_fanout(MP, 5.0), prepared, len(prepared.base))
    out = msgpack.unpackb(data, raw=False)
    assert status == 200
    assert msgpack.packb(out["results"]["echo"], use_bin_type=True) == kept(FEATURES, {"f1", "f2"})
    assert out["results"]["other"]["features"] == ["f3"]  # the sink's report of what it received
    assert out["errors"] == {"nosuch": {"status": 404, "error": out["errors"]["nosuch"]["error"]}}


async def test_an_untrimmable_request_goes_whole_and_says_why(state):
    plan = state.plane.plan_single("model", "echo", "7", NativeFormat(MP), MP, 5.0)  # no allowlist for version 7
    out = await state.plane.score(plan, Body.of(request(FEATURES)))
    assert out.status == 200 and out.body == request(FEATURES)
    m = state.metrics.registry.get_sample_value("trimmer_root_untrimmed_forwards_total",
                                                {"model": "echo", "version": "_unlisted", "partition": "main",
                                                 "reason": "no_allowlist"})
    assert m == 1.0


async def test_upstream_connections_keep_the_replica_prefix_and_are_reused(tmp_path):
    """root/upstream.py's own HTTP/1.1 client against a recording aiohttp server: the replica's path prefix,
    Host and Content-Length go out as HTTP says, bodies arrive whole, and two requests share one connection."""
    from aiohttp import web

    from root.config import PartitionConfig, Timeouts
    from root.metrics import Metrics
    from root.upstream import Partition

    seen: list[tuple[str, str, int, bytes, tuple]] = []

    async def record(request: web.Request) -> web.Response:
        data = await request.read()
        seen.append((request.path, request.headers["Host"], int(request.headers.get("Content-Length", "0")), data,
                     request.transport.get_extra_info("peername")))
        return web.Response(body=b"\x81\xa2ok\xc3", content_type=MP, headers={"X-Upstream": "yes"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    part = Partition(PartitionConfig("p", (f"http://127.0.0.1:{port}/pre",)), Timeouts(), Metrics())
    await part.start()
    try:
        data = request(FEATURES)
        chunks = [memoryview(bytearray(data))[i:i + 777] for i in range(0, len(data), 777)]  # as the front hands them
        for body in (Body(chunks), Body.of(data)):
            resp = await part.request("POST", "/v1/models/x/score", body, {"Content-Type": MP}, 5.0)
            assert resp.status == 200 and resp.body == b"\x81\xa2ok\xc3" and resp.headers["x-upstream"] == "yes"
        resp = await part.request("GET", "/v2/health/ready", None, {}, 5.0)
        assert resp.status == 200
    finally:
        await part.close()
        await runner.cleanup()
    assert [(s[0], s[1], s[2], s[3]) for s in seen[:2]] == [
        ("/pre/v1/models/x/score", f"127.0.0.1:{port}", len(data), data)] * 2
    assert seen[2][0] == "/pre/v2/health/ready" and seen[2][2] == 0
    assert len({s[4] for s in seen}) == 1  # one pooled keep-alive connection carried all three


class _IdleClosingReplica:
    """A replica that answers the first request on each connection and closes the connection, unanswered, when a
    second one arrives on it: the race of a keep-alive connection the server closes as idle while a request is on
    its way. `always_close` closes on the first request too (a replica that breaks every connection).

    Written on asyncio streams, because the race cannot be timed against a real server; the HTTP it speaks is one
    fixed answer to a request read whole (head, then Content-Length bytes)."""

    def __init__(self, always_close: bool = False) -> None:
        self.always_close = always_close
        self.connections = 0
        self.answered = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if served or self.always_close:
                    return  # closed without a byte of answer
                served += 1
                self.answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/msgpack\r\nContent-Length: 4\r\n\r\n"
                             b"\x81\xa2ok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


async def _partition_on(replica: _IdleClosingReplica):
    from root.config import PartitionConfig, Timeouts
    from root.metrics import Metrics
    from root.upstream import Partition

    server = await asyncio.start_server(replica.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    part = Partition(PartitionConfig("p", (f"http://127.0.0.1:{port}",)), Timeouts(), Metrics())
    await part.start()
    return server, part


async def test_a_keep_alive_connection_closed_as_idle_is_retried_once_on_a_new_one():
    """The second request goes out on the pooled connection, which the replica closes unanswered: it is sent again on
    a new connection and answered (it was a 502 before), and the stale attempt is counted."""
    from root.upstream import Body

    replica = _IdleClosingReplica()
    server, part = await _partition_on(replica)
    try:
        for i in range(3):
            resp = await part.request("POST", "/v1/models/x/score", Body.of(request(FEATURES)), {"Content-Type": MP},
                                      5.0)
            assert resp.status == 200 and resp.body == b"\x81\xa2ok", i
        part.metrics.flush()
        stale = part.metrics.registry.get_sample_value("trimmer_root_upstream_attempts_total", {
            "partition": "p", "replica": part.replicas[0].url, "outcome": "stale_connection"})
    finally:
        await part.close()
        server.close()
    assert (replica.answered, replica.connections, stale) == (3, 3, 2.0)  # requests 2 and 3 each met a stale one


async def test_a_replica_that_breaks_every_connection_is_not_retried_past_once():
    from root.upstream import Body, UpstreamError

    replica = _IdleClosingReplica(always_close=True)
    server, part = await _partition_on(replica)
    try:
        with pytest.raises(UpstreamError) as err:
            await part.request("POST", "/v1/models/x/score", Body.of(request(FEATURES)), {"Content-Type": MP}, 5.0)
    finally:
        await part.close()
        server.close()
    # a new connection that breaks is no stale one: 502 at once, one connection, nothing answered
    assert err.value.status == 502 and (replica.connections, replica.answered) == (1, 0)
