"""Behaviour on levanter's three-domain toy: learnable, noise, easy.

levanter's (removed) ``tests/test_doremi.py``: three logistic-regression
domains over 5 features. ``learnable``: ``y = [x·(0, .5, .5, 0, 0) + N(0,
0.1²) > 0]`` on features 1-2; ``noise``: a label independent of the features
(3-4); ``easy``: ``y = [x_0 + N(0, 0.05²) > 0]`` with ``x_0 ~ N(1, 1)``. A
linear model trains on them through the real training loop.

What each method's objective implies, and what is asserted:

* DoReMi (excess loss over a reference, robust over all domains): nothing
  can be learnt on ``noise``, so its excess loss is ~0 and its weight ends
  below 0.05 (levanter's assertion), ``learnable`` highest;
* alignment (T = 1) and finite horizon with the validation set of
  ``learnable``: ``noise`` gradients do not point where that loss falls, so
  its weight ends below 0.05;
* ODM rewards high training loss, so its objective implies the opposite:
  ``noise`` (the highest loss) gets the largest weight.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dataweights.configs import train as train_configs
from dataweights.methods import domain_weights
from dataweights.train import mixers
from dataweights.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("xla_cache")

NAMES = ("learnable", "noise", "easy")
B, D, STEPS = 32, 5, 300


class ToyMixture:
  """Three synthetic domains; a resumable sampler taking weights.

  Row ``b`` of step ``s`` is a deterministic function of ``(seed, stream,
  s, b)`` and its domain; domains are drawn like the mixture sampler's
  (i.i.d. or stratified).
  """

  def __init__(
    self,
    seed=0,
    stream=0,
    batch_size=B,
    weights=(1 / 3,) * 3,
    draw="stratified",
    only=None,
  ):
    self.seed, self.stream, self.batch_size = seed, stream, batch_size
    self.draw, self.only = draw, only
    self.weights = np.asarray(weights, np.float64)
    self.step = 0

  def _domains(self, rng):
    if self.only is not None:
      return np.full(self.batch_size, self.only, np.int32)
    w = self.weights / self.weights.sum()
    if self.draw == "iid":
      return rng.choice(3, self.batch_size, p=w).astype(np.int32)
    count = np.floor(self.batch_size * w).astype(int)
    left = self.batch_size - count.sum()
    rem = self.batch_size * w - count
    count[rng.choice(3, left, replace=False, p=rem / rem.sum())] += 1
    return rng.permutation(np.repeat(np.arange(3), count)).astype(np.int32)

  def next_batch(self, weights=None):
    if weights is not None:
      self.weights = np.asarray(weights, np.float64)
    rng = np.random.default_rng([self.seed, self.stream, self.step])
    domain_B = self._domains(rng)
    z = rng.normal(size=(self.batch_size, D))
    x = np.zeros((self.batch_size, D))
    y = np.zeros(self.batch_size)
    for k in range(3):
      m = domain_B == k
      if k == 0:
        x[m, 1:3] = z[m, 1:3]
        y[m] = (
          x[m] @ np.array([0, 0.5, 0.5, 0, 0]) + 0.1 * rng.normal(size=m.sum())
          > 0
        )
      elif k == 1:
        x[m, 3:5] = z[m, 3:5]
        y[m] = rng.normal(size=m.sum()) > 0
      else:
        x[m, 0] = z[m, 0] + 1.0
        y[m] = x[m, 0] + 0.05 * rng.normal(size=m.sum()) > 0
    self.step += 1
    return {
      "x_BxD": x.astype(np.float32),
      "y_B": y.astype(np.float32),
      "domain_B": domain_B,
    }

  def get_state(self):
    return {"step": self.step, "weights": self.weights.tolist()}

  def set_state(self, state):
    self.step, self.weights = state["step"], np.asarray(state["weights"])


class Logistic(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(D, 1, rngs=rngs)

  def __call__(self, x_BxD):
    return self.linear(x_BxD)[:, 0]


def bce_loss(model, batch, key):
  del key
  logit_B = model(batch["x_BxD"])
  return optax.sigmoid_binary_cross_entropy(logit_B, batch["y_B"])


def _trainer(method, seed=0):
  cfg = train_configs.train(
    "smoke",
    optimizer="adam",
    learning_rate=1e-2,
    schedule="constant",
    warmup_steps=0,
    weight_decay=0.0,
    grad_clip=0.0,
    batch_size=B,
    steps=STEPS,
    seed=seed,
    eps_root=1e-30,
  )
  return Trainer(
    {"toy": "logistic"},
    cfg,
    model_factory=lambda cfg, rngs: Logistic(rngs),
    loss_fn=bce_loss,
    domain_names=NAMES,
    method=method,
  )


def _final_weights(hist, prefix="w"):
  _, w = mixers.weights_from_history(hist, prefix, 3)
  return w[-1]


def _valid_learnable():
  return ToyMixture(seed=1, stream=9, only=0)


def test_the_toy_is_the_toy():
  # Per-domain losses of a model trained on uniform weights: easy < learnable
  # < noise (levanter's premise), noise near ln 2.
  trainer = _trainer(None)
  _, hist = trainer.run(ToyMixture())
  last = {n: np.mean(hist.series(f"loss/domain/{n}")[1][-50:]) for n in NAMES}
  assert last["easy"] < last["learnable"] < last["noise"]
  assert last["noise"] > 0.6


@pytest.mark.slow
def test_doremi_gives_noise_a_tiny_weight():
  ref_state, _ = _trainer(None, seed=1).run(ToyMixture(seed=3))
  proxy = mixers.DoReMiProxy(excess="example", reference=ref_state.params)
  state, hist = _trainer(proxy).run(ToyMixture())
  avg = np.asarray(mixers.DoReMiProxy.average_weights(state.extra["method"]))
  assert abs(avg.sum() - 1) < 1e-5
  assert avg[1] < 0.05, avg
  assert avg[0] > avg[2] > avg[1], avg  # levanter's ordering


@pytest.mark.slow
@pytest.mark.parametrize(
  "method",
  [
    mixers.OnlineAlignment(beta=0.05),
    mixers.HorizonMixing(
      T=5,
      beta=0.3,
      mode="reverse",
      batch_spec=mixers.batch_spec(ToyMixture().next_batch()),
    ),
  ],
  ids=["alignment", "horizon"],
)
def test_validation_driven_methods_drop_the_noise_domain(method):
  state, hist = _trainer(method).run(
    {"train": ToyMixture(), "valid": _valid_learnable()}
  )
  w = _final_weights(hist)
  assert w[1] < 0.05, w
  assert w[0] == w.max(), w


def test_odm_favours_the_highest_loss_domain():
  state, hist = _trainer(mixers.OnlineDataMixing()).run(
    {"train": ToyMixture(draw="iid")}
  )
  w = _final_weights(hist)
  assert w[1] == w.max() and w[1] > 1 / 3 + 0.05, w
  # Exploration keeps every domain's probability >= eps_t.
  eps = min(1 / 3, np.sqrt(np.log(3) / (3 * STEPS)))
  assert w.min() >= eps - 1e-6


def test_uniform_weights_helper_matches_the_sampler():
  np.testing.assert_allclose(
    domain_weights.uniform_weights(3), ToyMixture().weights
  )
  # Stratified draws of the toy put floor/ceil of B w rows per domain.
  s = ToyMixture(weights=(0.5, 0.3, 0.2))
  c = np.bincount(s.next_batch()["domain_B"], minlength=3)
  assert c.sum() == B and np.all(np.abs(c - B * np.array([0.5, 0.3, 0.2])) < 1)
  jax.block_until_ready(jnp.zeros(1))
