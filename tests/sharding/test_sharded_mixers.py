"""Mixing methods sharded on 8 fake CPU devices equal one device.

Run in its own process:
  DATAWEIGHTS_SHARDING_RUN=1 python -m pytest tests/sharding -q

Each method trains 3 steps under FSDP (parameters, optimiser state and the
method's parameter-shaped state split 8 ways along the model width) and on
one device. Tolerance: rtol 1e-5, atol 1e-6 on every state leaf and on the
learned weights, as for the plain sharded step (different XLA programs sum
in different orders; SGD keeps the update linear in the gradient so those
ulps are not amplified, see test_sharded_train). The round-off reaches the
weights through the hypergradients, which are sums over all parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataweights import sharding
from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.data.mixture import MixtureSampler
from dataweights.data.pipeline import DomainSource
from dataweights.train import mixers
from dataweights.train.loop import Trainer

MODEL = lm.lm_model(
  "smoke", num_layers=1, d_model=32, num_heads=8, d_mlp=64, max_len=16
)
B, L, K = 16, 9, 3
NAMES = ["a", "b", "c"]
STEPS = 3

pytestmark = pytest.mark.usefixtures("xla_cache")


def _domains(split):
  rng = np.random.default_rng(split)
  return [
    DomainSource(
      n,
      [
        {"text": bytes(rng.integers(97, 97 + 2 + 8 * k, 40).astype(np.uint8))}
        for _ in range(10)
      ],
    )
    for k, n in enumerate(NAMES)
  ]


def _sources(valid, draw="stratified"):
  out = {
    "train": MixtureSampler(
      _domains(0),
      batch_size=B,
      seq_len=L,
      seed=0,
      weights=[1 / 3] * 3,
      draw=draw,
    )
  }
  if valid:
    out["valid"] = MixtureSampler(
      _domains(1),
      batch_size=B,
      seq_len=L,
      seed=0,
      stream=3,
      weights=[1 / 3] * 3,
      draw=draw,
    )
  return out


def _cfg():
  return train_configs.train(
    "smoke",
    batch_size=B,
    steps=STEPS,
    optimizer="sgd",
    b1=0.9,
    learning_rate=0.5,
    warmup_steps=0,
    schedule="constant",
  )


def _reference():
  t = Trainer(
    MODEL,
    train_configs.train("smoke", batch_size=B, seed=5),
    domain_names=NAMES,
  )
  return jax.device_get(t.state.params)


METHODS = {
  "alignment": (lambda: mixers.OnlineAlignment(beta=0.5), True),
  "horizon": (
    lambda: mixers.HorizonMixing(
      T=2,
      beta=0.5,
      mode="reverse",
      batch_spec=mixers.batch_spec(_sources(False)["train"].next_batch()),
    ),
    True,
  ),
  "doremi": (
    lambda: mixers.DoReMiProxy(step_size=2.0, reference=_reference()),
    False,
  ),
  "odm": (lambda: mixers.OnlineDataMixing(), False),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_sharded_method_equals_single_device(name):
  make, valid = METHODS[name]
  runs = {}
  for mesh_name in (None, "fsdp8"):
    mesh = (
      None
      if mesh_name is None
      else sharding.make_mesh(lm.MeshConfig(data=1, fsdp=-1, model=1))
    )
    trainer = Trainer(
      MODEL, _cfg(), mesh=mesh, domain_names=NAMES, method=make()
    )
    runs[mesh_name] = trainer.run(
      _sources(valid, "iid" if name == "odm" else "stratified")
    )
  state, hist = runs["fsdp8"]
  ref_state, ref_hist = runs[None]
  # Parameter-shaped method state lives in the parameters' shards.
  ms = state.extra["method"]
  kernel = state.params["blocks"][0]["mlp"]["fc"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (4, 64)
  for key in ("theta0", "ref"):
    if key in ms:
      k2 = ms[key]["blocks"][0]["mlp"]["fc"]["kernel"]
      assert k2.sharding == kernel.sharding
  for a, b in zip(
    jax.tree.leaves(jax.device_get(state)),
    jax.tree.leaves(jax.device_get(ref_state)),
    strict=True,
  ):
    np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-6
    )
  _, w = mixers.weights_from_history(hist, "w", K)
  _, w_ref = mixers.weights_from_history(ref_hist, "w", K)
  np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-7)
  if name == "odm":  # π stays uniform while t <= K ln K; the rewards move
    assert float(jnp.abs(ms["exp3"].reward_K).max()) > 0.01
  else:
    assert np.abs(w[-1] - 1 / 3).max() > 1e-4  # the weights moved
  assert jnp.isfinite(jnp.asarray(w)).all()
