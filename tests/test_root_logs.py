"""Structured JSON logs with a request id, from a real root process (loadtest.sink upstream, loopback)."""

from __future__ import annotations

import json
import time
import urllib.request

import msgspec
import pytest
import yaml

from loadtest.procs import free_port, start

from test_root_service import start_sink, write_bundle


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logs")
    sink = start_sink(tmp, "sink")
    write_bundle(tmp / "bundle.json", {"alpha": {"1": ["f1"]}})
    cfg = {"bundles": [str(tmp / "bundle.json")], "partitions": {"p": {"replicas": [sink.url]}},
           "models": {"alpha": {"partition": "p", "default_version": "1"}}, "audit_sample_rate": 1.0}
    (tmp / "root.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    r = start("root", ["root", "--config", str(tmp / "root.yaml"), "--port", str(port), "--log-format", "json"], port,
              "/readyz", tmp, timeout=30)
    try:
        yield r
    finally:
        r.stop()
        sink.stop()


def _post(url: str, headers: dict) -> tuple[int, str]:
    body = msgspec.msgpack.encode({"features": {"f1": 1, "f2": 2}})
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/msgpack", **headers})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers["X-Request-Id"]


def _records(root) -> list[dict]:
    lines = [ln for ln in root.log_path.read_text().splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]  # every line is one JSON object


def test_every_log_line_is_json(root) -> None:
    recs = _records(root)
    assert any("listening" in r["message"] for r in recs)
    for r in recs:
        assert {"time", "level", "logger", "message", "pid"} <= set(r)


def test_request_id_echoed_and_in_the_requests_log_lines(root) -> None:
    status, rid = _post(root.url + "/v1/models/alpha/score", {"X-Request-Id": "req-42"})
    assert status == 200 and rid == "req-42"
    # The audit of that request (sample rate 1) logs its outcome from a task the request started.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        tagged = [r for r in _records(root) if r.get("request_id") == "req-42"]
        if tagged:
            break
        time.sleep(0.1)
    assert tagged, "no log line carries the request id"
    assert any(r["logger"].startswith("trimmer.root") for r in tagged)


def test_request_id_generated_when_missing_or_insane(root) -> None:
    _, rid = _post(root.url + "/v1/models/alpha/score", {})
    assert len(rid) == 16 and int(rid, 16) >= 0
    _, rid2 = _post(root.url + "/v1/models/alpha/score", {"X-Request-Id": "x" * 500})
    assert len(rid2) == 16 and rid2 != rid
