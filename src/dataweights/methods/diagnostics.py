"""SAR and GAR: does the model's gradient tell useful examples apart?

[reconstruction] The seed paper (Grangier, Ablin & Hannun) names a
diagnostic that predicts when online filtering helps; its exact formula
was not readable. Our reading of the seed's description (the book's
Sources §2):

* **SAR** (specific acceleration rate): the fraction of *specific* examples
  whose loss gradient aligns better (cosine) with the gradient of a
  specific batch than with the gradient of a generic batch;
* **GAR**: the same fraction over *generic* examples.

A SAR near 50% says a specific example's gradient looks no more like the
specific gradient than like the generic one: the bilevel methods then have
little signal to prefer some generic examples over others.

Cosines compare two directions for the same example, so its gradient norm
cancels: ``cos(∇ℓ_i, g_s) > cos(∇ℓ_i, g_g)`` iff
``⟨∇ℓ_i, ĝ_s⟩ > ⟨∇ℓ_i, ĝ_g⟩`` with ``ĝ = g / ‖g‖``. Both inner products
for every example come from forward-mode passes (``jax.jvp`` of the
per-example losses), so no per-example gradient is ever materialised.
The reference batches (``g_s``, ``g_g``) should be disjoint from the
evaluated examples (no example votes for its own batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dataweights.methods.metagrad import tree_vdot

Params = Any
Batch = dict[str, jax.Array]


def example_alignments(
  loss_B_fn: Callable[[Params, Batch], jax.Array],
  params: Params,
  batch: Batch,
  direction: Params,
) -> jax.Array:
  """``⟨∇ℓ_i(θ), d / ‖d‖⟩`` for every example of ``batch`` (one JVP)."""
  norm = jnp.sqrt(tree_vdot(direction, direction))
  unit = jax.tree.map(lambda x: x / jnp.maximum(norm, 1e-30), direction)
  return jax.jvp(lambda p: loss_B_fn(p, batch), (params,), (unit,))[1]


def alignment_rates(
  loss_B_fn: Callable[[Params, Batch], jax.Array],
  params: Params,
  *,
  specific_ref: Batch,
  generic_ref: Batch,
  specific_eval: Batch,
  generic_eval: Batch,
) -> dict[str, jax.Array]:
  """SAR and GAR at ``params`` (see the module docstring).

  Args:
    loss_B_fn: ``(params, batch) -> loss_B``.
    params: the model parameters θ.
    specific_ref, generic_ref: the batches whose mean-loss gradients are
      ``g_s`` and ``g_g``.
    specific_eval, generic_eval: the examples whose alignment is counted.

  Returns:
    ``{"sar", "gar", "cos_sg"}``: the two rates and the cosine between
    ``g_s`` and ``g_g``.
  """

  def mean_grad(batch):
    return jax.grad(lambda p: jnp.mean(loss_B_fn(p, batch)))(params)

  g_s, g_g = mean_grad(specific_ref), mean_grad(generic_ref)

  def rate(batch):
    a_s = example_alignments(loss_B_fn, params, batch, g_s)
    a_g = example_alignments(loss_B_fn, params, batch, g_g)
    return jnp.mean((a_s > a_g).astype(jnp.float32))

  cos = tree_vdot(g_s, g_g) / jnp.sqrt(
    tree_vdot(g_s, g_s) * tree_vdot(g_g, g_g)
  )
  return {"sar": rate(specific_eval), "gar": rate(generic_eval), "cos_sg": cos}
