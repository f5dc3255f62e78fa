"""Per-example gradients by ``jax.vmap(jax.grad(...))``, chunked and sharded.

Influence-based selection (LESS, G-DIG, TRAK) needs the gradient of every
candidate's own loss, ``g_n = grad_theta loss(theta; z_n)``. PyTorch code
loops over examples at batch size 1 (LESS's issue #7 names vectorising
this as the blocker); in JAX it is one transformation::

  grads = jax.vmap(jax.grad(loss_one), in_axes=(None, 0))(params, batch)

Three things make that usable on a real pool:

* **chunks**: ``jax.lax.map(..., batch_size=C)`` vmaps ``C`` examples at a
  time and scans over the chunks, so memory holds ``C`` gradients, not
  ``B``;
* **features instead of gradients**: a ``feature_fn(grads) -> f`` is
  applied inside the chunk (a random projection, an Adam preconditioner, a
  dot product with an inverse-HVP), so only ``C x P`` floats ever exist;
* **sharding**: :func:`sharded_features` runs the same thing under
  ``jax.shard_map`` with the batch split over the mesh's data axes and the
  parameters replicated: each device maps over its own rows, no
  communication.

The loss is a pure function ``loss_fn(params, batch) -> loss_B`` of a batch
(per-example losses, as :class:`dataweights.train.method.StepContext`
provides); each example is presented to it as a batch of one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dataweights.types import Batch, Params

LossFn = Callable[[Params, Batch], jax.Array]
FeatureFn = Callable[[Params], Any]


def _batch_size(batch: Batch) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("the batch has no arrays")
  sizes = {int(np.shape(x)[0]) for x in leaves}
  if len(sizes) != 1:
    raise ValueError(
      f"every array of the batch must have the same leading size; got {sorted(sizes)}"
    )
  return sizes.pop()


def _check_chunk(chunk_size: int | None) -> None:
  if chunk_size is not None and (
    not isinstance(chunk_size, int)
    or isinstance(chunk_size, bool)
    or chunk_size < 1
  ):
    raise ValueError(f"chunk_size = {chunk_size!r} must be an int >= 1 or None")


def example_grad_fn(loss_fn: LossFn) -> Callable[[Params, Batch], Params]:
  """``g(params, example) -> grads``: the gradient of one example's loss.

  ``example`` is one row of a batch (no leading axis); it is given to
  ``loss_fn`` as a batch of one.
  """

  def one_loss(params, example):
    batch1 = jax.tree.map(lambda x: jnp.asarray(x)[None], example)
    loss_1 = loss_fn(params, batch1)
    if loss_1.shape != (1,):
      raise ValueError(
        f"loss_fn must return per-example losses of shape (B,); for a batch "
        f"of one it returned shape {loss_1.shape}"
      )
    return loss_1[0]

  return jax.grad(one_loss)


def per_example_features(
  loss_fn: LossFn,
  params: Params,
  batch: Batch,
  *,
  feature_fn: FeatureFn | None = None,
  chunk_size: int | None = None,
) -> Any:
  """``feature_fn(grad of loss_n)`` for every example ``n`` of ``batch``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> loss_B``.
    params: the parameters (any pytree; the gradient has its structure).
    batch: a pytree of arrays with a common leading size B.
    feature_fn: applied to each example's gradient pytree inside the vmap
      (e.g. a projection); default the identity (the gradients themselves).
    chunk_size: examples vmapped at once (memory holds this many
      gradients); None vmaps the whole batch.

  Returns:
    The features with a leading axis B (a pytree like ``params`` for the
    identity).

  Raises:
    ValueError: a bad chunk size, ragged batch, or a loss that is not
      per-example.
  """
  _check_chunk(chunk_size)
  _batch_size(batch)
  feature_fn = feature_fn or (lambda g: g)
  grad_one = example_grad_fn(loss_fn)

  def one(example):
    return feature_fn(grad_one(params, example))

  if chunk_size is None:
    return jax.vmap(one)(batch)
  return jax.lax.map(one, batch, batch_size=chunk_size)


def per_example_grads(
  loss_fn: LossFn,
  params: Params,
  batch: Batch,
  *,
  chunk_size: int | None = None,
) -> Params:
  """Every example's gradient, a pytree like ``params`` with a leading B.

  This is :func:`per_example_features` with the identity feature; memory is
  ``B x P`` for the result, so use it for small pools and tests, and a
  ``feature_fn`` (projection, dot product) for real ones.
  """
  return per_example_features(loss_fn, params, batch, chunk_size=chunk_size)


def per_example_grads_loop(
  loss_fn: LossFn, params: Params, batch: Batch
) -> Params:
  """The same gradients by a Python loop over examples (one jitted grad).

  The reference implementation (what PyTorch code does at batch size 1):
  used as the oracle in tests and as the baseline in the cost benchmark.
  """
  n = _batch_size(batch)
  grad_one = jax.jit(example_grad_fn(loss_fn))
  rows = [
    grad_one(params, jax.tree.map(lambda x, i=i: x[i], batch)) for i in range(n)
  ]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


def flatten_per_example(grads: Params) -> jax.Array:
  """``(B, ...)``-leaved pytree -> ``grads_BxP`` (leaves in tree order)."""
  leaves = jax.tree.leaves(grads)
  n = leaves[0].shape[0]
  return jnp.concatenate([x.reshape(n, -1) for x in leaves], axis=1)


def flatten_params(tree: Params) -> jax.Array:
  """One pytree -> a flat vector ``v_P`` (leaves in tree order)."""
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def sharded_features(
  loss_fn: LossFn,
  params: Params,
  batch: Batch,
  mesh: Mesh,
  *,
  feature_fn: FeatureFn | None = None,
  chunk_size: int | None = None,
  data_axes: tuple[str, ...] | None = None,
) -> Any:
  """:func:`per_example_features` with the batch split over the data axes.

  Under ``jax.shard_map`` each device computes the features of its own rows
  (chunked by ``chunk_size``) with a full copy of the parameters; the
  result is split over the same axes. The numbers equal the single-device
  path up to float reassociation inside XLA (tests/sharding checks rtol
  1e-6).

  Args:
    loss_fn, params, batch, feature_fn, chunk_size: as in
      :func:`per_example_features`.
    mesh: the device mesh.
    data_axes: mesh axes to split the batch over; default every axis named
      ``data`` or ``fsdp`` in the mesh (the project's batch axes).

  Returns:
    The features with leading axis B, sharded over ``data_axes``.

  Raises:
    ValueError: the batch does not divide over the data shards, or an
      unknown axis.
  """
  _check_chunk(chunk_size)
  n = _batch_size(batch)
  if data_axes is None:
    data_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  unknown = [a for a in data_axes if a not in mesh.axis_names]
  if unknown or not data_axes:
    raise ValueError(
      f"data_axes = {data_axes!r} must name axes of the mesh {mesh.axis_names}"
    )
  shards = int(np.prod([mesh.shape[a] for a in data_axes]))
  if n % shards:
    raise ValueError(
      f"a batch of {n} examples does not split over the {shards} data "
      f"shards of the mesh (axes {data_axes}); pad it to a multiple of {shards}"
    )
  spec = P(data_axes)

  def local(p, b):
    return per_example_features(
      loss_fn, p, b, feature_fn=feature_fn, chunk_size=chunk_size
    )

  in_specs = (
    jax.tree.map(lambda _: P(), params),
    jax.tree.map(lambda _: spec, batch),
  )
  fn = jax.shard_map(
    local, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False
  )
  return jax.jit(fn)(params, batch)
