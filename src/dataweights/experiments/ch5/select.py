"""Figure: selecting instruction pairs for a target (section 2).

The set-up (all seeded; ``cfg.seeds`` repeat it with new pools):

1. **Pool.** ``pool_per_source`` prompt/response pairs from each of
   ``cfg.sources`` (the ``dw_instructions`` train split); a fraction
   ``corrupt_rate`` of them get another pool pair's response
   (:func:`dataweights.data.sources.corrupt.corrupt_responses`: a
   mismatched answer, the label every score is checked against).
2. **Target.** ``seed_size`` clean pairs of ``cfg.target`` (train split,
   disjoint from the pool) are what the selectors see; ``eval_size`` pairs
   of its test split measure the result.
3. **Models.** A base byte transformer pre-trained on the generic text
   domains (once, shared by all seeds); a scoring model = the base
   fine-tuned on the whole pool for ``warmup_steps`` (G-DIG fine-tunes on
   the candidates; LESS warms up), with ``checkpoints`` checkpoints.
4. **Scores.** random; loss (the scoring model's per-example loss, lowest
   kept: a perplexity filter); classifier (byte n-gram logistic
   regression, seed vs pool); LESS (Adam-preconditioned projected gradients
   vs the seed's, cosine, summed over checkpoints with their learning
   rates); G-DIG quality (K-FAC influence on the seed batches over the MLP
   input layers, G-DIG's damping); G-DIG quality + diversity (k-means
   resampling, our reconstruction).
5. **Fine-tuning.** The base model is fine-tuned on each selection for the
   same number of steps and batch size (the project's train step, every run
   of a seed vectorised into one program); the target's held-out response
   loss is the outcome. The whole pool, fine-tuned the same way, is a
   reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dataweights.configs import influence as cfgs
from dataweights.configs import lm
from dataweights.configs import train as train_cfgs
from dataweights.data import instructions, pipeline, prepared, tokenize
from dataweights.data.sources import corrupt
from dataweights.data.sources.instructions import SOURCE_NAMES
from dataweights.experiments.ch5 import common
from dataweights.experiments.registry import Published, register
from dataweights.methods import influence, kfac, pergrad, subset
from dataweights.methods.projection import Projector
from dataweights.models.transformer import Transformer
from dataweights.train import optim
from dataweights.train.state import init_train_state
from dataweights.train.step import lm_loss, make_train_step

METHODS = cfgs.SELECTION_METHODS
SCORED = ("loss", "classifier", "less", "gdig_quality")
BASE_SEED = 0  # the shared base model's initialisation


# ------------------------------------------------------------------ data --


@functools.lru_cache(maxsize=4)
def _split(split: str) -> dict[str, Any]:
  return prepared.instruction_split(split)


def build_pool(cfg: cfgs.SelectionConfig, seed: int) -> dict[str, Any]:
  """The candidate pool, the target's seed and evaluation sets.

  Returns:
    ``{"pool": {"tokens_BxL", "mask_BxL"}, "source_N", "corrupted_N",
    "target_N", "seed": {...}, "eval": {...}, "prompts", "responses"}``.
  """
  rng = np.random.default_rng([seed, 0xC5])
  train, test = _split("train"), _split("test")
  prompts, responses, src = [], [], []
  seed_rows = None
  for name in cfg.sources:
    rows = np.flatnonzero(train["source_M"] == SOURCE_NAMES.index(name))
    need = cfg.pool_per_source + (cfg.seed_size if name == cfg.target else 0)
    if need > rows.size:
      raise ValueError(
        f"source {name!r} has {rows.size} training pairs; the pool needs {need}"
      )
    pick = rng.choice(rows, need, replace=False)
    if name == cfg.target:
      seed_rows, pick = pick[: cfg.seed_size], pick[cfg.seed_size :]
    prompts += [train["prompt"][i] for i in pick]
    responses += [train["response"][i] for i in pick]
    src += [cfg.sources.index(name)] * len(pick)
  order = rng.permutation(len(prompts))
  prompts = [prompts[i] for i in order]
  responses = [responses[i] for i in order]
  source_N = np.asarray(src, np.int32)[order]
  responses, corrupted_N = corrupt.corrupt_responses(
    responses, cfg.corrupt_rate, rng
  )

  def encode(ps, rs):
    s = instructions.PairSet.from_pairs("x", ps, rs, cfg.seq_len)
    return {"tokens_BxL": s.tokens_MxL, "mask_BxL": s.mask_MxL}

  test_rows = np.flatnonzero(test["source_M"] == SOURCE_NAMES.index(cfg.target))
  if cfg.eval_size > test_rows.size:
    raise ValueError(
      f"target {cfg.target!r} has {test_rows.size} test pairs; eval_size = "
      f"{cfg.eval_size}"
    )
  ev = np.sort(rng.choice(test_rows, cfg.eval_size, replace=False))
  return {
    "pool": encode(prompts, responses),
    "source_N": source_N,
    "corrupted_N": corrupted_N,
    "target_N": source_N == cfg.sources.index(cfg.target),
    "seed": encode(
      [train["prompt"][i] for i in seed_rows],
      [train["response"][i] for i in seed_rows],
    ),
    "eval": encode(
      [test["prompt"][i] for i in ev], [test["response"][i] for i in ev]
    ),
  }


@functools.lru_cache(maxsize=2)
def _generic_rows(seq_len: int) -> dict[str, np.ndarray]:
  """The generic text domains (train split), packed into rows."""
  text = prepared.text_split("train")
  docs = [tokenize.encode(t) for t in text["text"]]
  tokens, mask = pipeline.pack_documents(docs, seq_len, "pack")
  return {"tokens_BxL": tokens, "mask_BxL": mask}


# ---------------------------------------------------------------- models --


def model_config(cfg: cfgs.SelectionConfig) -> lm.ModelConfig:
  return lm.lm_model(
    "book",
    max_len=cfg.seq_len,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    d_model=cfg.d_model,
    d_mlp=cfg.d_mlp,
    remat="none",  # K-FAC taps need the blocks in the outer trace
  )


def _loss(model, batch):
  return lm_loss(model, batch, None)


@dataclasses.dataclass(frozen=True)
class _Phase:
  """A training phase compiled once: ``run(state, batches_TxBxL)``."""

  static: Any
  init: Any
  run: Any
  schedule: Any


@functools.lru_cache(maxsize=16)
def _phase(
  cfg: cfgs.SelectionConfig, steps: int, batch: int, vmapped: bool
) -> _Phase:
  tcfg = train_cfgs.train(
    "book",
    learning_rate=cfg.learning_rate,
    steps=steps,
    warmup_steps=max(1, steps // 10),
    batch_size=batch,
    schedule="cosine",
    progress=False,
  )
  tx = optim.make_optimizer(tcfg)
  model = Transformer(model_config(cfg), rngs=nnx.Rngs(BASE_SEED))
  state0, static, _ = init_train_state(model, tx, seed=BASE_SEED)
  step = make_train_step(static, loss_fn=lm_loss)

  def scan(state, batches):
    def body(s, b):
      s, m = step(s, b)
      return s, m["loss"]

    return jax.lax.scan(body, state, batches)

  run = jax.jit(jax.vmap(scan, in_axes=(None, 0)) if vmapped else scan)

  def init(params):
    return state0.replace(
      params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32)
    )

  return _Phase(static, init, run, optim.make_schedule(tcfg))


def _schedule_rows(rng, rows: np.ndarray, steps: int, batch: int) -> np.ndarray:
  """``steps x batch`` row indices: epochs of fresh permutations of ``rows``."""
  need = steps * batch
  reps = -(-need // rows.size)
  order = np.concatenate([rng.permutation(rows) for _ in range(reps)])
  return order[:need].reshape(steps, batch)


def _batches(data: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, Any]:
  return {k: jnp.asarray(v[idx]) for k, v in data.items()}


@functools.lru_cache(maxsize=2)
def base_params(cfg: cfgs.SelectionConfig) -> Any:
  """The base model: random init, pre-trained on the generic text domains."""
  model = Transformer(model_config(cfg), rngs=nnx.Rngs(BASE_SEED))
  params = nnx.state(model, nnx.Param)
  if cfg.pretrain_steps == 0:
    return params
  rows = _generic_rows(cfg.seq_len)
  ph = _phase(cfg, cfg.pretrain_steps, cfg.pretrain_batch, False)
  rng = np.random.default_rng([BASE_SEED, 0xBA5E])
  idx = _schedule_rows(
    rng,
    np.arange(rows["tokens_BxL"].shape[0]),
    cfg.pretrain_steps,
    cfg.pretrain_batch,
  )
  state, _ = ph.run(ph.init(params), _batches(rows, idx))
  return state.params


@functools.lru_cache(maxsize=2)
def _programs(cfg: cfgs.SelectionConfig) -> dict[str, Any]:
  """Per-example features, K-FAC statistics and evaluation, compiled once."""
  model = Transformer(model_config(cfg), rngs=nnx.Rngs(BASE_SEED))
  gd, _, rest = nnx.split(model, nnx.Param, ...)
  kfac.check_layers(model, cfg.gdig_layers)
  proj = Projector(dim=cfg.proj_dim, seed=0xC5)
  adam = train_cfgs.train("book")  # the phases' b1, b2, eps

  def loss_p(p, b):
    return _loss(nnx.merge(gd, p, rest, copy=True), b)

  @jax.jit
  def features(params, mu, nu, batch):
    """(Adam-preconditioned, plain) projected gradients and the losses."""

    def feat(g):
      pre = influence.adam_precondition(
        g, mu, nu, b1=adam.b1, b2=adam.b2, eps=adam.eps
      )
      return proj.project(pre), proj.project(g)

    pre, plain = pergrad.per_example_features(
      loss_p, params, batch, feature_fn=feat, chunk_size=cfg.chunk_size
    )
    return pre, plain, loss_p(params, batch)

  @jax.jit
  def plain_features(params, batch):
    return pergrad.per_example_features(
      loss_p,
      params,
      batch,
      feature_fn=proj.project,
      chunk_size=cfg.chunk_size,
    )

  @jax.jit
  def stats(params, batch):
    return kfac.layer_stats(_loss, gd, params, rest, batch, cfg.gdig_layers)

  @jax.jit
  def gdig_scores(params, batch, u_list):
    st = kfac.layer_stats(_loss, gd, params, rest, batch, cfg.gdig_layers)
    return [influence.gdig_scores_from_stats(st, u) for u in u_list]

  @jax.jit
  def eval_loss(params, batch):
    return jnp.mean(loss_p(params, batch))

  return {
    "features": features,
    "plain_features": plain_features,
    "stats": stats,
    "gdig_scores": gdig_scores,
    "eval_loss": eval_loss,
    "eval_many": jax.jit(jax.vmap(eval_loss, in_axes=(0, None))),
  }


def _chunks(batch: dict[str, np.ndarray], size: int) -> list[dict[str, Any]]:
  n = batch["tokens_BxL"].shape[0]
  return [
    {k: jnp.asarray(v[i : i + size]) for k, v in batch.items()}
    for i in range(0, n, size)
  ]


# ---------------------------------------------------------------- scores --


def scores_for(
  cfg: cfgs.SelectionConfig, seed: int, data: dict[str, Any]
) -> dict[str, Any]:
  """Warm-up on the pool, then every rule's score (higher = keep)."""
  prog = _programs(cfg)
  pool, seed_set = data["pool"], data["seed"]
  subset.check_same_modality(pool, seed_set)
  n = pool["tokens_BxL"].shape[0]
  seg = cfg.warmup_steps // cfg.checkpoints
  ph = _phase(cfg, cfg.warmup_steps, cfg.warmup_batch, False)
  rng = np.random.default_rng([seed, 0x3A])
  idx = _schedule_rows(rng, np.arange(n), cfg.warmup_steps, cfg.warmup_batch)
  state = ph.init(base_params(cfg))
  less_tr, less_va, lrs = [], [], []
  for c in range(cfg.checkpoints):
    # one segment of the same cosine schedule per checkpoint
    sl = slice(c * seg, (c + 1) * seg)
    state, _ = _run_segment(ph, state, _batches(pool, idx[sl]))
    mu, nu = influence.adam_moments(state.opt_state)
    pre, plain, loss_N = prog["features"](
      state.params, mu, nu, {k: jnp.asarray(v) for k, v in pool.items()}
    )
    less_tr.append(np.asarray(pre))
    less_va.append(
      np.asarray(
        prog["plain_features"](
          state.params, {k: jnp.asarray(v) for k, v in seed_set.items()}
        )
      )
    )
    lrs.append(float(ph.schedule(int(state.step) - 1)))
  warm = state.params
  out: dict[str, Any] = {
    "less": influence.less_scores(less_tr, less_va, lrs),
    "loss": -np.asarray(loss_N, np.float64),
    "features": np.asarray(plain),
    "lrs": lrs,
    "warm": warm,
  }

  def ngrams(b):
    return subset.byte_ngram_features(
      b["tokens_BxL"], b["tokens_BxL"] != tokenize.PAD_ID
    )

  out["classifier"] = subset.classifier_scores(
    ngrams(seed_set), ngrams(pool), steps=cfg.classifier_steps
  )
  # G-DIG: K-FAC of the empirical Fisher on the pool at the final checkpoint.
  stats_fn = lambda b: prog["stats"](warm, b)
  fit = kfac.fit_kfac(stats_fn, _chunks(pool, 100), ekfac=True)
  seeds_b = _chunks(seed_set, cfg.seed_batch)
  settings = [(cfg.gdig_method, cfg.gdig_damping)] + [
    (m, lam) for m in ("kfac", "ekfac") for lam in cfg.damping_sweep
  ]
  us = [
    influence.gdig_direction(fit, stats_fn, seeds_b, damping=lam, method=m)
    for m, lam in settings
  ]
  parts = [prog["gdig_scores"](warm, b, us) for b in _chunks(pool, 100)]
  s_all = [
    np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(len(us))
  ]
  out["gdig_quality"] = -s_all[0]  # most negative influence = most helpful
  out["gdig_sweep"] = {
    f"{m}@{lam:g}": -s for (m, lam), s in zip(settings[1:], s_all[1:])
  }
  return out


