"""Choosing a subset of a candidate pool: budgets, baselines, diversity.

Offline selection keeps ``budget`` of ``N`` candidates by a score. This
module holds what every scorer shares:

* :func:`check_budget`, :func:`top_k` (deterministic ties), and the
  baselines :func:`random_subset`, loss-based selection (:func:`top_k` of
  the losses) and a specific-vs-generic classifier score
  (:func:`classifier_scores` on :func:`byte_ngram_features`);
* G-DIG's diversity step (Pan et al., 2024), which its public code omits
  (papers.md §4): :func:`kmeans` on normalised projected gradients and
  :func:`even_resample` across the clusters, assembled in
  :func:`quality_diversity_select`. The details (how many high-quality
  candidates are clustered, round-robin in quality order within clusters)
  are **our reconstruction** from the abstract;
* measures of a selection: :func:`auroc` of a score against known labels
  (e.g. corrupted responses) and :func:`cluster_coverage`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats


class SelectionError(ValueError):
  """A budget, score or data set that a selection cannot use."""


def check_budget(budget: int, pool_size: int) -> int:
  """Returns ``budget`` if ``1 <= budget <= pool_size``.

  Raises:
    SelectionError: names the budget and the pool size.
  """
  if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool):
    raise SelectionError(f"budget = {budget!r} must be an integer")
  if not 1 <= budget <= pool_size:
    raise SelectionError(
      f"budget = {budget} is invalid for a pool of {pool_size} candidates; it "
      f"must lie in [1, {pool_size}]"
    )
  return int(budget)


def budget_of(fraction: float, pool_size: int) -> int:
  """``round(fraction * pool_size)``, checked (at least one example)."""
  if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
    raise SelectionError(f"budget fraction = {fraction!r} must lie in (0, 1]")
  return check_budget(max(1, int(round(fraction * pool_size))), pool_size)


def _scores(scores_N: Any) -> np.ndarray:
  s = np.asarray(scores_N, np.float64)
  if s.ndim != 1:
    raise SelectionError(f"scores must be a vector; got shape {s.shape}")
  if not np.all(np.isfinite(s)):
    bad = np.flatnonzero(~np.isfinite(s))[:5].tolist()
    raise SelectionError(f"scores must be finite; non-finite at indices {bad}")
  return s


def ranking(scores_N: Any, *, largest: bool = True) -> np.ndarray:
  """Indices from best to worst; ties broken by the lower index."""
  s = _scores(scores_N)
  return np.lexsort((np.arange(s.size), -s if largest else s))


def top_k(scores_N: Any, budget: int, *, largest: bool = True) -> np.ndarray:
  """The ``budget`` best indices (sorted by rank; ties to the lower index).

  Raises:
    SelectionError: bad budget or non-finite scores.
  """
  s = _scores(scores_N)
  check_budget(budget, s.size)
  return ranking(s, largest=largest)[:budget]


def random_subset(seed: int, pool_size: int, budget: int) -> np.ndarray:
  """``budget`` distinct indices drawn uniformly (numpy ``default_rng(seed)``)."""
  check_budget(budget, pool_size)
  return np.random.default_rng(seed).choice(
    pool_size, size=budget, replace=False
  )


# ------------------------------------------------------------- diversity --


def normalize_rows(x_NxD: Any) -> np.ndarray:
  """Rows scaled to unit norm (zero rows stay zero), float64."""
  x = np.asarray(x_NxD, np.float64)
  n = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(n > 0, n, 1.0)


def kmeans(
  x_NxD: Any, k: int, seed: int, *, iters: int = 100
) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means with k-means++ seeding, deterministic for a seed.

  Float64 numpy throughout; an emptied cluster is re-seeded with the point
  farthest from its centroid. Stops when the assignment no longer changes.

  Args:
    x_NxD: points.
    k: clusters, ``1 <= k <= N``.
    seed: seeds the k-means++ draws.
    iters: maximum Lloyd iterations.

  Returns:
    ``(centroids_KxD, labels_N)``.

  Raises:
    SelectionError: ``k`` out of range.
  """
  x = np.asarray(x_NxD, np.float64)
  n = x.shape[0]
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise SelectionError(
      f"k = {k!r} clusters is invalid for {n} points; need 1 <= k <= {n}"
    )
  rng = np.random.default_rng(seed)
  centers = [x[rng.integers(n)]]
  d2 = np.sum((x - centers[0]) ** 2, axis=1)
  for _ in range(1, k):
    total = d2.sum()
    i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
    centers.append(x[i])
    d2 = np.minimum(d2, np.sum((x - x[i]) ** 2, axis=1))
  c = np.stack(centers)
  labels = np.full(n, -1)
  for _ in range(iters):
    dist = np.sum(x**2, 1)[:, None] - 2 * x @ c.T + np.sum(c**2, 1)[None]
    new = np.argmin(dist, axis=1)
    for j in range(k):
      if not np.any(new == j):  # re-seed an empty cluster
        far = int(np.argmax(dist[np.arange(n), new]))
        new[far] = j
    if np.array_equal(new, labels):
      break
    labels = new
    c = np.stack([x[labels == j].mean(0) for j in range(k)])
  return c, labels


