"""Finite-horizon data mixing for a model trained by any optax optimiser.

Chapter 1's algorithm (the book's Sources §1) on a real training run: a
round of ``T`` inner steps trains with per-example loss weights that
realise the domain weights ``w`` (``weight_b = w_{d_b} / n_{d_b}``, so the
step minimises ``Σ_k w_k f_k / Σ_k w_k`` over the domains in the batch);
at the round's end the hypergradient of the validation loss with respect to
``w`` is taken *through the T optimiser steps*,

  ``h = ∂ g(θ_T(w)) / ∂ w``,  ``θ_{t+1} = θ_t + update_t(∇F(θ_t; w), opt_t)``,

and ``w ← w ⊙ exp(−β h)`` (normalised). The inner steps are those of the
real optimiser (AdamW with clipping, schedule and weight decay), replayed
from ``(θ_0, opt_0)`` at the round's start on the round's stored batches:
:func:`replay` reproduces the trajectory the training loop took (the
library's tests check it), and :func:`hypergradient` differentiates it.

**Modes.** ``"reverse"``: ``jax.grad`` through the T steps (stores every
step's residuals); ``"reverse_remat"``: the same with each step under
``jax.checkpoint`` (stores ``θ_t`` and the optimiser state per step,
recomputes the rest); ``"reverse_sweep"``: the adjoint recursion by hand, a
forward scan keeping ``(θ_t, opt_t)`` and a reverse scan of one step's VJP
(the memory of remat, and a program of one step whatever T);
``"forward"``: ``jax.jacfwd`` over the K weights (K tangents through the
steps, memory independent of T: the LM analogue of Proposition 4.1's
recursion). :func:`choose_hypergrad_mode` picks one from a cost model of
T, K and memory.

[reconstruction] The horizon rule is Chapter 1's reading of Das et al.
(2026); differentiating through an adaptive optimiser and the loss-weight
realisation of ``w`` are our choices for a language model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from dataweights.methods import domain_weights
from dataweights.types import Batch, Params

MODES: tuple[str, ...] = (
  "forward",
  "reverse",
  "reverse_remat",
  "reverse_sweep",
)

LossFn = Callable[[Params, Batch], jax.Array]
WeightFn = Callable[[jax.Array, Batch], jax.Array]


def domain_weight_fn(w_K: jax.Array, batch: Batch) -> jax.Array:
  """The default ``weight_fn``: realise ``w_K`` on ``batch["domain_B"]``."""
  return domain_weights.realised_weights(batch["domain_B"], w_K)


def _weighted_mean(loss_fn: LossFn, weight_fn: WeightFn, w_K, params, batch):
  weight_B = weight_fn(w_K, batch)
  loss_B = loss_fn(params, batch)
  total = jnp.sum(weight_B)
  return jnp.sum(weight_B * loss_B) / jnp.maximum(
    total, jnp.finfo(total.dtype).tiny
  )


def replay(
  w_K: ArrayLike,
  params0: Params,
  opt_state0: Any,
  batches_T: Batch,
  *,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  weight_fn: WeightFn = domain_weight_fn,
  remat: bool = False,
  unroll: bool = True,
) -> tuple[Params, Any]:
  """The T optimiser steps of a round, as a differentiable function of w.

  Step ``t`` takes the gradient of ``Σ_b weight_b loss_b / Σ_b weight_b``
  on ``batches_T[t]`` (``weight_B = weight_fn(w_K, batch)``), then
  ``tx.update`` and ``optax.apply_updates``: what the training step does.

  Args:
    w_K: the round's domain weights.
    params0, opt_state0: parameters and optimiser state at the round start.
    batches_T: the round's batches, every array with leading axis T.
    loss_fn: per-example losses ``loss_fn(params, batch) -> loss_B``.
    tx: the optimiser.
    weight_fn: ``weight_fn(w_K, batch) -> weight_B``.
    remat: ``jax.checkpoint`` each step (reverse mode stores less).
    unroll: a Python loop over the T steps (faster to run on CPU, slower to
      compile) instead of a ``lax.scan``.

  Returns:
    ``(params_T, opt_state_T)``.
  """
  w_K = jnp.asarray(w_K)
  grad = jax.grad(lambda p, b: _weighted_mean(loss_fn, weight_fn, w_K, p, b))

  def step(carry, batch):
    params, opt_state = carry
    g = grad(params, batch)
    updates, opt_state = tx.update(g, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  if remat:
    step = jax.checkpoint(step, prevent_cse=False)
  T = _horizon(batches_T)
  if unroll:
    # XLA on CPU runs the reverse pass of a scanned step several times slower
    # than the same steps unrolled (benchmarks/bench_methods.py); the cost is
    # compile time linear in T.
    carry = (params0, opt_state0)
    for t in range(T):
      carry, _ = step(carry, jax.tree.map(lambda x, t=t: x[t], batches_T))
    return carry
  (params, opt_state), _ = jax.lax.scan(step, (params0, opt_state0), batches_T)
  return params, opt_state


def _horizon(batches_T: Batch) -> int:
  lead = {
    np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batches_T)
  }
  if len(lead) != 1 or None in lead:
    raise ValueError(
      "batches_T must be a dict of arrays with one leading axis T (one batch "
      f"per inner step); got leading axes {sorted(lead, key=str)}"
    )
  return int(lead.pop())


def hypergradient(
  w_K: ArrayLike,
  params0: Params,
  opt_state0: Any,
  batches_T: Batch,
  valid_batch: Batch,
  *,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  weight_fn: WeightFn = domain_weight_fn,
  mode: str = "reverse",
  unroll: bool = True,
) -> tuple[jax.Array, jax.Array, Params]:
  """``h = ∂ g(θ_T(w)) / ∂ w`` through the T replayed steps.

  ``g`` is the mean per-example loss on ``valid_batch``.

  Args:
    w_K, params0, opt_state0, batches_T, loss_fn, tx, weight_fn: as for
      :func:`replay`.
    valid_batch: the validation batch.
    mode: ``"forward"``, ``"reverse"`` or ``"reverse_remat"`` (all give the
      same number up to float round-off).
    unroll: see :func:`replay`.

  Returns:
    ``(h_K, g(θ_T), θ_T)``.

  Raises:
    ValueError: unknown ``mode``.
  """
  if mode not in MODES:
    raise ValueError(
      f"mode = {mode!r} is invalid; allowed values are "
      + ", ".join(repr(m) for m in MODES)
    )
  w_K = jnp.asarray(w_K)

  def val_loss(w):
    params_T, _ = replay(
      w,
      params0,
      opt_state0,
      batches_T,
      loss_fn=loss_fn,
      tx=tx,
      weight_fn=weight_fn,
      remat=mode == "reverse_remat",
      unroll=unroll,
    )
    g = jnp.mean(loss_fn(params_T, valid_batch))
    return g, (g, params_T)

  if mode == "reverse_sweep":
    return _reverse_sweep(
      w_K,
      params0,
      opt_state0,
      batches_T,
      valid_batch,
      loss_fn=loss_fn,
      tx=tx,
      weight_fn=weight_fn,
    )
  if mode == "forward":
    h_K, (g, params_T) = jax.jacfwd(val_loss, has_aux=True)(w_K)
  else:
    h_K, (g, params_T) = jax.grad(val_loss, has_aux=True)(w_K)
  return h_K, g, params_T


def _is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _reverse_sweep(
  w_K, params0, opt_state0, batches_T, valid_batch, *, loss_fn, tx, weight_fn
):
  """Reverse mode by hand: a forward scan that keeps ``(θ_t, opt_t)``, then a
  reverse scan of one step's VJP per step (the adjoint recursion).

  ``λ_T = ∇g(θ_T)``; for ``t = T−1, ..., 0``: ``(λ_t, μ_t, h_t) =
  VJP_{(θ_t, opt_t, w)}[step](λ_{t+1}, μ_{t+1})`` and ``h = Σ_t h_t``. Each
  step's forward pass is recomputed inside its VJP (as ``jax.checkpoint``
  would), and the compiled program holds one step, whatever T: its compile
  time does not grow with T, unlike the unrolled modes, and JAX's scan of a
  differentiated step (``unroll=False``) runs several times slower on CPU.
  """
  grad = jax.grad(lambda p, w, b: _weighted_mean(loss_fn, weight_fn, w, p, b))
  opt_leaves, opt_def = jax.tree.flatten(opt_state0)
  is_f = [_is_float(x) for x in opt_leaves]

  def merge(float_leaves, other_leaves):
    it_f, it_o = iter(float_leaves), iter(other_leaves)
    return jax.tree.unflatten(
      opt_def, [next(it_f) if f else next(it_o) for f in is_f]
    )

  def split(opt):
    leaves = jax.tree.leaves(opt)
    return [x for x, f in zip(leaves, is_f) if f], [
      x for x, f in zip(leaves, is_f) if not f
    ]

  def step(w, params, opt_f, opt_o, batch):
    opt = merge(opt_f, opt_o)
    updates, opt = tx.update(grad(params, w, batch), opt, params)
    return optax.apply_updates(params, updates), split(opt)[0]

  def forward(carry, batch):
    params, opt = carry
    updates, new_opt = tx.update(grad(params, w_K, batch), opt, params)
    opt_f, opt_o = split(opt)
    return (optax.apply_updates(params, updates), new_opt), (
      params,
      opt_f,
      opt_o,
    )

  (params_T, _), (params_Tx, optf_Tx, opto_Tx) = jax.lax.scan(
    forward, (params0, opt_state0), batches_T
  )
  g, lam = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, valid_batch)))(
    params_T
  )
  mu = [jnp.zeros_like(x) for x in split(opt_state0)[0]]

  def backward(carry, xs):
    lam, mu, h = carry
    params, opt_f, opt_o, batch = xs
    _, vjp = jax.vjp(
      lambda w, p, f: step(w, p, f, opt_o, batch), w_K, params, opt_f
    )
    dw, dparams, dopt = vjp((lam, mu))
    return (dparams, dopt, h + dw), None

  (_, _, h_K), _ = jax.lax.scan(
    backward,
    (lam, mu, jnp.zeros_like(w_K)),
    (params_Tx, optf_Tx, opto_Tx, batches_T),
    reverse=True,
  )
  return h_K, g, params_T


class ModeChoice(NamedTuple):
  """The chosen mode and the cost model's estimates for every mode.

  Attributes:
    mode: ``"forward"``, ``"reverse"`` or ``"reverse_remat"``.
    time: estimated cost of the hypergradient, in units of one training
      step (forward + backward), per mode.
    memory: estimated bytes the hypergradient keeps, per mode.
  """

  mode: str
  time: dict[str, float]
  memory: dict[str, int]


def nbytes(tree: Any) -> int:
  """Bytes of the arrays (or ``ShapeDtypeStruct`` s) of a pytree."""
  return int(
    sum(
      np.prod(x.shape) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
    )
  )


def step_residual_bytes(
  loss_fn: LossFn,
  params: Params,
  opt_state: Any,
  batch: Batch,
  *,
  tx: optax.GradientTransformation,
  num_domains: int,
  weight_fn: WeightFn = domain_weight_fn,
) -> int:
  """Bytes reverse mode keeps per inner step (traced, nothing is run).

  The residuals of ``jax.vjp`` of one replayed step (activations, the
  gradient, the optimiser's intermediates), from ``jax.eval_shape``; inputs
  may be ``ShapeDtypeStruct`` s.
  """
  w_K = jnp.full((num_domains,), 1.0 / num_domains, jnp.float32)

  def residuals(w, p, o, b):
    def one(w, p, o):
      batches = jax.tree.map(lambda x: x[None], b)
      return replay(
        w, p, o, batches, loss_fn=loss_fn, tx=tx, weight_fn=weight_fn
      )

    return jax.vjp(one, w, p, o)[1]

  return nbytes(jax.eval_shape(residuals, w_K, params, opt_state, batch))


def choose_hypergrad_mode(
  T: int,
  K: int,
  *,
  state_bytes: int,
  residual_bytes: int,
  memory_budget_bytes: int | None = None,
  max_unrolled: int = 4,
) -> ModeChoice:
  """Picks how to differentiate through T optimiser steps for K weights.

  The cost model, with ``S`` the bytes of the parameters and optimiser
  state, ``R`` the bytes reverse mode keeps per step beyond ``S``
  (:func:`step_residual_bytes`); times in training steps (one forward and
  one backward pass) per inner step of the round:

  ================  =============  =====================  ===============
  mode              time per step  memory                 program size
  ================  =============  =====================  ===============
  forward           ``1 + 1.5 K``  ``(K + 1) (S + R)``    one step, K-wide
  reverse           ``3``          ``T (S + R) + S``      T steps
  reverse_remat     ``4``          ``T S + R + S``        T steps
  reverse_sweep     ``4``          ``T S + R + S``        one step
  ================  =============  =====================  ===============

  (Replaying a step costs 1; reverse mode adds its backward pass, about 2
  steps; remat and the sweep recompute each step's forward pass inside its
  backward pass; forward mode pushes K tangents through each step, about 1.5
  steps each.) ``reverse`` and ``reverse_remat`` differentiate the T
  unrolled steps, so their compile time grows linearly with T (about 20 s
  per step of a 2-layer byte LM on 2 CPU cores; ``benchmarks/bench_methods.py``);
  they are candidates only for ``T <= max_unrolled``. Among the candidates
  whose memory fits ``memory_budget_bytes`` the fastest wins (ties: less
  memory, then the program that does not grow with T); if none fits, the
  one with the least memory. So a language model with ``K >= 2`` domains
  uses ``reverse`` for short rounds, ``reverse_sweep`` for long ones, and
  ``forward`` only when T copies of its state do not fit.

  Another helper adds a cost model for Chapter 1's SGD steps
  (``methods.bilevel.choose_hypergrad_mode``) with constants fitted to its
  benchmarks; these constants are round estimates for optimiser steps.

  Args:
    T: inner steps per round, ``>= 1``.
    K: number of domain weights, ``>= 1``.
    state_bytes: ``S``.
    residual_bytes: ``R``.
    memory_budget_bytes: bytes the hypergradient may keep; None: no limit.
    max_unrolled: the longest round an unrolled program is considered for.

  Returns:
    A :class:`ModeChoice`.

  Raises:
    ValueError: a count or size that is not a positive integer.
  """
  for name, value, low in (
    ("T", T, 1),
    ("K", K, 1),
    ("state_bytes", state_bytes, 0),
    ("residual_bytes", residual_bytes, 0),
    ("max_unrolled", max_unrolled, 1),
  ):
    if (
      not isinstance(value, (int, np.integer))
      or isinstance(value, bool)
      or value < low
    ):
      raise ValueError(
        f"{name} = {value!r} is invalid; it must be an integer >= {low}"
      )
  if memory_budget_bytes is not None and not (
    isinstance(memory_budget_bytes, (int, np.integer))
    and not isinstance(memory_budget_bytes, bool)
    and memory_budget_bytes > 0
  ):
    raise ValueError(
      f"memory_budget_bytes = {memory_budget_bytes!r} is invalid; it must be "
      "a positive integer or None (no limit)"
    )
  S, R = int(state_bytes), int(residual_bytes)
  time = {
    "forward": 1.0 + 1.5 * K,
    "reverse": 3.0,
    "reverse_remat": 4.0,
    "reverse_sweep": 4.0,
  }
  memory = {
    "forward": (K + 1) * (S + R),
    "reverse": T * (S + R) + S,
    "reverse_remat": T * S + R + S,
    "reverse_sweep": T * S + R + S,
  }
  grows = {"reverse", "reverse_remat"}
  candidates = [m for m in MODES if T <= max_unrolled or m not in grows]
  fits = [
    m
    for m in candidates
    if memory_budget_bytes is None or memory[m] <= memory_budget_bytes
  ]
  rank = lambda m: m in grows
  if fits:
    mode = min(fits, key=lambda m: (time[m], memory[m], rank(m)))
  else:
    mode = min(candidates, key=lambda m: (memory[m], time[m], rank(m)))
  return ModeChoice(mode, time, memory)


def horizon_rule(
  beta: float, *, normalize: bool = True
) -> domain_weights.WeightTransform:
  """The outer step: EG on the round's hypergradient (normalised by
  default, so ``β`` bounds each log-weight's change per round)."""
  return domain_weights.exponentiated_gradient(beta, normalize=normalize)
