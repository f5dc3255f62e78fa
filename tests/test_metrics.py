"""Per-domain reductions, domain weights per example, history, NaN keys."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dataweights import metrics


def _direct_means(loss_B, domain_B, k):
  out, cnt = np.zeros(k), np.zeros(k)
  for d in range(k):
    sel = domain_B == d
    cnt[d] = sel.sum()
    out[d] = loss_B[sel].mean() if sel.any() else 0.0
  return out, cnt


def test_per_domain_mean_equals_direct_mean_and_is_permutation_invariant():
  rng = np.random.default_rng(0)
  loss_B = rng.normal(size=37).astype(np.float32) ** 2
  domain_B = rng.integers(0, 4, size=37)
  domain_B[domain_B == 2] = 0  # domain 2 absent: mean 0, count 0
  mean_K, count_K = metrics.per_domain_mean(loss_B, domain_B, 5)
  want_K, want_count_K = _direct_means(loss_B, domain_B, 5)
  np.testing.assert_allclose(mean_K, want_K, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(count_K, want_count_K)
  assert count_K[2] == 0 and mean_K[2] == 0 and np.all(np.isfinite(mean_K))
  perm = rng.permutation(37)
  mean_p, count_p = metrics.per_domain_mean(loss_B[perm], domain_B[perm], 5)
  np.testing.assert_allclose(mean_p, mean_K, rtol=1e-6)
  np.testing.assert_array_equal(count_p, count_K)


def test_weighted_per_domain_mean():
  loss_B = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  domain_B = np.array([0, 0, 1, 1])
  weight_B = np.array([1.0, 3.0, 0.0, 2.0], np.float32)
  mean_K, count_K = metrics.per_domain_mean(loss_B, domain_B, 2, weight_B)
  np.testing.assert_allclose(mean_K, [(1 + 6) / 4, 4.0], rtol=1e-6)
  np.testing.assert_allclose(count_K, [4.0, 2.0])


def test_domain_to_example_weights_realise_sum_w_K_L_K():
  rng = np.random.default_rng(1)
  loss_B = rng.uniform(1, 3, size=20).astype(np.float32)
  domain_B = rng.integers(0, 3, size=20)
  w_K = np.array([0.5, 0.3, 0.2], np.float32)
  weight_B = metrics.domain_to_example_weights(domain_B, w_K)
  mean_K, _ = _direct_means(loss_B, domain_B, 3)
  np.testing.assert_allclose(
    float(jnp.sum(weight_B * loss_B)), float(w_K @ mean_K), rtol=1e-6
  )
  raw = metrics.domain_to_example_weights(
    domain_B, w_K, per_domain_mean_weights=False
  )
  np.testing.assert_allclose(raw, w_K[domain_B])


def test_domain_metrics_keys_and_bad_names():
  out = metrics.domain_metrics(
    jnp.array([1.0, 2.0]), jnp.array([3, 4]), ["web", "code"]
  )
  assert set(out) == {
    "loss/domain/web",
    "loss/domain/code",
    "count/domain/web",
    "count/domain/code",
  }
  with pytest.raises(ValueError, match="3 domain names.*2 domains"):
    metrics.domain_metrics(
      jnp.array([1.0, 2.0]), jnp.array([1, 1]), ["a", "b", "c"]
    )


def test_global_norm():
  tree = {"a": jnp.array([3.0]), "b": {"c": jnp.array([[4.0]])}}
  assert float(metrics.global_norm(tree)) == pytest.approx(5.0)


def test_nonfinite_keys():
  m = {
    "loss": np.float32(np.nan),
    "grad_norm": np.float32(1.0),
    "x": np.array([1.0, np.inf]),
    "step": np.int32(3),
  }
  assert metrics.nonfinite_keys(m) == ["loss", "x"]


def test_history_round_trips_through_json_and_truncates():
  h = metrics.History()
  h.append(1, {"loss": np.float32(2.5), "vec": np.zeros(3)})
  h.append(2, {"loss": np.float32(np.nan)})
  h.append(3, {"loss": jnp.float32(1.5)})
  h2 = metrics.History.from_state_dict(json.loads(json.dumps(h.state_dict())))
  assert h2.series("loss") == ([1, 2, 3], [2.5, "nan", 1.5])
  assert "vec" not in h2.rows[0]
  h2.truncate(2)
  assert len(h2) == 2 and h2.last()["step"] == 2
