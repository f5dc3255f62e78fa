"""The plug-in contract between data-selection methods and the training step.

A :class:`Method` owns a state pytree and runs inside the same jitted step as
the model's update. The step (:func:`dataweights.train.step.make_train_step`)
calls its hooks in this order::

  batch, weight_B, mstate = method.select(mstate, ctx)       # which rows, how weighted
  loss_B, grads = loss_and_grads(params, batch, weight_B)    # the model's gradient
                                                             # (or the method's own)
  grads, mstate, m = method.update(mstate, ctx, grads, ...)  # meta-steps; may change grads
  params, opt_state = apply_gradients(grads)                 # the optimiser
  mstate, m2 = method.post_update(mstate, ctx, new_params)   # look-ahead rules

Every hook is a pure function of arrays; the defaults do nothing, so a
method overrides only what it needs:

* **extra batches**: :attr:`Method.batches` names the batches it consumes
  besides ``"train"`` (a validation or specific batch, a big generic batch);
  the host feeder (:class:`dataweights.train.feeder.Feeder`) supplies them
  and the trainer checks that it can before compiling anything;
* **per-example loss weights or a selected sub-batch**: ``select``;
* **per-domain sampling weights**: :meth:`Method.sampling_weights` returns
  ``w_K`` from the state; the host loop reads it (one step late, so the
  device never waits) and draws the next batches with it;
* **its own state**: ``init`` builds it from the model's parameters. Any
  sub-tree shaped like the parameters (a second model copy, an auxiliary
  vector ``v``, optimiser moments of either, also for some parameters only)
  is placed with the parameters' shardings, everything else is replicated
  (:func:`state_shardings`), so a method that keeps a second model
  (ScaleBiO) is sharded like the model.

The state is checkpointed with the rest of the run and restored bit-exactly.
Methods in :mod:`dataweights.methods` build on this contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]
Params = Any
MethodState = Any


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a method sees inside the jitted step.

  Attributes:
    step: int32 scalar, updates done before this step.
    key: the method's PRNG key for this step (independent of dropout's).
    params: the model parameters before the update.
    model_state: the model's non-parameter variables.
    batches: every batch of the step by name (``"train"`` and the method's).
    loss_fn: ``loss_fn(params, batch, weight_B=None, key=None) -> loss_B``,
      the model's per-example loss as a function of the parameters (for
      meta-gradients: ``jax.grad`` / ``jax.jvp`` through it).
    grad_fn: ``grad_fn(params, batch, weight_B) -> (loss, loss_B, grads)``,
      the weighted mean loss and its gradient, accumulated over microbatches
      exactly like the main step.
    num_domains: K, when the run has named domains (else None).
    opt_state: the optimiser state before the update (a method that replays
      optimiser steps, e.g. finite-horizon mixing, keeps a copy).
    tx: the optax transformation the step applies.
    model_fn: ``model_fn(params) -> nnx.Module``, the model with these
      parameters (for outputs other than per-example losses: per-token
      losses, features).
  """

  step: jax.Array
  key: jax.Array
  params: Params
  model_state: Any
  batches: Mapping[str, Batch]
  loss_fn: Callable[..., jax.Array]
  grad_fn: Callable[..., tuple[jax.Array, jax.Array, Params]]
  num_domains: int | None = None
  opt_state: Any = None
  tx: Any = None
  model_fn: Callable[[Params], Any] | None = None


class Method:
  """Base class of data-selection methods: every hook defaults to a no-op.

  Subclasses are frozen dataclasses of hyperparameters (hashable, so a
  method can be a static argument of ``jax.jit``) and override hooks.

  Attributes:
    name: short name used in metrics (``method/<name>/...``) and configs.
    batches: names of the batches consumed besides ``"train"``.
    emits_weights: True if :meth:`sampling_weights` returns domain weights.
  """

  name: str = "plain"
  batches: tuple[str, ...] = ()
  emits_weights: bool = False

  def init(
    self, params: Params, key: jax.Array, num_domains: int | None
  ) -> MethodState:
    """The initial method state (a pytree of arrays; may be ``{}``)."""
    del params, key, num_domains
    return {}

  def init_for_run(
    self, params: Params, key: jax.Array, num_domains: int | None, tx: Any
  ) -> MethodState:
    """What the trainer calls: :meth:`init`, unless the method needs the
    optimiser ``tx`` to shape its state (a copy of the optimiser state)."""
    del tx
    return self.init(params, key, num_domains)

  def select(
    self, mstate: MethodState, ctx: StepContext
  ) -> tuple[Batch, jax.Array | None, MethodState]:
    """The batch the model trains on and its per-example weights.

    Returns:
      ``(batch, weight_B or None, mstate)``; default: the ``"train"`` batch
      with uniform weights.
    """
    return dict(ctx.batches["train"]), None, mstate

  def loss_and_grads(
    self,
    mstate: MethodState,
    ctx: StepContext,
    batch: Batch,
    weight_B: jax.Array,
    key: jax.Array | None,
  ) -> tuple[tuple[jax.Array, jax.Array, Params, jax.Array], MethodState] | None:
    """Optionally computes the model's loss and gradient itself.

    Default ``None``: the step computes them (with gradient accumulation).
    A method whose meta-step needs derivatives of the same loss at the same
    point (SOBA: one forward-over-reverse pass gives the gradient, ``H v``
    and every ``⟨∇ℓ_i, v⟩``) returns ``((loss, loss_B, grads, weight_sum),
    mstate)`` with ``loss = Σ w ℓ / Σ w`` and ``grads`` its gradient, and
    then handles accumulation itself.
    """
    del mstate, ctx, batch, weight_B, key
    return None

  def update(
    self,
    mstate: MethodState,
    ctx: StepContext,
    grads: Params,
    loss_B: jax.Array,
    batch: Batch,
  ) -> tuple[Params, MethodState, dict[str, jax.Array]]:
    """Meta-steps after the model's gradient, before the optimiser.

    Returns:
      ``(grads, mstate, metrics)``; the returned gradient is what the
      optimiser applies (a method may mix in other gradients).
    """
    del ctx, loss_B, batch
    return grads, mstate, {}

  def post_update(
    self, mstate: MethodState, ctx: StepContext, new_params: Params
  ) -> tuple[MethodState, dict[str, jax.Array]]:
    """Rules that look at the parameters after the update (e.g. T = 1)."""
    del ctx, new_params
    return mstate, {}

  def sampling_weights(self, mstate: MethodState) -> jax.Array | None:
    """Per-domain sampling weights ``w_K`` for the next batches, or None."""
    del mstate
    return None


