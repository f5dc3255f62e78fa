"""Online filtering on 8 fake CPU devices equals one device.

Run in its own process (the device count is fixed when JAX starts):
  DATAWEIGHTS_SHARDING_RUN=1 python -m pytest tests/sharding -q

Tolerance: rtol 1e-5, atol 1e-6 on every leaf of the state (the model, its
optimiser, φ and its Adam state, SOBA's v and its optimiser), the same as
the model-only sharding test: sharded reductions sum in another order, so
float32 results differ by a few ulps per step. The selected rows are
compared exactly (a Gumbel-top-k tie within ulps would be a false alarm of
probability ~1e-6 per row; the seed is fixed). v uses SGD here: Adam would
turn the float noise of exactly-zero gradients (the attention key bias)
into ±lr steps that differ between reduction orders.
"""

import jax
import numpy as np
import pytest

from dataweights import sharding
from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.data import filter_feed, mixture, pipeline
from dataweights.data.pipeline import DomainSource
from dataweights.models import weighting_net as wn
from dataweights.train import filtering as F
from dataweights.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("xla_cache")

MODEL = lm.lm_model(
  "smoke", num_layers=1, d_model=32, num_heads=8, d_mlp=64, max_len=16
)
MESHES = {
  "dp8": lm.MeshConfig(data=-1, fsdp=1, model=1),
  "fsdp8": lm.MeshConfig(data=1, fsdp=-1, model=1),
}
PIPE = pipeline.pipeline(
  "smoke", seq_len=17, batch_size=8, downsampling=2, specific_batch_size=8
)
SCORER = wn.ScorerConfig(embed_dim=8, channels=8, kernel_size=3)
METHODS = {
  "soba": F.SOBA(scorer=SCORER, v_optimizer="sgd", v_lr=0.05),
  "dds": F.DDS(scorer=SCORER, lookahead_lr=0.01),
}


def _domains():
  rng = np.random.default_rng(0)
  mk = lambda name, lo, hi: DomainSource(  # noqa: E731
    name,
    [
      {
        "text": bytes(
          rng.integers(lo, hi, rng.integers(10, 50)).astype(np.uint8)
        )
      }
      for _ in range(20)
    ],
  )
  return [mk("a", 97, 110), mk("b", 110, 123), mk("n", 33, 64)], mk(
    "t", 97, 105
  )


def _run(method, mesh_name):
  gen, spec = _domains()
  feed = filter_feed.FilterFeed(mixture.FilterStreams(gen, spec, PIPE), 8)
  cfg = train_configs.train(
    "smoke",
    batch_size=8,
    steps=3,
    optimizer="sgd",
    b1=0.9,
    learning_rate=0.3,
    warmup_steps=0,
    schedule="constant",
  )
  mesh = None if mesh_name is None else sharding.make_mesh(MESHES[mesh_name])
  trainer = Trainer(
    MODEL, cfg, mesh=mesh, method=method, domain_names=("a", "b", "n")
  )
  state, hist = trainer.run(feed.sources())
  return state, hist


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("method", list(METHODS))
def test_sharded_filtering_equals_one_device(method, mesh_name):
  assert jax.device_count() == 8
  ref, ref_hist = _run(METHODS[method], None)
  state, hist = _run(METHODS[method], mesh_name)
  for a, b in zip(
    jax.tree.leaves(jax.device_get(state)),
    jax.tree.leaves(jax.device_get(ref)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ("a", "b", "n"):  # the same rows were kept at every step
    key = f"count/domain/{name}"
    assert hist.series(key)[1] == ref_hist.series(key)[1]
  ms = state.extra["method"]
  if "v" in ms:  # v lives in the parameters' shards
    for p, v in zip(jax.tree.leaves(state.params), jax.tree.leaves(ms["v"])):
      assert v.sharding == p.sharding
    kernel = ms["v"]["blocks"][0]["mlp"]["fc"]["kernel"]
    shard = (4, 64) if mesh_name == "fsdp8" else (32, 64)
    assert kernel.addressable_shards[0].data.shape == shard
  phi = jax.tree.leaves(ms["phi"])[0]
  assert phi.sharding.is_fully_replicated
