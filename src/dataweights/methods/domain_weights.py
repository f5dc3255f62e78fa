"""Domain weights as pure state-and-update transforms, optax style.

A :class:`WeightTransform` is a pair of pure functions,

* ``init(w0_K) -> state``: the state (a pytree of arrays: checkpointable,
  usable inside ``jax.jit``) starting from the weights ``w0_K``;
* ``update(signal, state) -> (w_K, state)``: one step; ``signal`` is what the
  method learns from (a hypergradient, per-domain excess losses, a bandit's
  rewards) and ``w_K`` the new weights on the simplex.

Transforms compose with :func:`chain`: each one's output weights are the
next one's signal, so ``chain(doremi(...), running_average())`` returns the
running average of DoReMi's weights while the first state keeps the
current ones. The learning rules are in their own modules
(:mod:`.alignment`, :mod:`.horizon`, :mod:`.doremi`, :mod:`.odm`); this
module holds the building blocks and the fixed baselines:

* :func:`uniform_weights`, :func:`natural_weights` (proportional to size),
  :func:`temperature_weights` (``w ∝ n^{1/τ}``), and :func:`constant`;
* :func:`exponentiated_gradient`: ``w ← w ⊙ exp(−β h)`` on the simplex,
  optionally mixed with the uniform distribution (DoReMi's smoothing) and
  with ``h`` normalised to ``max_k |h_k| = 1``;
* :func:`running_average`.

Example:
  >>> tx = chain(exponentiated_gradient(1.0), running_average())
  >>> state = tx.init(uniform_weights(2))
  >>> avg_K, state = tx.update(jnp.array([1.0, 0.0]), state)
  >>> bool(avg_K[0] < avg_K[1])
  True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from dataweights.errors import WeightsError
from dataweights.methods import mixing, simplex


class WeightTransform(NamedTuple):
  """``init(w0_K) -> state`` and ``update(signal, state) -> (w_K, state)``."""

  init: Callable[[ArrayLike], Any]
  update: Callable[[Any, Any], tuple[jax.Array, Any]]


def uniform_weights(K: int) -> jax.Array:
  """``1/K`` for each of ``K`` domains (see :func:`.mixing.uniform_weights`)."""
  return mixing.uniform_weights(K)


def natural_weights(sizes_K: ArrayLike) -> jax.Array:
  """Weights proportional to the domains' sizes (tokens or documents).

  Raises:
    WeightsError: not 1-D, or a size not finite and > 0.
  """
  return mixing.natural_weights(sizes_K)


def temperature_weights(sizes_K: ArrayLike, tau: float) -> jax.Array:
  """Temperature-scaled sizes: ``w_k ∝ n_k^{1/τ}``.

  ``τ = 1`` gives :func:`natural_weights`, ``τ → ∞`` the uniform weights
  (the sampling rule of multilingual models, e.g. XLM-R's ``α = 1/τ``).

  Args:
    sizes_K: positive domain sizes, shape ``(K,)``.
    tau: the temperature, a finite number ``>= 1`` (``τ < 1`` would sharpen
      the natural distribution, which no baseline needs).

  Returns:
    ``w_K`` on the simplex (float32).

  Raises:
    ValueError: ``tau`` not finite and ``>= 1``.
    WeightsError: a size not finite and > 0.
  """
  if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 1):
    raise ValueError(
      f"tau = {tau!r} is invalid; the temperature must be a finite number "
      ">= 1 (1: natural weights, larger: closer to uniform)"
    )
  n_K = np.asarray(sizes_K, np.float64)
  if n_K.ndim != 1 or n_K.size == 0 or not np.all(np.isfinite(n_K) & (n_K > 0)):
    raise WeightsError(
      f"sizes {n_K.tolist()} are invalid; expected a 1-D array of K >= 1 "
      "finite sizes > 0"
    )
  logw_K = np.log(n_K) / tau
  w_K = np.exp(logw_K - logw_K.max())
  return jnp.asarray(w_K / w_K.sum(), jnp.float32)


def domain_means(
  value_B: ArrayLike, domain_B: ArrayLike, num_domains: int
) -> tuple[jax.Array, jax.Array]:
  """Per-domain means of ``value_B`` and counts, in ``value_B``'s dtype.

  ``mean_K[k]`` is 0 for a domain absent from the batch (see ``count_K``).
  Unlike :func:`dataweights.metrics.per_domain_mean` this keeps float64
  (for the finite-difference oracles).
  """
  value_B = jnp.asarray(value_B)
  onehot_BxK = jax.nn.one_hot(domain_B, num_domains, dtype=value_B.dtype)
  count_K = jnp.sum(onehot_BxK, axis=0)
  return value_B @ onehot_BxK / jnp.maximum(count_K, 1.0), count_K


def realised_weights(domain_B: ArrayLike, w_K: ArrayLike) -> jax.Array:
  """Per-example loss weights ``w_K[d_b] / n_K[d_b]`` that realise ``w_K``.

  With them ``Σ_b weight_b loss_b = Σ_k w_k mean_k(loss)`` over the domains
  present in the batch (the DoReMi / Chapter 1 objective ``Σ_k w_k f_k``);
  differentiable in ``w_K`` and in its dtype (see
  :func:`dataweights.metrics.domain_to_example_weights`, float32).
  """
  w_K = jnp.asarray(w_K)
  onehot_BxK = jax.nn.one_hot(domain_B, w_K.shape[0], dtype=w_K.dtype)
  count_K = jnp.sum(onehot_BxK, axis=0)
  return onehot_BxK @ (w_K / jnp.maximum(count_K, 1.0))


def _check_weights(w0_K: ArrayLike) -> jax.Array:
  return simplex.check_simplex(jnp.asarray(w0_K, jnp.float32), atol=1e-4)


class ConstantState(NamedTuple):
  """The fixed weights."""

  w_K: jax.Array


def constant(w_K: ArrayLike) -> WeightTransform:
  """Fixed weights: ``update`` ignores its signal (the baselines).

  Raises:
    SimplexError: ``w_K`` not on the simplex.
  """
  w_K = _check_weights(w_K)

  def init(w0_K: ArrayLike) -> ConstantState:
    del w0_K
    return ConstantState(w_K)

  def update(signal: Any, state: ConstantState):
    del signal
    return state.w_K, state

  return WeightTransform(init, update)


class EGState(NamedTuple):
  """The current weights of an exponentiated-gradient transform."""

  w_K: jax.Array


def _check_nonneg(name: str, value: float, upper: float | None = None) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok and math.isfinite(value) and value >= 0
  ok = ok and (upper is None or value <= upper)
  if not ok:
    bound = ">= 0" if upper is None else f"in [0, {upper}]"
    raise ValueError(
      f"{name} = {value!r} is invalid; it must be a finite number {bound}"
    )


def exponentiated_gradient(
  beta: float, *, smoothing: float = 0.0, normalize: bool = False
) -> WeightTransform:
  """Mirror descent on the simplex: ``w ← (1−c) w ⊙ exp(−β h) / Z + c u``.

  ``update(h_K, state)`` takes the gradient ``h_K = ∂L/∂w`` of the loss to
  *minimise* (a hypergradient); pass ``−λ_K`` to *ascend* a score ``λ_K``
  (DoReMi's excess losses). With ``normalize``, ``h`` is divided by
  ``max_k |h_k|`` first (a zero ``h`` stays zero), so ``β`` bounds the change
  of every log-weight per step. ``smoothing = c`` mixes the result with the
  uniform distribution ``u`` (DoReMi's Algorithm 1), keeping every weight
  ``>= c / K``; the smoothed weights are the next step's starting point.

  Args:
    beta: step size, finite and ``>= 0`` (0: the weights never move).
    smoothing: ``c`` in ``[0, 1]``.
    normalize: divide ``h`` by its largest absolute entry.

  Returns:
    A :class:`WeightTransform` with state :class:`EGState`.

  Raises:
    ValueError: ``beta`` or ``smoothing`` out of range.

  References:
    Kivinen & Warmuth (1997); Xie et al. (2023), DoReMi, Algorithm 1 (the
    smoothing).
  """
  _check_nonneg("beta", beta)
  _check_nonneg("smoothing", smoothing, 1.0)

  def init(w0_K: ArrayLike) -> EGState:
    return EGState(_check_weights(w0_K))

  def update(h_K: ArrayLike, state: EGState):
    h_K = jnp.asarray(h_K, jnp.float32)
    if h_K.shape != state.w_K.shape:
      raise ValueError(
        f"the signal has shape {h_K.shape}; expected one entry per domain, "
        f"shape {state.w_K.shape}"
      )
    if normalize:
      scale = jnp.max(jnp.abs(h_K))
      h_K = h_K / jnp.where(scale > 0, scale, 1.0)
    w_K = state.w_K
    logw_K = jnp.where(w_K > 0, jnp.log(jnp.where(w_K > 0, w_K, 1.0)), -jnp.inf)
    w_K = jax.nn.softmax(logw_K - beta * h_K)
    if smoothing:
      w_K = (1.0 - smoothing) * w_K + smoothing / w_K.shape[0]
    return w_K, EGState(w_K)

  return WeightTransform(init, update)


class AverageState(NamedTuple):
  """Running mean of the weights seen and how many there were."""

  mean_K: jax.Array
  count: jax.Array


def running_average() -> WeightTransform:
  """The mean of every ``w_K`` passed to ``update`` (DoReMi's ``ᾱ``).

  ``init(w0_K)`` starts with no weights seen (``count = 0``; ``w0_K`` is
  returned until the first update); ``update(w_K, state)`` returns
  ``(1/t) Σ_{s<=t} w_s``.
  """

  def init(w0_K: ArrayLike) -> AverageState:
    return AverageState(_check_weights(w0_K), jnp.zeros((), jnp.int32))

  def update(w_K: ArrayLike, state: AverageState):
    count = state.count + 1
    mean_K = (
      state.mean_K + (jnp.asarray(w_K, jnp.float32) - state.mean_K) / count
    )
    return mean_K, AverageState(mean_K, count)

  return WeightTransform(init, update)


def chain(*transforms: WeightTransform) -> WeightTransform:
  """Transforms in sequence: each one's weights are the next one's signal.

  The state is the tuple of the transforms' states (each initialised from
  ``w0_K``); the output is the last transform's weights.

  Raises:
    ValueError: no transforms.
  """
  if not transforms:
    raise ValueError("chain needs at least one WeightTransform; got none")

  def init(w0_K: ArrayLike) -> tuple[Any, ...]:
    return tuple(t.init(w0_K) for t in transforms)

  def update(signal: Any, state: tuple[Any, ...]):
    new = []
    for t, s in zip(transforms, state, strict=True):
      signal, s = t.update(signal, s)
      new.append(s)
    return signal, tuple(new)

  return WeightTransform(init, update)
