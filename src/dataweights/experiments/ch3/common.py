"""Shared machinery of the chapter-3 experiments: tasks, runs, statistics.

A :class:`Task` holds everything a filtering run needs besides the method:
the main model, its loss, the streams (generic big batch + specific batch),
the fine-tuning stream and fixed held-out sets. :func:`run_method` trains
one method with one seed on the project's training loop
(:class:`~dataweights.train.loop.Trainer`, fed by a
:class:`~dataweights.data.filter_feed.FilterFeed`), evaluates it every
``eval_every`` steps, fine-tunes it on the specific set and returns a
:class:`RunResult`.

Common random numbers: for a given seed every method starts from the same
model and sees the same generic big batches and specific batches (the
``"train"`` rows of the baselines are the first B rows of each big batch).

Speed: trainers that differ only in the seed share one compiled step
(``Trainer.jit_step``; the step does not depend on the seed, which lives in
the state), and a run is memoised for the process, so sections of the
chapter that need the same run (the SAR/GAR scatter) do not train it again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from dataweights.configs import filtering as fcfg
from dataweights.configs.train import TrainConfig
from dataweights.data import filter_feed
from dataweights.models import weighting_net as wn
from dataweights.train import filtering as F
from dataweights.train.loop import Trainer
from dataweights.train.method import Method, Plain

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A filtering problem (see the module docstring).

  Attributes:
    key: a hashable identity of everything that defines the runs.
    model_cfg, model_factory, loss_fn: the main model.
    domain_names: names of the generic batch's ``domain_B`` values.
    make_streams: ``seed -> streams`` (generic big batch, specific batch).
    make_finetune: ``seed -> source`` of specific training batches.
    eval_sets: fixed held-out batches: ``spec_test``, ``spec_valid``,
      ``gen_test``.
    gen_weights: per-row weights of ``gen_test`` rows in the generic loss
      (e.g. one over the rows of its domain, zero for noise domains).
    train_cfg, finetune_cfg: ``seed -> TrainConfig`` (``finetune_cfg``
      may return None: no fine-tuning).
    scorer: the weighting network.
    accuracy: also report accuracy (classification tasks).
    sar_batches: ``(specific_ref, generic_ref, specific_eval,
      generic_eval)`` for SAR / GAR.
    probe: generic training rows with a ``clean_B`` flag for the AUROC of
      w_φ (label-noise tasks), or None.
    pretrain_cfg: ``seed -> TrainConfig`` of a shared pre-training phase
      (standard training on other generic batches) that every method
      continues from, or None.
  """

  key: tuple
  model_cfg: Any
  model_factory: Callable[..., Any] | None
  loss_fn: Callable[..., jax.Array]
  domain_names: tuple[str, ...]
  make_streams: Callable[[int], Any]
  make_finetune: Callable[[int], Any]
  eval_sets: dict[str, Batch]
  gen_weights: np.ndarray
  train_cfg: Callable[[int], TrainConfig]
  finetune_cfg: Callable[[int], TrainConfig | None]
  scorer: wn.ScorerConfig
  accuracy: bool
  sar_batches: tuple[Batch, Batch, Batch, Batch]
  probe: Batch | None = None
  pretrain_cfg: Callable[[int], TrainConfig | None] = lambda seed: None


@dataclasses.dataclass
class RunResult:
  """One method, one seed.

  Attributes:
    steps: evaluation steps (0 included).
    curves: ``{eval set: [mean loss per step]}`` (and ``acc/...``).
    final: metrics at the end of pre-training.
    finetuned: metrics at the fine-tuning step chosen on ``spec_valid``
      (step 0, i.e. no fine-tuning, included).
    ft_step: that step.
    makeup: ``(steps, K)`` fraction of the kept rows per generic domain,
      averaged over each evaluation interval.
    auroc: AUROC of w_φ (clean vs corrupted) per evaluation step, if any.
    auroc_loss: AUROC of minus the model's loss (the small-loss rule).
    kept_flag: the flagged (corrupted) share of the kept rows per
      evaluation interval, if the rows are flagged.
    params: final parameters (kept for the base method only).
  """

  steps: list[int]
  curves: dict[str, list[float]]
  final: dict[str, float]
  finetuned: dict[str, float]
  ft_step: int
  makeup: list[list[float]]
  auroc: list[float] | None = None
  auroc_loss: list[float] | None = None
  kept_flag: list[float] | None = None
  params: Any = None


