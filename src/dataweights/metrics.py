"""Loss reductions and metrics: pure functions returning flat "/"-keyed dicts.

The per-domain reduction follows levanter's DoReMi (``levanter/doremi.py``
at a9d911f4): a one-hot contraction ``onehot_BxK^T loss_B`` divided by a
safe count, so a domain absent from the batch gives 0 (with count 0) instead
of NaN. Methods (DoReMi, DoGE, ScaleBiO, ...) import these from here;
``metrics`` depends only on JAX, so ``methods`` may use it.

:class:`History` keeps the host-side metric history of a run and round-trips
through JSON (it is saved with every checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def domain_one_hot(domain_B: ArrayLike, num_domains: int) -> jax.Array:
  """One-hot ``(B, K)`` float32 matrix of the domain ids ``domain_B``."""
  return jax.nn.one_hot(jnp.asarray(domain_B), num_domains, dtype=jnp.float32)


def per_domain_sum(
  value_B: ArrayLike,
  domain_B: ArrayLike,
  num_domains: int,
  weight_B: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Sums of ``weight_B * value_B`` and of ``weight_B`` per domain.

  Args:
    value_B: per-example values (e.g. losses), shape ``(B,)``.
    domain_B: integer domain ids in ``[0, num_domains)``, shape ``(B,)``;
      ids outside that range contribute to no domain.
    num_domains: K.
    weight_B: optional per-example weights (default 1).

  Returns:
    ``(sum_K, count_K)``, both float32 of shape ``(K,)``.
  """
  onehot_BxK = domain_one_hot(domain_B, num_domains)
  value_B = jnp.asarray(value_B, jnp.float32)
  if weight_B is not None:
    onehot_BxK = onehot_BxK * jnp.asarray(weight_B, jnp.float32)[:, None]
  return value_B @ onehot_BxK, jnp.sum(onehot_BxK, axis=0)


def per_domain_mean(
  value_B: ArrayLike,
  domain_B: ArrayLike,
  num_domains: int,
  weight_B: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Mean of ``value_B`` over the examples of each domain.

  ``mean_K[k] = sum_b 1[d_b = k] w_b v_b / max(sum_b 1[d_b = k] w_b, tiny)``:
  0 for a domain with no example in the batch (check ``count_K``). It is
  invariant to permutations of the batch.

  Args:
    value_B: per-example values, shape ``(B,)``.
    domain_B: integer domain ids, shape ``(B,)``.
    num_domains: K.
    weight_B: optional per-example weights (default 1).

  Returns:
    ``(mean_K, count_K)``: float32 ``(K,)`` means and (weighted) counts.
  """
  sum_K, count_K = per_domain_sum(value_B, domain_B, num_domains, weight_B)
  return sum_K / jnp.maximum(count_K, jnp.finfo(jnp.float32).tiny), count_K


def domain_to_example_weights(
  domain_B: ArrayLike, w_K: ArrayLike, *, per_domain_mean_weights: bool = True
) -> jax.Array:
  """Per-example weights that realise domain weights ``w_K`` on a batch.

  With ``per_domain_mean_weights`` (the default), ``weight_b = w_K[d_b] /
  n_K[d_b]`` where ``n_K`` counts the batch's examples per domain, so that
  ``sum_b weight_b loss_b = sum_K w_K mean_K(loss)`` over the domains in the
  batch: the DoReMi / ScaleBiO objective ``sum_K w_K L_K``. Otherwise
  ``weight_b = w_K[d_b]`` (importance weights per example). Compute this on
  the whole batch, before splitting it into microbatches, so that
  accumulated gradients equal one-big-batch gradients.

  Args:
    domain_B: integer domain ids, shape ``(B,)``.
    w_K: domain weights, shape ``(K,)``.
    per_domain_mean_weights: divide by the per-domain counts of the batch.

  Returns:
    float32 weights of shape ``(B,)``.
  """
  w_K = jnp.asarray(w_K, jnp.float32)
  onehot_BxK = domain_one_hot(domain_B, w_K.shape[0])
  weight_B = onehot_BxK @ w_K
  if per_domain_mean_weights:
    count_K = jnp.sum(onehot_BxK, axis=0)
    weight_B = weight_B / jnp.maximum(onehot_BxK @ count_K, 1.0)
  return weight_B


def domain_metrics(
  loss_K: ArrayLike,
  count_K: ArrayLike,
  names: Sequence[str],
  prefix: str = "loss/domain",
) -> dict[str, jax.Array]:
  """``{"{prefix}/{name}": loss_K[k], "count/domain/{name}": count_K[k]}``.

  Raises:
    ValueError: if ``names`` does not have one entry per domain.
  """
  loss_K = jnp.asarray(loss_K)
  if len(names) != loss_K.shape[0]:
    raise ValueError(
      f"got {len(names)} domain names {list(names)!r} for {loss_K.shape[0]} "
      "domains; pass one name per domain"
    )
  out = {}
  for k, name in enumerate(names):
    out[f"{prefix}/{name}"] = loss_K[k]
    out[f"count/domain/{name}"] = jnp.asarray(count_K)[k]
  return out


def global_norm(tree: Any) -> jax.Array:
  """The l2 norm of all leaves of ``tree`` together (float32)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(
    sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves)
  )


def nonfinite_keys(metrics: Mapping[str, ArrayLike]) -> list[str]:
  """The keys of ``metrics`` whose value has a NaN or an infinity (host)."""
  bad = []
  for key, value in metrics.items():
    arr = np.asarray(value)
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
      bad.append(key)
  return sorted(bad)


class History:
  """Metric history of a run: one row ``{"step": s, key: float, ...}`` each.

  Rows are JSON-able; :meth:`state_dict` / :meth:`from_state_dict` round-trip
  through checkpoints so a resumed run continues the same history.
  """

  def __init__(self, rows: Sequence[Mapping[str, Any]] = ()):
    self.rows: list[dict[str, Any]] = [dict(r) for r in rows]

  def append(self, step: int, metrics: Mapping[str, ArrayLike]) -> dict:
    """Adds a row of scalar metrics at ``step`` (values moved to host)."""
    row: dict[str, Any] = {"step": int(step)}
    for key, value in metrics.items():
      arr = np.asarray(value)
      if arr.ndim == 0:
        v = arr.item()
        row[key] = v if not isinstance(v, float) or math.isfinite(v) else str(v)
    self.rows.append(row)
    return row

  def truncate(self, step: int) -> None:
    """Drops rows after ``step`` (used when resuming from ``step``)."""
    self.rows = [r for r in self.rows if r["step"] <= step]

  def series(self, key: str) -> tuple[list[int], list[Any]]:
    """``(steps, values)`` of ``key`` over the rows that have it."""
    rows = [r for r in self.rows if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]

  def last(self) -> dict[str, Any]:
    """The last row, or an empty dict."""
    return dict(self.rows[-1]) if self.rows else {}

  def __len__(self) -> int:
    return len(self.rows)

  def state_dict(self) -> dict[str, Any]:
    """A JSON-able dict of the history."""
    return {"rows": self.rows}

  @classmethod
  def from_state_dict(cls, d: Mapping[str, Any]) -> History:
    """Rebuilds a history from :meth:`state_dict` output."""
    return cls(d.get("rows", ()))
