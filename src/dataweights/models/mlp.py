"""A small multilayer perceptron (and multinomial logistic regression).

``MLP((64, 10))`` is multinomial logistic regression; ``MLP((64, 8, 10))``
has one hidden ``tanh`` layer. Layers are ``nnx.Linear`` (``x @ kernel +
bias``) named ``layers/0``, ``layers/1``, ..., so K-FAC
(:mod:`dataweights.methods.kfac`) can pick them by path. Smooth
activations keep the loss twice differentiable for exact-Hessian influence.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


class MLP(nnx.Module):
  """``x_BxI -> logits_BxC`` through ``len(sizes) - 1`` linear layers.

  Args:
    sizes: widths ``(in, hidden..., out)``; at least two.
    activation: one of :data:`ACTIVATIONS` between layers.
    rngs: ``nnx.Rngs``.
    param_dtype: dtype of the parameters (float64 for exact influence).
  """

  def __init__(
    self,
    sizes: Sequence[int],
    *,
    activation: str = "tanh",
    rngs: nnx.Rngs,
    param_dtype=jnp.float32,
  ):
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
      raise ValueError(f"sizes = {sizes} needs at least two positive widths")
    if activation not in ACTIVATIONS:
      raise ValueError(
        f"activation = {activation!r}; allowed: {', '.join(ACTIVATIONS)}"
      )
    self.activation = activation
    self.layers = nnx.List(
      [
        nnx.Linear(a, b, rngs=rngs, param_dtype=param_dtype, dtype=param_dtype)
        for a, b in zip(sizes, sizes[1:])
      ]
    )

  def __call__(self, x_BxI: jax.Array) -> jax.Array:
    h = x_BxI
    act = ACTIVATIONS[self.activation]
    for i, layer in enumerate(self.layers):
      h = layer(h)
      if i < len(self.layers) - 1:
        h = act(h)
    return h


def cross_entropy(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """Per-example softmax cross-entropy ``loss_B`` of ``batch["y_B"]``."""
  logits_BxC = model(batch["x_BxI"])
  picked_B = jnp.take_along_axis(logits_BxC, batch["y_B"][:, None], -1)[:, 0]
  return jax.nn.logsumexp(logits_BxC, -1) - picked_B
