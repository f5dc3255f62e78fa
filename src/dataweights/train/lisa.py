"""LISA: layerwise importance sampling, as an optax transformation that
keeps optimiser state only for the blocks it trains.

LISA (Pan et al. 2024, "LISA: Layerwise Importance Sampling for
Memory-Efficient Large Language Model Fine-Tuning"; used by ScaleBiO) trains,
for ``period`` steps at a time, the embeddings, the head and ``num_active``
transformer blocks drawn at random; every other block is frozen. The
reference implementation (LMFlow) freezes blocks by ``requires_grad`` and
keeps the AdamW moments of every block, frozen or not (LMFlow issues 729,
768), so the memory it saves is smaller than claimed. Here:

* the optimiser state holds AdamW moments for the always-trained parameters
  (``rest``: everything outside ``params[block_key]``) and ``num_active``
  *slots* for the active blocks: ``(num_active, *block_leaf_shape)`` arrays,
  gathered from the blocks' gradients and scattered back as updates; frozen
  blocks hold no state and get an update of exactly ``-0.0`` (so
  ``p + update == p`` bit for bit, also for ``p = -0.0``);
* at the start of each period the active blocks are redrawn and the slots'
  moments and bias-correction count start from zero (a block that becomes
  active starts a fresh AdamW, as if its state had been freed); the
  learning-rate schedule runs on the global update count;
* the choice of period ``q`` is ``sorted(choice(fold_in(key(seed), q), N,
  num_active, replace=False))``, a counter-based draw: the state holds the
  update count, so a restored state continues exactly; two LISA
  transformations with the same ``seed`` and ``period`` that are updated in
  lockstep (ScaleBiO's ``u`` and ``w``) train the same blocks.

Two parameter layouts are supported: a list of blocks (``params[block_key][i]``,
the unrolled :class:`~dataweights.models.transformer.Transformer`), where a
slot is gathered with a ``lax.switch`` over the blocks, and stacked blocks
(every leaf under ``params[block_key]`` has a leading layer axis, the
scanned model), where gather and scatter index the layer axis.

Fixed blocks (the lean mode). With the active set chosen inside the
compiled step, the step still computes the weight gradients of the frozen
blocks (then drops them), and they take memory. Under
:func:`fixed_blocks` the active set is a Python constant of the traced
step: the step differentiates with respect to the rest and the active
blocks only (:func:`freeze_inactive`, used by
:func:`dataweights.train.step.make_grad_fn`), the frozen blocks are
constants of the program (no weight-gradient matmul, no gradient buffer)
and this transformation gathers and scatters the slots by constant
indices. One program is compiled per active set (at most ``C(N, k)``);
:class:`dataweights.train.loop.Trainer` does it with ``fixed_blocks=``
and :func:`blocks_at` (the host twin of the in-step draw), and the result
equals the in-step mode up to float summation order
(tests/test_lisa.py). The savings need the unrolled block list: with
stacked blocks (one ``lax.scan``) every layer's weight gradient is formed
inside the scan.

Gradient clipping (``grad_clip``) uses the global norm of what is trained:
the rest and the active blocks. With ``num_active`` equal to the number of
blocks and a period longer than the run, the transformation is AdamW
(``optax.chain(clip_by_global_norm, adamw)``; tests/test_lisa.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Path = tuple[Any, ...]

_FIXED: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
  "dataweights_lisa_fixed_blocks", default=None
)


@contextlib.contextmanager
def fixed_blocks(active: Sequence[int]) -> Iterator[tuple[int, ...]]:
  """Traces a step with these active blocks as constants (the lean mode).

  Use it *inside* the function that ``jax.jit`` traces, with one jitted
  function per active set (a jit cache does not see this context)::

    def step_for(active):
      def step(state, batch):
        with lisa.fixed_blocks(active):
          return train_step(state, batch)
      return jax.jit(step)

  The active set must be the one the LISA state is in at that update:
  :func:`blocks_at` of the update count (the transformation trusts it; a
  wrong set trains other blocks than the in-step draw would).

  Args:
    active: the active block indices (any order, no repeats).

  Raises:
    ValueError: repeated or negative indices.
  """
  fixed = tuple(sorted(int(a) for a in active))
  if len(set(fixed)) != len(fixed) or (fixed and fixed[0] < 0):
    raise ValueError(
      f"fixed LISA blocks {tuple(active)} are invalid; they must be "
      "distinct block indices >= 0"
    )
  token = _FIXED.set(fixed)
  try:
    yield fixed
  finally:
    _FIXED.reset(token)


def current_fixed_blocks() -> tuple[int, ...] | None:
  """The active blocks fixed by :func:`fixed_blocks`, or None."""
  return _FIXED.get()


def _block_index(path: Path, block_key: str) -> int | None:
  if len(path) >= 2 and path[0] == block_key and isinstance(path[1], int):
    return path[1]
  return None


def freeze_inactive(params: Any, block_key: str = "blocks") -> Any:
  """``params`` with the frozen blocks behind ``stop_gradient``.

  Under :func:`fixed_blocks` and with a block list
  (``params[block_key][i]``), the leaves of blocks outside the active set
  are wrapped in ``jax.lax.stop_gradient``: autodiff neither forms their
  weight gradients nor keeps what only those need; their gradients are
  zeros. Outside :func:`fixed_blocks`, or with stacked blocks, ``params``
  is returned unchanged.
  """
  fixed = _FIXED.get()
  if fixed is None:
    return params

  def f(path, x):
    b = _block_index(_plain(path), block_key)
    return x if b is None or b in fixed else jax.lax.stop_gradient(x)

  return jax.tree_util.tree_map_with_path(f, params)


def trainable_leaves(tree: Any, block_key: str = "blocks"):
  """``(leaves, rebuild)``: the leaves of what is trained, and the inverse.

  Under :func:`fixed_blocks` with a block list, ``leaves`` omits the frozen
  blocks' leaves and ``rebuild(leaves)`` puts zeros back in their place
  (constants: XLA does not store them unless something forces it). Use it
  to pass gradients through an optimisation barrier, which would
  otherwise materialise the frozen blocks' zero gradients. Outside
  :func:`fixed_blocks`, every leaf.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  fixed = _FIXED.get()
  keep = [
    fixed is None
    or (b := _block_index(_plain(p), block_key)) is None
    or b in fixed
    for p, _ in flat
  ]
  leaves = [x for (_, x), k in zip(flat, keep) if k]
  shapes = [(jnp.shape(x), x.dtype) for _, x in flat]

  def rebuild(new_leaves):
    it = iter(new_leaves)
    out = [
      next(it) if k else jnp.zeros(shape, dtype)
      for k, (shape, dtype) in zip(keep, shapes)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)

  return leaves, rebuild