_STEP_CACHE: dict[tuple, Any] = {}
_EVAL_CACHE: dict[tuple, Callable] = {}
_RUNS: dict[tuple, RunResult] = {}


def clear_caches() -> None:
  """Forgets compiled steps, memoised runs and pre-trained models."""
  _STEP_CACHE.clear()
  _EVAL_CACHE.clear()
  _RUNS.clear()
  _PRETRAINED.clear()
  _PROBE_JIT.clear()


def build_method(name: str, cfg: Any, scorer: wn.ScorerConfig) -> Method:
  """The named method with ``cfg``'s hyper-parameters (see configs)."""
  k = fcfg.method_kwargs(cfg)
  common = dict(scorer=scorer, meta_lr=k["meta_lr"], meta_every=k["meta_every"])
  if name == "base":
    return F.Base()
  if name == "mixing":
    return F.Mixing(specific_weight=k["mixing_weight"])
  if name == "classifier":
    return F.Classifier(**common)
  if name == "cds":
    return F.CDS(warmup=k["cds_warmup"], **common)
  if name == "dds":
    return F.DDS(
      selection=k["selection"], lookahead_lr=k["dds_lookahead_lr"], **common
    )
  if name == "anograd":
    return F.Anograd(selection=k["selection"], eps=k["anograd_eps"], **common)
  if name == "soba":
    return F.SOBA(
      selection=k["selection"],
      v_optimizer=k["soba_v_optimizer"],
      v_lr=k["soba_v_lr"],
      damping=k["soba_damping"],
      **common,
    )
  raise ValueError(f"unknown method {name!r}; known: {fcfg.METHOD_NAMES}")


def make_trainer(task: Task, method: Method, cfg: TrainConfig) -> Trainer:
  """A Trainer; trainers equal up to the seed share one compiled step."""
  kw = (
    {} if task.model_factory is None else {"model_factory": task.model_factory}
  )
  trainer = Trainer(
    task.model_cfg,
    cfg,
    loss_fn=task.loss_fn,
    domain_names=task.domain_names,
    method=method,
    **kw,
  )
  key = (
    task.model_cfg,
    dataclasses.replace(cfg, seed=0),
    method,
    task.model_factory,
    task.loss_fn,
    task.domain_names,
  )
  if key in _STEP_CACHE:
    trainer.jit_step = _STEP_CACHE[key]
  else:
    _STEP_CACHE[key] = trainer.jit_step
  return trainer


def _per_example(task: Task, trainer: Trainer) -> Callable:
  """Jitted ``(params, model_state, batches) -> {set: {loss_B, correct_B}}``."""
  key = (task.key, "eval")
  if key not in _EVAL_CACHE:
    graphdef, loss_fn, acc = (
      trainer.static.graphdef,
      task.loss_fn,
      task.accuracy,
    )

    @jax.jit
    def fn(params, model_state, batches):
      model = nnx.merge(graphdef, params, model_state, copy=True)
      out = {}
      for name, b in batches.items():
        out[name] = {"loss_B": loss_fn(model, b, None)}
        if acc:
          pred = jnp.argmax(model(b["x_BxHxW"]), -1)
          out[name]["correct_B"] = (pred == b["y_B"]).astype(jnp.float32)
      return out

    _EVAL_CACHE[key] = fn
  return _EVAL_CACHE[key]


def evaluate(
  task: Task, trainer: Trainer, state: Any = None
) -> dict[str, float]:
  """Mean held-out metrics of ``trainer``'s (or ``state``'s) parameters."""
  state = trainer.state if state is None else state
  fn = _per_example(task, trainer)
  out = jax.device_get(fn(state.params, state.model_state, task.eval_sets))
  res = {}
  for name, o in out.items():
    loss_B = np.asarray(o["loss_B"], np.float64)
    if name == "gen_test":
      res[name] = float(
        np.sum(task.gen_weights * loss_B) / task.gen_weights.sum()
      )
    else:
      res[name] = float(loss_B.mean())
    if "correct_B" in o:
      res[f"acc/{name}"] = float(np.mean(o["correct_B"]))
  return res


