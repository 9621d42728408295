"""SSD slate diversification (leaf/diversify.py) and the demo `diversifier` model.

Oracles are plain numpy written from the definitions, not from the module: the relevance-only top-k is an
argsort; intra-list distance is the mean pairwise cosine distance; the SSD oracle re-derives every step
from scratch (each candidate's residual against the window's Gram-Schmidt basis, candidate by candidate);
the DPP oracle picks by brute-force log-determinants.
"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
import torch

from leaf import demo_models as dm
from leaf.diversify import EPS, SSD, dpp_greedy
from loadtest.procs import free_port, start
from trimmer.codec import decode_msgpack, encode_msgpack
from trimmer.tensor import Tensor

K, W, GAMMA = 50, dm.SLATE_WINDOW, dm.SLATE_GAMMA  # the algorithm at the bench's k; the demo model's k below
RELEVANCE_KEPT = 0.9  # SSD keeps at least this share of the relevance-only top-k's total relevance (seeded catalogue)


def clustered_catalogue(n: int, n_clusters: int = 12, d: int = 16, seed: int = 7, spread: float = 0.1):
    """Candidates around cluster centres; a few clusters are much more relevant, so top-k by relevance alone
    fills the slate from them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster = rng.integers(0, n_clusters, n)
    emb = centres[cluster] + spread * rng.standard_normal((n, d))
    base = np.linspace(1.0, 0.5, n_clusters)
    rel = base[cluster] + 0.1 * rng.random(n)
    return emb.astype(np.float32), rel.astype(np.float32), cluster.astype(np.int64)


def ild(emb: np.ndarray, slate: np.ndarray) -> float:
    x = emb[slate] / np.linalg.norm(emb[slate], axis=1, keepdims=True)
    sim = x @ x.T
    iu = np.triu_indices(len(slate), 1)
    return float(np.mean(1.0 - sim[iu]))


def ssd_oracle(emb, rel, cat, k, w, gamma, cw=0.5, buckets=64):
    """SSD from the definition, float64, one candidate at a time: residual of each candidate against the
    orthonormal basis of the last w picks (each pick's basis vector = its normalised residual at pick time)."""
    x = emb.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    onehot = np.zeros((len(x), buckets))
    for i, c in enumerate(cat):
        if c >= 0:
            onehot[i, c % buckets] = cw
    x = np.concatenate([x, onehot], axis=1)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    basis: list[np.ndarray] = []
    picks: list[int] = []
    scores: list[float] = []

    def residual(v, window):
        for q in window:
            v = v - (v @ q) * q
        return v

    for _ in range(min(k, len(x))):
        window = basis[-w:]
        best, best_i = -np.inf, -1
        for i in range(len(x)):
            if i in picks:
                continue
            s = rel[i] + gamma * np.linalg.norm(residual(x[i], window))
            if s > best:
                best, best_i = s, i
        picks.append(best_i)
        scores.append(best)
        r = residual(x[best_i], window)
        nr = np.linalg.norm(r)
        basis.append(r / nr if nr > EPS else np.zeros_like(r))
    return np.array(picks), np.array(scores)


def run_ssd(emb, rel, cat, k=K, w=W, gamma=GAMMA):
    slate, scores = SSD(k=k, window=w, gamma=gamma)(torch.from_numpy(emb), torch.from_numpy(rel), torch.from_numpy(cat))
    return slate.numpy(), scores.numpy()


def test_ssd_returns_k_distinct_valid_indices():
    emb, rel, cat = clustered_catalogue(256)
    slate, scores = run_ssd(emb, rel, cat)
    assert slate.shape == (K,) and scores.shape == (K,)
    assert len(set(slate.tolist())) == K and slate.min() >= 0 and slate.max() < 256
    assert np.isfinite(scores).all()


def test_ssd_pads_when_fewer_candidates_than_k():
    emb, rel, cat = clustered_catalogue(7)
    slate, scores = run_ssd(emb, rel, cat)
    assert sorted(slate[:7].tolist()) == list(range(7))
    assert (slate[7:] == -1).all() and (scores[7:] == dm.MISSING_SCORE).all()


@pytest.mark.parametrize("with_categories", [False, True])
def test_ssd_matches_the_definition(with_categories):
    emb, rel, cat = clustered_catalogue(120, seed=3)
    if not with_categories:
        cat = np.full_like(cat, -1)
    slate, scores = run_ssd(emb, rel, cat, k=30, w=5)
    want, want_scores = ssd_oracle(emb, rel, cat, 30, 5, GAMMA)
    assert slate.tolist() == want.tolist()
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)


def test_ssd_beats_relevance_topk_on_intra_list_distance_and_keeps_relevance():
    emb, rel, cat = clustered_catalogue(256)
    topk = np.argsort(-rel, kind="stable")[:K]
    slate, _ = run_ssd(emb, rel, np.full_like(cat, -1))  # embeddings only: categories are not a hint here
    assert ild(emb, slate) > ild(emb, topk) + 0.15, (ild(emb, slate), ild(emb, topk))
    assert len(set(cat[slate])) > len(set(cat[topk]))
    kept = rel[slate].sum() / rel[topk].sum()
    assert RELEVANCE_KEPT <= kept <= 1.0, kept


def test_ssd_with_gamma_zero_is_the_relevance_topk():
    emb, rel, cat = clustered_catalogue(256)
    slate, _ = run_ssd(emb, rel, cat, gamma=0.0)
    assert slate.tolist() == np.argsort(-rel, kind="stable")[:K].tolist()


