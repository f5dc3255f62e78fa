"""Domain weights on the probability simplex: checks, projection, updates.

The outer loop of bilevel data mixing (the book's Sources §1, "Less is More") keeps
the domain weights ``w_K`` on the simplex
``Δ_K = {w in R^K : w >= 0, Σ_j w_j = 1}``. Two outer updates are offered:

* exponentiated gradient (mirror descent with the entropy mirror map),
  ``w_{k+1} ∝ w_k ⊙ exp(−β h_k)``, the default;
* projected gradient, ``w_{k+1} = Π_Δ(w_k − β h_k)``.

[reconstruction] The paper's abstract does not state its outer update; EG
is our most likely reading and PGD the alternative (the book's Sources §1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from dataweights.errors import WeightsError
from dataweights.weights import check_weights

try:  # optax >= 0.2.3
  from optax.projections import projection_simplex as _optax_projection_simplex
except ImportError:  # pragma: no cover - depends on the optax version
  _optax_projection_simplex = None


SimplexError = WeightsError
"""Weights off the simplex: the library's one :class:`~dataweights.errors.WeightsError`."""


def check_simplex(
  w_K: ArrayLike, *, atol: float = 1e-5, what: str = "weights"
) -> jax.Array:
  """Checks that ``w_K`` lies on the probability simplex.

  The check (:func:`dataweights.weights.check_weights`) needs concrete
  values; inside ``jax.jit`` (a tracer) only the rank is checked and the
  array is returned unchanged.

  Args:
    w_K: candidate weights, shape ``(K,)``.
    atol: tolerance on ``|Σ_j w_j − 1|`` and on negative entries
      (entries ``>= −atol`` are accepted).
    what: how the message calls the weights.

  Returns:
    ``w_K`` as a ``jax.Array``.

  Raises:
    WeightsError: if ``w_K`` is not 1-D with ``K >= 1``, has a non-finite
      or negative entry, or does not sum to 1 within ``atol``. The message
      shows the vector and what is allowed.
  """
  if isinstance(w_K, jax.core.Tracer):
    if w_K.ndim != 1 or w_K.shape[0] < 1:
      raise WeightsError(
        f"{what} of shape {w_K.shape} are invalid; expected a 1-D array of "
        "K >= 1 weights"
      )
    return w_K
  check_weights(w_K, atol=atol, what=what)
  return jnp.asarray(w_K)


def _projection_simplex_sort(v_K: jax.Array) -> jax.Array:
  """Sort-based Euclidean projection onto the simplex (Duchi et al. 2008)."""
  K = v_K.shape[0]
  u_K = jnp.sort(v_K)[::-1]
  css_K = jnp.cumsum(u_K) - 1.0
  ind_K = jnp.arange(1, K + 1, dtype=v_K.dtype)
  cond_K = u_K - css_K / ind_K > 0
  rho = jnp.sum(cond_K)
  tau = css_K[rho - 1] / rho.astype(v_K.dtype)
  return jnp.maximum(v_K - tau, 0.0)


def project_simplex(v_K: ArrayLike) -> jax.Array:
  """Euclidean projection ``argmin_{w in Δ_K} ||w − v||²`` onto the simplex.

  Uses ``optax.projections.projection_simplex`` when available, else a
  sort-based fallback.

  Args:
    v_K: any real vector, shape ``(K,)`` (``±inf`` entries are taken as
      their limits).

  Returns:
    The projection, shape ``(K,)``: non-negative, summing to 1.

  Raises:
    SimplexError: if ``v_K`` is not 1-D.

  Example:
    >>> project_simplex(jnp.array([2.0, 0.0])).tolist()
    [1.0, 0.0]
  """
  v_K = jnp.asarray(v_K)
  if v_K.ndim != 1 or v_K.shape[0] < 1:
    raise SimplexError(
      f"project_simplex expects a 1-D vector with K >= 1 entries; "
      f"got shape {v_K.shape}"
    )
  if not jnp.issubdtype(v_K.dtype, jnp.floating):
    v_K = v_K.astype(jnp.result_type(float))
  # Π(v + c 1) = Π(v), and entries more than 1 below max(v) project to 0:
  # shift by the max and clip at -1 so that the sums inside the projection
  # cannot overflow for large finite entries (the result is unchanged).
  # Infinite entries (e.g. an overflowing w - beta h) count as their limit:
  # the +inf entries share the mass, -inf entries get 0.
  v_max = jnp.max(v_K)
  v_K = jnp.maximum(jnp.where(v_K == v_max, 0.0, v_K - v_max), -1.0)
  if _optax_projection_simplex is not None:
    return _optax_projection_simplex(v_K)
  return _projection_simplex_sort(v_K)  # pragma: no cover


def _check_beta(beta: ArrayLike) -> None:
  if isinstance(beta, jax.core.Tracer):
    return
  try:
    b = float(np.asarray(beta)) if not isinstance(beta, bool) else math.nan
  except (TypeError, ValueError):
    b = math.nan
  if not math.isfinite(b) or b <= 0:
    raise SimplexError(
      f"step size beta = {beta!r} is invalid; it must be a finite number > 0"
    )


def eg_update(w_K: ArrayLike, h_K: ArrayLike, beta: ArrayLike) -> jax.Array:
  """Exponentiated-gradient (entropic mirror descent) step on the simplex.

  ``w_{k+1}^{(j)} = w_k^{(j)} exp(−β h_k^{(j)}) / Σ_i w_k^{(i)} exp(−β h_k^{(i)})``,
  computed in log space (a softmax of ``log w − β h``) so large ``β h``
  cannot overflow. Zero weights stay zero.

  Args:
    w_K: current weights on the simplex, shape ``(K,)``.
    h_K: hypergradient ``∂ g / ∂ w``, shape ``(K,)``.
    beta: outer step size, finite and > 0.

  Returns:
    The new weights, shape ``(K,)``, on the simplex.

  Raises:
    SimplexError: if ``beta`` is not finite and > 0 (when concrete).

  References:
    Kivinen & Warmuth (1997), exponentiated gradient; the book's Sources §1 (the
    paper's outer update is our reconstruction).

  Example:
    >>> w = eg_update(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0]), 1.0)
    >>> bool(w[0] < w[1])
    True
  """
  _check_beta(beta)
  w_K = jnp.asarray(w_K)
  h_K = jnp.asarray(h_K)
  pos_K = w_K > 0
  log_w_K = jnp.log(jnp.where(pos_K, w_K, 1.0))
  # softmax is shift-invariant: measuring h from its smallest value on the
  # support keeps every exponent <= log w, so no inf - inf can arise (an
  # overflowing beta (h - c) is -inf: that weight's limit, 0); zero weights
  # are masked, never computed with.
  c = jnp.min(jnp.where(pos_K, h_K, jnp.inf))
  z_K = jnp.where(pos_K, log_w_K - beta * (h_K - c), -jnp.inf)
  return jax.nn.softmax(z_K)


def projected_update(
  w_K: ArrayLike, h_K: ArrayLike, beta: ArrayLike
) -> jax.Array:
  """Projected-gradient step ``w ← Π_Δ(w − β h)``.

  Args:
    w_K: current weights, shape ``(K,)``.
    h_K: hypergradient ``∂ g / ∂ w``, shape ``(K,)``.
    beta: outer step size, finite and > 0.

  Returns:
    The new weights, shape ``(K,)``, on the simplex.

  Raises:
    SimplexError: if ``beta`` is not finite and > 0 (when concrete).
  """
  _check_beta(beta)
  return project_simplex(jnp.asarray(w_K) - beta * jnp.asarray(h_K))
