"""Online filtering methods: wiring, behaviour, resume and bad input.

* The methods' steps equal the generic cores of ``methods.metagrad`` applied
  by hand (SOBA fused and unfused; DDS; Anograd; mixing), and the step's
  gradient equals ``jax.grad`` of the kept rows' mean loss.
* Behaviour: a generic pool of copies of the specific distribution plus
  noise; every method keeps far more copies than their base rate.
* Resume mid-run is bit-identical (φ, v, every optimiser state, the
  prefetching feed); bad inputs fail with clear messages.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.configs.base import ConfigError
from dataweights.data import filter_feed, mixture, pipeline
from dataweights.data.pipeline import DomainSource
from dataweights.methods import metagrad
from dataweights.methods import selection as sel
from dataweights.models import classifier
from dataweights.models import weighting_net as wn
from dataweights.train import filtering as F
from dataweights.train.loop import Trainer
from dataweights.train.method import StepContext

pytestmark = pytest.mark.usefixtures("xla_cache")

SCORER = wn.ScorerConfig(modality="image", image_pixels=16, hidden=8)
B, G, S = 8, 32, 6


def _images(rng, m, noise=False):
  proto = np.random.default_rng(123).uniform(0, 1, (10, 4, 4))
  y = rng.integers(0, 10, m)
  x = proto[y] + 0.1 * rng.normal(size=(m, 4, 4))
  if noise:
    x = rng.uniform(0, 1, (m, 4, 4))
  return x.astype(np.float32), y.astype(np.int32)


def _linear_loss(params, batch, weight_B=None, key=None):
  del weight_B, key
  x = batch["x_BxHxW"].reshape(batch["x_BxHxW"].shape[0], -1)
  logits = x @ params["w"] + params["b"][None, :]
  y = batch["y_B"]
  picked = jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
  return jax.nn.logsumexp(logits, -1) - picked


def _ctx(step=0, seed=0):
  rng = np.random.default_rng(seed)
  xg, yg = _images(rng, G)
  xs, ys = _images(rng, S)
  gen = {"x_BxHxW": jnp.asarray(xg), "y_B": jnp.asarray(yg)}
  batches = {
    "generic": gen,
    "train": {k: v[:B] for k, v in gen.items()},
    "specific": {"x_BxHxW": jnp.asarray(xs), "y_B": jnp.asarray(ys)},
  }
  params = {
    "w": jnp.asarray(rng.normal(size=(16, 10)) * 0.3, jnp.float32),
    "b": jnp.zeros(10, jnp.float32),
  }

  def grad_fn(p, batch, weight_B):
    w = jnp.ones(batch["y_B"].shape[0]) if weight_B is None else weight_B

    def objective(q):
      loss_B = _linear_loss(q, batch)
      return jnp.sum(w * loss_B) / w.sum(), loss_B

    (loss, loss_B), g = jax.value_and_grad(objective, has_aux=True)(p)
    return loss, loss_B, g

  return StepContext(
    step=jnp.asarray(step, jnp.int32),
    key=jax.random.key(7),
    params=params,
    model_state=None,
    batches=batches,
    loss_fn=_linear_loss,
    grad_fn=grad_fn,
  )


def _close(a, b, rtol=2e-5, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol
    )


def _mean_loss_grad(ctx, batch):
  return jax.grad(lambda p: jnp.mean(_linear_loss(p, batch)))(ctx.params)


def _adam(lr, params, g):
  tx = optax.adam(lr)
  upd, _ = tx.update(g, tx.init(params), params)
  return optax.apply_updates(params, upd)


@pytest.mark.parametrize("fused", [True, False])
def test_soba_step_equals_the_generic_cores(fused):
  ctx = _ctx()
  m = F.SOBA(
    scorer=SCORER, v_optimizer="sgd", v_lr=0.05, damping=0.1, fused=fused
  )
  ms = m.init(ctx.params, jax.random.key(3), None)
  # A non-zero v, so that H v and the cross-derivative matter.
  ms["v"] = jax.tree.map(
    lambda x: jnp.asarray(
      np.random.default_rng(1).normal(size=x.shape), x.dtype
    ),
    ms["v"],
  )
  batch, w_B, ms1 = m.select(ms, ctx)
  assert w_B is None and batch["y_B"].shape == (B,)
  ones = jnp.ones(B, jnp.float32)
  out = m.loss_and_grads(ms1, ctx, batch, ones, None)
  if fused:
    (loss, loss_B, grads, wsum), ms1 = out
  else:
    assert out is None
    loss, loss_B, grads = ctx.grad_fn(ctx.params, batch, ones)
  grads2, ms2, metrics = m.update(ms1, ctx, grads, loss_B, batch)
  assert set(ms2) == set(ms)  # scratch removed: the state keeps its layout
  _close(grads2, _mean_loss_grad(ctx, batch))
  uniform = metagrad.weighted_examples(
    _linear_loss, lambda p, b: jnp.full((b["y_B"].shape[0],), 1.0 / B)
  )
  want_v = metagrad.soba_v_update(
    uniform,
    ctx.params,
    None,
    batch,
    ctx.batches["specific"],
    ms["v"],
    0.05,
    0.1,
  )
  _close(ms2["v"], want_v)
  softmax = metagrad.weighted_examples(
    _linear_loss,
    lambda p, b: jax.nn.softmax(wn.apply_scorer(SCORER, "score", p, b)),
  )
  g_phi = metagrad.soba_metagrad(softmax, ctx.params, ms["phi"], batch, ms["v"])
  assert float(optax.tree.norm(g_phi)) > 1e-6
  _close(ms2["phi"], _adam(m.meta_lr, ms["phi"], g_phi))
  assert np.isfinite(float(metrics["v_residual"]))


def test_dds_and_anograd_steps_equal_the_generic_cores():
  ctx = _ctx(seed=2)
  for m, core in (
    (F.DDS(scorer=SCORER, lookahead_lr=0.3), "dds"),
    (F.Anograd(scorer=SCORER, eps=1e-6), "anograd"),
  ):
    ms = m.init(ctx.params, jax.random.key(4), None)
    batch, _, ms1 = m.select(ms, ctx)
    _, loss_B, grads = ctx.grad_fn(ctx.params, batch, None)
    _, ms2, metrics = m.update(ms1, ctx, grads, loss_B, batch)
    n = B if core == "dds" else S
    rows = sel.random_rows(jax.random.fold_in(ctx.key, 2), G, n)
    inner = sel.take_rows(ctx.batches["generic"], rows)
    problem = metagrad.weighted_examples(_linear_loss, m.weights)
    if core == "dds":
      g_phi, _ = metagrad.dds_metagrad(
        problem, ctx.params, ms["phi"], inner, ctx.batches["specific"], 0.3
      )
    else:
      g_phi, _ = metagrad.anograd_metagrad(
        problem, ctx.params, ms["phi"], inner, ctx.batches["specific"], 1e-6
      )
    assert float(optax.tree.norm(g_phi)) > 1e-7
    _close(ms2["phi"], _adam(m.meta_lr, ms["phi"], g_phi))


def test_mixing_gradient_is_the_convex_combination():
  ctx = _ctx(seed=3)
  m = F.Mixing(specific_weight=0.25)
  batch, _, ms = m.select({}, ctx)
  _, loss_B, grads = ctx.grad_fn(ctx.params, batch, None)
  got, _, _ = m.update(ms, ctx, grads, loss_B, batch)
  want = jax.tree.map(
    lambda a, b: 0.75 * a + 0.25 * b,
    _mean_loss_grad(ctx, ctx.batches["train"]),
    _mean_loss_grad(ctx, ctx.batches["specific"]),
  )
  _close(got, want)


def test_meta_every_skips_the_meta_step():
  m = F.SOBA(scorer=SCORER, meta_every=3)
  for step, runs in ((0, True), (1, False), (3, True)):
    ctx = _ctx(step=step)
    ms = m.init(ctx.params, jax.random.key(3), None)
    batch, _, ms1 = m.select(ms, ctx)
    (_, loss_B, grads, _), ms1 = m.loss_and_grads(
      ms1, ctx, batch, jnp.ones(B), None
    )
    _close(grads, _mean_loss_grad(ctx, batch))  # the step itself always runs
    _, ms2, metrics = m.update(ms1, ctx, grads, loss_B, batch)
    moved = any(
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(ms2), jax.tree.leaves(ms))
    )
    assert moved == runs and float(metrics["meta_step"]) == float(runs)


# ---------------------------------------------------------------- behaviour --


def _pool(seed, m_gen=2000, m_spec=200, copy_frac=0.25):
  rng = np.random.default_rng(seed)
  n_copy = int(copy_frac * m_gen)
  xc, yc = _images(rng, n_copy)
  xn, yn = _images(rng, m_gen - n_copy, noise=True)
  xs, ys = _images(rng, m_spec)
  gen = {
    "x_BxHxW": np.concatenate([xc, xn]),
    "y_B": np.concatenate([yc, yn]),
    "domain_B": np.concatenate(
      [np.zeros(n_copy, np.int32), np.ones(m_gen - n_copy, np.int32)]
    ),
  }
  spec = {"x_BxHxW": xs, "y_B": ys, "domain_B": np.zeros(m_spec, np.int32)}
  return gen, spec


MODEL = classifier.ImageMLPConfig(image_pixels=16, hidden=32, num_classes=10)


def _image_trainer(method, steps, b=16, **kw):
  cfg = train_configs.train(
    "smoke",
    batch_size=b,
    steps=steps,
    learning_rate=3e-3,
    warmup_steps=5,
    schedule="constant",
    weight_decay=0.0,
    **kw,
  )
  return Trainer(
    MODEL,
    cfg,
    model_factory=classifier.image_mlp,
    loss_fn=classifier.classification_loss,
    domain_names=("copy", "noise"),
    method=method,
  )


def _copy_pool():
  """Generic = a copy of the specific distribution + other text + noise."""
  rng = np.random.default_rng(0)
  mk = lambda name, lo, hi: DomainSource(  # noqa: E731
    name,
    [
      {
        "text": bytes(
          rng.integers(lo, hi, rng.integers(20, 60)).astype(np.uint8)
        )
      }
      for _ in range(40)
    ],
  )
  return [mk("copy", 97, 105), mk("other", 110, 123), mk("noise", 33, 64)], mk(
    "target", 97, 105
  )


BEHAVIOUR_SCORER = wn.ScorerConfig(embed_dim=8, channels=8, kernel_size=3)
BEHAVIOUR = {
  "classifier": F.Classifier(scorer=BEHAVIOUR_SCORER, meta_lr=3e-2),
  "cds": F.CDS(scorer=BEHAVIOUR_SCORER, meta_lr=3e-2, warmup=20),
  # A look-ahead step much smaller than the reference's 0.1: at this scale
  # 0.1 overshoots once the copies are learned (DDS then turns away).
  "dds": F.DDS(scorer=BEHAVIOUR_SCORER, meta_lr=3e-2, lookahead_lr=1e-2),
  "anograd": F.Anograd(scorer=BEHAVIOUR_SCORER, meta_lr=3e-2),
  "soba": F.SOBA(scorer=BEHAVIOUR_SCORER, meta_lr=3e-2, v_lr=1e-2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BEHAVIOUR))
def test_every_method_keeps_the_specific_copies(name):
  gen, target = _copy_pool()
  b, steps = 8, 150
  pipe = pipeline.pipeline(
    "smoke", seq_len=17, batch_size=b, downsampling=4, specific_batch_size=b
  )
  feed = filter_feed.FilterFeed(mixture.FilterStreams(gen, target, pipe), b)
  cfg = train_configs.train(
    "smoke",
    batch_size=b,
    steps=steps,
    learning_rate=1e-2,
    warmup_steps=5,
    schedule="constant",
  )
  trainer = Trainer(
    LM, cfg, method=BEHAVIOUR[name], domain_names=("copy", "other", "noise")
  )
  _, hist = trainer.run(feed.sources())
  s, copies = hist.series("count/domain/copy")
  late = np.asarray(copies)[np.asarray(s) > steps - 50] / b
  # Base rate: the copies are 1/3 of the pool's documents. 50 steps x 8 rows
  # kept at that rate would give a mean with sd 0.024.
  assert late.mean() > 1 / 3 + 0.3, (name, late.mean())


# ------------------------------------------------------------------ resume --


def _text_domains():
  rng = np.random.default_rng(0)
  mk = lambda name, lo, hi: DomainSource(  # noqa: E731
    name,
    [
      {
        "text": bytes(
          rng.integers(lo, hi, rng.integers(20, 60)).astype(np.uint8)
        )
      }
      for _ in range(15)
    ],
  )
  return [mk("a", 97, 110), mk("b", 110, 123), mk("noise", 33, 64)], mk(
    "t", 97, 105
  )


LM = lm.lm_model(
  "smoke", num_layers=1, d_model=16, num_heads=2, d_mlp=32, max_len=16
)
TEXT_SCORER = wn.ScorerConfig(embed_dim=8, channels=8, kernel_size=3)
PIPE = pipeline.pipeline(
  "smoke", seq_len=17, batch_size=4, downsampling=3, specific_batch_size=4
)


def _text_run(tmp, method, steps=None, prefetch=2):
  gen, spec = _text_domains()
  feed = filter_feed.FilterFeed(
    mixture.FilterStreams(gen, spec, PIPE), PIPE.batch_size, prefetch=prefetch
  )
  cfg = train_configs.train(
    "smoke", batch_size=4, steps=6, checkpoint_dir=str(tmp), checkpoint_every=2
  )
  trainer = Trainer(LM, cfg, method=method, domain_names=("a", "b", "noise"))
  try:
    state, hist = trainer.run(feed.sources(), steps=steps)
  finally:
    trainer.close()
    feed.close()
  return state, hist


def _bitwise(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
  )


@pytest.mark.parametrize(
  "method",
  [
    F.SOBA(scorer=TEXT_SCORER, v_optimizer="adam"),
    F.CDS(scorer=TEXT_SCORER, warmup=2),
  ],
  ids=["soba", "cds"],
)
def test_resume_mid_run_is_bitwise_identical(tmp_path, method):
  ref, ref_hist = _text_run(tmp_path / "a", method)
  _text_run(tmp_path / "b", method, steps=3)
  state, hist = _text_run(tmp_path / "b", method)  # a new trainer and feed
  assert int(state.step) == 6
  assert _bitwise(state, ref)  # params, Adam, φ, v, v's Adam, CDS models
  assert hist.rows == ref_hist.rows
  ms = state.extra["method"]
  assert ("v" in ms) == isinstance(method, F.SOBA)


# --------------------------------------------------------------- bad input --


def test_bad_inputs_fail_clearly(tmp_path):
  with pytest.raises(ConfigError, match="downsampling = 0 is invalid"):
    pipeline.pipeline("smoke", downsampling=0)
  # A big batch smaller than the kept batch (downsampling < 1).
  gen, spec = _pool(1, m_gen=100, m_spec=20)
  streams = filter_feed.ArrayStreams(
    gen, spec, generic_batch_size=8, specific_batch_size=8
  )
  with pytest.raises(
    ValueError, match=r"downsampling G / B = 0.5 must be >= 1"
  ):
    _image_trainer(F.DDS(scorer=SCORER), 2).run(
      filter_feed.FilterFeed(streams, 16).sources()
    )
  # A specific set smaller than its batch.
  with pytest.raises(
    ValueError,
    match="the specific set has 20 examples, fewer than its batch of 32",
  ):
    filter_feed.ArrayStreams(
      gen, spec, generic_batch_size=64, specific_batch_size=32
    )
  tgen, tspec = _text_domains()
  tiny = DomainSource("t", [{"text": b"abc"}])
  with pytest.raises(
    ValueError, match="specific domain 't' has 5 tokens, fewer than"
  ):
    mixture.FilterStreams(tgen, tiny, PIPE)
  # A weighting network for the wrong modality.
  with pytest.raises(ValueError, match="modality 'image' needs batch key"):
    _text_run(tmp_path, F.SOBA(scorer=SCORER))
  with pytest.raises(ValueError, match="modality 'bytes' needs batch key"):
    wn.apply_scorer(
      TEXT_SCORER, "score", None, {"x_BxHxW": jnp.zeros((2, 4, 4))}
    )
  with pytest.raises(ConfigError, match="head 'lm' is invalid for a 'image'"):
    wn.init_scorer(SCORER, "lm", jax.random.key(0))
  with pytest.raises(ValueError, match="selection = 'best' is invalid"):
    F.DDS(scorer=SCORER, selection="best")
  with pytest.raises(ValueError, match="meta_every = 0 is invalid"):
    F.SOBA(scorer=SCORER, meta_every=0)
  with pytest.raises(ValueError, match="v_optimizer = 'lbfgs' is invalid"):
    F.SOBA(scorer=SCORER, v_optimizer="lbfgs")


def test_methods_are_hashable_and_named():
  for name, cls in F.METHODS.items():
    m = cls() if name in ("base", "mixing") else cls(scorer=SCORER)
    assert m.name == name and hash(m) == hash(dataclasses.replace(m))