def test_ssd_survives_near_duplicates_and_bad_values():
    emb, rel, cat = clustered_catalogue(40)
    dup = np.repeat(emb[:4], 50, axis=0) + 1e-7 * np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    rel2 = np.concatenate([rel[:4].repeat(50), rel[4:]]).astype(np.float32)
    emb2 = np.concatenate([dup, emb[4:]]).astype(np.float32)
    rel2[5] = np.nan
    emb2[7] = np.nan
    slate, scores = run_ssd(emb2, rel2, np.full(len(rel2), -1, dtype=np.int64))
    assert len(set(slate.tolist())) == K and (slate >= 0).all() and np.isfinite(scores).all()
    assert 5 not in slate[:40].tolist()  # NaN relevance ranks last


def dpp_oracle(emb, rel, k, alpha):
    """Greedy MAP by brute force: add the item that maximises log det L_Y."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = np.exp(alpha * rel.astype(np.float64))
    L = q[:, None] * (1 + x @ x.T) / 2 * q[None, :]
    picks: list[int] = []
    for _ in range(k):
        best, best_i = -np.inf, -1
        for i in range(len(x)):
            if i in picks:
                continue
            sign, logdet = np.linalg.slogdet(L[np.ix_(picks + [i], picks + [i])])
            if sign > 0 and logdet > best:
                best, best_i = logdet, i
        picks.append(best_i)
    return picks


def test_dpp_baseline_matches_brute_force_greedy():
    emb, rel, _ = clustered_catalogue(24, d=16, seed=11)
    picks, had_nan = dpp_greedy(torch.from_numpy(emb), torch.from_numpy(rel), 8, alpha=2.0, dtype=torch.float64)
    assert not had_nan
    assert picks.tolist() == dpp_oracle(emb.astype(np.float64), rel, 8, 2.0)


def test_ssd_scripts_and_exports_to_the_same_answers():
    emb, rel, cat = clustered_catalogue(150, seed=5)
    args = (torch.from_numpy(emb), torch.from_numpy(rel), torch.from_numpy(cat))
    model = dm.make_diversifier().eval()
    want = model(*args)
    scripted = torch.jit.script(model)(*args)
    dim = torch.export.Dim("c", min=1, max=4096)
    exported = torch.export.export(model, args, dynamic_shapes=tuple({0: dim} for _ in args)).module()(*args)
    for got in (scripted, exported):
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


# ---------------------------------------------------------------------- through a real leaf
@pytest.fixture(scope="module")
def leaf(tmp_path_factory):
    repo = tmp_path_factory.mktemp("divrepo") / "repo"
    with torch.no_grad():
        dm._save(dm.make_diversifier(), dm.DIVERSIFIER_INPUTS, dm.DIVERSIFIER_OUTPUTS, repo, "diversifier", rows=97,
                 batching="request")
    port = free_port()
    # a long queue delay: were the leaf to batch this model, concurrent requests would share a call
    proc = start("leaf-div", ["leaf", "--repo", str(repo), "--port", str(port), "--max-queue-delay-ms", "50",
                              "--torch-threads", "1"], port, "/v2/health/ready", tmp_path_factory.mktemp("logs"))
    yield proc.url
    proc.stop()


def features(emb, rel, cat=None) -> dict:
    f = {"cand_emb": Tensor.from_numpy(emb), "cand_score": Tensor.from_numpy(rel), "unused_ctx": 3}
    if cat is not None:
        f["cand_category"] = Tensor.from_numpy(cat)
    return f


async def _score(session, url, version, feats):
    async with session.post(f"{url}/v1/models/diversifier/versions/{version}/score",
                            data=encode_msgpack({"features": feats}),
                            headers={"Content-Type": "application/msgpack"}) as resp:
        body = await resp.read()
        assert resp.status == 200, body
        return {k: v.to_numpy() for k, v in decode_msgpack(body)["outputs"].items()}


async def test_pt_and_pt2_agree_through_the_leaf_and_requests_are_never_mixed(leaf):
    cases = [clustered_catalogue(n, seed=s) for n, s in ((256, 1), (90, 2), (300, 3), (33, 4), (256, 5), (64, 6))]
    async with aiohttp.ClientSession() as session:
        for version in ("1", "2"):
            # concurrent requests with different candidate counts: each must get its own slate
            outs = await asyncio.gather(*(_score(session, leaf, version, features(*c)) for c in cases))
            for (emb, rel, cat), out in zip(cases, outs):
                want, want_scores = run_ssd(emb, rel, cat, k=dm.SLATE_K)
                assert out["slate"].tolist() == want.tolist()
                np.testing.assert_allclose(out["slate_scores"], want_scores, rtol=1e-5)
        # the category input is optional (default -1 = none)
        emb, rel, cat = cases[0]
        out1, out2 = await asyncio.gather(*(_score(session, leaf, v, features(emb, rel)) for v in ("1", "2")))
    assert out1["slate"].tolist() == out2["slate"].tolist() == run_ssd(
        emb, rel, np.full_like(cat, -1), k=dm.SLATE_K)[0].tolist()
    np.testing.assert_allclose(out1["slate_scores"], out2["slate_scores"], rtol=1e-6)


async def test_bad_diversifier_input_is_a_400_naming_the_feature(leaf):
    emb, rel, cat = clustered_catalogue(20)
    async with aiohttp.ClientSession() as session:
        for feats, needle in (({"cand_emb": Tensor.from_numpy(emb)}, "cand_score"),
                              (features(emb, rel[:10]), "disagree"),
                              (features(emb[:, :8].copy(), rel), "cand_emb")):
            async with session.post(f"{leaf}/v1/models/diversifier/score", data=encode_msgpack({"features": feats}),
                                    headers={"Content-Type": "application/msgpack"}) as resp:
                body = await resp.json()
                assert resp.status == 400 and needle in body["error"], body

