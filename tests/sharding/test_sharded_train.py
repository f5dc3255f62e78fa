"""Sharded train steps and checkpoints on 8 fake CPU devices.

Run in its own process (the device count is fixed when JAX starts):
  DATAWEIGHTS_SHARDING_RUN=1 python -m pytest tests/sharding -q
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from dataweights import sharding
from dataweights.checkpoint import CheckpointManager
from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.train.loop import Trainer
from dataweights.train.method import Method
from dataweights.train.state import abstract_state

# Widths, heads and vocabulary divisible by 8: every mesh below fits.
MODEL = lm.lm_model(
  "smoke", num_layers=1, d_model=32, num_heads=8, d_mlp=64, max_len=16
)
B, L, K = 16, 9, 3
NAMES = ["a", "b", "c"]
MESHES = {
  "dp8": lm.MeshConfig(data=-1, fsdp=1, model=1),
  "fsdp8": lm.MeshConfig(data=1, fsdp=-1, model=1),
}
STEPS = 2


pytestmark = pytest.mark.usefixtures("xla_cache")


def batch_fn(step):
  rng = np.random.default_rng(step)
  return {
    "tokens_BxL": rng.integers(0, 256, (B, L)).astype(np.int32),
    "mask_BxL": np.ones((B, L), np.float32),
    "domain_B": rng.integers(0, K, B).astype(np.int32),
  }


def _cfg(**kw):
  # SGD + momentum: the update is linear in the gradient, so this compares
  # gradients. (Adam turns the float noise of exactly-zero gradients, e.g.
  # the attention key bias, into +-lr steps that differ between reduction
  # orders.)
  return train_configs.train(
    "smoke",
    batch_size=B,
    accumulation_steps=2,
    steps=STEPS,
    optimizer="sgd",
    b1=0.9,
    learning_rate=0.5,
    warmup_steps=0,
    schedule="constant",
    **kw,
  )


def _trainer(mesh_name, **kw):
  mesh = None if mesh_name is None else sharding.make_mesh(MESHES[mesh_name])
  return Trainer(
    MODEL,
    _cfg(**kw),
    mesh=mesh,
    domain_names=NAMES,
    extra={"w_K": jnp.array([0.5, 0.3, 0.2])},
  )


@pytest.fixture(scope="module")
def reference():
  assert jax.device_count() == 8
  trainer = _trainer(None)
  assert trainer.guard == "select"
  state, history = trainer.run(batch_fn)
  return jax.device_get(state), history


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_steps_equal_single_device(mesh_name, reference, tmp_path):
  ref_state, ref_hist = reference
  trainer = _trainer(
    mesh_name, checkpoint_dir=str(tmp_path), checkpoint_every=STEPS
  )
  # Several CPU devices: the step keeps a non-finite step's old state by a
  # cond, the reference (one device) by per-leaf selects.
  assert trainer.guard == "cond"
  state, hist = trainer.run(batch_fn)
  trainer.close()
  for a, b in zip(
    jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(ref_state)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for key in ("loss", "grad_norm", "loss/domain/a"):
    np.testing.assert_allclose(
      hist.series(key)[1], ref_hist.series(key)[1], rtol=1e-5
    )

  # Parameters and momenta are laid out as the rules say.
  kernel = state.params["blocks"][0]["mlp"]["fc"]["kernel"]
  shard = (4, 64) if mesh_name == "fsdp8" else (32, 64)  # D split 8 ways
  assert kernel.addressable_shards[0].data.shape == shard
  moments = [
    x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape
  ]
  assert moments and all(m.sharding == kernel.sharding for m in moments)

  # The sharded checkpoint restores into the same shardings, bit for bit.
  fresh = _trainer(mesh_name, checkpoint_dir=str(tmp_path))
  fresh.restore()
  for a, b in zip(jax.tree.leaves(fresh.state), jax.tree.leaves(state)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(fresh.state.step) == STEPS


def test_checkpoint_reshards_on_restore(tmp_path):
  # Saved under FSDP, restored for pure data parallelism (and back).
  src = _trainer("fsdp8", checkpoint_dir=str(tmp_path), checkpoint_every=1)
  src.run(batch_fn, steps=1)
  src.close()
  dst = _trainer("dp8")
  restored = CheckpointManager(tmp_path).restore(
    target=abstract_state(dst.state, dst.shardings)
  )
  kernel = restored.state.params["blocks"][0]["mlp"]["fc"]["kernel"]
  assert isinstance(kernel.sharding, NamedSharding)
  want = jax.tree.leaves(dst.shardings)
  got = [x.sharding for x in jax.tree.leaves(restored.state)]
  assert len(got) == len(want) and all(a == b for a, b in zip(got, want))
  assert kernel.addressable_shards[0].data.shape == (32, 64)  # replicated
  for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(src.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@dataclasses.dataclass(frozen=True)
class GradMemory(Method):
  """A method with a parameter-shaped state (an exponential average of the
  validation gradient, like SOBA's v or ScaleBiO's second model)."""

  name: str = "grad_memory"
  batches: tuple[str, ...] = ("valid",)

  def init(self, params, key, num_domains):
    return {"v": jax.tree.map(jnp.zeros_like, params)}

  def update(self, mstate, ctx, grads, loss_B, batch):
    _, _, g_val = ctx.grad_fn(ctx.params, ctx.batches["valid"], None)
    v = jax.tree.map(lambda v, g: 0.5 * v + g, mstate["v"], g_val)
    return grads, {"v": v}, {}


def _valid_fn(step):
  return batch_fn(10_000 + step)


@pytest.mark.parametrize("mesh_name", ["fsdp8"])
def test_method_state_is_sharded_like_the_parameters(mesh_name):
  """A parameter-shaped method state lives in the parameters' shards, and
  the sharded run equals one device (same tolerance as the model's state)."""
  runs = {}
  for name in (None, mesh_name):
    mesh = None if name is None else sharding.make_mesh(MESHES[name])
    trainer = Trainer(MODEL, _cfg(), mesh=mesh, domain_names=NAMES, method=GradMemory())
    runs[name] = trainer.run({"train": batch_fn, "valid": _valid_fn})[0]
  state = runs[mesh_name]
  v = state.extra["method"]["v"]
  for p, x in zip(jax.tree.leaves(state.params), jax.tree.leaves(v)):
    assert x.sharding == p.sharding
  kernel = v["blocks"][0]["mlp"]["fc"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (4, 64)  # 1/8 of D
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(v))
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(runs[None]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
