"""Synthetic multi-domain problems for data mixing (chapter 1).

Two families, both with K training domains and one validation target:

* :class:`QuadraticDomains`: ``f_j(θ) = ½ (θ − c_j)ᵀ A_j (θ − c_j)`` with
  diagonal ``A_j`` and ``g(θ) = ½ (θ − c_v)ᵀ A_v (θ − c_v)``. The inner
  minimiser ``θ*(w) = (Σ_j w_j A_j)⁻¹ Σ_j w_j A_j c_j`` is closed form, so
  the exact bilevel optimum ``argmin_{w ∈ Δ} g(θ*(w))`` and the fixed point
  of the greedy ``T = 1`` rule can be computed to machine precision in
  float64 (:func:`bilevel_optimum`, :func:`greedy_fixed_point`).
  :func:`greedy_quadratic` is the 2-D, 2-domain instance of the chapter.
* :class:`GaussianDomains`: binary classification with Gaussian class
  clusters per domain, an L2-regularised logistic model (strongly convex,
  as the theory assumes; the book's Sources §1) and minibatch samplers with a
  leading ``T`` axis for :func:`dataweights.methods.mixing.run_mixing`.

Everything here is plain data plus pure functions; the experiments wrap
them in a ``MixingProblem`` (``data`` does not import ``methods``).

[reconstruction] The paper's own experimental problems are not readable
(the book's Sources §1); these instances are ours, designed to exhibit the claims.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from dataweights.types import Batch, PRNGKey

# ---------------------------------------------------------------------------
# Quadratic domains.


class QuadraticDomains(NamedTuple):
  """K quadratic domain losses with diagonal curvature, and a validation loss.

  Attributes:
    a_KxD: diagonal of ``A_j`` (curvatures, all > 0).
    c_KxD: centre ``c_j`` of each domain (its minimiser).
    a_val_D: diagonal of the validation curvature ``A_v``.
    c_val_D: validation centre ``c_v``.
  """

  a_KxD: np.ndarray
  c_KxD: np.ndarray
  a_val_D: np.ndarray
  c_val_D: np.ndarray

  @property
  def num_domains(self) -> int:
    return int(self.a_KxD.shape[0])

  @property
  def dim(self) -> int:
    return int(self.a_KxD.shape[1])


def make_quadratic(
  a_KxD: Any, c_KxD: Any, a_val_D: Any, c_val_D: Any
) -> QuadraticDomains:
  """Validates and builds a :class:`QuadraticDomains` (float64 numpy).

  Args:
    a_KxD: curvatures, shape ``(K, D)``, finite and > 0.
    c_KxD: centres, shape ``(K, D)``.
    a_val_D: validation curvatures, shape ``(D,)``, finite and > 0.
    c_val_D: validation centre, shape ``(D,)``.

  Returns:
    The problem.

  Raises:
    ValueError: mismatched shapes or non-positive curvatures.
  """
  a = np.asarray(a_KxD, np.float64)
  c = np.asarray(c_KxD, np.float64)
  av = np.asarray(a_val_D, np.float64)
  cv = np.asarray(c_val_D, np.float64)
  if a.ndim != 2 or c.shape != a.shape or av.shape != (a.shape[1],):
    raise ValueError(
      f"shapes a_KxD {a.shape}, c_KxD {c.shape}, a_val_D {av.shape}, "
      f"c_val_D {cv.shape} are inconsistent; expected (K, D), (K, D), (D,), (D,)"
    )
  if cv.shape != av.shape:
    raise ValueError(f"c_val_D has shape {cv.shape}; expected {av.shape}")
  if not (np.all(np.isfinite(a)) and np.all(a > 0) and np.all(av > 0)):
    raise ValueError(
      "every curvature in a_KxD and a_val_D must be finite and > 0"
    )
  return QuadraticDomains(a, c, av, cv)


def greedy_quadratic() -> QuadraticDomains:
  """The 2-D, 2-domain quadratic on which greedy ``T = 1`` mixing fails.

  Domain 1 is isotropic, ``A_1 = I`` centred at ``(2, 2)``; domain 2 is
  ill-conditioned, ``A_2 = diag(40, 1)`` centred at the origin; the
  validation loss is ``½‖θ − (0.5, 0.5)‖²``. Domain 2 is the one most
  aligned with validation (its centre is the closer one). The exact
  bilevel optimum puts most weight on domain 2, the greedy fixed point
  very little (see :func:`bilevel_optimum`, :func:`greedy_fixed_point`).

  Returns:
    The problem (float64 numpy arrays).
  """
  return make_quadratic(
    [[1.0, 1.0], [40.0, 1.0]], [[2.0, 2.0], [0.0, 0.0]], [1.0, 1.0], [0.5, 0.5]
  )


def sweep_quadratic() -> QuadraticDomains:
  """The 3-domain quadratic of the horizon sweeps (Figure-1 style).

  The 2-D instance of :func:`greedy_quadratic` plus a third, distracting
  domain ``A_3 = diag(1, 10)`` centred at ``(−2, 3)``, far from validation.

  Returns:
    The problem (float64 numpy arrays).
  """
  return make_quadratic(
    [[1.0, 1.0], [40.0, 1.0], [1.0, 10.0]],
    [[2.0, 2.0], [0.0, 0.0], [-2.0, 3.0]],
    [1.0, 1.0],
    [0.5, 0.5],
  )


def quadratic_losses(
  q: QuadraticDomains, dtype: Any = jnp.float32
) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  """Pure JAX ``(domain_losses, val_loss)`` for ``θ`` of shape ``(D,)``.

  Build them once and reuse the same function objects: ``run_mixing``
  treats the problem as a static (hashed) argument, so new closures
  recompile.

  Args:
    q: the problem.
    dtype: array dtype of the constants.

  Returns:
    ``domain_losses(theta_D, batch=None) -> loss_K`` and
    ``val_loss(theta_D, batch=None) -> scalar`` (``batch`` is ignored: the
    losses are exact, full-gradient).
  """
  a_KxD = jnp.asarray(q.a_KxD, dtype)
  c_KxD = jnp.asarray(q.c_KxD, dtype)
  av_D = jnp.asarray(q.a_val_D, dtype)
  cv_D = jnp.asarray(q.c_val_D, dtype)

  def domain_losses(
    theta_D: jax.Array, batch: Batch | None = None
  ) -> jax.Array:
    del batch
    d_KxD = theta_D[None, :] - c_KxD
    return 0.5 * jnp.sum(a_KxD * d_KxD * d_KxD, axis=1)

  def val_loss(theta_D: jax.Array, batch: Batch | None = None) -> jax.Array:
    del batch
    d_D = theta_D - cv_D
    return 0.5 * jnp.sum(av_D * d_D * d_D)

  return domain_losses, val_loss


def noisy_quadratic_losses(
  q: QuadraticDomains, dtype: Any = jnp.float32
) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  """Stochastic-gradient version of :func:`quadratic_losses`.

  ``f_j(θ; ξ) = f_j(θ) + ⟨ξ_j, θ⟩`` with a batch ``{"xi": KxD}`` of
  zero-mean noise: an unbiased gradient ``∇f_j(θ) + ξ_j`` with constant
  variance and the exact Hessian ``A_j`` (the setting of the stochastic
  theorem; the book's Sources §1). ``batch=None`` gives the exact losses.
  """
  exact, val_loss = quadratic_losses(q, dtype)

  def domain_losses(theta_D: jax.Array, batch: Batch | None = None) -> jax.Array:
    loss_K = exact(theta_D)
    if batch is None:
      return loss_K
    return loss_K + batch["xi"] @ theta_D

  return domain_losses, val_loss


def noise_sampler(K: int, D: int, sigma: float, T: int) -> Callable[[PRNGKey], Batch]:
  """``key -> {"xi": TxKxD}``, i.i.d. ``N(0, σ²)`` gradient noise per step."""

  def batch_fn(key: PRNGKey) -> Batch:
    return {"xi": sigma * jax.random.normal(key, (T, K, D))}

  return batch_fn


def inner_optimum(q: QuadraticDomains, w_K: Any) -> np.ndarray:
  """``θ*(w) = (Σ_j w_j A_j)⁻¹ Σ_j w_j A_j c_j`` in float64.

  Args:
    q: the problem.
    w_K: weights, shape ``(K,)`` or a stack ``(..., K)``.

  Returns:
    ``θ*(w)``, shape ``(D,)`` (or ``(..., D)``).
  """
  w = np.asarray(w_K, np.float64)[..., :, None]
  h = np.sum(w * q.a_KxD, axis=-2)
  return np.sum(w * q.a_KxD * q.c_KxD, axis=-2) / h


def val_at(q: QuadraticDomains, w_K: Any) -> np.ndarray:
  """The outer objective ``g(θ*(w))`` in float64 (broadcasts over stacks)."""
  d = inner_optimum(q, w_K) - q.c_val_D
  return 0.5 * np.sum(q.a_val_D * d * d, axis=-1)


def _gradients(q: QuadraticDomains, theta_D: np.ndarray):
  grad_f_KxD = q.a_KxD * (theta_D[None] - q.c_KxD)
  grad_g_D = q.a_val_D * (theta_D - q.c_val_D)
  return grad_f_KxD, grad_g_D


def greedy_condition(q: QuadraticDomains, w2: float) -> float:
  """``⟨∇g, ∇f_2 − ∇f_1⟩`` at ``θ*(w)``, ``w = (1 − w2, w2)`` (K = 2).

  The greedy ``T = 1`` hypergradient is ``h_j = −η⟨∇g, ∇f_j⟩``, so EG
  raises ``w_2`` while this is positive; its stable zeros are the fixed
  points of greedy mixing.
  """
  theta = inner_optimum(q, np.array([1.0 - w2, w2]))
  grad_f, grad_g = _gradients(q, theta)
  return float(grad_g @ (grad_f[1] - grad_f[0]))


def bilevel_condition(q: QuadraticDomains, w2: float) -> float:
  """``⟨∇g, H⁻¹(∇f_2 − ∇f_1)⟩`` at ``θ*(w)`` (K = 2): ``−dg(θ*)/dw_2``.

  By the implicit function theorem ``dθ*/dw_2 = −H⁻¹(∇f_2 − ∇f_1)``, so
  the exact bilevel optimum in the interior is a zero of this function.
  """
  w = np.array([1.0 - w2, w2])
  theta = inner_optimum(q, w)
  grad_f, grad_g = _gradients(q, theta)
  h_D = w @ q.a_KxD
  return float(grad_g @ ((grad_f[1] - grad_f[0]) / h_D))


def _check_two(q: QuadraticDomains) -> None:
  if q.num_domains != 2:
    raise ValueError(
      f"this function needs K = 2 domains; the problem has K = {q.num_domains}"
    )


def bilevel_optimum(q: QuadraticDomains, grid: int = 2001) -> dict[str, Any]:
  """The exact bilevel optimum ``argmin_{w ∈ Δ} g(θ*(w))`` in float64.

  A fine grid over the simplex (a lattice with ``grid`` points per edge for
  K = 2, ``grid`` // 10 for K = 3) locates the basin; a bounded Brent
  search (K = 2) or SLSQP on the simplex (K >= 3) then refines it to
  machine precision.

  Args:
    q: the problem.
    grid: lattice resolution, >= 3.

  Returns:
    ``{"w_K": np.ndarray, "val": float}``.

  Raises:
    ValueError: ``grid`` < 3 or K > 3.
  """
  if grid < 3:
    raise ValueError(f"grid = {grid!r} is invalid; it must be >= 3")
  K = q.num_domains
  if K == 2:
    s = np.linspace(0.0, 1.0, grid)
    vals = val_at(q, np.stack([1 - s, s], axis=1))
    i = int(np.argmin(vals))
    lo, hi = s[max(i - 1, 0)], s[min(i + 1, grid - 1)]
    res = optimize.minimize_scalar(
      lambda t: float(val_at(q, np.array([1 - t, t]))),
      bounds=(lo, hi),
      method="bounded",
      options={"xatol": 1e-13},
    )
    w2 = float(res.x) if res.fun <= vals[i] else float(s[i])
    w = np.array([1 - w2, w2])
    return {"w_K": w, "val": float(val_at(q, w))}
  if K == 3:
    n = max(grid // 10, 3)
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    w = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], axis=1) / n
    vals = val_at(q, w)
    w0 = w[int(np.argmin(vals))]
    res = optimize.minimize(
      lambda x: float(val_at(q, x)),
      w0,
      method="SLSQP",
      bounds=[(0.0, 1.0)] * 3,
      constraints=[{"type": "eq", "fun": lambda x: np.sum(x) - 1.0}],
      options={"ftol": 1e-15, "maxiter": 500},
    )
    best = np.clip(res.x, 0.0, 1.0) if res.fun <= vals.min() else w0
    best = best / best.sum()
    return {"w_K": best, "val": float(val_at(q, best))}
  raise ValueError(f"bilevel_optimum supports K = 2 or 3 domains, not K = {K}")


def greedy_fixed_point(q: QuadraticDomains, grid: int = 2001) -> dict[str, Any]:
  """The stable fixed point of greedy (``T = 1``) mixing, K = 2, float64.

  Near convergence ``θ ≈ θ*(w)`` and greedy EG moves ``w_2`` in the
  direction of :func:`greedy_condition`; its stable zeros (sign change
  from + to −), or a vertex where the sign never changes, are where
  greedy mixing settles. Refined by Brent's method.

  Args:
    q: a 2-domain problem.
    grid: scan resolution for the sign changes.

  Returns:
    ``{"w_K": np.ndarray, "val": float}`` for the stable fixed point with
    the largest basin (the only one for :func:`greedy_quadratic`).

  Raises:
    ValueError: K != 2.
  """
  _check_two(q)
  s = np.linspace(0.0, 1.0, grid)
  psi = np.array([greedy_condition(q, t) for t in s])
  roots = [
    optimize.brentq(
      lambda t: greedy_condition(q, t), s[k], s[k + 1], xtol=1e-14
    )
    for k in range(grid - 1)
    if psi[k] > 0 >= psi[k + 1]
  ]
  if psi[0] <= 0:
    roots.insert(0, 0.0)
  if psi[-1] >= 0:
    roots.append(1.0)
  # Unstable zeros (− to +) separate basins; pick the widest basin.
  unstable = (
    [0.0] + [s[k] for k in range(grid - 1) if psi[k] < 0 <= psi[k + 1]] + [1.0]
  )
  widths = [
    min(b for b in unstable if b >= r) - max(b for b in unstable if b <= r)
    for r in roots
  ]
  w2 = float(roots[int(np.argmax(widths))])
  w = np.array([1 - w2, w2])
  return {"w_K": w, "val": float(val_at(q, w))}


# ---------------------------------------------------------------------------
# Gaussian-mixture classification domains.


class GaussianDomains(NamedTuple):
  """Binary classification domains with Gaussian class clusters.

  Domain j draws ``y ~ Bernoulli(½)``, ``z ~ N((2y − 1) μ_j, I_D)`` and
  ``x = s_j ⊙ z`` (a per-feature scale: the domains' input covariances,
  hence their loss curvatures, differ), then flips the label with
  probability ``flip_j``. The validation set is drawn from ``μ_v`` with unit
  scale and no label noise.

  Attributes:
    mean_KxD: class-1 means ``μ_j`` per domain.
    scale_KxD: feature scales ``s_j`` per domain (> 0).
    flip_K: label-noise rates per domain, in ``[0, ½)``.
    val_mean_D: validation class-1 mean ``μ_v``.
  """

  mean_KxD: np.ndarray
  scale_KxD: np.ndarray
  flip_K: np.ndarray
  val_mean_D: np.ndarray


def classification_domains(dim: int = 5) -> GaussianDomains:
  """The 3-domain classification problem of the chapter (Figure-2 style).

  Validation separates its classes along ``u = (e_1 + e_2)/√2`` (``μ_v =
  1.5 u``). Domain 1 separates along ``e_1`` only (``μ_1 = 3 e_1``: a
  related, tilted and easy task with large gradients); domain 2 is ``μ_2 =
  u`` with its first feature scaled by 3 (the same direction as
  validation, but an anisotropic input covariance); domain 3 separates
  along ``e_3`` (``μ_3 = 3 e_3``), irrelevant to validation.

  Args:
    dim: feature dimension ``D`` >= 3.

  Returns:
    The problem.

  Raises:
    ValueError: ``dim`` < 3.
  """
  if not isinstance(dim, int) or dim < 3:
    raise ValueError(f"dim = {dim!r} is invalid; it must be an integer >= 3")
  e = np.eye(dim)
  u = (e[0] + e[1]) / np.sqrt(2.0)
  mean = np.stack([3.0 * e[0], u, 3.0 * e[2]])
  scale = np.ones((3, dim))
  scale[1, 0] = 3.0
  return GaussianDomains(mean, scale, np.zeros(3), 1.5 * u)


def sample_domain(
  key: PRNGKey,
  mean_D: Any,
  n: int,
  *,
  scale_D: Any = 1.0,
  flip: Any = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """``n`` examples ``(x_MxD, y_M)`` from one Gaussian domain (float32)."""
  mean_D = jnp.asarray(mean_D, jnp.float32)
  k_y, k_x, k_f = jax.random.split(key, 3)
  y_M = jax.random.bernoulli(k_y, 0.5, (n,))
  sign_M = 2.0 * y_M.astype(jnp.float32) - 1.0
  z_MxD = sign_M[:, None] * mean_D[None] + jax.random.normal(k_x, (n, mean_D.shape[-1]))
  x_MxD = z_MxD * jnp.broadcast_to(jnp.asarray(scale_D, jnp.float32), mean_D.shape)[None, :]
  flipped_M = jax.random.bernoulli(k_f, flip, (n,))
  y_M = jnp.where(flipped_M, ~y_M, y_M)
  return x_MxD, y_M.astype(jnp.float32)


def make_datasets(
  g: GaussianDomains, key: PRNGKey, pool_sizes: Any, n_val: int
) -> dict[str, jax.Array]:
  """Fixed finite training pools per domain and a validation set.

  Pools are stored padded to the largest size ``M``; domain j uses its
  first ``n_j`` rows (``n_K``), so the natural proportions are
  ``n_j / Σ n``.

  Args:
    g: the problem.
    key: PRNG key.
    pool_sizes: examples per domain, K positive integers.
    n_val: validation examples.

  Returns:
    ``{"x_KxMxD", "y_KxM", "mask_KxM", "n_K", "x_val_MxD", "y_val_M"}``.

  Raises:
    ValueError: ``pool_sizes`` not K positive integers.
  """
  n_K = np.asarray(pool_sizes)
  K = g.mean_KxD.shape[0]
  if n_K.shape != (K,) or np.any(n_K < 1):
    raise ValueError(
      f"pool_sizes = {pool_sizes!r} is invalid; expected {K} positive integers"
    )
  M = int(n_K.max())
  k_tr, k_val = jax.random.split(key)
  keys = jax.random.split(k_tr, K)
  x, y = jax.vmap(lambda k, m, s, f: sample_domain(k, m, M, scale_D=s, flip=f))(
    keys,
    jnp.asarray(g.mean_KxD, jnp.float32),
    jnp.asarray(g.scale_KxD, jnp.float32),
    jnp.asarray(g.flip_K, jnp.float32),
  )
  mask = (np.arange(M)[None, :] < n_K[:, None]).astype(np.float32)
  xv, yv = sample_domain(k_val, g.val_mean_D, n_val)
  return {
    "x_KxMxD": x, "y_KxM": y, "mask_KxM": jnp.asarray(mask),
    "n_K": jnp.asarray(n_K, jnp.int32), "x_val_MxD": xv, "y_val_M": yv,
  }


def logistic_params(dim: int) -> dict[str, jax.Array]:
  """Zero-initialised logistic-regression parameters ``{"w": (D,), "b": ()}``."""
  return {"w": jnp.zeros((dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def _logistic_loss(params, x_MxD, y_M, mask_M=None):
  logits_M = x_MxD @ params["w"] + params["b"]
  loss_M = jnp.logaddexp(0.0, logits_M) - y_M * logits_M
  if mask_M is None:
    return jnp.mean(loss_M)
  return jnp.sum(mask_M * loss_M) / jnp.sum(mask_M)


def logistic_losses(
  data: dict[str, jax.Array], l2: float
) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
  """``(domain_losses, val_loss)`` of L2-regularised logistic regression.

  ``f_j(θ) = mean_{(x, y) ∈ batch_j} ℓ(θ; x, y) + (l2/2)‖w‖²`` (strongly
  convex in ``w``); ``g`` is the unregularised validation log-loss. Build
  once and reuse (see :func:`quadratic_losses`).

  Args:
    data: from :func:`make_datasets`.
    l2: ridge coefficient, >= 0.

  Returns:
    ``domain_losses(params, batch)`` with ``batch = {"x": KxBxD, "y": KxB}``
    or ``None`` (full pools), and ``val_loss(params, batch)`` with
    ``batch = {"x": BxD, "y": B}`` or ``None`` (full validation set).
  """
  x_full, y_full = data["x_KxMxD"], data["y_KxM"]
  mask_full = data.get("mask_KxM", jnp.ones_like(y_full))
  xv, yv = data["x_val_MxD"], data["y_val_M"]

  def domain_losses(params, batch=None):
    if batch is None:
      loss_K = jax.vmap(lambda xx, yy, mm: _logistic_loss(params, xx, yy, mm))(
        x_full, y_full, mask_full
      )
    else:
      loss_K = jax.vmap(lambda xx, yy: _logistic_loss(params, xx, yy))(
        batch["x"], batch["y"]
      )
    return loss_K + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  def val_loss(params, batch=None):
    x, y = (xv, yv) if batch is None else (batch["x"], batch["y"])
    return _logistic_loss(params, x, y)

  return domain_losses, val_loss


def accuracy(
  params: dict[str, jax.Array], x_MxD: jax.Array, y_M: jax.Array
) -> jax.Array:
  """Fraction of examples with ``(logit > 0) == y``."""
  logits_M = x_MxD @ params["w"] + params["b"]
  return jnp.mean((logits_M > 0).astype(jnp.float32) == y_M)


def minibatch_sampler(
  data: dict[str, jax.Array], batch_size: int, T: int
) -> Callable[[PRNGKey], Batch]:
  """``key -> {"x": TxKxBxD, "y": TxKxB}``: T per-domain minibatches.

  Each inner step draws ``batch_size`` examples from every domain's pool
  (its first ``n_j`` rows), uniformly with replacement; the domain weights
  act on the losses.
  """
  x, y = data["x_KxMxD"], data["y_KxM"]
  K = y.shape[0]
  n_K = jnp.asarray(data.get("n_K", jnp.full((K,), y.shape[1])))

  def batch_fn(key: PRNGKey) -> Batch:
    u_TxKxB = jax.random.uniform(key, (T, K, batch_size))
    idx_TxKxB = jnp.floor(u_TxKxB * n_K[None, :, None]).astype(jnp.int32)
    k_K = jnp.arange(K)[None, :, None]
    return {"x": x[k_K, idx_TxKxB], "y": y[k_K, idx_TxKxB]}

  return batch_fn


def val_sampler(
  data: dict[str, jax.Array], batch_size: int
) -> Callable[[PRNGKey], Batch]:
  """``key -> {"x": BxD, "y": B}``: a validation minibatch (with replacement)."""
  xv, yv = data["x_val_MxD"], data["y_val_M"]

  def val_batch_fn(key: PRNGKey) -> Batch:
    idx_B = jax.random.randint(key, (batch_size,), 0, yv.shape[0])
    return {"x": xv[idx_B], "y": yv[idx_B]}

  return val_batch_fn
