"""Mixing methods in the training loop: formulas, sampler, resume, errors.

Each method runs inside :class:`~dataweights.train.loop.Trainer` on a tiny
byte-level LM and three synthetic domains. Oracles are independent of the
method code: the batches the samplers logged, the parameters before and
after a step, explicit per-domain gradients, numpy ports of the update
rules, and the replay of a round checked against the actual trajectory.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.data.mixture import MixtureSampler
from dataweights.data.pipeline import DomainSource
from dataweights.methods import horizon
from dataweights.models.transformer import per_token_loss
from dataweights.train import mixers
from dataweights.train.feeder import Feeder
from dataweights.train.loop import Trainer
from dataweights.train.step import lm_loss

pytestmark = pytest.mark.usefixtures("xla_cache")

NAMES = ("a", "b", "c")
K, B, L, BV = 3, 6, 9, 4
MODEL = lm.lm_model(
  "smoke", num_layers=1, d_model=16, num_heads=2, d_mlp=32, max_len=L - 1
)


class LoggingSampler(MixtureSampler):
  """Records the weights and the batch of every draw."""

  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    self.log = []

  def next_batch(self, weights=None):
    batch = super().next_batch(weights)
    self.log.append((self.weights, {k: v.copy() for k, v in batch.items()}))
    return batch


def _domains(split=0):
  # Each domain has its own alphabet, so the domains differ in difficulty.
  rng = np.random.default_rng(split)
  alphabets = [b"ab", b"abcdefgh", b"abcdefghijklmnopqrstuvwxyz"]
  return [
    DomainSource(
      n,
      [{"text": bytes(rng.choice(list(alphabets[k]), 30))} for _ in range(12)],
    )
    for k, n in enumerate(NAMES)
  ]


def _sources(seed=0, draw="stratified", valid=True):
  out = {
    "train": LoggingSampler(
      _domains(),
      batch_size=B,
      seq_len=L,
      seed=seed,
      weights=[1 / 3] * 3,
      draw=draw,
    )
  }
  if valid:
    out["valid"] = LoggingSampler(
      _domains(1),
      batch_size=BV,
      seq_len=L,
      seed=seed,
      stream=7,
      weights=[1 / 3] * 3,
      draw=draw,
    )
  return out


def _cfg(tmp_path=None, **kw):
  # One optimiser for every test, so that a method compiles once per module
  # (the xla_cache fixture); runs stop early with run(..., steps=n). AdamW
  # with eps = 1e-4: the attention key bias has an exactly-zero true
  # gradient, and with eps = 1e-8 Adam turns its float noise (~1e-10) into
  # +-lr steps whose sign differs between any two XLA programs, so no
  # independent recomputation could match the loop.
  base = dict(
    learning_rate=0.05,
    warmup_steps=2,
    batch_size=B,
    steps=40,
    eps=1e-4,
    eps_root=1e-30,
    checkpoint_every=2,
    checkpoint_dir=None if tmp_path is None else str(tmp_path),
  )
  return train_configs.train("smoke", **{**base, **kw})


def _trainer(method, tmp_path=None, **kw):
  return Trainer(MODEL, _cfg(tmp_path, **kw), domain_names=NAMES, method=method)


def _spec():
  return mixers.batch_spec(_sources()["train"].next_batch())


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _loss_fn(trainer):
  graphdef, rest = trainer.static.graphdef, trainer.state.model_state

  def loss(params, batch):
    return lm_loss(nnx.merge(graphdef, params, rest, copy=True), batch, None)

  return loss


def _stack(batches):
  return jax.tree.map(lambda *x: jnp.stack(x), *batches)


# --------------------------------------------------------- finite horizon


def _one_step(trainer, params, opt_state, batch, weight_B):
  """The loop's update, written out: weighted mean loss, tx.update."""
  loss_fn = _loss_fn(trainer)
  g = jax.grad(
    lambda p: jnp.sum(weight_B * loss_fn(p, batch)) / jnp.sum(weight_B)
  )(params)
  u, _ = trainer.static.tx.update(g, opt_state, params)
  return optax.apply_updates(params, u)


def _close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


HORIZON = dict(T=2, beta=1.0, mode="reverse")


