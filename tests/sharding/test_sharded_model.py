"""Sharded transformer on 8 fake CPU devices == the single-device model.

Run in its own process (the device count is fixed when JAX starts):
  DATAWEIGHTS_SHARDING_RUN=1 python -m pytest tests/sharding -q
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dataweights import sharding
from dataweights.configs import lm
from dataweights.configs.base import ConfigError
from dataweights.models import gpt2
from dataweights.models import transformer as tr

# 8 heads, widths and vocabulary divisible by 8: every mesh below fits.
CFG = lm.lm_model(
  "smoke", num_layers=1, d_model=32, num_heads=8, d_mlp=64, max_len=16
)
B, L = 8, 16
# Pure data parallelism (replicated parameters) is the trivial case; these
# two cover all three axes and full parameter sharding.
# float32 has 24 mantissa bits (ulp ~ 6e-8 relative): 1e-6 allows ~16 ulp.
INIT_RTOL = 1e-6
MESHES = {
  "fsdp8": lm.MeshConfig(data=1, fsdp=-1),
  "dp2_fsdp2_tp2": lm.MeshConfig(data=2, fsdp=2, model=2),
}


def _replicas(spec, mesh):
  """How many devices hold the same shard under ``spec``."""
  used = {
    a
    for axes in spec
    if axes
    for a in ((axes,) if isinstance(axes, str) else axes)
  }
  return int(np.prod([n for a, n in mesh.shape.items() if a not in used]))


def _factory():
  return tr.Transformer(CFG, rngs=nnx.Rngs(0))


def _loss(model, tokens_BxL, mask_BxL):
  return tr.next_token_loss(model, tokens_BxL, mask_BxL).mean()


@nnx.jit
def _logits_and_grad(model, tokens_BxL, mask_BxL):
  logits = model(tokens_BxL, mask_BxL=mask_BxL)
  grads = nnx.grad(_loss)(model, tokens_BxL, mask_BxL)
  return logits, nnx.state(grads, nnx.Param)


def _assert_grads_close(grads, ref_grads):
  """Every gradient leaf against the single-device one, by key path."""
  flat_ref = dict(nnx.to_flat_state(ref_grads))
  for path, g in nnx.to_flat_state(grads):
    np.testing.assert_allclose(
      np.asarray(g.get_value()),
      np.asarray(flat_ref[path].get_value()),
      atol=1e-6,
      rtol=1e-4,
      err_msg=str(path),
    )


@pytest.fixture(scope="module")
def batch():
  tok = jax.random.randint(jax.random.key(0), (B, L), 0, CFG.vocab_size)
  mask = jnp.ones((B, L), bool).at[1, 9:].set(False)
  return np.asarray(tok), np.asarray(mask)


@pytest.fixture(scope="module")
def reference(batch):
  model = _factory()
  logits, grads = _logits_and_grad(model, *map(jnp.asarray, batch))
  return model, logits, grads


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_equals_single_device(name, batch, reference):
  ref_model, ref_logits, ref_grads = reference
  mesh = sharding.make_mesh(MESHES[name])
  model = sharding.create_sharded(_factory, mesh)
  # parameters are born in their shards, with the rules' specs
  specs = sharding.partition_specs(model)
  for (path, var), (_, spec) in zip(
    nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(specs)
  ):
    arr = var.get_value()
    assert arr.sharding.mesh.shape == mesh.shape, path
    assert arr.sharding.spec == spec.get_value(), path
  wte = model.wte.get_value()
  n_wte = mesh.shape["model"] * mesh.shape["fsdp"]
  assert wte.addressable_shards[0].data.shape == (
    CFG.vocab_size * mesh.shape["fsdp"] // n_wte,
    CFG.d_model // mesh.shape["fsdp"],
  )
  # Same initial values as the unsharded model. The random bits are the same,
  # but the sharded init is another XLA program: on AVX-512 CPUs an element's
  # value depends on whether a loop's vector body or scalar tail computes it,
  # so shards differ from the full array by a few ulp (seen: 1-4 ulp in 36 of
  # 1024 elements). Compare with INIT_RTOL; a wrong key or a transposed shard
  # gives relative differences of order 1.
  for a, b in zip(
    jax.tree.leaves(nnx.state(model, nnx.Param)),
    jax.tree.leaves(nnx.state(ref_model, nnx.Param)),
  ):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=INIT_RTOL, atol=0
    )
  # bytes per device: parameters with an fsdp axis hold 1/fsdp of it
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  on_dev0 = sum(p.addressable_shards[0].data.nbytes for p in params)
  want = sum(
    p.nbytes // (len(p.sharding.device_set) // _replicas(p.sharding.spec, mesh))
    for p in params
  )
  assert on_dev0 == want

  tokens, mask = sharding.shard_batch(batch, mesh)
  assert tokens.sharding.spec == P(("data", "fsdp"), None)
  with jax.set_mesh(mesh):
    logits, grads = _logits_and_grad(model, tokens, mask)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
  _assert_grads_close(grads, ref_grads)


def test_per_example_vmap_under_mesh(batch, reference):
  """vmap over single examples (B=1 inside) works under an FSDP mesh."""
  ref_model = reference[0]
  tok, mask = map(jnp.asarray, batch)
  want = tr.next_token_loss(ref_model, tok, mask)
  mesh = sharding.make_mesh(MESHES["fsdp8"])
  graphdef, state = nnx.split(ref_model)
  with nnx.logical_axis_rules(sharding.RULES):
    state = jax.device_put(state, nnx.get_named_sharding(state, mesh))

  @jax.jit
  def per_example(state, tok, mask):
    model = nnx.merge(graphdef, state)
    one = lambda t, m: tr.next_token_loss(model, t[None], m[None])[0]
    return jax.vmap(one)(tok, mask)

  with jax.set_mesh(mesh):
    got = per_example(state, *sharding.shard_batch((tok, mask), mesh))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _gpt2_tensors(seed=0):
  rng = np.random.default_rng(seed)
  d, f, v, p = CFG.d_model, CFG.d_mlp, CFG.vocab_size, CFG.max_len
  shapes = {
    "wte.weight": (v, d),
    "wpe.weight": (p, d),
    "ln_f.weight": (d,),
    "ln_f.bias": (d,),
  }
  for i in range(CFG.num_layers):
    shapes.update(
      {
        f"h.{i}.ln_1.weight": (d,),
        f"h.{i}.ln_1.bias": (d,),
        f"h.{i}.ln_2.weight": (d,),
        f"h.{i}.ln_2.bias": (d,),
        f"h.{i}.attn.c_attn.weight": (d, 3 * d),
        f"h.{i}.attn.c_attn.bias": (3 * d,),
        f"h.{i}.attn.c_proj.weight": (d, d),
        f"h.{i}.attn.c_proj.bias": (d,),
        f"h.{i}.mlp.c_fc.weight": (d, f),
        f"h.{i}.mlp.c_fc.bias": (f,),
        f"h.{i}.mlp.c_proj.weight": (f, d),
        f"h.{i}.mlp.c_proj.bias": (d,),
      }
    )
  return {
    k: (0.3 * rng.standard_normal(s)).astype(np.float32)
    for k, s in shapes.items()
  }


def test_gpt2_load_into_shards(batch):
  tensors = _gpt2_tensors()
  mesh = sharding.make_mesh(MESHES["dp2_fsdp2_tp2"])
  plain = gpt2.load_gpt2_tensors(tensors, CFG)
  sharded = gpt2.load_gpt2_tensors(tensors, CFG, mesh=mesh)
  kernel = sharded.blocks[0].attn.query.kernel.get_value()
  assert kernel.sharding.spec == P("fsdp", "model", None)
  assert kernel.addressable_shards[0].data.shape == (16, 4, 4)
  tok = jnp.asarray(batch[0])
  fwd = nnx.jit(lambda m, t: m(t))
  want = fwd(plain, tok)
  with jax.set_mesh(mesh):
    got = fwd(sharded, sharding.shard_batch(tok, mesh))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bad_mesh_raises_clear_error():
  mesh = sharding.make_mesh(lm.MeshConfig(data=1, fsdp=1, model=8))
  bad = lm.lm_model("smoke", d_model=32, num_heads=4)
  with pytest.raises(
    ConfigError,
    match=r"key/bias of shape \(4, 8\): dimension 0 \(size 4\).*model",
  ):
    sharding.create_sharded(lambda: tr.Transformer(bad, rngs=nnx.Rngs(0)), mesh)
  with pytest.raises(ConfigError, match="batch size 4 is not divisible"):
    sharding.shard_batch(
      np.zeros((4, L), np.int32), sharding.make_mesh(lm.MeshConfig())
    )
  with pytest.raises(ConfigError, match="needs 4 devices but 8"):
    sharding.make_mesh(lm.MeshConfig(data=2, fsdp=2))


def test_scanned_model_sharded_equals_unrolled_single_device(batch, reference):
  """scan_layers=True under FSDP x TP: born in shards, same logits/grads."""
  import dataclasses

  ref_model, ref_logits, ref_grads = reference
  cfg = dataclasses.replace(CFG, scan_layers=True)
  mesh = sharding.make_mesh(MESHES["dp2_fsdp2_tp2"])
  scanned = tr.stack_layers(ref_model)
  graphdef, state = nnx.split(scanned)
  with nnx.logical_axis_rules(sharding.RULES):
    state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
  model = nnx.merge(graphdef, state)
  kernel = model.blocks.attn.query.kernel.get_value()
  assert kernel.sharding.spec == P(None, "fsdp", "model", None)
  # a scanned model can also be created directly in its shards
  born = sharding.create_sharded(
    lambda: tr.Transformer(cfg, rngs=nnx.Rngs(0)), mesh
  )
  assert born.blocks.mlp.fc.kernel.get_value().sharding.spec == P(
    None, "fsdp", "model"
  )
  tokens, mask = sharding.shard_batch(batch, mesh)
  with jax.set_mesh(mesh):
    logits, grads = _logits_and_grad(model, tokens, mask)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
  g = nnx.to_pure_dict(grads)
  want = nnx.to_pure_dict(ref_grads)
  np.testing.assert_allclose(
    g["blocks"]["mlp"]["fc"]["kernel"][0],
    want["blocks"][0]["mlp"]["fc"]["kernel"],
    atol=1e-6,
    rtol=1e-4,
  )
  np.testing.assert_allclose(g["wte"], want["wte"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", list(MESHES))
def test_weight_dot_sharded_equals_single_device_default(
  name, batch, reference
):
  """ModelConfig.weight_dot under each mesh: the barrier on the weight's
  tangent must not change the sharded gradient (same tolerance as above,
  against the single-device model without the rule)."""
  _, ref_logits, ref_grads = reference
  cfg = dataclasses.replace(CFG, weight_dot=True)
  mesh = sharding.make_mesh(MESHES[name])
  model = sharding.create_sharded(
    lambda: tr.Transformer(cfg, rngs=nnx.Rngs(0)), mesh
  )
  tokens, mask = sharding.shard_batch(batch, mesh)
  with jax.set_mesh(mesh):
    logits, grads = _logits_and_grad(model, tokens, mask)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
  flat_g = nnx.to_flat_state(grads)
  assert len(flat_g) == len(nnx.to_flat_state(ref_grads))
  for path, g in flat_g:
    assert g.get_value().sharding.mesh.shape == mesh.shape, path
  _assert_grads_close(grads, ref_grads)
