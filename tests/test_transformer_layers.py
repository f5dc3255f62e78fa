"""Residual-gradient barrier, remat policies and scan over layers.

The barrier is checked on the compiled program (the fusions XLA builds must
not grow with depth), not by timing; every option is checked to compute
the same function and gradient as the plain unrolled model, and the
gradient itself against forward mode and finite differences.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights import sharding
from dataweights.configs import lm
from dataweights.configs.base import ConfigError
from dataweights.models import gpt2
from dataweights.models import transformer as tr

CFG = lm.lm_model(
  "smoke", num_layers=3, d_model=32, num_heads=4, d_mlp=64, remat="none"
)
B, L = 2, 16


def _tokens(cfg=CFG, seed=0, shape=(B, L + 1)):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


def _loss_and_params(cfg, seed=0):
  graphdef, params = nnx.split(
    tr.Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param
  )

  def loss(p, tokens, key=None):
    model = nnx.merge(graphdef, p)
    return tr.next_token_loss(model, tokens, dropout_key=key).mean()

  return loss, params


def max_fusion_inputs(hlo_text: str) -> int:
  """The most parameters of any fused computation in optimized HLO text.

  A fusion that recomputes a chain of elementwise ops, instead of reading
  its result from memory, takes every input of the chain as a parameter.
  """
  counts = [
    len(re.findall(r" parameter\(\d+\)", chunk))
    for chunk in re.split(r"\n(?=\S)", hlo_text)
    if re.match(r"^%?fused_computation", chunk)
  ]
  return max(counts)


def _grad_fusion_inputs(cfg) -> int:
  loss, params = _loss_and_params(cfg)
  tokens = _tokens(cfg)
  compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
  return max_fusion_inputs(compiled.as_text())


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full", "dots_no_batch"])
def test_backward_fusions_do_not_grow_with_depth(remat):
  """The residual gradient is materialised, not recomputed per consumer.

  Without the barrier XLA:CPU fuses the residual stream's backward chain
  (LayerNorm backward and residual adds of every later layer) into each
  consumer, so the largest fusion's input count grows with depth (checked
  below, so that this test can fail); with it the count stays flat.
  """
  shallow = dataclasses.replace(CFG, num_layers=2, remat=remat)
  deep = dataclasses.replace(CFG, num_layers=12, remat=remat)
  n2, n12 = _grad_fusion_inputs(shallow), _grad_fusion_inputs(deep)
  assert n12 == n2, (n2, n12)
  assert n12 <= 24, n12
  if remat == "none":
    # The duplication the barrier removes (2 -> 6 layers: 48 -> 121 inputs
    # with jax 0.12; 12 layers: 230). If XLA ever stops duplicating, this
    # fails and the barrier can be reconsidered.
    off = dataclasses.replace(shallow, grad_barrier=False)
    off2 = _grad_fusion_inputs(off)
    off6 = _grad_fusion_inputs(dataclasses.replace(off, num_layers=6))
    assert off6 > 2 * off2 > 2 * n2, (off2, off6, n2)


def test_gradient_with_barrier_equals_without_and_forward_mode():
  loss_on, params = _loss_and_params(CFG)
  loss_off, _ = _loss_and_params(dataclasses.replace(CFG, grad_barrier=False))
  tokens = _tokens()
  g_on = jax.jit(jax.grad(loss_on))(params, tokens)
  g_off = jax.jit(jax.grad(loss_off))(params, tokens)
  # Same function; XLA may fuse (hence sum) in another order: float32
  # rounding only (measured: at most 1.3e-6 relative, on an entry that is a
  # sum of cancelling terms; bitwise equal at the book shape).
  for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  # forward mode goes through the barrier's tangent rule: <grad, v> = jvp
  v = jax.tree.map(
    lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params
  )
  _, jvp = jax.jit(
    lambda p, t: jax.jvp(lambda q: loss_on(q, tokens), (p,), (t,))
  )(params, v)
  dot = sum(
    jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(v))
  )
  np.testing.assert_allclose(jvp, dot, rtol=1e-4)


def test_gradient_matches_finite_differences():
  """Central differences along each parameter's own gradient direction.

  For every parameter array ``p_i`` with gradient ``g_i``, the directional
  derivative along ``g_i / |g_i|`` must be ``|g_i|``. Float32 central
  differences with step 3e-3: truncation error ~5e-4 relative at most here
  (rtol 2e-3) plus the rounding of the loss, ~|loss| 2^-23 / step ~ 1e-4
  absolute (atol 2e-4). The key
  biases get exactly zero gradient (softmax ignores a per-query constant),
  a closed-form check.
  """
  loss, params = _loss_and_params(CFG, seed=1)
  tokens = _tokens(seed=1)
  f = jax.jit(loss)
  g = jax.jit(jax.grad(loss))(params, tokens)
  eps = 3e-3
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(g)
  p_leaves = jax.tree.leaves(params)
  checked = 0
  for i, (path, g_i) in enumerate(with_paths):
    name = jax.tree_util.keystr(path)
    norm = float(jnp.linalg.norm(g_i.ravel()))
    if "'key'" in name and "'bias'" in name:
      assert norm < 1e-6, (name, norm)
      continue
    assert norm > 1e-6, name

    def shifted(s, i=i, u=g_i / norm):
      leaves = list(p_leaves)
      leaves[i] = leaves[i] + s * eps * u
      return jax.tree.unflatten(treedef, leaves)

    fd = (f(shifted(1.0), tokens) - f(shifted(-1.0), tokens)) / (2 * eps)
    np.testing.assert_allclose(fd, norm, rtol=2e-3, atol=2e-4, err_msg=name)
    checked += 1
  assert checked == len(with_paths) - CFG.num_layers


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_same_gradient(remat):
  loss, params = _loss_and_params(CFG)
  loss_r, params_r = _loss_and_params(dataclasses.replace(CFG, remat=remat))
  tokens = _tokens()
  g = jax.jit(jax.grad(loss))(params, tokens)
  g_r = jax.jit(jax.grad(loss_r))(params_r, tokens)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _stacked_grads(grads_unrolled):
  """Per-layer gradients of the unrolled model stacked like a scanned one."""
  blocks = grads_unrolled["blocks"]
  layers = [blocks[i] for i in sorted(blocks)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "dots_no_batch"])
def test_scan_equals_unrolled(remat):
  cfg = dataclasses.replace(CFG, remat=remat, dropout=0.1)
  unrolled = tr.Transformer(cfg, rngs=nnx.Rngs(0))
  scanned = tr.stack_layers(unrolled)
  assert scanned.cfg.scan_layers and scanned.cfg.remat == remat
  tokens = _tokens()
  key = jax.random.key(5)
  for k in (None, key):  # deterministic, and dropout drawn per layer alike
    a = nnx.jit(lambda m, t, k=k: m(t, dropout_key=k))(unrolled, tokens)
    b = nnx.jit(lambda m, t, k=k: m(t, dropout_key=k))(scanned, tokens)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  grad = nnx.jit(
    lambda m, t: nnx.state(
      nnx.grad(lambda m: tr.next_token_loss(m, t, dropout_key=key).mean())(m),
      nnx.Param,
    )
  )
  g_u = nnx.to_pure_dict(grad(unrolled, tokens))
  g_s = nnx.to_pure_dict(grad(scanned, tokens))
  want = dict(g_u, blocks=_stacked_grads(g_u))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  flat_got = dict(jax.tree_util.tree_leaves_with_path(g_s))
  assert flat_want.keys() == flat_got.keys()
  for path, w in flat_want.items():
    np.testing.assert_allclose(
      flat_got[path], w, rtol=1e-4, atol=1e-6, err_msg=str(path)
    )


def test_scanned_params_have_a_layers_axis_and_partition_specs():
  cfg = dataclasses.replace(CFG, scan_layers=True)
  model = tr.Transformer(cfg, rngs=nnx.Rngs(0))
  kernel = model.blocks.attn.query.kernel
  assert kernel.shape == (3, 32, 4, 8)
  assert kernel.out_sharding == (None, "embed", "heads", "kv")
  specs = dict(nnx.to_flat_state(sharding.partition_specs(model)))
  spec = specs[("blocks", "attn", "query", "kernel")].get_value()
  assert tuple(spec) == (None, "fsdp", "model", None)
  # same parameter count as the unrolled layout
  n = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n(model) == n(tr.Transformer(CFG, rngs=nnx.Rngs(0)))


def test_gpt2_tensors_load_into_a_scanned_model():
  rng = np.random.default_rng(0)
  cfg = lm.lm_model(
    "smoke",
    vocab_size=50,
    max_len=16,
    num_layers=2,
    d_model=16,
    num_heads=2,
    d_mlp=64,
  )
  unrolled = tr.Transformer(cfg, rngs=nnx.Rngs(0))
  # GPT-2 tensors made from a model, so the two loads can be compared
  tensors = {}
  for i, blk in enumerate(unrolled.blocks):
    a = blk.attn
    w = lambda d: np.asarray(d.kernel[...])
    bb = lambda d: np.asarray(d.bias[...])
    tensors.update(
      {
        f"h.{i}.ln_1.weight": np.asarray(blk.ln_1.scale[...])
        + rng.normal(size=16).astype(np.float32),
        f"h.{i}.ln_1.bias": np.asarray(blk.ln_1.bias[...]),
        f"h.{i}.ln_2.weight": np.asarray(blk.ln_2.scale[...]),
        f"h.{i}.ln_2.bias": np.asarray(blk.ln_2.bias[...]) + 0.1,
        f"h.{i}.attn.c_attn.weight": np.concatenate(
          [
            w(a.query).reshape(16, 16),
            w(a.key).reshape(16, 16),
            w(a.value).reshape(16, 16),
          ],
          1,
        ),
        f"h.{i}.attn.c_attn.bias": np.concatenate(
          [
            bb(a.query).reshape(16),
            bb(a.key).reshape(16),
            bb(a.value).reshape(16),
          ]
        )
        + 0.1,
        f"h.{i}.attn.c_proj.weight": w(a.out).reshape(16, 16),
        f"h.{i}.attn.c_proj.bias": bb(a.out),
        f"h.{i}.mlp.c_fc.weight": w(blk.mlp.fc),
        f"h.{i}.mlp.c_fc.bias": bb(blk.mlp.fc),
        f"h.{i}.mlp.c_proj.weight": w(blk.mlp.proj),
        f"h.{i}.mlp.c_proj.bias": bb(blk.mlp.proj),
      }
    )
  tensors.update(
    {
      "wte.weight": np.asarray(unrolled.wte[...]),
      "wpe.weight": np.asarray(unrolled.wpe[...]),
      "ln_f.weight": np.asarray(unrolled.ln_f.scale[...]),
      "ln_f.bias": np.asarray(unrolled.ln_f.bias[...]),
    }
  )
  plain = gpt2.load_gpt2_tensors(tensors, cfg)
  scanned = gpt2.load_gpt2_tensors(
    tensors, dataclasses.replace(cfg, scan_layers=True)
  )
  assert scanned.cfg.scan_layers
  np.testing.assert_array_equal(
    scanned.blocks.attn.key.bias[...][1], plain.blocks[1].attn.key.bias[...]
  )
  tokens = _tokens(cfg, shape=(2, 16))
  fwd = nnx.jit(lambda m, t: m(t))
  np.testing.assert_allclose(
    fwd(scanned, tokens), fwd(plain, tokens), rtol=1e-5, atol=1e-5
  )


def test_stack_layers_rejects_a_scanned_model():
  scanned = tr.Transformer(
    dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0)
  )
  with pytest.raises(ValueError, match="already has scan_layers=True"):
    tr.stack_layers(scanned)


def test_remat_config_values():
  assert lm.lm_model("smoke", remat=True).remat == "full"
  assert lm.lm_model("smoke", remat=False).remat == "none"
  assert lm.lm_model("smoke").remat == "dots_no_batch"
  with pytest.raises(ConfigError, match="remat = 'some' is invalid"):
    lm.lm_model("smoke", remat="some")
  with pytest.raises(ConfigError, match="scan_layers = 'yes' is invalid"):
    lm.lm_model("smoke", scan_layers="yes")


def test_bfloat16_scanned_remat_model_close_to_float32():
  """The bf16 compute path through scan, remat and the barrier (on CPU)."""
  cfg = dataclasses.replace(CFG, scan_layers=True, remat="dots_no_batch")
  m32 = tr.Transformer(cfg, rngs=nnx.Rngs(0))
  m16 = tr.Transformer(
    dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0)
  )
  tokens = _tokens()
  fwd = nnx.jit(lambda m, t: m(t))
  a, b = fwd(m32, tokens[:, :-1]), fwd(m16, tokens[:, :-1])
  assert b.dtype == jnp.float32
  scale = np.abs(np.asarray(a)).max()
  assert np.abs(np.asarray(a - b)).max() < 0.05 * scale
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  grad = nnx.jit(
    lambda m, t: nnx.state(
      nnx.grad(lambda m: tr.next_token_loss(m, t).mean())(m), nnx.Param
    )
  )
  g16 = jax.tree.leaves(grad(m16, tokens))
  g32 = jax.tree.leaves(grad(m32, tokens))
  assert len(g16) == len(g32)
  for x in g16:
    assert x.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(x)))
  # the bf16 gradient points the same way as the float32 one
  cos = sum(jnp.vdot(x, y) for x, y in zip(g16, g32)) / jnp.sqrt(
    sum(jnp.vdot(x, x) for x in g16) * sum(jnp.vdot(y, y) for y in g32)
  )
  assert cos > 0.99, cos
