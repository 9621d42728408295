"""Log output of the root: plain text (default) or one JSON object per line, with the request id.

Why JSON: log pipelines (Loki, Elasticsearch, Cloud Logging) index fields, not prose, and a
request id lets one client request be followed across the root's lines (its audit result
included: tasks started while handling a request inherit the id through `contextvars`).

The request id is the client's `X-Request-Id` when it sends a sane one (at most 128 printable
ASCII characters), else a new random one; the root answers with it in `X-Request-Id`.
Choose the format with `trimmer root --log-format json` or `TRIMMER_LOG_FORMAT=json`.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import secrets
import time
from typing import Mapping

FORMATS = ("text", "json")
FORMAT_ENV = "TRIMMER_LOG_FORMAT"
REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trimmer_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_ID_PREFIX = secrets.token_hex(4)  # per process; the counter below makes each id unique without a syscall per request
_ID_COUNTER = itertools.count(secrets.randbits(32))


def request_id_for(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id if it is sane, else a fresh 16-hex-digit id (process prefix + counter)."""
    given = headers.get(REQUEST_ID_HEADER)
    if given and len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, pid, request_id (when set), exception (when any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        rid = request_id.get()
        if rid is not None:
            doc["request_id"] = rid
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(fmt: str | None = None, level: str | None = None) -> str:
    """Set up the root logger once per process; returns the format used (exported for worker processes)."""
    from trimmer.errors import ConfigError
    from trimmer.settings import settings

    fmt = fmt or settings().log_format
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r} is not one of {', '.join(FORMATS)} (--log-format, {FORMAT_ENV})")
    os.environ[FORMAT_ENV] = fmt  # `--workers N` children log the same way
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level or settings().log_level, handlers=[handler], force=True)
    return fmt


__all__ = ["configure", "request_id", "request_id_for", "JsonFormatter", "REQUEST_ID_HEADER", "FORMATS", "FORMAT_ENV"]
