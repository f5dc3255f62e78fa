"""Meta-gradients of online bilevel data selection: DDS, Anograd, SOBA.

A bilevel problem is two pure functions (:class:`BilevelProblem`): the
inner loss ``L_in(θ, φ; batch)`` of the model parameters θ with outer
parameters φ (a weighting network, a regularisation strength, per-example
weights, ...) and the outer loss ``L_out(θ; batch)``. The outer problem is
``min_φ L_out(θ*(φ))`` with ``θ*(φ) = argmin_θ L_in(θ, φ)``. Every core is a
pure function of ``(problem, θ, φ, batches)`` and works on any such problem;
:mod:`dataweights.train.filtering` applies them to a weighting network
``L_in(θ, φ; B) = Σ_i w_φ(x_i) ℓ_i(θ)``.

One primitive carries all three methods, the *cross-derivative*

  ``X(u) = ∂_φ ⟨∇_θ L_in(θ, φ), u⟩``  (a vector shaped like φ),

computed as the φ-gradient of a θ-directional derivative (reverse over
forward). For a weighted loss ``Σ_i w_i(φ) ℓ_i(θ)`` it is
``Σ_i ∂_φ w_i · ⟨∇ℓ_i, u⟩``: one forward-mode pass through the model gives
every ``⟨∇ℓ_i, u⟩``, then only the small network is differentiated (JAX
evaluates the φ-independent part once and does not transpose it).

* **DDS** (one look-ahead step; the reference's "soft" method):
  ``∇_φ L_out(θ − α ∇_θ L_in(θ, φ)) = −α X(u)``, ``u = ∇L_out(θ')`` at the
  look-ahead point ``θ' = θ − α ∇_θ L_in`` (chain rule; exact).
* **Anograd** (normalised alignment): maximise
  ``A(φ) = ⟨g, s⟩ / (‖g‖ + ε)`` with ``g = ∇_θ L_in(θ, φ)``,
  ``s = ∇L_out(θ)``; ``∇_φ A = X(s / (‖g‖ + ε) − ⟨g, s⟩ g / ((‖g‖ + ε)² ‖g‖))``.
* **SOBA** (Dagréou et al. 2022): ``v`` tracks ``−H⁻¹ ∇L_out`` with
  ``H = ∇²_θθ L_in`` by ``v ← v − ρ (H v + λ v + ∇L_out)``; the meta-gradient
  is ``X(v)``, which equals the implicit hypergradient
  ``∇_φ L_out(θ*(φ))`` at ``θ = θ*``, ``v = v*`` (implicit function theorem).

References:
  Grangier, Ablin, Hannun, "Adaptive Training Distributions with Scalable
  Online Bilevel Optimization", TMLR 2024 (arXiv 2311.11973); the
  reference code's ``shared/meta_learning.py`` (read, not copied).
  Wang et al., "Optimizing data usage via differentiable rewards" (DDS),
  ICML 2020. Dagréou, Ablin, Vaiter, Moreau, "A framework for bilevel
  optimization that enables stochastic and global variance reduction
  algorithms" (SOBA), NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
Batch = Any


class BilevelProblem(NamedTuple):
  """An online bilevel problem as two pure functions.

  Attributes:
    inner_loss: ``(theta, phi, batch) -> scalar``, ``L_in(θ, φ; batch)``.
    outer_loss: ``(theta, batch) -> scalar``, ``L_out(θ; batch)``.
  """

  inner_loss: Callable[[Params, Params, Batch], jax.Array]
  outer_loss: Callable[[Params, Batch], jax.Array]


def tree_vdot(a: Params, b: Params) -> jax.Array:
  """``Σ_leaves ⟨a, b⟩``."""
  terms = [
    jnp.vdot(x, y)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]
  return sum(terms[1:], terms[0])


def tree_axpy(alpha: jax.Array | float, x: Params, y: Params) -> Params:
  """``alpha * x + y`` leaf by leaf."""
  return jax.tree.map(lambda a, b: alpha * a + b, x, y)


def inner_grad(
  problem: BilevelProblem, theta: Params, phi: Params, batch: Batch
) -> Params:
  """``∇_θ L_in(θ, φ; batch)``."""
  return jax.grad(problem.inner_loss)(theta, phi, batch)


def hvp(
  problem: BilevelProblem, theta: Params, phi: Params, batch: Batch, v: Params
) -> Params:
  """``∇²_θθ L_in(θ, φ; batch) v`` (forward over reverse)."""
  return jax.jvp(lambda t: inner_grad(problem, t, phi, batch), (theta,), (v,))[
    1
  ]


def cross_derivative(
  problem: BilevelProblem, theta: Params, phi: Params, batch: Batch, u: Params
) -> Params:
  """``X(u) = ∂_φ ⟨∇_θ L_in(θ, φ; batch), u⟩``, shaped like φ.

  Args:
    problem: the bilevel problem.
    theta: model parameters θ.
    phi: outer parameters φ.
    batch: the inner batch.
    u: a direction shaped like θ (treated as a constant).

  Returns:
    The cross-derivative, a pytree like ``phi``.
  """
  u = jax.lax.stop_gradient(u)

  def directional(p):
    return jax.jvp(lambda t: problem.inner_loss(t, p, batch), (theta,), (u,))[1]

  return jax.grad(directional)(phi)


def dds_metagrad(
  problem: BilevelProblem,
  theta: Params,
  phi: Params,
  inner_batch: Batch,
  outer_batch: Batch,
  lr: float | jax.Array,
) -> tuple[Params, jax.Array]:
  """DDS: the gradient of the outer loss after one look-ahead SGD step.

  ``g_φ = ∇_φ L_out(θ − α ∇_θ L_in(θ, φ; B_in); B_out)``, computed exactly as
  ``−α X(∇L_out(θ'))`` (chain rule through the one step).

  Args:
    problem: the bilevel problem.
    theta: θ.
    phi: φ.
    inner_batch: ``B_in`` (the reference: a random sub-batch of the big
      generic batch).
    outer_batch: the outer (specific) batch.
    lr: the look-ahead step size α (the reference: 0.1).

  Returns:
    ``(g_φ, L_out(θ'))``: the meta-gradient (descend on it) and the
    look-ahead outer loss.

  References:
    Grangier et al. (2024), DDS; Wang et al. (2020).
  """
  g = inner_grad(problem, theta, phi, inner_batch)
  theta_la = tree_axpy(-lr, g, theta)
  loss_la, u = jax.value_and_grad(problem.outer_loss)(theta_la, outer_batch)
  x = cross_derivative(problem, theta, phi, inner_batch, u)
  return jax.tree.map(lambda a: -lr * a, x), loss_la


def anograd_metagrad(
  problem: BilevelProblem,
  theta: Params,
  phi: Params,
  inner_batch: Batch,
  outer_batch: Batch,
  eps: float = 1e-6,
) -> tuple[Params, jax.Array]:
  """Anograd: ascend the normalised alignment of inner and outer gradients.

  ``A(φ) = ⟨g(φ), s⟩ / (‖g(φ)‖ + ε)``, ``g = ∇_θ L_in(θ, φ; B_in)``,
  ``s = ∇_θ L_out(θ; B_out)``. Returns ``−∇_φ A`` (a descent direction) via
  one cross-derivative in the direction
  ``s / (‖g‖ + ε) − ⟨g, s⟩ g / ((‖g‖ + ε)² ‖g‖)``.

  Args:
    problem: the bilevel problem (the reference: softplus weights, an
      unnormalised weighted sum; A does not depend on the weights' scale
      except through ε).
    theta: θ.
    phi: φ.
    inner_batch: the inner batch (the reference: a random sub-batch of the
      big batch of the specific batch's size).
    outer_batch: the outer batch.
    eps: ε.

  Returns:
    ``(−∇_φ A, A)``.

  References:
    Grangier et al. (2024), Anograd.
  """
  g = inner_grad(problem, theta, phi, inner_batch)
  s = jax.grad(problem.outer_loss)(theta, outer_batch)
  n = jnp.sqrt(tree_vdot(g, g))
  a = tree_vdot(g, s)
  align = a / (n + eps)
  coef_g = -a / ((n + eps) ** 2 * jnp.maximum(n, jnp.finfo(n.dtype).tiny))
  direction = jax.tree.map(lambda si, gi: si / (n + eps) + coef_g * gi, s, g)
  x = cross_derivative(problem, theta, phi, inner_batch, direction)
  return jax.tree.map(jnp.negative, x), align


def soba_v_direction(
  problem: BilevelProblem,
  theta: Params,
  phi: Params,
  inner_batch: Batch,
  outer_batch: Batch,
  v: Params,
  damping: float = 0.0,
) -> Params:
  """``D_v = H v + λ v + ∇L_out(θ)``, the gradient of SOBA's linear system.

  ``D_v`` is the gradient in v of ``½ vᵀ(H + λI)v + ⟨∇L_out, v⟩``, whose
  minimiser is ``v* = −(H + λI)⁻¹ ∇L_out``.
  """
  hv = hvp(problem, theta, phi, inner_batch, v)
  g_out = jax.grad(problem.outer_loss)(theta, outer_batch)
  return jax.tree.map(lambda h, vi, go: h + damping * vi + go, hv, v, g_out)


def soba_v_update(
  problem: BilevelProblem,
  theta: Params,
  phi: Params,
  inner_batch: Batch,
  outer_batch: Batch,
  v: Params,
  rho: float | jax.Array,
  damping: float = 0.0,
) -> Params:
  """One SOBA step on v: ``v ← v − ρ (H v + λ v + ∇L_out(θ))``."""
  d = soba_v_direction(
    problem, theta, phi, inner_batch, outer_batch, v, damping
  )
  return tree_axpy(-rho, d, v)


def soba_metagrad(
  problem: BilevelProblem,
  theta: Params,
  phi: Params,
  inner_batch: Batch,
  v: Params,
) -> Params:
  """SOBA's meta-gradient ``X(v) = ∂_φ ⟨∇_θ L_in(θ, φ), v⟩``.

  With ``v = −H⁻¹ ∇L_out(θ*)`` at ``θ = θ*(φ)`` this is the implicit
  hypergradient ``∇_φ L_out(θ*(φ))``.

  References:
    Dagréou et al. (2022); Grangier et al. (2024), SOBA.
  """
  return cross_derivative(problem, theta, phi, inner_batch, v)


def weighted_examples(
  loss_B_fn: Callable[[Params, Batch], jax.Array],
  weight_B_fn: Callable[[Params, Batch], jax.Array],
) -> BilevelProblem:
  """The data-selection problem ``L_in = Σ_i w_φ(x_i) ℓ_i(θ)``.

  Args:
    loss_B_fn: ``(theta, batch) -> loss_B``, the model's per-example loss.
    weight_B_fn: ``(phi, batch) -> w_B``, the weighting network's weights
      (normalised over the batch or not, see
      :func:`dataweights.models.weighting_net.normalize_scores`).

  Returns:
    A :class:`BilevelProblem` whose outer loss is the mean per-example loss
    on the outer (specific) batch.
  """

  def inner_loss(theta, phi, batch):
    return jnp.sum(weight_B_fn(phi, batch) * loss_B_fn(theta, batch))

  def outer_loss(theta, batch):
    return jnp.mean(loss_B_fn(theta, batch))

  return BilevelProblem(inner_loss, outer_loss)
