"""Cyclic garbage collector settings for the leaf, whose heap is mostly torch and the loaded models.

- `settle_gc` freezes everything alive after a model (re)load: otherwise every full collection walks
  ~300k long-lived objects (170 ms with the demo models), landing on whatever request allocated then.
- `tune_gc` raises the young-generation threshold from 700 to 20,000 allocations: with 64 requests in
  flight each young collection walks every live request object, and at 700 it ran every few requests
  (decode + convert measured 34 us per request under load, 21 us with this threshold).

Request objects die by reference counting; only reference cycles wait for a collection, a little longer.
Set TRIMMER_GC_TUNING=0 to leave the collector as Python configures it (trimmer/settings.py).
"""

from __future__ import annotations

import gc

from trimmer.settings import settings

YOUNG_THRESHOLD = 20_000


def enabled() -> bool:
    return settings().gc_tuning


def tune_gc() -> bool:
    """Raise the young-generation threshold (process start); True when applied."""
    if not enabled():
        return False
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, gen1, gen2)
    return True


def settle_gc(collect: bool) -> None:
    """Move everything alive now out of the collector's reach (after loads). After a version was replaced or
    removed, one full collection first reclaims its cycles (a torch.export module leaves thousands), so
    unloading does not leak: one pause per model change instead of one every few seconds."""
    if not enabled():
        return
    if collect:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


__all__ = ["tune_gc", "settle_gc", "YOUNG_THRESHOLD"]
