"""Influence scores: exact formula, leave-one-out, G-DIG, LESS (float64).

Oracles: hand-written gradients and Hessian of binary logistic regression,
actual leave-one-out retraining (Newton to convergence), the exact
empirical Fisher, and numpy cosines.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dataweights.methods import influence, kfac, subset
from dataweights.methods.projection import Projector
from dataweights.models.mlp import MLP, cross_entropy


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _logistic_data(n=40, d=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x @ np.array([1.0, -2.0, 0.5])[:d] + 0.5 * rng.normal(size=n) > 0
  return x, y.astype(np.float64)


def _bin_loss(theta, batch):
  z = batch["x"] @ theta
  return jax.nn.softplus(z) - batch["y"] * z


def _fit(x, y, l2, theta0=None, iters=50, n=None):
  """Newton on (1/n) sum logistic loss + (l2/2)||theta||^2 (numpy).

  ``n`` defaults to the number of rows; leave-one-out keeps the full data
  set's ``n`` (the example's term is dropped from the sum, the objective's
  scale and the regulariser stay: the removal that influence describes).
  """
  n = len(y) if n is None else n
  theta = np.zeros(x.shape[1]) if theta0 is None else theta0.copy()
  for _ in range(iters):
    p = 1 / (1 + np.exp(-x @ theta))
    g = x.T @ (p - y) / n + l2 * theta
    h = (x * (p * (1 - p))[:, None]).T @ x / n + l2 * np.eye(x.shape[1])
    step = np.linalg.solve(h, g)
    theta -= step
    if np.abs(step).max() < 1e-14:
      break
  return theta


def test_influence_equals_the_explicit_formula():
  x, y = _logistic_data()
  xq, yq = _logistic_data(10, seed=1)
  l2 = 0.1
  theta = _fit(x, y, l2)
  s = influence.hessian_influence(
    _bin_loss, jnp.asarray(theta), {"x": x, "y": y}, {"x": xq, "y": yq}, l2=l2
  )
  # By hand: per-example gradient (p - y) x, Hessian mean p(1-p) x x^T + l2 I.
  p = 1 / (1 + np.exp(-x @ theta))
  g_n = (p - y)[:, None] * x
  h = (x * (p * (1 - p))[:, None]).T @ x / len(y) + l2 * np.eye(3)
  pq = 1 / (1 + np.exp(-xq @ theta))
  g_q = ((pq - yq)[:, None] * xq).mean(0)
  np.testing.assert_allclose(s, -g_n @ np.linalg.solve(h, g_q), rtol=1e-10)
  # The empirical-Fisher variant by hand.
  s_f = influence.hessian_influence(
    _bin_loss,
    jnp.asarray(theta),
    {"x": x, "y": y},
    {"x": xq, "y": yq},
    l2=l2,
    curvature="fisher",
    damping=0.3,
  )
  f = g_n.T @ g_n / len(y) + (l2 + 0.3) * np.eye(3)
  np.testing.assert_allclose(s_f, -g_n @ np.linalg.solve(f, g_q), rtol=1e-10)


def _loo_errors(n):
  x, y = _logistic_data(n)
  xq, yq = _logistic_data(20, seed=1)
  l2 = 0.05
  theta = _fit(x, y, l2)
  s = np.asarray(
    influence.hessian_influence(
      _bin_loss, jnp.asarray(theta), {"x": x, "y": y}, {"x": xq, "y": yq}, l2=l2
    )
  )

  def qloss(th):
    return float(_bin_loss(jnp.asarray(th), {"x": xq, "y": yq}).mean())

  base = qloss(theta)
  actual = np.array(
    [
      qloss(_fit(np.delete(x, i, 0), np.delete(y, i), l2, theta, n=n)) - base
      for i in range(n)
    ]
  )
  predicted = -s / n
  corr = np.corrcoef(actual, predicted)[0, 1]
  return corr, np.abs(predicted - actual).max() / np.abs(actual).max()


def test_influence_predicts_leave_one_out_retraining():
  # Removing z_i changes the mean query loss by -s_i / N to first order;
  # checked against actual retraining without each example. The relative
  # error is second order: it must shrink as N grows.
  corr_small, err_small = _loo_errors(60)
  corr_big, err_big = _loo_errors(240)
  assert corr_small > 0.99 and corr_big > 0.99
  assert err_small < 0.2
  assert err_big < 0.5 * err_small


def test_gdig_score_equals_exact_fisher_influence_where_kfac_is_exact():
  # One linear layer at W = 0, product data: K-FAC is the exact empirical
  # Fisher, so G-DIG's score equals influence with that Fisher + damping.
  model = MLP((3, 2), rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(jnp.zeros_like, params)
  rng = np.random.default_rng(0)
  xs, ts = rng.normal(size=(4, 3)), rng.normal(size=(5, 2))
  pool = {
    "x_BxI": jnp.asarray(np.repeat(xs, 5, 0)),
    "t_BxO": jnp.asarray(np.tile(ts, (4, 1))),
  }
  seed_batches = [
    {
      "x_BxI": jnp.asarray(rng.normal(size=(3, 3))),
      "t_BxO": jnp.asarray(rng.normal(size=(3, 2))),
    }
    for _ in range(2)
  ]

  def sq(m, b):
    return 0.5 * jnp.sum((m(b["x_BxI"]) - b["t_BxO"]) ** 2, -1)

  layers = ["layers/0"]
  stats = jax.jit(lambda b: kfac.layer_stats(sq, gd, params, rest, b, layers))
  fit = kfac.fit_kfac(stats, [pool])
  lam = 0.5
  u = influence.gdig_direction(fit, stats, seed_batches, damping=lam)
  s = np.asarray(influence.gdig_scores_from_stats(stats(pool), u))
  theta, flat_loss, _ = influence.flat_problem(
    lambda p, b: sq(nnx.merge(gd, p, rest, copy=True), b), params
  )
  want = np.mean(
    [
      influence.hessian_influence(
        flat_loss, theta, pool, q, curvature="fisher", damping=lam
      )
      for q in seed_batches
    ],
    axis=0,
  )
  np.testing.assert_allclose(s, want, rtol=1e-9, atol=1e-12)


def _planted_problem(seed=0, n_generic=60, n_planted=8):
  """Generic examples from several clusters with shuffled labels; planted
  ones from the target cluster with the target's label rule."""
  rng = np.random.default_rng(seed)
  d, k = 6, 3
  centers = rng.normal(size=(4, d)) * 3
  gx = centers[rng.integers(1, 4, n_generic)] + rng.normal(size=(n_generic, d))
  gy = rng.integers(0, k, n_generic)
  px = centers[0] + rng.normal(size=(n_planted, d))
  py = np.zeros(n_planted, np.int64)
  sx = centers[0] + rng.normal(size=(10, d))
  sy = np.zeros(10, np.int64)
  perm = rng.permutation(n_generic + n_planted)
  x = np.concatenate([gx, px])[perm]
  y = np.concatenate([gy, py])[perm]
  planted = np.concatenate(
    [np.zeros(n_generic, bool), np.ones(n_planted, bool)]
  )[perm]
  pool = {"x_BxI": jnp.asarray(x), "y_B": jnp.asarray(y)}
  seed_set = {"x_BxI": jnp.asarray(sx), "y_B": jnp.asarray(sy)}
  return pool, seed_set, planted


