"""Real TorchScript / torch.export archives for tests (torch is a dev dependency, never a trimmer one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _module(n_inputs: int):
    import torch

    class Sum(torch.nn.Module):
        """Adds its inputs: small, scriptable and exportable."""

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    return Sum()


def save_archive(path: Path, info: dict[str, Any] | str, fmt: str = "pt") -> Path:
    """Save a tiny real model with module_info.json as .pt (TorchScript) or .pt2 (torch.export)."""
    import torch

    text = info if isinstance(info, str) else json.dumps(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _module(2)
    if fmt == "pt":
        torch.jit.save(torch.jit.script(module), str(path), _extra_files={"module_info.json": text})
    else:
        ep = torch.export.export(module, (torch.zeros(2), torch.zeros(2)))
        torch.export.save(ep, str(path), extra_files={"module_info.json": text})
    return path


def make_repo(root: Path, models: dict[str, dict[str, list[str]]], fmt: str = "pt") -> Path:
    """models: name -> version -> input names. Writes <root>/<name>/<version>/model.<fmt>."""
    for name, versions in models.items():
        for version, inputs in versions.items():
            save_archive(root / name / version / f"model.{fmt}",
                         {"input_names": inputs, "output_names": ["score"]}, fmt)
    return root