def even_resample(labels_N: Any, order_N: Any, budget: int) -> np.ndarray:
  """Round-robin over clusters: an even share of the budget from each.

  Every round takes, from each cluster that still has members, its next
  member in ``order_N`` (best first); the last, partial round serves the
  clusters whose next member ranks best. So cluster counts differ by at
  most one except where a cluster runs out (its share goes to the others).

  Args:
    labels_N: cluster of each candidate.
    order_N: a permutation of ``range(N)``, best candidate first.
    budget: how many to take, ``<= N``.

  Returns:
    The chosen indices, in the order taken.
  """
  labels = np.asarray(labels_N)
  order = np.asarray(order_N)
  n = labels.size
  check_budget(budget, n)
  if sorted(order.tolist()) != list(range(n)):
    raise SelectionError("order_N must be a permutation of range(N)")
  rank = np.empty(n, np.int64)
  rank[order] = np.arange(n)
  queues = {
    c: [int(i) for i in order if labels[i] == c] for c in np.unique(labels)
  }
  chosen: list[int] = []
  depth = 0
  while len(chosen) < budget:
    heads = [
      (rank[q[depth]], q[depth]) for q in queues.values() if len(q) > depth
    ]
    heads.sort()
    for _, i in heads[: budget - len(chosen)]:
      chosen.append(i)
    depth += 1
  return np.asarray(chosen, np.int64)


def quality_diversity_select(
  quality_N: Any,
  features_NxD: Any,
  budget: int,
  *,
  num_clusters: int,
  keep_factor: float = 2.0,
  seed: int = 0,
  helpful: str = "low",
) -> dict[str, np.ndarray]:
  """G-DIG: keep the high-quality candidates, then resample them evenly
  over k-means clusters of their normalised gradients (reconstruction).

  Args:
    quality_N: influence scores; with ``helpful="low"`` the most negative
      are the most helpful (G-DIG's ``s(z, q)``).
    features_NxD: projected gradients of every candidate.
    budget: examples to select.
    num_clusters: k of the k-means.
    keep_factor: cluster the ``ceil(keep_factor * budget)`` best candidates
      (capped at N); 1 reduces to quality-only selection.
    seed: k-means seed.
    helpful: ``"low"`` or ``"high"``: which end of the score is kept.

  Returns:
    ``{"selected": indices, "kept": the clustered candidates, "labels":
    their clusters}``.
  """
  q = _scores(quality_N)
  n = q.size
  check_budget(budget, n)
  if helpful not in ("low", "high"):
    raise SelectionError(f"helpful = {helpful!r}; allowed: 'low', 'high'")
  if not keep_factor >= 1:
    raise SelectionError(f"keep_factor = {keep_factor!r} must be >= 1")
  feats = np.asarray(features_NxD)
  if feats.shape[0] != n:
    raise SelectionError(
      f"{feats.shape[0]} feature rows for {n} quality scores"
    )
  keep = min(n, int(np.ceil(keep_factor * budget)))
  kept = ranking(q, largest=helpful == "high")[:keep]
  k = min(num_clusters, keep)
  _, labels = kmeans(normalize_rows(feats[kept]), k, seed)
  local = even_resample(labels, np.arange(keep), budget)
  return {"selected": kept[local], "kept": kept, "labels": labels}


# -------------------------------------------------------------- measures --


