"""Training loop: optimiser factories, accumulation, jit, resume, NaN guard."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights.checkpoint import CheckpointError, CheckpointManager
from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.configs.base import ConfigError
from dataweights.models.transformer import Transformer
from dataweights.train import optim
from dataweights.train.loop import (
  NonFiniteError,
  Trainer,
  lm_from_state,
  train_lm,
)
from dataweights.train.state import init_train_state
from dataweights.train.step import GUARDS, guard_for, make_train_step
from jaxpr_counts import count_primitive

B, L, K = 4, 9, 3
NAMES = ["web", "code", "noise"]


pytestmark = pytest.mark.usefixtures("xla_cache")


class ToyRegressor(nnx.Module):
  """A linear model with a rank-1 'norm scale': cheap to compile and run."""

  def __init__(self, rngs):
    self.scale = nnx.Param(jnp.ones(5))
    self.lin = nnx.Linear(5, 1, rngs=rngs)

  def __call__(self, x_BxD):
    return self.lin(x_BxD * self.scale[...][None, :])[:, 0]


def toy_loss(model, batch, key):
  pred_B = model(batch["x_BxD"])
  if key is not None:
    pred_B = pred_B + 0.01 * jax.random.normal(key, pred_B.shape)
  return (pred_B - batch["y_B"]) ** 2


def toy_batch(seed, batch_size=8):
  rng = np.random.default_rng(seed)
  return {
    "x_BxD": jnp.asarray(rng.normal(size=(batch_size, 5)), jnp.float32),
    "y_B": jnp.asarray(rng.normal(size=batch_size), jnp.float32),
    "domain_B": jnp.asarray(rng.integers(0, K, batch_size), jnp.int32),
    "weight_B": jnp.asarray(rng.uniform(0.1, 2, batch_size), jnp.float32),
  }


def toy_setup(train_cfg, extra=None):
  tx = optim.make_optimizer(train_cfg)
  state, static, _ = init_train_state(
    ToyRegressor(nnx.Rngs(0)), tx, seed=0, extra=extra
  )
  return state, static


def tiny_model_cfg(**kw):
  base = dict(num_layers=1, d_model=16, num_heads=2, d_mlp=32, max_len=16)
  return lm.lm_model("smoke", **{**base, **kw})


def tiny_train_cfg(**kw):
  return train_configs.train("smoke", **kw)


def make_batch(seed, batch_size=B, weights=False):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch_size, L), np.float32)
  mask[0, L - 3 :] = 0  # a right-padded example
  out = {
    "tokens_BxL": rng.integers(0, 256, (batch_size, L)).astype(np.int32),
    "mask_BxL": mask,
    "domain_B": rng.integers(0, K, batch_size).astype(np.int32),
  }
  if weights:
    out["weight_B"] = rng.uniform(0.1, 2.0, batch_size).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in out.items()}


def _allclose(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol
    )


def _bitwise_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
  )


# --- optimiser factories -----------------------------------------------------


def test_schedules_match_closed_forms():
  cfg = tiny_train_cfg(
    learning_rate=0.1, warmup_steps=10, steps=110, min_lr_ratio=0.1
  )
  cos = optim.make_schedule(cfg)
  assert float(cos(0)) == 0.0
  assert float(cos(5)) == pytest.approx(0.05)
  assert float(cos(10)) == pytest.approx(0.1)
  assert float(cos(60)) == pytest.approx(0.01 + 0.09 * 0.5, rel=1e-5)
  assert float(cos(110)) == pytest.approx(0.01, rel=1e-5)
  inv = optim.make_schedule(dataclasses.replace(cfg, schedule="inverse_sqrt"))
  assert float(inv(5)) == pytest.approx(0.05)
  assert float(inv(40)) == pytest.approx(0.1 * np.sqrt(10 / 40), rel=1e-6)
  const = optim.make_schedule(dataclasses.replace(cfg, schedule="constant"))
  assert float(const(3)) == pytest.approx(0.03)
  assert float(const(1000)) == pytest.approx(0.1)


def test_weight_decay_skips_biases_and_norms():
  # Zero gradients: the only change is decoupled decay lr * wd * p, and only
  # on rank >= 2 parameters.
  cfg = tiny_train_cfg(
    learning_rate=0.1,
    warmup_steps=0,
    schedule="constant",
    weight_decay=0.5,
    grad_clip=0.0,
  )
  params = {
    "kernel": jnp.ones((2, 3)),
    "bias": jnp.ones(3),
    "ln": {"scale": jnp.ones(3)},
  }
  for name in ("adamw", "sgd"):
    tx = optim.make_optimizer(dataclasses.replace(cfg, optimizer=name, b1=0.0))
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(
      upd["kernel"], -0.05 * np.ones((2, 3)), rtol=1e-6
    )
    np.testing.assert_array_equal(upd["bias"], 0.0)
    np.testing.assert_array_equal(upd["ln"]["scale"], 0.0)


def test_clipping_bounds_the_update():
  cfg = tiny_train_cfg(
    optimizer="sgd",
    b1=0.0,
    learning_rate=1.0,
    warmup_steps=0,
    schedule="constant",
    weight_decay=0.0,
    grad_clip=2.0,
  )
  tx = optim.make_optimizer(cfg)
  g = {"a": jnp.array([30.0, 40.0])}
  upd, _ = tx.update(g, tx.init(g), g)
  np.testing.assert_allclose(upd["a"], [-1.2, -1.6], rtol=1e-6)


def test_config_errors_are_clear():
  with pytest.raises(ConfigError, match="optimizer = 'lion'.*'adamw'"):
    tiny_train_cfg(optimizer="lion")
  with pytest.raises(ConfigError, match="accumulation_steps = 3 must divide"):
    tiny_train_cfg(batch_size=4, accumulation_steps=3)
  with pytest.raises(ConfigError, match="weight_decay.*adam"):
    tiny_train_cfg(optimizer="adam", weight_decay=0.1)
  assert train_configs.train("paper").batch_size == 128
  assert (
    train_configs.train("paper", **train_configs.GPT2_124M).batch_size == 512
  )


# --- the step ------------------------------------------------------------------


def _setup(train_cfg, *, extra=None, seed=0):
  model = Transformer(tiny_model_cfg(), rngs=nnx.Rngs(seed))
  tx = optim.make_optimizer(train_cfg)
  state, static, _ = init_train_state(model, tx, seed=seed, extra=extra)
  return state, static


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_equals_one_big_batch_toy(optimizer):
  # Per-example and domain weights depend on the whole batch; accumulating
  # over 4 microbatches must still give the big-batch update, also through
  # Adam's normalisation.
  cfg = tiny_train_cfg(
    optimizer=optimizer,
    batch_size=8,
    warmup_steps=0,
    schedule="constant",
    learning_rate=0.05,
  )
  extra = {"w_K": jnp.array([0.6, 0.3, 0.1])}
  out = []
  for acc in (1, 4):
    state, static = toy_setup(cfg, extra)
    step = jax.jit(
      make_train_step(
        static, loss_fn=toy_loss, accumulation_steps=acc, domain_names=NAMES
      )
    )
    for i in range(3):
      state, m = step(state, toy_batch(i))
    out.append((state, m))
  (s1, m1), (s4, m4) = out
  _allclose(s1.params, s4.params)
  _allclose(s1.opt_state, s4.opt_state)
  for key in ("loss", "grad_norm", "loss/domain/web", "count/domain/code"):
    np.testing.assert_allclose(m1[key], m4[key], rtol=1e-5)
  assert not _bitwise_equal(s1.params, toy_setup(cfg, extra)[0].params)


@pytest.mark.slow  # two transformer compiles: 10-60 s on a shared 2-core CPU
def test_accumulation_equals_one_big_batch_transformer():
  # SGD: the update is -lr * gradient, so this compares the accumulated
  # gradient itself. (Under Adam, parameters whose exact gradient is 0 --
  # the attention key bias, by softmax shift invariance -- get float noise
  # normalised to +-lr, which differs between the two summation orders.)
  cfg = tiny_train_cfg(
    optimizer="sgd",
    b1=0.9,
    batch_size=8,
    warmup_steps=0,
    schedule="constant",
    learning_rate=0.5,
    grad_clip=0.0,
  )
  extra = {"w_K": jnp.array([0.6, 0.3, 0.1])}
  batch = make_batch(3, batch_size=8, weights=True)
  out = []
  for acc in (1, 4):
    state, static = _setup(cfg, extra=extra)
    step = jax.jit(
      make_train_step(static, accumulation_steps=acc, domain_names=NAMES)
    )
    state, _ = step(state, batch)
    state, m = step(state, batch)
    out.append((state, m, static))
  (s1, m1, _), (s4, m4, _) = out
  _allclose(s1.params, s4.params, rtol=1e-5, atol=1e-6)
  for key in ("loss", "grad_norm", "loss/domain/web", "count/domain/code"):
    np.testing.assert_allclose(m1[key], m4[key], rtol=1e-5)


def test_weighted_objective_and_domain_metrics():
  cfg = tiny_train_cfg()
  w_K = jnp.array([0.5, 0.3, 0.2])
  state, static = toy_setup(cfg, {"w_K": w_K})
  batch = toy_batch(5)
  _, m = jax.jit(make_train_step(static, loss_fn=toy_loss, domain_names=NAMES))(
    state, batch
  )
  loss_B = toy_loss(static.model(state), batch, None)
  weight_B = batch["weight_B"]
  d_B = np.asarray(batch["domain_B"])
  # Direct formula: per-example weight w_B times w_K[d] / n_K[d].
  n_K = np.bincount(d_B, minlength=K)
  eff_B = np.asarray(weight_B) * np.asarray(w_K)[d_B] / n_K[d_B]
  want = float(np.sum(eff_B * np.asarray(loss_B)) / np.sum(eff_B))
  np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(m["loss/mean"], float(jnp.mean(loss_B)), rtol=1e-5)
  for k, name in enumerate(NAMES):
    sel = d_B == k
    direct = float(np.asarray(loss_B)[sel].mean()) if sel.any() else 0.0
    np.testing.assert_allclose(m[f"loss/domain/{name}"], direct, rtol=1e-5)
    assert m[f"count/domain/{name}"] == sel.sum()


def _direct_objective(scale_D, kernel_Dx1, bias_1, batch, eff_B):
  """``Σ_b eff_b loss_b / Σ_b eff_b`` for ToyRegressor, written out."""
  pred_B = (batch["x_BxD"] * scale_D[None, :]) @ kernel_Dx1[:, 0] + bias_1[0]
  loss_B = (pred_B - batch["y_B"]) ** 2
  return jnp.sum(eff_B * loss_B) / jnp.sum(eff_B)


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("acc", [1, 4])
@pytest.mark.parametrize("domain_weights", [False, True])
def test_step_gradient_equals_grad_of_the_direct_formula(
  acc, domain_weights, guard
):
  # Oracle: jax.grad (float64) of the weighted objective written out by
  # hand, with the effective weights computed in numpy. SGD with lr 1, no
  # momentum, clipping or decay: the update is exactly minus the gradient.
  # Non-uniform weights (one zero) with a weight sum far from the batch
  # size, so dividing by B instead of Σ w would show.
  cfg = tiny_train_cfg(
    optimizer="sgd",
    b1=0.0,
    batch_size=8,
    learning_rate=1.0,
    warmup_steps=0,
    schedule="constant",
    weight_decay=0.0,
    grad_clip=0.0,
  )
  w_K = np.array([0.6, 0.3, 0.1])
  state, static = toy_setup(
    cfg, {"w_K": jnp.asarray(w_K)} if domain_weights else None
  )
  batch = toy_batch(4)
  batch["weight_B"] = 3.0 * batch["weight_B"].at[2].set(0.0)
  step = jax.jit(
    make_train_step(
      static, loss_fn=toy_loss, accumulation_steps=acc, guard=guard
    )
  )
  new, m = step(state, batch)
  np_batch = {k: np.asarray(v, np.float64) for k, v in batch.items()}
  eff_B = np_batch["weight_B"].copy()
  if domain_weights:
    d_B = np.asarray(batch["domain_B"])
    n_K = np.bincount(d_B, minlength=K)
    eff_B *= w_K[d_B] / n_K[d_B]
  assert not 0.5 < eff_B.sum() / 8 < 2  # Σ w is far from the batch size
  p = {
    k: np.asarray(v, np.float64)
    for k, v in (
      ("scale", state.params["scale"][...]),
      ("kernel", state.params["lin"]["kernel"][...]),
      ("bias", state.params["lin"]["bias"][...]),
    )
  }
  with jax.enable_x64(True):
    want = jax.grad(_direct_objective, argnums=(0, 1, 2))(
      p["scale"], p["kernel"], p["bias"], np_batch, eff_B
    )
    want_loss = float(
      _direct_objective(p["scale"], p["kernel"], p["bias"], np_batch, eff_B)
    )
  got = (
    p["scale"] - np.asarray(new.params["scale"][...]),
    p["kernel"] - np.asarray(new.params["lin"]["kernel"][...]),
    p["bias"] - np.asarray(new.params["lin"]["bias"][...]),
  )
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-6)
  want_norm = np.sqrt(sum(np.sum(np.asarray(w) ** 2) for w in want))
  np.testing.assert_allclose(m["grad_norm"], want_norm, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(m["weight_sum"], eff_B.sum(), rtol=1e-6)


def test_domain_weights_without_domain_ids_raise():
  state, static = toy_setup(tiny_train_cfg(), {"w_K": jnp.ones(K) / K})
  batch = toy_batch(0)
  del batch["domain_B"]
  with pytest.raises(ValueError, match="no 'domain_B'"):
    jax.eval_shape(make_train_step(static, loss_fn=toy_loss), state, batch)


def test_jit_equals_no_jit():
  cfg = tiny_train_cfg(warmup_steps=0, schedule="constant")
  state, static = toy_setup(cfg, {"w_K": jnp.array([0.5, 0.3, 0.2])})
  fn = make_train_step(
    static, loss_fn=toy_loss, domain_names=NAMES, use_rng=True
  )
  batch = toy_batch(1)
  eager_state, eager_m = fn(state, batch)
  jit_state, jit_m = jax.jit(fn)(state, batch)
  _allclose(eager_state.params, jit_state.params)
  _allclose(eager_m, jit_m, rtol=1e-5, atol=1e-6)
  assert int(jit_state.step) == 1


@pytest.mark.parametrize("guard", GUARDS)
def test_nonfinite_step_is_skipped_inside_the_step(guard):
  state, static = toy_setup(tiny_train_cfg())
  batch = toy_batch(2)
  batch["weight_B"] = batch["weight_B"].at[1].set(jnp.nan)
  step = make_train_step(static, loss_fn=toy_loss, guard=guard)
  new, m = jax.jit(step)(state, batch)
  assert m["nonfinite"] == 1.0 and np.isnan(m["loss"])
  assert int(new.step) == 0 and _bitwise_equal(new.params, state.params)
  assert _bitwise_equal(new.opt_state, state.opt_state)


@pytest.mark.parametrize(
  "kink",
  [
    # sqrt at 0: value 0, derivative +inf (scale starts at exactly 1).
    pytest.param(lambda s: jnp.sqrt(s - 1.0), id="inf_grad"),
    # sqrt(u²) at 0: value 0, derivative inf * 0 = NaN.
    pytest.param(lambda s: jnp.sqrt((s - 1.0) ** 2), id="nan_grad"),
  ],
)
@pytest.mark.parametrize("guard", GUARDS)
def test_finite_loss_with_nonfinite_gradient_is_skipped(kink, guard):
  # The loss stays finite: only a guard that also checks the gradient
  # catches this step.
  def loss_fn(model, batch, key):
    return toy_loss(model, batch, key) + kink(model.scale[...][0])

  state, static = toy_setup(tiny_train_cfg())
  assert float(state.params["scale"][...][0]) == 1.0
  new, m = jax.jit(make_train_step(static, loss_fn=loss_fn, guard=guard))(
    state, toy_batch(2)
  )
  assert np.isfinite(m["loss"]) and not np.isfinite(m["grad_norm"])
  assert m["nonfinite"] == 1.0
  assert int(new.step) == 0 and _bitwise_equal(new.params, state.params)
  assert _bitwise_equal(new.opt_state, state.opt_state)


def test_guard_is_one_cond_or_per_leaf_selects_and_checked():
  # "cond" keeps the old state by one lax.cond and no per-leaf select;
  # "select" by no cond. The values are checked by the oracle tests above.
  state, static = toy_setup(tiny_train_cfg())
  batch = toy_batch(2)
  n = len(jax.tree.leaves(state))
  counts = {}
  for guard in GUARDS:
    step = make_train_step(static, loss_fn=toy_loss, guard=guard)
    jaxpr = jax.make_jaxpr(step)(state, batch).jaxpr
    counts[guard] = (
      count_primitive(jaxpr, "cond"),
      count_primitive(jaxpr, "select_n"),
    )
  assert counts["cond"][0] == counts["select"][0] + 1
  assert counts["select"][1] >= counts["cond"][1] + n - 1
  with pytest.raises(ValueError, match=r"guard='where'; allowed: select, cond"):
    make_train_step(static, loss_fn=toy_loss, guard="where")


def test_guard_for_mesh():
  assert guard_for(None) == "select"
  one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  assert guard_for(one) == "select"


# --- the loop: resume, NaN guard ---------------------------------------------


class ToySampler:
  """A deterministic sampler with JSON state, like the data pipeline's."""

  def __init__(self, seed=0):
    self.seed, self.pos = seed, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.pos += 1
    return make_batch(1000 * self.seed + self.pos, weights=True)

  def get_state(self):
    return {"seed": self.seed, "pos": self.pos}

  def set_state(self, d):
    self.seed, self.pos = d["seed"], d["pos"]


