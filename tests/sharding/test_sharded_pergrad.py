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
# shape. The error of a reassociated sum scales with the summands, not with
# the result: an entry that nearly cancels can differ by an ulp of the
# array's scale (measured: 1.5e-7 on entries up to 1.46, after the
# transformer's default remat became "dots_no_batch"). So the bound is
# rtol 1e-6 per element plus 1e-6 of the array's largest magnitude (~8 ulp
# of float32 at that scale).
RTOL = 1e-6


def _close(a, b, scale=None):
  """``a == b`` to RTOL, plus RTOL of ``scale`` (default: ``max |b|``)."""
  a, b = np.asarray(a), np.asarray(b)
  scale = float(np.abs(b).max()) if scale is None else scale
  np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * scale)


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
  _close(many, one)
  # Raw gradients too (identity feature).
  g1 = jax.jit(
    lambda p, b: pergrad.per_example_grads(loss, p, b, chunk_size=2)
  )(params, batch)
  g8 = pergrad.sharded_features(loss, params, batch, mesh, chunk_size=2)
  # A leaf whose gradient is rounding noise (~1e-12, e.g. a parameter the
  # loss is invariant to) is compared at the scale of the whole gradient.
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g1))
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
    _close(a, b, scale)


def test_batch_not_divisible_is_a_clear_error():
  loss, params, batch = _problem(n=12)
  mesh = sharding.make_mesh(lm.MeshConfig(data=8, fsdp=1, model=1))
  with pytest.raises(ValueError, match="12 examples .* 8 data shards"):
    pergrad.sharded_features(loss, params, batch, mesh)
