"""ScaleBiO: the penalty minimax's gradients, the method in the training
loop, LISA in u and w, exact resume, bad input.

Oracles: the penalty objective written out independently in this file,
differentiated by jax.grad and by central finite differences in float64;
the train step with plain SGD, whose parameter changes divided by the
learning rates are the three gradients; a toy with a pure-noise source.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.configs.base import ConfigError
from dataweights.data import instructions as pairs_lib
from dataweights.methods import scalebio as sb
from dataweights.train import lisa
from dataweights.train.loop import Trainer
from dataweights.train.scalebio import ScaleBiO, scalebio
from dataweights.train.step import lm_loss
from jaxpr_counts import count_primitive

pytestmark = pytest.mark.usefixtures("xla_cache")

V, D, L = 11, 4, 6


def _bigram_loss(params, batch):
  """Per-example masked next-token cross-entropy of a bigram model."""
  tok = batch["tokens_BxL"]
  logits = params["E"][tok[:, :-1]] @ params["W"]
  logp = jax.nn.log_softmax(logits, -1)
  nll = -jnp.take_along_axis(logp, tok[:, 1:, None], -1)[..., 0]
  mask = batch["mask_BxL"][:, 1:].astype(nll.dtype)
  return (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1)


def _objective(w, u, p_K, train, valid, alpha):
  """F(w, u, p) written from the paper's definition (Eq. 3)."""
  lam = jax.nn.softmax(p_K)
  lw, lu = _bigram_loss(w, train), _bigram_loss(u, train)
  tr_w = tr_u = 0.0
  for k in range(p_K.shape[0]):
    sel = (train["domain_B"] == k).astype(lw.dtype)
    n = sel.sum()
    tr_w = tr_w + jnp.where(
      n > 0, lam[k] * (sel * lw).sum() / jnp.maximum(n, 1), 0.0
    )
    tr_u = tr_u + jnp.where(
      n > 0, lam[k] * (sel * lu).sum() / jnp.maximum(n, 1), 0.0
    )
  return _bigram_loss(w, valid).mean() + alpha * (tr_w - tr_u)


def _toy(dtype, seed=0, k=3):
  rng = np.random.default_rng(seed)
  params = lambda: {  # noqa: E731
    "E": jnp.asarray(rng.normal(size=(V, D)), dtype),
    "W": jnp.asarray(rng.normal(size=(D, V)), dtype),
  }
  batch = lambda b: {  # noqa: E731
    "tokens_BxL": jnp.asarray(rng.integers(0, V, (b, L)), jnp.int32),
    "mask_BxL": jnp.asarray(rng.random((b, L)) < 0.7),
  }
  train = batch(9)
  # Source 2 of 4 is absent from the batch: its weight must get no gradient
  # from the gap (d_k = 0), only through the softmax.
  train["domain_B"] = jnp.asarray([0, 0, 1, 3, 3, 3, 1, 0, 3][:9], jnp.int32)
  return (
    params(),
    params(),
    jnp.asarray(rng.normal(size=k + 1), dtype),
    train,
    batch(5),
  )


def test_penalty_gradients_equal_autodiff_and_finite_differences():
  with jax.enable_x64(True):
    w, u, p, train, valid = _toy(jnp.float64)
    alpha = 3.0
    g_w, g_u, g_p, aux = sb.penalty_gradients(
      _bigram_loss, w, u, p, train, valid, alpha
    )
    dw, du, dp = jax.grad(_objective, argnums=(0, 1, 2))(
      w, u, p, train, valid, alpha
    )
    for a, b in zip(jax.tree.leaves(g_w), jax.tree.leaves(dw)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(jax.tree.leaves(g_u), jax.tree.leaves(du)):
      np.testing.assert_allclose(a, -b, rtol=1e-10, atol=1e-12)  # u ascends F
    np.testing.assert_allclose(g_p, dp, rtol=1e-10, atol=1e-12)
    assert abs(float(g_p.sum())) < 1e-12  # softmax: gradients sum to zero
    # The module's own objective agrees with the one written here.
    np.testing.assert_allclose(
      sb.penalty_objective(_bigram_loss, w, u, p, train, valid, alpha),
      _objective(w, u, p, train, valid, alpha),
      rtol=1e-12,
    )
    # Central finite differences along random directions.
    rng = np.random.default_rng(1)
    h = 1e-6
    f = lambda w, u, p: _objective(w, u, p, train, valid, alpha)  # noqa: E731
    for _ in range(3):
      vw = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), w)
      vu = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), u)
      vp = jnp.asarray(rng.normal(size=p.shape))
      for which, v, g, sign in (
        (0, vw, g_w, 1),
        (1, vu, g_u, -1),
        (2, vp, g_p, 1),
      ):
        args = [w, u, p]
        plus = list(args)
        minus = list(args)
        plus[which] = jax.tree.map(lambda x, d: x + h * d, args[which], v)
        minus[which] = jax.tree.map(lambda x, d: x - h * d, args[which], v)
        fd = (f(*plus) - f(*minus)) / (2 * h)
        an = sum(
          float(jnp.vdot(a, b))
          for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v))
        )
        np.testing.assert_allclose(sign * an, float(fd), rtol=1e-6, atol=1e-8)


