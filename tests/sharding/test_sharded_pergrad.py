"""Per-example gradients sharded over 8 fake devices == one device.

Run in its own process (the device count is fixed when JAX starts):
  DATAWEIGHTS_SHARDING_RUN=1 python -m pytest tests/sharding -q
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dataweights import sharding
from dataweights.configs import lm
from dataweights.methods import influence, pergrad
from dataweights.methods.projection import Projector
from dataweights.models import transformer as tr

CFG = lm.lm_model(
  "smoke", num_layers=1, d_model=16, num_heads=2, d_mlp=32, max_len=16
)
# Each device computes its rows with the same program as one device does on
# all rows, but XLA may fuse and reassociate float32 sums differently per
# shape: ~16 ulp of float32.
RTOL, ATOL = 1e-6, 1e-7


def _problem(n=16):
  gd, params, rest = nnx.split(
    tr.Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param, ...
  )
  tok = jax.random.randint(jax.random.key(1), (n, 12), 0, CFG.vocab_size)
  batch = {"tokens_BxL": tok}

  def loss(p, b):
    return tr.next_token_loss(
      nnx.merge(gd, p, rest, copy=True), b["tokens_BxL"]
    )

  return loss, params, batch


@pytest.mark.slow
def test_sharded_per_example_gradients_equal_one_device():
  assert jax.device_count() == 8
  loss, params, batch = _problem()
  mesh = sharding.make_mesh(lm.MeshConfig(data=4, fsdp=2, model=1))
  proj = Projector(dim=32, seed=5, block_rows=256)
  feat = influence.less_feature_fn(proj)
  one = jax.jit(
    lambda p, b: pergrad.per_example_features(
      loss, p, b, feature_fn=feat, chunk_size=2
    )
  )(params, batch)
  many = pergrad.sharded_features(
    loss, params, batch, mesh, feature_fn=feat, chunk_size=2
  )
  assert many.sharding.spec == P(("data", "fsdp"))
  assert len(many.sharding.device_set) == 8
  np.testing.assert_allclose(
    np.asarray(many), np.asarray(one), rtol=RTOL, atol=ATOL
  )
  # Raw gradients too (identity feature).
  g1 = jax.jit(
    lambda p, b: pergrad.per_example_grads(loss, p, b, chunk_size=2)
  )(params, batch)
  g8 = pergrad.sharded_features(loss, params, batch, mesh, chunk_size=2)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL
    )


def test_batch_not_divisible_is_a_clear_error():
  loss, params, batch = _problem(n=12)
  mesh = sharding.make_mesh(lm.MeshConfig(data=8, fsdp=1, model=1))
  with pytest.raises(ValueError, match="12 examples .* 8 data shards"):
    pergrad.sharded_features(loss, params, batch, mesh)
