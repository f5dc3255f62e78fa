"""Hypergradients of bilevel data mixing: unrolled (forward, reverse), implicit.

Set-up (the book's Sources §1, "Less is More", Das et al. 2026). Domains
``j = 1..K`` have training losses ``f_j(θ)``, the validation loss is
``g(θ)`` and the mixed training loss is ``F(θ; w) = Σ_j w_j f_j(θ)``. One
outer round runs ``T`` gradient steps

  ``θ_{t+1} = θ_t − η ∇_θ F(θ_t; w)``,   ``t = 0..T−1``,

and the hypergradient is ``h_j = ∂ g(θ_T) / ∂ w_j``. Proposition 4.1:
``Z_t^{(j)} = ∂θ_t / ∂w_j`` obeys

  ``Z_0 = 0``,  ``Z_{t+1} = (I − η ∇²F(θ_t; w)) Z_t − η ∇f_j(θ_t)``,

and ``h_j = ⟨∇g(θ_T), Z_T^{(j)}⟩``. This is forward-mode differentiation
through the T steps (memory ``O(K |θ|)``, independent of ``T``); reverse
mode gives the same number with ``O(T |θ|)`` memory. As ``T → ∞`` near
``θ*(w)``, ``Z_T → −H⁻¹ ∇f_j``: the implicit-function hypergradient
``h_j = −∇g(θ*)ᵀ H⁻¹ ∇f_j(θ*)`` with ``H = ∇²_θ F(θ*; w)``.

[reconstruction] Only the abstract and the seed's statement of
Proposition 4.1 were readable; the recursion above is our derivation,
consistent with it, and the paper's own constants may differ.

The problem is a :class:`MixingProblem` of two pure functions of a
parameter pytree, so any differentiable losses work (quadratic, logistic,
a small MLP via ``nnx.split``/``nnx.merge``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

from dataweights.errors import WeightsError
from dataweights.types import Batch, Params


class MixingProblem(NamedTuple):
  """Bilevel data mixing over K domains.

  Works for any differentiable losses: quadratic, logistic, a small MLP.

  Attributes:
    domain_losses: ``(params, batch) -> loss_K``, the per-domain training
      losses ``f_j(θ)`` on ``batch``; ``batch=None`` means the full training
      data closed over by the function.
    val_loss: ``(params, batch) -> scalar``, the validation loss ``g(θ)``;
      ``batch=None`` means the full validation data.
  """

  domain_losses: Callable[[Params, Batch | None], jax.Array]
  val_loss: Callable[[Params, Batch | None], jax.Array]


def _weighted_loss(
  problem: MixingProblem, params: Params, w_K: jax.Array, batch: Batch | None
) -> jax.Array:
  """``F(θ; w) = Σ_j w_j f_j(θ)``."""
  loss_K = problem.domain_losses(params, batch)
  if loss_K.ndim != 1 or loss_K.shape != w_K.shape:
    raise ValueError(
      f"problem.domain_losses returned shape {loss_K.shape}; expected one "
      f"loss per domain, shape {w_K.shape} like the weights"
    )
  return jnp.sum(w_K * loss_K)


def _check_T(T: int) -> None:
  if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
    raise ValueError(f"T = {T!r} is invalid; it must be an integer >= 1")


def _check_batches(batches: Batch | None, T: int) -> None:
  if batches is None:
    return
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError("batches is an empty pytree; pass None for full batch")
  lead = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if lead != {T}:
    raise ValueError(
      f"batches must have leading axis T = {T} (one minibatch per inner "
      f"step); got leading axes {sorted(lead, key=str)}"
    )


def _check_w(w_K: ArrayLike) -> jax.Array:
  w_K = jnp.asarray(w_K)
  if w_K.ndim != 1:
    raise WeightsError(
      f"w_K must be 1-D (one weight per domain); got shape {w_K.shape}"
    )
  if not jnp.issubdtype(w_K.dtype, jnp.floating):
    w_K = w_K.astype(jnp.result_type(float))
  return w_K


def _unroll(
  problem: MixingProblem,
  params: Params,
  w_K: jax.Array,
  lr: ArrayLike,
  T: int,
  batches: Batch | None,
  remat: bool = False,
) -> Params:
  """``θ_T`` after T gradient steps on ``F(·; w)`` (a ``lax.scan``)."""
  grad_F = jax.grad(lambda p, w, b: _weighted_loss(problem, p, w, b))

  def step(p: Params, batch: Batch | None) -> Params:
    g = grad_F(p, w_K, batch)
    return jax.tree.map(lambda x, d: x - lr * d, p, g)

  if remat:
    # Inside lax.scan CSE cannot hoist the recomputation, so the
    # optimisation barriers of prevent_cse=True only cost copies (of
    # closed-over data, per step) -- see the jax.checkpoint docs.
    step = jax.checkpoint(step, prevent_cse=False)
  params_T, _ = jax.lax.scan(
    lambda p, b: (step(p, b), None), params, batches, length=T
  )
  return params_T


def inner_steps(
  problem: MixingProblem,
  params: Params,
  w_K: ArrayLike,
  *,
  lr: ArrayLike,
  T: int,
  batches: Batch | None = None,
) -> Params:
  """Runs T inner gradient steps ``θ_{t+1} = θ_t − η ∇_θ Σ_j w_j f_j(θ_t)``.

  Args:
    problem: the bilevel problem.
    params: ``θ_0``, a pytree.
    w_K: domain weights, shape ``(K,)`` (not checked to be on the simplex:
      the hypergradient is the unconstrained partial derivative).
    lr: inner step size ``η``.
    T: number of steps (static), ``>= 1``.
    batches: ``None`` for full-batch steps, else a pytree whose leaves have
      leading axis ``T`` (minibatch ``t`` is used at step ``t``).

  Returns:
    ``θ_T``, same structure as ``params``.

  Raises:
    ValueError: ``T`` not an integer ``>= 1``, ``w_K`` not 1-D, or a
      ``batches`` leading axis different from ``T``.
  """
  _check_T(T)
  _check_batches(batches, T)
  w_K = _check_w(w_K)
  return _unroll(problem, params, w_K, lr, T, batches)


def _tree_vdot_K(Z_K: Params, g: Params) -> jax.Array:
  """``h_j = Σ_leaves ⟨g, Z^{(j)}⟩`` for a pytree ``Z`` with leading axis K."""
  terms = [
    jnp.tensordot(z, gl, axes=gl.ndim)
    for z, gl in zip(jax.tree.leaves(Z_K), jax.tree.leaves(g), strict=True)
  ]
  return sum(terms[1:], terms[0])


def hypergrad_forward(
  problem: MixingProblem,
  params: Params,
  w_K: ArrayLike,
  *,
  lr: ArrayLike,
  T: int,
  batches: Batch | None = None,
  val_batch: Batch | None = None,
) -> tuple[jax.Array, Params]:
  """Unrolled hypergradient by forward mode (Proposition 4.1).

  Pushes the K tangent directions ``e_j`` of ``w`` through the T inner
  steps with ``jax.jvp`` (vmapped over the K directions). The scan then
  carries ``(θ_t, Z_t)`` and, step by step, computes exactly
  ``Z_{t+1} = (I − η ∇²F(θ_t; w)) Z_t − η ∇f_j(θ_t)`` (a Hessian-vector
  product by forward-over-reverse), so memory is ``O(K |θ|)`` whatever T.
  Finally ``h_j = ⟨∇g(θ_T), Z_T^{(j)}⟩``.

  Cost: K Hessian-vector products per inner step, against about one for
  :func:`hypergrad_reverse`. Forward mode therefore wins on memory always
  and on time only where reverse mode is memory-bound (long T, large
  per-step residuals); see ``benchmarks/bench_mixing.py``.

  Args:
    problem: the bilevel problem.
    params: ``θ_0`` (warm start), a pytree.
    w_K: domain weights, shape ``(K,)``.
    lr: inner step size ``η``.
    T: inner horizon (static), ``>= 1``.
    batches: ``None`` (full batch) or minibatches with leading axis ``T``.
    val_batch: batch for ``g``; ``None`` = full validation data.

  Returns:
    ``(h_K, θ_T)``: the hypergradient ``∂ g(θ_T) / ∂ w``, shape ``(K,)``,
    and the parameters after the T steps.

  Raises:
    ValueError: as :func:`inner_steps`.

  References:
    Das, Patel, Razaviyayn, Mirrokni (2026), "Less is More", Prop. 4.1
    (recursion reconstructed; the book's Sources §1).
  """
  _check_T(T)
  _check_batches(batches, T)
  w_K = _check_w(w_K)
  K = w_K.shape[0]

  def theta_T(w: jax.Array) -> Params:
    return _unroll(problem, params, w, lr, T, batches)

  def push(e_K: jax.Array) -> tuple[Params, Params]:
    return jax.jvp(theta_T, (w_K,), (e_K,))

  params_T, Z_K = jax.vmap(push, out_axes=(None, 0))(
    jnp.eye(K, dtype=w_K.dtype)
  )
  grad_g = jax.grad(problem.val_loss)(params_T, val_batch)
  return _tree_vdot_K(Z_K, grad_g), params_T


def hypergrad_reverse(
  problem: MixingProblem,
  params: Params,
  w_K: ArrayLike,
  *,
  lr: ArrayLike,
  T: int,
  batches: Batch | None = None,
  val_batch: Batch | None = None,
  remat: bool = False,
) -> tuple[jax.Array, Params]:
  """Unrolled hypergradient by reverse mode (backpropagation through T steps).

  Same number as :func:`hypergrad_forward`, obtained with ``jax.grad``
  through the ``lax.scan``. The scan stores every ``θ_t`` (and, unless
  ``remat``, each step's intermediates), so memory grows as ``O(T |θ|)``.

  Args:
    problem: the bilevel problem.
    params: ``θ_0`` (warm start), a pytree.
    w_K: domain weights, shape ``(K,)``.
    lr: inner step size ``η``.
    T: inner horizon (static), ``>= 1``.
    batches: ``None`` (full batch) or minibatches with leading axis ``T``.
    val_batch: batch for ``g``; ``None`` = full validation data.
    remat: wrap each inner step in ``jax.checkpoint``: only ``θ_t`` is
      stored and the step's intermediates are recomputed on the way back.

  Returns:
    ``(h_K, θ_T)`` as in :func:`hypergrad_forward`.

  Raises:
    ValueError: as :func:`inner_steps`.
  """
  _check_T(T)
  _check_batches(batches, T)
  w_K = _check_w(w_K)

  def objective(w: jax.Array) -> tuple[jax.Array, Params]:
    params_T = _unroll(problem, params, w, lr, T, batches, remat=remat)
    return problem.val_loss(params_T, val_batch), params_T

  h_K, params_T = jax.grad(objective, has_aux=True)(w_K)
  return h_K, params_T


def hypergrad_implicit(
  problem: MixingProblem,
  params: Params,
  w_K: ArrayLike,
  *,
  batch: Batch | None = None,
  val_batch: Batch | None = None,
  solver: str = "auto",
  dense_max_size: int = 2048,
  cg_tol: float = 1e-10,
  cg_maxiter: int | None = None,
) -> jax.Array:
  """Implicit-function hypergradient, the ``T → ∞`` limit of the unrolled one.

  ``h_j = −∇g(θ)ᵀ H⁻¹ ∇f_j(θ)`` with ``H = ∇²_θ Σ_j w_j f_j(θ)``, exact
  when ``θ = θ*(w)`` (pass e.g. :func:`solve_inner`'s output). Solves
  ``H v = ∇g(θ)`` once, then ``h_j = −⟨v, ∇f_j(θ)⟩`` for all j with one
  JVP of ``domain_losses``. ``H`` must be positive definite for CG
  (strongly convex inner problem); the dense solve only needs it
  invertible.

  Args:
    problem: the bilevel problem.
    params: ``θ`` (ideally the inner minimiser ``θ*(w)``).
    w_K: domain weights, shape ``(K,)``.
    batch: training batch for ``f_j`` and ``H``; ``None`` = full data.
    val_batch: batch for ``g``; ``None`` = full validation data.
    solver: ``"dense"`` (materialise ``H`` over the flattened parameters
      and ``jnp.linalg.solve``), ``"cg"`` (Hessian-vector products and
      ``jax.scipy.sparse.linalg.cg``) or ``"auto"`` (dense when
      ``|θ| <= dense_max_size``, else CG).
    dense_max_size: the ``"auto"`` threshold on ``|θ|``.
    cg_tol: CG relative tolerance.
    cg_maxiter: CG iteration cap (``None``: JAX's default, ``10 |θ|``).

  Returns:
    ``h_K``, shape ``(K,)``.

  Raises:
    ValueError: unknown ``solver`` or ``w_K`` not 1-D.

  References:
    Bengio (2000); Pedregosa (2016), implicit differentiation for
    hyperparameters; the book's Sources §1.
  """
  solvers = ("auto", "dense", "cg")
  if solver not in solvers:
    raise ValueError(f"solver = {solver!r} is invalid; allowed: {solvers}")
  w_K = _check_w(w_K)
  grad_g = jax.grad(problem.val_loss)(params, val_batch)

  def F(p: Params) -> jax.Array:
    return _weighted_loss(problem, p, w_K, batch)

  flat_P, unravel = ravel_pytree(params)
  if solver == "auto":
    solver = "dense" if flat_P.shape[0] <= dense_max_size else "cg"
  if solver == "dense":
    H_PxP = jax.hessian(lambda x: F(unravel(x)))(flat_P)
    v = unravel(jnp.linalg.solve(H_PxP, ravel_pytree(grad_g)[0]))
  else:
    grad_F = jax.grad(F)

    def hvp(u: Params) -> Params:
      return jax.jvp(grad_F, (params,), (u,))[1]

    v, _ = jax.scipy.sparse.linalg.cg(
      hvp, grad_g, tol=cg_tol, maxiter=cg_maxiter
    )
  _, dot_K = jax.jvp(lambda p: problem.domain_losses(p, batch), (params,), (v,))
  return -dot_K


def solve_inner(
  problem: MixingProblem,
  params: Params,
  w_K: ArrayLike,
  *,
  lr: ArrayLike,
  max_steps: int = 100_000,
  tol: float = 1e-6,
  return_info: bool = False,
) -> Params | tuple[Params, dict[str, jax.Array]]:
  """The inner minimiser ``θ*(w)`` by full-batch gradient descent.

  Steps ``θ ← θ − η ∇F(θ; w)`` (a ``lax.while_loop``) until
  ``||∇F(θ; w)||_2 <= tol`` or ``max_steps``. When called eagerly, warns
  if the tolerance was not reached.

  Args:
    problem: the bilevel problem (``domain_losses(params, None)`` is used).
    params: starting point.
    w_K: domain weights, shape ``(K,)``.
    lr: step size ``η`` (below ``2 / L`` for convergence).
    max_steps: iteration cap.
    tol: tolerance on the gradient norm.
    return_info: also return ``{"steps", "grad_norm"}``.

  Returns:
    ``θ*(w)``, or ``(θ*(w), info)`` when ``return_info``.

  Raises:
    ValueError: ``max_steps`` not a positive integer, or ``tol`` <= 0.
  """
  if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
    raise ValueError(
      f"max_steps = {max_steps!r} is invalid; it must be an integer >= 1"
    )
  if not (isinstance(tol, (int, float)) and tol > 0):
    raise ValueError(f"tol = {tol!r} is invalid; it must be a number > 0")
  w_K = _check_w(w_K)
  grad_F = jax.grad(lambda p: _weighted_loss(problem, p, w_K, None))

  def norm(g: Params) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))

  def cond(state):
    i, _, g = state
    return (i < max_steps) & (norm(g) > tol)

  def body(state):
    i, p, g = state
    p = jax.tree.map(lambda x, d: x - lr * d, p, g)
    return i + 1, p, grad_F(p)

  steps, params_star, g = jax.lax.while_loop(
    cond, body, (jnp.asarray(0), params, grad_F(params))
  )
  grad_norm = norm(g)
  if not isinstance(grad_norm, jax.core.Tracer) and not grad_norm <= tol:
    warnings.warn(
      f"solve_inner stopped after {int(steps)} steps with gradient norm "
      f"{float(grad_norm):.3g} > tol = {tol:g}; raise max_steps or check "
      f"lr = {lr!r} (it must be below 2 / L)",
      RuntimeWarning,
      stacklevel=2,
    )
  if return_info:
    return params_star, {"steps": steps, "grad_norm": grad_norm}
  return params_star


HYPERGRAD_MODES = ("forward", "reverse", "reverse_remat")

# Cost model of choose_hypergrad_mode (time in units of one inner step):
# each forward-mode tangent direction costs about 1.5 inner steps
# (forward-over-reverse HVP, vmapped over K); reverse mode's backward
# pass costs about one more step; remat adds one recomputed forward step.
FORWARD_STEPS_PER_DIRECTION = 1.5
# ... unless the step is bound by reading its data: fewer than
# DATA_BOUND_FLOPS_PER_BYTE FLOPs per byte of closed-over data and
# minibatch (e.g. logistic regression) *and* more data than one core's cache
# holds (``data_cache_bytes``). Then every inner step streams the data from
# memory; the primal gradient and the K vmapped tangent directions sweep it
# once each (the directions share their sweep), so forward mode costs about
# FORWARD_STEPS_BANDWIDTH_BOUND inner steps until the directions'
# arithmetic, FORWARD_STEPS_PER_DIRECTION_DATA_BOUND each, exceeds that. A
# data-bound step whose data fit in the cache reads them cheaply; its
# directions cost FORWARD_STEPS_PER_DIRECTION_IN_CACHE each.
# Measured at T >= 10 in two runs of benchmarks/bench_mixing.py
# --logistic-features 256 512 1024 2048 4096 (benchmarks/results/
# mixing_sizes*.json; 2-core CPU, 2 MiB L2 per core), forward mode's time
# over reverse mode's:
#   0.5-1 MiB of data (in cache): K = 2, 4: 1.04-2.39; K = 8: 1.54-3.97
#     (forward 2.5-8.0 plain steps);
#   4-8 MiB (streamed): K = 2, 4: 0.84-1.03; K = 8: 1.07-1.29 (forward
#     1.8-2.4 plain steps at K = 2, 4, 2.3-2.8 at K = 8);
#   2 MiB (the L2's size): K = 2, 4: 0.83-1.22, the order changing between
#     runs; no rule is right there in every run.
# The previous model (0.55 steps per direction whenever F < 4 B) had been
# fitted to that 2 MiB problem alone.
DATA_BOUND_FLOPS_PER_BYTE = 4.0
FORWARD_STEPS_BANDWIDTH_BOUND = 2.0
FORWARD_STEPS_PER_DIRECTION_DATA_BOUND = 0.2
FORWARD_STEPS_PER_DIRECTION_IN_CACHE = 1.0
# Data that reach the step as traced values (arguments of an enclosing jit,
# closed over by the problem) rather than constants: on XLA:CPU reverse
# mode's backward loop then makes a transposed copy of them in every step
# (the copy of a constant is folded at compile time; XLA does not hoist the
# copy of an argument out of the loop). Charged to a data-bound step's
# reverse modes on CPU: `bench_mixing.py --data-as-args` (benchmarks/
# results/mixing_args.json) measured reverse mode at 7.3-20.7 plain steps
# with 0.5-8 MiB of data and T >= 10, forward mode at 2.5-6.2.
TRACED_DATA_TRANSPOSE_STEPS = 8.0
REVERSE_STEPS = 2.0
REMAT_STEPS = 3.0
# With a single inner step θ_0 does not depend on w: reverse mode's sweep is
# the backward pass of one step with respect to w alone, with no Hessian
# product on the θ path, and there is nothing to rematerialise.
REVERSE_STEPS_SINGLE = 1.0
# Above this many stored residual bytes per FLOP of the inner step, and once
# the T steps' residuals outgrow the cache, reverse mode is bound by writing
# and re-reading them: its time is charged
# REVERSE_STEPS * intensity / RESIDUAL_BYTES_PER_FLOP.
RESIDUAL_BYTES_PER_FLOP = 0.02
CACHE_BYTES = 1 << 20
SYSFS_CPU0_CACHE = "/sys/devices/system/cpu/cpu0/cache"


def core_cache_bytes(root: str = SYSFS_CPU0_CACHE) -> int | None:
  """Bytes of one CPU core's level-2 cache, from Linux sysfs.

  Reads ``index*/level``, ``type`` and ``size`` (``"2048K"``) under
  ``root``; the unified or data cache of level 2 counts.

  Args:
    root: the ``cache`` directory of one CPU.

  Returns:
    The size in bytes, or None where sysfs does not say (not Linux, no
    level-2 entry, or a size that does not parse).
  """
  units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
  try:
    entries = sorted(pathlib.Path(root).glob("index*"))
  except OSError:
    return None
  for entry in entries:
    try:
      level = (entry / "level").read_text().strip()
      kind = (entry / "type").read_text().strip()
      size = (entry / "size").read_text().strip().upper()
    except OSError:
      continue
    if level != "2" or kind not in ("Unified", "Data"):
      continue
    parsed = re.fullmatch(r"(\d+)([KMG]?)", size)
    if parsed is None or int(parsed[1]) == 0:
      return None
    return int(parsed[1]) * units[parsed[2]]
  return None


@functools.cache
def default_data_cache_bytes() -> int:
  """The cache a data-bound step must outgrow to stream from memory.

  On the CPU backend, one core's L2 (:func:`core_cache_bytes`); elsewhere,
  or if sysfs does not say, ``CACHE_BYTES`` (1 MiB). The cost model is fitted
  on CPU only (see :func:`choose_hypergrad_mode`). Read once per process.
  """
  found = core_cache_bytes() if jax.default_backend() == "cpu" else None
  return CACHE_BYTES if found is None else found


@dataclasses.dataclass(frozen=True)
class ModeChoice:
  """What :func:`choose_hypergrad_mode` picked, and why.

  Attributes:
    mode: ``"forward"``, ``"reverse"`` or ``"reverse_remat"``.
    reason: one sentence.
    time_steps: estimated time of each mode, in inner steps.
    memory_bytes: estimated memory each mode keeps for the hypergradient.
    feasible: modes whose memory fits the budget.
    param_bytes: ``P``, bytes of ``θ``.
    residual_bytes: ``R``, bytes reverse mode stores per inner step beyond
      ``θ_t`` (``None`` if it could not be traced).
    step_flops: XLA's FLOP count of one inner step (``None`` if unknown).
    data_bytes: bytes of the data one inner step reads (closed-over
      constants and its minibatch).
    cache_bytes: ``C``, the cache the data were compared with.
    traced_data_bytes: bytes of those data that are traced values
      (arguments of an enclosing ``jax.jit``), not constants.
  """

  mode: str
  reason: str
  time_steps: dict[str, float]
  memory_bytes: dict[str, int]
  feasible: tuple[str, ...]
  param_bytes: int
  residual_bytes: int | None
  step_flops: float | None
  data_bytes: int
  cache_bytes: int
  traced_data_bytes: int


def _nbytes(tree) -> int:
  return sum(
    int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(tree)
  )


def _step_residual_bytes(step, params, batch) -> int | None:
  """Bytes reverse mode saves for one inner step, beyond its input ``θ_t``.

  Counts what ``jax.vjp`` of the step keeps (``saved_residuals``), except
  constants and literals (closed-over data, shared by all steps) and the
  step's arguments (``θ_t`` is counted separately; the minibatch is an
  input of the scan).
  """
  try:
    from jax._src.ad_checkpoint import saved_residuals  # noqa: PLC0415

    res = saved_residuals(step, params, batch)
  except Exception:  # noqa: BLE001 -- a private API; fall back to "unknown"
    return None
  total = 0
  for aval, what in res:
    if what.startswith(("from a constant", "from a literal", "from the arg")):
      continue
    total += int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
  return total


def choose_hypergrad_mode(
  problem: MixingProblem,
  params: Params,
  w_K: ArrayLike,
  *,
  lr: ArrayLike,
  T: int,
  batches: Batch | None = None,
  memory_budget_bytes: int | None = None,
  data_cache_bytes: int | None = None,
) -> ModeChoice:
  """Picks forward, reverse or rematerialised reverse mode for T steps.

  The cost model, with ``P`` the bytes of ``θ``, ``R`` the bytes reverse
  mode stores per inner step beyond ``θ_t`` (traced, not run), ``F`` the
  FLOPs of one inner step (XLA's count of the lowered step), ``B`` the
  bytes of data one step reads, ``C`` one core's cache, K domains:

  ================  ============================  ==================
  mode              time (inner steps per step)   memory
  ================  ============================  ==================
  forward           ``1 + 1.5 K``; if F < 4 B:     ``(K + 2) P + R``
                    ``1 + K`` if ``B <= C``,
                    else ``max(2, 1 + 0.2 K)``
  reverse           ``2``, or ``2 ρ / ρ*`` if     ``T (P + R) + P``
                    ``ρ = R / F > ρ* = 0.02``
                    and ``T (P + R) > 1 MiB``;
                    ``1`` if ``T = 1``
  reverse_remat     ``3``; ``2`` if ``T = 1``     ``T P + R + P``
  ================  ============================  ==================

  plus 8 steps for both reverse modes if ``F < 4 B``, on CPU, when the
  problem closes over traced data (see below).

  Reverse mode is memory-bound when it stores more than ``ρ*`` bytes per
  FLOP and its residuals outgrow the cache (then recomputing the step is
  cheaper than storing it). Forward mode's K directions are vmapped: when
  the step does fewer than 4 FLOPs per byte of data it reads (its
  closed-over constants and minibatch) and those data do not fit in the
  cache, every step streams them from memory, the directions share one
  sweep of the data, and forward mode costs about two steps (the primal
  gradient's sweep and the directions') until the directions' arithmetic,
  0.2 steps each, costs more. Data that fit in the cache are read cheaply,
  and each direction costs one step. When such a problem closes over
  traced data (arguments of an enclosing ``jax.jit``, not constants),
  XLA:CPU makes a transposed copy of them in every step of reverse mode's
  backward loop (a constant's copy is folded at compile time); that costs
  about 8 more steps. Per-step minibatches (``batches``) are not charged
  so; that is not measured. With ``T = 1``, ``θ_0`` does not
  depend on ``w``: reverse mode differentiates one step with respect to
  ``w`` alone (no Hessian product), so it wins for any K. Among the
  modes whose memory fits ``memory_budget_bytes`` the fastest wins, ties to
  the smaller memory; if none fits, the smallest memory wins. The constants
  are fitted to ``benchmarks/bench_mixing.py`` (tanh MLP, logistic
  regression) on CPU; they are estimates, not measurements of the problem.

  Clear-cut cases: large ``K`` with room for T copies of ``θ`` gives a
  reverse mode; a budget below ``T P`` forces forward mode; a step that
  stores many activations per FLOP (an MLP on many examples) gives
  ``reverse_remat``; a matrix-vector step (logistic regression) gives
  ``reverse`` when its data fit in the cache, and ``forward`` for
  ``K <= 5`` when they do not; a single step gives ``reverse``.
  Where the data are about the cache's size, the two modes trade places
  from run to run (``benchmarks/bench_mixing.py``'s ``logistic``).

  Args:
    problem: the bilevel problem.
    params: ``θ_0`` (arrays or ``ShapeDtypeStruct``s).
    w_K: domain weights, shape ``(K,)``.
    lr: inner step size.
    T: inner horizon, ``>= 1``.
    batches: as for :func:`hypergrad_forward` (leading axis T), or None.
    memory_budget_bytes: bytes the hypergradient may keep; None: no limit.
    data_cache_bytes: ``C``; None: :func:`default_data_cache_bytes` (one
      core's L2 on CPU).

  Returns:
    A :class:`ModeChoice`.

  Raises:
    ValueError: bad ``T``, ``w_K``, ``batches`` or budget.
  """
  _check_T(T)
  if batches is not None:  # arrays or ShapeDtypeStructs
    lead = {getattr(x, "shape", (None,))[:1] for x in jax.tree.leaves(batches)}
    if lead != {(T,)}:
      raise ValueError(
        f"batches must have leading axis T = {T} (one minibatch per inner "
        f"step); got leading axes {sorted(lead, key=str)}"
      )
  w_K = _check_w(w_K)
  for name, value, none in (
    ("memory_budget_bytes", memory_budget_bytes, "no limit"),
    ("data_cache_bytes", data_cache_bytes, "this machine's"),
  ):
    if value is not None and not (
      isinstance(value, (int, np.integer))
      and not isinstance(value, bool)
      and value > 0
    ):
      raise ValueError(
        f"{name} = {value!r} is invalid; it must be a positive integer or "
        f"None ({none})"
      )
  K = int(w_K.shape[0])
  batch0 = None
  if batches is not None:
    first = lambda b: jax.tree.map(lambda x: x[0], b)
    batch0 = jax.eval_shape(first, batches)
  grad_F = jax.grad(lambda p, w, b: _weighted_loss(problem, p, w, b))

  def step(p, b):
    g = grad_F(p, w_K, b)
    return jax.tree.map(lambda x, d: x - lr * d, p, g)

  P = _nbytes(params)
  R = _step_residual_bytes(step, params, batch0)
  try:
    cost = jax.jit(step).lower(params, batch0).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    F = float(cost["flops"]) if cost and cost.get("flops") else None
  except Exception:  # noqa: BLE001 -- cost analysis is optional
    F = None
  consts = jax.make_jaxpr(step)(params, batch0).consts
  data = _nbytes([c for c in consts if hasattr(c, "dtype")]) + _nbytes(batch0)
  traced = _nbytes([c for c in consts if isinstance(c, jax.core.Tracer)])
  r = P if R is None else R
  rho = None if F is None or F <= 0 else r / F
  cache = (
    default_data_cache_bytes() if data_cache_bytes is None else data_cache_bytes
  )
  t_fwd = 1 + FORWARD_STEPS_PER_DIRECTION * K
  data_bound = (
    F is not None and data > 0 and F / data < DATA_BOUND_FLOPS_PER_BYTE
  )
  if data_bound and data > cache:
    t_fwd = max(
      FORWARD_STEPS_BANDWIDTH_BOUND,
      1 + FORWARD_STEPS_PER_DIRECTION_DATA_BOUND * K,
    )
  elif data_bound:
    t_fwd = 1 + FORWARD_STEPS_PER_DIRECTION_IN_CACHE * K
  t_rev = REVERSE_STEPS
  stored = T * (P + r)
  if rho is not None and rho > RESIDUAL_BYTES_PER_FLOP and stored > CACHE_BYTES:
    t_rev = REVERSE_STEPS * rho / RESIDUAL_BYTES_PER_FLOP
  t_remat = REMAT_STEPS
  if T == 1:
    t_rev = REVERSE_STEPS_SINGLE
    t_remat = REVERSE_STEPS_SINGLE + (REMAT_STEPS - REVERSE_STEPS)
  transposes = data_bound and traced > 0 and jax.default_backend() == "cpu"
  if transposes:
    t_rev += TRACED_DATA_TRANSPOSE_STEPS
    t_remat += TRACED_DATA_TRANSPOSE_STEPS
  time_steps = {
    "forward": t_fwd,
    "reverse": t_rev,
    "reverse_remat": t_remat,
  }
  memory = {
    "forward": (K + 2) * P + r,
    "reverse": T * (P + r) + P,
    "reverse_remat": T * P + r + P,
  }
  budget = math.inf if memory_budget_bytes is None else memory_budget_bytes
  feasible = tuple(m for m in HYPERGRAD_MODES if memory[m] <= budget)
  if feasible:
    mode = min(feasible, key=lambda m: (time_steps[m], memory[m]))
    reason = (
      f"fastest estimate ({time_steps[mode]:.2f} inner steps per step) of "
      f"the modes within the memory budget ({', '.join(feasible)})"
    )
  else:
    mode = min(HYPERGRAD_MODES, key=lambda m: memory[m])
    reason = (
      f"no mode fits memory_budget_bytes = {memory_budget_bytes}; "
      f"{mode} needs the least ({memory[mode]} bytes)"
    )
  return ModeChoice(
    mode=mode,
    reason=reason,
    time_steps=time_steps,
    memory_bytes={k: int(v) for k, v in memory.items()},
    feasible=feasible,
    param_bytes=P,
    residual_bytes=R,
    step_flops=F,
    data_bytes=data,
    cache_bytes=int(cache),
    traced_data_bytes=traced,
  )


def hypergrad(
  problem: MixingProblem,
  params: Params,
  w_K: ArrayLike,
  *,
  lr: ArrayLike,
  T: int,
  mode: str = "auto",
  batches: Batch | None = None,
  val_batch: Batch | None = None,
  memory_budget_bytes: int | None = None,
) -> tuple[jax.Array, Params]:
  """The unrolled hypergradient by the mode given, or chosen (``"auto"``).

  Args:
    problem, params, w_K, lr, T, batches, val_batch: as for
      :func:`hypergrad_forward`.
    mode: ``"auto"`` (:func:`choose_hypergrad_mode`), ``"forward"``,
      ``"reverse"`` or ``"reverse_remat"``.
    memory_budget_bytes: the budget for ``"auto"``.

  Returns:
    ``(h_K, θ_T)``: the same numbers whatever the mode (up to float
    rounding).

  Raises:
    ValueError: unknown ``mode``, or as :func:`hypergrad_forward`.
  """
  allowed = ("auto",) + HYPERGRAD_MODES
  if mode not in allowed:
    raise ValueError(f"mode = {mode!r} is invalid; allowed: {allowed}")
  if mode == "auto":
    mode = choose_hypergrad_mode(
      problem,
      params,
      w_K,
      lr=lr,
      T=T,
      batches=batches,
      memory_budget_bytes=memory_budget_bytes,
    ).mode
  kw = dict(lr=lr, T=T, batches=batches, val_batch=val_batch)
  if mode == "forward":
    return hypergrad_forward(problem, params, w_K, **kw)
  return hypergrad_reverse(
    problem, params, w_K, remat=mode == "reverse_remat", **kw
  )