def test_alpha_and_lr_rounds():
  assert float(sb.alpha_at(5, 10.0, 2.0, 0)) == 10.0
  np.testing.assert_allclose(
    [float(sb.alpha_at(s, 10.0, 2.0, 3)) for s in (0, 2, 3, 7)],
    [10, 10, 20, 40],
  )
  np.testing.assert_allclose(float(sb.lr_scale_at(7, 2.0, 3)), 0.25)


# ------------------------------------------------------------- in the loop --

B, BV, SEQ = 6, 4, 20
NAMES = ["a", "b", "c"]
MODEL = lm.lm_model(
  "smoke", num_layers=2, d_model=16, num_heads=2, d_mlp=32, max_len=SEQ - 1
)


def _sets(noise_source=False, n=30, seed=0):
  rng = np.random.default_rng(seed)
  prompts = ["".join(rng.choice(list("abcdef"), 6)) for _ in range(4 * n)]
  sets = []
  for j, name in enumerate(NAMES):
    ps = prompts[j * n : (j + 1) * n]
    if noise_source and name == "c":
      rs = ["".join(rng.choice(list("uvwxyz"), 6)) for _ in ps]
    else:
      rs = [p[::-1] for p in ps]
    sets.append(pairs_lib.PairSet.from_pairs(name, ps, rs, SEQ))
  # Validation: the clean rule on prompts of no source.
  vp = prompts[3 * n :]
  valid = pairs_lib.PairSet.from_pairs("valid", vp, [p[::-1] for p in vp], SEQ)
  return sets, valid


def _sources(noise_source=False, batch_fns=False):
  sets, valid = _sets(noise_source)
  tr = pairs_lib.PairSampler(sets, B, seed=0)
  va = pairs_lib.PairSampler([valid], BV, seed=0, stream=1)
  if batch_fns:
    return {"train": tr.batch, "valid": va.batch}
  return {"train": tr, "valid": va}


def _trainer(method, tmp=None, **kw):
  cfg = train_configs.train(
    "smoke",
    batch_size=B,
    checkpoint_dir=None if tmp is None else str(tmp),
    **{"steps": 6, **kw},
  )
  return Trainer(
    MODEL, cfg, method=method, domain_names=NAMES, tx=method.w_optimizer(cfg)
  )


def _host(x):
  return jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(x))


