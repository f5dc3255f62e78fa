"""DoReMi: domain weights from group DRO on the excess loss over a reference.

Xie et al. (2023), Algorithm 1. Three models of the same architecture:

1. a *reference* model trained on fixed weights (uniform or natural);
2. a *proxy* model trained with group distributionally robust optimisation:
   at step t, on a batch drawn with the fixed weights, the per-domain excess
   loss

     ``λ_t[k] = Σ_{x ∈ B_k} Σ_j max(ℓ_θ(x_j) − ℓ_ref(x_j), 0) / Σ_{x ∈ B_k} |x|``

   (clipped per token, averaged over the domain's tokens) moves the weights
   by exponentiated-gradient *ascent* with smoothing ``c``,

     ``α_t = (1 − c) α_{t−1} ⊙ exp(η λ_t) / Z + c u``,

   and the proxy takes an optimiser step on ``Σ_k α_t[k] L_k(θ)``;
3. the *main* model trained with the average ``ᾱ = (1/N) Σ_t α_t`` as its
   sampling weights.

:func:`excess_losses` computes ``λ`` from per-token (or per-example) losses;
:func:`doremi` is the weight transform, ``chain`` of the ascent step and
the running average: ``update(λ_K, state) -> (ᾱ_K, state)`` with the
current ``α_t`` in ``state[0].w_K``. The paper uses ``η = 1`` and
``c = 10⁻³``.

References:
  S. M. Xie, H. Pham, X. Dong, N. Du, H. Liu, Y. Lu, P. Liang, Q. V. Le,
  T. Ma, A. W. Yu. DoReMi: Optimizing data mixtures speeds up language model
  pretraining. NeurIPS 2023. (levanter's removed ``src/levanter/doremi.py``
  implements the same step.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from dataweights.methods import domain_weights


def excess_losses(
  proxy_loss_BxL: ArrayLike,
  reference_loss_BxL: ArrayLike,
  mask_BxL: ArrayLike | None,
  domain_B: ArrayLike,
  num_domains: int,
) -> tuple[jax.Array, jax.Array]:
  """Per-domain clipped excess loss ``λ_K`` and token counts.

  Args:
    proxy_loss_BxL: the proxy's per-token losses (``(B, 1)`` for
      per-example losses).
    reference_loss_BxL: the reference model's, same shape.
    mask_BxL: 1 where a token counts (None: all).
    domain_B: each example's domain.
    num_domains: K.

  Returns:
    ``(λ_K, tokens_K)``: ``λ_k`` is the mean over domain k's tokens of
    ``max(ℓ_proxy − ℓ_ref, 0)`` (0 for a domain with no token in the batch).

  Raises:
    ValueError: the two losses have different shapes.
  """
  proxy = jnp.asarray(proxy_loss_BxL)
  ref = jnp.asarray(reference_loss_BxL)
  if proxy.shape != ref.shape or proxy.ndim != 2:
    raise ValueError(
      f"proxy losses {proxy.shape} and reference losses {ref.shape} must "
      "have the same (B, L) shape"
    )
  mask = (
    jnp.ones_like(proxy)
    if mask_BxL is None
    else jnp.asarray(mask_BxL).astype(proxy.dtype)
  )
  clipped_B = jnp.sum(jnp.maximum(proxy - ref, 0.0) * mask, axis=1)
  onehot_BxK = jax.nn.one_hot(domain_B, num_domains, dtype=proxy.dtype)
  tokens_K = jnp.sum(mask, axis=1) @ onehot_BxK
  return clipped_B @ onehot_BxK / jnp.maximum(tokens_K, 1.0), tokens_K


def doremi(
  step_size: float = 1.0, smoothing: float = 1e-3
) -> domain_weights.WeightTransform:
  """DoReMi's domain-weight update (Algorithm 1) and running average.

  Args:
    step_size: ``η``, finite and ``>= 0``.
    smoothing: ``c`` in ``[0, 1]``.

  Returns:
    ``init(α_0)``; ``update(λ_K, state) -> (ᾱ_K, state)`` with state
    ``(EGState(α_t), AverageState(ᾱ, t))``.

  Example:
    >>> tx = doremi(1.0, 0.0)
    >>> avg, state = tx.update(jnp.array([jnp.log(3.0), 0.0]), tx.init(jnp.array([0.5, 0.5])))
    >>> [round(float(a), 4) for a in state[0].w_K]
    [0.75, 0.25]
  """
  eg = domain_weights.exponentiated_gradient(step_size, smoothing=smoothing)
  ascent = domain_weights.WeightTransform(
    eg.init, lambda lam_K, s: eg.update(-jnp.asarray(lam_K), s)
  )
  return domain_weights.chain(ascent, domain_weights.running_average())


def current_weights(state: Any) -> jax.Array:
  """``α_t`` (what the proxy trains with) from a :func:`doremi` state."""
  return state[0].w_K


def average_weights(state: Any) -> jax.Array:
  """``ᾱ`` (what trains the main model) from a :func:`doremi` state."""
  return state[1].mean_K
