"""``drop_noop_reduce_precision``: the gradient program without JAX's no-op
float32 ``reduce_precision`` on remat residuals.

The pass must remove exactly the operations that are the identity (float32 /
float64 rounded to their own format), in nested jaxprs too, keep the others
(bfloat16 residuals, a real rounding), leave every value unchanged (checked
against a float64 closed form and against JAX's own program), compose with
jit / vmap / scan / closures / keyword arguments, and be on in the train
step's gradient (checked on the compiled program, with a control).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.models.transformer import Transformer
from dataweights.train import optim
from dataweights.train.jaxpr_passes import (
  drop_noop_reduce_precision,
  is_noop_reduce_precision,
)
from dataweights.train.state import init_train_state
from dataweights.train.step import make_grad_fn
from jaxpr_counts import count_primitive

_SAVE_DOTS = jax.checkpoint_policies.dots_saveable


def _roundings(closed_jaxpr) -> int:
  """``reduce_precision`` equations, nested ones included (the float32
  programs below have no other kind, so these are the no-op ones)."""
  return count_primitive(closed_jaxpr.jaxpr, "reduce_precision")


def _two_layer(w1, w2, x):
  """``sum(tanh(tanh(x w1) w2))`` with both dots saved by remat."""

  def net(w1, w2, x):
    return jnp.sum(jnp.tanh(jnp.tanh(x @ w1) @ w2))

  return jax.checkpoint(net, policy=_SAVE_DOTS)(w1, w2, x)


def _closed_form(w1, w2, x):
  """float64 gradient of ``_two_layer`` with respect to (w1, w2)."""
  w1, w2, x = (np.asarray(a, np.float64) for a in (w1, w2, x))
  h = np.tanh(x @ w1)
  y = np.tanh(h @ w2)
  g_z2 = 1 - y**2
  g_h = g_z2 @ w2.T
  g_z1 = g_h * (1 - h**2)
  return x.T @ g_z1, h.T @ g_z2


def _data(seed=0, n=6, d=5, f=7, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return tuple(
    (0.5 * rng.standard_normal(s)).astype(dtype)
    for s in ((d, f), (f, 3), (n, d))
  )


def _eqn(fn, *args):
  (eqn,) = jax.make_jaxpr(fn)(*args).jaxpr.eqns
  return eqn


def test_identifies_exactly_the_identity_roundings():
  x32 = jnp.ones(3, jnp.float32)
  rp = jax.lax.reduce_precision
  assert is_noop_reduce_precision(_eqn(lambda x: rp(x, 8, 23), x32))
  assert not is_noop_reduce_precision(_eqn(lambda x: rp(x, 5, 10), x32))
  assert not is_noop_reduce_precision(_eqn(lambda x: rp(x, 8, 22), x32))
  xb = jnp.ones(3, jnp.bfloat16)
  assert not is_noop_reduce_precision(_eqn(lambda x: rp(x, 8, 7), xb))
  assert not is_noop_reduce_precision(_eqn(jnp.tanh, x32))
  with jax.enable_x64(True):
    x64 = jnp.ones(3, jnp.float64)
    assert is_noop_reduce_precision(_eqn(lambda x: rp(x, 11, 52), x64))


def test_remat_residuals_lose_reduce_precision_values_unchanged():
  w1, w2, x = _data()
  grad = jax.grad(_two_layer, argnums=(0, 1))
  before = jax.make_jaxpr(grad)(w1, w2, x)
  # The control: JAX rounds both saved dots (and nothing else) to float32.
  assert _roundings(before) == 2
  fast = drop_noop_reduce_precision(grad)
  after = jax.make_jaxpr(fast)(w1, w2, x)
  assert _roundings(after) == 0
  g_fast = jax.jit(fast)(w1, w2, x)
  g_jax = jax.jit(grad)(w1, w2, x)
  for got, want, exact in zip(g_fast, g_jax, _closed_form(w1, w2, x)):
    np.testing.assert_allclose(got, exact, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  # Eager evaluation of the rewritten jaxpr, too.
  for got, want in zip(fast(w1, w2, x), g_jax):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_bfloat16_residuals_and_real_roundings_are_kept():
  w1, w2, x = (a.astype(jnp.bfloat16) for a in _data(1))

  def loss(w1, w2, x):
    # A rounding that changes values: must stay.
    x = jax.lax.reduce_precision(x.astype(jnp.float32), 5, 4)
    return _two_layer(w1, w2, x.astype(jnp.bfloat16)).astype(jnp.float32)

  grad = jax.grad(loss, argnums=(0, 1))
  n_before = count_primitive(
    jax.make_jaxpr(grad)(w1, w2, x).jaxpr, "reduce_precision"
  )
  fast = drop_noop_reduce_precision(grad)
  jaxpr = jax.make_jaxpr(fast)(w1, w2, x).jaxpr
  # bfloat16 residuals (2) and the explicit rounding (1) all remain.
  assert n_before >= 3
  assert count_primitive(jaxpr, "reduce_precision") == n_before
  for got, want in zip(jax.jit(fast)(w1, w2, x), jax.jit(grad)(w1, w2, x)):
    np.testing.assert_array_equal(got, want)


def test_nested_jaxprs_are_rewritten():
  """Residuals inside a nested jit, a scan body and a cond branch."""
  w1, w2, x = _data(2)

  inner = jax.jit(_two_layer)

  def loss(w1, w2, x):
    def body(c, xi):
      return c + inner(w1, w2, xi[None]), None

    scanned, _ = jax.lax.scan(body, jnp.float32(0), x)
    branch = jax.lax.cond(
      scanned > -1e9,
      lambda: _two_layer(w1, w2, x),
      lambda: jnp.float32(0),
    )
    return scanned + branch

  grad = jax.grad(loss, argnums=(0, 1))
  assert _roundings(jax.make_jaxpr(grad)(w1, w2, x)) > 2
  fast = drop_noop_reduce_precision(grad)
  assert _roundings(jax.make_jaxpr(fast)(w1, w2, x)) == 0
  exact = [2 * g for g in _closed_form(w1, w2, x)]  # scan sum + branch
  for got, want, ref in zip(
    jax.jit(fast)(w1, w2, x), jax.jit(grad)(w1, w2, x), exact
  ):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)


def test_composes_with_jit_closures_vmap_and_keywords():
  w1, w2, x = _data(3)

  @jax.jit
  def outer(w1, w2, x, scale):
    # scale is a tracer of the outer jit, closed over by the pass's trace.
    def loss(w1, w2, *, x):
      return scale * _two_layer(w1, w2, x)

    fast = drop_noop_reduce_precision(jax.value_and_grad(loss, (0, 1)))
    value, grads = fast(w1, w2, x=x)
    per_row = jax.vmap(
      lambda xi: drop_noop_reduce_precision(jax.grad(loss))(w1, w2, x=xi[None])
    )(x)
    return value, grads, per_row

  value, (g1, g2), per_row = outer(w1, w2, x, jnp.float32(3.0))
  e1, e2 = _closed_form(w1, w2, x)
  np.testing.assert_allclose(value, 3 * _two_layer(w1, w2, x), rtol=1e-6)
  np.testing.assert_allclose(g1, 3 * e1, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(g2, 3 * e2, rtol=2e-5, atol=1e-6)
  # Per-example gradients sum to the batch gradient.
  np.testing.assert_allclose(per_row.sum(0), 3 * e1, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_train_gradient_program_has_no_reduce_precision(accumulation_steps):
  """The train step's gradient (remat'd transformer) is compiled without
  ``reduce-precision``; JAX's program (the control) has them; same values."""
  cfg = lm.lm_model(
    "smoke", num_layers=2, d_model=32, num_heads=4, d_mlp=64, max_len=16
  )
  assert cfg.remat != "none"  # the default remat saves residuals
  tx = optim.make_optimizer(train_configs.train("smoke"))
  state, static, _ = init_train_state(
    Transformer(cfg, rngs=nnx.Rngs(0)), tx, seed=0
  )
  rng = np.random.default_rng(0)
  batch = {
    "tokens_BxL": jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 17))),
  }
  weight_B = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
  args = (state.params, state.model_state, batch, weight_B, None)

  def run(drop):
    fn = jax.jit(
      make_grad_fn(
        static,
        accumulation_steps=accumulation_steps,
        drop_reduce_precision=drop,
      )
    )
    return fn.lower(*args).compile().as_text(), fn(*args)

  hlo_fast, (loss_f, loss_B_f, g_f, _) = run(True)
  hlo_jax, (loss_j, loss_B_j, g_j, _) = run(False)
  assert "reduce-precision" not in hlo_fast
  assert "reduce-precision" in hlo_jax
  np.testing.assert_array_equal(loss_B_f, loss_B_j)  # forward untouched
  np.testing.assert_allclose(loss_f, loss_j, rtol=1e-7)
  leaves = list(zip(jax.tree.leaves(g_f), jax.tree.leaves(g_j)))
  assert len(leaves) > 10
  for a, b in leaves:
    scale = float(jnp.max(jnp.abs(b))) or 1.0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale)


def test_each_call_traces_afresh():
  """Trace-time state (like ``lisa.fixed_blocks``' active set, a context
  variable) must reach every call: no trace is reused from a cache."""
  w1, w2, x = _data(4)
  state = {"scale": 1.0}

  def loss(w1, w2, x):
    return state["scale"] * _two_layer(w1, w2, x)

  fast = drop_noop_reduce_precision(jax.grad(loss))
  first = fast(w1, w2, x)
  state["scale"] = 2.0
  second = jax.jit(fast)(w1, w2, x)
  state["scale"] = 3.0
  third = fast(w1, w2, x)
  np.testing.assert_allclose(second, 2 * first, rtol=1e-5)
  np.testing.assert_allclose(third, 3 * first, rtol=1e-5)