@pytest.mark.slow  # two trainer compiles: 10-50 s on 2 shared cores
@pytest.mark.parametrize("w_pass", ["joint", "split"])
def test_the_train_step_takes_the_three_penalty_gradients(w_pass):
  lr_w, lr_u, lr_p = 0.05, 0.03, 0.2
  method = scalebio(
    "smoke",
    optimizer="sgd",
    lr_u=lr_u,
    lr_p=lr_p,
    alpha=4.0,
    weight_decay_u=0.0,
    w_pass=w_pass,
  )
  trainer = _trainer(
    method,
    optimizer="sgd",
    b1=0.0,
    learning_rate=lr_w,
    schedule="constant",
    warmup_steps=0,
    grad_clip=0.0,
    weight_decay=0.0,
  )
  fns = _sources(batch_fns=True)
  s1 = _host(trainer.run(fns, steps=1)[0])  # u != w from here on
  s2 = _host(trainer.run(fns, steps=2)[0])
  graphdef = nnx.split(trainer.model(), nnx.Param)[0]

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    return lm_loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, None)

  m1 = s1.extra["method"]
  train, valid = fns["train"](1), fns["valid"](1)
  dw, du, dp = jax.grad(
    lambda w, u, p: sb.penalty_objective(loss_fn, w, u, p, train, valid, 4.0),
    argnums=(0, 1, 2),
  )(s1.params, m1["u"], m1["p_K"])
  m2 = s2.extra["method"]
  pairs = [
    (s1.params, s2.params, dw, lr_w, 1),
    (m1["u"], m2["u"], du, lr_u, -1),
    (m1["p_K"], m2["p_K"], dp, lr_p, 1),
  ]
  for before, after, grad, lr, sign in pairs:
    for a, b, g in zip(
      jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(grad)
    ):
      atol = 4 * float(np.spacing(np.float32(np.abs(a).max() + 1e-30))) / lr
      np.testing.assert_allclose(
        (a - b) / lr, sign * np.asarray(g), rtol=2e-3, atol=max(atol, 1e-6)
      )
  assert np.abs(m2["p_K"] - m1["p_K"]).max() > 1e-4  # p moved


