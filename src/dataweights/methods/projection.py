"""Counter-based random projections of gradients (LESS, TRAK).

A projector maps a gradient pytree ``g`` (``P`` numbers) to ``R^T g`` in
``R^d`` with a random ``P x d`` matrix ``R`` that is never stored: its rows
are generated block by block from the projector's key, so

* any row can be recomputed on its own (:meth:`Projector.rows`), on any
  device, in any process: the projection of a candidate computed today and
  of a validation example computed next week use the same ``R``;
* memory holds one ``block_rows x d`` block at a time, whatever ``P``.

Entries are Rademacher (``±1``) or standard normal, scaled by
``1/sqrt(d)`` so that ``E ||R^T g||^2 = ||g||^2`` and inner products are
preserved in expectation (Johnson-Lindenstrauss); LESS projects LoRA
gradients to ``d = 8192`` with Rademacher entries (TRAK's CUDA
projector), which the ``paper`` profile mirrors.

Rows of ``R`` are indexed by parameter: the rows of the leaf at path
``p`` (``jax.tree_util.keystr`` of its key path) in block ``b`` come from
``fold_in(fold_in(key, crc32(p)), b)``. So a parameter's rows do not depend
on which other parameters are projected (projecting only some layers gives
the same rows for those layers), nor on the order of leaves.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from dataweights.types import Params

KINDS: tuple[str, ...] = ("rademacher", "gaussian")


def leaf_paths(tree: Any) -> list[str]:
  """``keystr`` of every leaf's path, in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [jax.tree_util.keystr(path) for path, _ in flat]


def _path_id(path: str) -> int:
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True, slots=True)
class Projector:
  """A random ``P x d`` projection generated from a seed, block by block.

  Attributes:
    dim: d, the projected width.
    seed: the projection's seed (part of its identity: store it).
    kind: ``"rademacher"`` (``±1``) or ``"gaussian"``.
    block_rows: rows of ``R`` generated at once (part of the identity too:
      a different block size gives a different matrix).
    dtype: dtype of the generated blocks and of the matmul.
  """

  dim: int
  seed: int = 0
  kind: str = "rademacher"
  block_rows: int = 1024
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("dim", "block_rows"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"Projector.{name} = {v!r} must be an int >= 1")
    if self.kind not in KINDS:
      raise ValueError(
        f"Projector.kind = {self.kind!r}; allowed kinds are {', '.join(KINDS)}"
      )

  def _block(self, path: str, block: jax.Array | int) -> jax.Array:
    """Rows ``[block * block_rows, (block + 1) * block_rows)`` of leaf ``path``."""
    key = jax.random.fold_in(jax.random.key(self.seed), _path_id(path))
    key = jax.random.fold_in(key, block)
    shape = (self.block_rows, self.dim)
    if self.kind == "rademacher":
      r = jax.random.rademacher(key, shape, self.dtype)
    else:
      r = jax.random.normal(key, shape, self.dtype)
    return r * jnp.asarray(1.0 / math.sqrt(self.dim), self.dtype)

  def rows(self, path: str, start: int, stop: int) -> jax.Array:
    """Rows ``start:stop`` of the leaf at ``path`` (its flattened entries).

    Recomputes only the blocks that hold them.

    Returns:
      ``r_RxD`` with ``R = stop - start`` rows of width d.
    """
    if not 0 <= start <= stop:
      raise ValueError(f"bad row range {start}:{stop}")
    b0, b1 = start // self.block_rows, -(-stop // self.block_rows)
    blocks = [self._block(path, b) for b in range(b0, max(b1, b0 + 1))]
    full = jnp.concatenate(blocks, axis=0)
    off = b0 * self.block_rows
    return full[start - off : stop - off]

  def matrix(self, tree: Params) -> jax.Array:
    """The whole ``P x d`` matrix for a pytree shaped like ``tree`` (tests)."""
    parts = []
    for path, x in zip(leaf_paths(tree), jax.tree.leaves(tree)):
      parts.append(self.rows(path, 0, int(math.prod(jnp.shape(x)))))
    return jnp.concatenate(parts, axis=0)

  def _project_leaf(self, path: str, x_BxN: jax.Array) -> jax.Array:
    n = x_BxN.shape[1]
    nb = -(-n // self.block_rows)
    pad = nb * self.block_rows - n
    x = jnp.pad(x_BxN.astype(self.dtype), ((0, 0), (0, pad)))
    x_NBxBxR = x.reshape(x.shape[0], nb, self.block_rows).swapaxes(0, 1)

    def body(acc_BxD, inp):
      b, xb_BxR = inp
      return acc_BxD + xb_BxR @ self._block(path, b), None

    acc0 = jnp.zeros((x.shape[0], self.dim), self.dtype)
    out, _ = jax.lax.scan(body, acc0, (jnp.arange(nb), x_NBxBxR))
    return out

  def project_batch(self, grads: Params) -> jax.Array:
    """``R^T g_n`` for a pytree of per-example gradients (leading axis B).

    Returns:
      ``proj_BxD``.
    """
    paths = leaf_paths(grads)
    leaves = jax.tree.leaves(grads)
    if not leaves:
      raise ValueError("nothing to project: the gradient pytree is empty")
    b = leaves[0].shape[0]
    out = jnp.zeros((b, self.dim), self.dtype)
    for path, x in zip(paths, leaves):
      out = out + self._project_leaf(path, x.reshape(b, -1))
    return out

  def project(self, grads: Params) -> jax.Array:
    """``R^T g`` for one gradient pytree (no batch axis): ``proj_D``."""
    return self.project_batch(jax.tree.map(lambda x: x[None], grads))[0]
