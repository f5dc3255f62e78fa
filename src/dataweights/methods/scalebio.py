"""ScaleBiO's first-order penalty minimax for source weights (pure functions).

Pan et al. 2024, "ScaleBiO: Scalable Bilevel Optimization for LLM Data
Reweighting" (arXiv 2406.19976). The bilevel problem "minimise the
validation loss of the model trained on the lambda-weighted training
loss" is replaced by the penalty minimax (their Eq. 3)

  min_{w, p} max_u  F(w, u, p) = L_val(w) + alpha [L_tr(w, lam) - L_tr(u, lam)],
  lam = softmax(p),   L_tr(theta, lam) = sum_k lam_k mean_{b in k} loss_b(theta),

over the sources ``k`` present in the training batch (the per-example
weight is ``lam_{k_b} / n_{k_b}``, ``n_k`` the batch's count of source
``k``). Every step takes one simultaneous gradient step from ``(w, u, p)``:

* ``u`` descends ``alpha L_tr(u, lam)`` (i.e. ascends ``F``);
* ``w`` descends ``L_val(w) + alpha L_tr(w, lam)`` (``grad_w F``);
* ``p`` descends ``grad_p F = J(lam)^T alpha (m^w - m^u)`` with the
  per-source mean losses ``m^w_k``, ``m^u_k`` on the training batch and
  ``J(lam) = diag(lam) - lam lam^T`` the softmax Jacobian, i.e.
  ``lam * (d - <lam, d>)`` with ``d = alpha (m^w - m^u)`` (0 for sources
  absent from the batch).

``alpha`` is constant or grows by ``tau`` per outer round
(:func:`alpha_at`); the released code also divides the learning rates by
``tau^round`` (:func:`lr_scale_at`). The training loop's method is
:class:`dataweights.train.scalebio.ScaleBiO`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def lambdas(p_K: jax.Array) -> jax.Array:
  """``lam = softmax(p)``."""
  return jax.nn.softmax(p_K)


def example_weights(domain_B: jax.Array, lam_K: jax.Array) -> jax.Array:
  """``lam_{k_b} / n_{k_b}``: ``sum_b weight_b loss_b = L_tr(., lam)``.

  In the dtype of ``lam_K`` (float64 under x64 for finite differences); ids
  outside ``[0, K)`` get weight 0 (validation rows in a combined batch).
  """
  onehot_BxK = jax.nn.one_hot(domain_B, lam_K.shape[0], dtype=lam_K.dtype)
  count_K = jnp.sum(onehot_BxK, axis=0)
  return onehot_BxK @ (lam_K / jnp.maximum(count_K, 1))


def source_means(
  loss_B: jax.Array, domain_B: jax.Array, num_sources: int
) -> tuple[jax.Array, jax.Array]:
  """``(m_K, n_K)``: per-source mean loss (0 if absent) and counts, in the
  dtype of ``loss_B``; ids outside ``[0, K)`` count for no source."""
  onehot_BxK = jax.nn.one_hot(domain_B, num_sources, dtype=loss_B.dtype)
  count_K = jnp.sum(onehot_BxK, axis=0)
  return (loss_B @ onehot_BxK) / jnp.maximum(count_K, 1), count_K


def lambda_grad(lam_K: jax.Array, d_K: jax.Array) -> jax.Array:
  """``J(lam)^T d = lam * (d - <lam, d>)``: the gradient w.r.t. ``p`` of
  ``sum_k softmax(p)_k d_k`` (ScaleBiO's ``grad_p``)."""
  return lam_K * (d_K - jnp.dot(lam_K, d_K))


def round_of(step: jax.Array, round_steps: int) -> jax.Array:
  """The outer round of a step (0 when ``round_steps == 0``: one round)."""
  if round_steps <= 0:
    return jnp.zeros_like(jnp.asarray(step, jnp.int32))
  return jnp.asarray(step, jnp.int32) // round_steps


def alpha_at(
  step: jax.Array, alpha: float, tau: float, round_steps: int
) -> jax.Array:
  """``alpha * tau^round(step)``: the penalty weight of a step."""
  r = round_of(step, round_steps).astype(jnp.float32)
  return jnp.float32(alpha) * jnp.power(jnp.float32(tau), r)


def lr_scale_at(step: jax.Array, tau: float, round_steps: int) -> jax.Array:
  """``tau^-round(step)``: the released code's learning-rate factor."""
  r = round_of(step, round_steps).astype(jnp.float32)
  return jnp.power(jnp.float32(tau), -r)


def penalty_objective(
  loss_fn: Callable[[Any, dict], jax.Array],
  w: Any,
  u: Any,
  p_K: jax.Array,
  train: dict,
  valid: dict,
  alpha: float,
) -> jax.Array:
  """``F(w, u, p)`` on one training and one validation batch.

  Args:
    loss_fn: ``loss_fn(params, batch) -> loss_B`` (per-example losses).
    w, u: the model and its auxiliary copy.
    p_K: the source logits.
    train: the training batch (with ``domain_B``).
    valid: the validation batch.
    alpha: the penalty weight.
  """
  k = p_K.shape[0]
  lam_K = jax.nn.softmax(p_K)
  m_w, _ = source_means(loss_fn(w, train), train["domain_B"], k)
  m_u, _ = source_means(loss_fn(u, train), train["domain_B"], k)
  l_val = jnp.mean(loss_fn(w, valid))
  return l_val + alpha * (jnp.dot(lam_K, m_w) - jnp.dot(lam_K, m_u))


def penalty_gradients(
  loss_fn: Callable[[Any, dict], jax.Array],
  w: Any,
  u: Any,
  p_K: jax.Array,
  train: dict,
  valid: dict,
  alpha: float,
) -> tuple[Any, Any, jax.Array, dict[str, jax.Array]]:
  """The three directions of one ScaleBiO step, from per-example losses.

  What :class:`dataweights.train.scalebio.ScaleBiO` computes inside the
  train step, written with plain ``jax.grad`` of weighted sums (one pass
  for ``w`` on the training and validation rows, one for ``u``), for tests
  and small problems.

  Returns:
    ``(g_w, g_u, g_p, aux)``: ``g_w = grad_w F``, ``g_u = grad_u alpha
    L_tr(u, lam) = -grad_u F`` (the direction ``u`` descends), ``g_p =
    grad_p F``; ``aux`` holds ``lam_K``, the per-source means ``m_w_K``,
    ``m_u_K`` and ``val_loss``.
  """
  k = p_K.shape[0]
  lam_K = lambdas(p_K)
  wt_B = jax.lax.stop_gradient(
    alpha * example_weights(train["domain_B"], lam_K)
  )

  def w_obj(w):
    loss_B = loss_fn(w, train)
    val_B = loss_fn(w, valid)
    return jnp.sum(wt_B * loss_B) + jnp.mean(val_B), (loss_B, val_B)

  def u_obj(u):
    loss_B = loss_fn(u, train)
    return jnp.sum(wt_B * loss_B), loss_B

  (_, (loss_w_B, val_B)), g_w = jax.value_and_grad(w_obj, has_aux=True)(w)
  (_, loss_u_B), g_u = jax.value_and_grad(u_obj, has_aux=True)(u)
  m_w, _ = source_means(loss_w_B, train["domain_B"], k)
  m_u, _ = source_means(loss_u_B, train["domain_B"], k)
  g_p = lambda_grad(lam_K, alpha * (m_w - m_u))
  aux = {
    "lam_K": lam_K,
    "m_w_K": m_w,
    "m_u_K": m_u,
    "val_loss": jnp.mean(val_B),
  }
  return g_w, g_u, g_p, aux
