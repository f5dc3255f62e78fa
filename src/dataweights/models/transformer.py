"""A GPT-2-style decoder-only transformer in Flax NNX, with per-example losses.

Architecture (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", and the released GPT-2 code): token embedding ``wte``
plus learned position embedding ``wpe``; ``num_layers`` pre-LayerNorm blocks

  x = x + Attn(LN_1(x)),    x = x + MLP(LN_2(x)),   MLP(h) = W_2 gelu_tanh(W_1 h)

with causal multi-head attention and biases everywhere; a final LayerNorm
``ln_f``; logits ``x @ wte.T`` (tied) or ``x @ head`` (untied).

Every parameter carries logical axis names (``out_sharding`` metadata) that
:data:`dataweights.sharding.RULES` maps to mesh axes:

  ============  =====================================================
  ``vocab``     V, rows of ``wte`` / columns of ``head``
  ``embed``     D, the residual width
  ``length``    L, rows of the position table
  ``heads``     H, attention heads
  ``kv``        Dh, width of one head
  ``mlp``       F, MLP hidden width
  ``norm``      D-sized vectors: LayerNorm scale/bias, residual biases
  ============  =====================================================

Creating the model outside a mesh gives ordinary single-device arrays;
inside ``jax.set_mesh(mesh)`` and ``nnx.logical_axis_rules(RULES)`` (what
:func:`dataweights.sharding.create_sharded` does) parameters are born in
their shards.

Inside a mesh the residual stream is constrained to the batch mesh axes
(``data``, ``fsdp``) so FSDP splits activations as well as parameters.
``cfg.dtype`` is the compute dtype (parameters are cast at use, LayerNorm
and softmax run in float32, logits are returned in float32);
``cfg.param_dtype`` the storage dtype; ``cfg.remat`` recomputes each block
in the backward pass (``jax.checkpoint``) under one of
:data:`dataweights.configs.lm.REMAT_POLICIES`; ``cfg.scan_layers`` stacks
the blocks' parameters along a leading ``layers`` axis and runs them with
one ``lax.scan`` (one block compiled, whatever the depth).

The residual-gradient barrier (``cfg.grad_barrier``, on by default). In the
backward pass the gradient of the residual stream at block ``i`` is a pure
elementwise function of the gradients of all later blocks (residual adds,
LayerNorm backward, bias gradients): nothing in it needs a matmul or a
layout change. XLA:CPU's fusion duplicates cheap elementwise producers
into every consumer instead of writing them to memory once, so it never
materialises that gradient: each consumer (the transposes that feed the
weight-gradient matmuls, the bias-gradient and LayerNorm reductions, the
embedding scatter) recomputes the whole chain of the later layers. The
duplicated work grows with the square of the depth (fusions with 83 inputs
at the book shape; 4.9x forward time for the backward pass).
:func:`grad_barrier` is the identity whose tangent (hence, transposed, its
cotangent) passes through ``jax.lax.optimization_barrier``; applied to the
residual stream before each residual branch, it makes XLA materialise the
residual gradient there, once, and fusions stop growing with depth. The
forward pass is untouched and the gradient is the same function (bitwise
the same at the book shape). ``jax.checkpoint`` (MaxText's per-layer remat)
cures the same duplication as a side effect of its own barriers.

With ``cfg.weight_dot`` (off by default) every activation x weight product
(the projections, the MLP, the head) goes through :func:`weight_dot`: the
value of ``jnp.tensordot``, with a JVP rule that makes the weight gradient
a row-major matmul on XLA:CPU (1.5-2x faster weight gradients, about 5% off
forward+backward at the book shape; benchmarks/bench_weight_grad.py).
Gradients change by float rounding only (summation order), but that is
enough to move the published results of Chapters 3-5 beyond their printed
digits, so the book's runs keep it off until those chapters are re-run.

Functional use (hypergradients, per-example gradients)::

  graphdef, params = nnx.split(model, nnx.Param)
  def loss(params, tokens_BxL):
    return next_token_loss(nnx.merge(graphdef, params), tokens_BxL).mean()
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.custom_derivatives import SymbolicZero

from dataweights.configs.lm import BATCH_MESH_AXES, ModelConfig
from dataweights.models.ids import TokenIdError as TokenIdError
from dataweights.models.ids import check_token_ids

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _mesh_active() -> bool:
  return not jax.sharding.get_abstract_mesh().empty


def _constrain_batch(x: jax.Array) -> jax.Array:
  """Keeps the residual stream split over the batch axes of the active mesh.

  Without it GSPMD may replicate activations under FSDP (the parameters are
  sharded along D over ``fsdp``, the batch along B over the same axis); with
  it, per-device activation memory falls by the number of batch shards
  (benchmarks/bench_lm_memory.py: GPT-2 124M, FSDP 8, temp bytes 7.2 GB ->
  3.4 GB per device). A no-op outside a mesh, on non-Auto meshes, and when
  the batch does not divide (e.g. one example under ``vmap``).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not mesh.are_all_axes_auto:
    return x
  axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names)
  n = math.prod(mesh.shape[a] for a in axes)
  if n == 1 or x.shape[0] % n:
    return x
  spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


