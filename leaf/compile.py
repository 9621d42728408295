"""Optional torch.compile of a loaded model (`compile: true` per model in the leaf config, docs/leaf.md).

Why a separate step with its own warm-up: torch.compile compiles lazily, on the first call, and on CPU
inductor runs the system C++ compiler; that takes seconds to tens of seconds, which must not land on the
first requests. So the loader compiles here, in its load thread, and runs the compiled module on warm-up
inputs of two different sizes (so the dynamic-shape graph is the one that gets built) before the version is
marked ready. The warm-up also compares the compiled outputs with the eager ones; anything wrong (compile
error, a TorchScript module, which torch.compile does not take, a mismatch beyond the tolerance) serves the
eager module instead, with one log line saying why. Compiling never changes an answer beyond float noise.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("leaf.compile")

# compiled vs eager at warm-up: inductor may fuse and reorder float ops, nothing more
RTOL = 1e-4
ATOL = 1e-5
WARMUP_ROWS = (2, 37)  # two sizes: the first call already compiles for a dynamic row/candidate dimension


def _outputs(raw: Any) -> list[torch.Tensor]:
    return list(raw) if isinstance(raw, (tuple, list)) else [raw]


def _mismatch(got: Sequence[Any], want: Sequence[Any]) -> str | None:
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if not isinstance(g, torch.Tensor) or not isinstance(w, torch.Tensor):
            continue
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"output {i}: {g.dtype}{list(g.shape)} instead of {w.dtype}{list(w.shape)}"
        if w.is_floating_point():
            if not torch.allclose(g, w, rtol=RTOL, atol=ATOL, equal_nan=True):
                return f"output {i}: max abs difference {float((g - w).abs().max()):.3g} over rtol {RTOL}, atol {ATOL}"
        elif not torch.equal(g, w):
            return f"output {i}: values differ"
    return None


def compile_module(module: Callable[..., Any], examples: Sequence[Sequence[torch.Tensor]], name: str = "model",
                   ) -> tuple[Callable[..., Any], dict[str, Any]]:
    """(compiled or eager module, info). info: compiled (bool), seconds, reason when not compiled."""
    t0 = time.perf_counter()
    if isinstance(module, torch.jit.ScriptModule):
        return module, {"compiled": False,
                        "reason": "torch.compile does not take TorchScript modules (serve the .pt2 to compile)"}
    try:
        compiled = torch.compile(module, dynamic=True)
        with torch.inference_mode():
            for args in examples:
                want = _outputs(module(*args))
                got = _outputs(compiled(*args))
                bad = _mismatch(got, want)
                if bad is not None:
                    return module, {"compiled": False, "reason": f"compiled outputs differ from eager: {bad}",
                                    "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as exc:  # noqa: BLE001 - any compile failure falls back to eager
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        return module, {"compiled": False, "reason": f"{type(exc).__name__}: {first[:300]}",
                        "seconds": round(time.perf_counter() - t0, 2)}
    return compiled, {"compiled": True, "seconds": round(time.perf_counter() - t0, 2)}


def warmup_inputs(converter: Any, device: torch.device) -> list[list[torch.Tensor]]:
    """Zeros in the declared dtypes and the model's calling convention, at WARMUP_ROWS rows / candidates:
    a leading row axis on every input for batched models; per-request shapes for the others."""
    examples = []
    for rows in WARMUP_ROWS:
        args = []
        for plan in converter.plans:
            shape = [rows if d == -1 else d for d in plan.spec.shape]
            if converter.batchable and plan.cand_axis is None:
                shape = [rows] + shape
            args.append(torch.zeros(shape, dtype=plan.torch_dtype, device=device))
        examples.append(args)
    return examples


def maybe_compile(module: Any, converter: Any, enabled: bool, name: str, device: torch.device) -> Any:
    """The loader's hook: the module to serve. Compiles and warms up when enabled; falls back with a log line."""
    if not enabled:
        return module
    if not converter.typed:
        log.warning("compile: %s: serving eager (its signature lacks dtype/shape for some input, so there is "
                    "nothing to warm it up with)", name)
        return module
    served, info = compile_module(module, warmup_inputs(converter, device), name)
    if info["compiled"]:
        log.info("compile: %s compiled with torch.compile (inductor) and warmed up in %.1f s", name, info["seconds"])
    else:
        log.warning("compile: %s: serving eager: %s", name, info["reason"])
    return served