# All loop tests share one model/step config, so the XLA cache compiles once.
LOOP_MODEL = dict(dropout=0.1)  # dropout: the RNG key matters on resume
LOOP_TRAIN = dict(steps=6, accumulation_steps=2)
LOOP_EXTRA = {"w_K": jnp.array([0.5, 0.3, 0.2])}


def loop_trainer(ckpt_dir, **kw):
  cfg = tiny_train_cfg(checkpoint_dir=str(ckpt_dir), **{**LOOP_TRAIN, **kw})
  return Trainer(
    tiny_model_cfg(**LOOP_MODEL), cfg, extra=LOOP_EXTRA, domain_names=NAMES
  )


def test_resume_is_bitwise_identical(tmp_path):
  full = loop_trainer(tmp_path / "a", checkpoint_every=3)
  ref_state, ref_hist = full.run(ToySampler())
  full.close()

  first = loop_trainer(tmp_path / "b", checkpoint_every=3)
  first.run(ToySampler(), steps=3)
  first.close()
  # As in a fresh process: a new trainer (fresh initial state) and sampler.
  second = loop_trainer(tmp_path / "b", checkpoint_every=3)
  assert int(second.state.step) == 0
  state, hist = second.run(ToySampler())
  second.close()
  assert int(state.step) == 6
  assert _bitwise_equal(state, ref_state)
  assert hist.rows == ref_hist.rows and len(hist) == 6
  assert "loss/domain/web" in hist.last()
  assert CheckpointManager(tmp_path / "b").steps() == [3, 6]
  rebuilt = lm_from_state(tiny_model_cfg(**LOOP_MODEL), state)
  assert _bitwise_equal(nnx.state(rebuilt, nnx.Param), state.params)
  assert not _bitwise_equal(
    state.params, loop_trainer(tmp_path / "c").state.params
  )


