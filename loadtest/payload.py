"""Seeded, deterministic synthetic feature universes and request payloads.

The reference payload (every benchmark uses it): 2,000 features, 256
candidates; 40 % float32 candidate columns, 20 % int64 candidate-id columns,
20 % scalar context numbers, 10 % int64 history lists of length 50, 10 % short
strings; 20 % allowlisted. Candidate features are columnar: one typed tensor
per feature over all candidates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from trimmer.codec import encode_msgpack
from trimmer.signature import InputSpec, Signature
from trimmer.tensor import Tensor

KINDS = ("float_col", "id_col", "context", "history", "string")
REFERENCE_MIX: dict[str, float] = {"float_col": 0.4, "id_col": 0.2, "context": 0.2, "history": 0.1, "string": 0.1}
HISTORY_LEN = 50


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    kind: str  # one of KINDS, or "spec" for a model input built from its InputSpec
    spec: InputSpec | None = None


@dataclass
class Universe:
    features: list[FeatureSpec]
    used: frozenset[str] = field(default_factory=frozenset)  # features some target model consumes

    @property
    def usage_ratio(self) -> float:
        return len(self.used) / max(1, len(self.features))


def _split_counts(n: int, mix: Mapping[str, float]) -> dict[str, int]:
    total = sum(mix.values())
    counts = {k: int(n * v / total) for k, v in mix.items()}
    for k in sorted(mix, key=lambda k: -mix[k]):  # hand out rounding leftovers to the biggest kinds
        if sum(counts.values()) >= n:
            break
        counts[k] += 1
    return counts


def reference_universe(n_features: int = 2000, mix: Mapping[str, float] = REFERENCE_MIX, allow_ratio: float = 0.2, seed: int = 0) -> tuple[Universe, frozenset[str]]:
    """The reference universe and an allowlist of `allow_ratio` of it, drawn evenly across kinds."""
    rng = random.Random(seed)
    features: list[FeatureSpec] = []
    for kind, count in _split_counts(n_features, mix).items():
        features.extend(FeatureSpec(f"{kind}_{i:04d}", kind) for i in range(count))
    rng.shuffle(features)
    allow = frozenset(f.name for f in rng.sample(features, round(n_features * allow_ratio)))
    return Universe(features, allow), allow


def universe_for_models(
    signatures: Iterable[Signature], usage_ratio: float = 0.2, mix: Mapping[str, float] = REFERENCE_MIX, seed: int = 0
) -> Universe:
    """Every input the target models read, plus unused features until used/total == usage_ratio."""
    if not 0 < usage_ratio <= 1:
        raise ValueError("usage_ratio must be in (0, 1]")
    used: dict[str, InputSpec | None] = {}
    for sig in signatures:
        for name in sig.input_names:
            used.setdefault(name, sig.inputs.get(name))
    features = [FeatureSpec(name, "spec", spec) for name, spec in used.items()]
    n_unused = round(len(used) / usage_ratio) - len(used)
    counts = _split_counts(n_unused, mix)
    for kind, count in counts.items():
        features.extend(FeatureSpec(f"unused_{kind}_{i:04d}", kind) for i in range(count))
    random.Random(seed).shuffle(features)
    return Universe(features, frozenset(used))


_NP_DTYPE = {"bool": np.bool_, "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
             "float16": np.float16, "float32": np.float32, "float64": np.float64}


def _from_spec(spec: InputSpec | None, candidates: int, rng: np.random.Generator) -> Any:
    if spec is None or spec.dtype is None or spec.shape is None:
        return float(rng.standard_normal())
    shape = tuple(candidates if d == -1 else d for d in spec.shape)
    dtype = _NP_DTYPE.get(spec.dtype, np.float32)
    if np.issubdtype(dtype, np.floating):
        arr = rng.standard_normal(shape).astype(dtype)
    elif dtype is np.bool_:
        arr = rng.integers(0, 2, shape).astype(np.bool_)
    else:
        high = 1000 if spec.dtype in ("int32", "int64") else 100
        arr = rng.integers(0, high, shape).astype(dtype)
    return Tensor.from_numpy(arr)


def feature_value(f: FeatureSpec, candidates: int, rng: np.random.Generator) -> Any:
    if f.kind == "spec":
        return _from_spec(f.spec, candidates, rng)
    if f.kind == "float_col":
        return Tensor.from_numpy(rng.standard_normal(candidates).astype(np.float32))
    if f.kind == "id_col":
        return Tensor.from_numpy(rng.integers(0, 2**62, candidates, dtype=np.int64))
    if f.kind == "context":
        return float(rng.standard_normal()) if rng.random() < 0.5 else int(rng.integers(0, 2**31))
    if f.kind == "history":
        return [int(x) for x in rng.integers(0, 2**62, HISTORY_LEN, dtype=np.int64)]
    if f.kind == "string":
        return "".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(rng.integers(4, 16))))
    raise ValueError(f"unknown feature kind {f.kind!r}")


def make_features(universe: Universe, candidates: int = 256, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {f.name: feature_value(f, candidates, rng) for f in universe.features}


def make_request(universe: Universe, candidates: int = 256, seed: int = 0, **extra: Any) -> dict[str, Any]:
    return {"request_id": f"req-{seed}", **extra, "features": make_features(universe, candidates, seed)}


def reference_payload(seed: int = 0, n_features: int = 2000, candidates: int = 256) -> tuple[bytes, frozenset[str]]:
    """(msgpack body, allowlist) of the reference payload."""
    universe, allow = reference_universe(n_features, seed=seed)
    return encode_msgpack(make_request(universe, candidates, seed)), allow
