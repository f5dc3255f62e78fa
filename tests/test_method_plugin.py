"""The plug-in contract: a method's state, batches, weights and resume.

A trivial method exercises every hook: it consumes a ``"valid"`` batch,
weights the training rows, accumulates the gradient it sees in a
parameter-shaped vector, counts steps, and emits domain weights that change
every step. Independent oracles check each part: plain SGD makes the sum of
the applied gradients equal ``(params_0 - params_N) / lr``; the sampler's
draws are a pure function of (seed, step, weights), so the weights each batch
was drawn with can be recomputed in closed form.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.data.mixture import MixtureSampler
from dataweights.data.pipeline import DomainSource
from dataweights.train.feeder import Feeder, FeederError
from dataweights.train.loop import NonFiniteError, Trainer
from dataweights.train.method import Method, check_batches

pytestmark = pytest.mark.usefixtures("xla_cache")

NAMES = ("a", "b", "c")
K, B, L = 3, 8, 9
LR = 0.05
SLOPE_K = (0.3, -0.2, 0.1)


def _weights_after(n: int) -> np.ndarray:
  """The trivial method's weights after n updates: softmax(n * slope)."""
  z = np.float32(n) * np.asarray(SLOPE_K, np.float32)
  e = np.exp(z - z.max())
  return e / e.sum()


@dataclasses.dataclass(frozen=True)
class Trivial(Method):
  """Every hook, with results an oracle can predict."""

  name: str = "trivial"
  batches: tuple[str, ...] = ("valid",)
  emits_weights: bool = True
  num_weights: int = K
  poison_at: int = -1  # make the method state NaN at this step

  def init(self, params, key, num_domains):
    return {
      "count": jnp.zeros((), jnp.int32),
      "g_sum": jax.tree.map(jnp.zeros_like, params),
      "w_K": jnp.full((self.num_weights,), 1.0 / self.num_weights, jnp.float32),
      "valid_rows": jnp.zeros((), jnp.float32),
    }

  def select(self, mstate, ctx):
    batch = dict(ctx.batches["train"])
    return batch, jnp.ones(batch["tokens_BxL"].shape[0], jnp.float32), mstate

  def update(self, mstate, ctx, grads, loss_B, batch):
    count = mstate["count"] + 1
    slope = jnp.asarray(SLOPE_K[: self.num_weights] + (0.0,) * (self.num_weights - K), jnp.float32)
    w_K = jax.nn.softmax(count.astype(jnp.float32) * slope)
    w_K = jnp.where(count == self.poison_at, jnp.nan, w_K)
    new = {
      "count": count,
      "g_sum": jax.tree.map(jnp.add, mstate["g_sum"], grads),
      "w_K": w_K,
      "valid_rows": mstate["valid_rows"] + ctx.batches["valid"]["tokens_BxL"].shape[0],
    }
    return grads, new, {"valid_loss": jnp.mean(ctx.loss_fn(ctx.params, ctx.batches["valid"]))}

  def sampling_weights(self, mstate):
    return mstate["w_K"]


class LoggingSampler(MixtureSampler):
  """Records the step and weights of every batch it draws."""

  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    self.log = []

  def next_batch(self, weights=None):
    step = self.step
    batch = super().next_batch(weights)
    self.log.append((step, self.weights, batch["domain_B"].copy()))
    return batch


def _domains():
  rng = np.random.default_rng(0)
  return [
    DomainSource(n, [{"text": bytes(rng.integers(97, 123, 40).astype(np.uint8))} for _ in range(20)])
    for n in NAMES
  ]


def _sources(seed=0):
  doms = _domains()
  return {
    "train": LoggingSampler(doms, batch_size=B, seq_len=L, seed=seed, weights=[1 / 3] * 3),
    "valid": MixtureSampler(doms, batch_size=4, seq_len=L, seed=seed, stream=7),
  }


def _trainer(tmp_path=None, method=None, **train_kw):
  model = lm.lm_model("smoke", num_layers=1, d_model=16, num_heads=2, d_mlp=32, max_len=L - 1)
  cfg = train_configs.train(
    "smoke", optimizer="sgd", b1=0.0, grad_clip=0.0, weight_decay=0.0,
    schedule="constant", warmup_steps=0, learning_rate=LR, batch_size=B,
    checkpoint_dir=None if tmp_path is None else str(tmp_path),
    **{"steps": 6, **train_kw},
  )
  return Trainer(model, cfg, domain_names=NAMES, method=method or Trivial())


