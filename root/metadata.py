"""Allowlists from an upstream's own Open Inference Protocol metadata (`GET /v2/models/{name}`).

For models served without an archive we can read (Triton, KServe, MLServer),
the upstream's declared `inputs` are the allowlist. Fetched at start and
refreshed periodically; a failed fetch keeps the last good data (registry
semantics) and a model never fetched is forwarded untrimmed (fail open).
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import msgspec

from trimmer.errors import DECODE_FAILURES
from trimmer.registry import Source, SourceData
from trimmer.signature import Signature

from .config import PartitionConfig
from .upstream import Partition, UpstreamError

log = logging.getLogger("trimmer.root.metadata")
MAX_VERSIONS = 32


class _Tensor(msgspec.Struct):
    name: str


class _ModelMetadata(msgspec.Struct):
    name: str = ""
    versions: list[str] = []
    inputs: list[_Tensor] = []
    outputs: list[_Tensor] = []


_decode = msgspec.json.Decoder(_ModelMetadata)


class MetadataSource(Source):
    """A registry source whose data is pushed by `refresh()`; it carries default versions too."""

    kind = "oip_metadata"

    def __init__(self, partition: Partition, models: tuple[str, ...], default_versions: dict[str, str | None]) -> None:
        super().__init__(f"oip-metadata:{partition.name}")
        self.partition = partition
        self.models = models
        self.default_versions = default_versions
        self._data: SourceData | None = None
        self.last_error: str | None = None

    def load(self) -> SourceData:
        from trimmer.errors import BundleError

        if self._data is None:
            raise BundleError(self.last_error or "metadata not fetched yet")
        return self._data

    async def _get(self, path: str, timeout_s: float) -> _ModelMetadata:
        resp = await self.partition.request("GET", path, None, {"Accept": "application/json"}, timeout_s)
        if resp.status != 200:
            raise UpstreamError(resp.status, "metadata", f"GET {path} answered {resp.status}")
        try:
            return _decode.decode(resp.body)
        except DECODE_FAILURES as exc:
            raise UpstreamError(502, "metadata", f"GET {path}: not OIP model metadata ({exc})") from None

    async def fetch(self, timeout_s: float = 5.0) -> SourceData:
        signatures: dict[tuple[str, str], Signature] = {}
        defaults: dict[str, str] = {}
        errors: dict[tuple[str, str], str] = {}
        unversioned: dict[str, Signature] = {}
        for model in self.models:
            try:
                meta = await self._get(f"/v2/models/{model}", timeout_s)
                versions = [str(v) for v in meta.versions][:MAX_VERSIONS]
                if not versions:
                    # Served without versions (MLServer answers `"versions": []` and 404s versioned paths):
                    # one model-wide allowlist, and request paths stay unversioned.
                    names = tuple(dict.fromkeys(t.name for t in meta.inputs))
                    if not names:
                        errors[(model, "?")] = "upstream metadata declares no inputs"
                    else:
                        unversioned[model] = Signature(names, tuple(t.name for t in meta.outputs) or ("output",))
                    continue
                for v in versions:
                    vm = meta if len(versions) == 1 else await self._get(f"/v2/models/{model}/versions/{v}", timeout_s)
                    names = tuple(dict.fromkeys(t.name for t in vm.inputs))
                    if not names:
                        errors[(model, v)] = "upstream metadata declares no inputs"
                        continue
                    signatures[(model, v)] = Signature(names, tuple(t.name for t in vm.outputs) or ("output",))
                if len(versions) == 1:
                    defaults[model] = versions[0]
            except (UpstreamError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors[(model, "?")] = str(exc)
        return SourceData(signatures, defaults, errors, unversioned)

    async def refresh(self, timeout_s: float = 5.0) -> bool:
        """Fetch and store; True when something was fetched (the caller then reloads the registry)."""
        data = await self.fetch(timeout_s)
        if not data.signatures and not data.unversioned and data.errors:
            self.last_error = "; ".join(f"{m}: {e}" for (m, _), e in sorted(data.errors.items()))
            log.warning("allowlists from %s: %s", self.name, self.last_error)
            if self._data is None:
                return False
            # Keep last good for everything; report the failure through the registry.
            data = SourceData(dict(self._data.signatures), dict(self._data.default_versions), data.errors,
                              dict(self._data.unversioned))
        elif self._data is not None and data.errors:
            failed = {m for m, _ in data.errors}  # last good per model that failed this round
            for key, sig in self._data.signatures.items():
                if key[0] in failed:
                    data.signatures.setdefault(key, sig)
            for model, sig in self._data.unversioned.items():
                if model in failed:
                    data.unversioned.setdefault(model, sig)
        self._data = data
        return True


def metadata_sources(partitions: dict[str, Partition], configs: dict[str, PartitionConfig],
                     default_versions: dict[str, str | None]) -> list[MetadataSource]:
    return [MetadataSource(partitions[name], pc.metadata.models, default_versions)
            for name, pc in configs.items() if pc.metadata is not None]


__all__ = ["MetadataSource", "metadata_sources"]