@jax.custom_jvp
def grad_barrier(x: jax.Array) -> jax.Array:
  """Identity whose derivative materialises its (co)tangent.

  The tangent passes through ``jax.lax.optimization_barrier``; JAX
  transposes the barrier into a barrier on the cotangent, so in reverse mode
  the gradient flowing back into ``x`` is computed once, written to memory,
  and read by every consumer (XLA may not fuse it into them, so it cannot
  duplicate the computation that produces it). Works under ``jax.grad``,
  ``jax.jvp`` (forward mode, e.g. hypergradients), ``vmap`` and ``jit``;
  the primal value is never touched.

  See the module docstring for why the transformer needs it.
  """
  return x


@grad_barrier.defjvp
def _grad_barrier_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return x, jax.lax.optimization_barrier(t)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def weight_dot(
  x: jax.Array,
  w: jax.Array,
  num_in: int = 1,
  preferred_element_type=None,
) -> jax.Array:
  """``tensordot(x, w, num_in)``: activations times a weight, fast to differentiate.

  ``x`` is ``batch... x in...`` and ``w`` is ``in... x out...`` (the last
  ``num_in`` axes of ``x`` contract with the first ``num_in`` of ``w``).
  The value is exactly ``jnp.tensordot``'s. Only the form of the weight
  gradient differs: JAX transposes the product into
  ``transpose(dot_general(dy, x))`` (contracting the batch axes), which
  XLA:CPU folds into one matmul whose left operand is read transposed; its
  YNNPACK matmul kernels do not take that form, so it falls back to a
  generic kernel at about half the speed of the forward matmul
  (benchmarks/bench_weight_grad.py). Here the weight's tangent enters as
  ``optimization_barrier(w_dot^T)``, so the reverse pass computes
  ``dot_general(dy, x) -> out x in`` as a plain row-major product (one copy
  of ``dy`` to ``out x tokens``), and only then the small ``in x out``
  transpose. Forward mode, ``vmap``, remat and higher derivatives are
  unchanged (the rule is ordinary differentiable JAX).

  Args:
    x: activations, ``batch... x in...``.
    w: the weight, ``in... x out...``.
    num_in: how many axes contract.
    preferred_element_type: the product's dtype (as in ``jnp.einsum``).

  Returns:
    ``batch... x out...``.
  """
  return jnp.tensordot(
    x, w, axes=num_in, preferred_element_type=preferred_element_type
  )


def _weight_dot_jvp(num_in, preferred_element_type, primals, tangents):
  x, w = primals
  x_dot, w_dot = tangents
  # The primal as a plain dot_general (not a nested call of this function),
  # so remat policies that save dots see it.
  y = jnp.tensordot(
    x, w, axes=num_in, preferred_element_type=preferred_element_type
  )
  terms = []
  # Symbolic zeros stay symbolic: a frozen weight (stop_gradient, LISA's
  # inactive blocks) or a constant input adds no matmul at all.
  if not isinstance(x_dot, SymbolicZero):
    terms.append(
      jnp.tensordot(
        x_dot, w, axes=num_in, preferred_element_type=preferred_element_type
      )
    )
  if not isinstance(w_dot, SymbolicZero):
    # w_dot as out... x in..., behind a barrier: its cotangent (the weight
    # gradient) is then produced as out x in by a row-major matmul and
    # transposed after the barrier, which XLA cannot fold into the matmul.
    n_out = w.ndim - num_in
    perm = tuple(range(num_in, w.ndim)) + tuple(range(num_in))
    w_dot_T = jax.lax.optimization_barrier(jnp.transpose(w_dot, perm))
    x_axes = tuple(range(x.ndim - num_in, x.ndim))
    w_axes = tuple(range(n_out, w.ndim))
    terms.append(
      jax.lax.dot_general(
        x,
        w_dot_T,
        ((x_axes, w_axes), ((), ())),
        preferred_element_type=preferred_element_type,
      )
    )
  # JAX calls the rule only when some tangent is nonzero, so terms is not
  # empty.
  return y, sum(terms[1:], terms[0]).astype(y.dtype)


