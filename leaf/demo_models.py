"""Real demo models for the leaf: an index-as-model retrieval and a multi-task ranker.

Both read from ONE synthetic feature universe (FEATURE_UNIVERSE), each a different subset, so trimming
matters per model. Both follow the leaf's batched calling convention (docs/leaf.md): every input gets a
leading row axis; per-candidate inputs are concatenated over requests, per-request inputs repeated per row.

retrieval (SilverTorch style, the index is part of the module):
  user tower: EmbeddingBag(mean) over `user_recent_items` + MLP over `user_dense` -> unit user embedding;
  index buffers: int8 item codes with per-row scales laid out per IVF cluster (padded to a static size),
  IVF centroids, 64-bit Bloom signatures of each item's eligibility attributes (countries, languages,
  content class); probe the top NPROBE clusters, Bloom test (item_bits & query_bits) == query_bits,
  int8-dequantised scoring, top-K item ids and scores. All shapes static except the row axis.
ranker: per-candidate columns + user features -> T task logits -> value = sum_t w_t * sigmoid(logit_t).
item_features: feature hydration as a model: catalogue tables looked up by `cand_item_id` -> the candidate
  features the ranker and the diversifier read (lets the root chain retrieval -> ranker -> diversifier).
diversifier: SSD slate selection (leaf/diversify.py) over one request's candidates (embeddings, relevance,
  optional category) -> the ordered slate's indices [k] and adjusted scores. It needs all of a request's
  candidates together, so its signature says `batching: request` (one request per call) and its inputs
  have per-request shapes (candidate axis first, no extra row axis).

Weights get meaning from a short seeded training on synthetic interactions (a few seconds on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- sizes
N_ITEMS = 100_000
DIM = 32
NLIST = 256
NPROBE = 24
TOP_K = 20
HISTORY = 20
USER_DENSE = 16
N_COUNTRIES = 8
N_LANGUAGES = 6
N_CLASSES = 4
BLOOM_HASHES = 3
BLOOM_WORDS = 4  # 256-bit signatures: false-positive rate ~1e-3 per missing attribute
N_TASKS = 3
TASK_NAMES = ("click", "like", "share")
TASK_WEIGHTS = (1.0, 2.0, 4.0)
CAND_EMB = 16
ID_BUCKETS = 10007
MISSING_SCORE = -1.0e30
SEED = 1234
SLATE_K = 10  # the demo pipeline's retrieval returns TOP_K = 20 candidates; the bench uses k = 50
SLATE_WINDOW = 8
SLATE_GAMMA = 0.5

# ---------------------------------------------------------------- the feature universe
# name -> (spec, description); a spec's shape -1 is the candidate dimension.
FEATURE_UNIVERSE: dict[str, tuple[dict[str, Any], str]] = {
    "user_recent_items": ({"dtype": "int64", "shape": [HISTORY]},
                          f"last {HISTORY} item ids the user engaged with (-1 = padding)"),
    "user_dense": ({"dtype": "float32", "shape": [USER_DENSE], "default": 0.0}, "dense user profile vector"),
    "user_country": ({"dtype": "int64", "shape": [], "default": 0}, f"country code 0..{N_COUNTRIES - 1}"),
    "user_language": ({"dtype": "int64", "shape": [], "default": 0}, f"language code 0..{N_LANGUAGES - 1}"),
    "user_age": ({"dtype": "float32", "shape": [], "default": 30.0}, "age in years"),
    "query_content_class": ({"dtype": "int64", "shape": [], "default": -1},
                            f"requested content class 0..{N_CLASSES - 1}, -1 = any"),
    "cand_item_id": ({"dtype": "int64", "shape": [-1]}, "candidate item ids"),
    "cand_emb": ({"dtype": "float32", "shape": [-1, CAND_EMB]}, "candidate content embedding"),
    "cand_ctr": ({"dtype": "float32", "shape": [-1]}, "candidate historical click-through rate (logit scale)"),
    "cand_age_hours": ({"dtype": "float32", "shape": [-1], "default": 24.0}, "candidate age in hours"),
    "cand_price": ({"dtype": "float32", "shape": [-1], "default": 0.0}, "candidate price"),
    "cand_score": ({"dtype": "float32", "shape": [-1]},
                   "candidate relevance (e.g. the ranker's score), read by the diversifier"),
    "cand_category": ({"dtype": "int64", "shape": [-1], "default": -1},
                      "candidate category id, -1 = none (diversifier)"),
    "ctx_hour_of_day": ({"dtype": "int64", "shape": []}, "context: hour of day (used by neither demo model)"),
    "ctx_device_type": ({"dtype": "int64", "shape": []}, "context: device type (used by neither demo model)"),
}
RETRIEVAL_INPUTS = ("user_recent_items", "user_dense", "user_country", "user_language", "query_content_class")
RETRIEVAL_OUTPUTS = ("item_ids", "scores", "user_embedding")
RANKER_INPUTS = ("user_dense", "user_age", "user_country", "cand_item_id", "cand_emb", "cand_ctr",
                 "cand_age_hours", "cand_price")
RANKER_OUTPUTS = ("score", "task_logits")
ITEM_FEATURES_INPUTS = ("cand_item_id",)
ITEM_FEATURES_OUTPUTS = ("cand_emb", "cand_ctr", "cand_age_hours", "cand_price", "cand_category")
DIVERSIFIER_INPUTS = ("cand_emb", "cand_score", "cand_category")
DIVERSIFIER_OUTPUTS = ("slate", "slate_scores")


def module_info(input_names: tuple[str, ...], output_names: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    return {
        "input_names": list(input_names),
        "output_names": list(output_names),
        "inputs": {n: FEATURE_UNIVERSE[n][0] for n in input_names},
        **extra,
    }


# ---------------------------------------------------------------- synthetic item catalogue
def bloom_token_masks(seed: int = SEED) -> np.ndarray:
    """int64 [n_tokens + 1, BLOOM_WORDS]: BLOOM_HASHES seeded bit positions per attribute token (the
    stand-in for hash functions); the last row (all bits set) is the 'unknown value' token that no item passes."""
    rng = np.random.default_rng(seed + 7)
    n_tokens = N_COUNTRIES + N_LANGUAGES + N_CLASSES
    masks = np.zeros((n_tokens + 1, BLOOM_WORDS), dtype=np.uint64)
    for t in range(n_tokens):
        for bit in rng.choice(64 * BLOOM_WORDS, BLOOM_HASHES, replace=False):
            masks[t, bit // 64] |= np.uint64(1) << np.uint64(int(bit % 64))
    masks[n_tokens] = np.uint64(0xFFFFFFFFFFFFFFFF)
    return masks.view(np.int64)


def make_catalogue(n_items: int = N_ITEMS, seed: int = SEED) -> dict[str, np.ndarray]:
    """Float item embeddings (unit norm, clustered) and eligibility attributes."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((NLIST, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    topic = np.arange(n_items) % NLIST
    emb = centers[topic] + 0.08 * rng.standard_normal((n_items, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    countries = rng.random((n_items, N_COUNTRIES)) < 0.5
    countries[np.arange(n_items), rng.integers(0, N_COUNTRIES, n_items)] = True
    languages = rng.random((n_items, N_LANGUAGES)) < 0.4
    languages[np.arange(n_items), rng.integers(0, N_LANGUAGES, n_items)] = True
    classes = rng.integers(0, N_CLASSES, n_items)
    return {"emb": emb.astype(np.float32), "centers": centers, "topic": topic, "countries": countries,
            "languages": languages, "classes": classes}


def item_bloom_bits(cat: dict[str, np.ndarray], masks: np.ndarray) -> np.ndarray:
    m = masks.view(np.uint64)
    bits = np.zeros((len(cat["classes"]), BLOOM_WORDS), dtype=np.uint64)
    for c in range(N_COUNTRIES):
        bits[cat["countries"][:, c]] |= m[c]
    for lang in range(N_LANGUAGES):
        bits[cat["languages"][:, lang]] |= m[N_COUNTRIES + lang]
    bits |= m[N_COUNTRIES + N_LANGUAGES + cat["classes"]]
    return bits.view(np.int64)


def eligible(cat: dict[str, np.ndarray], country: int, language: int, content_class: int) -> np.ndarray:
    """Exact eligibility (the ground truth the Bloom filter approximates)."""
    ok = cat["countries"][:, country] & cat["languages"][:, language]
    if content_class >= 0:
        ok &= cat["classes"] == content_class
    return ok


def make_users(cat: dict[str, np.ndarray], n: int, seed: int) -> dict[str, np.ndarray]:
    """Users with an interest topic: recent items mostly from it, dense features a noisy projection of it."""
    rng = np.random.default_rng(seed)
    n_items = len(cat["topic"])
    topics = rng.integers(0, NLIST, n)
    interest = cat["centers"][topics] + 0.05 * rng.standard_normal((n, DIM)).astype(np.float32)
    interest /= np.linalg.norm(interest, axis=1, keepdims=True)
    per_topic = n_items // NLIST
    recent = topics[:, None] + NLIST * rng.integers(0, per_topic, (n, HISTORY))
    noise = rng.random((n, HISTORY)) < 0.2
    recent[noise] = rng.integers(0, n_items, int(noise.sum()))
    proj = np.random.default_rng(SEED + 1).standard_normal((DIM, USER_DENSE)).astype(np.float32) / math.sqrt(DIM)
    dense = interest @ proj * 4.0 + 0.1 * rng.standard_normal((n, USER_DENSE)).astype(np.float32)
    return {"interest": interest.astype(np.float32), "user_recent_items": recent.astype(np.int64),
            "user_dense": dense.astype(np.float32), "user_country": rng.integers(0, N_COUNTRIES, n),
            "user_language": rng.integers(0, N_LANGUAGES, n), "query_content_class": rng.integers(-1, N_CLASSES, n)}


def build_ivf(emb: np.ndarray, centers: np.ndarray, iters: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [NLIST, D], assignment [N]) by a few inner-product Lloyd steps from the topic centers."""
    e = torch.from_numpy(emb)
    cent = torch.from_numpy(centers.copy())
    assign = torch.zeros(len(emb), dtype=torch.long)
    for _ in range(iters):
        assign = torch.cat([torch.argmax(chunk @ cent.T, dim=1) for chunk in e.split(20000)])
        sums = torch.zeros_like(cent).index_add_(0, assign, e)
        counts = torch.bincount(assign, minlength=len(cent)).clamp(min=1).unsqueeze(1)
        cent = F.normalize(sums / counts, dim=1)
    return cent.numpy(), assign.numpy()


# ---------------------------------------------------------------- retrieval
class Retrieval(nn.Module):
    """Index-as-model: user tower + IVF/int8/Bloom item index in one module."""

    if TYPE_CHECKING:  # buffers (register_buffer); not class annotations at run time, which TorchScript would read
        centroids: torch.Tensor
        cluster_ids: torch.Tensor
        cluster_codes: torch.Tensor
        cluster_scales: torch.Tensor
        cluster_bits: torch.Tensor
        token_masks: torch.Tensor

    def __init__(self, item_emb: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, bits: torch.Tensor,
                 token_masks: torch.Tensor) -> None:
        super().__init__()
        n, d = item_emb.shape
        self.n_items = int(n)
        self.nprobe = NPROBE
        self.top_k = TOP_K
        self.n_countries = N_COUNTRIES
        self.n_languages = N_LANGUAGES
        self.n_classes = N_CLASSES
        self.unknown_token = N_COUNTRIES + N_LANGUAGES + N_CLASSES
        self.missing_score = MISSING_SCORE
        # user tower: frozen content table (+1 padding row) and trainable projections
        table = torch.cat([item_emb, torch.zeros(1, d)])
        self.bag = nn.EmbeddingBag(n + 1, d, mode="sum", padding_idx=n, _weight=table.clone())
        self.bag.weight.requires_grad_(False)
        self.hist_proj = nn.Linear(d, d)
        self.dense_mlp = nn.Sequential(nn.Linear(USER_DENSE, 64), nn.ReLU(), nn.Linear(64, d))
        # index: per-cluster padded layout so probing is a static-shape gather
        counts = torch.bincount(assign, minlength=NLIST)
        m = int(counts.max())
        order = torch.argsort(assign, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n) - starts[assign[order]]
        scales = item_emb.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        codes = torch.round(item_emb / scales[:, None]).clamp(-127, 127).to(torch.int8)
        ids = torch.full((NLIST, m), -1, dtype=torch.long)
        ids[assign[order], slot] = order
        c = torch.zeros((NLIST, m, d), dtype=torch.int8)
        c[assign[order], slot] = codes[order]
        s = torch.zeros((NLIST, m))
        s[assign[order], slot] = scales[order]
        b = torch.zeros((NLIST, m, bits.shape[1]), dtype=torch.long)
        b[assign[order], slot] = bits[order]
        self.register_buffer("centroids", centroids.contiguous())
        self.register_buffer("cluster_ids", ids)
        self.register_buffer("cluster_codes", c)
        self.register_buffer("cluster_scales", s)
        self.register_buffer("cluster_bits", b)
        self.register_buffer("token_masks", token_masks)

    def user_embedding(self, user_recent_items: torch.Tensor, user_dense: torch.Tensor) -> torch.Tensor:
        valid = (user_recent_items >= 0) & (user_recent_items < self.n_items)
        ids = torch.where(valid, user_recent_items, torch.full_like(user_recent_items, self.n_items))
        hist = self.bag(ids) / valid.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
        return F.normalize(self.hist_proj(hist) + self.dense_mlp(user_dense), dim=1)

    def _token(self, value: torch.Tensor, offset: int, size: int) -> torch.Tensor:
        ok = (value >= 0) & (value < size)
        return torch.where(ok, value + offset, torch.full_like(value, self.unknown_token))

    def forward(self, user_recent_items: torch.Tensor, user_dense: torch.Tensor, user_country: torch.Tensor,
                user_language: torch.Tensor, query_content_class: torch.Tensor):
        u = self.user_embedding(user_recent_items, user_dense)  # [B, D]
        rows = u.shape[0]
        q = self.token_masks[self._token(user_country, 0, self.n_countries)]
        q = q | self.token_masks[self._token(user_language, self.n_countries, self.n_languages)]
        cls_tok = self.token_masks[self._token(query_content_class,
                                               self.n_countries + self.n_languages, self.n_classes)]
        any_cls = (query_content_class < 0).unsqueeze(1)
        q = q | torch.where(any_cls, torch.zeros_like(cls_tok), cls_tok)  # [B, W]
        probe = torch.topk(u @ self.centroids.T, self.nprobe, dim=1).indices  # [B, P]
        codes = self.cluster_codes[probe].to(torch.float32)  # [B, P, M, D]
        scores = torch.matmul(codes, u[:, None, :, None]).squeeze(-1) * self.cluster_scales[probe]  # [B, P, M]
        qb = q[:, None, None, :]
        passed = ((self.cluster_bits[probe] & qb) == qb).all(dim=3)  # Bloom test, every word
        scores = torch.where(passed, scores, torch.full_like(scores, self.missing_score)).reshape(rows, -1)
        top = torch.topk(scores, self.top_k, dim=1)
        ids = self.cluster_ids[probe].reshape(rows, -1).gather(1, top.indices)
        found = top.values > self.missing_score * 0.5
        ids = torch.where(found, ids, torch.full_like(ids, -1))
        return ids, top.values, u


def train_retrieval(model: Retrieval, cat: dict[str, np.ndarray], steps: int = 150, seed: int = SEED) -> float:
    """Fit the user tower so the user embedding points at the user's interest (cosine loss)."""
    torch.manual_seed(seed)
    users = make_users(cat, 8192, seed + 11)
    recent = torch.from_numpy(users["user_recent_items"])
    dense = torch.from_numpy(users["user_dense"])
    target = torch.from_numpy(users["interest"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    loss = torch.tensor(0.0)
    for _step in range(steps):
        idx = torch.randint(0, len(target), (512,))
        u = model.user_embedding(recent[idx], dense[idx])
        loss = (1 - (u * target[idx]).sum(dim=1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


# ---------------------------------------------------------------- ranker
class Ranker(nn.Module):
    """Multi-task ranker: T task logits per candidate and a weighted value score."""

    if TYPE_CHECKING:  # a buffer (see Retrieval)
        task_weights: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.id_buckets = ID_BUCKETS
        self.n_countries = N_COUNTRIES
        self.id_emb = nn.Embedding(ID_BUCKETS, 8)
        self.country_emb = nn.Embedding(N_COUNTRIES + 1, 4)
        self.user_proj = nn.Linear(USER_DENSE, CAND_EMB)
        width = USER_DENSE + 1 + 4 + 8 + CAND_EMB + 3 + CAND_EMB
        self.mlp = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.heads = nn.Linear(64, N_TASKS)
        self.register_buffer("task_weights", torch.tensor(TASK_WEIGHTS))

    def forward(self, user_dense: torch.Tensor, user_age: torch.Tensor, user_country: torch.Tensor,
                cand_item_id: torch.Tensor, cand_emb: torch.Tensor, cand_ctr: torch.Tensor,
                cand_age_hours: torch.Tensor, cand_price: torch.Tensor):
        country = torch.where((user_country >= 0) & (user_country < self.n_countries), user_country,
                              torch.full_like(user_country, self.n_countries))
        x = torch.cat([
            user_dense,
            ((user_age - 30.0) / 15.0).unsqueeze(1),
            self.country_emb(country),
            self.id_emb(torch.remainder(cand_item_id, self.id_buckets)),
            cand_emb,
            cand_ctr.unsqueeze(1),
            torch.log1p(cand_age_hours.clamp(min=0.0)).unsqueeze(1),
            torch.log1p(cand_price.clamp(min=0.0)).unsqueeze(1),
            self.user_proj(user_dense) * cand_emb,
        ], dim=1)
        logits = self.heads(self.mlp(x))
        score = (torch.sigmoid(logits) * self.task_weights).sum(dim=1)
        return score, logits


def ranker_training_data(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Synthetic interactions: click/like/share depend on user-item affinity, ctr, freshness, price."""
    g = torch.Generator().manual_seed(seed)
    user_dense = torch.randn(n, USER_DENSE, generator=g)
    user_age = 18 + 50 * torch.rand(n, generator=g)
    user_country = torch.randint(0, N_COUNTRIES, (n,), generator=g)
    cand_item_id = torch.randint(0, 1000, (n,), generator=g)
    cand_emb = torch.randn(n, CAND_EMB, generator=g)
    cand_ctr = torch.randn(n, generator=g)
    cand_age_hours = 200 * torch.rand(n, generator=g)
    cand_price = torch.exp(torch.randn(n, generator=g))
    tg = torch.Generator().manual_seed(SEED + 3)
    w = torch.randn(USER_DENSE, CAND_EMB, generator=tg) / 4
    affinity = ((user_dense @ w) * cand_emb).sum(1) / 2
    fresh = -0.4 * torch.log1p(cand_age_hours)
    click = affinity + 1.2 * cand_ctr + fresh + 0.5
    like = 0.8 * affinity - 0.02 * (user_age - 30) - 0.3 * torch.log1p(cand_price) - 1.0
    share = 1.2 * affinity + 0.3 * (user_country % 2) - 2.0 + (cand_item_id % 7 == 0).float()
    logits = torch.stack([click, like, share], dim=1)
    labels = torch.bernoulli(torch.sigmoid(logits), generator=g)
    return [user_dense, user_age, user_country, cand_item_id, cand_emb, cand_ctr, cand_age_hours, cand_price], labels


def train_ranker(model: Ranker, steps: int = 200, seed: int = SEED) -> float:
    torch.manual_seed(seed)
    inputs, labels = ranker_training_data(40_000, seed + 5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (1024,))
        _, logits = model(*[t[idx] for t in inputs])
        loss = F.binary_cross_entropy_with_logits(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


# ---------------------------------------------------------------- item features (hydration)
class ItemFeatures(nn.Module):
    """Feature hydration as a model: the catalogue's per-item features in buffers, looked up by item id, so a
    pipeline can turn retrieval's item ids into the ranker's and the diversifier's candidate features.
    Ids outside the catalogue (retrieval's -1 for 'not found') get a neutral row (category -1)."""

    if TYPE_CHECKING:  # buffers (see Retrieval)
        emb: torch.Tensor
        ctr: torch.Tensor
        age: torch.Tensor
        price: torch.Tensor
        category: torch.Tensor

    def __init__(self, emb: torch.Tensor, ctr: torch.Tensor, age: torch.Tensor,
                 price: torch.Tensor, category: torch.Tensor) -> None:
        super().__init__()
        self.n_items = int(emb.shape[0])
        self.register_buffer("emb", torch.cat([emb, torch.zeros(1, emb.shape[1])]))
        self.register_buffer("ctr", torch.cat([ctr, torch.zeros(1)]))
        self.register_buffer("age", torch.cat([age, torch.full((1,), 24.0)]))
        self.register_buffer("price", torch.cat([price, torch.zeros(1)]))
        self.register_buffer("category", torch.cat([category, torch.full((1,), -1, dtype=torch.long)]))

    def forward(self, cand_item_id: torch.Tensor):
        ok = (cand_item_id >= 0) & (cand_item_id < self.n_items)
        idx = torch.where(ok, cand_item_id, torch.full_like(cand_item_id, self.n_items))
        return self.emb[idx], self.ctr[idx], self.age[idx], self.price[idx], self.category[idx]


def make_item_features(cat: dict[str, np.ndarray], seed: int = SEED) -> ItemFeatures:
    """16-d content embeddings (a fixed projection of the 32-d item embeddings, so items of one topic stay
    alike), synthetic CTR / age / price, and the item's topic as its category."""
    rng = np.random.default_rng(seed + 21)
    n = len(cat["topic"])
    proj = rng.standard_normal((DIM, CAND_EMB)).astype(np.float32)
    emb = cat["emb"] @ proj
    return ItemFeatures(torch.from_numpy(emb.astype(np.float32)),
                        torch.from_numpy(rng.standard_normal(n).astype(np.float32)),
                        torch.from_numpy((200 * rng.random(n)).astype(np.float32)),
                        torch.from_numpy(np.exp(rng.standard_normal(n)).astype(np.float32)),
                        torch.from_numpy(np.asarray(cat["topic"], dtype=np.int64)))


# ---------------------------------------------------------------- diversifier
def make_diversifier() -> nn.Module:
    """The demo slate model: SSD with k=SLATE_K, window SLATE_WINDOW, gamma SLATE_GAMMA (no weights to train)."""
    from .diversify import SSD

    return SSD(k=SLATE_K, window=SLATE_WINDOW, gamma=SLATE_GAMMA)


# ---------------------------------------------------------------- build + save
def example_inputs(input_names: tuple[str, ...], rows: int = 3) -> tuple[torch.Tensor, ...]:
    """Inputs in the batched calling convention (leading row axis on every input)."""
    out = []
    for name in input_names:
        spec = FEATURE_UNIVERSE[name][0]
        shape = [rows] + [d for d in spec["shape"] if d != -1]
        dtype = getattr(torch, spec["dtype"])
        out.append(torch.zeros(shape, dtype=dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype))
    return tuple(out)


def _save(model: nn.Module, input_names: tuple[str, ...], output_names: tuple[str, ...], repo: Path, name: str,
          rows: int = 3, **extra: Any) -> None:
    import warnings

    model.eval()
    info = json.dumps(module_info(input_names, output_names, **extra))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        d1 = repo / name / "1"
        d1.mkdir(parents=True, exist_ok=True)
        torch.jit.save(torch.jit.script(model), str(d1 / "model.pt"), _extra_files={"module_info.json": info})
        dim = torch.export.Dim("rows", min=1, max=1 << 20)
        ep = torch.export.export(model, example_inputs(input_names, rows),
                                 dynamic_shapes=tuple({0: dim} for _ in input_names))
        d2 = repo / name / "2"
        d2.mkdir(parents=True, exist_ok=True)
        tmp = d2 / ".model.tmp.pt2"
        torch.export.save(ep, str(tmp), extra_files={"module_info.json": info})
        os.replace(tmp, d2 / "model.pt2")


def build_demo(out: str | os.PathLike[str], n_items: int = N_ITEMS, log: Any = print) -> dict[str, Any]:
    """Write retrieval/, item_features/, ranker/ and diversifier/ ({1: .pt, 2: .pt2}, same weights per model) plus
    .demo/ data."""
    t0 = time.perf_counter()
    repo = Path(out)
    repo.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    with torch.no_grad():
        cat = make_catalogue(n_items)
        masks = bloom_token_masks()
        bits = item_bloom_bits(cat, masks)
        centroids, assign = build_ivf(cat["emb"], cat["centers"])
        retrieval = Retrieval(torch.from_numpy(cat["emb"]), torch.from_numpy(centroids),
                              torch.from_numpy(assign).long(), torch.from_numpy(bits), torch.from_numpy(masks))
    r_loss = train_retrieval(retrieval, cat)
    ranker = Ranker()
    k_loss = train_ranker(ranker)
    with torch.no_grad():
        _save(retrieval, RETRIEVAL_INPUTS, RETRIEVAL_OUTPUTS, repo, "retrieval")
        _save(ranker, RANKER_INPUTS, RANKER_OUTPUTS, repo, "ranker")
        _save(make_item_features(cat), ITEM_FEATURES_INPUTS, ITEM_FEATURES_OUTPUTS, repo, "item_features")
        diversifier = make_diversifier()
        _save(diversifier, DIVERSIFIER_INPUTS, DIVERSIFIER_OUTPUTS, repo, "diversifier", rows=97, batching="request",
              settings={"k": diversifier.k, "window": diversifier.window, "gamma": diversifier.gamma,
                        "category_weight": diversifier.category_weight, "algorithm": "SSD (Huang et al., KDD 2021)"})
    extra = repo / ".demo"
    extra.mkdir(exist_ok=True)
    np.savez(extra / "items.npz", emb=cat["emb"], countries=cat["countries"], languages=cat["languages"],
             classes=cat["classes"], bits=bits, token_masks=masks)
    summary = {"repo": str(repo), "n_items": n_items, "retrieval_loss": round(r_loss, 4),
               "ranker_loss": round(k_loss, 4), "seconds": round(time.perf_counter() - t0, 1)}
    log(f"built demo repository {repo}: retrieval, item_features, ranker, diversifier (1: .pt, 2: .pt2 each); "
        f"{n_items} items; tower loss {summary['retrieval_loss']}, ranker loss {summary['ranker_loss']}; "
        f"{summary['seconds']} s")
    return summary