def _run_segment(ph: _Phase, state, batches):
  return ph.run(state, batches)


# ------------------------------------------------------------- selection --


def select(
  cfg: cfgs.SelectionConfig, seed: int, sc: dict[str, Any], budget: int
) -> dict[str, np.ndarray]:
  """Indices chosen by every rule at one budget."""
  n = sc["less"].shape[0]
  out = {"random": subset.random_subset(seed + 7919 * budget, n, budget)}
  for name in ("loss", "classifier", "less", "gdig_quality"):
    out[name] = subset.top_k(sc[name], budget)
  div = subset.quality_diversity_select(
    sc["gdig_quality"],
    sc["features"],
    budget,
    num_clusters=cfg.num_clusters,
    keep_factor=cfg.keep_factor,
    seed=seed,
    helpful="high",
  )
  out["gdig_diverse"] = div["selected"]
  return out


def _study(cfg: cfgs.SelectionConfig, seed: int) -> dict[str, Any]:
  data = build_pool(cfg, seed)
  pool = data["pool"]
  n = pool["tokens_BxL"].shape[0]
  sc = scores_for(cfg, seed, data)
  budgets = [subset.budget_of(b, n) for b in cfg.budgets]
  chosen = {b: select(cfg, seed, sc, b) for b in budgets}
  # Fine-tune the base on every selection (and the whole pool) at once.
  runs = [(m, b) for b in budgets for m in METHODS] + [("full pool", n)]
  rng = np.random.default_rng([seed, 0xF7])
  idx = np.stack(
    [
      _schedule_rows(
        rng,
        np.arange(n) if m == "full pool" else np.sort(chosen[b][m]),
        cfg.finetune_steps,
        cfg.finetune_batch,
      )
      for m, b in runs
    ]
  )
  ph = _phase(cfg, cfg.finetune_steps, cfg.finetune_batch, True)
  base = base_params(cfg)
  states, _ = ph.run(ph.init(base), _batches(pool, idx))
  prog = _programs(cfg)
  ev = {k: jnp.asarray(v) for k, v in data["eval"].items()}
  losses = np.asarray(prog["eval_many"](states.params, ev))
  _, cluster_N = subset.kmeans(
    subset.normalize_rows(sc["features"]), cfg.num_clusters, seed
  )
  result: dict[str, Any] = {
    "base_loss": float(prog["eval_loss"](base, ev)),
    "warm_loss": float(prog["eval_loss"](sc["warm"], ev)),
    "full_pool_loss": float(losses[-1]),
    "budgets": {},
    "auroc_clean": {
      m: subset.auroc(sc[m], ~data["corrupted_N"]) for m in SCORED
    },
    "auroc_target": {m: subset.auroc(sc[m], data["target_N"]) for m in SCORED},
    "sweep_auroc_clean": {
      k: subset.auroc(v, ~data["corrupted_N"])
      for k, v in sc["gdig_sweep"].items()
    },
    "sweep_auroc_target": {
      k: subset.auroc(v, data["target_N"]) for k, v in sc["gdig_sweep"].items()
    },
    "pool_corrupted": float(data["corrupted_N"].mean()),
    "pool_target": float(data["target_N"].mean()),
  }
  for j, (m, b) in enumerate(runs[:-1]):
    sel = chosen[b][m]
    cov = subset.cluster_coverage(cluster_N, sel, cfg.num_clusters)
    result["budgets"].setdefault(str(b), {})[m] = {
      "target_loss": float(losses[j]),
      "corrupted": float(data["corrupted_N"][sel].mean()),
      "target_share": float(data["target_N"][sel].mean()),
      "covered": cov["covered"],
      "entropy": cov["entropy"],
    }
  return result