def auroc(score_M: np.ndarray, positive_M: np.ndarray) -> float:
  """Area under the ROC curve of ``score`` for ``positive`` (ties: 1/2)."""
  ranks = stats.rankdata(score_M)
  pos = np.asarray(positive_M, bool)
  n_pos, n_neg = pos.sum(), (~pos).sum()
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _probe_scores(
  method: Method, mstate: Any, probe: Batch
) -> np.ndarray | None:
  """What the method would rank the probe rows by (higher = keep)."""
  batch = {k: jnp.asarray(v) for k, v in probe.items() if k != "clean_B"}
  if isinstance(method, F.CDS):
    s = method.small_loss(mstate["gen_lm"], batch) - method.small_loss(
      mstate["spec_lm"], batch
    )
  elif isinstance(method, F.FilterMethod):
    s = method.scores(mstate["phi"], batch)
  else:
    return None
  return s


def run_method(task: Task, name: str, cfg: Any, seed: int) -> RunResult:
  """Trains, evaluates and fine-tunes one method with one seed (memoised)."""
  memo = (task.key, name, seed, tuple(sorted(fcfg.method_kwargs(cfg).items())))
  if memo in _RUNS:
    return _RUNS[memo]
  method = build_method(name, cfg, task.scorer)
  train_cfg = task.train_cfg(seed)
  trainer = make_trainer(task, method, train_cfg)
  start = pretrained(task, seed)
  if start is not None:  # continue from the shared pre-trained model
    trainer.state = trainer.state.replace(
      params=jax.tree.map(jnp.asarray, start)
    )
  feed = filter_feed.FilterFeed(
    task.make_streams(seed), train_cfg.batch_size, prefetch=4
  )
  steps, evals, aurocs, auroc_loss = [], [], [], []

  def record(step: int) -> None:
    steps.append(step)
    evals.append(evaluate(task, trainer))
    if task.probe is not None:
      ms = trainer.state.extra.get("method", {})
      s = None if not ms else _probe_jit(method, ms, task.probe)
      aurocs.append(
        float("nan") if s is None else auroc(s, task.probe["clean_B"])
      )
      fn = _per_example(task, trainer)
      out = fn(
        trainer.state.params,
        trainer.state.model_state,
        {"probe": _probe_batch(task.probe)},
      )
      loss_M = np.asarray(jax.device_get(out)["probe"]["loss_B"])
      auroc_loss.append(auroc(-loss_M, task.probe["clean_B"]))

  record(0)

  def eval_fn(model, step):
    del model
    record(step)
    return {}

  try:
    state, hist = trainer.run(feed.sources(), eval_fn=eval_fn)
  finally:
    feed.close()
  makeup = _makeup(hist, task.domain_names, steps, train_cfg.batch_size)
  final = evals[-1]
  if task.finetune_cfg(seed) is not None:
    ft_final, ft_step = finetune(task, cfg, seed, state, final)
  else:
    ft_final, ft_step = final, 0
  result = RunResult(
    steps=steps,
    curves={k: [e[k] for e in evals] for k in evals[0]},
    final=final,
    finetuned=ft_final,
    ft_step=ft_step,
    makeup=makeup,
    auroc=aurocs or None,
    auroc_loss=auroc_loss or None,
    kept_flag=_interval_means(hist, "method/kept_flag", steps),
    params=jax.device_get(state.params) if name == "base" else None,
  )
  _RUNS[memo] = result
  return result


_PRETRAINED: dict[tuple, Any] = {}
PRETRAIN_STREAM = 1_000  # seed offset: pre-training sees other batches


def pretrained(task: Task, seed: int) -> Any:
  """Parameters after the task's shared pre-training (memoised), or None."""
  cfg = task.pretrain_cfg(seed)
  if cfg is None:
    return None
  key = (task.key, seed)
  if key not in _PRETRAINED:
    trainer = make_trainer(task, F.Base(), cfg)
    feed = filter_feed.FilterFeed(
      task.make_streams(seed + PRETRAIN_STREAM), cfg.batch_size, prefetch=4
    )
    try:
      state, _ = trainer.run(feed.sources())
    finally:
      feed.close()
    _PRETRAINED[key] = jax.device_get(state.params)
  return _PRETRAINED[key]


