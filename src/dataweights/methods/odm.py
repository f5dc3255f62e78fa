"""Online data mixing (ODM): the domains as arms of an EXP3 bandit.

Albalak, Pan, Raffel, Wang (2023), "Efficient online data mixing for
language model pre-training". Each domain is an arm; the reward of drawing a
domain is the training loss on it (a domain the model has not learnt yet is
worth more), importance-weighted by the probability it was drawn with. After
``t`` steps, with ``K`` domains,

  ``ε_t = min(1/K, sqrt(ln K / (K t)))``,
  ``R̂_k ← γ R̂_k + s · L_k n_k / (B π_k)``   (``n_k`` of the ``B`` rows from k),
  ``π = (1 − K ε_t) softmax(ε_{t−1} R̂) + ε_t``,

and the next batches are sampled from ``π``. With ``B = 1`` the reward
estimate is EXP3's ``s L / π_k`` for the drawn arm and 0 for the others;
for ``B`` rows drawn from ``π`` it is unbiased for ``s L_k`` in the same way.
``s = 1/10`` and ``γ = 1`` (a plain sum) are the authors' code
(``alon-albalak/online-data-mixing``, ``megatron/data/data_sampling_utils.py``,
``Exp3WeightUpdater``), which also uses ``ε_{t−1}`` in the exponent and
``ε_t`` for exploration; ``γ < 1`` is the smoothed variant of their later
scripts. While ``t <= K ln K``, ``ε_t = 1/K`` and ``π`` stays uniform.

[reconstruction] The per-batch estimator over several domains is ours
(the authors' code updates one domain per call).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from dataweights.methods import domain_weights


class Exp3State(NamedTuple):
  """ODM's bandit state.

  Attributes:
    reward_K: cumulative importance-weighted rewards ``R̂``.
    pi_K: the current sampling distribution ``π``.
    eps: ``ε_t`` (``1/K`` before the first update).
    t: updates so far.
  """

  reward_K: jax.Array
  pi_K: jax.Array
  eps: jax.Array
  t: jax.Array


def exploration_rate(t: ArrayLike, num_domains: int) -> jax.Array:
  """``ε_t = min(1/K, sqrt(ln K / (K t)))`` (``1/K`` for ``t = 0``)."""
  t = jnp.asarray(t, jnp.float32)
  K = float(num_domains)
  rate = jnp.sqrt(math.log(K) / (K * jnp.maximum(t, 1.0)))
  return jnp.where(t > 0, jnp.minimum(1.0 / K, rate), 1.0 / K)


def reward_estimates(
  loss_K: ArrayLike, count_K: ArrayLike, pi_K: ArrayLike, scale: float
) -> jax.Array:
  """Importance-weighted rewards ``s L_k n_k / (B π_k)`` (0 if ``n_k = 0``).

  Args:
    loss_K: mean training loss of each domain's rows in the batch.
    count_K: rows of each domain.
    pi_K: the distribution the batch was drawn with.
    scale: ``s``.
  """
  loss_K, count_K, pi_K = (
    jnp.asarray(x, jnp.float32) for x in (loss_K, count_K, pi_K)
  )
  B = jnp.maximum(jnp.sum(count_K), 1.0)
  drawn = count_K > 0
  return jnp.where(
    drawn, scale * loss_K * count_K / (B * jnp.where(drawn, pi_K, 1.0)), 0.0
  )


def exp3(
  *, reward_scale: float = 0.1, decay: float = 1.0
) -> domain_weights.WeightTransform:
  """ODM's EXP3 update of the sampling distribution.

  ``update((loss_K, count_K, pi_used_K), state) -> (π, state)``: the batch's
  per-domain mean losses and counts, and the distribution it was drawn with
  (with a one-step feeder lag, the previous ``π``).

  Args:
    reward_scale: ``s`` (the authors divide the loss by 10).
    decay: ``γ`` in ``(0, 1]``; 1 sums the rewards as the authors' EXP3.

  Returns:
    A :class:`~.domain_weights.WeightTransform` with state
    :class:`Exp3State`.

  Raises:
    ValueError: ``reward_scale`` not > 0 or ``decay`` not in ``(0, 1]``.
  """
  if not (
    isinstance(reward_scale, (int, float))
    and math.isfinite(reward_scale)
    and reward_scale > 0
  ):
    raise ValueError(
      f"reward_scale = {reward_scale!r} is invalid; it must be a finite number > 0"
    )
  if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
    raise ValueError(f"decay = {decay!r} is invalid; it must lie in (0, 1]")

  def init(w0_K: ArrayLike) -> Exp3State:
    w0_K = domain_weights._check_weights(w0_K)
    K = w0_K.shape[0]
    return Exp3State(
      reward_K=jnp.zeros((K,), jnp.float32),
      pi_K=w0_K,
      eps=jnp.asarray(1.0 / K, jnp.float32),
      t=jnp.zeros((), jnp.int32),
    )

  def update(signal, state: Exp3State):
    loss_K, count_K, pi_used_K = signal
    K = state.pi_K.shape[0]
    reward_K = decay * state.reward_K + reward_estimates(
      loss_K, count_K, pi_used_K, reward_scale
    )
    t = state.t + 1
    eps = exploration_rate(t, K)
    pi_K = (1.0 - K * eps) * jax.nn.softmax(state.eps * reward_K) + eps
    return pi_K, Exp3State(reward_K, pi_K, eps, t)

  return domain_weights.WeightTransform(init, update)
