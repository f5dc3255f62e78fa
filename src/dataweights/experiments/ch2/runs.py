"""The training runs behind chapter 2, shared by its published results.

:func:`run_all` trains, for every seed, every method and baseline on both
targets with the same token budget (``steps x batch_size x context``), and
evaluates each final model on held-out rows of every domain's test split.
The runs are cached by config, so the chapter's results (tables, weights,
the horizon question) read one set of runs.

Compilation is the main cost on a CPU, so each method's training step is
compiled once and reused across seeds and targets: one
:class:`~dataweights.train.loop.Trainer` per method, whose state is reset
for every run (same shapes, so the same executable). Target B keeps all K
domains in the programs and gives its target weight 0 (never sampled; a
zero EG weight stays zero).

Wall-clock times (compile and per step) are kept in :data:`TIMINGS`, not in
the published data, which must be identical run to run.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.configs.lm_mixing import LMMixingConfig
from dataweights.data.mixture import MixtureSampler
from dataweights.data.pipeline import pack_documents, prepared_domains
from dataweights.methods import domain_weights
from dataweights.train import mixers
from dataweights.train.feeder import Feeder
from dataweights.train.loop import Trainer
from dataweights.train.state import init_train_state
from dataweights.train.step import lm_loss

BASELINES_A = ("uniform", "natural", "temperature", "stratified")
BASELINES_B = ("natural", "stratified")
LEARNED_A = ("doremi", "odm", "alignment")
LEARNED_B = ("alignment",)

TIMINGS: dict[str, dict[str, float]] = {}
"""``{program: {"compile_s", "step_s", "steps"}}`` of the last
:func:`run_all`: the first step's wall time (compile included) and the mean
wall time of the other steps, over all runs of that program."""


def horizon_name(T: int) -> str:
  """The method name of finite-horizon mixing with horizon T."""
  return f"horizon_T{T}"


def methods(cfg: LMMixingConfig, target: str) -> tuple[str, ...]:
  """The methods run on target ``"A"`` or ``"B"``, in table order."""
  hz = tuple(horizon_name(T) for T in cfg.horizons)
  if target == "A":
    return BASELINES_A + LEARNED_A + hz
  return BASELINES_B + LEARNED_B + hz


class _FirstDocs:
  """The first ``n`` documents of a domain (target B's validation set)."""

  def __init__(self, source: Any, n: int):
    if len(source) < n:
      raise ValueError(
        f"domain {source.name!r} has {len(source)} validation documents; "
        f"target_valid_docs = {n} needs at least that many"
      )
    self.source, self.name, self.n = source, source.name, n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> np.ndarray:
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


@dataclasses.dataclass
class _Data:
  train: list
  valid: list
  target_valid: _FirstDocs
  tokens_K: np.ndarray
  eval_tokens_MxL: np.ndarray
  eval_mask_MxL: np.ndarray


def _load(cfg: LMMixingConfig) -> _Data:
  names = list(cfg.domains)
  train = prepared_domains("train", domains=names)
  valid = prepared_domains("validation", domains=names)
  test = prepared_domains("test", domains=names)
  seq_len = cfg.context + 1
  toks, masks = [], []
  for d in test:
    t, m = pack_documents([d[i] for i in range(len(d))], seq_len)
    if t.shape[0] < cfg.eval_rows:
      raise ValueError(
        f"domain {d.name!r} has {t.shape[0]} test rows of {seq_len} tokens; "
        f"eval_rows = {cfg.eval_rows} needs at least that many"
      )
    toks.append(t[: cfg.eval_rows])
    masks.append(m[: cfg.eval_rows])
  return _Data(
    train=train,
    valid=valid,
    target_valid=_FirstDocs(
      valid[names.index(cfg.target)], cfg.target_valid_docs
    ),
    tokens_K=np.array([d.num_tokens() for d in train], np.float64),
    eval_tokens_MxL=np.concatenate(toks),
    eval_mask_MxL=np.concatenate(masks),
  )


def fixed_weights(
  cfg: LMMixingConfig, tokens_K: np.ndarray, name: str, target: str
) -> np.ndarray:
  """The sampling weights of a fixed baseline (target B: target left out)."""
  K = cfg.num_domains
  if name in ("uniform", "stratified"):
    w = np.ones(K)
  elif name == "natural":
    w = tokens_K.copy()
  elif name == "temperature":
    w = np.asarray(
      domain_weights.temperature_weights(tokens_K, cfg.temperature), np.float64
    )
  else:
    raise ValueError(f"unknown baseline {name!r}")
  if target == "B":
    w[list(cfg.domains).index(cfg.target)] = 0.0
  return w / w.sum()


def _draw(name: str) -> str:
  return (
    "iid"
    if name in ("uniform", "natural", "temperature", "odm", "doremi")
    else "stratified"
  )


class _Programs:
  """One Trainer (one compiled step) per method; fresh states per run."""

  def __init__(self, cfg: LMMixingConfig, data: _Data):
    self.cfg, self.data = cfg, data
    self.model_cfg = lm.lm_model(
      cfg.profile,
      num_layers=cfg.num_layers,
      d_model=cfg.d_model,
      num_heads=cfg.num_heads,
      d_mlp=cfg.d_mlp,
      max_len=cfg.context,
      init_std=cfg.init_std,
    )
    self.train_cfg = train_configs.train(
      cfg.profile,
      learning_rate=cfg.learning_rate,
      warmup_steps=cfg.warmup_steps,
      schedule="cosine",
      steps=cfg.steps,
      batch_size=cfg.batch_size,
      eps_root=1e-30,
      progress=False,
      checkpoint_dir=None,
      log_every=1,
    )
    self.trainers: dict[str, Trainer] = {}
    self._eval = None

  def trainer(self, program: str, method: Any) -> Trainer:
    if program not in self.trainers:
      self.trainers[program] = Trainer(
        self.model_cfg,
        self.train_cfg,
        domain_names=self.cfg.domains,
        method=method,
      )
    return self.trainers[program]

  def reset(self, trainer: Trainer, seed: int, method: Any) -> None:
    """A fresh state for ``seed`` with the trainer's shapes (no recompile)."""
    from dataweights.models.transformer import Transformer

    model = Transformer(self.model_cfg, rngs=nnx.Rngs(params=seed))
    extra = {}
    if method is not None:
      params = nnx.state(model, nnx.Param)
      key = jax.random.fold_in(jax.random.key(seed), 0x6D657468)
      extra["method"] = method.init_for_run(
        params, key, self.cfg.num_domains, trainer.static.tx
      )
    trainer.state, _, _ = init_train_state(
      model, trainer.static.tx, seed=seed, extra=extra
    )

  def evaluate(self, trainer: Trainer) -> np.ndarray:
    """Held-out loss of each domain (mean over its test rows), ``(K,)``."""
    if self._eval is None:
      graphdef = trainer.static.graphdef
      K, R = self.cfg.num_domains, self.cfg.eval_rows

      @jax.jit
      def eval_fn(params, model_state, tokens, mask):
        model = nnx.merge(graphdef, params, model_state, copy=True)
        loss_M = lm_loss(model, {"tokens_BxL": tokens, "mask_BxL": mask}, None)
        return jnp.mean(loss_M.reshape(K, R), axis=1)

      self._eval = eval_fn
    out = self._eval(
      trainer.state.params,
      trainer.state.model_state,
      self.data.eval_tokens_MxL,
      self.data.eval_mask_MxL,
    )
    return np.asarray(jax.device_get(out), np.float64)

  def sampler(
    self, domains, seed, weights, draw, stream, batch_size
  ) -> MixtureSampler:
    return MixtureSampler(
      domains,
      batch_size=batch_size,
      seq_len=self.cfg.context + 1,
      seed=seed,
      weights=weights,
      draw=draw,
      stream=stream,
    )

  def sources(
    self, seed: int, weights: np.ndarray, draw: str, target: str | None
  ) -> dict:
    cfg = self.cfg
    out = {
      "train": self.sampler(
        self.data.train, seed, weights, draw, 0, cfg.batch_size
      )
    }
    if target == "A":
      out["valid"] = self.sampler(
        self.data.valid,
        seed,
        np.ones(cfg.num_domains),
        "stratified",
        1,
        cfg.valid_batch_size,
      )
    elif target == "B":
      out["valid"] = self.sampler(
        [self.data.target_valid], seed, [1.0], "iid", 2, cfg.valid_batch_size
      )
    return out

  def train(self, program: str, trainer: Trainer, sources: dict) -> Any:
    """Runs all steps (timed: the first step, then the rest); history."""
    feeder = Feeder(sources)
    t0 = time.perf_counter()
    _, first = trainer.run(feeder, steps=1)
    jax.block_until_ready(trainer.state.params)
    t1 = time.perf_counter()
    _, rest = trainer.run(feeder)
    jax.block_until_ready(trainer.state.params)
    t2 = time.perf_counter()
    rec = TIMINGS.setdefault(
      program, {"compile_s": 0.0, "step_s": 0.0, "steps": 0, "runs": 0}
    )
    if rec["runs"] == 0:
      rec["compile_s"] = t1 - t0
    rec["step_s"] += t2 - t1
    rec["steps"] += self.cfg.steps - 1
    rec["runs"] += 1
    first.rows.extend(rest.rows)
    return first


def _weights_over_training(
  cfg: LMMixingConfig, hist: Any, prefix: str = "w"
) -> np.ndarray:
  """``(S, K)``: the weights after steps ``weight_every, 2 weight_every, ...``."""
  steps, w = mixers.weights_from_history(hist, prefix, cfg.num_domains)
  keep = [i for i, s in enumerate(steps) if s % cfg.weight_every == 0]
  return w[keep]


def _record(
  loss_K: np.ndarray, w_SxK: np.ndarray | None, final_w: np.ndarray
) -> dict:
  out = {"loss_K": loss_K, "final_w_K": final_w}
  if w_SxK is not None:
    out["w_SxK"] = w_SxK
  return out


@functools.lru_cache(maxsize=2)
def run_all(cfg: LMMixingConfig) -> dict[str, Any]:
  """Every run of the chapter: ``{target: {method: [per-seed record]}}``.

  A record has ``loss_K`` (held-out loss per domain), ``final_w_K`` (the
  weights the model ended with: the sampling or loss weights) and, for the
  learning methods, ``w_SxK`` (the weights every ``weight_every`` steps;
  DoReMi: the proxy's ``α_t``).
  """
  TIMINGS.clear()
  data = _load(cfg)
  P = _Programs(cfg, data)
  K = cfg.num_domains
  runs: dict[str, dict[str, list]] = {"A": {}, "B": {}}
  add = lambda target, name, rec: runs[target].setdefault(name, []).append(rec)
  reference: dict[int, Any] = {}

  # Fixed baselines: one program (no method).
  plain = P.trainer("plain", None)
  for seed in cfg.seeds:
    for target, names in (("A", BASELINES_A), ("B", BASELINES_B)):
      for name in names:
        w = fixed_weights(cfg, data.tokens_K, name, target)
        P.reset(plain, seed, None)
        P.train("plain", plain, P.sources(seed, w, _draw(name), None))
        add(target, name, _record(P.evaluate(plain), None, w))
        if target == "A" and name == "stratified":
          reference[seed] = jax.device_get(plain.state.params)

  # DoReMi: proxy with group DRO against the stratified-uniform model of the
  # same seed (the reference), then a main model sampled with the average.
  proxy_kw = dict(
    step_size=cfg.doremi_step_size, smoothing=cfg.doremi_smoothing
  )
  proxy = P.trainer(
    "doremi_proxy",
    mixers.DoReMiProxy(reference=reference[cfg.seeds[0]], **proxy_kw),
  )
  uniform = fixed_weights(cfg, data.tokens_K, "stratified", "A")
  for seed in cfg.seeds:
    method = mixers.DoReMiProxy(reference=reference[seed], **proxy_kw)
    P.reset(proxy, seed, method)
    hist = P.train(
      "doremi_proxy", proxy, P.sources(seed, uniform, "stratified", None)
    )
    avg = np.asarray(
      mixers.DoReMiProxy.average_weights(proxy.state.extra["method"]),
      np.float64,
    )
    avg = avg / avg.sum()
    P.reset(plain, seed, None)
    P.train("plain", plain, P.sources(seed, avg, "iid", None))
    add(
      "A",
      "doremi",
      _record(P.evaluate(plain), _weights_over_training(cfg, hist), avg),
    )

  # ODM: EXP3 sampling weights, i.i.d. draws.
  odm = mixers.OnlineDataMixing(reward_scale=cfg.odm_reward_scale)
  tr = P.trainer("odm", odm)
  for seed in cfg.seeds:
    P.reset(tr, seed, odm)
    hist = P.train("odm", tr, P.sources(seed, uniform, "iid", None))
    w = _weights_over_training(cfg, hist)
    add("A", "odm", _record(P.evaluate(tr), w, w[-1]))

  # Validation-driven methods: loss weights on stratified batches, both
  # targets (target B: the target's weight starts, and stays, at 0).
  spec = mixers.batch_spec(
    P.sources(0, uniform, "stratified", None)["train"].next_batch()
  )
  learned = [
    (
      "alignment",
      lambda w0: mixers.OnlineAlignment(beta=cfg.align_beta, init_weights=w0),
    )
  ]
  for T in cfg.horizons:
    learned.append(
      (
        horizon_name(T),
        lambda w0, T=T: mixers.HorizonMixing(
          T=T,
          beta=cfg.horizon_beta * T,
          batch_spec=spec,
          init_weights=w0,
          mode=cfg.hypergrad_mode,
          unroll=cfg.unroll,
        ),
      )
    )
  for name, make in learned:
    tr = P.trainer(name, make(()))
    for seed in cfg.seeds:
      for target in ("A", "B"):
        w0 = fixed_weights(cfg, data.tokens_K, "stratified", target)
        method = make(tuple(float(x) for x in w0))
        P.reset(tr, seed, method)
        hist = P.train(name, tr, P.sources(seed, w0, "stratified", target))
        w = _weights_over_training(cfg, hist)
        add(
          target,
          name,
          _record(
            P.evaluate(tr),
            w,
            np.asarray(tr.state.extra["method"]["eg"].w_K, np.float64),
          ),
        )
  del K
  return {"runs": runs, "tokens_K": data.tokens_K}


def cost_table() -> str:
  """Step cost of each method relative to plain training, from the last
  :func:`run_all` (wall clock: printed, never published)."""
  if "plain" not in TIMINGS:
    return "no timings: run_all has not run in this process"
  base = TIMINGS["plain"]["step_s"] / max(TIMINGS["plain"]["steps"], 1)
  lines = [
    f"{'program':>14}  {'ms/step':>8}  {'x plain':>8}  {'1st step s':>10}"
  ]
  for name, rec in TIMINGS.items():
    per = rec["step_s"] / max(rec["steps"], 1)
    lines.append(
      f"{name:>14}  {1e3 * per:8.1f}  {per / base:8.2f}  {rec['compile_s']:10.1f}"
    )
  return "\n".join(lines)
