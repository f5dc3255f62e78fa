"""Oracles for the chapter-1 synthetic problems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataweights.methods import synthetic as syn


def test_inner_optimum_is_stationary():
  q = syn.sweep_quadratic()
  w = np.array([0.2, 0.5, 0.3])
  theta = syn.inner_optimum(q, w)
  grad = np.sum(w[:, None] * q.a_KxD * (theta[None] - q.c_KxD), axis=0)
  np.testing.assert_allclose(grad, 0.0, atol=1e-12)


def test_bilevel_optimum_matches_brute_force_grid_and_is_stationary():
  q = syn.greedy_quadratic()
  opt = syn.bilevel_optimum(q)
  s = np.linspace(0, 1, 100001)
  vals = syn.val_at(q, np.stack([1 - s, s], 1))
  assert opt["val"] <= vals.min() + 1e-12
  assert abs(opt["w_K"][1] - s[vals.argmin()]) < 2e-5
  # interior optimum: dg/dw2 = 0 by central differences and by the
  # implicit-function condition
  w2, eps = opt["w_K"][1], 1e-6
  fd = (syn.val_at(q, [1 - w2 - eps, w2 + eps]) - syn.val_at(q, [1 - w2 + eps, w2 - eps])) / (2 * eps)
  assert abs(fd) < 1e-6
  assert abs(syn.bilevel_condition(q, w2)) < 1e-6


def test_bilevel_condition_is_minus_derivative():
  q = syn.greedy_quadratic()
  for w2 in (0.2, 0.5, 0.9):
    eps = 1e-6
    fd = (syn.val_at(q, [1 - w2 - eps, w2 + eps]) - syn.val_at(q, [1 - w2 + eps, w2 - eps])) / (2 * eps)
    np.testing.assert_allclose(syn.bilevel_condition(q, w2), -fd, rtol=1e-5, atol=1e-9)


def test_three_domain_optimum_beats_lattice():
  q = syn.sweep_quadratic()
  opt = syn.bilevel_optimum(q, grid=1001)
  rng = np.random.default_rng(0)
  w = rng.dirichlet(np.ones(3), size=20000)
  assert opt["val"] <= syn.val_at(q, w).min() + 1e-10
  assert abs(opt["w_K"].sum() - 1) < 1e-12


def test_greedy_fixed_point_is_biased():
  q = syn.greedy_quadratic()
  opt, greedy = syn.bilevel_optimum(q), syn.greedy_fixed_point(q)
  assert abs(syn.greedy_condition(q, greedy["w_K"][1])) < 1e-8
  assert greedy["val"] > 3 * opt["val"]
  assert abs(greedy["w_K"][1] - opt["w_K"][1]) > 0.3


def test_make_quadratic_rejects_bad_curvature():
  with pytest.raises(ValueError, match="curvature"):
    syn.make_quadratic([[1, -1]], [[0, 0]], [1, 1], [0, 0])


def test_noisy_quadratic_is_unbiased_with_exact_hessian():
  q = syn.sweep_quadratic()
  exact, _ = syn.quadratic_losses(q)
  noisy, _ = syn.noisy_quadratic_losses(q)
  theta = jnp.array([0.3, -0.2])
  xi = syn.noise_sampler(3, 2, 1.0, 4000)(jax.random.key(0))["xi"]
  g = jax.vmap(lambda b: jax.jacrev(noisy)(theta, {"xi": b}))(xi).mean(0)
  np.testing.assert_allclose(g, jax.jacrev(exact)(theta), atol=0.06)


def test_classification_samplers_shapes_and_pools():
  g = syn.classification_domains(5)
  data = syn.make_datasets(g, jax.random.key(0), (30, 10, 20), 50)
  batch = syn.minibatch_sampler(data, 4, 7)(jax.random.key(1))
  assert batch["x"].shape == (7, 3, 4, 5) and batch["y"].shape == (7, 3, 4)
  dl, vl = syn.logistic_losses(data, 0.01)
  p = syn.logistic_params(5)
  np.testing.assert_allclose(dl(p), np.log(2.0), rtol=1e-6)
  assert dl(p, {"x": batch["x"][0], "y": batch["y"][0]}).shape == (3,)
  vb = syn.val_sampler(data, 16)(jax.random.key(2))
  assert vb["x"].shape == (16, 5)
  # domain 2 (10 rows) only ever draws from its first 10 rows
  xs = syn.minibatch_sampler(data, 64, 20)(jax.random.key(3))["x"][:, 1]
  pool = np.asarray(data["x_KxMxD"][1, :10])
  assert all((np.abs(pool - v).sum(1) < 1e-6).any() for v in np.asarray(xs).reshape(-1, 5))