weight_dot.defjvp(_weight_dot_jvp, symbolic_zeros=True)


def _weight_product(
  x: jax.Array, w: jax.Array, num_in: int, use_weight_dot: bool
) -> jax.Array:
  """``tensordot(x, w, num_in)``, through :func:`weight_dot` if asked."""
  if use_weight_dot:
    return weight_dot(x, w, num_in)
  return jnp.tensordot(x, w, axes=num_in)


def _dense_kwargs(cfg: ModelConfig, rngs: nnx.Rngs) -> dict:
  """The :class:`Dense` arguments every layer of ``cfg`` shares."""
  return dict(
    use_bias=cfg.use_bias,
    dtype=_DTYPES[cfg.dtype],
    param_dtype=_DTYPES[cfg.param_dtype],
    rngs=rngs,
    weight_dot=cfg.weight_dot,
  )


def _lead(v: jax.Array, ndim: int) -> jax.Array:
  """Adds leading unit axes so ``v`` broadcasts against rank ``ndim``."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _param(
  key: jax.Array | None,
  shape: Sequence[int],
  names: tuple[str | None, ...],
  dtype: jnp.dtype,
  *,
  std: float | None = None,
  fill: float = 0.0,
) -> nnx.Param:
  """A parameter: normal(0, std) if ``std`` else constant ``fill``."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match shape {shape}")
  if std is None:
    value = jnp.full(shape, fill, dtype)
  else:
    value = std * jax.random.normal(key, shape, dtype)
  return nnx.Param(value, out_sharding=names)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32 (GPT-2's ``ln_*``)."""

  def __init__(self, d: int, *, eps: float, dtype, param_dtype):
    self.scale = _param(None, (d,), ("norm",), param_dtype, fill=1.0)
    self.bias = _param(None, (d,), ("norm",), param_dtype, fill=0.0)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    scale = _lead(self.scale[...].astype(jnp.float32), y.ndim)
    y = y * scale + _lead(self.bias[...].astype(jnp.float32), y.ndim)
    return y.astype(self.dtype)


class Dense(nnx.Module):
  """``y = x . kernel + bias`` contracting the last ``len(in_shape)`` axes.

  The kernel has shape ``in_shape + out_shape`` (e.g. D x H x Dh for the
  query projection), the bias ``out_shape``.
  """

  def __init__(
    self,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    in_names: tuple[str, ...],
    out_names: tuple[str, ...],
    *,
    std: float,
    use_bias: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    bias_names: tuple[str, ...] | None = None,
    weight_dot: bool = False,
  ):
    self.kernel = _param(
      rngs.params(),
      in_shape + out_shape,
      in_names + out_names,
      param_dtype,
      std=std,
    )
    self.bias = (
      _param(None, out_shape, bias_names or out_names, param_dtype)
      if use_bias
      else None
    )
    self.num_in = len(in_shape)
    self.dtype = dtype
    self.use_weight_dot = weight_dot

  def __call__(self, x: jax.Array) -> jax.Array:
    y = _weight_product(
      x.astype(self.dtype),
      self.kernel[...].astype(self.dtype),
      self.num_in,
      self.use_weight_dot,
    )
    if self.bias is not None:
      y = y + _lead(self.bias[...].astype(self.dtype), y.ndim)
    return y


def _dropout(
  x: jax.Array, rate: float, key: jax.Array | None, salt: int
) -> jax.Array:
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(
    jax.random.fold_in(key, salt), 1.0 - rate, x.shape
  )
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention (GPT-2's ``attn``: c_attn, c_proj)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
    kw = _dense_kwargs(cfg, rngs)
    qkv = dict(
      in_shape=(d,),
      out_shape=(h, dh),
      in_names=("embed",),
      out_names=("heads", "kv"),
      std=cfg.init_std,
      **kw,
    )
    self.query = Dense(**qkv)
    self.key = Dense(**qkv)
    self.value = Dense(**qkv)
    self.out = Dense(
      (h, dh),
      (d,),
      ("heads", "kv"),
      ("embed",),
      std=cfg.init_std / math.sqrt(2 * cfg.num_layers),
      bias_names=("norm",),
      **kw,
    )

  def __call__(
    self, x_BxLxD: jax.Array, mask_Bx1xLxL: jax.Array | None
  ) -> jax.Array:
    q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh = self._qkv(x_BxLxD)
    y_BxLxHxDh = attend(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, mask_Bx1xLxL)
    return self.out(y_BxLxHxDh)

  def _qkv(self, x_BxLxD: jax.Array):
    """Query, key and value from one matmul against the stacked kernels.

    One ``D x (3 H Dh)`` product instead of three ``D x (H Dh)`` ones (fewer,
    larger matmuls; one input gradient instead of three summed). Stacking
    along a new axis keeps the head axis, and with it any tensor-parallel
    sharding of the kernels, in place.
    """
    dt = self.query.dtype
    parts = (self.query, self.key, self.value)
    w_Dx3xHxDh = jnp.stack([p.kernel[...].astype(dt) for p in parts], axis=1)
    y_BxLx3xHxDh = _weight_product(
      x_BxLxD.astype(dt), w_Dx3xHxDh, 1, self.query.use_weight_dot
    )
    if self.query.bias is not None:
      b_3xHxDh = jnp.stack([p.bias[...].astype(dt) for p in parts])
      y_BxLx3xHxDh = y_BxLx3xHxDh + b_3xHxDh[None, None]
    return tuple(y_BxLx3xHxDh[:, :, j] for j in range(3))


def attend(
  q_BxLxHxDh: jax.Array,
  k_BxLxHxDh: jax.Array,
  v_BxLxHxDh: jax.Array,
  mask_Bx1xLxL: jax.Array | None = None,
) -> jax.Array:
  """Softmax attention, causal unless a mask is given.

  ``softmax(q k^T / sqrt(Dh) + mask) v`` with the scores and the softmax
  in float32 (what ``jax.nn.dot_product_attention``'s XLA path computes,
  written out so that the scores stay in one ``B x H x L x L`` layout).

  Args:
    q_BxLxHxDh: queries.
    k_BxLxHxDh: keys.
    v_BxLxHxDh: values.
    mask_Bx1xLxL: true where query ``l`` may see key ``m``; ``None`` for
      the causal mask.

  Returns:
    y_BxLxHxDh, in the dtype of ``v``.
  """
  length, dh = q_BxLxHxDh.shape[1], q_BxLxHxDh.shape[-1]
  s_BxHxLxL = jnp.einsum(
    "blhd,bmhd->bhlm",
    q_BxLxHxDh,
    k_BxLxHxDh,
    preferred_element_type=jnp.float32,
  )
  s_BxHxLxL = s_BxHxLxL * jnp.float32(1.0 / math.sqrt(dh))
  if mask_Bx1xLxL is None:
    mask_Bx1xLxL = jnp.tril(jnp.ones((length, length), bool))[None, None]
  s_BxHxLxL = jnp.where(mask_Bx1xLxL, s_BxHxLxL, _MASKED)
  p_BxHxLxL = jax.nn.softmax(s_BxHxLxL, axis=-1).astype(v_BxLxHxDh.dtype)
  return jnp.einsum("bhlm,bmhd->blhd", p_BxHxLxL, v_BxLxHxDh)


# What masked scores become: very negative but finite (exp underflows to 0
# and a fully masked row stays finite), as in jax.nn.dot_product_attention.
_MASKED = float(-0.7 * jnp.finfo(jnp.float32).max)


class MLP(nnx.Module):
  """GPT-2's ``mlp``: ``c_proj(gelu_tanh(c_fc(x)))``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = _dense_kwargs(cfg, rngs)
    self.fc = Dense(
      (cfg.d_model,),
      (cfg.d_mlp,),
      ("embed",),
      ("mlp",),
      std=cfg.init_std,
      **kw,
    )
    self.proj = Dense(
      (cfg.d_mlp,),
      (cfg.d_model,),
      ("mlp",),
      ("embed",),
      std=cfg.init_std / math.sqrt(2 * cfg.num_layers),
      bias_names=("norm",),
      **kw,
    )

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    return self.proj(jax.nn.gelu(self.fc(x_BxLxD), approximate=True))


class Block(nnx.Module):
  """One pre-LayerNorm transformer block (GPT-2's ``h.{i}``)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    ln = dict(eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt)
    self.ln_1 = LayerNorm(cfg.d_model, **ln)
    self.attn = Attention(cfg, rngs=rngs)
    self.ln_2 = LayerNorm(cfg.d_model, **ln)
    self.mlp = MLP(cfg, rngs=rngs)
    self.dropout = cfg.dropout
    self.barrier = cfg.grad_barrier

  def __call__(
    self,
    x_BxLxD: jax.Array,
    mask_Bx1xLxL: jax.Array | None,
    key: jax.Array | None,
  ) -> jax.Array:
    # The barriers sit where the residual stream branches: the gradient
    # arriving there is the sum of the branch's and the skip path's.
    if self.barrier:
      x_BxLxD = grad_barrier(x_BxLxD)
    a = self.attn(self.ln_1(x_BxLxD), mask_Bx1xLxL)
    x_BxLxD = x_BxLxD + _dropout(a, self.dropout, key, 0)
    if self.barrier:
      x_BxLxD = grad_barrier(x_BxLxD)
    m = self.mlp(self.ln_2(x_BxLxD))
    return x_BxLxD + _dropout(m, self.dropout, key, 1)


def _block_call(block, x, mask, key):
  return block(x, mask, key)


_REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_fn(cfg: ModelConfig, *, in_scan: bool):
  """``(block, x, mask, key) -> x``, rematerialised as ``cfg.remat`` says.

  Functional ``jax.checkpoint`` over the block's split state (not
  ``nnx.remat``, which writes variables back into the module and so fails
  when the model was built outside the current trace, e.g. a model closed
  over by ``jax.vmap`` for per-example losses). Inside ``lax.scan`` CSE
  cannot hoist the recomputation, so ``prevent_cse`` (extra barriers) is
  off there, as the ``jax.checkpoint`` docs advise.
  """
  if cfg.remat == "none":
    return _block_call
  policy = _REMAT_POLICIES[cfg.remat]

  def call(block, x, mask, key):
    graphdef, state = nnx.split(block)

    def run(state, x, mask, key):
      return nnx.merge(graphdef, state)(x, mask, key)

    return jax.checkpoint(run, policy=policy, prevent_cse=not in_scan)(
      state, x, mask, key
    )

  return call


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """``num_layers`` blocks as one Block with a leading (replicated) axis."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(
    in_axes=(0,),
    out_axes=0,
    # The layer axis gets no logical name (None): it is never sharded, and
    # the rules table needs no entry for it.
    transform_metadata={nnx.PARTITION_NAME: None},
  )
  def make(rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs=rngs)

  return make(rngs)


def stack_layers(model: Transformer) -> Transformer:
  """The same network with ``scan_layers=True``: blocks stacked on axis 0.

  Layer ``i`` of the result holds exactly the parameters of
  ``model.blocks[i]``; everything else is shared. Use it to load per-layer
  checkpoints (GPT-2) into a scanned model, or to compare the two layouts.

  Raises:
    ValueError: ``model`` is already scanned.
  """
  cfg = model.cfg
  if cfg.scan_layers:
    raise ValueError("stack_layers: the model already has scan_layers=True")
  new_cfg = dataclasses.replace(cfg, scan_layers=True)
  out = nnx.eval_shape(lambda: Transformer(new_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(out)
  src = nnx.state(model)
  flat = dict(nnx.to_flat_state(state))
  for path, var in nnx.to_flat_state(src):
    if path[0] == "blocks":
      continue
    flat[path] = flat[path].replace(var.get_value())
  per_layer = [nnx.state(b) for b in model.blocks]
  for path, _ in nnx.to_flat_state(nnx.state(out.blocks)):
    values = [dict(nnx.to_flat_state(s))[path].get_value() for s in per_layer]
    flat[("blocks",) + path] = flat[("blocks",) + path].replace(
      jnp.stack(values)
    )
  state = nnx.from_flat_state(list(flat.items()))
  return nnx.merge(graphdef, state)


class Transformer(nnx.Module):
  """Decoder-only transformer; ``model(tokens_BxL) -> logits_BxLxV``.

  Args:
    cfg: the architecture (:class:`dataweights.configs.lm.ModelConfig`).
    rngs: ``nnx.Rngs`` with a ``params`` stream (or a default seed).

  Raises:
    ValueError: created inside a mesh (``jax.set_mesh``) without logical
      axis rules; use :func:`dataweights.sharding.create_sharded`.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    eager = _mesh_active()
    if eager and not core_spmd.get_logical_axis_rules():
      raise ValueError(
        "Transformer created inside a mesh without logical axis rules; "
        "create it with dataweights.sharding.create_sharded(...) or inside "
        "nnx.logical_axis_rules(dataweights.sharding.RULES)"
      )
    with nnx.use_eager_sharding(eager):
      self._build(cfg, rngs)

  def _build(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = _DTYPES[cfg.param_dtype]
    self.wte = _param(
      rngs.params(),
      (cfg.vocab_size, cfg.d_model),
      ("vocab", "embed"),
      pdt,
      std=cfg.init_std,
    )
    self.wpe = _param(
      rngs.params(),
      (cfg.max_len, cfg.d_model),
      ("length", "embed"),
      pdt,
      std=cfg.init_std / 2,
    )
    if cfg.scan_layers:
      self.blocks = _stacked_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List(
        [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
      )
    self.ln_f = LayerNorm(
      cfg.d_model,
      eps=cfg.layer_norm_eps,
      dtype=_DTYPES[cfg.dtype],
      param_dtype=pdt,
    )
    self.head = (
      None
      if cfg.tie_embeddings
      else _param(
        rngs.params(),
        (cfg.d_model, cfg.vocab_size),
        ("embed", "vocab"),
        pdt,
        std=cfg.init_std,
      )
    )

  def __call__(
    self,
    tokens_BxL: jax.Array,
    *,
    mask_BxL: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
  ) -> jax.Array:
    """Next-token logits.

    Args:
      tokens_BxL: integer token ids in ``[0, vocab_size)``; ``L <= max_len``.
      mask_BxL: optional padding mask, true (or 1) at real tokens. Keys at
        padded positions are hidden from every query (a padded query still
        sees itself, so no softmax row is empty); logits at padded positions
        are meaningless and should be masked out of the loss.
      dropout_key: PRNG key enabling dropout (if ``cfg.dropout > 0``);
        ``None`` evaluates deterministically.

    Returns:
      logits_BxLxV in float32, whatever the compute dtype.

    Raises:
      ValueError: wrong rank, empty sequence, or sequence longer than
        ``max_len``.
      TokenIdError: a non-integer id array, or an id outside
        ``[0, vocab_size)`` (under ``jit``: when the computation runs, see
        :mod:`dataweights.models.ids`).
    """
    cfg = self.cfg
    if not hasattr(tokens_BxL, "ndim"):
      tokens_BxL = np.asarray(tokens_BxL)
    if tokens_BxL.ndim != 2 or tokens_BxL.shape[1] == 0:
      raise ValueError(
        "tokens_BxL must have shape (batch, length) with length >= 1; got "
        f"{tokens_BxL.shape}"
      )
    check_token_ids(tokens_BxL, cfg.vocab_size, "tokens_BxL")
    length = tokens_BxL.shape[1]
    if length > cfg.max_len:
      raise ValueError(
        f"sequence length {length} exceeds ModelConfig.max_len = {cfg.max_len}"
      )
    dt = _DTYPES[cfg.dtype]
    mask_Bx1xLxL = None
    if mask_BxL is not None:
      if mask_BxL.shape != tokens_BxL.shape:
        raise ValueError(
          f"mask shape {mask_BxL.shape} != tokens shape {tokens_BxL.shape}"
        )
      causal_LxL = jnp.tril(jnp.ones((length, length), bool))
      eye_LxL = jnp.eye(length, dtype=bool)
      keys_Bx1x1xL = mask_BxL.astype(bool)[:, None, None, :]
      mask_Bx1xLxL = causal_LxL[None, None] & (
        keys_Bx1x1xL | eye_LxL[None, None]
      )

    x_BxLxD = jnp.take(self.wte[...], tokens_BxL, axis=0).astype(dt)
    x_BxLxD = x_BxLxD + self.wpe[...][None, :length].astype(dt)
    if dropout_key is not None:
      embed_key = jax.random.fold_in(dropout_key, cfg.num_layers)
      x_BxLxD = _dropout(x_BxLxD, cfg.dropout, embed_key, 0)
    x_BxLxD = _constrain_batch(x_BxLxD)
    if cfg.scan_layers:
      x_BxLxD = self._scan_blocks(x_BxLxD, mask_Bx1xLxL, dropout_key)
    else:
      call = _block_fn(cfg, in_scan=False)
      for i, block in enumerate(self.blocks):
        key = (
          None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        )
        x_BxLxD = _constrain_batch(call(block, x_BxLxD, mask_Bx1xLxL, key))
    x_BxLxD = self.ln_f(x_BxLxD)
    if cfg.weight_dot:
      w_DxV = (
        self.wte[...].astype(dt).T
        if self.head is None
        else self.head[...].astype(dt)
      )
      logits = weight_dot(x_BxLxD, w_DxV, 1, jnp.float32)
    elif self.head is None:
      logits = jnp.einsum(
        "bld,vd->blv",
        x_BxLxD,
        self.wte[...].astype(dt),
        preferred_element_type=jnp.float32,
      )
    else:
      logits = jnp.einsum(
        "bld,dv->blv",
        x_BxLxD,
        self.head[...].astype(dt),
        preferred_element_type=jnp.float32,
      )
    return logits.astype(jnp.float32)

  def _scan_blocks(self, x_BxLxD, mask_Bx1xLxL, dropout_key):
    """The stacked blocks applied in order by one ``lax.scan``.

    Layer ``i`` draws dropout from ``fold_in(dropout_key, i)``, as in the
    unrolled loop, so both layouts compute the same function.
    """
    call = _block_fn(self.cfg, in_scan=True)
    graphdef, stacked = nnx.split(self.blocks)

    def body(x, inputs):
      state, i = inputs
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      block = nnx.merge(graphdef, state)
      return _constrain_batch(call(block, x, mask_Bx1xLxL, key)), None

    layers = jnp.arange(self.cfg.num_layers)
    x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, (stacked, layers))
    return x_BxLxD


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The :class:`Transformer` of ``cfg`` with shapes only (nothing allocated).

  For checks that need parameter shapes and logical axes, e.g.
  :func:`dataweights.sharding.check_divisible`.
  """
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def per_token_loss(
  logits_BxLxV: jax.Array,
  targets_BxL: jax.Array,
  mask_BxL: jax.Array | None = None,
  *,
  fused: bool = False,
) -> jax.Array:
  """Cross-entropy ``-log softmax(logits)[target]`` per token, 0 where masked.

  Args:
    logits_BxLxV: unnormalised log-probabilities.
    targets_BxL: integer ids in ``[0, V)``.
    mask_BxL: optional weights (1 = count the token, 0 = ignore).
    fused: use :func:`token_xent` (the same function with a hand-written,
      leaner backward pass; equal up to float rounding). Off by default so
      that published results keep their exact numerics.

  Returns:
    loss_BxL in float32 (nats).

  Raises:
    TokenIdError: a target outside ``[0, V)`` (see
      :mod:`dataweights.models.ids`).
  """
  check_token_ids(targets_BxL, logits_BxLxV.shape[-1], "targets_BxL")
  if fused:
    loss_BxL = token_xent(logits_BxLxV, targets_BxL)
  else:
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    loss_BxL = -jnp.take_along_axis(
      logp_BxLxV, targets_BxL[..., None].astype(jnp.int32), axis=-1
    )[..., 0]
  if mask_BxL is not None:
    loss_BxL = loss_BxL * mask_BxL.astype(jnp.float32)
  return loss_BxL


@jax.custom_vjp
def token_xent(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """``logsumexp(logits) - logits[target]`` per token, with a lean gradient.

  The same function as ``-log_softmax(logits)[target]`` (equal up to float
  rounding: tests/test_transformer.py), with a hand-written backward pass
  ``g * (softmax(logits) - onehot(target))`` computed in one elementwise
  pass from the saved logits and log-normaliser. Autodiff of
  :func:`jax.nn.log_softmax` followed by a gather leaves the fusion of the
  backward to XLA, which may keep several ``(B, L, V)`` buffers alive at
  once (the log-probabilities, their exponential, a zero-filled scatter
  target for the gather's transpose, and copies); here the backward holds
  the logits and one ``(B, L, V)`` gradient. With GPT-2's vocabulary of
  50,257 every such buffer is 206 MB per 1,024-token row in float32
  (benchmarks/bench_scalebio.py --part memory).

  Args:
    logits_BxLxV: unnormalised log-probabilities (any float dtype; the
      loss is computed in float32, or float64 for float64 logits).
    targets_BxL: integer ids in ``[0, V)`` (not checked here).

  Returns:
    loss_BxL, float32 nats (float64 for float64 logits).
  """
  return _token_xent_fwd(logits_BxLxV, targets_BxL)[0]


def _xent_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)  # bf16 -> f32, f64 stays


def _token_xent_fwd(logits_BxLxV, targets_BxL):
  x = logits_BxLxV.astype(_xent_dtype(logits_BxLxV.dtype))
  lse_BxL = jax.nn.logsumexp(x, axis=-1)
  tgt_BxL = jnp.take_along_axis(
    x, targets_BxL[..., None].astype(jnp.int32), axis=-1
  )[..., 0]
  return lse_BxL - tgt_BxL, (logits_BxLxV, lse_BxL, targets_BxL)


def _token_xent_bwd(res, g_BxL):
  logits_BxLxV, lse_BxL, targets_BxL = res
  x = logits_BxLxV.astype(_xent_dtype(logits_BxLxV.dtype))
  vocab = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  onehot = vocab == targets_BxL[..., None].astype(jnp.int32)
  d = (jnp.exp(x - lse_BxL[..., None]) - onehot) * g_BxL[..., None]
  return d.astype(logits_BxLxV.dtype), None


token_xent.defvjp(_token_xent_fwd, _token_xent_bwd)


def per_example_loss(
  logits_BxLxV: jax.Array,
  targets_BxL: jax.Array,
  mask_BxL: jax.Array | None = None,
  *,
  fused: bool = False,
) -> jax.Array:
  """Mean cross-entropy over each example's unmasked tokens.

  ``mask_BxL`` weights the targets as given (aligned with ``targets_BxL``);
  for next-token prediction under padding build it with
  :func:`next_token_mask`. An example with no unmasked token gets loss 0
  (safe denominator).

  Returns:
    loss_B in float32 (nats per token).
  """
  loss_BxL = per_token_loss(logits_BxLxV, targets_BxL, mask_BxL, fused=fused)
  if mask_BxL is None:
    return loss_BxL.mean(-1)
  count_B = mask_BxL.astype(jnp.float32).sum(-1)
  return loss_BxL.sum(-1) / jnp.maximum(count_B, 1.0)


def next_token_mask(mask_BxL: jax.Array) -> jax.Array:
  """Weights of the ``L - 1`` next-token predictions of a padded batch.

  Prediction ``t`` reads position ``t`` and predicts token ``t + 1``; it
  counts only when both are real tokens: ``mask[:, 1:] * (mask[:, :-1] !=
  0)``. Under left padding this drops the prediction of the first real
  token from a pad position (``mask[:, 1:]`` alone would count it); under
  right padding it equals ``mask[:, 1:]``.

  Args:
    mask_BxL: padding mask or weights (non-zero at real tokens).

  Returns:
    float32 weights, shape ``(B, L - 1)``.
  """
  mask_BxL = jnp.asarray(mask_BxL)
  real_in_BxL1 = (mask_BxL[:, :-1] != 0).astype(jnp.float32)
  return mask_BxL[:, 1:].astype(jnp.float32) * real_in_BxL1


def next_token_loss(
  model: Transformer,
  tokens_BxL: jax.Array,
  mask_BxL: jax.Array | None = None,
  *,
  dropout_key: jax.Array | None = None,
) -> jax.Array:
  """Per-example language-modelling loss: predict ``tokens[:, 1:]``.

  The model reads ``tokens[:, :-1]`` (attending only to real tokens when a
  mask is given); the loss averages over the predictions whose input and
  target are both real tokens (:func:`next_token_mask`), so a left- or
  right-padded sequence has the loss of its unpadded tokens (up to the
  positions of the learned position embedding).

  Args:
    model: the transformer.
    tokens_BxL: token ids in ``[0, vocab_size)``, ``L - 1 <= max_len``.
    mask_BxL: optional padding mask (true at real tokens).
    dropout_key: optional key enabling dropout.

  Returns:
    loss_B, mean nats per predicted token of each example.
  """
  inputs_BxL = tokens_BxL[:, :-1]
  targets_BxL = tokens_BxL[:, 1:]
  in_mask = None if mask_BxL is None else mask_BxL[:, :-1]
  logits_BxLxV = model(inputs_BxL, mask_BxL=in_mask, dropout_key=dropout_key)
  tgt_mask = None if mask_BxL is None else next_token_mask(mask_BxL)
  return per_example_loss(logits_BxLxV, targets_BxL, tgt_mask)
