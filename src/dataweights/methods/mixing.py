"""Online data mixing: update the domain weights every T inner steps.

The algorithm of papers.md §1 ("Less is More", Das et al. 2026) under a
budget of N parameter updates: ``R = N // T`` outer rounds, each

1. ``T`` inner steps ``θ_{k,t+1} = θ_{k,t} − η ∇F(θ_{k,t}; w_k)`` from the
   warm start ``θ_{k,0} = θ_{k−1,T}``;
2. the hypergradient ``h_k = ∂ g(θ_{k,T}) / ∂ w_k`` through those T steps
   (Proposition 4.1; forward or reverse mode, see :mod:`.bilevel`);
3. an outer step on the simplex: exponentiated gradient
   ``w_{k+1} ∝ w_k ⊙ exp(−β h_k)`` (default) or projected gradient.

``T = 1`` is the greedy gradient-alignment rule
``h_j = −η ⟨∇g(θ_{k,1}), ∇f_j(θ_{k,0})⟩`` that the paper shows can fail
(Theorem 5.1). [reconstruction] The outer update and the normalisation
option are our reading of the abstract (papers.md §1), not the paper's
stated algorithm.
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

from dataweights.methods import bilevel, simplex
from dataweights.types import Batch, Params, PRNGKey

OUTER_UPDATES: dict[str, Callable[..., jax.Array]] = {
  "eg": simplex.eg_update,
  "pgd": simplex.projected_update,
}
HYPERGRADS = ("forward", "reverse")


class MixingError(ValueError):
  """Invalid arguments to :func:`run_mixing` or :func:`train_fixed`."""


class NonFiniteHypergradientError(FloatingPointError):
  """A mixing run produced a NaN or infinite hypergradient or loss."""


class MixingTrace(NamedTuple):
  """Histories of one mixing run, per outer round (``R = N // T``).

  Attributes:
    w_RxK: ``R + 1`` rows: the weights before round 0, ..., after round
      ``R − 1``.
    h_RxK: ``R`` rows: the (normalised, if asked) hypergradient of round k.
    val_loss_R1: ``R + 1`` entries: ``g(θ_{k,0})`` for ``k = 0..R`` on the
      evaluation batch (the last one is the final θ).
    params: the final parameters ``θ_{R−1,T}``.
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
  """Weights proportional to the domain sizes, ``w_j = n_j / Σ_i n_i``.

  Args:
    counts_K: number of examples per domain, shape ``(K,)``, finite and > 0.

  Returns:
    ``w_K``, shape ``(K,)``.

  Raises:
    MixingError: ``counts_K`` not 1-D or with a non-positive or non-finite
      entry.
  """
  try:
    c_K = np.asarray(counts_K, dtype=np.float64)
  except (TypeError, ValueError):
    c_K = np.zeros((0,))
  if c_K.ndim != 1 or c_K.shape[0] < 1:
    raise MixingError(
      f"counts_K = {counts_K!r} is invalid; expected a 1-D array of K >= 1 "
      "positive domain sizes"
    )
  if not np.all(np.isfinite(c_K)) or np.any(c_K <= 0):
    raise MixingError(
      f"counts_K = {c_K.tolist()} is invalid; every domain size must be a "
      "finite number > 0"
    )
  return jnp.asarray(c_K / c_K.sum(), dtype=jnp.result_type(float))


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
  lr: jax.Array,
  beta: jax.Array,
  eval_batch: Batch | None,
  *,
  problem: bilevel.MixingProblem,
  T: int,
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
  """``w_K`` on the simplex, as a float array; else a MixingError naming it."""
  try:
    w_K = simplex.check_simplex(w_K)
  except simplex.SimplexError as e:
    raise MixingError(f"{name} is invalid: {e}") from e
  if not jnp.issubdtype(w_K.dtype, jnp.floating):
    w_K = w_K.astype(jnp.result_type(float))
  return w_K


def _check_num_domains(
  problem: bilevel.MixingProblem,
  params0: Params,
  w_K: jax.Array,
  batch_fn: Callable[[PRNGKey], Batch] | None,
  name: str,
) -> None:
  """MixingError unless ``problem.domain_losses`` gives one loss per weight.

  Checked on shapes only (``jax.eval_shape``: nothing is computed).
  """

  def losses(params, key):
    batch = None
    if batch_fn is not None:
      batch = jax.tree.map(lambda x: x[0], batch_fn(key))
    return problem.domain_losses(params, batch)

  out = jax.eval_shape(losses, params0, jax.random.key(0))
  if out.shape != w_K.shape:
    raise MixingError(
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
) -> MixingTrace:
  """Bilevel data mixing with a weight update every T inner steps.

  ``R = N // T`` outer rounds (the ``N mod T`` leftover steps are not
  taken); each round runs T inner steps from the warm start, the
  hypergradient through them (Proposition 4.1) and an outer update. The
  whole run is one jitted ``lax.scan`` over rounds (``T`` and ``N``
  static; ``lr`` and ``beta`` traced, so sweeping them does not
  recompile). ``T = 1`` is the greedy baseline.

  Round k with ``batch_fn`` uses ``key_k = jax.random.split(key, R)[k]``,
  then ``key_b, key_v = jax.random.split(key_k)``: ``batch_fn(key_b)``
  gives the T minibatches and ``val_batch_fn(key_v)`` the validation batch
  of the hypergradient. :func:`train_fixed` with ``eval_every=T`` draws the
  same minibatches.

  Args:
    problem: the bilevel problem.
    params0: initial parameters ``θ_{0,0}``.
    w0_K: initial weights on the simplex, shape ``(K,)``.
    lr: inner step size ``η``, finite and > 0.
    T: inner steps per outer round, an integer ``>= 1``.
    N: budget of inner steps, an integer ``>= T``.
    beta: outer step size ``β``, finite and > 0.
    outer: ``"eg"`` (exponentiated gradient) or ``"pgd"`` (projected).
    hypergrad: ``"forward"`` (Prop. 4.1, memory independent of T) or
      ``"reverse"`` (backprop through the T steps).
    batch_fn: ``key -> batches`` with leading axis T (minibatch variant);
      ``None`` = full batch.
    val_batch_fn: ``key -> validation batch`` for the hypergradient;
      ``None`` = full validation data.
    key: PRNG key, required with ``batch_fn`` or ``val_batch_fn``.
    normalize: divide ``h`` by ``max_j |h_j|`` before the outer step (an
      option of ours that stabilises EG at large T; papers.md §1).
    eval_batch: batch for the logged ``val_loss_R1``; ``None`` = full
      validation data.
    check_finite: raise if a hypergradient or validation loss is
      non-finite (skipped when called under an outer transformation).
    remat: with ``hypergrad="reverse"``, checkpoint each inner step (see
      :func:`.bilevel.hypergrad_reverse`); ignored by forward mode.

  Returns:
    A :class:`MixingTrace`.

  Raises:
    MixingError: ``w0_K`` off the simplex or not one weight per domain of
      ``problem``, ``T < 1``, ``N < T``,
      non-integer ``T`` or ``N``, ``lr`` or ``beta`` not finite and > 0,
      unknown ``outer`` or ``hypergrad``, or a missing key.
    NonFiniteHypergradientError: the run diverged; the message gives the
      first bad round and suggests a smaller ``beta`` / ``lr``.

  References:
    Das, Patel, Razaviyayn, Mirrokni (2026), "Less is More" (papers.md §1).
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
  if outer not in OUTER_UPDATES:
    raise MixingError(
      f"outer = {outer!r} is invalid; allowed: {tuple(OUTER_UPDATES)}"
    )
  if hypergrad not in HYPERGRADS:
    raise MixingError(
      f"hypergrad = {hypergrad!r} is invalid; allowed: {HYPERGRADS}"
    )
  w0_K = _check_weights("w0_K", w0_K)
  _check_num_domains(problem, params0, w0_K, batch_fn, "w0_K")
  R = N // T
  key_R = _round_keys(key, R, batch_fn is not None or val_batch_fn is not None)
  trace = _run_jit(
    params0,
    w0_K,
    key_R,
    jnp.asarray(lr),
    jnp.asarray(beta),
    eval_batch,
    problem=problem,
    T=T,
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
    MixingError: bad ``w_K`` (off the simplex, or not one weight per
      domain), ``lr``, ``N`` or ``eval_every``, ``N`` not a
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