def auroc(scores_N: Any, positive_N: Any) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative).

  Ties count one half (Mann-Whitney U with average ranks).

  Raises:
    SelectionError: a class is empty or the shapes differ.
  """
  s = _scores(scores_N)
  y = np.asarray(positive_N, bool)
  if y.shape != s.shape:
    raise SelectionError(
      f"labels of shape {y.shape} for scores of shape {s.shape}"
    )
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    raise SelectionError("AUROC needs both positive and negative examples")
  ranks = scipy.stats.rankdata(s)
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cluster_coverage(
  labels_N: Any, selected: Any, num_clusters: int
) -> dict[str, float]:
  """How a selection spreads over clusters of the pool.

  Returns:
    ``{"covered": fraction of clusters with a selected member, "entropy":
    entropy of the selection's cluster histogram / log(num_clusters)}``.
  """
  labels = np.asarray(labels_N)[np.asarray(selected)]
  counts = np.bincount(labels, minlength=num_clusters).astype(np.float64)
  p = counts / counts.sum()
  nz = p[p > 0]
  ent = (
    float(-(nz * np.log(nz)).sum() / np.log(num_clusters))
    if num_clusters > 1
    else 1.0
  )
  return {"covered": float(np.mean(counts > 0)), "entropy": ent}


# ------------------------------------------------------------ classifier --


def byte_ngram_features(
  tokens_BxL: Any, mask_BxL: Any | None = None, *, buckets: int = 1024
) -> np.ndarray:
  """Hashed byte unigram and bigram counts, L2-normalised rows.

  Args:
    tokens_BxL: integer ids.
    mask_BxL: which positions count (default all).
    buckets: hash buckets (the feature width).

  Returns:
    ``x_BxF`` float32 with ``F = buckets``.
  """
  t = np.asarray(tokens_BxL, np.int64)
  m = np.ones_like(t, bool) if mask_BxL is None else np.asarray(mask_BxL, bool)
  b = t.shape[0]
  x = np.zeros((b, buckets), np.float64)
  rows = np.repeat(np.arange(b)[:, None], t.shape[1], 1)
  np.add.at(x, (rows[m], (t[m] * 2654435761) % buckets), 1.0)
  m2 = m[:, 1:] & m[:, :-1]
  bi = (t[:, :-1] * 1000003 + t[:, 1:] * 7919 + 17) % buckets
  np.add.at(x, (rows[:, 1:][m2], bi[m2]), 1.0)
  return normalize_rows(x).astype(np.float32)


def classifier_scores(
  x_pos_MxF: Any,
  x_pool_NxF: Any,
  *,
  steps: int = 300,
  lr: float = 0.1,
  l2: float = 1e-3,
) -> np.ndarray:
  """Logit of a specific-vs-generic logistic classifier on the pool.

  Trains ``P(specific | x)`` with the target's examples as positives and
  the pool as negatives (classes weighted equally; full-batch Adam), then
  scores every pool candidate: higher = more like the target. The
  classifier baseline of online filtering (Grangier et al.), offline.

  Returns:
    ``scores_N`` float64.
  """
  xp = jnp.asarray(x_pos_MxF, jnp.float32)
  xn = jnp.asarray(x_pool_NxF, jnp.float32)
  if xp.ndim != 2 or xn.ndim != 2 or xp.shape[1] != xn.shape[1]:
    raise SelectionError(
      f"feature matrices of shapes {xp.shape} and {xn.shape} do not match"
    )
  f = xp.shape[1]

  def loss(w):
    lp = jax.nn.softplus(-(xp @ w[:f] + w[f]))
    ln = jax.nn.softplus(xn @ w[:f] + w[f])
    return lp.mean() + ln.mean() + l2 * jnp.sum(w[:f] ** 2)

  tx = optax.adam(lr)

  def step(carry, _):
    w, s = carry
    g = jax.grad(loss)(w)
    u, s = tx.update(g, s)
    return (optax.apply_updates(w, u), s), None

  w0 = jnp.zeros(f + 1, jnp.float32)
  (w, _), _ = jax.lax.scan(step, (w0, tx.init(w0)), None, length=steps)
  return np.asarray(xn @ w[:f] + w[f], np.float64)


def check_same_modality(
  pool: Mapping[str, Any], seed: Mapping[str, Any], *, what: str = "seed set"
) -> None:
  """Raises if ``seed`` is not the same kind of data as ``pool``.

  Same array names, same dtype kinds (integer tokens vs float pixels) and
  the same per-example shapes.

  Raises:
    SelectionError: naming the differing arrays.
  """
  pk, sk = sorted(pool), sorted(seed)
  if pk != sk:
    raise SelectionError(
      f"the {what} has arrays {sk} but the candidate pool has {pk}: it is not "
      "the same modality; give it the pool's fields"
    )
  for k in pk:
    a, b = np.asarray(pool[k]), np.asarray(seed[k])
    if a.dtype.kind != b.dtype.kind or a.shape[1:] != b.shape[1:]:
      raise SelectionError(
        f"the {what}'s {k!r} is {b.dtype}{list(b.shape[1:])} per example but the "
        f"pool's is {a.dtype}{list(a.shape[1:])}: not the same modality"
      )


def take(
  batch: Mapping[str, Any], idx: Sequence[int] | np.ndarray
) -> dict[str, Any]:
  """Rows ``idx`` of every array of a batch."""
  idx = np.asarray(idx)
  return {k: np.asarray(v)[idx] for k, v in batch.items()}
