"""The root's fast listener (root/front.py) on the wire: heads, early answers, hand-over, against a real root and sink.

Raw sockets, so what is tested is the bytes a client sees; expected bodies come from msgpack.packb of the kept
features (independent of the trim).
"""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest

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
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        data = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 15)
        return int(lines[0].split()[1]), headers, data
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