@pytest.mark.slow
def test_planted_examples_ranked_top_by_less_and_gdig():
  pool, seed_set, planted = _planted_problem()
  model = MLP((6, 8, 3), rngs=nnx.Rngs(1), param_dtype=jnp.float64)
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p, b: cross_entropy(nnx.merge(gd, p, rest, copy=True), b)
  proj = Projector(dim=64, seed=0, dtype=jnp.float64)
  feat = influence.less_feature_fn(proj)
  tr_f = influence.project_pool(loss, params, [pool], feat)
  va_f = influence.project_pool(loss, params, [seed_set], feat)
  less = influence.less_scores([tr_f], [va_f], [1.0])
  k = int(planted.sum())
  assert planted[subset.top_k(less, k)].mean() >= 0.75
  assert subset.auroc(less, planted) > 0.95

  layers = ["layers/0", "layers/1"]
  stats = jax.jit(
    lambda b: kfac.layer_stats(cross_entropy, gd, params, rest, b, layers)
  )
  fit = kfac.fit_kfac(stats, [pool])
  u = influence.gdig_direction(fit, stats, [seed_set], damping=0.5)
  gdig = np.asarray(influence.gdig_scores_from_stats(stats(pool), u))
  assert planted[subset.top_k(gdig, k, largest=False)].mean() >= 0.75
  assert subset.auroc(-gdig, planted) > 0.95


