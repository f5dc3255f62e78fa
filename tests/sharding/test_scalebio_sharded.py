"""ScaleBiO (+ LISA) on 8 fake CPU devices: u, its moments and LISA's slots
live in the parameters' shards, lambda is replicated, and the sharded run
equals one device.

Run in its own process:
  DATAWEIGHTS_SHARDING_RUN=1 python -m pytest tests/sharding -q

Tolerance: the sharded and single-device programs sum in different orders
(ulp-level differences); plain SGD keeps them at rtol 1e-5, plus what p's
own float noise does to w and u through lambda (see the test). AdamW (LISA
runs AdamW) divides by sqrt(v) + eps, which turns the float noise of
near-zero gradients (the attention key bias) into steps of up to
lr * noise / eps per step: with noise one ulp of an O(1) gradient sum
(1.2e-7), eps = 1e-4, lr = 1e-2 and 3 steps, at most 3.6e-5 (measured:
5.7e-6 in one entry of u; an earlier bound of 1e-6 was wrong).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from dataweights import sharding
from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.data import instructions as pairs_lib
from dataweights.train import lisa
from dataweights.train.loop import Trainer
from dataweights.train.scalebio import scalebio

MODEL = lm.lm_model(
  "smoke", num_layers=2, d_model=32, num_heads=8, d_mlp=64, max_len=15
)
B, BV, SEQ, STEPS = 16, 8, 16, 3
NAMES = ["a", "b", "c"]
FSDP8 = lm.MeshConfig(data=1, fsdp=-1, model=1)

pytestmark = pytest.mark.usefixtures("xla_cache")


def _sources():
  rng = np.random.default_rng(0)
  ps = ["".join(rng.choice(list("abcdefgh"), 5)) for _ in range(80)]
  sets = [
    pairs_lib.PairSet.from_pairs(
      n,
      ps[20 * j : 20 * j + 20],
      [p[::-1] for p in ps[20 * j : 20 * j + 20]],
      SEQ,
    )
    for j, n in enumerate(NAMES)
  ]
  valid = pairs_lib.PairSet.from_pairs(
    "v", ps[60:], [p[::-1] for p in ps[60:]], SEQ
  )
  return {
    "train": pairs_lib.PairSampler(sets, B, seed=0).batch,
    "valid": pairs_lib.PairSampler([valid], BV, seed=0, stream=1).batch,
  }


def _run(mesh_cfg, with_lisa, lean=False):
  mesh = None if mesh_cfg is None else sharding.make_mesh(mesh_cfg)
  if with_lisa:
    method = scalebio(
      "smoke",
      lisa_active=1,
      lisa_period=2,
      eps=1e-4,
      lr_u=1e-2,
      w_pass="split" if lean else "joint",
    )
    cfg = train_configs.train(
      "smoke",
      batch_size=B,
      steps=STEPS,
      eps=1e-4,
      learning_rate=1e-2,
      warmup_steps=0,
    )
  else:
    method = scalebio("smoke", optimizer="sgd", lr_u=0.3, lr_p=0.5)
    cfg = train_configs.train(
      "smoke",
      batch_size=B,
      steps=STEPS,
      optimizer="sgd",
      b1=0.0,
      learning_rate=0.3,
      warmup_steps=0,
      schedule="constant",
      grad_clip=0.0,
      weight_decay=0.0,
    )
  trainer = Trainer(
    MODEL,
    cfg,
    mesh=mesh,
    method=method,
    domain_names=NAMES,
    tx=method.w_optimizer(cfg),
    # The lean mode: the split w pass and LISA's blocks fixed per step.
    fixed_blocks=method.lisa_schedule(MODEL.num_layers) if lean else None,
  )
  init = jax.tree.map(np.array, jax.device_get(trainer.state.params))
  state, hist = trainer.run(_sources())
  return state, hist, init


@pytest.mark.parametrize(
  "with_lisa, lean", [(False, False), (True, False), (True, True)]
)
def test_scalebio_sharded_equals_single_device(with_lisa, lean):
  assert jax.device_count() == 8
  ref, ref_hist, init = _run(None, with_lisa, lean)
  state, hist, _ = _run(FSDP8, with_lisa, lean)
  ms = state.extra["method"]
  # u lives in the parameters' shards; lambda's logits are replicated.
  for p, u in zip(jax.tree.leaves(state.params), jax.tree.leaves(ms["u"])):
    assert u.sharding == p.sharding
  kernel = ms["u"]["blocks"][0]["mlp"]["fc"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (4, 64)  # D / 8
  assert ms["p_K"].sharding.spec == jax.sharding.PartitionSpec()
  if with_lisa:
    for opt in (state.opt_state, ms["u_opt"]):
      st = [
        s
        for s in jax.tree.leaves(
          opt, is_leaf=lambda x: isinstance(x, lisa.LisaState)
        )
        if isinstance(s, lisa.LisaState)
      ][0]
      mu_rest = st.rest[0].mu
      assert mu_rest["wte"]["value"].sharding == state.params["wte"].sharding
      slot = st.slots[0].mu["blocks"][0]["mlp"]["fc"]["kernel"]["value"]
      assert slot.shape == (1, 32, 64)
      assert isinstance(slot.sharding, NamedSharding)
      assert slot.sharding.spec[0] is None
      assert slot.addressable_shards[0].data.shape == (1, 4, 64)
  rtol, atol = (1e-5, 1e-6) if not with_lisa else (1e-4, 2e-6)
  # p moves along alpha (m^w - m^u), a difference of two ~5-nat float32
  # losses: a few ulp of each (different summation orders) times alpha
  # and lr_p per step. Bound: steps * lr_p * alpha * 8 ulp(6).
  lr_p = 0.5 if not with_lisa else 5e-2
  atol_p = STEPS * lr_p * 10.0 * 8 * float(np.spacing(np.float32(6.0)))
  np.testing.assert_allclose(
    np.asarray(ms["p_K"], np.float64),
    np.asarray(ref.extra["method"]["p_K"], np.float64),
    rtol=rtol,
    atol=atol_p,
  )
  # w and u take the training loss weighted by alpha lam_k / n_k: p off by
  # atol_p moves lam by a relative 2 atol_p (softmax), so the training part
  # of their total change, at most the change plus the validation part's
  # (bounded by the change again), moves by 4 atol_p |change| on top of the
  # ulp-level rtol/atol (one embedding entry of w missed rtol 1e-5 by 2x).
  for part in ("params", "u"):
    a = ms[part] if part != "params" else state.params
    r = ref.extra["method"][part] if part != "params" else ref.params
    for x, y, x0 in zip(
      jax.tree.leaves(jax.device_get(a)),
      jax.tree.leaves(jax.device_get(r)),
      jax.tree.leaves(init),
    ):
      x, y, x0 = (np.asarray(v, np.float64) for v in (x, y, x0))
      tol = atol + rtol * np.abs(y) + 4 * atol_p * np.abs(y - x0)
      if with_lisa:
        tol = tol + STEPS * 1e-2 * float(np.spacing(np.float32(1.0))) / 1e-4
      bad = np.abs(x - y) > tol
      assert not bad.any(), (
        part,
        np.flatnonzero(bad)[:5],
        np.abs(x - y)[bad][:5],
        tol[bad][:5],
      )
  for key in ("loss", "method/val_loss", "method/lambda/0"):
    np.testing.assert_allclose(
      hist.series(key)[1], ref_hist.series(key)[1], rtol=rtol
    )
  assert float(jnp.abs(ms["p_K"]).max()) > 0
