"""The root's fast listener (root/front.py) on the wire: heads, early answers, hand-over, against a real root and sink.

Raw sockets, so what is tested is the bytes a client sees; expected bodies come from msgpack.packb of the kept
features (independent of the trim).
"""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest

from promtext import scrape
from tests.test_root_service import sha, start_root, start_sink, write_bundle

FEATS = {"f1": 1, "f2": [1.5, 2.5], "pad": b"p" * 3000}
LIMIT = 1024 * 1024  # limits.max_body_bytes of this root


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("front")
    bundle = tmp / "bundle.json"
    write_bundle(bundle, {"alpha": {"1": ["f1", "f2"]}})
    sink = start_sink(tmp, "sink")
    root = start_root(tmp, "root", {"bundles": [str(bundle)], "watch": False, "admin": {"on_service_port": True},
                                    "limits": {"max_body_bytes": LIMIT},
                                    "partitions": {"main": {"replicas": [sink.url]}},
                                    "models": {"alpha": {"partition": "main", "default_version": "1"}}})
    host, port = root.url.split("://", 1)[1].rsplit(":", 1)
    yield host, int(port)
    root.stop()
    sink.stop()


async def exchange(addr: tuple[str, int], pieces: list[bytes], pause: float = 0.0) -> tuple[int, dict, bytes]:
    """Write `pieces` (pausing between them), read one answer: (status, headers, body)."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await read_answer(reader, 15)
    finally:
        writer.close()


def score_head(host: str, length: int, extra: str = "") -> bytes:
    return (f"POST /v1/models/alpha/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/msgpack\r\n{extra}"
            f"Content-Length: {length}\r\n\r\n").encode()


async def test_a_head_dribbled_past_its_first_buffer_is_parsed_whole(front):
    """Headers of ~20 KiB in 1 KiB pieces: the head buffer grows past its first 8 KiB; the trim is still exact."""
    host, _ = front
    data = msgpack.packb({"request_id": "d", "features": FEATS}, use_bin_type=True)
    padding = "".join(f"X-Pad-{i}: {'v' * 90}\r\n" for i in range(200))
    raw = score_head(host, len(data), padding) + data
    status, headers, out = await exchange(front, [raw[i:i + 1024] for i in range(0, len(raw), 1024)], pause=0.002)
    assert status == 200, out
    expected = msgpack.packb({"request_id": "d", "features": {"f1": 1, "f2": [1.5, 2.5]}}, use_bin_type=True)
    assert msgpack.unpackb(out)["body_sha256"] == sha(expected)


async def test_a_head_past_64_kib_is_431_and_the_connection_closes(front):
    host, _ = front
    padding = "".join(f"X-Pad-{i}: {'v' * 990}\r\n" for i in range(70))  # ~70 KiB of headers
    status, headers, out = await exchange(front, [score_head(host, 10, padding)])
    assert status == 431 and "65536 bytes" in json.loads(out)["error"] and headers.get("connection") == "close"


async def test_an_oversized_body_is_answered_413_before_it_is_read_and_the_client_sees_the_answer(front):
    """Content-Length past max_body_bytes: 413 JSON at once; the body the client keeps sending is read and dropped
    (lingering close), so it gets the answer rather than a connection reset."""
    host, _ = front
    pieces = [score_head(host, 8 * LIMIT)] + [b"z" * 65536] * 32  # 2 MiB of the announced 8 MiB
    status, headers, out = await exchange(front, pieces)
    assert status == 413 and "limits.max_body_bytes" in json.loads(out)["error"] and headers.get(
        "connection") == "close"


async def test_http_1_0_and_encoded_names_go_to_aiohttp_with_the_same_answers(front):
    host, _ = front
    data = msgpack.packb({"request_id": "h", "features": FEATS}, use_bin_type=True)
    expected = sha(msgpack.packb({"request_id": "h", "features": {"f1": 1, "f2": [1.5, 2.5]}}, use_bin_type=True))
    http10 = score_head(host, len(data)).replace(b"HTTP/1.1", b"HTTP/1.0", 1) + data
    status, _, out = await exchange(front, [http10])
    assert status == 200 and msgpack.unpackb(out)["body_sha256"] == expected
    encoded = score_head(host, len(data)).replace(b"/alpha/", b"/%61lpha/", 1) + data  # aiohttp decodes %61 to a
    status, _, out = await exchange(front, [encoded])
    assert status == 200 and msgpack.unpackb(out)["body_sha256"] == expected
    status, _, out = await exchange(front,
                                    [score_head(host, 4).replace(b"/alpha/", b"/%2e%2e/", 1) + b"\x80\x80\x80\x80"])
    assert status == 400, out  # `..` is no model name, on either listener


# ---------------------------------------------------------------------- receive cap (limits.max_receiving_body_bytes)
@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """A root that receives at most 4 KiB of declared body bytes at once; a body window of 1 s, only a full stall
    closes (so a slow body that keeps trickling holds its room)."""
    tmp = tmp_path_factory.mktemp("narrow")
    bundle = tmp / "bundle.json"
    write_bundle(bundle, {"alpha": {"1": ["f1", "f2"]}})
    sink = start_sink(tmp, "sink")
    root = start_root(tmp, "root", {"bundles": [str(bundle)], "watch": False, "admin": {"on_service_port": True},
                                    "limits": {"max_body_bytes": LIMIT, "max_receiving_body_bytes": 4096},
                                    "timeouts": {"client_body_s": 1.0, "client_body_min_rate": 0},
                                    "partitions": {"main": {"replicas": [sink.url]}},
                                    "models": {"alpha": {"partition": "main", "default_version": "1"}}})
    host, port = root.url.split("://", 1)[1].rsplit(":", 1)
    yield host, int(port), root.url
    root.stop()
    sink.stop()


def scored(rid: str) -> tuple[bytes, str]:
    """A ~3 KiB body (two of them do not fit in 4 KiB) and the sha256 of its trim, from msgpack itself."""
    data = msgpack.packb({"request_id": rid, "features": FEATS}, use_bin_type=True)
    return data, sha(msgpack.packb({"request_id": rid, "features": {"f1": 1, "f2": [1.5, 2.5]}}, use_bin_type=True))


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return int(lines[0].split()[1]), headers, await asyncio.wait_for(
        reader.readexactly(int(headers.get("content-length", "0"))), timeout)


async def a_receiving_b_queued(narrow, a_rid: str, b_rid: str):
    """Connection A sends its head and 100 bytes of its body (so it holds the root's receive room), then B sends its
    whole request, which has to wait. Returns both connections and the bodies with their expected trims."""
    host, port, _ = narrow
    a_body, a_sha = scored(a_rid)
    b_body, b_sha = scored(b_rid)
    ra, wa = await asyncio.open_connection(host, port)
    rb, wb = await asyncio.open_connection(host, port)
    wa.write(score_head(host, len(a_body)) + a_body[:100])
    await wa.drain()
    await asyncio.sleep(0.15)
    wb.write(score_head(host, len(b_body)) + b_body)
    await wb.drain()
    return (ra, wa, a_body, a_sha), (rb, wb, b_sha)


async def send_rest_and_check(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: bytes,
                              expected_sha: str) -> None:
    """Send the rest of a body; its answer must be 200 with the exact trim."""
    writer.write(rest)
    await writer.drain()
    status, _, out = await read_answer(reader, 10)
    assert status == 200 and msgpack.unpackb(out)["body_sha256"] == expected_sha


async def test_a_body_past_the_receive_cap_waits_for_room_and_is_then_answered_exactly(narrow):
    """A's body is being received (partly sent); B's whole request is sent but must wait: no answer while A holds the
    room, then both are answered with the exact trim, and the wait is counted."""
    url = narrow[2]
    before = scrape(url, "trimmer_root_front_body_waits_total", outcome="admitted")
    (ra, wa, a_body, a_sha), (rb, wb, b_sha) = await a_receiving_b_queued(narrow, "a", "b")
    try:
        with pytest.raises(asyncio.TimeoutError):
            await read_answer(rb, 0.4)  # B waits for room (its bytes stay in the kernel)
        await send_rest_and_check(ra, wa, a_body[100:], a_sha)
        status, _, out = await read_answer(rb, 10)
        assert status == 200 and msgpack.unpackb(out)["body_sha256"] == b_sha
    finally:
        wa.close()
        wb.close()
    assert scrape(url, "trimmer_root_front_body_waits_total", outcome="admitted") == before + 1


async def test_a_body_that_waits_past_the_body_timeout_gets_503_and_the_one_receiving_is_unharmed(narrow):
    """A trickles its body (1 byte per 0.2 s: never a stalled window) and so holds the room for 1.6 s; B, queued behind
    it, is answered 503 + Retry-After after client_body_s (1 s); A is then answered with its exact trim."""
    url = narrow[2]
    before = scrape(url, "trimmer_root_front_body_waits_total", outcome="timed_out")
    (ra, wa, a_body, a_sha), (rb, wb, _) = await a_receiving_b_queued(narrow, "a2", "b2")
    try:
        for i in range(8):  # 1.6 s of trickle, bounded
            wa.write(a_body[100 + i:101 + i])
            await wa.drain()
            await asyncio.sleep(0.2)
        status, headers, out = await read_answer(rb, 5)
        assert status == 503 and headers.get("retry-after") == "1"
        assert "limits.max_receiving_body_bytes" in json.loads(out)["error"]
        await send_rest_and_check(ra, wa, a_body[108:], a_sha)
    finally:
        wa.close()
        wb.close()
    assert scrape(url, "trimmer_root_front_body_waits_total", outcome="timed_out") == before + 1


async def test_a_large_body_trickling_under_the_read_low_mark_is_not_taken_for_a_stall(narrow):
    """A 400 KB body (past root/front.py's RCVLOWAT, so the kernel holds its bytes until 256 KiB are in) trickles 1 KiB
    per 0.25 s for 2.5 s: every 1 s body window brings bytes, though none is read in the first, so the connection must
    stay open, and the trim is exact."""
    host, port, _ = narrow
    feats = {**FEATS, "pad": b"p" * 400_000}
    data = msgpack.packb({"request_id": "slow", "features": feats}, use_bin_type=True)
    expected = sha(msgpack.packb({"request_id": "slow", "features": {"f1": 1, "f2": [1.5, 2.5]}}, use_bin_type=True))
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(score_head(host, len(data)) + data[:1000])
        await writer.drain()
        sent = 1000
        for _ in range(10):  # 2.5 s, bounded
            await asyncio.sleep(0.25)
            writer.write(data[sent:sent + 1024])
            await writer.drain()
            sent += 1024
        await send_rest_and_check(reader, writer, data[sent:], expected)
    finally:
        writer.close()
