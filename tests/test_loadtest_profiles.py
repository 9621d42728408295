"""The load test's value profiles: `random` (incompressible) and `realistic` (the demo's default)."""

from __future__ import annotations

import lz4.frame
import numpy as np
import pytest
import zstandard

from loadtest.config import parse_loadtest_config
from loadtest.payload import make_request, reference_universe, universe_for_models
from trimmer.codec import encode_msgpack
from trimmer.errors import ConfigError
from trimmer.signature import InputSpec, Signature
from trimmer.tensor import Tensor


def _saved(compressed: bytes, raw: bytes) -> float:
    return 1 - len(compressed) / len(raw)


def test_same_features_and_shapes_in_both_profiles() -> None:
    u, _ = reference_universe(400, seed=1)
    a = make_request(u, 64, seed=3, profile="random")["features"]
    b = make_request(u, 64, seed=3, profile="realistic")["features"]
    assert list(a) == list(b)
    kinds = {spec.name: spec.kind for spec in u.features}
    for k in a:
        if kinds[k] == "context":  # a scalar, int or float in either profile
            assert isinstance(b[k], (int, float))
            continue
        assert type(a[k]) is type(b[k]), k
        if isinstance(a[k], Tensor):
            assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        if isinstance(a[k], list):
            assert len(a[k]) == len(b[k])
    assert encode_msgpack(make_request(u, 64, seed=3, profile="realistic")) == encode_msgpack(
        make_request(u, 64, seed=3, profile="realistic"))


def test_realistic_values_compress_random_ones_do_not() -> None:
    u, _ = reference_universe(1000, seed=0)
    rnd = encode_msgpack(make_request(u, 256, seed=0, profile="random"))
    real = encode_msgpack(make_request(u, 256, seed=0, profile="realistic"))
    assert _saved(lz4.frame.compress(rnd), rnd) < 0.05
    assert _saved(lz4.frame.compress(real), real) > 0.10
    z = zstandard.ZstdCompressor(level=1)
    assert _saved(z.compress(real), real) > _saved(lz4.frame.compress(real), real)


def test_realistic_distributions() -> None:
    u, _ = reference_universe(600, seed=2)
    f = make_request(u, 256, seed=5, profile="realistic")["features"]
    kinds = {spec.name: spec.kind for spec in u.features}
    floats = [f[n].to_numpy() for n, k in kinds.items() if k == "float_col"]
    zero_share = sorted(float(np.mean(a == 0)) for a in floats)
    assert zero_share[-1] > 0.5  # sparse, zero-heavy columns exist
    quantised = [a for a in floats if np.all(a * 256 == np.round(a * 256))]
    assert len(quantised) >= len(floats) // 2
    for n, k in kinds.items():
        if k == "id_col":
            ids = f[n].to_numpy()
            assert len(np.unique(ids)) == len(ids)  # distinct candidates within a request
    strings = {f[n] for n, k in kinds.items() if k == "string"}
    assert len(strings) <= 16  # a short vocabulary


def test_model_inputs_stay_valid_for_embeddings() -> None:
    sig = Signature(("item", "price"), ("y",),
                    {"item": InputSpec("int64", (-1,)), "price": InputSpec("float32", (-1,))})
    u = universe_for_models([sig], usage_ratio=0.5, seed=0)
    for seed in range(5):
        f = make_request(u, 128, seed=seed, profile="realistic")["features"]
        ids = f["item"].to_numpy()
        assert ids.min() >= 0 and ids.max() < 1000  # the same bound the random profile uses for int inputs


def test_profile_in_loadtest_config(tmp_path) -> None:
    base = {"models": [{"name": "ranker"}], "out": str(tmp_path)}
    assert parse_loadtest_config(base, "x.yaml", tmp_path).payload.profile == "random"
    assert parse_loadtest_config(
        {**base, "payload": {"profile": "realistic"}}, "x.yaml", tmp_path).payload.profile == "realistic"
    with pytest.raises(ConfigError, match="payload.profile"):
        parse_loadtest_config({**base, "payload": {"profile": "lifelike"}}, "x.yaml", tmp_path)
    with pytest.raises(ValueError):
        make_request(reference_universe(10)[0], 4, profile="lifelike")
