"""Big-batch selection: the claimed sampling distributions, statistically.

Oracles: exact inclusion probabilities of successive sampling without
replacement (enumerating every ordered draw), the multinomial for draws
with replacement, and the Hansen-Hurwitz unbiasedness identity. Fixed
seeds; each z-test uses a Bonferroni-corrected 1e-4 false-alarm bound.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dataweights.methods import selection as sel

W = np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
N, K = W.shape[0], 3
DRAWS = 40_000


def _successive_inclusion(w, k):
  """P(i kept) when k items are drawn one by one without replacement ∝ w."""
  pi = np.zeros(len(w))
  for seq in itertools.permutations(range(len(w)), k):
    p, left = 1.0, w.sum()
    for i in seq:
      p *= w[i] / left
      left -= w[i]
    pi[list(seq)] += p
  return pi


def _draw(how, draws=DRAWS, seed=0):
  keys = jax.random.split(jax.random.key(seed), draws)
  logw = jnp.log(jnp.asarray(W, jnp.float32))
  return jax.jit(jax.vmap(lambda k: sel.select(k, logw, K, how)))(keys)


def _z_ok(count, n, p, tests):
  z = np.abs(count - n * p) / np.sqrt(n * p * (1 - p))
  return z < stats.norm.isf(1e-4 / (2 * tests))


def test_without_replacement_matches_successive_sampling_inclusions():
  idx, wt = _draw("sample")
  assert wt is None
  idx = np.asarray(idx)
  assert all(len(set(r)) == K for r in idx[:500])  # distinct rows
  counts = np.bincount(idx.ravel(), minlength=N)
  pi = _successive_inclusion(W, K)
  np.testing.assert_allclose(pi.sum(), K)
  assert _z_ok(counts, DRAWS, pi, N).all(), (counts / DRAWS, pi)
  # ... and it is detectably not the naive "k w" (πps) inclusion:
  naive = np.minimum(K * W, 1.0)
  assert not _z_ok(counts, DRAWS, naive, N).all()


def test_with_replacement_is_multinomial():
  idx, _ = _draw("replacement", seed=1)
  counts = np.bincount(np.asarray(idx).ravel(), minlength=N)
  assert stats.chisquare(counts, counts.sum() * W).pvalue > 1e-4
  # some draws repeat a row
  assert any(len(set(r)) < K for r in np.asarray(idx)[:200])


def test_topk_is_the_k_largest():
  idx, _ = sel.select(jax.random.key(0), jnp.log(jnp.asarray(W)), K, "topk")
  assert sorted(np.asarray(idx).tolist()) == [3, 4, 5]


def test_importance_weights_make_the_mean_unbiased():
  f = np.array([3.0, -1.0, 0.5, 2.0, 7.0, -4.0])
  idx, wt = _draw("importance", seed=2)
  idx, wt = np.asarray(idx), np.asarray(wt)
  np.testing.assert_allclose(wt, 1.0 / (N * W[idx]), rtol=1e-5)
  est = (wt * f[idx]).mean(1)  # one estimate per draw of k rows
  se = est.std(ddof=1) / np.sqrt(DRAWS)
  assert abs(est.mean() - f.mean()) < 4.5 * se, (est.mean(), f.mean(), se)
  # The plain (unweighted) mean of the kept rows is biased towards high w.
  plain = f[idx].mean(1)
  assert abs(plain.mean() - f.mean()) > 10 * se


def test_bad_inputs():
  logw = jnp.zeros(4)
  with pytest.raises(ValueError, match="selection = 'best' is invalid"):
    sel.select(jax.random.key(0), logw, 2, "best")
  with pytest.raises(ValueError, match="downsampling = N / k must be >= 1"):
    sel.select(jax.random.key(0), logw, 5, "sample")
  with pytest.raises(ValueError, match="k must lie in"):
    sel.random_rows(jax.random.key(0), 4, 5)
