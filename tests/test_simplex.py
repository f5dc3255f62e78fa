"""Simplex checks, projection and the EG / projected outer updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataweights.methods import simplex
from dataweights.methods.simplex import SimplexError


def _project_reference(v):
  """Sort-based Euclidean projection (Duchi et al. 2008), plain numpy."""
  v = np.asarray(v, dtype=np.float64)
  u = np.sort(v)[::-1]
  css = np.cumsum(u) - 1.0
  rho = np.nonzero(u - css / np.arange(1, v.size + 1) > 0)[0][-1]
  return np.maximum(v - css[rho] / (rho + 1), 0.0)


def _assert_on_simplex(w, atol=1e-6):
  w = np.asarray(w)
  assert w.ndim == 1 and np.all(np.isfinite(w)), w
  assert np.all(w >= 0), w
  np.testing.assert_allclose(w.sum(), 1.0, atol=atol)


def test_check_simplex_accepts_valid_weights():
  for w in ([1.0], [0.2, 0.8], [0.0, 0.0, 1.0], np.full(7, 1 / 7)):
    np.testing.assert_allclose(
      simplex.check_simplex(w), np.asarray(w), rtol=1e-7
    )
  simplex.check_simplex([0.5, 0.5 + 5e-6], atol=1e-5)  # within atol


@pytest.mark.parametrize(
  "w, pattern",
  [
    ([[0.5, 0.5]], r"\[\[0\.5 0\.5\]\] have shape \(1, 2\)"),
    ([], r"shape \(0,\)"),
    (
      [0.5, np.nan, 0.5],
      r"\[0\.5 +nan 0\.5\] have non-finite entries at \[1\]",
    ),
    ([1.5, np.inf], r"non-finite entries at \[1\]"),
    ([1.2, -0.2], r"\[ 1\.2 -0\.2\] have negative entries at \[1\]"),
    ([0.3, 0.3], r"\[0\.3 0\.3\] sum to 0\.6, not 1"),
    (["a", "b"], r"\['a', 'b'\] are not numbers"),
  ],
)
def test_check_simplex_rejects_and_names_the_vector(w, pattern):
  with pytest.raises(SimplexError, match=pattern) as info:
    simplex.check_simplex(w)
  assert "non-negative" in str(info.value) and "sum" in str(info.value)


def test_check_simplex_under_jit_checks_rank_only():
  out = jax.jit(simplex.check_simplex)(jnp.array([0.5, 0.5]))
  np.testing.assert_allclose(out, [0.5, 0.5])
  with pytest.raises(SimplexError, match=r"shape \(1, 2\)"):
    jax.jit(simplex.check_simplex)(jnp.ones((1, 2)))


def test_project_simplex_matches_sort_reference():
  rng = np.random.default_rng(0)
  project = jax.jit(simplex.project_simplex)
  fallback = jax.jit(simplex._projection_simplex_sort)
  for K in (1, 3, 50):
    for scale in (0.01, 1.0, 100.0):
      v_K = rng.normal(size=K) * scale + rng.normal()
      ref_K = _project_reference(v_K)
      np.testing.assert_allclose(
        project(jnp.asarray(v_K, jnp.float32)),
        ref_K,
        rtol=1e-5,
        atol=1e-5 * max(1.0, scale),
      )
      np.testing.assert_allclose(
        fallback(jnp.asarray(v_K, jnp.float32)),
        ref_K,
        rtol=1e-5,
        atol=1e-5 * max(1.0, scale),
      )
  # Points already on the simplex are fixed points.
  w_K = rng.dirichlet(np.ones(50)).astype(np.float32)
  np.testing.assert_allclose(project(w_K), w_K, atol=1e-6)
  with pytest.raises(SimplexError, match=r"shape \(2, 2\)"):
    simplex.project_simplex(jnp.ones((2, 2)))


def test_eg_update_closed_form_and_direction():
  w_K = jnp.array([0.2, 0.3, 0.5])
  h_K = jnp.array([1.0, -0.5, 0.25])
  beta = 0.7
  expect_K = np.asarray(w_K) * np.exp(-beta * np.asarray(h_K))
  np.testing.assert_allclose(
    simplex.eg_update(w_K, h_K, beta), expect_K / expect_K.sum(), rtol=1e-6
  )
  # Zero weights stay zero; huge beta * h neither overflows nor NaNs.
  w0_K = jnp.array([0.0, 0.5, 0.5])
  out_K = simplex.eg_update(w0_K, jnp.array([-1e6, 1e6, 0.0]), 1e3)
  np.testing.assert_allclose(out_K, [0.0, 0.0, 1.0], atol=1e-7)
  # Projected step: closed form where the projection is inactive.
  np.testing.assert_allclose(
    simplex.projected_update(w_K, h_K, 0.01),
    np.asarray(w_K) - 0.01 * (np.asarray(h_K) - np.mean(np.asarray(h_K))),
    rtol=1e-6,
  )


@pytest.mark.parametrize("update", ["eg", "pgd"])
def test_updates_stay_on_simplex_over_many_random_steps(update):
  fn = {"eg": simplex.eg_update, "pgd": simplex.projected_update}[update]
  step = jax.jit(fn)
  rng = np.random.default_rng(1)
  for K in (2, 5):
    w_K = jnp.full((K,), 1.0 / K)
    for i in range(60):
      beta = float(10.0 ** rng.uniform(-3, 4))  # includes very large beta
      h_K = jnp.asarray(
        rng.normal(size=K) * 10.0 ** rng.uniform(-2, 3), jnp.float32
      )
      w_K = step(w_K, h_K, beta)
      _assert_on_simplex(w_K)
      if update == "eg" and i % 20 == 19:
        w_K = jnp.full((K,), 1.0 / K)  # leave the vertex EG collapsed to


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_beta_raises_naming_it(beta):
  w_K, h_K = jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])
  for fn in (simplex.eg_update, simplex.projected_update):
    with pytest.raises(SimplexError, match=f"beta = {beta!r}"):
      fn(w_K, h_K, beta)