def test_resume_refuses_other_config_and_overwrite(tmp_path):
  trainer = loop_trainer(tmp_path, checkpoint_every=2)
  trainer.run(ToySampler(), steps=2)
  trainer.close()
  with pytest.raises(CheckpointError, match="already holds checkpoints"):
    loop_trainer(tmp_path).run(ToySampler(), resume=False)
  with pytest.raises(CheckpointError, match=r"train\.learning_rate"):
    loop_trainer(tmp_path, learning_rate=0.5).run(ToySampler())
  with pytest.raises(CheckpointError, match=r"model\.d_mlp"):
    train_lm(
      tiny_model_cfg(d_mlp=64, **LOOP_MODEL),
      tiny_train_cfg(checkpoint_dir=str(tmp_path), **LOOP_TRAIN),
      ToySampler(),
      extra=LOOP_EXTRA,
    )


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
  sampler = ToySampler()

  class Poisoned(ToySampler):
    def __next__(self):
      batch = super().__next__()
      if self.pos == 5:  # the 5th update
        batch["weight_B"] = batch["weight_B"].at[0].set(jnp.inf)
      return batch

  del sampler
  trainer = loop_trainer(tmp_path, checkpoint_every=2)
  with pytest.raises(NonFiniteError) as err:
    trainer.run(Poisoned())
  msg = str(err.value)
  assert "step 5" in msg and "loss" in msg and "checkpoint: step 4" in msg
  assert err.value.step == 5 and err.value.checkpoint_step == 4
  assert int(err.value.state.step) == 4
  assert CheckpointManager(tmp_path).latest_step() == 4
  # The last good checkpoint restores and equals the last good state.
  fresh = loop_trainer(tmp_path)
  fresh.restore()
  assert int(fresh.state.step) == 4
  assert _bitwise_equal(fresh.state, err.value.state)