def _plain(path: Any) -> Path:
  out = []
  for e in path:
    for attr in ("key", "idx", "name"):
      if hasattr(e, attr):
        out.append(getattr(e, attr))
        break
    else:
      out.append(e)
  return tuple(out)


def _nest(items: list[tuple[Path, Any]]) -> dict:
  """A nested dict from ``(path, leaf)`` pairs."""
  root: dict = {}
  for path, leaf in items:
    node = root
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return root


def _get(nested: dict, path: Path) -> Any:
  for k in path:
    nested = nested[k]
  return nested


class LisaState(NamedTuple):
  """LISA's optimiser state.

  Attributes:
    count: int32, updates done (the schedule's step and the period clock).
    active_K: int32 ``(num_active,)``, the active blocks, ascending.
    rest: AdamW state of the always-trained parameters.
    slots: AdamW state of the active blocks' slots (reset every period).
  """

  count: jax.Array
  active_K: jax.Array
  rest: Any
  slots: Any


class BlockLayout:
  """Where the blocks are in a parameter tree, and how to gather them.

  Args:
    params: the parameters (arrays or ``ShapeDtypeStruct`` s).
    block_key: the top-level key holding the blocks.

  Raises:
    ValueError: no ``block_key`` at the top of the tree, or blocks whose
      structures or shapes differ.
  """

  def __init__(self, params: Any, block_key: str = "blocks"):
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.paths = [_plain(p) for p, _ in flat]
    shapes = [tuple(jnp.shape(x)) for _, x in flat]
    self.block_key = block_key
    in_blocks = [bool(p) and p[0] == block_key for p in self.paths]
    if not any(in_blocks):
      tops = sorted({str(p[0]) for p in self.paths if p})
      raise ValueError(
        f"LISA found no {block_key!r} in the parameters (top-level keys: "
        f"{', '.join(tops)}); it freezes the blocks under that key"
      )
    self.rest_idx = [i for i, b in enumerate(in_blocks) if not b]
    blk = [i for i, b in enumerate(in_blocks) if b]
    self.stacked = not isinstance(self.paths[blk[0]][1], int)
    if self.stacked:
      # Every leaf under block_key has a leading layer axis.
      self.sub = [self.paths[i][1:] for i in blk]
      self.leaf_idx = {s: i for s, i in zip(self.sub, blk)}
      lead = {shapes[i][0] if shapes[i] else None for i in blk}
      if len(lead) != 1 or None in lead:
        raise ValueError(
          f"stacked blocks under {block_key!r} must share one leading "
          f"layer axis; got leading sizes {sorted(map(str, lead))}"
        )
      self.num_blocks = lead.pop()
      self.block_shapes = {s: shapes[self.leaf_idx[s]][1:] for s in self.sub}
    else:
      by_block: dict[int, dict[Path, int]] = {}
      for i in blk:
        by_block.setdefault(self.paths[i][1], {})[self.paths[i][2:]] = i
      ids = sorted(by_block)
      if ids != list(range(len(ids))):
        raise ValueError(f"blocks must be numbered 0..N-1; got {ids}")
      self.num_blocks = len(ids)
      self.sub = sorted(by_block[0], key=str)
      self.block_leaf = [[by_block[b][s] for s in self.sub] for b in ids]
      self.block_shapes = {s: shapes[by_block[0][s]] for s in self.sub}
      for b in ids:
        if sorted(by_block[b], key=str) != self.sub or any(
          shapes[by_block[b][s]] != self.block_shapes[s] for s in self.sub
        ):
          raise ValueError(
            f"block {b} under {block_key!r} differs in structure or shapes "
            "from block 0; LISA needs identical blocks"
          )

  def slot_path(self, sub: Path) -> Path:
    """The key path of a slot leaf: block 0's (or the stack's) path."""
    return (self.block_key, *sub) if self.stacked else (self.block_key, 0, *sub)

  def compact(self, tree: Any, active_K: jax.Array) -> dict:
    """``{"rest": <rest leaves>, "slots": <active blocks, stacked>}``.

    The rest keeps the parameters' key paths; a slot leaf has shape
    ``(num_active, *block_leaf_shape)`` at block 0's key path.
    """
    leaves = jax.tree.leaves(tree)
    rest = _nest([(self.paths[i], leaves[i]) for i in self.rest_idx])
    if self.stacked:
      slots = [
        jnp.take(leaves[self.leaf_idx[s]], active_K, axis=0) for s in self.sub
      ]
    else:
      branches = [
        (lambda b=b: tuple(leaves[i] for i in self.block_leaf[b]))
        for b in range(self.num_blocks)
      ]
      per_slot = [jax.lax.switch(a, branches) for a in active_K]
      slots = [
        jnp.stack([t[j] for t in per_slot]) for j in range(len(self.sub))
      ]
    return {
      "rest": rest,
      "slots": _nest([(self.slot_path(s), x) for s, x in zip(self.sub, slots)]),
    }

  def compact_fixed(self, tree: Any, active: tuple[int, ...]) -> dict:
    """:meth:`compact` with the active blocks as Python constants."""
    if self.stacked:  # a constant-index gather either way
      return self.compact(tree, jnp.asarray(active, jnp.int32))
    leaves = jax.tree.leaves(tree)
    rest = _nest([(self.paths[i], leaves[i]) for i in self.rest_idx])
    slots = [
      jnp.stack([leaves[self.block_leaf[a][j]] for a in active])
      for j in range(len(self.sub))
    ]
    return {
      "rest": rest,
      "slots": _nest([(self.slot_path(s), x) for s, x in zip(self.sub, slots)]),
    }

  def expand_fixed(
    self, compact: dict, active: tuple[int, ...], dtypes: list
  ) -> Any:
    """:meth:`expand` with the active blocks as Python constants."""
    if self.stacked:  # a constant-index scatter either way
      return self.expand(compact, jnp.asarray(active, jnp.int32), dtypes)
    out: list[Any] = [None] * len(self.paths)
    for i in self.rest_idx:
      out[i] = _get(compact["rest"], self.paths[i])
    slots = {s: _get(compact["slots"], self.slot_path(s)) for s in self.sub}
    for b in range(self.num_blocks):
      for s, i in zip(self.sub, self.block_leaf[b]):
        if b in active:
          out[i] = slots[s][active.index(b)].astype(dtypes[i])
        else:
          out[i] = jnp.full(self.block_shapes[s], -0.0, dtypes[i])
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def expand(self, compact: dict, active_K: jax.Array, dtypes: list) -> Any:
    """The full tree: the rest and the slots in place, ``-0.0`` elsewhere."""
    out: list[Any] = [None] * len(self.paths)
    for i in self.rest_idx:
      out[i] = _get(compact["rest"], self.paths[i])
    slots = {s: _get(compact["slots"], self.slot_path(s)) for s in self.sub}
    if self.stacked:
      for s in self.sub:
        i = self.leaf_idx[s]
        neg0 = jnp.full(
          (self.num_blocks, *self.block_shapes[s]), -0.0, dtypes[i]
        )
        out[i] = neg0.at[active_K].set(slots[s].astype(dtypes[i]))
    else:
      for b in range(self.num_blocks):
        hit_K = active_K == b
        slot = jnp.argmax(hit_K)
        on = jnp.any(hit_K)
        for s, i in zip(self.sub, self.block_leaf[b]):
          x = slots[s][slot].astype(dtypes[i])
          out[i] = jnp.where(on, x, jnp.asarray(-0.0, dtypes[i]))
    return jax.tree_util.tree_unflatten(self.treedef, out)