def run(cfg: cfgs.SelectionConfig) -> dict[str, Any]:
  """Every seed's study and the across-seed means with t-intervals."""
  per = [_study(cfg, s) for s in cfg.seeds]
  out: dict[str, Any] = {
    "seeds": list(cfg.seeds),
    "pool_size": len(cfg.sources) * cfg.pool_per_source,
    "per_seed": per,
  }
  agg: dict[str, Any] = {}
  for key in (
    "base_loss",
    "warm_loss",
    "full_pool_loss",
    "pool_corrupted",
    "pool_target",
  ):
    agg[key] = common.mean_ci([p[key] for p in per])
  for key in (
    "auroc_clean",
    "auroc_target",
    "sweep_auroc_clean",
    "sweep_auroc_target",
  ):
    agg[key] = {
      m: common.mean_ci([p[key][m] for p in per]) for m in per[0][key]
    }
  agg["budgets"] = {}
  for b in per[0]["budgets"]:
    agg["budgets"][b] = {
      m: {
        k: common.mean_ci([p["budgets"][b][m][k] for p in per])
        for k in per[0]["budgets"][b][m]
      }
      for m in METHODS
    }
    # paired differences against random (common random numbers: same pool)
    agg["budgets"][b]["vs_random"] = {
      m: common.mean_ci(
        [
          p["budgets"][b][m]["target_loss"]
          - p["budgets"][b]["random"]["target_loss"]
          for p in per
        ]
      )
      for m in METHODS
      if m != "random"
    }
  out["summary"] = agg
  return common.r(out)