@pytest.mark.slow  # 60 ScaleBiO steps: 10-50 s on 2 shared cores
def test_pure_noise_source_weight_falls_below_005():
  # The noise only shows once w and u have learnt the clean rule (then the
  # validation pull makes w worse than u on the noise): at lr 3e-3 the tiny
  # model had not (validation loss still 2.0 after 60 steps) and Adam on p,
  # fed near-zero gaps, drifted the noise weight back up to 0.54.
  method = scalebio("smoke", steps=60, lr_p=0.1, lr_u=1e-2, alpha=10.0)
  trainer = _trainer(
    method, steps=60, learning_rate=1e-2, warmup_steps=0, schedule="constant"
  )
  state, hist = trainer.run(_sources(noise_source=True))
  lam = np.asarray(sb.lambdas(state.extra["method"]["p_K"]))
  assert lam[2] < 0.05, lam
  # The two clean sources are exchangeable: Adam on p lets the weight
  # wander between them (no claim on the split), not to the noise.
  assert lam[0] + lam[1] > 0.95, lam
  steps, lam_c = hist.series("method/lambda/2")
  assert lam_c[-1] < lam_c[len(lam_c) // 2] < lam_c[0]


def _changed(a, b):
  return [
    any(
      np.asarray(x).tobytes() != np.asarray(y).tobytes()
      for x, y in zip(jax.tree.leaves(a[i]), jax.tree.leaves(b[i]))
    )
    for i in range(MODEL.num_layers)
  ]


@pytest.mark.slow
def test_lisa_freezes_the_same_blocks_in_u_and_w():
  model = lm.lm_model(
    "smoke", num_layers=3, d_model=16, num_heads=2, d_mlp=32, max_len=SEQ - 1
  )
  method = scalebio("smoke", lisa_active=1, lisa_period=2, lisa_seed=1)
  cfg = train_configs.train("smoke", batch_size=B, steps=8, warmup_steps=0)
  trainer = Trainer(
    model, cfg, method=method, domain_names=NAMES, tx=method.w_optimizer(cfg)
  )
  fns = _sources(batch_fns=True)
  prev = _host(trainer.state)
  actives = []
  for step in range(1, 7):
    cur = _host(trainer.run(fns, steps=step)[0])
    a_w = lisa.active_blocks(cur.opt_state)
    a_u = lisa.active_blocks(cur.extra["method"]["u_opt"])
    np.testing.assert_array_equal(a_w, a_u)
    want = [i in set(np.asarray(a_w).tolist()) for i in range(3)]
    w_ch = [
      any(
        np.asarray(x).tobytes() != np.asarray(y).tobytes()
        for x, y in zip(
          jax.tree.leaves(prev.params["blocks"][i]),
          jax.tree.leaves(cur.params["blocks"][i]),
        )
      )
      for i in range(3)
    ]
    u_ch = [
      any(
        np.asarray(x).tobytes() != np.asarray(y).tobytes()
        for x, y in zip(
          jax.tree.leaves(prev.extra["method"]["u"]["blocks"][i]),
          jax.tree.leaves(cur.extra["method"]["u"]["blocks"][i]),
        )
      )
      for i in range(3)
    ]
    assert w_ch == want and u_ch == want, (step, want, w_ch, u_ch)
    actives.append(tuple(np.asarray(a_w).tolist()))
    prev = cur
  assert len(set(actives)) > 1  # blocks were redrawn


@pytest.mark.slow  # up to 3 + 1 trainer compiles: 20-60 s on 2 shared cores
def test_fixed_lisa_blocks_equal_the_in_step_choice():
  # Oracle: the in-step mode (test_lisa_freezes_the_same_blocks_in_u_and_w
  # checks it freezes the right blocks). The lean mode compiles one step
  # per active set, in which frozen blocks are constants; with the split
  # w pass (the memory-lean combination). Equal up to float summation
  # order: the frozen blocks' weight-gradient matmuls are gone, nothing
  # else changes. w and u agree to 2e-5. p's gradient is alpha (m_w - m_u),
  # a difference of two per-source losses of about 2 nats whose gap is
  # small: its relative rounding error is about 4 ulp(L) / |gap|, and Adam
  # (scale-free) passes that on to p's step of size lr_p; the bound on p
  # sums it over the steps. AdamW's eps is 1e-4 (not 1e-8): the attention
  # key bias has a mathematically zero gradient, and with a tiny eps Adam
  # turns its float noise into steps of up to lr (the sharded test does the
  # same; see tests/sharding/test_scalebio_sharded.py).
  model = lm.lm_model(
    "smoke", num_layers=3, d_model=16, num_heads=2, d_mlp=32, max_len=SEQ - 1
  )
  method = scalebio(
    "smoke",
    lisa_active=1,
    lisa_period=2,
    lisa_seed=1,
    w_pass="split",
    eps=1e-4,
    lr_u=1e-2,
  )
  cfg = train_configs.train(
    "smoke",
    batch_size=B,
    steps=6,
    warmup_steps=0,
    eps=1e-4,
    learning_rate=1e-2,
  )
  states, hists = [], []
  for fixed in (None, method.lisa_schedule(3)):
    trainer = Trainer(
      model,
      cfg,
      method=method,
      domain_names=NAMES,
      tx=method.w_optimizer(cfg),
      fixed_blocks=fixed,
    )
    state, hist = trainer.run(_sources(batch_fns=True))
    states.append(_host(state))
    hists.append(hist)
    if fixed is not None:
      assert len(trainer._fixed_steps) > 1  # several periods, several sets
  dyn, lean = states
  for part in ("params", "opt_state"):
    for a, b in zip(
      jax.tree.leaves(getattr(dyn, part)), jax.tree.leaves(getattr(lean, part))
    ):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  for key in ("u", "u_opt"):
    for a, b in zip(
      jax.tree.leaves(dyn.extra["method"][key]),
      jax.tree.leaves(lean.extra["method"][key]),
    ):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  _, gap = hists[0].series("method/penalty_gap")
  _, loss = hists[0].series("method/train_loss_w")
  ulp = np.spacing(np.float32(np.max(loss)))
  bound = sum(
    method.lr_p * min(1.0, 4 * ulp / max(abs(g), 1e-30)) for g in gap[1:]
  )
  p_dyn, p_lean = dyn.extra["method"]["p_K"], lean.extra["method"]["p_K"]
  assert np.abs(p_dyn - p_lean).max() <= bound, (p_dyn - p_lean, bound)
  assert bound < 0.05 * np.abs(p_dyn).max()  # the check still means something
  np.testing.assert_array_equal(
    lisa.active_blocks(dyn.opt_state), lisa.active_blocks(lean.opt_state)
  )


def _step_inputs(trainer):
  fns = _sources(batch_fns=True)
  return trainer.state, {"train": fns["train"](0), "valid": fns["valid"](0)}


@pytest.mark.slow  # two compiles: 5-20 s on 2 shared cores
def test_split_w_pass_needs_less_temporary_memory():
  # Regression guard without timing: XLA's compiled memory analysis. The
  # joint pass holds B + BV = 10 rows at once, each split pass at most
  # B = 6 (and u's pass waits for both): activation-dominated temporaries
  # scale by about 0.6 (measured 0.68 at this shape); without the
  # barriers XLA overlaps the passes and the ratio goes to 1.
  temp = {}
  for w_pass in ("joint", "split"):
    trainer = _trainer(scalebio("smoke", w_pass=w_pass))
    ma = (
      jax.jit(trainer.step_fn)
      .lower(*_step_inputs(trainer))
      .compile()
      .memory_analysis()
    )
    temp[w_pass] = ma.temp_size_in_bytes
  assert temp["split"] < 0.8 * temp["joint"], temp


@pytest.mark.parametrize("w_pass, passes", [("joint", 2), ("split", 3)])
def test_fixed_lisa_blocks_drop_weight_gradients_in_every_pass(w_pass, passes):
  # Structural oracle: per frozen block and per backward pass, 4 weight-
  # gradient matmuls (the stacked query/key/value contraction, out, fc,
  # proj) disappear from the step's program; nothing else changes. Passes
  # with a backward: w's (1 joint or 2 split) and u's. No remat: with the
  # default policy one more matmul per frozen block goes (the recomputed
  # attention mix, which only out's weight gradient reads).
  model = lm.lm_model(
    "smoke",
    num_layers=3,
    d_model=16,
    num_heads=2,
    d_mlp=32,
    max_len=SEQ - 1,
    remat="none",
  )
  method = scalebio("smoke", lisa_active=1, lisa_period=2, w_pass=w_pass)
  cfg = train_configs.train("smoke", batch_size=B, steps=6, warmup_steps=0)
  trainer = Trainer(
    model, cfg, method=method, domain_names=NAMES, tx=method.w_optimizer(cfg)
  )
  state, batches = _step_inputs(trainer)

  def fixed(state, batches):
    with lisa.fixed_blocks(method.lisa_schedule(3)(0)):
      return trainer.step_fn(state, batches)

  full = count_primitive(jax.make_jaxpr(trainer.step_fn)(state, batches).jaxpr)
  lean = count_primitive(jax.make_jaxpr(fixed)(state, batches).jaxpr)
  assert full - lean == passes * 2 * 4, (full, lean)


@pytest.mark.slow
def test_resume_mid_run_is_bitwise_identical(tmp_path):
  method = scalebio("smoke", lisa_active=1, lisa_period=2)
  ref, ref_hist = _trainer(method, tmp_path / "a", checkpoint_every=3).run(
    _sources()
  )
  _trainer(method, tmp_path / "b", checkpoint_every=3).run(_sources(), steps=3)
  state, hist = _trainer(method, tmp_path / "b", checkpoint_every=3).run(
    _sources()
  )
  assert int(state.step) == 6
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert hist.rows == ref_hist.rows


def test_bad_inputs_are_clear_errors():
  with pytest.raises(
    ConfigError,
    match=r"ScaleBiO.alpha = 0 is invalid; it must be a finite number > 0",
  ):
    scalebio("smoke", alpha=0)
  with pytest.raises(ConfigError, match=r"ScaleBiO.alpha = -1.0 is invalid"):
    ScaleBiO(alpha=-1.0)
  with pytest.raises(ConfigError, match="unknown field.*alpah"):
    scalebio("smoke", alpah=1.0)
  with pytest.raises(ConfigError, match=r"ScaleBiO.w_pass = 'both' is invalid"):
    scalebio("smoke", w_pass="both")
  with pytest.raises(ConfigError, match="lisa_schedule needs LISA"):
    scalebio("smoke").lisa_schedule(2)
  with pytest.raises(
    ValueError, match="num_active = 3 is invalid: the model has only 2 blocks"
  ):
    _trainer(scalebio("smoke", lisa_active=3))
  cfg = train_configs.train("smoke", batch_size=B)
  with pytest.raises(ValueError, match="no source names; pass domain_names"):
    Trainer(MODEL, cfg, method=scalebio("smoke"))
  trainer = _trainer(scalebio("smoke"))
  with pytest.raises(ValueError, match=r"needs the batch\(es\) 'valid'"):
    trainer.run({"train": _sources()["train"]})
  with pytest.raises(ValueError, match="at least one source"):
    pairs_lib.PairSampler([], BV)
