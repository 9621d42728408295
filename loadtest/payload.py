"""Seeded, deterministic synthetic feature universes and request payloads.

The reference payload (every benchmark uses it): 2,000 features, 256
candidates; 40 % float32 candidate columns, 20 % int64 candidate-id columns,
20 % scalar context numbers, 10 % int64 history lists of length 50, 10 % short
strings; 20 % allowlisted. Candidate features are columnar: one typed tensor
per feature over all candidates.

Two value profiles (the same features, the same sizes; only the values differ):
- `random`: uniform random bits (standard normal floats, ids over 2**62, random
  strings). Nearly incompressible: the worst case for lz4 / zstd, so it
  isolates what trimming alone saves. The benchmarks' reference payload.
- `realistic`: value distributions production features have, which is what
  general-purpose compression feeds on. Float columns: a third quantised to a
  few hundred levels (bucketised or rounded features), a third sparse and
  zero-heavy (90 % zeros), a third full-precision (model scores, embedding
  coordinates). Candidate id columns hold distinct ids: a third catalogue ids
  (below 1M), two thirds hashed 64-bit ids. Context ids, history lists and
  strings repeat Zipf-like over small vocabularies (countries, categories). The demo's default, so lz4 and
  zstd are compared with trimming on data where they have something to find.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from trimmer.codec import encode_msgpack
from trimmer.signature import InputSpec, Signature
from trimmer.tensor import Tensor

KINDS = ("float_col", "id_col", "context", "history", "string")
PROFILES = ("realistic", "random")
_VOCAB = ("US", "DE", "FR", "GB", "JP", "BR", "IN", "CA", "shoes", "books", "toys", "music", "garden",
          "sports", "beauty", "games")
_CATALOGUE = 1_000_000  # id space for realistic id columns (Zipf-like popularity)


@functools.cache
def _hashed() -> np.ndarray:
    """Catalogue id -> a fixed random-looking 64-bit id (built once, on first use)."""
    return np.random.default_rng(12345).integers(0, 2**62, _CATALOGUE, dtype=np.int64)
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


def reference_universe(n_features: int = 2000, mix: Mapping[str, float] = REFERENCE_MIX,
                       allow_ratio: float = 0.2, seed: int = 0) -> tuple[Universe, frozenset[str]]:
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


_NP_DTYPE = {"bool": np.bool_, "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32,
             "int64": np.int64, "float16": np.float16, "float32": np.float32, "float64": np.float64}


def _zipf_ids(rng: np.random.Generator, n: int | tuple[int, ...], high: int) -> np.ndarray:
    """Ids in [0, high) with Zipf-like popularity: a few popular ids repeat, a long tail does not."""
    return (rng.zipf(1.3, n) - 1) % high


def _quantised(rng: np.random.Generator, shape: Any, dtype: Any, sparse: bool = False) -> np.ndarray:
    """Floats on a grid of 1/256 in [-4, 4] (2,049 levels, e.g. rounded features); sparse: 75 % exact zeros."""
    arr = np.clip(np.round(rng.standard_normal(shape) * 256) / 256, -4, 4)
    if sparse:
        arr = np.where(rng.random(shape) < 0.75, 0.0, np.abs(arr))
    return arr.astype(dtype)


def _from_spec(spec: InputSpec | None, candidates: int, rng: np.random.Generator, profile: str = "random") -> Any:
    if spec is None or spec.dtype is None or spec.shape is None:
        return float(rng.standard_normal()) if profile == "random" else float(np.round(rng.standard_normal() * 64) / 64)
    shape = tuple(candidates if d == -1 else d for d in spec.shape)
    dtype = _NP_DTYPE.get(spec.dtype, np.float32)
    if np.issubdtype(dtype, np.floating):
        arr = rng.standard_normal(shape).astype(dtype) if profile == "random" else _quantised(rng, shape, dtype)
    elif dtype is np.bool_:
        arr = rng.integers(0, 2, shape).astype(np.bool_)
    else:
        high = 1000 if spec.dtype in ("int32", "int64") else 100
        arr = (rng.integers(0, high, shape) if profile == "random" else _zipf_ids(rng, shape, high)).astype(dtype)
    return Tensor.from_numpy(arr)


def feature_value(f: FeatureSpec, candidates: int, rng: np.random.Generator, profile: str = "random") -> Any:
    if profile not in PROFILES:
        raise ValueError(f"unknown payload profile {profile!r}; known: {', '.join(PROFILES)}")
    if f.kind == "spec":
        return _from_spec(f.spec, candidates, rng, profile)
    if profile == "realistic":
        return _realistic_value(f, candidates, rng)
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


def _realistic_value(f: FeatureSpec, candidates: int, rng: np.random.Generator) -> Any:
    # A stable per-feature character (from the name), so a feature keeps it across requests.
    style = sum(f.name.encode()) % 3
    if f.kind == "float_col":
        if style == 2:  # a dense model score or embedding coordinate: full float32 precision
            return Tensor.from_numpy(rng.standard_normal(candidates).astype(np.float32))
        return Tensor.from_numpy(_quantised(rng, candidates, np.float32, sparse=style == 0))
    if f.kind == "id_col":
        # Candidates are distinct within a request. A third are catalogue ids (< 1M: five zero bytes each),
        # the rest hashed 64-bit ids (8 random-looking bytes each).
        ids = rng.choice(_CATALOGUE, candidates, replace=candidates > _CATALOGUE)
        if style != 0:
            ids = _hashed()[ids]
        return Tensor.from_numpy(ids.astype(np.int64))
    if f.kind == "context":
        return float(np.round(rng.standard_normal() * 64) / 64) if rng.random() < 0.5 else int(
            _zipf_ids(rng, 1, 10_000)[0])
    if f.kind == "history":
        return [int(x) for x in _zipf_ids(rng, HISTORY_LEN, 50_000)]
    if f.kind == "string":
        return _VOCAB[int(_zipf_ids(rng, 1, len(_VOCAB))[0])]
    raise ValueError(f"unknown feature kind {f.kind!r}")


def make_features(universe: Universe, candidates: int = 256, seed: int = 0, profile: str = "random") -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {f.name: feature_value(f, candidates, rng, profile) for f in universe.features}


def make_request(universe: Universe, candidates: int = 256, seed: int = 0, *,
                 profile: str = "random", **extra: Any) -> dict[str, Any]:
    return {"request_id": f"req-{seed}", **extra, "features": make_features(universe, candidates, seed, profile)}


def reference_payload(seed: int = 0, n_features: int = 2000, candidates: int = 256) -> tuple[bytes, frozenset[str]]:
    """(msgpack body, allowlist) of the reference payload."""
    universe, allow = reference_universe(n_features, seed=seed)
    return encode_msgpack(make_request(universe, candidates, seed)), allow
