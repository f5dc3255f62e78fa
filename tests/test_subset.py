"""Selection utilities: budgets, k-means, even resampling, AUROC, classifier.

Oracles: brute-force pair counting (AUROC), planted well-separated
clusters (k-means), counting (resampling).
"""

import itertools

import numpy as np
import pytest

from dataweights.methods import subset


def _blobs(seed=0, k=4, per=25, d=5):
  rng = np.random.default_rng(seed)
  # distinct directions: the clusters stay apart after normalising rows
  centers = 10 * np.eye(d)[:k]
  x = np.concatenate([c + rng.normal(size=(per, d)) for c in centers])
  return x, np.repeat(np.arange(k), per)


def test_kmeans_deterministic_and_recovers_separated_clusters():
  x, truth = _blobs()
  c1, l1 = subset.kmeans(x, 4, seed=7)
  c2, l2 = subset.kmeans(x, 4, seed=7)
  np.testing.assert_array_equal(l1, l2)
  np.testing.assert_array_equal(c1, c2)
  # Each true cluster is exactly one found cluster (up to relabelling).
  pairs = set(zip(truth.tolist(), l1.tolist()))
  assert len(pairs) == 4 and len({b for _, b in pairs}) == 4
  # Centroids are the means of their points.
  for j in range(4):
    np.testing.assert_allclose(c1[j], x[l1 == j].mean(0))


def test_kmeans_seed_matters_and_bad_k():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 3))  # no structure: different seeds differ
  labels = {tuple(subset.kmeans(x, 5, seed=s)[1].tolist()) for s in range(4)}
  assert len(labels) > 1
  with pytest.raises(subset.SelectionError, match="k = 0"):
    subset.kmeans(x, 0, seed=0)
  with pytest.raises(subset.SelectionError, match="61 .* 60 points|k = 61"):
    subset.kmeans(x, 61, seed=0)


def test_even_resample_counts():
  labels = np.array([0] * 10 + [1] * 3 + [2] * 8 + [3] * 1)
  order = np.random.default_rng(0).permutation(labels.size)
  for budget in range(1, labels.size + 1):
    chosen = subset.even_resample(labels, order, budget)
    assert len(chosen) == budget == len(set(chosen.tolist()))
    counts = np.bincount(labels[chosen], minlength=4)
    sizes = np.bincount(labels)
    open_ = counts < sizes  # clusters not yet exhausted
    if open_.any():
      # every open cluster is within one of the fullest; exhausted ones
      # gave everything they had
      assert counts[open_].max() - counts[open_].min() <= 1
      assert counts[open_].min() >= counts.max() - 1
    # within a cluster, members are taken in the given order
    rank = np.argsort(order)
    for c in range(4):
      taken = [i for i in chosen if labels[i] == c]
      members = sorted(np.flatnonzero(labels == c), key=lambda i: rank[i])
      assert taken == members[: len(taken)]


def test_even_resample_bad_input():
  with pytest.raises(subset.SelectionError, match="budget = 5"):
    subset.even_resample(np.zeros(4, int), np.arange(4), 5)
  with pytest.raises(subset.SelectionError, match="permutation"):
    subset.even_resample(np.zeros(4, int), np.array([0, 0, 1, 2]), 2)


def test_quality_diversity_select():
  x, truth = _blobs(k=4, per=25)
  # Quality favours cluster 0 overwhelmingly: quality-only picks it alone,
  # diversity spreads the budget over the kept candidates' clusters.
  quality = np.where(truth == 0, -10.0, 0.0) + np.linspace(0, 1, truth.size)
  only = subset.quality_diversity_select(
    quality, x, 12, num_clusters=4, keep_factor=1
  )
  np.testing.assert_array_equal(
    np.sort(only["selected"]), np.sort(subset.top_k(quality, 12, largest=False))
  )
  div = subset.quality_diversity_select(
    quality, x, 12, num_clusters=4, keep_factor=8
  )
  counts = np.bincount(truth[div["selected"]], minlength=4)
  np.testing.assert_array_equal(counts, [3, 3, 3, 3])
  assert len(div["kept"]) == 96


def test_auroc_against_pair_counting():
  rng = np.random.default_rng(0)
  s = rng.integers(0, 5, 40).astype(float)  # many ties
  y = rng.random(40) < 0.4
  pos, neg = s[y], s[~y]
  brute = np.mean(
    [
      1.0 if a > b else 0.5 if a == b else 0.0
      for a, b in itertools.product(pos, neg)
    ]
  )
  assert subset.auroc(s, y) == pytest.approx(brute, abs=1e-12)
  assert subset.auroc([1, 2, 3], [False, False, True]) == 1.0
  with pytest.raises(subset.SelectionError, match="both"):
    subset.auroc([1, 2], [True, True])


def test_top_k_ties_and_budget_errors():
  s = np.array([1.0, 3.0, 3.0, 0.0])
  np.testing.assert_array_equal(subset.top_k(s, 2), [1, 2])
  np.testing.assert_array_equal(subset.top_k(s, 2, largest=False), [3, 0])
  for bad in (0, 5, True, 2.5):
    with pytest.raises(subset.SelectionError, match="budget"):
      subset.top_k(s, bad)
  with pytest.raises(subset.SelectionError, match="finite"):
    subset.top_k([1.0, np.nan], 1)
  with pytest.raises(subset.SelectionError, match="fraction"):
    subset.budget_of(1.5, 10)
  assert subset.budget_of(0.25, 10) == 2  # round half to even: 2.5 -> 2


def test_random_subset():
  a = subset.random_subset(3, 50, 10)
  np.testing.assert_array_equal(a, subset.random_subset(3, 50, 10))
  assert len(set(a.tolist())) == 10 and a.max() < 50
  with pytest.raises(subset.SelectionError, match="budget"):
    subset.random_subset(0, 5, 6)


def test_cluster_coverage():
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  cov = subset.cluster_coverage(labels, [0, 2, 4, 6], 4)
  assert cov == {"covered": 1.0, "entropy": pytest.approx(1.0)}
  cov = subset.cluster_coverage(labels, [0, 1], 4)
  assert cov == {"covered": 0.25, "entropy": 0.0}


def test_classifier_scores_find_the_target():
  rng = np.random.default_rng(0)
  # target texts use bytes 0..9, generic ones 10..19; the pool mixes both
  target = rng.integers(0, 10, (30, 20))
  pool = np.concatenate(
    [rng.integers(0, 10, (20, 20)), rng.integers(10, 20, (80, 20))]
  )
  is_target = np.arange(100) < 20
  f = lambda t: subset.byte_ngram_features(t, buckets=64)
  s = subset.classifier_scores(f(target), f(pool), steps=200)
  assert subset.auroc(s, is_target) > 0.95
  with pytest.raises(subset.SelectionError, match="do not match"):
    subset.classifier_scores(np.zeros((3, 4)), np.zeros((3, 5)))