@pytest.mark.slow
def test_horizon_replay_reproduces_the_trajectory_and_the_hypergradient():
  T = HORIZON["T"]
  trainer = _trainer(mixers.HorizonMixing(batch_spec=_spec(), **HORIZON))
  p0, o0 = _copy(trainer.state.params), _copy(trainer.state.opt_state)
  src = _sources()
  loss_fn, tx = _loss_fn(trainer), trainer.static.tx
  state, hist = trainer.run(src, steps=T)
  ms = _copy(state.extra["method"])
  # The state kept the round's start and its batches, exactly.
  assert _bitwise(ms["theta0"], p0) and _bitwise(ms["opt0"], o0)
  batches = _stack([b for _, b in src["train"].log[:T]])
  for k in ("tokens_BxL", "domain_B"):
    np.testing.assert_array_equal(ms["batches"][k], batches[k])
  # Replaying the round (uniform weights, as in the first round) from the
  # stored start gives the parameters the loop reached (another program:
  # float32 round-off only).
  w0 = jnp.full(K, 1 / 3, jnp.float32)
  replay = jax.jit(
    lambda w, p, o, b: horizon.replay(w, p, o, b, loss_fn=loss_fn, tx=tx)[0]
  )
  _close(replay(w0, p0, o0, batches), state.params)
  # The round's hypergradient, recomputed outside the loop (every mode is
  # checked against finite differences in test_domain_methods).
  valid = src["valid"].log[T - 1][1]
  h, g, _ = jax.jit(
    lambda p, o, b, v: horizon.hypergradient(
      w0, p, o, b, v, loss_fn=loss_fn, tx=tx, mode="reverse"
    )
  )(p0, o0, batches, valid)
  np.testing.assert_allclose(h, ms["h_K"], rtol=2e-3, atol=1e-6)
  assert float(jnp.abs(ms["h_K"]).max()) > 0
  np.testing.assert_allclose(ms["valid_loss"], g, rtol=1e-5)
  # ... and the EG step on it (normalised h).
  h = np.asarray(ms["h_K"], np.float64)
  w1 = np.exp(-h / np.abs(h).max())
  w1 /= w1.sum()
  np.testing.assert_allclose(ms["eg"].w_K, w1, rtol=1e-5)
  steps, w_SxK = mixers.weights_from_history(hist, "w", K)
  assert steps == [1, 2]
  np.testing.assert_allclose(w_SxK[0], 1 / 3, rtol=1e-6)  # within the round
  np.testing.assert_allclose(w_SxK[1], w1, rtol=1e-5)
  # Round 2 trains with the loss weights of the learned w: replaying it with
  # w1 gives the loop's parameters, replaying it with uniform weights not.
  state, _ = trainer.run(src, steps=2 * T)
  ms2 = _copy(state.extra["method"])
  assert _bitwise(ms2["theta0"], ms["theta0"]) is False
  batches2 = _stack([b for _, b in src["train"].log[T : 2 * T]])
  args = (ms2["theta0"], ms2["opt0"], batches2)
  _close(replay(jnp.asarray(w1, jnp.float32), *args), state.params)
  off = [
    np.abs(a - np.asarray(b)).max()
    for a, b in zip(
      jax.tree.leaves(replay(w0, *args)), jax.tree.leaves(state.params)
    )
  ]
  assert max(off) > 1e-4


# -------------------------------------------------------------- alignment

ALIGN_BETA = 0.5


@pytest.mark.slow
def test_alignment_in_the_loop_equals_explicit_domain_gradients():
  trainer = _trainer(mixers.OnlineAlignment(beta=ALIGN_BETA))
  p0 = _copy(trainer.state.params)
  src = _sources()
  state, hist = trainer.run(src, steps=1)
  ms = state.extra["method"]
  batch = src["train"].log[0][1]
  valid = src["valid"].log[0][1]
  loss_fn = _loss_fn(trainer)
  g_val = jax.grad(lambda p: jnp.mean(loss_fn(p, valid)))(state.params)
  h = []
  for k in range(K):
    sub = {n: v[batch["domain_B"] == k] for n, v in batch.items()}
    g_k = jax.grad(lambda p, sub=sub: jnp.mean(loss_fn(p, sub)))(p0)
    h.append(
      -sum(
        jnp.vdot(a, b)
        for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_val))
      )
    )
  np.testing.assert_allclose(ms["h_K"], h, rtol=1e-4, atol=1e-7)
  e = np.exp(-ALIGN_BETA * np.array(h) / np.abs(h).max())
  np.testing.assert_allclose(ms["eg"].w_K, e / e.sum(), rtol=1e-5)
  np.testing.assert_allclose(
    hist.last()["method/valid_loss"],
    jnp.mean(loss_fn(state.params, valid)),
    rtol=1e-5,
  )


# ----------------------------------------------------------------- DoReMi

DOREMI = dict(step_size=2.0, smoothing=0.05)


def _reference_params(seed=7, model=MODEL):
  t = Trainer(model, _cfg(seed=seed), domain_names=NAMES)
  return _copy(t.state.params)