def summary(data: dict[str, Any]) -> str:
  """Target loss, corrupted and target shares, coverage; AUROCs."""
  s = data["summary"]
  rows = []
  for b in sorted(s["budgets"], key=int):
    per = s["budgets"][b]
    for m in METHODS:
      v = per[m]
      d = per["vs_random"].get(m)
      rows.append(
        [
          b,
          m,
          common.fmt_ci(v["target_loss"], 3),
          "-" if d is None else common.fmt_ci(d, 3),
          f"{v['corrupted']['mean']:.2f}",
          f"{v['target_share']['mean']:.2f}",
          f"{v['covered']['mean']:.2f}",
        ]
      )
  t1 = common.fmt_table(
    [
      "budget",
      "method",
      "target loss",
      "minus random",
      "corrupt",
      "target",
      "coverage",
    ],
    rows,
  )
  rows2 = [
    [m, common.fmt_ci(s["auroc_clean"][m]), common.fmt_ci(s["auroc_target"][m])]
    for m in SCORED
  ]
  t2 = common.fmt_table(["score", "AUROC clean", "AUROC target"], rows2)
  ref = (
    f"base {s['base_loss']['mean']:.3f}, scoring model {s['warm_loss']['mean']:.3f}, "
    f"whole pool {common.fmt_ci(s['full_pool_loss'], 3)}; pool corrupted "
    f"{s['pool_corrupted']['mean']:.2f}, target share {s['pool_target']['mean']:.2f}"
  )
  sweep = s["sweep_auroc_clean"]
  rows3 = [
    [
      k.split("@")[0],
      k.split("@")[1],
      common.fmt_ci(v),
      common.fmt_ci(s["sweep_auroc_target"][k]),
    ]
    for k, v in sorted(
      sweep.items(),
      key=lambda kv: (
        cfgs.KFAC_METHODS.index(kv[0].split("@")[0]),
        float(kv[0].split("@")[1]),
      ),
    )
  ]
  t3 = common.fmt_table(
    ["G-DIG curvature", "damping", "AUROC clean", "AUROC target"], rows3
  )
  return t1 + "\n\n" + t2 + "\n\n" + t3 + "\n\n" + ref


def _plot(data):
  from dataweights.experiments.ch5 import plots

  return plots.plot_selection(data)


register(
  Published(
    name="ch5_select",
    chapter="ch5_influence",
    run=run,
    make_config=cfgs.SelectionConfig,
    config=cfgs.selection,
    summary=summary,
    plot=_plot,
  )
)
