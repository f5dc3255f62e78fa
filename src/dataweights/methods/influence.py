"""Influence scores for data selection: exact, LESS and G-DIG.

**Influence** (Koh & Liang, 2017). Training minimises ``(1/N) sum_n
loss(z_n; theta) + R(theta)``. Up-weighting a candidate ``z`` by ``eps``
moves the optimum by ``-eps H^{-1} grad loss(z)``, so the loss on a query
``q`` changes at the rate

  ``s(z, q) = - grad loss(z)^T H^{-1} grad loss(q)``                  (1)

(negative = ``z`` helps ``q``). Removing ``z`` from ``N`` examples is
``eps = -1/N``: the predicted change of the query loss is ``-s(z, q) / N``.
:func:`hessian_influence` computes (1) with the exact Hessian (or another
curvature matrix) for models small enough to form it.

**G-DIG quality** (Pan et al., 2024; xypan0/G-DIG): (1) with ``H`` the
empirical Fisher of a few MLP layers in K-FAC form plus damping ``lam``
(0.5 in the released scripts), averaged over seed batches ``q``:
``s(z) = mean_q s(z, q)`` (:func:`gdig_direction`, :func:`gdig_scores`).
Since (1) is linear in ``grad loss(q)``, the inverse-HVPs of the seed
batches are averaged once and each candidate costs one inner product,
``-<dW_z, u>`` evaluated from the layer's inputs and output gradients
without forming ``dW_z``.

**LESS** (Xia et al., 2024; princeton-nlp/LESS): per-example gradients at
warm-up checkpoints ``i``, the candidates' Adam-preconditioned
(``Gamma = m / (sqrt(v) + eps)`` from the checkpoint's moments, no bias
correction, as in the released code), the validation examples' plain,
both randomly projected to ``d`` dimensions; the score is the
learning-rate-weighted cosine ``sum_i eta_i mean_v cos(Gamma_i(z),
grad_i(v))`` (:func:`less_scores`; the released code takes the mean over a
target's validation examples, then the max over targets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from dataweights.methods import kfac as kfac_lib
from dataweights.methods import pergrad
from dataweights.methods.gradstore import GradientStore
from dataweights.methods.projection import Projector
from dataweights.types import Batch, Params

# --------------------------------------------------------- exact (small) --


def flat_problem(
  loss_fn: Callable[[Params, Batch], jax.Array], params: Params
) -> tuple[jax.Array, Callable[[jax.Array, Batch], jax.Array], Callable]:
  """The loss as a function of one flat parameter vector.

  Returns:
    ``(theta_P, flat_loss(theta_P, batch) -> loss_B, unravel)``.
  """
  theta, unravel = ravel_pytree(params)
  return theta, lambda th, b: loss_fn(unravel(th), b), unravel


def hessian_influence(
  flat_loss: Callable[[jax.Array, Batch], jax.Array],
  theta_P: jax.Array,
  train: Batch,
  query: Batch,
  *,
  l2: float = 0.0,
  curvature: str = "hessian",
  damping: float = 0.0,
) -> jax.Array:
  """Exact influence (1) of every training example on the mean query loss.

  The objective is ``mean_n loss(z_n) + (l2/2) ||theta||^2``; its
  curvature is the Hessian (``"hessian"``) or the empirical Fisher
  ``mean_n g_n g_n^T + l2 I`` (``"fisher"``), plus ``damping * I``.

  Args:
    flat_loss: ``flat_loss(theta_P, batch) -> loss_B``.
    theta_P: the trained parameters (flat).
    train: the N training examples.
    query: the query examples (their mean loss is the target).
    l2: the L2 coefficient of the objective.
    curvature: ``"hessian"`` or ``"fisher"``.
    damping: added to the diagonal.

  Returns:
    ``s_N``, the influence of each training example (negative = helps).
  """
  if curvature not in ("hessian", "fisher"):
    raise ValueError(f"curvature = {curvature!r}; allowed: 'hessian', 'fisher'")
  p = theta_P.shape[0]
  grads_NxP = jax.vmap(
    jax.grad(
      lambda th, ex: flat_loss(th, jax.tree.map(lambda x: x[None], ex))[0]
    ),
    in_axes=(None, 0),
  )(theta_P, train)
  if curvature == "hessian":
    h = jax.hessian(lambda th: flat_loss(th, train).mean())(theta_P)
  else:
    h = grads_NxP.T @ grads_NxP / grads_NxP.shape[0]
  h = h + (l2 + damping) * jnp.eye(p, dtype=h.dtype)
  g_q = jax.grad(lambda th: flat_loss(th, query).mean())(theta_P)
  return -grads_NxP @ jnp.linalg.solve(h, g_q)


# ------------------------------------------------------------------ LESS --


def adam_moments(opt_state: Any) -> tuple[Any, Any]:
  """``(mu, nu)`` of the first Adam/AdamW state found in an optax state.

  Raises:
    ValueError: no ``ScaleByAdamState`` in ``opt_state``.
  """
  found = []

  def visit(x):
    if isinstance(x, optax.ScaleByAdamState):
      found.append(x)
    return x

  jax.tree.map(
    visit, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
  )
  if not found:
    raise ValueError(
      "no Adam state (optax.ScaleByAdamState) in the optimiser state; LESS's "
      "preconditioning needs an Adam/AdamW checkpoint"
    )
  return found[0].mu, found[0].nu


def adam_precondition(
  grads: Params,
  mu: Params,
  nu: Params,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> Params:
  """LESS's ``Gamma(g) = m / (sqrt(v) + eps)`` after one Adam moment update.

  ``m = b1 mu + (1 - b1) g``, ``v = b2 nu + (1 - b2) g^2`` with the
  checkpoint's moments ``mu, nu`` (no bias correction, as in LESS's
  ``collect_grad_reps.py``).
  """

  def one(g, m0, v0):
    m = b1 * m0 + (1 - b1) * g
    v = b2 * v0 + (1 - b2) * g * g
    return m / (jnp.sqrt(v) + eps)

  return jax.tree.map(one, grads, mu, nu)


def less_feature_fn(
  projector: Projector,
  moments: tuple[Any, Any] | None = None,
  **adam_kw: float,
) -> Callable[[Params], jax.Array]:
  """The per-example feature of LESS: (preconditioned) projected gradient."""

  def feature(g):
    if moments is not None:
      g = adam_precondition(g, moments[0], moments[1], **adam_kw)
    return projector.project(g)

  return feature


def project_pool(
  loss_fn: pergrad.LossFn,
  params: Params,
  batches: Sequence[Batch],
  feature_fn: Callable[[Params], jax.Array],
  *,
  chunk_size: int | None = None,
  store_path: Any = None,
  meta: dict[str, Any] | None = None,
) -> np.ndarray | GradientStore:
  """Projected per-example gradients of a pool, batch by batch.

  With ``store_path`` the rows stream into a :class:`GradientStore`
  (float16) and the opened store is returned; otherwise a float32 array.
  The feature function is jitted once and reused for every batch (give
  batches of one shape to compile once).
  """
  fn = jax.jit(
    lambda p, b: pergrad.per_example_features(
      loss_fn, p, b, feature_fn=feature_fn, chunk_size=chunk_size
    )
  )
  if store_path is None:
    return np.concatenate([np.asarray(fn(params, b)) for b in batches], axis=0)
  sizes = [jax.tree.leaves(b)[0].shape[0] for b in batches]
  first = np.asarray(fn(params, batches[0]))
  store = GradientStore.create(
    store_path, sum(sizes), first.shape[1], meta=meta, overwrite=True
  )
  store.append(first)
  for b in batches[1:]:
    store.append(np.asarray(fn(params, b)))
  return store.close()


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def less_scores(
  train_feats: Sequence[np.ndarray | GradientStore],
  val_feats: Sequence[np.ndarray],
  lrs: Sequence[float],
  *,
  val_groups: np.ndarray | None = None,
  chunk_rows: int = 65536,
) -> np.ndarray:
  """LESS: ``sum_i lr_i mean_v cos(train_i(z), val_i(v))`` per candidate.

  Args:
    train_feats: per checkpoint, the candidates' features ``N x d``
      (arrays or stores; stores are streamed).
    val_feats: per checkpoint, the validation features ``Q x d``.
    lrs: per checkpoint, its learning rate ``eta_i``.
    val_groups: optional target id of each validation example: the mean
      is taken per target and the max over targets (LESS's subtasks).
    chunk_rows: rows read at once from a store.

  Returns:
    ``scores_N`` (higher = more relevant).
  """
  if not (len(train_feats) == len(val_feats) == len(lrs)) or not lrs:
    raise ValueError(
      f"need one train/val feature set and learning rate per checkpoint; got "
      f"{len(train_feats)}, {len(val_feats)}, {len(lrs)}"
    )
  total = None
  for tr, va, lr in zip(train_feats, val_feats, lrs):
    v = _unit(va).T
    if isinstance(tr, GradientStore):
      cos_NxQ = tr.matmul(v, chunk_rows=chunk_rows, normalize=True)
    else:
      cos_NxQ = _unit(tr) @ v
    if val_groups is None:
      s = cos_NxQ.mean(1)
    else:
      groups = np.asarray(val_groups)
      s = np.max(
        np.stack(
          [cos_NxQ[:, groups == g].mean(1) for g in np.unique(groups)], 1
        ),
        axis=1,
      )
    total = lr * s if total is None else total + lr * s
  return np.asarray(total, np.float64)


# ----------------------------------------------------------------- G-DIG --


def batch_layer_grads(stats: kfac_lib.LayerStats) -> dict[str, jax.Array]:
  """Gradient of the batch's mean loss for each layer (``I x O``)."""
  n = stats.loss_B.shape[0]
  return {
    p: jnp.einsum("bti,bto->io", stats.a[p], stats.g[p]) / n for p in stats.a
  }


def gdig_direction(
  kf: kfac_lib.KFAC,
  stats_fn: Callable[[Batch], kfac_lib.LayerStats],
  seed_batches: Sequence[Batch],
  *,
  damping: float = 0.5,
  method: str = "kfac",
) -> dict[str, jax.Array]:
  """``u = mean_q (F + lam I)^{-1} grad loss(q)`` over the seed batches."""
  if not seed_batches:
    raise ValueError("G-DIG needs at least one seed batch")
  acc = None
  for q in seed_batches:
    v = ihvp_of_batch(kf, stats_fn(q), damping=damping, method=method)
    acc = v if acc is None else jax.tree.map(jnp.add, acc, v)
  return jax.tree.map(lambda x: x / len(seed_batches), acc)


def ihvp_of_batch(
  kf: kfac_lib.KFAC,
  stats: kfac_lib.LayerStats,
  *,
  damping: float,
  method: str,
) -> dict[str, jax.Array]:
  """``(F + lam I)^{-1}`` applied to a batch's mean-loss gradient."""
  return kfac_lib.ihvp(kf, batch_layer_grads(stats), damping, method)


def gdig_scores_from_stats(
  stats: kfac_lib.LayerStats, u: dict[str, jax.Array]
) -> jax.Array:
  """``s(z) = -sum_layers <dW_z, u>`` for every example of a batch.

  ``<dW_z, u> = sum_t a_t^T u g_t``: no per-example ``dW`` is formed.
  """
  s = 0.0
  for p, up in u.items():
    s = s + jnp.einsum("bti,io,bto->b", stats.a[p], up, stats.g[p])
  return -s