@pytest.mark.slow
@pytest.mark.parametrize("excess", ["token", "example"])
def test_doremi_proxy_step_is_the_formula(excess):
  eta, c = DOREMI["step_size"], DOREMI["smoothing"]
  ref = _reference_params()
  trainer = _trainer(mixers.DoReMiProxy(excess=excess, reference=ref, **DOREMI))
  p0, o0 = _copy(trainer.state.params), _copy(trainer.state.opt_state)
  src = _sources(valid=False)
  state, hist = trainer.run(src, steps=1)
  batch = src["train"].log[0][1]
  d = batch["domain_B"]

  def token_losses(params):
    model = nnx.merge(
      trainer.static.graphdef, params, trainer.state.model_state, copy=True
    )
    tok = jnp.asarray(batch["tokens_BxL"])
    return np.asarray(
      per_token_loss(model(tok[:, :-1]), tok[:, 1:]), np.float64
    )

  lp, lr_ = token_losses(p0), token_losses(ref)
  if excess == "token":
    clipped_B = np.maximum(lp - lr_, 0).sum(1)
    tokens_B = np.full(B, L - 1)
  else:
    clipped_B = np.maximum(lp.mean(1) - lr_.mean(1), 0)
    tokens_B = np.ones(B)
  lam = np.array(
    [clipped_B[d == k].sum() / tokens_B[d == k].sum() for k in range(K)]
  )
  assert lam.max() > 0
  alpha = np.full(K, 1 / 3) * np.exp(eta * lam)
  alpha = (1 - c) * alpha / alpha.sum() + c / K
  ms = state.extra["method"]
  np.testing.assert_allclose(ms["excess_K"], lam, rtol=1e-5)
  np.testing.assert_allclose(ms["w"][0].w_K, alpha, rtol=1e-5)
  np.testing.assert_allclose(
    mixers.DoReMiProxy.average_weights(ms), alpha, rtol=1e-5
  )
  # The proxy's step is the optimiser's step on Σ_k α_k L_k.
  weight_B = alpha[d] / np.bincount(d, minlength=K)[d]
  _close(
    _one_step(trainer, p0, o0, batch, jnp.asarray(weight_B, jnp.float32)),
    state.params,
  )
  assert hist.last()["method/avg/0"] == pytest.approx(alpha[0], rel=1e-5)


# -------------------------------------------------------------------- ODM


def _exp3_numpy(log, losses, counts, scale=0.1):
  """π after each step from the sampler's log (the π each batch used)."""
  reward, eps, out = np.zeros(K), 1 / K, []
  for t, (pi_used, loss_K, count_K) in enumerate(zip(log, losses, counts), 1):
    n = count_K.sum()
    reward = reward + np.where(
      count_K > 0,
      scale * loss_K * count_K / (n * np.where(count_K > 0, pi_used, 1)),
      0,
    )
    prev, eps = eps, min(1 / K, np.sqrt(np.log(K) / (K * t)))
    soft = np.exp(prev * reward) / np.exp(prev * reward).sum()
    out.append((1 - K * eps) * soft + eps)
  return np.array(out)


@pytest.mark.parametrize("lag", [1, 0])
def test_odm_in_the_loop_is_exp3_on_the_sampled_batches(lag):
  steps = 40  # t > K ln K = 3.3: the distribution leaves uniform
  trainer = _trainer(mixers.OnlineDataMixing(lag=lag))
  src = _sources(valid=False, draw="iid")
  _, hist = trainer.run(Feeder(src, lag=lag), steps=steps)
  used = [w for w, _ in src["train"].log]
  losses = np.stack([hist.series(f"loss/domain/{n}")[1] for n in NAMES], 1)
  counts = np.stack([hist.series(f"count/domain/{n}")[1] for n in NAMES], 1)
  want = _exp3_numpy(used, losses, counts)
  _, got = mixers.weights_from_history(hist, "w", K)
  np.testing.assert_allclose(got, want, rtol=2e-4)
  # The sampler drew batch s with π after s - lag updates.
  for s in range(1, steps):
    np.testing.assert_allclose(
      used[s], got[max(s - lag, 0) - 1] if s - lag > 0 else 1 / 3, rtol=1e-6
    )
  assert np.abs(got[-1] - 1 / 3).max() > 0.01


# ---------------------------------------------- the sampler follows weights


def test_sampler_frequencies_follow_fixed_weights():
  w = (0.7, 0.2, 0.1)
  trainer = _trainer(mixers.FixedWeights(weights=w))
  src = _sources(valid=False, draw="iid", seed=3)
  trainer.run(src, steps=40)
  counts = np.bincount(
    np.concatenate([b["domain_B"] for _, b in src["train"].log]), minlength=K
  )
  assert stats.chisquare(counts, counts.sum() * np.array(w)).pvalue > 1e-3
  assert stats.chisquare(counts, counts.sum() / 3 * np.ones(3)).pvalue < 1e-6


