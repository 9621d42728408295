"""Run the leaf service: uvloop, torch setup, model store, aiohttp site, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import torch
from aiohttp import web

from trimmer.edge import EdgeLimits, EdgeMetrics, handler_args
from trimmer.edge import install as install_edge
from trimmer.errors import ConfigError
from trimmer.malloc import tune_for_large_bodies
from trimmer.settings import settings

from .config import LeafConfig
from .gctune import tune_gc
from .metrics import LeafMetrics
from .models import ModelStore
from .server import make_app

log = logging.getLogger("leaf")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None


async def serve(config: LeafConfig) -> None:
    assert config.repo is not None
    device = pick_device(config.device)
    metrics = LeafMetrics(config.feature_series_limit)
    store = ModelStore(config.repo, config, metrics, device)
    app = make_app(store, metrics, config)
    # shutdown_timeout bounds how long SIGTERM waits for in-flight requests (each one is answered: the
    # batchers keep running until the handlers are done, then drain).
    # handler_args: auto_decompress=False (the leaf decodes Content-Encoding itself, bounded: trimmer/compression.py)
    # and the keep-alive timeout; install_edge: header / body timeouts and the connection cap (trimmer/edge.py).
    limits = EdgeLimits(config.header_timeout_s, config.body_timeout_s, config.keepalive_timeout_s,
                        config.max_connections, config.body_min_rate)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **handler_args(limits),
                           shutdown_timeout=config.drain_timeout_s)
    await runner.setup()
    install_edge(runner, limits, EdgeMetrics("trimmer_leaf", metrics.registry), "leaf")
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    log.info("leaf listening on http://%s:%d (repo %s, device %s, torch threads %d); not ready until the initial load "
             "is done", config.host, config.port, config.repo, device, torch.get_num_threads())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    follow = asyncio.create_task(store.run(stop))
    await stop.wait()
    store.stopping = True  # readiness answers 503 from now on
    log.info("leaf stopping: finishing in-flight requests (at most %.0fs)", config.drain_timeout_s)
    await runner.shutdown()
    await runner.cleanup()  # closes the listener, waits for in-flight handlers (bounded by shutdown_timeout)
    if not follow.done():  # a load in progress (the initial pass, a reload) is abandoned, not awaited
        follow.cancel()
    await asyncio.gather(follow, return_exceptions=True)
    await store.close()  # every batcher drains (queues are empty by now) and its jobs are answered
    log.info("leaf stopped")


def main(config: LeafConfig) -> int:
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.repo is None:
        raise ConfigError("no model repository: pass --repo DIR or set repo: in the config file")
    if not config.repo.is_dir():
        if config.build_demo_if_missing:
            from .demo_models import build_demo

            build_demo(config.repo, log=log.info)
        else:
            raise ConfigError(f"{config.repo}: model repository is not a directory (build one with `trimmer leaf "
                              "build-demo --out DIR`)")
    log.info("settings: %s", settings().line())  # after the checks above, so a bad repository is one line
    tune_for_large_bodies()
    tune_gc()
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        pass
    asyncio.run(serve(config))
    return 0
