"""Load every version of a model repository and keep it in step with the disk.

Layout: <repo>/<model>/<version>/model.pt (TorchScript, torch.jit.load) or model.pt2 (torch.export,
torch.export.load(...).module()); model.pt2 wins when both exist (trimmer.repository). Dot-directories are
ignored (the demo keeps its reference data in .demo/). New or changed version directories are picked up
while running (watchfiles, plus a periodic rescan as a fallback); removed ones are unloaded. A version that
fails to load is reported (log, metrics, metadata, /v2/health/ready body) and the others keep serving.

Lifecycle of a changed archive (why: a reload must never cost a request): the new archive is loaded and
warmed into a NEW VersionState while the old one keeps serving; only a ready new state replaces the old
one (one dict assignment, no await between lookup and enqueue in the handlers), then the old batcher
drains, answering every job it took. A new archive that fails to load leaves the old state serving and
is reported on it (`reload_error`: metadata, per-model ready, /v2/health/ready, log,
trimmer_leaf_load_failures_total, trimmer_leaf_reload_failed); the same failed archive is not retried
until it changes again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trimmer.errors import SignatureError
from trimmer.names import version_key  # the root resolves "latest" by the same rule
from trimmer.handshake import input_digest
from trimmer.names import valid_name
from trimmer.repository import iter_versions
from trimmer.signature import Signature, read_signature

from .batcher import Batcher, BatchStats, Runner
from .compile import maybe_compile
from .config import LeafConfig
from .convert import Converted, Converter
from .gctune import settle_gc
from .metrics import LeafMetrics

log = logging.getLogger("leaf.models")
SETTLE_S = 0.5  # an archive modified more recently than this is loaded on a later scan (still being written)


@dataclass
class VersionState:
    model: str
    version: str
    path: Path
    fingerprint: tuple[int, int]
    state: str = "LOADING"  # LOADING | READY | FAILED
    error: str | None = None
    platform: str = ""
    signature: Signature | None = None
    converter: Converter | None = None
    batcher: Batcher | None = None
    outputs_meta: list[dict[str, Any]] = field(default_factory=list)
    loaded_at: float = 0.0
    digest: str | None = None  # trimmer.handshake.input_digest of signature.input_names, computed once at load
    reload_error: str | None = None  # a newer archive of this version failed to load; this one keeps serving
    failed_archive: tuple[Path, tuple[int, int]] | None = None  # (path, fingerprint) of that archive: not retried

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "version": self.version, "state": self.state,
                               "path": str(self.path), "platform": self.platform}
        if self.digest:
            out["trimmer_signature"] = self.digest
        if self.error:
            out["error"] = self.error
        if self.reload_error:
            out["reload_error"] = self.reload_error
        return out


def _fingerprint(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size)


def _load_module(path: Path, device: torch.device) -> tuple[Any, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module()
            if device.type != "cpu":
                module = module.to(device)
            return module, "pytorch_export"
        module = torch.jit.load(str(path), map_location=device)
        module.eval()
        return module, "pytorch_torchscript"


def _warmup_request(converter: Converter) -> Converted:
    """Two rows of zeros in the declared dtypes: catches models that cannot run in the batched convention."""
    tensors, shapes = [], []
    for plan in converter.plans:
        assert plan.spec.shape is not None and plan.torch_dtype is not None
        shape = tuple(2 if d == -1 else d for d in plan.spec.shape)
        tensors.append(torch.zeros(shape, dtype=plan.torch_dtype))
        shapes.append(shape)
    return Converted(tensors, 2 if converter.has_candidates else 1, shapes=shapes, dtypes=converter.dtypes)


class ModelStore:
    def __init__(self, repo: Path, config: LeafConfig, metrics: LeafMetrics, device: torch.device) -> None:
        self.repo = repo
        self.config = config
        self.metrics = metrics
        self.device = device
        self.versions: dict[tuple[str, str], VersionState] = {}
        self.initial_done = False
        self.stopping = False  # set on SIGTERM: not ready while in-flight requests finish
        self._skipped_names: set[str] = set()
        self._load_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="leaf-load")
        self._infer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="leaf-infer")
        self._scan_lock = asyncio.Lock()
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ lookup
    def resolve(self, model: str, version: str | None) -> VersionState | None:
        if version is not None:
            return self.versions.get((model, version))
        candidates = [vs for (m, _), vs in self.versions.items() if m == model]
        if not candidates:
            return None
        ready = [vs for vs in candidates if vs.ready] or candidates
        return max(ready, key=lambda vs: version_key(vs.version))

    def model_versions(self, model: str) -> list[str]:
        return sorted((v for (m, v) in self.versions if m == model), key=version_key)

    @property
    def ready(self) -> bool:
        if not self.initial_done or self.stopping:
            return False
        return not self.versions or any(vs.ready for vs in self.versions.values())

    def status(self) -> dict[str, Any]:
        return {"repo": str(self.repo), "initial_load_done": self.initial_done,
                "versions": [vs.status() for _,
                             vs in sorted(self.versions.items(), key=lambda kv: (kv[0][0], version_key(kv[0][1])))]}

    # ------------------------------------------------------------------ loading
    def _addressable(self, path: Path) -> bool:
        """A directory name the edge would reject (trimmer.names) could never be requested: skip it, warn once."""
        if valid_name(path.name):
            return True
        if str(path) not in self._skipped_names:
            self._skipped_names.add(str(path))
            log.warning("ignoring %s: %r is not a valid model name or version (A-Z a-z 0-9 _ . -, not starting with . "
                        "or -)", path, path.name)
        return False

    def _discover(self) -> dict[tuple[str, str], tuple[Path, tuple[int, int]]]:
        found = {}
        for v in iter_versions(self.repo, keep=self._addressable):
            path = v.archives[0]
            try:
                found[(v.model, v.version)] = (path, _fingerprint(path))
            except OSError:
                continue
        return found

    def _load_sync(self, vs: VersionState) -> None:
        """Runs in the load thread: signature, module, converter, warm-up run."""
        signature = read_signature(vs.path)
        module, platform = _load_module(vs.path, self.device)
        converter = Converter(signature)
        module = maybe_compile(module, converter, self.config.compile_for(vs.model),
                               f"{vs.model}/{vs.version}", self.device)
        vs.signature, vs.converter, vs.platform = signature, converter, platform
        vs.digest = input_digest(signature.input_names)
        runner = Runner(module, converter, signature.output_names, self.device)
        if converter.batchable:
            outs = runner.run([_warmup_request(converter)], BatchStats())[0]
            names = signature.output_names or tuple(f"output{i}" for i in range(len(outs)))
            cand = converter.has_candidates
            vs.outputs_meta = [{"name": n, "datatype": o.dtype,
                                "shape": ([-1] + list(o.shape[1:])) if cand else list(o.shape)}
                                for n, o in zip(names, outs)]
        else:
            vs.outputs_meta = [{"name": n} for n in signature.output_names]
        vs._runner = runner  # type: ignore[attr-defined]

    async def _load(self, key: tuple[str, str], path: Path, fp: tuple[int, int]) -> None:
        """Load `path` into a new VersionState; swap it in only once ready, then drain the one it replaces.
        On failure a ready old state keeps serving and carries the error."""
        vs = VersionState(key[0], key[1], path, fp)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            await loop.run_in_executor(self._load_pool, self._load_sync, vs)
        except SignatureError as exc:
            vs.state, vs.error = "FAILED", str(exc)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported for this version only
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            vs.state, vs.error = "FAILED", f"{path}: cannot load ({type(exc).__name__}: {first})"
        if vs.error:  # shown in metadata and readiness bodies: repository-relative, no absolute paths
            vs.error = vs.error.replace(f"{self.repo}{os.sep}", "")
        old = self.versions.get(key)
        if vs.state == "FAILED":
            self.metrics.load_failures.labels(*key).inc()
            if old is not None and old.ready:
                old.reload_error, old.failed_archive = vs.error, (path, fp)
                self.metrics.reload_failed.labels(*key).set(1)
                log.error("cannot load the new archive of %s/%s; the previous one (loaded %s) keeps serving: %s",
                          key[0], key[1], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(old.loaded_at)), vs.error)
                return
            self.versions[key] = vs
            self.metrics.model_ready.labels(*key).set(0)
            log.error("failed to load %s/%s: %s", key[0], key[1], vs.error)
            return
        b = self.config.batching_for(key[0])
        vs.batcher = Batcher(key, vs._runner, self._infer_pool, self.metrics,  # type: ignore[attr-defined]
                             b.max_batch_size, b.max_queue_delay_ms, b.max_batch_rows)
        vs.batcher.start()
        vs.state, vs.loaded_at = "READY", time.time()
        self.versions[key] = vs  # the swap: from here on new requests resolve to vs (no await since the lookup)
        self.metrics.loads.labels(*key).inc()
        self.metrics.model_ready.labels(*key).set(1)
        self.metrics.reload_failed.labels(*key).set(0)
        log.info("%s %s/%s (%s, %s) in %.2fs", "reloaded" if old is not None else "loaded", key[0], key[1], path.name,
                 vs.platform, time.perf_counter() - t0)
        if old is not None and old.batcher is not None:
            await old.batcher.close(self.config.drain_timeout_s)  # answers every job the old version took

    async def rescan(self, initial: bool = False) -> None:
        async with self._scan_lock:
            found = await asyncio.get_running_loop().run_in_executor(self._load_pool, self._discover)
            now_ns = time.time_ns()
            loaded = dropped = False
            for key, (path, fp) in sorted(found.items()):
                old = self.versions.get(key)
                if old is not None and old.path == path and old.fingerprint == fp:
                    if old.reload_error:  # the archive that serves is back on disk: nothing is wrong any more
                        old.reload_error = old.failed_archive = None
                        self.metrics.reload_failed.labels(*key).set(0)
                    continue
                if old is not None and old.failed_archive == (path, fp):
                    continue  # this archive already failed; the old one serves until the file changes again
                if not initial and now_ns - fp[0] < SETTLE_S * 1e9:
                    self._wake.set()  # still being written: look again shortly
                    continue
                await self._load(key, path, fp)
                loaded, dropped = True, dropped or old is not None
            for key in [k for k in self.versions if k not in found]:
                vs = self.versions.pop(key)
                dropped = True
                if vs.batcher is not None:
                    await vs.batcher.close(self.config.drain_timeout_s)
                for gauge in (self.metrics.model_ready, self.metrics.reload_failed):
                    try:
                        gauge.remove(*key)
                    except KeyError:
                        pass
                log.info("unloaded %s/%s (removed from %s)", key[0], key[1], self.repo)
            if loaded or dropped:
                settle_gc(collect=dropped)
            if initial:
                self.initial_done = True

    async def run(self, stop: asyncio.Event) -> None:
        """Initial load, then follow the repository until `stop` is set."""
        await self.rescan(initial=True)
        tasks = [asyncio.create_task(self._poll(stop))]
        if self.config.watch:
            tasks.append(asyncio.create_task(self._watch(stop)))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.rescan_interval_s)
                await asyncio.sleep(SETTLE_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.rescan()
            except Exception:  # noqa: BLE001 - keep following the repo whatever one scan hit
                log.exception("repository rescan failed")

    async def _watch(self, stop: asyncio.Event) -> None:
        from watchfiles import awatch

        try:
            async for _ in awatch(self.repo, stop_event=stop, debounce=300, recursive=True):
                self._wake.set()
        except Exception as exc:  # noqa: BLE001 - periodic rescan still covers us
            log.warning("file watching stopped (%s); relying on the periodic rescan", exc)

    async def close(self) -> None:
        """Drain every batcher (bounded by drain_timeout_s each, all at once), then stop the threads."""
        batchers = [vs.batcher for vs in self.versions.values() if vs.batcher is not None]
        await asyncio.gather(*(b.close(self.config.drain_timeout_s) for b in batchers), return_exceptions=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        self._infer_pool.shutdown(wait=False, cancel_futures=True)