@dataclasses.dataclass(frozen=True)
class Plain(Method):
  """No method: train on the ``"train"`` batch as it comes."""

  name: str = "plain"


def _key_name(entry: Any) -> Any:
  """A key-path entry as a plain key (dict key, index or attribute)."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _plain_path(path: Any) -> tuple[Any, ...]:
  return tuple(_key_name(e) for e in path)


def _stacked_sharding(sharding: Any) -> Any:
  """The sharding of ``n`` stacked copies of a parameter (new axis 0)."""
  from jax.sharding import NamedSharding, PartitionSpec

  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  return sharding


def _leading_unsharded(sharding: Any) -> bool:
  from jax.sharding import NamedSharding

  if not isinstance(sharding, NamedSharding):
    return True
  return not sharding.spec or sharding.spec[0] is None


def state_shardings(
  mstate: Any, params: Params, param_shardings: Any, replicated: Any
) -> Any:
  """Shardings of a state: every leaf placed like the parameter it mirrors.

  A leaf mirrors a parameter when its key path ends with the parameter's
  key path (a model copy ``{"u": params}``, optimiser moments
  ``(..., "mu", <param path>)``, the moments of a masked or grouped
  optimiser, a compact tree of some parameters). It then gets:

  * the parameter's sharding if it has the parameter's shape;
  * the parameter's sharding with a new unsharded axis 0 if its shape is
    ``(n, *param_shape)`` (``n`` stacked copies, e.g. LISA's optimiser
    slots for the active blocks, :mod:`dataweights.train.lisa`);
  * the parameter's sharding if its shape is ``(n, *param_shape[1:])`` and
    the parameter's axis 0 is unsharded (a slice of a scanned layer axis).

  Every other leaf is ``replicated``. The longest matching parameter path
  wins.

  Args:
    mstate: the state (arrays or ``ShapeDtypeStruct`` s).
    params: the model parameters (for key paths and shapes).
    param_shardings: the parameters' shardings (same structure as params).
    replicated: the sharding of everything else.

  Returns:
    A pytree of shardings with the structure of ``mstate``.
  """
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree.leaves(param_shardings)
  table = {
    _plain_path(path): (tuple(jnp.shape(x)), sh)
    for (path, x), sh in zip(flat_p, flat_s)
  }
  longest = max((len(k) for k in table), default=0)

  def place(path, leaf):
    q = _plain_path(path)
    shape = tuple(jnp.shape(leaf))
    for n in range(min(len(q), longest), 0, -1):
      hit = table.get(q[-n:])
      if hit is None:
        continue
      p_shape, sh = hit
      if shape == p_shape:
        return sh
      if shape[1:] == p_shape and shape:
        return _stacked_sharding(sh)
      if (
        len(shape) == len(p_shape)
        and shape
        and shape[1:] == p_shape[1:]
        and _leading_unsharded(sh)
      ):
        return sh
      return replicated
    return replicated

  return jax.tree_util.tree_map_with_path(place, mstate)


def check_batches(
  method: Method, available: tuple[str, ...] | list[str]
) -> None:
  """Fails early if the feeder cannot supply a batch the method needs.

  Raises:
    ValueError: names the missing batches and the available ones.
  """
  missing = [b for b in ("train", *method.batches) if b not in available]
  if missing:
    raise ValueError(
      f"method {method.name!r} needs the batch(es) {', '.join(map(repr, missing))} "
      f"but the data feeder gives only {', '.join(map(repr, available)) or 'none'}; "
      "add a source with that name to the feeder"
    )
