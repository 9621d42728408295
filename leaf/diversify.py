"""Slate diversification: SSD (served as a model) and a DPP baseline (benchmark only).

Why SSD and not DPP in serving: SSD (Huang et al., "Sliding Spectrum Decomposition for Diversified
Recommendation", KDD 2021) is built from plain linear algebra (projections and norms). It needs no PSD
kernel, no log-determinants and no jitter, so it has no Cholesky step that can break down on
near-duplicate candidates, and every greedy step is a handful of vectorised tensor ops over all
candidates. That makes it a model like any other: TorchScript-able, torch.export-able, compilable.

SSD greedy selection, per step t (k steps):
    choose j = argmax_i  relevance_i + gamma * ||residual_i||
where residual_i is the candidate's (normalised) vector after Gram-Schmidt orthogonalisation against the
orthonormal basis of the last w selected items. As in the paper's Algorithm 1 the basis is built
incrementally: the selected item's residual, normalised, becomes the newest basis vector q_t and every
candidate's squared residual norm drops its squared component along q_t (one matrix-vector product over
all candidates); when an item leaves the window its component is added back. The window's q's are mutually orthonormal
(each was
orthogonalised against all q's then in the window), so the residual is the exact projection of the
candidate off span(q_{t-w+1..t}). A selected residual shorter than EPS (a near-duplicate of the window)
adds no direction, so nothing is ever divided by ~0.

Categories (optional, id >= 0) join the vector as a weighted one-hot block (hashed into
`category_buckets`), so two items of the same category count as more alike.

Output: the ordered slate's candidate indices [k] and the adjusted score of each pick at selection time
[k]. Fewer than k candidates: the slate is padded with index -1 and score MISSING_SCORE.

DPP baseline: fast greedy MAP inference (Chen, Zhang, Zhou, "Fast Greedy MAP Inference for Determinantal
Point Process to Improve Recommendation Diversity", NeurIPS 2018, Algorithm 1, incremental Cholesky) on
the kernel L = diag(q) S diag(q), q_i = exp(alpha * relevance_i), S_ij = (1 + <x_i, x_j>) / 2. It stops
early when the next pivot d_j^2 falls below its epsilon (the kernel is numerically singular: what
near-duplicates do), and it can produce NaN from sqrt of a negative pivot; the bench counts both.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MISSING_SCORE = -1.0e30
EPS = 1.0e-4


class SSD(nn.Module):
    """SSD greedy slate selection; settings are module attributes (fixed per exported version).

    forward(cand_emb [C, d] float32, cand_score [C] float32, cand_category [C] int64 (-1 = none))
      -> (slate [k] int64, slate_scores [k] float32)
    """

    def __init__(self, k: int = 50, window: int = 8, gamma: float = 0.25, category_weight: float = 0.5,
                 category_buckets: int = 64) -> None:
        super().__init__()
        if k < 1 or window < 1 or gamma < 0 or category_weight < 0 or category_buckets < 1:
            raise ValueError("SSD needs k >= 1, window >= 1, gamma >= 0, category_weight >= 0, category_buckets >= 1")
        self.k = int(k)
        self.window = int(window)
        self.gamma = float(gamma)
        self.category_weight = float(category_weight)
        self.category_buckets = int(category_buckets)
        self.missing = MISSING_SCORE
        self.eps = EPS

    def _vectors(self, emb: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        x = F.normalize(torch.nan_to_num(emb.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0), dim=1)
        buckets = torch.arange(self.category_buckets, dtype=category.dtype, device=category.device)
        onehot = ((torch.remainder(category, self.category_buckets).unsqueeze(1) == buckets.unsqueeze(0))
                  & (category >= 0).unsqueeze(1)).to(torch.float32)
        return F.normalize(torch.cat([x, onehot * self.category_weight], dim=1), dim=1)

    def forward(self, cand_emb: torch.Tensor, cand_score: torch.Tensor,
                cand_category: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n_real = cand_score.shape[0]
        x = self._vectors(cand_emb, cand_category)
        rel = torch.nan_to_num(cand_score.to(torch.float32), nan=self.missing,
                               posinf=-self.missing, neginf=self.missing)
        # k padding rows (zero vector, MISSING relevance): picked only once the real candidates run out, so
        # shapes stay static in k and no branch depends on C (torch.export, torch.compile)
        x = torch.cat([x, torch.zeros(self.k, x.shape[1], dtype=x.dtype, device=x.device)])
        rel = torch.cat([rel, torch.full((self.k,), self.missing, dtype=rel.dtype, device=rel.device)])
        n = rel.shape[0]
        positions = torch.arange(n, device=rel.device)
        taken = torch.zeros(n, dtype=torch.bool, device=rel.device)
        # squared residual norms of every candidate: ||x||^2 minus its squared projections on the window's
        # orthonormal q's (c_s = x . q_s), so a step costs one matrix-vector product, not an update of [C, d]
        norm2 = (x * x).sum(dim=1)
        coefs: List[torch.Tensor] = []
        basis: List[torch.Tensor] = []
        picks: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        neg_inf = torch.full_like(rel, float("-inf"))
        for t in range(self.k):
            score = rel + self.gamma * torch.sqrt(norm2.clamp(min=0.0))
            score = torch.where(taken, neg_inf, score)
            best, j = torch.max(score, dim=0)  # no tensor-valued Python indexing: export keeps no data-dependent sizes
            picks.append(j)
            values.append(best)
            taken = taken | (positions == j)
            r = x.index_select(0, j.unsqueeze(0)).squeeze(0)
            if len(basis) > 0:  # the pick's residual against the window, computed directly (no cancellation)
                window = torch.stack(basis[-self.window:])
                r = r - (window @ r) @ window
            norm = torch.linalg.vector_norm(r)
            q = r / norm.clamp(min=self.eps) * (norm > self.eps).to(r.dtype)  # no new direction for a near-duplicate
            c = x @ q
            norm2 = norm2 - c * c
            coefs.append(c)
            basis.append(q)
            if t >= self.window:  # the item selected w steps ago leaves the window: add its direction back
                norm2 = norm2 + coefs[t - self.window] * coefs[t - self.window]
        slate = torch.stack(picks)
        slate_scores = torch.stack(values)
        real = slate < n_real
        slate = torch.where(real, slate, torch.full_like(slate, -1))
        slate_scores = torch.where(real, slate_scores, torch.full_like(slate_scores, self.missing))
        return slate, slate_scores


def dpp_greedy(emb: torch.Tensor, relevance: torch.Tensor, k: int, alpha: float = 2.0,
               eps: float = 1.0e-10, jitter: float = 0.0,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool]:
    """Fast greedy MAP for a DPP (Chen et al. 2018, Algorithm 1): (slate indices [<= k], had_nan).

    Incremental Cholesky: c_i (rows of the factor) and d_i^2 (pivots) for every candidate, one row per pick;
    stops early when the best pivot is below eps. `jitter` is added to the kernel's diagonal (the usual
    repair: S has rank <= d + 1, so without it a slate longer than the embedding width cannot exist). float32 by
    default, as a serving implementation would run.
    Benchmark only (a Python loop over k, vectorised over C).
    """
    x = F.normalize(emb.to(dtype), dim=1)
    q = torch.exp(alpha * relevance.to(dtype))
    n = x.shape[0]
    k = min(k, n)

    def kernel_row(j: int) -> torch.Tensor:  # L[j, :] without materialising the C x C kernel
        row = q[j] * q * (1.0 + x @ x[j]) / 2.0
        row[j] += jitter
        return row

    cis = torch.zeros(k, n, dtype=dtype)
    d2 = q * q + jitter  # diag(L): S_ii = 1
    j = int(torch.argmax(d2))
    picks = [j]
    had_nan = False
    while len(picks) < k:
        s = len(picks) - 1
        dj = torch.sqrt(d2[j])
        e = (kernel_row(j) - cis[:s, j] @ cis[:s, :]) / dj
        cis[s, :] = e
        d2 = d2 - e * e
        d2[j] = float("-inf")  # picked: stays -inf (-inf minus a finite square)
        if torch.isnan(d2).any():
            had_nan = True
            break
        j = int(torch.argmax(d2))
        if not d2[j] > eps:
            break
        picks.append(j)
    return torch.tensor(picks, dtype=torch.long), had_nan