_PROBE_JIT: dict[tuple, Callable] = {}


def _probe_batch(probe: Batch) -> Batch:
  return {k: v for k, v in probe.items() if k != "clean_B"}


def _probe_jit(method: Method, mstate: Any, probe: Batch) -> np.ndarray | None:
  if not isinstance(method, F.FilterMethod):
    return None
  key = (method, id(probe))
  if key not in _PROBE_JIT:
    batch = {k: jnp.asarray(v) for k, v in _probe_batch(probe).items()}
    _PROBE_JIT[key] = jax.jit(lambda ms: _probe_scores(method, ms, batch))
  return np.asarray(_PROBE_JIT[key](mstate))


def _makeup(hist, names, eval_steps, batch_size) -> list[list[float]]:
  """Kept-row fractions per domain, averaged over each evaluation interval."""
  cols = []
  for n in names:
    s, c = hist.series(f"count/domain/{n}")
    cols.append(np.asarray(c, np.float64))
  s = np.asarray(s)
  counts_SxK = np.stack(cols, 1) / batch_size
  out = []
  for lo, hi in zip(eval_steps[:-1], eval_steps[1:]):
    sel = (s > lo) & (s <= hi)
    out.append(counts_SxK[sel].mean(0).tolist())
  return out


def _interval_means(hist, key, eval_steps) -> list[float] | None:
  """The mean of a step metric over each evaluation interval (or None)."""
  if not hist.rows or key not in hist.rows[-1]:
    return None
  s, v = (np.asarray(a, np.float64) for a in hist.series(key))
  return [
    float(v[(s > lo) & (s <= hi)].mean())
    for lo, hi in zip(eval_steps[:-1], eval_steps[1:])
  ]


def finetune(
  task: Task, cfg: Any, seed: int, state: Any, before: dict[str, float]
) -> tuple[dict[str, float], int]:
  """Fine-tunes on the specific set; the step is chosen on ``spec_valid``."""
  ft_cfg = task.finetune_cfg(seed)
  trainer = make_trainer(task, Plain(), ft_cfg)
  # A fresh optimiser (Adam's state does not depend on the values).
  trainer.state = trainer.state.replace(
    params=jax.tree.map(jnp.copy, state.params)
  )
  best = (before["spec_valid"], 0, before)

  def eval_fn(model, step):
    del model
    nonlocal best
    ev = evaluate(task, trainer)
    if ev["spec_valid"] < best[0]:
      best = (ev["spec_valid"], step, ev)
    return {}

  trainer.run(task.make_finetune(seed), eval_fn=eval_fn)
  return best[2], best[1]


# ------------------------------------------------------------- statistics --


def mean_ci(x: Any, level: float = 0.95) -> tuple[float, float]:
  """Mean and the half-width of its t-interval (ddof = 1)."""
  x = np.asarray(x, np.float64)
  if x.size < 2:
    return float(x.mean()), float("nan")
  half = (
    stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
  )
  return float(x.mean()), float(half)


def table(
  runs: dict[str, list[RunResult]], keys: tuple[str, ...]
) -> list[dict[str, Any]]:
  """Per method: mean ± CI of ``keys`` before and after fine-tuning, and the
  paired difference from base (common random numbers)."""
  base = runs["base"]
  rows = []
  for name, rs in runs.items():
    row: dict[str, Any] = {"method": name}
    for when, get in (
      ("pre", lambda r: r.final),
      ("ft", lambda r: r.finetuned),
    ):
      for k in keys:
        vals = [get(r)[k] for r in rs]
        row[f"{when}/{k}"], row[f"{when}/{k}/ci"] = mean_ci(vals)
        diff = [get(r)[k] - get(b)[k] for r, b in zip(rs, base)]
        row[f"{when}/{k}/vs_base"], row[f"{when}/{k}/vs_base_ci"] = mean_ci(
          diff
        )
    rows.append(row)
  return rows
