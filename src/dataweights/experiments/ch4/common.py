"""Shared machinery of Chapter 4: pre-training, data, vmapped runs, eval.

* :func:`pretrained`: the small byte-level decoder every experiment starts
  from, trained here on the generic text mixture (the English
  ``dw_text_domains``, uniform weights) with the project's
  :class:`~dataweights.train.loop.Trainer`; cached per process (the chapter
  runs it once for all its experiments). The ``paper`` profile instead
  loads GPT-2 124M from a local safetensors file
  (:func:`dataweights.models.gpt2.load_gpt2_safetensors`) and maps the
  byte rows to GPT-2's single-byte tokens (:func:`gpt2_ids`).
* :func:`run_scalebio` / :func:`run_finetune`: several seeds at once, as
  one ``jax.vmap`` of the project's train step
  (:func:`dataweights.train.step.make_train_step` with the
  :class:`~dataweights.train.scalebio.ScaleBiO` method, or plain), compiled
  once per experiment.
* :func:`eval_loss`: mean per-example response loss over a whole set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.configs.scalebio import ScaleBiOChapterConfig
from dataweights.data import instructions as pairs_lib
from dataweights.data import tokenize
from dataweights.train import optim
from dataweights.train.scalebio import ScaleBiO
from dataweights.train.state import init_train_state
from dataweights.train.step import lm_loss, make_train_step


def model_config(cfg: ScaleBiOChapterConfig) -> lm.ModelConfig:
  """The decoder of the chapter (byte-level; GPT-2 for ``gpt2_path``)."""
  if cfg.gpt2_path:
    return lm.lm_model(cfg.profile, size="gpt2-124m")
  return lm.lm_model(
    "book",
    d_model=cfg.d_model,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    d_mlp=4 * cfg.d_model,
    max_len=cfg.seq_len - 1,
  )


# ------------------------------------------------------------ pre-training --


def _pretrain_key(cfg: ScaleBiOChapterConfig) -> tuple:
  return (
    cfg.d_model,
    cfg.num_layers,
    cfg.num_heads,
    cfg.seq_len,
    cfg.pretrain_steps,
    cfg.pretrain_batch,
    cfg.pretrain_lr,
    cfg.gpt2_path,
  )


@functools.lru_cache(maxsize=4)
def _pretrained(key: tuple, profile: str) -> tuple[Any, Any]:
  d, layers, heads, seq_len, steps, batch, lr, gpt2_path = key
  cfg = ScaleBiOChapterConfig(
    profile=profile,
    d_model=d,
    num_layers=layers,
    num_heads=heads,
    seq_len=seq_len,
    pretrain_steps=steps,
    pretrain_batch=batch,
    pretrain_lr=lr,
    gpt2_path=gpt2_path,
  )
  model_cfg = model_config(cfg)
  if gpt2_path:
    from dataweights.models import gpt2

    model = gpt2.load_gpt2_safetensors(gpt2_path, model_cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, jax.device_get(params)
  from dataweights.data import mixture, pipeline
  from dataweights.data.sources.text import ENGLISH_DOMAINS
  from dataweights.train.loop import Trainer

  domains = pipeline.prepared_domains("train", domains=ENGLISH_DOMAINS)
  sampler = mixture.MixtureSampler(
    domains,
    batch_size=batch,
    seq_len=seq_len,
    seed=0,
    weights=np.full(len(domains), 1.0 / len(domains)),
  )
  train_cfg = train_configs.train(
    "book",
    learning_rate=lr,
    schedule="cosine",
    warmup_steps=min(20, max(steps // 10, 0)),
    steps=max(steps, 1),
    batch_size=batch,
    progress=False,
    log_every=max(steps, 1),
  )
  trainer = Trainer(model_cfg, train_cfg)
  if steps:
    trainer.run(sampler)
  graphdef = nnx.split(trainer.model(), nnx.Param)[0]
  return graphdef, jax.device_get(trainer.state.params)


def pretrained(cfg: ScaleBiOChapterConfig) -> tuple[Any, Any]:
  """``(graphdef, params)`` of the starting model (host arrays, cached)."""
  return _pretrained(_pretrain_key(cfg), cfg.profile)


# -------------------------------------------------------------------- data --


@functools.lru_cache(maxsize=8)
def _split(split: str) -> dict[str, Any]:
  from dataweights.data import prepared

  return prepared.instruction_split(split)


def pair_sets(
  split: str, sources: Sequence[str], seq_len: int
) -> list[pairs_lib.PairSet]:
  """One encoded set per source of a ``dw_instructions`` split."""
  return pairs_lib.pair_sets(_split(split), seq_len, list(sources))


def merged(sets: Sequence[pairs_lib.PairSet], name: str) -> pairs_lib.PairSet:
  """Several sets as one (a validation set from several sources)."""
  return pairs_lib.PairSet(
    name,
    np.concatenate([s.tokens_MxL for s in sets]),
    np.concatenate([s.mask_MxL for s in sets]),
  )


def _bytes_to_unicode_order() -> list[int]:
  """GPT-2's byte order: the single-byte token ``i`` is byte ``order[i]``.

  Radford et al.'s byte-level BPE maps the printable bytes ``!..~``,
  ``\\xa1..\\xac``, ``\\xae..\\xff`` to themselves and the other 68 bytes
  to code points from 256 on; its first 256 vocabulary entries are these
  characters in that order.
  """
  keep = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(0xA1, 0xAD))
    + list(range(0xAE, 0x100))
  )
  return keep + [b for b in range(256) if b not in keep]


GPT2_EOT = 50256


def gpt2_ids(tokens: np.ndarray) -> np.ndarray:
  """Byte rows as GPT-2 token ids: every byte its single-byte token,
  BOS/EOS/PAD -> ``<|endoftext|>`` (50256), SEP -> the newline token."""
  order = _bytes_to_unicode_order()
  table = np.empty(tokenize.VOCAB_SIZE, np.int32)
  table[np.asarray(order)] = np.arange(256)
  table[tokenize.PAD_ID] = table[tokenize.BOS_ID] = GPT2_EOT
  table[tokenize.EOS_ID] = GPT2_EOT
  table[tokenize.SEP_ID] = table[ord("\n")]
  table[tokenize.SEP_ID + 1 :] = GPT2_EOT
  return table[np.asarray(tokens)]


def _host_batch(cfg: ScaleBiOChapterConfig, batch: dict) -> dict:
  if cfg.gpt2_path:
    batch = dict(batch, tokens_BxL=gpt2_ids(batch["tokens_BxL"]))
  return batch


# --------------------------------------------------------- vmapped training --


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


_PROGRAMS: dict[Any, tuple[Any, Any]] = {}


def _program(key: Any, graphdef: Any, tx: Any, method, num_sources: int):
  """``(static, jitted vmapped step)``, built once per ``key`` per process.

  The chapter's experiments with the same shapes and hyperparameters reuse
  one compiled program (a new closure would be a new jit cache entry).
  """
  if key not in _PROGRAMS:
    from dataweights.train.state import StaticParts

    static = StaticParts(graphdef, tx)
    step_fn = make_train_step(
      static,
      loss_fn=lm_loss,
      domain_names=[str(k) for k in range(num_sources)],
      method=method,
    )
    _PROGRAMS[key] = (static, jax.jit(jax.vmap(step_fn), donate_argnums=0))
  return _PROGRAMS[key]


def _run(
  cfg: ScaleBiOChapterConfig,
  graphdef: Any,
  params: Any,
  tx: Any,
  method: ScaleBiO | None,
  num_sources: int,
  seeds: Sequence[int],
  batches: Callable[[int, int], dict],
  steps: int,
  keep: Sequence[str],
  every: int = 1,
  p_init: np.ndarray | None = None,
  key: Any = None,
) -> tuple[Any, dict[str, np.ndarray]]:
  """Runs ``len(seeds)`` copies of the train step as one vmapped program.

  Args:
    batches: ``batches(run, step) -> {"train": ..., ["valid": ...]}``.
    keep: metric names recorded every ``every`` steps.
    p_init: initial source logits (padding sources get ``PAD_LOGIT``).
    key: identifies the compiled program (see :func:`_program`).

  Returns:
    ``(final states stacked over runs, {metric: array (steps', runs)})``.
  """
  states = []
  for seed in seeds:
    model = nnx.merge(graphdef, jax.tree.map(jnp.array, params))
    extra = {}
    if method is not None:
      p0 = nnx.state(model, nnx.Param)
      mstate = method.init(p0, jax.random.key(seed), num_sources)
      if p_init is not None:
        mstate["p_K"] = jnp.asarray(p_init, jnp.float32)
      extra["method"] = mstate
    state, _, _ = init_train_state(model, tx, seed=seed, extra=extra)
    states.append(state)
  state = _stack(states)
  key = (key, len(seeds), num_sources)
  _, vstep = _program(key, graphdef, tx, method, num_sources)
  logged: list[dict] = []
  for s in range(steps):
    per_run = [batches(r, s) for r in range(len(seeds))]
    named = {
      name: _stack([_host_batch(cfg, b[name]) for b in per_run])
      for name in per_run[0]
    }
    state, m = vstep(state, named)
    if (s + 1) % every == 0 or s + 1 == steps:
      logged.append({k: m[k] for k in (*keep, "nonfinite")})
  logged = jax.device_get(logged)
  bad = float(np.sum([row["nonfinite"] for row in logged]))
  if bad:
    raise FloatingPointError(
      f"{int(bad)} non-finite step(s) in a Chapter-4 run; the runs were "
      "halted (lower the learning rates)"
    )
  out = {k: np.stack([np.asarray(row[k]) for row in logged]) for k in keep}
  return state, out


def scalebio_method(cfg: ScaleBiOChapterConfig) -> ScaleBiO:
  """The method of the chapter's runs (``u``'s and ``p``'s optimisers)."""
  return ScaleBiO(
    profile=cfg.profile,
    alpha=cfg.alpha,
    lr_u=cfg.lr_u,
    lr_p=cfg.lr_p,
    weight_decay_u=cfg.weight_decay,
    schedule="constant",
    warmup_steps=cfg.warmup_steps,
    steps=1,  # a constant schedule does not depend on the run's length
    lisa_active=cfg.lisa_active,
    lisa_period=cfg.lisa_period,
    w_pass=cfg.w_pass,
  )


def _train_cfg(
  cfg: ScaleBiOChapterConfig, lr: float, steps: int, schedule: str
):
  return train_configs.train(
    cfg.profile if cfg.profile != "smoke" else "smoke",
    learning_rate=lr,
    schedule=schedule,
    warmup_steps=cfg.warmup_steps,
    steps=steps,
    batch_size=cfg.batch_size,
    weight_decay=cfg.weight_decay,
    grad_clip=0.0,
    b2=0.999,
    progress=False,
  )


PAD_LOGIT = -1e9
"""Initial logit of a padding source: ``softmax`` gives it exactly 0, its
``p``-gradient ``lam_k (d_k - <lam, d>)`` is 0, so it stays there and the
real sources' weights, gradients and AdamW steps are those of an unpadded
run."""


def run_scalebio(
  cfg: ScaleBiOChapterConfig,
  sets: Sequence[pairs_lib.PairSet],
  valid: pairs_lib.PairSet,
  *,
  every: int = 1,
) -> dict[str, np.ndarray]:
  """ScaleBiO from the pre-trained model, one run per seed (vmapped).

  The source dimension is padded to ``cfg.pad_sources`` with sources that
  are never sampled and have weight exactly 0 (:data:`PAD_LOGIT`), so the
  chapter's three ScaleBiO experiments share one compiled step.

  Returns:
    ``{"lambda_SxRxK": weights after each recorded step, "steps_S",
    "val_loss_SxR", "gap_SxR"}`` (S recorded steps, R seeds, K sources).
  """
  graphdef, params = pretrained(cfg)
  method = scalebio_method(cfg)
  # Constant schedule: the length does not matter; one value keeps one
  # compiled program for every experiment.
  train_cfg = _train_cfg(cfg, cfg.lr_w, 1, "constant")
  tx = method.w_optimizer(train_cfg)
  k = len(sets)
  k_pad = max(cfg.pad_sources, k)
  p_init = np.where(np.arange(k_pad) < k, 0.0, PAD_LOGIT)
  samplers = [
    (
      pairs_lib.PairSampler(sets, cfg.batch_size, seed=seed),
      pairs_lib.PairSampler([valid], cfg.valid_batch_size, seed=seed, stream=1),
    )
    for seed in cfg.seeds
  ]

  def batches(r, s):
    tr, va = samplers[r]
    return {"train": tr.batch(s), "valid": va.batch(s)}

  keep = [f"method/lambda/{i}" for i in range(k)]
  keep += ["method/val_loss", "method/penalty_gap"]
  _, logged = _run(
    cfg,
    graphdef,
    params,
    tx,
    method,
    k_pad,
    cfg.seeds,
    batches,
    cfg.steps,
    keep,
    every,
    p_init,
    key=(
      "scalebio",
      _pretrain_key(cfg),
      method,
      train_cfg,
      cfg.batch_size,
      cfg.valid_batch_size,
    ),
  )
  lam = np.stack([logged[f"method/lambda/{i}"] for i in range(k)], axis=-1)
  n = lam.shape[0]
  steps = np.minimum(np.arange(1, n + 1) * every, cfg.steps)
  return {
    "lambda_SxRxK": lam,
    "steps_S": steps,
    "val_loss_SxR": logged["method/val_loss"],
    "gap_SxR": logged["method/penalty_gap"],
  }


def run_finetune(
  cfg: Any,
  train_sets: Sequence[pairs_lib.PairSet],
  seeds: Sequence[int],
) -> Any:
  """Plain fine-tuning from the pre-trained model on one set per run.

  Run ``r`` samples ``train_sets[r]`` uniformly (``batch_size`` rows per
  step, ``finetune_steps`` steps, AdamW with a cosine schedule): the same
  token budget for every run.

  Returns:
    The final parameters, stacked over runs.
  """
  graphdef, params = pretrained(cfg)
  train_cfg = _train_cfg(cfg, cfg.finetune_lr, cfg.finetune_steps, "cosine")
  tx = optim.make_optimizer(train_cfg)
  samplers = [
    pairs_lib.PairSampler([s], cfg.batch_size, seed=seed, stream=2)
    for s, seed in zip(train_sets, seeds)
  ]

  def batches(r, s):
    return {"train": samplers[r].batch(s)}

  state, _ = _run(
    cfg,
    graphdef,
    params,
    tx,
    None,
    1,
    seeds,
    batches,
    cfg.finetune_steps,
    ["loss"],
    every=cfg.finetune_steps,
    key=("finetune", _pretrain_key(cfg), train_cfg, cfg.batch_size),
  )
  return state.params


def eval_loss(
  cfg: ScaleBiOChapterConfig,
  params_R: Any,
  data: pairs_lib.PairSet,
  chunk: int = 64,
) -> np.ndarray:
  """Mean per-example response loss (nats/byte) of each run on ``data``."""
  graphdef, _ = pretrained(cfg)
  key = ("eval", _pretrain_key(cfg))
  if key not in _PROGRAMS:

    def losses(params, tokens, mask):
      model = nnx.merge(graphdef, params)
      return lm_loss(model, {"tokens_BxL": tokens, "mask_BxL": mask}, None)

    _PROGRAMS[key] = (None, jax.jit(jax.vmap(losses, in_axes=(0, None, None))))
  fn = _PROGRAMS[key][1]
  n = len(data)
  total = None
  for start in range(0, n, chunk):
    rows = np.arange(start, start + chunk) % n
    weight = (np.arange(start, start + chunk) < n).astype(np.float64)
    tokens = data.tokens_MxL[rows]
    if cfg.gpt2_path:
      tokens = gpt2_ids(tokens)
    loss_RxC = np.asarray(fn(params_R, tokens, data.mask_MxL[rows]), np.float64)
    part = loss_RxC @ weight
    total = part if total is None else total + part
  return total / n


def t_interval(x: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """``(mean, half-width)`` of a Student-t interval over seeds (ddof=1)."""
  from scipy import stats

  x = np.asarray(x, np.float64)
  if x.size < 2:
    return float(x.mean()), math.nan
  half = (
    stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
  )
  return float(x.mean()), float(half)