@pytest.mark.slow
def test_sampler_draws_with_the_alignment_weights():
  trainer = _trainer(mixers.OnlineAlignment(beta=ALIGN_BETA, apply="sample"))
  src = _sources()
  _, hist = trainer.run(src, steps=5)
  _, w = mixers.weights_from_history(hist, "w", K)
  used = [x for x, _ in src["train"].log]
  np.testing.assert_allclose(used[0], 1 / 3)
  for s in range(2, 5):
    np.testing.assert_allclose(used[s], w[s - 2], rtol=1e-6)
  assert np.abs(w[-1] - 1 / 3).max() > 1e-3


# ------------------------------------------------------------------ resume


def _methods():
  return {
    "horizon": lambda: mixers.HorizonMixing(batch_spec=_spec(), **HORIZON),
    "alignment": lambda: mixers.OnlineAlignment(beta=ALIGN_BETA),
    "doremi": lambda: mixers.DoReMiProxy(
      reference=_reference_params(), excess="token", **DOREMI
    ),
    "odm": lambda: mixers.OnlineDataMixing(),
  }


def _bitwise(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_methods()))
def test_resume_mid_run_is_bitwise_identical(name, tmp_path):
  make = _methods()[name]
  valid = name in ("horizon", "alignment")
  ref, ref_hist = _trainer(make(), tmp_path / "a").run(
    _sources(valid=valid), steps=5
  )
  # Stop at step 3 (mid-round for T = 2), then a fresh trainer and fresh
  # samplers resume from the checkpoint at step 3.
  _trainer(make(), tmp_path / "b", checkpoint_every=3).run(
    _sources(valid=valid), steps=3
  )
  src = _sources(valid=valid)
  state, hist = _trainer(make(), tmp_path / "b").run(src, steps=5)
  assert int(state.step) == 5
  assert _bitwise(state, ref)
  assert hist.rows == ref_hist.rows
  assert int(jax.tree.leaves(state.extra["method"])[0].size) > 0


# -------------------------------------------------------------- bad input


def test_bad_inputs_are_clear_errors():
  with pytest.raises(
    ValueError, match="FixedWeights has 4 weights but the run has 3 domains"
  ):
    _trainer(mixers.FixedWeights(weights=(0.1, 0.2, 0.3, 0.4)))
  with pytest.raises(ValueError, match=r"weights = \(\) are invalid"):
    mixers.FixedWeights()
  with pytest.raises(
    ValueError, match=r"method 'alignment' needs the batch\(es\) 'valid'"
  ):
    _trainer(mixers.OnlineAlignment()).run(_sources(valid=False))
  with pytest.raises(
    ValueError, match="learns domain weights but the run has no domain names"
  ):
    Trainer(MODEL, _cfg(), method=mixers.OnlineDataMixing())
  with pytest.raises(
    ValueError, match="needs the reference model's parameters"
  ):
    _trainer(mixers.DoReMiProxy())
  wide = dataclasses.replace(MODEL, d_model=32, d_mlp=64)
  with pytest.raises(
    ValueError,
    match=r"reference model has another shape than the proxy: parameter .* is \(2, 16\) float32 in the reference but \(2, 8\) float32 in the proxy",
  ):
    _trainer(mixers.DoReMiProxy(reference=_reference_params(model=wide)))
  deep = dataclasses.replace(MODEL, num_layers=2)
  with pytest.raises(ValueError, match="reference has parameter"):
    _trainer(mixers.DoReMiProxy(reference=_reference_params(model=deep)))
  spec = mixers.batch_spec(
    MixtureSampler(_domains(), batch_size=B, seq_len=L + 2).next_batch()
  )
  with pytest.raises(
    ValueError, match="HorizonMixing stores training batches of spec"
  ):
    _trainer(mixers.HorizonMixing(T=2, batch_spec=spec)).run(
      _sources(), steps=1
    )
  with pytest.raises(ValueError, match="needs batch_spec"):
    mixers.HorizonMixing(T=2)
  with pytest.raises(ValueError, match="T = 0 is invalid"):
    mixers.HorizonMixing(T=0, batch_spec=spec)
  with pytest.raises(ValueError, match="mode = 'sideways' is invalid"):
    mixers.HorizonMixing(T=2, batch_spec=spec, mode="sideways")
  with pytest.raises(TypeError, match="init_for_run"):
    mixers.HorizonMixing(T=2, batch_spec=spec).init({}, None, 3)
  with pytest.raises(ValueError, match="apply = 'both' is invalid"):
    mixers.OnlineAlignment(apply="both")
  with pytest.raises(ValueError, match="lag = 2 is invalid"):
    mixers.OnlineDataMixing(lag=2)
  with pytest.raises(ValueError, match="excess = 'batch' is invalid"):
    mixers.DoReMiProxy(excess="batch")
