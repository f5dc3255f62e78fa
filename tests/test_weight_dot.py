"""``weight_dot``: the model's activation x weight product and its derivatives.

The value must be ``jnp.tensordot``'s exactly; every derivative (reverse,
forward, forward-over-reverse, second order, vmapped) must equal the float64
closed form ``dy/dx = g w^T``, ``dy/dw = x^T g`` within float32 rounding;
symbolic zero tangents must not cost a matmul; and the compiled weight
gradient must be the row-major product the custom rule exists for (the
structural check that catches a regression without timing anything).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights.configs import lm
from dataweights.models import transformer as tr
from dataweights.train.step import lm_loss
from jaxpr_counts import count_primitive

# (x shape, w shape, num_in): the model's uses. Dense (D -> F, F -> D), the
# stacked q/k/v kernels (D -> 3 x H x Dh), the attention output (H x Dh -> D)
# and the tied head (D -> V, w = wte^T).
CASES = [
  ((3, 5, 8), (8, 16), 1),
  ((3, 5, 16), (16, 8), 1),
  ((2, 4, 8), (8, 3, 2, 4), 1),
  ((2, 4, 2, 4), (2, 4, 8), 2),
]


def _arrays(xs, ws, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(xs).astype(np.float32)
  w = rng.standard_normal(ws).astype(np.float32)
  return x, w


def _plain(x, w, n):
  return jnp.tensordot(x, w, axes=n)


@pytest.mark.parametrize("xs,ws,n", CASES)
def test_value_is_tensordot_bitwise(xs, ws, n):
  x, w = _arrays(xs, ws)
  got = jax.jit(tr.weight_dot, static_argnums=2)(x, w, n)
  want = jax.jit(_plain, static_argnums=2)(x, w, n)
  np.testing.assert_array_equal(got, want)
  y = tr.weight_dot(x, w, n, jnp.float32)
  assert y.dtype == jnp.float32 and y.shape == xs[: len(xs) - n] + ws[n:]


@pytest.mark.parametrize("xs,ws,n", CASES)
def test_reverse_mode_equals_float64_closed_form(xs, ws, n):
  x, w = _arrays(xs, ws, seed=1)
  out_shape = xs[: len(xs) - n] + ws[n:]
  g = np.random.default_rng(2).standard_normal(out_shape).astype(np.float32)
  _, vjp = jax.vjp(lambda x, w: tr.weight_dot(x, w, n), x, w)
  gx, gw = jax.jit(vjp)(g)
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  batch = tuple(range(len(xs) - n))
  # dy/dx^T g = g . w^T over the out axes; dy/dw^T g = x^T . g over batch.
  gx_want = np.tensordot(
    g64,
    w64,
    axes=(tuple(range(len(batch), g64.ndim)), tuple(range(n, w64.ndim))),
  )
  gw_want = np.tensordot(x64, g64, axes=(batch, batch))
  np.testing.assert_allclose(gx, gx_want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, gw_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("xs,ws,n", CASES)
def test_forward_and_higher_order_modes_equal_tensordot(xs, ws, n):
  x, w = _arrays(xs, ws, seed=3)
  tx, tw = _arrays(xs, ws, seed=4)
  jvp = lambda f: jax.jvp(lambda x, w: f(x, w, n), (x, w), (tx, tw))
  (y1, t1), (y2, t2) = jvp(tr.weight_dot), jvp(_plain)
  np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(t1, t2, rtol=1e-5, atol=1e-5)

  # Forward over reverse (Hessian-vector products: Chapter 3's filters) and
  # reverse over reverse, on a loss that is not quadratic in w.
  def loss(f, x, w):
    return jnp.sum(jnp.tanh(f(x, w, n)) ** 2)

  def hvp(f):
    grad = jax.grad(lambda w: loss(f, x, w))
    return jax.jvp(grad, (w,), (tw,))[1]

  np.testing.assert_allclose(
    hvp(tr.weight_dot), hvp(_plain), rtol=1e-4, atol=1e-5
  )
  gg = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(loss, 2)(f, x, w) ** 2))(x)
  np.testing.assert_allclose(
    gg(tr.weight_dot), gg(_plain), rtol=1e-4, atol=1e-5
  )
  # vmap over a leading axis of x (per-example gradients, Chapter 5).
  per_ex = lambda f: jax.vmap(
    jax.grad(lambda w, xi: loss(f, xi[None], w)), (None, 0)
  )
  np.testing.assert_allclose(
    per_ex(tr.weight_dot)(w, x), per_ex(_plain)(w, x), rtol=1e-5, atol=1e-6
  )


def test_symbolic_zero_tangents_cost_no_matmul():
  """A frozen weight (stop_gradient) or a constant input adds no product."""
  x, w = _arrays((3, 5, 8), (8, 16))
  frozen_w = jax.make_jaxpr(
    jax.grad(lambda x: tr.weight_dot(x, jax.lax.stop_gradient(w)).sum())
  )(x)
  frozen_x = jax.make_jaxpr(
    jax.grad(lambda w: tr.weight_dot(jax.lax.stop_gradient(x), w).sum())
  )(w)
  both = jax.make_jaxpr(
    jax.grad(lambda x, w: tr.weight_dot(x, w).sum(), (0, 1))
  )(x, w)
  # The forward product, plus one product per differentiated operand.
  assert count_primitive(frozen_w.jaxpr) == 2
  assert count_primitive(frozen_x.jaxpr) == 2
  assert count_primitive(both.jaxpr) == 3
  # ... and the one product left is the right one.
  g_x = jax.grad(lambda x: tr.weight_dot(x, jax.lax.stop_gradient(w)).sum())(x)
  g_w = jax.grad(lambda w: tr.weight_dot(jax.lax.stop_gradient(x), w).sum())(w)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  np.testing.assert_allclose(
    g_x, np.broadcast_to(w64.sum(1), x.shape), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    g_w,
    np.broadcast_to(x64.sum((0, 1))[:, None], w.shape),
    rtol=1e-5,
    atol=1e-5,
  )
  # The barrier exists only on the weight's path.
  assert count_primitive(frozen_w.jaxpr, "optimization_barrier") == 0
  assert count_primitive(frozen_x.jaxpr, "optimization_barrier") == 1


def _transposed_lhs_dots(hlo: str) -> list[str]:
  """Unbatched dots whose left operand is read transposed (contracting
  dimension 0): the form XLA:CPU's YNNPACK kernels do not take."""
  return [
    line
    for line in hlo.splitlines()
    if re.search(r" dot\(", line)
    and "lhs_batch_dims" not in line
    and "lhs_contracting_dims={0}" in line
  ]


