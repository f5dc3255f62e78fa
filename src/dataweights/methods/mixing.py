"""Online data mixing: update the domain weights every T inner steps.

The algorithm of the book's Sources §1 ("Less is More", Das et al. 2026) under a
budget of N parameter updates: ``R = N // T`` outer rounds, each

1. ``T`` inner steps ``θ_{k,t+1} = θ_{k,t} − η ∇F(θ_{k,t}; w_k)`` from the
   warm start ``θ_{k,0} = θ_{k−1,T}``;
2. the hypergradient ``h_k = ∂ g(θ_{k,T}) / ∂ w_k`` through those T steps
   (Proposition 4.1; forward or reverse mode, see :mod:`.bilevel`);
3. an outer step on the simplex: exponentiated gradient
   ``w_{k+1} ∝ w_k ⊙ exp(−β h_k)`` (default) or projected gradient.

``T = 1`` is the greedy gradient-alignment rule
``h_j = −η ⟨∇g(θ_{k,1}), ∇f_j(θ_{k,0})⟩`` that the paper shows can fail
(Theorem 5.1). The ``N mod T`` leftover steps are inner steps with the
final weights (no outer update follows them), so every horizon spends
exactly N steps. :func:`run_mixing_schedule` runs the same algorithm step
by step with a horizon that may grow with the round and may be traced
(vmap over horizons, no recompilation), and draws the minibatch of step n
from ``fold_in(key, n)`` whatever the horizon (common random numbers).
[reconstruction] The outer update and the normalisation option are our
reading of the abstract (the book's Sources §1), not the paper's stated algorithm.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from dataweights import weights as weights_lib
from dataweights.errors import WeightsError
from dataweights.methods import bilevel, simplex
from dataweights.types import Batch, Params, PRNGKey

OUTER_UPDATES: dict[str, Callable[..., jax.Array]] = {
  "eg": simplex.eg_update,
  "pgd": simplex.projected_update,
}
HYPERGRADS = ("forward", "reverse", "reverse_remat", "auto")


class MixingError(ValueError):
  """Invalid arguments to :func:`run_mixing` or :func:`train_fixed`."""


class NonFiniteHypergradientError(FloatingPointError):
  """A mixing run produced a NaN or infinite hypergradient or loss."""


class MixingTrace(NamedTuple):
  """Histories of one mixing run, per outer round (``R = N // T``).

  Attributes:
    w_RxK: ``R + 1`` rows: the weights before round 0, ..., after round
      ``R − 1`` (the last row is also the weights of the leftover steps).
    h_RxK: ``R`` rows: the (normalised, if asked) hypergradient of round k.
    val_loss_R1: ``R + 1`` entries: ``g(θ_{k,0})`` for ``k = 0..R−1`` on
      the evaluation batch, then ``g`` at the final θ (after all N steps).
    params: the final parameters, after all N steps (``θ_{R−1,T}`` followed
      by the ``N mod T`` leftover steps).
  """

  w_RxK: jax.Array
  h_RxK: jax.Array
  val_loss_R1: jax.Array
  params: Params


def uniform_weights(K: int) -> jax.Array:
  """Uniform weights ``1/K``.

  Args:
    K: number of domains, an integer ``>= 1``.

  Returns:
    ``w_K``, shape ``(K,)``.

  Raises:
    MixingError: ``K`` not an integer ``>= 1``.
  """
  if not isinstance(K, (int, np.integer)) or isinstance(K, bool) or K < 1:
    raise MixingError(f"K = {K!r} is invalid; it must be an integer >= 1")
  return jnp.full((int(K),), 1.0 / int(K))


def natural_weights(counts_K: ArrayLike) -> jax.Array:
  """Weights proportional to the domain sizes (:func:`dataweights.weights.natural_weights`).

  Raises:
    WeightsError: ``counts_K`` not 1-D or with a non-positive or non-finite
      entry.
  """
  return jnp.asarray(weights_lib.natural_weights(counts_K), dtype=jnp.result_type(float))


def _check_int(name: str, value: object, minimum: int) -> int:
  if (
    not isinstance(value, (int, np.integer))
    or isinstance(value, bool)
    or value < minimum
  ):
    raise MixingError(
      f"{name} = {value!r} is invalid; it must be an integer >= {minimum}"
    )
  return int(value)


def _check_pos(name: str, value: object) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(np.asarray(value))
  except (TypeError, ValueError):
    v = math.nan
  if not math.isfinite(v) or v <= 0:
    raise MixingError(
      f"{name} = {value!r} is invalid; it must be a finite number > 0"
    )


def _round_keys(key: PRNGKey | None, R: int, needed: bool) -> jax.Array:
  """One key per outer round (the same split in run_mixing and train_fixed)."""
  if key is None:
    if needed:
      raise MixingError(
        "key = None is invalid with batch_fn/val_batch_fn; pass a PRNG key "
        "(jax.random.key(seed))"
      )
    key = jax.random.key(0)
  return jax.random.split(key, R)


def _batches_for(
  key_k: PRNGKey,
  batch_fn: Callable[[PRNGKey], Batch] | None,
  val_batch_fn: Callable[[PRNGKey], Batch] | None,
) -> tuple[Batch | None, Batch | None]:
  key_b, key_v = jax.random.split(key_k)
  batches = None if batch_fn is None else batch_fn(key_b)
  val_batch = None if val_batch_fn is None else val_batch_fn(key_v)
  return batches, val_batch


def _run_impl(
  params0: Params,
  w0_K: jax.Array,
  key_R: jax.Array,
  key_rem: jax.Array,
  lr: jax.Array,
  beta: jax.Array,
  eval_batch: Batch | None,
  *,
  problem: bilevel.MixingProblem,
  T: int,
  rem: int,
  outer: str,
  hypergrad: str,
  batch_fn: Callable[[PRNGKey], Batch] | None,
  val_batch_fn: Callable[[PRNGKey], Batch] | None,
  normalize: bool,
  remat: bool,
) -> MixingTrace:
  if hypergrad == "forward":
    hg_fn = bilevel.hypergrad_forward
  else:
    hg_fn = functools.partial(bilevel.hypergrad_reverse, remat=remat)
  update = OUTER_UPDATES[outer]

  def one_round(carry, key_k):
    params, w_K = carry
    val = problem.val_loss(params, eval_batch)
    batches, val_batch = _batches_for(key_k, batch_fn, val_batch_fn)
    h_K, params_T = hg_fn(
      problem, params, w_K, lr=lr, T=T, batches=batches, val_batch=val_batch
    )
    if normalize:
      scale = jnp.max(jnp.abs(h_K))
      h_K = h_K / jnp.where(scale > 0, scale, 1.0)
    w_next_K = update(w_K, h_K, beta)
    return (params_T, w_next_K), (w_K, h_K, val)

  (params, w_K), (w_RxK, h_RxK, val_R) = jax.lax.scan(
    one_round, (params0, w0_K), key_R
  )
  if rem:
    # The N mod T leftover steps: inner steps with the final weights, the
    # first ``rem`` minibatches of one more draw (no outer update follows).
    batches, _ = _batches_for(key_rem, batch_fn, None)
    if batches is not None:
      batches = jax.tree.map(lambda x: x[:rem], batches)
    params = bilevel._unroll(problem, params, w_K, lr, rem, batches)
  val_final = problem.val_loss(params, eval_batch)
  return MixingTrace(
    w_RxK=jnp.concatenate([w_RxK, w_K[None]], axis=0),
    h_RxK=h_RxK,
    val_loss_R1=jnp.concatenate([val_R, val_final[None]], axis=0),
    params=params,
  )


_run_jit = jax.jit(
  _run_impl,
  static_argnames=(
    "problem",
    "T",
    "rem",
    "outer",
    "hypergrad",
    "batch_fn",
    "val_batch_fn",
    "normalize",
    "remat",
  ),
)


def _check_finite_trace(trace: MixingTrace, lr: object, beta: object) -> None:
  h_RxK = np.asarray(trace.h_RxK)
  val_R1 = np.asarray(trace.val_loss_R1)
  bad_h_R = ~np.all(np.isfinite(h_RxK), axis=1)
  bad_v_R1 = ~np.isfinite(val_R1)
  if not (bad_h_R.any() or bad_v_R1.any()):
    return
  R = h_RxK.shape[0]
  parts = []
  if bad_h_R.any():
    k = int(np.argmax(bad_h_R))
    parts.append(f"hypergradient h_K = {h_RxK[k].tolist()} at round {k}")
  if bad_v_R1.any():
    k = int(np.argmax(bad_v_R1))
    parts.append(f"validation loss {float(val_R1[k])} before round {k}")
  raise NonFiniteHypergradientError(
    f"mixing run diverged ({R} rounds): first non-finite "
    + " and first non-finite ".join(parts)
    + f". Try a smaller beta (beta = {beta!r}), a smaller inner step "
    f"(lr = {lr!r}) or normalize=True"
  )


def _check_weights(name: str, w_K: ArrayLike) -> jax.Array:
  """``w_K`` on the simplex, as a float array; else a WeightsError naming it."""
  w_K = simplex.check_simplex(w_K, what=name)
  if not jnp.issubdtype(w_K.dtype, jnp.floating):
    w_K = w_K.astype(jnp.result_type(float))
  return w_K


def _auto_mode(problem, params0, w0_K, lr, T, batch_fn, key_R, budget):
  """(hypergrad, remat) chosen by the cost model of the bilevel module."""
  batches = None
  if batch_fn is not None:
    key_b, _ = jax.random.split(key_R[0])
    batches = jax.eval_shape(batch_fn, key_b)
  try:
    mode = bilevel.choose_hypergrad_mode(
      problem,
      params0,
      w0_K,
      lr=lr,
      T=T,
      batches=batches,
      memory_budget_bytes=budget,
    ).mode
  except ValueError as e:
    raise MixingError(str(e)) from e
  if mode == "reverse_remat":
    return "reverse", True
  return mode, False


def _check_num_domains(
  problem: bilevel.MixingProblem,
  params0: Params,
  w_K: jax.Array,
  batch_fn: Callable[[PRNGKey], Batch] | None,
  name: str,
) -> None:
  """WeightsError unless ``problem.domain_losses`` gives one loss per weight.

  Checked on shapes only (``jax.eval_shape``: nothing is computed).
  """

  def losses(params, key):
    batch = None
    if batch_fn is not None:
      batch = jax.tree.map(lambda x: x[0], batch_fn(key))
    return problem.domain_losses(params, batch)

  out = jax.eval_shape(losses, params0, jax.random.key(0))
  if out.shape != w_K.shape:
    raise WeightsError(
      f"{name} has shape {w_K.shape} but problem.domain_losses returns "
      f"shape {out.shape}; {name} needs one weight per domain"
    )


def run_mixing(
  problem: bilevel.MixingProblem,
  params0: Params,
  w0_K: ArrayLike,
  *,
  lr: float,
  T: int,
  N: int,
  beta: float,
  outer: str = "eg",
  hypergrad: str = "forward",
  batch_fn: Callable[[PRNGKey], Batch] | None = None,
  val_batch_fn: Callable[[PRNGKey], Batch] | None = None,
  key: PRNGKey | None = None,
  normalize: bool = False,
  eval_batch: Batch | None = None,
  check_finite: bool = True,
  remat: bool = False,
  memory_budget_bytes: int | None = None,
) -> MixingTrace:
  """Bilevel data mixing with a weight update every T inner steps.

  ``R = N // T`` outer rounds; each round runs T inner steps from the warm
  start, the hypergradient through them (Proposition 4.1) and an outer
  update. The ``N mod T`` leftover steps are then spent as inner steps
  with the final weights ``w_R`` (an unfinished round: no outer update
  follows them), so every T spends exactly N steps. The
  whole run is one jitted ``lax.scan`` over rounds (``T`` and ``N``
  static; ``lr`` and ``beta`` traced, so sweeping them does not
  recompile). ``T = 1`` is the greedy baseline.

  Round k with ``batch_fn`` uses ``key_k = jax.random.split(key, R)[k]``,
  then ``key_b, key_v = jax.random.split(key_k)``: ``batch_fn(key_b)``
  gives the T minibatches and ``val_batch_fn(key_v)`` the validation batch
  of the hypergradient. The leftover steps use the first ``N mod T``
  minibatches of ``batch_fn(key_b)`` with ``key_b`` the first half of
  ``jax.random.split(jax.random.fold_in(key, R))``. :func:`train_fixed`
  with ``eval_every=T`` draws the same minibatches when ``T`` divides N.

  Args:
    problem: the bilevel problem.
    params0: initial parameters ``θ_{0,0}``.
    w0_K: initial weights on the simplex, shape ``(K,)``.
    lr: inner step size ``η``, finite and > 0.
    T: inner steps per outer round, an integer ``>= 1``.
    N: budget of inner steps, an integer ``>= T``.
    beta: outer step size ``β``, finite and > 0.
    outer: ``"eg"`` (exponentiated gradient) or ``"pgd"`` (projected).
    hypergrad: ``"forward"`` (Prop. 4.1, memory independent of T),
      ``"reverse"`` (backprop through the T steps), ``"reverse_remat"``
      (the same with each step rematerialised) or ``"auto"``: chosen once,
      before the run, by :func:`.bilevel.choose_hypergrad_mode` from T, K,
      the sizes of one inner step and ``memory_budget_bytes``.
    batch_fn: ``key -> batches`` with leading axis T (minibatch variant);
      ``None`` = full batch.
    val_batch_fn: ``key -> validation batch`` for the hypergradient;
      ``None`` = full validation data.
    key: PRNG key, required with ``batch_fn`` or ``val_batch_fn``.
    normalize: divide ``h`` by ``max_j |h_j|`` before the outer step (an
      option of ours that stabilises EG at large T; the book's Sources §1).
    eval_batch: batch for the logged ``val_loss_R1``; ``None`` = full
      validation data.
    check_finite: raise if a hypergradient or validation loss is
      non-finite (skipped when called under an outer transformation).
    remat: with ``hypergrad="reverse"``, checkpoint each inner step (see
      :func:`.bilevel.hypergrad_reverse`); ignored by forward mode.
    memory_budget_bytes: with ``hypergrad="auto"``, the bytes the
      hypergradient may keep (None: no limit).

  Returns:
    A :class:`MixingTrace`.

  Raises:
    WeightsError: ``w0_K`` off the simplex or not one weight per domain of
      ``problem``.
    MixingError: ``T < 1``, ``N < T``,
      non-integer ``T`` or ``N``, ``lr`` or ``beta`` not finite and > 0,
      unknown ``outer`` or ``hypergrad``, or a missing key.
    NonFiniteHypergradientError: the run diverged; the message gives the
      first bad round and suggests a smaller ``beta`` / ``lr``.

  References:
    Das, Patel, Razaviyayn, Mirrokni (2026), "Less is More: Convergence Benefits of Fewer Data Weight Updates over
    Longer Horizon", arXiv 2602.19510; the book's Sources §1.
  """
  T = _check_int("T", T, 1)
  N = _check_int("N", N, 1)
  if N < T:
    raise MixingError(
      f"N = {N} is invalid with T = {T}; the budget N must be >= T "
      "(at least one outer round)"
    )
  _check_pos("lr", lr)
  _check_pos("beta", beta)
  if not isinstance(outer, str) or outer not in OUTER_UPDATES:
    raise MixingError(
      f"outer = {outer!r} is invalid; allowed: {tuple(OUTER_UPDATES)}"
    )
  if hypergrad not in HYPERGRADS:
    raise MixingError(
      f"hypergrad = {hypergrad!r} is invalid; allowed: {HYPERGRADS}"
    )
  w0_K = _check_weights("w0_K", w0_K)
  _check_num_domains(problem, params0, w0_K, batch_fn, "w0_K")
  R, rem = divmod(N, T)
  key_R = _round_keys(key, R, batch_fn is not None or val_batch_fn is not None)
  key_rem = jax.random.fold_in(key if key is not None else jax.random.key(0), R)
  if hypergrad == "auto":
    hypergrad, remat = _auto_mode(
      problem, params0, w0_K, lr, T, batch_fn, key_R, memory_budget_bytes
    )
  elif hypergrad == "reverse_remat":
    hypergrad, remat = "reverse", True
  trace = _run_jit(
    params0,
    w0_K,
    key_R,
    key_rem,
    jnp.asarray(lr),
    jnp.asarray(beta),
    eval_batch,
    problem=problem,
    T=T,
    rem=rem,
    outer=outer,
    hypergrad=hypergrad,
    batch_fn=batch_fn,
    val_batch_fn=val_batch_fn,
    normalize=bool(normalize),
    remat=bool(remat),
  )
  if check_finite and not isinstance(trace.h_RxK, jax.core.Tracer):
    _check_finite_trace(trace, lr, beta)
  return trace


def _train_impl(
  params0: Params,
  w_K: jax.Array,
  key_R: jax.Array,
  lr: jax.Array,
  eval_batch: Batch | None,
  *,
  problem: bilevel.MixingProblem,
  S: int,
  batch_fn: Callable[[PRNGKey], Batch] | None,
) -> tuple[Params, jax.Array]:
  def chunk(params, key_k):
    val = problem.val_loss(params, eval_batch)
    batches, _ = _batches_for(key_k, batch_fn, None)
    bilevel._check_batches(batches, S)
    return bilevel._unroll(problem, params, w_K, lr, S, batches), val

  params, val_R = jax.lax.scan(chunk, params0, key_R)
  val_final = problem.val_loss(params, eval_batch)
  return params, jnp.concatenate([val_R, val_final[None]], axis=0)


_train_jit = jax.jit(_train_impl, static_argnames=("problem", "S", "batch_fn"))


def train_fixed(
  problem: bilevel.MixingProblem,
  params0: Params,
  w_K: ArrayLike,
  *,
  lr: float,
  N: int,
  batch_fn: Callable[[PRNGKey], Batch] | None = None,
  key: PRNGKey | None = None,
  eval_every: int | None = None,
  eval_batch: Batch | None = None,
) -> tuple[Params, jax.Array]:
  """Baseline: N plain inner steps with fixed weights ``w_K``.

  Runs ``N / S`` chunks of ``S`` steps (``S = eval_every``) and logs the
  validation loss before each chunk and at the end. With ``batch_fn``,
  chunk k draws ``batch_fn(key_b)`` exactly as round k of
  :func:`run_mixing` with ``T = S`` does, so the two see the same data.

  Args:
    problem: the bilevel problem.
    params0: initial parameters.
    w_K: fixed weights on the simplex, shape ``(K,)``.
    lr: step size, finite and > 0.
    N: number of steps, an integer ``>= 1`` divisible by ``eval_every``.
    batch_fn: ``key -> batches`` with leading axis ``eval_every``;
      ``None`` = full batch.
    key: PRNG key, required with ``batch_fn``.
    eval_every: steps between validation evaluations. Default: 1 for full
      batch; with ``batch_fn``, the leading axis of its batches.
    eval_batch: batch for the logged validation loss; ``None`` = full data.

  Returns:
    ``(params, val_loss)``: the final parameters and the validation loss at
    steps ``0, S, 2S, ..., N`` (``N / S + 1`` entries).

  Raises:
    WeightsError: ``w_K`` off the simplex, or not one weight per domain.
    MixingError: bad ``lr``, ``N`` or ``eval_every``, ``N`` not a
      multiple of ``eval_every``, or a missing key.
  """
  N = _check_int("N", N, 1)
  _check_pos("lr", lr)
  w_K = _check_weights("w_K", w_K)
  _check_num_domains(problem, params0, w_K, batch_fn, "w_K")
  if eval_every is None:
    if batch_fn is None:
      S = 1
    else:
      shapes = jax.eval_shape(batch_fn, jax.random.key(0))
      S = int(jax.tree.leaves(shapes)[0].shape[0])
  else:
    S = _check_int("eval_every", eval_every, 1)
  if N % S:
    raise MixingError(
      f"N = {N} is invalid with eval_every = {S}; N must be a multiple of it"
    )
  key_R = _round_keys(key, N // S, batch_fn is not None)
  return _train_jit(
    params0,
    w_K,
    key_R,
    jnp.asarray(lr),
    eval_batch,
    problem=problem,
    S=S,
    batch_fn=batch_fn,
  )


class ScheduleTrace(NamedTuple):
  """The state of a :func:`run_mixing_schedule` run after each budget.

  Attributes:
    w_BxK: the weights in use after exactly ``N_b`` steps, one row per
      budget: the weights after the last completed round.
    params_B: the parameters after exactly ``N_b`` steps (leading axis B).
    rounds_B: the number of completed outer rounds after ``N_b`` steps.
    val_loss_B: ``g`` at ``params_B`` on the evaluation batch.
    horizon_B: the horizon ``T_r`` of the round in progress at ``N_b``.
  """

  w_BxK: jax.Array
  params_B: Params
  rounds_B: jax.Array
  val_loss_B: jax.Array
  horizon_B: jax.Array


def horizon_at(T0: ArrayLike, T_growth: ArrayLike, r: ArrayLike) -> jax.Array:
  """The horizon of round r: ``T_r = max(1, floor(T0 + T_growth · r))``.

  ``T_growth = 0`` is a fixed horizon; ``T_growth > 0`` grows it linearly
  with the round (the adaptive schedule of chapter 1, section 7).
  """
  T_r = jnp.floor(jnp.asarray(T0, jnp.float32) + T_growth * jnp.asarray(r))
  return jnp.maximum(T_r, 1).astype(jnp.int32)


def _schedule_impl(
  params0: Params,
  w0_K: jax.Array,
  key: jax.Array,
  lr: jax.Array,
  beta: jax.Array,
  T0: jax.Array,
  T_growth: jax.Array,
  beta_decay: jax.Array,
  eval_batch: Batch | None,
  *,
  problem: bilevel.MixingProblem,
  budgets: tuple[int, ...],
  outer: str,
  step_batch_fn: Callable[[PRNGKey], Batch] | None,
  val_batch_fn: Callable[[PRNGKey], Batch] | None,
  update_weights: bool,
) -> ScheduleTrace:
  update = OUTER_UPDATES[outer]
  K = w0_K.shape[0]
  key_tr, key_val = jax.random.split(key)
  grad_F = jax.grad(lambda p, w, b: bilevel._weighted_loss(problem, p, w, b))

  def inner(p, w, b):
    return jax.tree.map(lambda x, d: x - lr * d, p, grad_F(p, w, b))

  def zeros_K(p):
    return jax.tree.map(lambda x: jnp.zeros((K, *x.shape), x.dtype), p)

  budgets_B = jnp.asarray(budgets, jnp.int32)
  B = len(budgets)

  def step(carry, n):
    p, Z, w, t, r, T, bufs, ptr = carry
    b = None if step_batch_fn is None else step_batch_fn(
      jax.random.fold_in(key_tr, n))
    if update_weights:
      # Prop. 4.1, one step: (θ, Z) ↦ (θ − η∇F, (I − η∇²F) Z − η ∇f_j), as
      # the JVP of the step along (Z^{(j)}, e_j), vmapped over j.
      def push(z, e):
        return jax.jvp(lambda pp, ww: inner(pp, ww, b), (p, w), (z, e))

      p_new, Z_new = jax.vmap(push, out_axes=(None, 0))(
        Z, jnp.eye(K, dtype=w.dtype))
      end = t + 1 >= T

      def outer_step(_):
        vb = None if val_batch_fn is None else val_batch_fn(
          jax.random.fold_in(key_val, n))
        h_K = bilevel._tree_vdot_K(Z_new, jax.grad(problem.val_loss)(p_new, vb))
        return update(w, h_K, beta / (1.0 + beta_decay * r))

      w_new = jax.lax.cond(end, outer_step, lambda _: w, None)
      Z_new = jax.tree.map(lambda z: jnp.where(end, jnp.zeros_like(z), z), Z_new)
      r_new = r + end.astype(r.dtype)
      T_new = jnp.where(end, horizon_at(T0, T_growth, r_new), T)
      t_new = jnp.where(end, 0, t + 1)
    else:
      p_new, Z_new, w_new = inner(p, w, b), Z, w
      r_new, T_new, t_new = r, T, t + 1

    def record(bufs):
      wb, pb, rb, tb = bufs
      return (wb.at[ptr].set(w_new),
              jax.tree.map(lambda a, x: a.at[ptr].set(x), pb, p_new),
              rb.at[ptr].set(r_new), tb.at[ptr].set(T_new))

    hit = n + 1 == budgets_B[jnp.minimum(ptr, B - 1)]
    bufs = jax.lax.cond(hit, record, lambda x: x, bufs)
    ptr = ptr + hit.astype(ptr.dtype)
    return (p_new, Z_new, w_new, t_new, r_new, T_new, bufs, ptr), None

  bufs0 = (jnp.zeros((B, K), w0_K.dtype),
           jax.tree.map(lambda x: jnp.zeros((B, *x.shape), x.dtype), params0),
           jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))
  zero = jnp.zeros((), jnp.int32)
  carry0 = (params0, zeros_K(params0) if update_weights else None, w0_K, zero,
            zero, horizon_at(T0, T_growth, 0), bufs0, zero)
  carry, _ = jax.lax.scan(step, carry0, jnp.arange(budgets[-1], dtype=jnp.int32))
  w_BxK, params_B, rounds_B, horizon_B = carry[6]
  val_B = jax.vmap(lambda p: problem.val_loss(p, eval_batch))(params_B)
  return ScheduleTrace(w_BxK, params_B, rounds_B, val_B, horizon_B)


_schedule_jit = jax.jit(
  _schedule_impl,
  static_argnames=("problem", "budgets", "outer", "step_batch_fn",
                   "val_batch_fn", "update_weights"),
)


def run_mixing_schedule(
  problem: bilevel.MixingProblem,
  params0: Params,
  w0_K: ArrayLike,
  *,
  lr: ArrayLike,
  beta: ArrayLike,
  budgets: tuple[int, ...] | int,
  T0: ArrayLike,
  T_growth: ArrayLike = 0.0,
  beta_decay: ArrayLike = 0.0,
  outer: str = "eg",
  step_batch_fn: Callable[[PRNGKey], Batch] | None = None,
  val_batch_fn: Callable[[PRNGKey], Batch] | None = None,
  key: PRNGKey | None = None,
  eval_batch: Batch | None = None,
  update_weights: bool = True,
  check_finite: bool = True,
) -> ScheduleTrace:
  """Bilevel data mixing step by step, with a (growing) horizon per round.

  The algorithm of :func:`run_mixing`, written as one ``lax.scan`` over the
  N inner steps. Round r has horizon ``T_r = max(1, floor(T0 + T_growth·r))``
  (:func:`horizon_at`); at its last step the hypergradient
  ``h_j = ⟨∇g(θ), Z^{(j)}⟩`` (Prop. 4.1, ``Z`` carried step by step by
  forward mode and reset to 0 at each round start) updates the weights
  with the outer step ``β_r = β / (1 + beta_decay · r)``.
  ``T0``, ``T_growth``, ``lr``, ``beta`` and ``key`` are traced: ``vmap``
  over them runs many horizons or seeds in one compiled loop. Only the
  budgets are static.

  One run gives every budget in ``budgets`` exactly: the state after
  ``N_b`` steps is that of a run with budget ``N_b`` (the algorithm has no
  budget-dependent part), including its unfinished last round, whose steps
  use the current weights and lead to no outer update. With a fixed
  horizon T and full batches this is :func:`run_mixing` with ``N = N_b``.

  Common random numbers: step n draws ``step_batch_fn(fold_in(k_tr, n))``
  and a round that ends at step n draws the validation batch
  ``val_batch_fn(fold_in(k_val, n))`` with ``k_tr, k_val =
  jax.random.split(key)``; runs with the same key see the same minibatch
  at every step whatever their horizons.

  Args:
    problem: the bilevel problem.
    params0: initial parameters.
    w0_K: initial weights on the simplex, shape ``(K,)``.
    lr: inner step size ``η``, finite and > 0.
    beta: outer step size ``β``, finite and > 0.
    budgets: budgets ``N_b`` at which the state is recorded, an increasing
      tuple of integers ``>= 1`` (or one integer); the run has
      ``max(budgets)`` steps.
    T0: horizon of round 0, >= 1.
    T_growth: horizon increase per round (0: fixed horizon ``T0``), >= 0.
    beta_decay: round r uses the outer step ``β / (1 + beta_decay · r)``
      (0: constant ``β``), >= 0.
    outer: ``"eg"`` or ``"pgd"``.
    step_batch_fn: ``key -> batch`` of one inner step (no leading T axis);
      ``None`` = full batch.
    val_batch_fn: ``key -> validation batch``; ``None`` = full data.
    key: PRNG key, required with a batch function.
    eval_batch: batch for ``val_loss_B``; ``None`` = full validation data.
    update_weights: ``False`` trains with the fixed weights ``w0_K`` (the
      fixed-weight baseline on the same minibatches; no hypergradients).
    check_finite: raise if a recorded weight or loss is non-finite
      (skipped under an outer transformation).

  Returns:
    A :class:`ScheduleTrace` with one entry per budget.

  Raises:
    MixingError: bad weights, step sizes, budgets, horizons or ``outer``,
      or a missing key.
    NonFiniteHypergradientError: a recorded weight or loss is not finite.
  """
  if isinstance(budgets, (int, np.integer)) and not isinstance(budgets, bool):
    budgets = (int(budgets),)
  ok = isinstance(budgets, (tuple, list)) and len(budgets) > 0 and all(
    isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
    for n in budgets) and all(a < b for a, b in zip(budgets, budgets[1:]))
  if not ok:
    raise MixingError(
      f"budgets = {budgets!r} is invalid; it must be an increasing tuple of "
      "integers >= 1")
  budgets = tuple(int(n) for n in budgets)
  _check_pos("lr", lr)
  _check_pos("beta", beta)
  for name, value, low in (("T0", T0, 1.0), ("T_growth", T_growth, 0.0),
                           ("beta_decay", beta_decay, 0.0)):
    if not isinstance(value, jax.core.Tracer):
      v = np.asarray(value, np.float64)
      if not np.all(np.isfinite(v)) or np.any(v < low):
        raise MixingError(
          f"{name} = {value!r} is invalid; it must be a finite number >= {low:g}")
  if not isinstance(outer, str) or outer not in OUTER_UPDATES:
    raise MixingError(
      f"outer = {outer!r} is invalid; allowed: {tuple(OUTER_UPDATES)}")
  w0_K = _check_weights("w0_K", w0_K)
  if key is None:
    if step_batch_fn is not None or val_batch_fn is not None:
      raise MixingError(
        "key = None is invalid with step_batch_fn/val_batch_fn; pass a PRNG "
        "key (jax.random.key(seed))")
    key = jax.random.key(0)
  trace = _schedule_jit(
    params0, w0_K, key, jnp.asarray(lr), jnp.asarray(beta), jnp.asarray(T0),
    jnp.asarray(T_growth), jnp.asarray(beta_decay), eval_batch,
    problem=problem, budgets=budgets,
    outer=outer, step_batch_fn=step_batch_fn, val_batch_fn=val_batch_fn,
    update_weights=bool(update_weights))
  if check_finite and not isinstance(trace.val_loss_B, jax.core.Tracer):
    w = np.asarray(trace.w_BxK)
    v = np.asarray(trace.val_loss_B)
    bad = ~(np.all(np.isfinite(w), axis=1) & np.isfinite(v))
    if bad.any():
      b = int(np.argmax(bad))
      raise NonFiniteHypergradientError(
        f"mixing run diverged: weights {w[b].tolist()} and validation loss "
        f"{float(v[b])} at budget N = {budgets[b]}. Try a smaller beta "
        f"(beta = {beta!r}) or a smaller inner step (lr = {lr!r})")
  return trace
