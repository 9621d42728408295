"""Request capture files: a bounded sample of real traffic at the root, replayed by the load test.

Synthetic payloads prove the mechanism; a replay of your own requests proves the savings on your
data. The root writes a sampled share of the requests it receives (`capture:` in its config) to
one file, and `trimmer loadtest --target URL --replay FILE` sends them again, each to the path
and with the content type it came with.

Format: a stream of msgpack maps, one per request, appended as the requests arrive:

    {"v": 1, "t": 1764630000.25, "path": "/v1/models/ranker/score",
     "content_type": "application/msgpack", "headers": {"Inference-Header-Content-Length": "312"},
     "body": <bin: the request body as received, after Content-Encoding decoding>}

`headers` holds only those a replay needs. A record is one `write()` on a file opened with
O_APPEND, so workers of one root sharing a file never interleave records. The writer stops at
`max_bytes` and says so once in the log; a record cut short by a crash at the end of the file is
ignored by the reader. It never blocks a request (bodies are copied and written
by one background thread through a bounded queue; a full queue drops the sample and counts it).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack

from .errors import ConfigError

log = logging.getLogger("trimmer.capture")
FORMAT_VERSION = 1
REPLAY_HEADERS = ("Inference-Header-Content-Length",)
QUEUE_RECORDS = 64


@dataclass(frozen=True)
class Record:
    path: str
    content_type: str
    body: bytes
    headers: dict[str, str]
    t: float = 0.0


class CaptureWriter:
    """Sampled, size-capped capture to one file; `offer` is cheap when the sample says no."""

    def __init__(self, path: str | os.PathLike[str], sample_rate: float,
                 max_bytes: int, seed: int | None = None) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"capture.sample_rate: must be in (0, 1], got {sample_rate!r}")
        if max_bytes < 1:
            raise ConfigError(f"capture.max_bytes: must be >= 1, got {max_bytes!r}")
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.max_bytes = max_bytes
        self.written = 0
        self.records = 0
        self.dropped = 0
        self.full = False
        self._rng = random.Random(seed)
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_RECORDS)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self.written = os.fstat(self._fd).st_size
        except OSError as exc:
            raise ConfigError(f"capture.path: cannot open {self.path} for appending ({exc.strerror})") from None
        self._thread = threading.Thread(target=self._run, name="trimmer-capture", daemon=True)
        self._thread.start()

    def sample(self) -> bool:
        """Draw for one request: True means call `record` with it (the body is copied only then)."""
        return not self.full and self._rng.random() < self.sample_rate

    def record(self, path: str, content_type: str, body: bytes | memoryview, headers: dict[str, str]) -> bool:
        """Queue one sampled request for the file; True when queued."""
        rec = msgpack.packb({"v": FORMAT_VERSION, "t": time.time(), "path": path, "content_type": content_type,
                             "headers": {k: v for k, v in headers.items() if k in REPLAY_HEADERS}, "body": bytes(body)},
                            use_bin_type=True)
        if self.written + len(rec) > self.max_bytes:
            self.full = True
            log.warning("capture %s reached capture.max_bytes (%d); no more requests are captured",
                        self.path, self.max_bytes)
            return False
        try:
            self._queue.put_nowait(rec)
        except queue.Full:
            self.dropped += 1
            return False
        self.written += len(rec)
        self.records += 1
        return True

    def _run(self) -> None:
        while True:
            rec = self._queue.get()
            if rec is None:
                return
            try:
                os.write(self._fd, rec)
            except OSError as exc:
                self.full = True
                log.error("capture %s: write failed (%s); capture stopped", self.path, exc.strerror)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        os.close(self._fd)


def read_capture(path: str | os.PathLike[str], max_records: int = 100_000, max_bytes: int = 1 << 30) -> list[Record]:
    """The records of a capture file, in order; a malformed or truncated file is a ConfigError naming the record."""
    return list(iter_capture(path, max_records, max_bytes))


def iter_capture(path: str | os.PathLike[str], max_records: int, max_bytes: int) -> Iterator[Record]:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read capture file ({exc.strerror})") from None
    if size > max_bytes:
        raise ConfigError(f"{p}: capture file is {size} bytes; the replay reads at most {max_bytes}")
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max_bytes)
    unpacker.feed(p.read_bytes())
    n = 0
    try:
        for obj in unpacker:
            n += 1
            if n > max_records:
                return
            if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION or not isinstance(obj.get("body"), bytes) \
                    or not isinstance(obj.get("path"), str) or not obj["path"].startswith("/"):
                raise ConfigError(
                    f"{p}: record {n} is not a capture record (format v{FORMAT_VERSION}, docs/loadtest.md)")
            headers = obj.get("headers") or {}
            yield Record(obj["path"], str(obj.get("content_type") or "application/msgpack"), obj["body"],
                         {str(k): str(v) for k, v in headers.items()}, float(obj.get("t") or 0.0))
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise ConfigError(f"{p}: record {n + 1} is malformed ({exc})") from None
    if n == 0:
        raise ConfigError(f"{p}: no capture records")


__all__ = ["CaptureWriter", "Record", "read_capture", "FORMAT_VERSION"]
