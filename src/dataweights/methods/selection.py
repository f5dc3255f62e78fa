"""Big-batch selection: keep k of N scored examples (inside the jitted step).

Online filtering (Grangier, Ablin & Hannun; the book's Sources §2) scores a
big generic batch of ``N = B x downsampling`` examples with a weighting
network and keeps ``k = B`` of them for the model's step. Given log-weights
``logw_N`` (``log w_i`` up to a constant), :func:`select` offers:

``"sample"``       without replacement, successive sampling with
                   probability ∝ w (the reference's default), drawn at once
                   by the Gumbel-top-k trick: the k largest of
                   ``logw_i + Gumbel_i``. Inclusion probabilities are those
                   of drawing k times without replacement ∝ w (Plackett-Luce),
                   not ``k w_i`` (tests/test_selection.py checks them exactly).
``"replacement"``  k independent draws ∝ w (duplicates possible).
``"topk"``         the k largest weights, deterministically.
``"importance"``   k draws with replacement ∝ w, each weighted by
                   ``1 / (N p_i)`` with ``p = w / Σ w``: ``(1/k) Σ_j
                   weight_j f(x_{i_j})`` is an unbiased estimate of the
                   uniform mean ``(1/N) Σ_i f(x_i)`` (Hansen-Hurwitz). The
                   model then learns the generic objective with less or more
                   variance; the other rules bias it towards high w on
                   purpose.

Example:
  >>> import jax, jax.numpy as jnp
  >>> idx, wt = select(jax.random.key(0), jnp.log(jnp.array([.1, .2, .7])),
  ...                  2, "topk")
  >>> idx.tolist(), wt
  ([2, 1], None)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

SELECTIONS: tuple[str, ...] = ("sample", "replacement", "topk", "importance")


def check_selection(how: str) -> str:
  """Returns ``how`` if it is a selection rule, else raises ValueError."""
  if how not in SELECTIONS:
    raise ValueError(
      f"selection = {how!r} is invalid; allowed values are "
      + ", ".join(map(repr, SELECTIONS))
    )
  return how


def select(
  key: jax.Array, logw_N: jax.Array, k: int, how: str = "sample"
) -> tuple[jax.Array, jax.Array | None]:
  """Indices of the k kept examples and, for ``"importance"``, their weights.

  Args:
    key: PRNG key (unused by ``"topk"``).
    logw_N: log-weights (any constant shift; ``-inf`` = never kept by the
      random rules).
    k: examples kept (static), ``1 <= k <= N`` (``N`` only bounds the
      rules without replacement).
    how: one of :data:`SELECTIONS`.

  Returns:
    ``(idx_k int32, weight_k or None)``.

  Raises:
    ValueError: unknown rule, or ``k`` out of range.
  """
  check_selection(how)
  n = logw_N.shape[0]
  if not 1 <= k <= n and how in ("sample", "topk"):
    raise ValueError(
      f"cannot keep k = {k} of N = {n} examples without replacement; k must "
      f"lie in [1, {n}] (downsampling = N / k must be >= 1)"
    )
  if k < 1:
    raise ValueError(f"k = {k} examples kept is invalid; it must be >= 1")
  logw_N = logw_N.astype(jnp.float32)
  if how == "topk":
    return jax.lax.top_k(logw_N, k)[1].astype(jnp.int32), None
  if how == "sample":
    g_N = jax.random.gumbel(key, (n,), logw_N.dtype)
    return jax.lax.top_k(logw_N + g_N, k)[1].astype(jnp.int32), None
  idx_k = jax.random.categorical(key, logw_N, shape=(k,)).astype(jnp.int32)
  if how == "replacement":
    return idx_k, None
  logp_N = jax.nn.log_softmax(logw_N)
  weight_k = jnp.exp(-logp_N[idx_k]) / n  # 1 / (N p_i)
  return idx_k, weight_k


def take_rows(batch: dict[str, Any], idx_k: jax.Array) -> dict[str, Any]:
  """Rows ``idx_k`` of every array of a batch."""
  return {name: x[idx_k] for name, x in batch.items()}


def random_rows(key: jax.Array, n: int, k: int) -> jax.Array:
  """k distinct indices in ``[0, n)``, uniformly at random."""
  if not 1 <= k <= n:
    raise ValueError(
      f"cannot draw k = {k} distinct rows of n = {n}; k must lie in [1, {n}]"
    )
  return jax.random.permutation(key, n)[:k].astype(jnp.int32)