def test_compiled_weight_gradients_are_row_major_products():
  """With ``weight_dot=True`` the gradient has no transposed-LHS weight gradient.

  The control: the default model (plain ``jnp.tensordot``) has one per MLP
  kernel (2 per block). If a new XLA stops producing them, the control fails
  and the custom rule should be re-measured (bench_weight_grad.py).
  """
  base = lm.lm_model("smoke", num_layers=2, d_model=32, num_heads=4, d_mlp=64)
  assert base.weight_dot is False  # the published chapters ran without it
  tokens = jax.random.randint(jax.random.key(0), (3, 13), 0, base.vocab_size)

  def grad_hlo(on):
    cfg = dataclasses.replace(base, weight_dot=on)
    graphdef, params = nnx.split(
      tr.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param
    )

    loss = lambda p: lm_loss(
      nnx.merge(graphdef, p), {"tokens_BxL": tokens}, None
    ).mean()
    return jax.jit(jax.grad(loss)).lower(params).compile().as_text()

  assert _transposed_lhs_dots(grad_hlo(True)) == []
  control = _transposed_lhs_dots(grad_hlo(False))
  assert len(control) == 2 * base.num_layers, control


@pytest.mark.parametrize("tie", [True, False])
def test_model_with_weight_dot_equals_default_within_rounding(tie):
  """Logits and gradient with and without the rule, tied and untied head."""
  base = dataclasses.replace(
    lm.lm_model("smoke", num_layers=2, d_model=64, num_heads=4, d_mlp=256),
    remat="none",
    tie_embeddings=tie,
  )
  tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, base.vocab_size)

  def logits_and_grad(on):
    cfg = dataclasses.replace(base, weight_dot=on)
    graphdef, params = nnx.split(
      tr.Transformer(cfg, rngs=nnx.Rngs(2)), nnx.Param
    )

    def loss(p):
      return lm_loss(
        nnx.merge(graphdef, p), {"tokens_BxL": tokens}, None
      ).mean()

    logits = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens[:, :-1]))(params)
    return logits, jax.jit(jax.grad(loss))(params)

  (y_fast, g_fast), (y_plain, g_plain) = (
    logits_and_grad(True),
    logits_and_grad(False),
  )
  np.testing.assert_array_equal(y_fast, y_plain)  # the same products
  leaves = list(zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)))
  assert len(leaves) == len(jax.tree.leaves(g_plain)) > 0
  for a, b in leaves:
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
