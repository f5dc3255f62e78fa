"""SAR / GAR against explicit per-example gradients (an independent oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dataweights.methods import diagnostics


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _loss_B(theta, batch):
  logits = batch["x"] @ theta["w"] + theta["b"][None, :]
  y = batch["y"]
  return (
    jax.nn.logsumexp(logits, -1)
    - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
  )


def _batch(rng, m, shift):
  return {
    "x": jnp.asarray(rng.normal(size=(m, 5)) + shift),
    "y": jnp.asarray(rng.integers(0, 3, m)),
  }


def test_rates_equal_the_explicit_cosine_comparison():
  rng = np.random.default_rng(0)
  theta = {"w": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.zeros(3)}
  s_ref, g_ref = _batch(rng, 20, 1.0), _batch(rng, 20, -1.0)
  s_ev, g_ev = _batch(rng, 31, 1.0), _batch(rng, 29, -1.0)
  got = diagnostics.alignment_rates(
    _loss_B,
    theta,
    specific_ref=s_ref,
    generic_ref=g_ref,
    specific_eval=s_ev,
    generic_eval=g_ev,
  )
  flat, unravel = ravel_pytree(theta)

  def grads(batch):  # explicit per-example gradient matrix
    return np.asarray(jax.jacrev(lambda f: _loss_B(unravel(f), batch))(flat))

  gs, gg = grads(s_ref).mean(0), grads(g_ref).mean(0)

  def rate(batch):
    G = grads(batch)
    cos = lambda v: G @ v / (np.linalg.norm(G, axis=1) * np.linalg.norm(v))  # noqa: E731
    return np.mean(cos(gs) > cos(gg))

  np.testing.assert_allclose(got["sar"], rate(s_ev))
  np.testing.assert_allclose(got["gar"], rate(g_ev))
  np.testing.assert_allclose(
    got["cos_sg"],
    gs @ gg / (np.linalg.norm(gs) * np.linalg.norm(gg)),
    rtol=1e-10,
  )


def test_rates_are_high_for_look_alikes_and_low_for_others():
  # Specific examples all carry label 0, generic ones label 2: a specific
  # example's gradient looks like the specific batch's (SAR near 1), a
  # generic one's like the generic batch's (GAR near 0). A swapped
  # comparison would give the opposite.
  rng = np.random.default_rng(1)
  theta = {"w": jnp.asarray(0.1 * rng.normal(size=(5, 3))), "b": jnp.zeros(3)}

  def batch(m, label):
    return {"x": jnp.asarray(rng.normal(size=(m, 5))), "y": jnp.full(m, label)}

  got = diagnostics.alignment_rates(
    _loss_B,
    theta,
    specific_ref=batch(32, 0),
    generic_ref=batch(32, 2),
    specific_eval=batch(40, 0),
    generic_eval=batch(40, 2),
  )
  assert got["sar"] > 0.8 and got["gar"] < 0.2, got
