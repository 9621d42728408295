"""One log line per key per interval, so a condition hit at 10k req/s stays readable and cheap.

Root and leaf both log things that can happen on every request (an untrimmed forward, a
signature mismatch, a model failure, a refused connection). Each such site keys its lines (by
model and version, say); the first line of a key is logged, the rest within `interval_s` are
counted, and the next line logged for that key says how many were folded into it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Hashable

MAX_KEYS = 4096  # keys are bounded label values; this is a backstop, not a tuning knob


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.level = level
        self._last: dict[Hashable, float] = {}
        self._folded: dict[Hashable, int] = {}

    def __call__(self, key: Hashable, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._folded[key] = self._folded.get(key, 0) + 1
            return
        if len(self._last) >= MAX_KEYS:
            self._last.clear()
            self._folded.clear()
        self._last[key] = now
        n = self._folded.pop(key, 0)
        self.logger.log(self.level, msg + (f" ({n} more since the last one)" if n else ""), *args)


__all__ = ["RateLimitedLog"]
