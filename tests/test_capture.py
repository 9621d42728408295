"""Capture at the root, replay with the load test: real root processes in front of the stand-in sink.

Oracle: the requests the test itself sent (path, content type, body bytes), compared with what
the capture file holds; and the root's own request counters after the replay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import msgpack
import pytest

from loadtest.procs import ManagedProcess, free_port, start, trimmer_cmd
from trimmer.capture import read_capture
from trimmer.errors import ConfigError


def _sink(tmp):
    port = free_port()
    mp = ManagedProcess("sink", [sys.executable, "-m", "loadtest.sink", "--port", str(port), "--oip-inputs", "m=f1"],
                        f"http://127.0.0.1:{port}", tmp / "sink.log")
    mp.start()
    mp.wait_ready("/v2/health/ready", timeout=30)
    return mp


def _root(tmp, name, sink, capture):
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(json.dumps({"admin": {"on_service_port": True}, "partitions": {"p": {"replicas": [sink.url]}},
                               "models": {"m": "p"}, "capture": capture}))
    port = free_port()
    return start(name, ["root", "--config", str(cfg), "--port", str(port)], port, "/readyz", tmp, timeout=60)


def _post(url, body, ctype, headers=None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype, **(headers or {})}, method="POST")
    with urllib.request.urlopen(req, timeout=20) as r:
        return r.status


def _requests_total(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("trimmer_root_requests_total{"))


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capture")
    s = _sink(tmp)
    try:
        yield s, tmp
    finally:
        s.stop()


def test_captured_requests_are_the_requests_sent_and_replay_against_the_root(sink):
    sink, tmp = sink
    capture = tmp / "traffic.capture"
    root = _root(tmp, "root", sink, {"path": str(capture), "sample_rate": 1.0})
    sent = []
    try:
        for i in range(3):
            body = msgpack.packb({"request_id": f"r{i}", "features": {"f1": i, "unused": [i] * 10}})
            assert _post(root.url + "/v1/models/m/score", body, "application/msgpack") == 200
            sent.append(("/v1/models/m/score", "application/msgpack", body))
        fan = msgpack.packb({"models": [{"name": "m"}], "features": {"f1": 1}})
        assert _post(root.url + "/v1/score", fan, "application/msgpack") == 200
        sent.append(("/v1/score", "application/msgpack", fan))
        oip = json.dumps({"inputs": [{"name": "f1", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode()
        assert _post(root.url + "/v2/models/m/infer", oip, "application/json") == 200
        sent.append(("/v2/models/m/infer", "application/json", oip))
        with urllib.request.urlopen(root.url + "/v2/models/m", timeout=10) as r:  # metadata: never captured
            assert r.status == 200
        root.stop()  # flushes the writer
        records = read_capture(capture)
        assert [(r.path, r.content_type, r.body) for r in records] == sent
        root = _root(tmp, "root2", sink, {"path": str(tmp / "other.capture"), "sample_rate": 0.001})
        before = _requests_total(root.url)
        out = subprocess.run(trimmer_cmd("loadtest", "--target", root.url, "--replay", str(capture), "--count", "20",
                                         "--concurrency", "2", "--warmup", "0"),
                                         capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr + out.stdout
        assert "replaying 5 captured request(s)" in out.stderr
        assert _requests_total(root.url) - before >= 20  # every replayed request reached the root's routing
    finally:
        root.stop()


def test_the_capture_stops_at_max_bytes(sink):
    sink, tmp = sink
    capture = tmp / "small.capture"
    root = _root(tmp, "root-small", sink, {"path": str(capture), "sample_rate": 1.0, "max_bytes": 600})
    try:
        body = msgpack.packb({"features": {"f1": 1, "pad": "x" * 200}})
        for _ in range(10):
            assert _post(root.url + "/v1/models/m/score", body, "application/msgpack") == 200
    finally:
        root.stop()
    assert 0 < capture.stat().st_size <= 600
    assert 1 <= len(read_capture(capture)) < 10


def test_a_file_that_is_not_a_capture_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.capture"
    bad.write_bytes(msgpack.packb({"hello": "world"}))
    with pytest.raises(ConfigError, match="record 1 is not a capture record"):
        read_capture(bad)
    out = subprocess.run(trimmer_cmd("loadtest", "--target", "http://127.0.0.1:9", "--replay", str(bad)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "not a capture record" in out.stderr
