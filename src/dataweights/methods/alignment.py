"""Online gradient alignment: the T = 1 rule of Chapter 1 (DoGE-style).

With the weighted training loss ``F(θ; w) = Σ_k w_k f_k(θ)`` and a validation
loss ``g``, one gradient step ``θ_1 = θ_0 − η ∇F(θ_0; w)`` has the
hypergradient

  ``h_k = ∂ g(θ_1) / ∂ w_k = −η ⟨∇g(θ_1), ∇f_k(θ_0)⟩``

(Chapter 1, the book's Sources §1), and the outer step is exponentiated
gradient ``w ← w ⊙ exp(−β h)``: domains whose gradient points where the
validation loss falls gain weight. DoGE (Fan et al. 2024) uses the same
alignment of domain gradients with the target gradient (there both taken at
the same θ, and on a proxy model).

**One JVP for every domain.** The domain gradients ``∇f_k`` are never
formed. The directional derivative of every example's loss along
``v = ∇g(θ_1)``, ``d_b = ⟨∇ℓ_b(θ_0), v⟩``, is one forward-mode JVP of the
per-example losses, ``jax.jvp(loss_B, (θ_0,), (v,))``; averaging ``d_b`` over
each domain's examples gives ``⟨∇f_k(θ_0), v⟩`` for all K domains at once.
The rule costs one backward pass (``v``) and one JVP (about one more forward
pass), not K backward passes and K gradient copies.

With an adaptive optimiser (AdamW) the step is not ``−η ∇F``, so the rule is
the SGD linearisation DoGE uses; :mod:`.horizon` with ``T = 1`` is the exact
one-step hypergradient through the optimiser. [reconstruction] Applying the
rule online to the model being trained (rather than to a proxy) is our
choice, as in Chapter 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from dataweights.methods import domain_weights
from dataweights.types import Batch, Params

LossFn = Callable[[Params, Batch], jax.Array]
"""``loss_fn(params, batch) -> loss_B``, per-example losses."""


def mean_loss_grad(
  loss_fn: LossFn, params: Params, batch: Batch
) -> tuple[jax.Array, Params]:
  """``(mean_b loss_b, its gradient)``: the validation loss and ``∇g``."""
  return jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)


def example_directional_derivatives(
  loss_fn: LossFn, params: Params, batch: Batch, direction: Params
) -> tuple[jax.Array, jax.Array]:
  """``(loss_B, d_B)`` with ``d_b = ⟨∇ℓ_b(params), direction⟩``: one JVP.

  Args:
    loss_fn: per-example losses.
    params: where to differentiate.
    batch: the examples.
    direction: a pytree shaped like ``params``.

  Returns:
    The per-example losses and their derivatives along ``direction``.
  """
  direction = jax.tree.map(lambda d, p: d.astype(p.dtype), direction, params)
  return jax.jvp(lambda p: loss_fn(p, batch), (params,), (direction,))


def domain_alignment(
  loss_fn: LossFn,
  params: Params,
  batch: Batch,
  domain_B: ArrayLike,
  num_domains: int,
  direction: Params,
) -> tuple[jax.Array, jax.Array]:
  """``a_k = ⟨∇f_k(params), direction⟩`` for every domain, by one JVP.

  ``f_k`` is the mean loss of the batch's examples of domain ``k``.

  Args:
    loss_fn: per-example losses ``loss_fn(params, batch) -> loss_B``.
    params: ``θ_0``.
    batch: the training batch.
    domain_B: each example's domain.
    num_domains: K.
    direction: e.g. the validation gradient ``∇g(θ_1)``.

  Returns:
    ``(a_K, count_K)``; ``a_k = 0`` for a domain absent from the batch.
  """
  _, d_B = example_directional_derivatives(loss_fn, params, batch, direction)
  return domain_weights.domain_means(d_B, domain_B, num_domains)


def alignment_hypergradient(a_K: ArrayLike, lr: ArrayLike) -> jax.Array:
  """The T = 1 hypergradient ``h_k = −η a_k`` (Chapter 1)."""
  return -jnp.asarray(lr) * jnp.asarray(a_K)


def alignment_step(
  loss_fn: LossFn,
  params0: Params,
  params1: Params,
  train_batch: Batch,
  valid_batch: Batch,
  domain_B: ArrayLike,
  num_domains: int,
  lr: ArrayLike,
) -> dict[str, Any]:
  """Everything the T = 1 rule needs after one step ``θ_0 → θ_1``.

  Returns:
    ``{"h_K", "a_K", "count_K", "valid_loss"}``: the hypergradient, the
    alignments ``⟨∇f_k(θ_0), ∇g(θ_1)⟩``, the domain counts and ``g(θ_1)``.
  """
  valid_loss, g_val = mean_loss_grad(loss_fn, params1, valid_batch)
  a_K, count_K = domain_alignment(
    loss_fn, params0, train_batch, domain_B, num_domains, g_val
  )
  return {
    "h_K": alignment_hypergradient(a_K, lr),
    "a_K": a_K,
    "count_K": count_K,
    "valid_loss": valid_loss,
  }


def alignment_rule(
  beta: float, *, normalize: bool = True
) -> domain_weights.WeightTransform:
  """The outer step of the T = 1 rule: EG on ``h`` (see the module doc).

  ``update(h_K, state)``; with ``normalize`` (default) ``β`` bounds the
  change of each log-weight per step whatever the gradients' scale.
  """
  return domain_weights.exponentiated_gradient(beta, normalize=normalize)