@pytest.mark.slow  # compiles the smoke transformer: ~10-30 s on 2 shared cores
def test_example_runs_and_resumes(tmp_path, capsys):
  from dataweights.train import example

  args = [
    "--profile",
    "smoke",
    "--synthetic",
    "--steps",
    "2",
    "--checkpoint-dir",
    str(tmp_path),
  ]
  assert example.main(args) == 0
  assert "synthetic bytes" in capsys.readouterr().out
  assert example.main(args) == 0
  out = capsys.readouterr().out
  assert "resuming from the checkpoint at step 2" in out
  assert "done at step 2" in out

  # A corrupt checkpoint is one clear line naming the remedy, not a traceback.
  for f in tmp_path.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  assert example.main(args) == 1
  captured = capsys.readouterr()
  assert captured.err.startswith("error: ") and "--fresh" in captured.err
  assert "Traceback" not in captured.err
  assert example.main([*args, "--fresh"]) == 0
  assert "done at step 2" in capsys.readouterr().out


def test_grouped_optimizer_updates_groups_apart_and_frozen_has_no_state():
  model = Transformer(tiny_model_cfg(num_layers=2), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  sgd = tiny_train_cfg(
    optimizer="sgd",
    b1=0.0,
    grad_clip=0.0,
    weight_decay=0.0,
    schedule="constant",
    warmup_steps=0,
    learning_rate=0.1,
  )
  adam = tiny_train_cfg(
    optimizer="adam",
    weight_decay=0.0,
    grad_clip=0.0,
    schedule="constant",
    warmup_steps=0,
    learning_rate=0.01,
  )
  tx = optim.make_grouped_optimizer(
    {"embed": sgd, "block/0": optim.FROZEN, "block/1": adam, "head": sgd}
  )
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
  upd, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(upd["wte"][...], -0.2, rtol=1e-6)  # sgd: -lr * g
  np.testing.assert_array_equal(
    upd["blocks"][0]["mlp"]["fc"]["kernel"][...], 0.0
  )
  # adam's first step is -lr * sign(g) (bias-corrected moments, eps tiny)
  np.testing.assert_allclose(
    upd["blocks"][1]["mlp"]["fc"]["kernel"][...], -0.01, rtol=1e-5
  )
  # The frozen block holds no optimiser state: no array in the state has
  # its shapes beyond those of the other groups' parameters.
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  n_adam = sum(x.size for x in jax.tree.leaves(params["blocks"][1]))
  assert n_state == 2 * n_adam  # mu and nu of block 1 only
  with pytest.raises(ValueError, match=r"group\(s\) 'head' have no optimiser"):
    optim.make_grouped_optimizer(
      {"embed": sgd, "block/0": sgd, "block/1": sgd}
    ).init(params)