def test_less_scores_explicit_and_streamed(tmp_path):
  rng = np.random.default_rng(0)
  tr1, tr2 = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
  va1, va2 = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))

  def cos(a, b):
    return (a @ b.T) / np.outer(
      np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    )

  want = 0.3 * cos(tr1, va1).mean(1) + 0.1 * cos(tr2, va2).mean(1)
  got = influence.less_scores([tr1, tr2], [va1, va2], [0.3, 0.1])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  groups = np.array([0, 0, 1, 1])
  want_g = 0.3 * np.maximum(
    cos(tr1, va1)[:, :2].mean(1), cos(tr1, va1)[:, 2:].mean(1)
  )
  got_g = influence.less_scores([tr1], [va1], [0.3], val_groups=groups)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-7)
  from dataweights.methods.gradstore import GradientStore

  st = GradientStore.create(tmp_path / "g", 9, 5, dtype="float32")
  st.append(tr1)
  st = st.close()
  np.testing.assert_allclose(
    influence.less_scores([st], [va1], [0.3], chunk_rows=2),
    0.3 * cos(tr1, va1).mean(1),
    rtol=1e-5,
    atol=1e-7,
  )
  with pytest.raises(ValueError, match="per checkpoint"):
    influence.less_scores([tr1, tr2], [va1], [0.3])


def test_adam_preconditioning():
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  state = tx.init(params)
  g = {"w": jnp.array([0.3, -0.1]), "b": jnp.array(2.0)}
  _, state = tx.update(g, state, params)
  mu, nu = influence.adam_moments(state)
  np.testing.assert_allclose(
    mu["w"],
    0.1 * np.array([0.3, -0.1]) * min(1.0, 1.0 / np.sqrt(0.09 + 0.01 + 4.0)),
  )
  g2 = {"w": jnp.array([1.0, 1.0]), "b": jnp.array(-1.0)}
  out = influence.adam_precondition(g2, mu, nu, b1=0.9, b2=0.999, eps=1e-8)
  m = 0.9 * np.asarray(mu["w"]) + 0.1 * 1.0
  v = 0.999 * np.asarray(nu["w"]) + 0.001 * 1.0
  np.testing.assert_allclose(out["w"], m / (np.sqrt(v) + 1e-8), rtol=1e-12)
  with pytest.raises(ValueError, match="no Adam state"):
    influence.adam_moments(optax.sgd(0.1).init(params))


def test_bad_inputs_name_the_problem():
  pool, seed_set, _ = _planted_problem()
  with pytest.raises(subset.SelectionError, match="budget = 100 .* pool of 68"):
    subset.top_k(np.zeros(68), 100)
  image_seed = {"x_MxHxW": np.zeros((3, 8, 8), np.float32)}
  with pytest.raises(subset.SelectionError, match="not the same modality"):
    subset.check_same_modality(pool, image_seed)
  tokens = {"tokens_BxL": np.zeros((4, 16), np.int32)}
  with pytest.raises(subset.SelectionError, match="not the same modality"):
    subset.check_same_modality(
      tokens, {"tokens_BxL": np.zeros((4, 16), np.float32)}
    )
  model = MLP((6, 8, 3), rngs=nnx.Rngs(1))
  with pytest.raises(kfac.LayerError, match="'blocks/0/mlp/fc' does not exist"):
    kfac.check_layers(model, ["blocks/0/mlp/fc"])
  with pytest.raises(ValueError, match="at least one seed batch"):
    influence.gdig_direction(None, None, [])
  with pytest.raises(ValueError, match="curvature"):
    influence.hessian_influence(None, jnp.zeros(2), {}, {}, curvature="ggn")