def choose_blocks(
  seed: int, period_index: jax.Array, num_blocks: int, num_active: int
) -> jax.Array:
  """The active blocks of a period: a counter-based draw, ascending int32."""
  key = jax.random.fold_in(jax.random.key(seed), period_index)
  pick = jax.random.choice(key, num_blocks, (num_active,), replace=False)
  return jnp.sort(pick).astype(jnp.int32)


def blocks_at(
  step: int, *, seed: int, period: int, num_blocks: int, num_active: int
) -> tuple[int, ...]:
  """The active blocks of update ``step`` (0-based), computed on the host.

  The same draw as the transformation's in-step choice (period
  ``step // period``); what :func:`fixed_blocks` needs for that update.
  """
  with jax.ensure_compile_time_eval():
    pick = choose_blocks(seed, int(step) // int(period), num_blocks, num_active)
  return tuple(int(a) for a in jax.device_get(pick))


def block_schedule(
  *, seed: int, period: int, num_blocks: int, num_active: int
) -> Callable[[int], tuple[int, ...]]:
  """``step -> active blocks`` for :class:`~dataweights.train.loop.Trainer`'s
  ``fixed_blocks`` (:func:`blocks_at` with these settings).

  The draw is made once per period and cached (the Trainer asks every
  step; each draw is an eager ``jax.random`` call on the host).
  """

  @functools.lru_cache(maxsize=256)
  def of_period(period_index: int) -> tuple[int, ...]:
    return blocks_at(
      period_index * period,
      seed=seed,
      period=period,
      num_blocks=num_blocks,
      num_active=num_active,
    )

  def schedule(step: int) -> tuple[int, ...]:
    return of_period(int(step) // int(period))

  schedule.cache_info = of_period.cache_info
  return schedule


def _check_fixed(fixed: tuple[int, ...], num_blocks: int, num_active: int):
  if len(fixed) != num_active or fixed[-1] >= num_blocks:
    raise ValueError(
      f"fixed LISA blocks {fixed} are invalid for a model with {num_blocks} "
      f"blocks and num_active = {num_active}: give {num_active} distinct "
      f"indices in [0, {num_blocks})"
    )


def lisa(
  learning_rate: float | optax.Schedule,
  *,
  num_active: int,
  period: int,
  seed: int = 0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  grad_clip: float = 0.0,
  block_key: str = "blocks",
  decay_mask: Callable[[tuple[int, ...]], bool] = lambda shape: len(shape) >= 2,
) -> optax.GradientTransformation:
  """LISA with AdamW on what it trains; no state for frozen blocks.

  Args:
    learning_rate: a constant or an optax schedule of the global update
      count.
    num_active: blocks trained at a time (1 <= num_active <= blocks).
    period: updates between redraws of the active blocks (LISA's K).
    seed: seed of the counter-based block choice.
    b1, b2, eps: AdamW's moment decays and epsilon.
    weight_decay: decoupled weight decay (AdamW), applied to parameters
      whose (per-block) shape satisfies ``decay_mask`` (rank >= 2 by
      default, the project's rule).
    grad_clip: clip the global norm of the trained gradients; 0 disables.
    block_key: the top-level parameter key holding the blocks.
    decay_mask: ``shape -> bool`` on a parameter's own shape.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Raises:
    ValueError: at construction, ``num_active < 1`` or ``period < 1``; at
      ``init``, more active blocks than the model has (naming both), or no
      blocks.
  """
  for name, v in (("num_active", num_active), ("period", period)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(
        f"LISA {name} = {v!r} is invalid; it must be an int >= 1"
      )
  schedule = (
    learning_rate if callable(learning_rate) else (lambda _: learning_rate)
  )

  def core(mask_fn):
    return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=mask_fn)
      if weight_decay
      else optax.identity(),
    )

  rest_core = core(
    lambda t: jax.tree.map(lambda x: decay_mask(jnp.shape(x)), t)
  )
  slot_core = core(
    lambda t: jax.tree.map(lambda x: decay_mask(jnp.shape(x)[1:]), t)
  )

  def layout(params) -> BlockLayout:
    lay = BlockLayout(params, block_key)
    if num_active > lay.num_blocks:
      raise ValueError(
        f"LISA num_active = {num_active} is invalid: the model has only "
        f"{lay.num_blocks} blocks under {block_key!r}; it must be at most "
        f"{lay.num_blocks}"
      )
    return lay

  def init(params):
    lay = layout(params)
    active_K = choose_blocks(seed, 0, lay.num_blocks, num_active)
    zeros = jax.tree.map(jnp.zeros_like, params)
    c = lay.compact(zeros, active_K)
    return LisaState(
      count=jnp.zeros((), jnp.int32),
      active_K=active_K,
      rest=rest_core.init(c["rest"]),
      slots=slot_core.init(c["slots"]),
    )

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("LISA's update needs params (AdamW weight decay)")
    lay = layout(params)
    count = state.count
    fresh = count % period == 0
    fixed = _FIXED.get()
    if fixed is not None:
      _check_fixed(fixed, lay.num_blocks, num_active)
      active_K = jnp.asarray(fixed, jnp.int32)
      g = lay.compact_fixed(grads, fixed)
      p = lay.compact_fixed(params, fixed)
    else:
      active_K = jnp.where(
        fresh,
        choose_blocks(seed, count // period, lay.num_blocks, num_active),
        state.active_K,
      )
      g = lay.compact(grads, active_K)
      p = lay.compact(params, active_K)
    if grad_clip:
      g, _ = optax.clip_by_global_norm(grad_clip).update(g, optax.EmptyState())
    # A new period: the slots start a fresh AdamW (zero moments, count 0).
    slots = jax.tree.map(
      lambda x: jnp.where(fresh, jnp.zeros_like(x), x), state.slots
    )
    u_rest, rest = rest_core.update(g["rest"], state.rest, p["rest"])
    u_slots, slots = slot_core.update(g["slots"], slots, p["slots"])
    lr = jnp.asarray(schedule(count), jnp.float32)
    scaled = jax.tree.map(
      lambda u: (-lr * u).astype(u.dtype), {"rest": u_rest, "slots": u_slots}
    )
    dtypes = [x.dtype for x in jax.tree.leaves(grads)]
    if fixed is not None:
      updates = lay.expand_fixed(scaled, fixed, dtypes)
    else:
      updates = lay.expand(scaled, active_K, dtypes)
    return updates, LisaState(count + 1, active_K, rest, slots)

  return optax.GradientTransformation(init, update)


def active_blocks(state: Any) -> jax.Array:
  """The active blocks recorded in a (possibly nested) optimiser state."""
  found = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, LisaState))
    if isinstance(s, LisaState)
  ]
  if not found:
    raise ValueError("no LisaState in this optimiser state")
  return found[0].active_K


def state_bytes(state: Any) -> int:
  """Bytes of the arrays in an optimiser state."""
  return int(
    sum(
      int(jnp.size(x)) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(state)
    )
  )
