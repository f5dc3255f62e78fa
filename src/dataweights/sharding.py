"""Meshes, the logical-axis rules table, sharded creation and batch sharding.

Sharding is declared in two places only: the logical axis names on each
parameter (see :mod:`dataweights.models.transformer`) and :data:`RULES`,
which maps them to the three mesh axes of :class:`MeshConfig`:

  * ``data``  data parallel: the batch is split, parameters replicated;
  * ``fsdp``  fully sharded data parallel: the batch is split *and*
    parameters (hence gradients and optimiser moments) are sharded along
    the model width D, gathered layer by layer by XLA;
  * ``model`` tensor parallel: heads, MLP width and vocabulary are split.

Typical use (single host or multi-host alike)::

  from dataweights.configs import lm
  from dataweights import sharding
  mesh = sharding.make_mesh(lm.mesh("book"))
  cfg = lm.lm_model("book")
  sharding.check_divisible(mesh, batch_size=32, state=abstract_model(cfg))
  model = sharding.create_sharded(
    lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  tokens_BxL = sharding.shard_batch(tokens_BxL, mesh)
  with jax.set_mesh(mesh):
    ... jitted train step ...

The mesh uses ``AxisType.Auto`` axes: Flax logical axes and GSPMD
propagation need them (``Explicit`` breaks the embedding gather).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dataweights.configs.base import ConfigError
from dataweights.configs.lm import BATCH_MESH_AXES, MESH_AXES, MeshConfig
from dataweights.types import PyTree

log = logging.getLogger(__name__)


MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Logical axis -> mesh axis (or axes, or None = replicated).
RULES: Rules = (
  ("batch", ("data", "fsdp")),  # examples: split over every data-like axis
  ("embed", "fsdp"),  # D: FSDP shards parameters along the width
  ("vocab", "model"),  # V: tensor parallel
  ("heads", "model"),  # H: tensor parallel
  ("mlp", "model"),  # F: tensor parallel
  ("length", None),  # L, position-table rows
  ("kv", None),  # Dh, head width
  ("norm", None),  # D-sized vectors (LayerNorm, residual biases)
)

# The same names, all replicated: pure data parallelism.
REPLICATED_RULES: Rules = tuple((name, None) for name, _ in RULES)

BATCH_AXES: tuple[str, ...] = BATCH_MESH_AXES


def resolve_mesh_shape(
  cfg: MeshConfig, num_devices: int
) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, model) with ``-1`` filled in.

  Args:
    cfg: the mesh config.
    num_devices: how many devices the mesh must use exactly.

  Returns:
    The three axis sizes; their product is ``num_devices``.

  Raises:
    ConfigError: the sizes do not multiply to ``num_devices``.
  """
  sizes = [getattr(cfg, a) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  desc = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(
        f"mesh ({desc}) does not fit {num_devices} devices: the fixed axes "
        f"multiply to {fixed}, which does not divide {num_devices}"
      )
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  elif fixed != num_devices:
    raise ConfigError(
      f"mesh ({desc}) needs {fixed} devices but {num_devices} are available; "
      "set one axis to -1 to take the remaining devices"
    )
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(
  cfg: MeshConfig, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, fsdp, model) mesh over ``devices`` (default: all devices).

  Args:
    cfg: axis sizes; ``-1`` takes the remaining devices.
    devices: devices to use (default ``jax.devices()``, i.e. every device
      of every host after :func:`maybe_initialize_distributed`).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``("data", "fsdp", "model")``
    and ``AxisType.Auto`` axes.

  Raises:
    ConfigError: the axis sizes do not match the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(cfg, len(devices))
  return jax.make_mesh(
    shape,
    MESH_AXES,
    axis_types=(AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh(names: Sequence[str | None], rules: Rules = RULES) -> P:
  """The ``PartitionSpec`` for a tuple of logical axis names.

  Raises:
    KeyError: a name has no rule.
  """
  table = dict(rules)
  out = []
  for n in names:
    if n is None:
      out.append(None)
    elif n not in table:
      raise KeyError(
        f"logical axis {n!r} has no sharding rule; known axes are "
        + ", ".join(repr(k) for k in table)
      )
    else:
      out.append(table[n])
  return P(*out)


def partition_specs(model_or_state: Any, rules: Rules = RULES) -> PyTree:
  """Mesh ``PartitionSpec`` of every parameter of a model (or state).

  Args:
    model_or_state: an NNX module (concrete or from ``nnx.eval_shape``) or
      an ``nnx.State``.
    rules: logical-to-mesh rules.

  Returns:
    An ``nnx.State`` of ``PartitionSpec`` leaves with the model's structure.
  """
  state = (
    nnx.state(model_or_state)
    if isinstance(model_or_state, nnx.Module)
    else model_or_state
  )
  with nnx.logical_axis_rules(rules):
    return nnx.get_partition_spec(state)


def check_divisible(
  mesh: Mesh,
  *,
  batch_size: int | None = None,
  state: Any = None,
  rules: Rules = RULES,
) -> None:
  """Raises a clear error if the mesh does not divide the batch or the model.

  Args:
    mesh: the device mesh.
    batch_size: global batch size; must divide by ``data * fsdp``.
    state: any (abstract) model or ``nnx.State`` whose parameters are
      checked against their partition specs, e.g.
      :func:`dataweights.models.transformer.abstract_model` (shapes only,
      nothing allocated). This module does not import the models.
    rules: logical-to-mesh rules.

  Raises:
    ConfigError: naming the array, its dimension size and the mesh axes.
  """
  if batch_size is not None:
    n = _axis_size(mesh, BATCH_AXES)
    if batch_size % n:
      raise ConfigError(
        f"batch size {batch_size} is not divisible by the {n} batch shards "
        f"of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
      )
  if state is None:
    return
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  specs = partition_specs(state, rules)
  flat_specs = dict(nnx.to_flat_state(specs))
  for path, var in nnx.to_flat_state(state):
    spec = flat_specs[path]
    spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
    shape = var.get_value().shape
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec))):
      n = _axis_size(mesh, axes)
      if size % n:
        name = "/".join(str(p) for p in path)
        raise ConfigError(
          f"parameter {name} of shape {tuple(shape)}: dimension {dim} "
          f"(size {size}) is not divisible by mesh axes {axes} of total size "
          f"{n} (mesh {dict(mesh.shape)}); change the model size or the mesh"
        )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-leading array: axis 0 over ``data`` and ``fsdp``.

  Args:
    mesh: the device mesh.
    ndim: rank of the array (trailing axes are replicated).
  """
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding (mixture weights ``alpha_K``, scalars)."""
  return NamedSharding(mesh, P())


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Places a host batch (pytree of batch-leading arrays) on the mesh.

  Single process: ``batch`` is the global batch, split over ``data x fsdp``.
  Multi-process: ``batch`` is this process's slice of the global batch (its
  rows, in process order), assembled with
  ``jax.make_array_from_process_local_data``.

  Raises:
    ConfigError: a leading dimension not divisible by the batch shards.
  """

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      check_divisible(mesh, batch_size=x.shape[0])
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, batch)


def create_sharded[M](
  model_factory: Callable[[], M], mesh: Mesh, rules: Rules = RULES
) -> M:
  """Creates a model with every parameter born in its shard.

  The factory is traced once abstractly (``nnx.eval_shape``) to read the
  parameter partition specs, then run under ``jax.jit`` with those
  ``out_shardings``, so no device ever holds a full unsharded copy.

  Args:
    model_factory: builds the model, e.g.
      ``lambda: Transformer(cfg, rngs=nnx.Rngs(0))``. It must create its
      own ``nnx.Rngs`` (it is traced).
    mesh: the device mesh.
    rules: logical-to-mesh rules.

  Returns:
    The model with sharded parameters (``NamedSharding`` over ``mesh``).

  Raises:
    ConfigError: a parameter dimension is not divisible by its mesh axes.
  """
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(model_factory)
    check_divisible(mesh, state=abstract, rules=rules)
    graphdef, abs_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abs_state, mesh)

    init = jax.jit(lambda: nnx.state(model_factory()), out_shardings=shardings)
    state = init()
  return nnx.merge(graphdef, state)


def abstract_sharded[M](
  model_factory: Callable[[], M], mesh: Mesh, rules: Rules = RULES
) -> tuple[Any, Any]:
  """Graph definition and abstract state carrying the target shardings.

  Nothing is allocated: the state holds ``jax.ShapeDtypeStruct`` leaves with
  ``sharding=NamedSharding(...)``; use it for ``.lower(...)`` (memory
  analysis) or as the restore target of a checkpoint.

  Returns:
    ``(graphdef, abstract_state)``.
  """
  with nnx.logical_axis_rules(rules):
    return nnx.get_abstract_model(model_factory, mesh)


def maybe_initialize_distributed(cfg: MeshConfig) -> bool:
  """Joins a multi-host JAX job if ``cfg.distributed`` is set.

  Call it first thing in the program, before any other JAX call, then build
  the mesh with :func:`make_mesh` (``jax.devices()`` then lists every device
  of every host) and feed each host its slice of the batch with
  :func:`shard_batch`.

  How to launch:

  * **TPU pod slice** (e.g. v4-32): run the same command on every worker,
    ``gcloud compute tpus tpu-vm ssh NAME --worker=all --command "python -m
    dataweights ... "`` with ``distributed=True``; coordinator, process
    count and ids are detected from the TPU metadata.
  * **Several GPU hosts under SLURM**: ``srun --ntasks-per-node=1 python -m
    dataweights ...`` with ``distributed=True``; detected from SLURM's
    environment.
  * **Several GPU hosts by hand**: on every host run the program with
    ``coordinator_address="host0:1234"``, ``num_processes=N`` and
    ``process_id=i`` (``i = 0..N-1``; host 0 is the coordinator), or set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.

  Args:
    cfg: the mesh config; only the multi-host fields are read.

  Returns:
    True if this call initialised the distributed runtime, False if not
    requested or already initialised.

  Raises:
    ConfigError: only some of ``coordinator_address``, ``num_processes``,
      ``process_id`` given (give all three or none).
  """
  if not cfg.distributed:
    return False
  given = {
    "coordinator_address": cfg.coordinator_address,
    "num_processes": cfg.num_processes,
    "process_id": cfg.process_id,
  }
  n_given = sum(v is not None for v in given.values())
  if n_given not in (0, 3):
    raise ConfigError(
      f"MeshConfig multi-host fields {given} are partly set; give all of "
      "coordinator_address, num_processes and process_id, or none to "
      "auto-detect (TPU pods, SLURM, JAX_* environment variables)"
    )
  if jax.distributed.is_initialized():
    return False
  kwargs = {k: v for k, v in given.items() if v is not None}
  log.info(
    "jax.distributed.initialize(%s) (env JAX_COORDINATOR_ADDRESS=%s)",
    kwargs,
    os.environ.get("JAX_COORDINATOR_ADDRESS"),
  )
  jax.distributed.initialize(**kwargs)
  return True