def test_method_state_batches_and_gradients():
  trainer = _trainer()
  p0 = jax.tree.map(np.asarray, trainer.state.params)
  sources = _sources()
  state, hist = trainer.run(sources)
  ms = state.extra["method"]
  assert int(ms["count"]) == 6 and float(ms["valid_rows"]) == 6 * 4
  # Plain SGD: the gradients the method saw are the ones applied. Each float32
  # update p - lr g rounds p to its ulp, so (p0 - pN) / lr carries up to
  # steps * ulp(|p|) / lr of rounding error.
  for g, a, b in zip(jax.tree.leaves(ms["g_sum"]), jax.tree.leaves(p0), jax.tree.leaves(state.params)):
    atol = 6 * float(np.spacing(np.float32(np.abs(a).max()))) / LR
    np.testing.assert_allclose(np.asarray(g), (a - np.asarray(b)) / LR, rtol=1e-3, atol=atol)
  assert any(np.abs(np.asarray(g)).max() > 1e-3 for g in jax.tree.leaves(ms["g_sum"]))
  steps, vl = hist.series("method/valid_loss")
  assert steps == [1, 2, 3, 4, 5, 6] and all(np.isfinite(vl))
  np.testing.assert_allclose(hist.series("weight/a")[1][-1], _weights_after(6)[0], rtol=1e-6)


@pytest.mark.parametrize("lag", [1, 0])
@pytest.mark.parametrize("checkpoints", [False, True])
def test_the_sampler_draws_with_the_method_weights(lag, checkpoints, tmp_path):
  # Checkpoints (and evaluations) make the loop wait for the device at some
  # steps; the weights of every batch must not depend on that.
  trainer = _trainer(tmp_path if checkpoints else None, checkpoint_every=2)
  sources = _sources()
  trainer.run(Feeder(sources, lag=lag))
  log = sources["train"].log
  assert [s for s, _, _ in log] == list(range(6))
  for step, used, domain_B in log:
    want = _weights_after(max(step - lag, 0))
    np.testing.assert_allclose(used, want, rtol=1e-6, err_msg=f"batch {step}")
    ref = MixtureSampler(_domains(), batch_size=B, seq_len=L, seed=0)
    np.testing.assert_array_equal(domain_B, ref.draw_domains(step, used))


def test_sampler_frequencies_follow_emitted_weights():
  """Chi-square test of the domains drawn through method -> loop -> sampler."""

  @dataclasses.dataclass(frozen=True)
  class Fixed(Method):
    name: str = "fixed"
    emits_weights: bool = True

    def init(self, params, key, num_domains):
      return {"w_K": jnp.array([0.7, 0.2, 0.1], jnp.float32)}

    def sampling_weights(self, mstate):
      return mstate["w_K"]

  trainer = _trainer(method=Fixed(), steps=40)
  sources = _sources(seed=3)
  del sources["valid"]
  trainer.run(sources)
  counts = np.bincount(np.concatenate([d for _, _, d in sources["train"].log]), minlength=K)
  p = stats.chisquare(counts, counts.sum() * np.array([0.7, 0.2, 0.1])).pvalue
  assert p > 1e-3, (counts, p)  # fixed seed; 0.1% false-alarm rate
  # ... and they differ from the sampler's own (uniform) initial weights.
  assert stats.chisquare(counts, counts.sum() * np.full(K, 1 / 3)).pvalue < 1e-6


def _bitwise(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resume_mid_run_with_method_state_is_bitwise_identical(tmp_path):
  full_src = _sources()
  ref, ref_hist = _trainer(tmp_path / "a", checkpoint_every=2).run(full_src)
  first_src = _sources()
  _trainer(tmp_path / "b", checkpoint_every=2).run(first_src, steps=3)
  # A new process: fresh trainer, fresh samplers; the checkpoint at step 3
  # restores the model, the method state, the samplers and pending weights.
  second_src = _sources()
  state, hist = _trainer(tmp_path / "b", checkpoint_every=2).run(second_src)
  assert int(state.step) == 6 and _bitwise(state, ref)
  drawn = [(s, d.tolist()) for s, _, d in first_src["train"].log[:3] + second_src["train"].log]
  assert drawn == [(s, d.tolist()) for s, _, d in full_src["train"].log]
  assert hist.rows == ref_hist.rows


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match=r"method 'trivial' needs the batch\(es\) 'valid'.*gives only 'train'"):
    check_batches(Trivial(), ["train"])
  trainer = _trainer()
  with pytest.raises(ValueError, match="needs the batch"):
    trainer.run({"train": _sources()["train"]})
  # Weights of the wrong length reach the sampler's check.
  with pytest.raises(ValueError, match=r"weights \[.*\] have shape \(4,\); expected shape \(3,\)"):
    _trainer(method=Trivial(num_weights=4)).run(_sources())
  with pytest.raises(FeederError, match="needs a 'train' source"):
    Feeder({"valid": _sources()["valid"]})


def test_nonfinite_method_state_stops_with_the_last_good_state():
  trainer = _trainer(method=Trivial(poison_at=4))
  with pytest.raises(NonFiniteError, match="at step 4") as err:
    trainer.run(_sources())
  assert int(err.value.state.step) == 3 and int(err.value.state.halted) == 0
  assert int(err.value.state.extra["method"]["count"]) == 3
