"""The training state: one pytree of arrays, sharded, checkpointed whole.

:class:`TrainState` holds everything a run needs to continue bit-exactly:
the update count, the model parameters (an ``nnx.State`` of ``nnx.Param``),
the optax state, the RNG key, the model's non-parameter variables, and
``extra``, a dict of method state (domain weights ``w_K``, a weighting
network's parameters, auxiliary vectors ``v``, ...). The data-iterator state
and the metric history are host-side JSON saved next to it by
:mod:`dataweights.checkpoint`.

The static half, the model's ``graphdef`` and the optax transformation,
lives in :class:`StaticParts`; ``nnx.merge(graphdef, params, model_state)``
rebuilds the model inside a pure function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as a pytree of arrays.

  Attributes:
    step: int32 scalar, the number of updates applied so far.
    params: ``nnx.State`` of the model's ``nnx.Param`` variables.
    opt_state: the optax state (moments, counts), sharded like ``params``.
    rng: raw uint32 PRNG key data, shape ``(2,)``; step ``s`` uses
      ``fold_in(key, s)``, so the key itself never changes.
    model_state: the model's other variables (usually empty); passed to the
      loss unchanged.
    extra: method state, a dict of arrays or pytrees (may be empty); a
      :class:`~dataweights.train.method.Method`'s state is ``extra["method"]``.
    halted: int32 scalar, 1 once a step was non-finite: every later step
      then leaves the state unchanged (the host loop reads metrics one step
      late, so the step after a failure must not move away from the last
      good state).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  model_state: Any
  extra: dict[str, Any]
  halted: jax.Array

  def step_key(self) -> jax.Array:
    """The PRNG key of the current step: ``fold_in(rng, step)``."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


@dataclasses.dataclass(frozen=True)
class StaticParts:
  """The non-array half of a training run: model graph and optimiser."""

  graphdef: Any
  tx: optax.GradientTransformation

  def model(self, state: TrainState) -> nnx.Module:
    """The model with ``state``'s parameters (a fresh object)."""
    return nnx.merge(self.graphdef, state.params, state.model_state)


def _replicated_like(example: jax.Array):
  """A fully replicated sharding on the same devices as ``example``."""
  sharding = example.sharding
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  return SingleDeviceSharding(next(iter(sharding.device_set)))


def init_train_state(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  *,
  seed: int,
  extra: dict[str, Any] | None = None,
) -> tuple[TrainState, StaticParts, TrainState]:
  """Builds the initial state from an (already sharded) model.

  The optimiser state gets the parameters' shardings (leaves matched to
  parameters by key path, :func:`dataweights.train.method.state_shardings`),
  scalars and ``extra`` are replicated over the
  parameters' devices. Create a sharded model with
  :func:`dataweights.sharding.create_sharded`; an unsharded model gives a
  single-device state.

  The parameters are not copied: after the first (donating) jitted step the
  model's own arrays are gone; rebuild the model with
  ``static.model(state)``.

  Args:
    model: the NNX model; its parameters become ``state.params``.
    tx: the optax transformation.
    seed: seeds the step RNG key (``state.rng``).
    extra: initial method state (arrays are placed replicated).

  Returns:
    ``(state, static, shardings)``: the state, its static half, and a
    ``TrainState``-shaped pytree of the shardings of every leaf (what the
    jitted step and checkpoint restore use).
  """
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("the model has no nnx.Param variables to train")
  repl = _replicated_like(leaves[0])
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  from dataweights.train.method import state_shardings

  opt_abstract = jax.eval_shape(tx.init, params)
  # Placed by key path (not optax.tree_map_params, which cannot see through
  # masked, grouped or LISA states): moments in their parameter's shards.
  opt_sh = state_shardings(opt_abstract, params, param_sh, repl)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  # Copies: the jitted step donates the state, which must not delete arrays
  # the caller still holds (e.g. the initial domain weights).
  copy = lambda x: jax.device_put(jnp.array(x, copy=True), repl)
  extra = dict(extra or {})
  method_state = extra.pop("method", None)
  extra = jax.tree.map(copy, extra)
  if method_state is not None:
    # Parameter-shaped parts of a method's state live in the parameters'
    # shards (a second model copy must not be replicated).
    sh = state_shardings(method_state, params, param_sh, repl)
    extra["method"] = jax.tree.map(
      lambda x, s: jax.device_put(jnp.array(x, copy=True), s), method_state, sh
    )
  model_state = jax.tree.map(copy, model_state)
  state = TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), repl),
    params=params,
    opt_state=opt_state,
    rng=jax.device_put(
      jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32), repl
    ),
    model_state=model_state,
    extra=extra,
    halted=jax.device_put(jnp.zeros((), jnp.int32), repl),
  )
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return state, StaticParts(graphdef, tx), shardings


def abstract_state(state: TrainState, shardings: Any = None) -> TrainState:
  """``ShapeDtypeStruct``s of ``state`` (with ``shardings`` if given)."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    state,
    shardings,
  )
