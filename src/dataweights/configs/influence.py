"""Configs of chapter 5 (influence-based selection: G-DIG and LESS).

One frozen dataclass per published result, each with a factory
``name(profile="book", **overrides)``. Profiles: ``smoke`` (seconds, unit
tests), ``book`` (the published CPU run), ``paper`` (realistic scale, meant
for a GPU/TPU: LESS's 8192-dimensional projections, more seeds, larger
pools and models).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dataweights.configs.base import (
  ConfigError,
  check_choice,
  check_in_range,
  check_int,
  check_positive,
  check_profile,
  from_profile,
)
from dataweights.configs.data import INSTRUCTION_SOURCES

KFAC_METHODS: tuple[str, ...] = ("kfac", "kfac_factored", "ekfac")
"""Inverse-curvature products of methods.kfac (configs sit below methods;
tests/test_ch5_experiments.py checks that the two lists agree)."""


def _check_seeds(cfg: Any, name: str = "seeds", minimum: int = 1) -> None:
  value = getattr(cfg, name)
  ok = isinstance(value, tuple) and len(value) >= minimum
  ok = ok and all(
    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
  )
  ok = ok and len(set(value)) == len(value)
  if not ok:
    raise ConfigError(
      f"{type(cfg).__name__}.{name} = {value!r} is invalid; it must be a tuple "
      f"of at least {minimum} distinct integers >= 0"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class InfluenceLOOConfig:
  """Does influence predict leave-one-out retraining? (digits, float64)

  A model is trained on ``n_train`` UCI digits (8x8 pixels / 16) with an L2
  penalty; ``n_removed`` of them are removed one at a time and the model is
  retrained to convergence; the change of the mean loss on ``n_query`` test
  digits is compared with what each influence estimate predicts.
  """

  profile: str = "book"
  seeds: tuple[int, ...] = (0, 1, 2)  # training subsets and initialisations
  n_train: int = 400  # N, training examples
  n_query: int = 100  # test examples whose mean loss is the query
  n_removed: int = 50  # examples removed one at a time (leave-one-out)
  l2: float = 3e-2  # L2 coefficient on every parameter (also K-FAC's damping)
  hidden: int = 8  # width of the small MLP's tanh hidden layer
  lbfgs_steps: int = 1000  # L-BFGS iterations before Newton polishing (MLP)
  newton_steps: int = 4  # exact Newton steps polishing the full fit
  loo_steps: int = 6  # Newton-CG iterations per leave-one-out fit
  cg_iters: int = 6  # preconditioned CG iterations per Newton step
  loo_batch: int = 25  # leave-one-out fits vectorised at once
  loo_tol: float = 1e-9  # required gradient norm of every refit
  bootstrap: int = 1000  # resamples for the per-seed correlation intervals

  def __post_init__(self):
    check_profile(self.profile)
    _check_seeds(self)
    check_int(self, "n_train", "n_query", "n_removed", "hidden", minimum=2)
    check_int(
      self,
      "lbfgs_steps",
      "newton_steps",
      "loo_steps",
      "cg_iters",
      "loo_batch",
      "bootstrap",
    )
    check_positive(self, "l2", "loo_tol")
    if self.n_removed > self.n_train:
      raise ConfigError(
        f"InfluenceLOOConfig.n_removed = {self.n_removed} exceeds n_train = "
        f"{self.n_train}; at most every training example can be removed"
      )


LOO_PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(
    seeds=(0,),
    n_train=60,
    n_query=20,
    n_removed=8,
    hidden=4,
    lbfgs_steps=200,
    loo_steps=8,
    loo_batch=4,
    bootstrap=50,
  ),
  "book": {},
  "paper": dict(
    seeds=(0, 1, 2, 3, 4),
    n_train=1000,
    n_query=279,
    n_removed=1000,
    hidden=32,
    loo_batch=100,
  ),
}


def influence_loo(
  profile: str = "book", **overrides: Any
) -> InfluenceLOOConfig:
  """The leave-one-out study's config for ``profile``."""
  return from_profile(InfluenceLOOConfig, LOO_PRESETS, profile, overrides)


SELECTION_METHODS: tuple[str, ...] = (
  "random",
  "loss",
  "classifier",
  "less",
  "gdig_quality",
  "gdig_diverse",
)
"""Selection rules compared in section 2 (see experiments/ch5/select.py)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SelectionConfig:
  """Selecting instruction pairs for a target (section 2).

  A pool of prompt/response pairs from several sources, a fraction of them
  with swapped (mismatched) responses, and a small clean seed set of the
  target source. Each rule selects ``budgets`` of the pool; a base model is
  fine-tuned on each selection for the same number of steps; the target's
  held-out response loss is reported.
  """

  profile: str = "book"
  seeds: tuple[int, ...] = (0, 1, 2)  # pools, corruptions, orders
  sources: tuple[str, ...] = (
    "chat",
    "dialogue",
    "glossary",
    "scripture",
    "fiction",
    "encyclopaedic",
    "news",
    "multilingual",
  )  # instruction sources in the pool
  target: str = "glossary"  # the target source (seed and evaluation sets)
  pool_per_source: int = 150  # candidates drawn from each source
  corrupt_rate: float = 0.3  # fraction of the pool with swapped responses
  seed_size: int = 32  # clean target pairs given to the selectors
  eval_size: int = 200  # held-out target pairs (test split) for the loss
  seq_len: int = 64  # L: [BOS] prompt [SEP] response [EOS], cut to fit
  d_model: int = 32  # the byte transformer (see configs.lm)
  num_layers: int = 2
  num_heads: int = 4
  d_mlp: int = 128
  pretrain_steps: int = 300  # base model on the generic text domains
  pretrain_batch: int = 32
  warmup_steps: int = 100  # the scoring model: base fine-tuned on the pool
  warmup_batch: int = 32
  checkpoints: int = 2  # warm-up checkpoints LESS aggregates over
  finetune_steps: int = 60  # fine-tuning on each selection (equal budget)
  finetune_batch: int = 16
  learning_rate: float = 3e-3  # AdamW peak learning rate (all phases)
  budgets: tuple[float, ...] = (0.1, 0.25)  # selected fractions of the pool
  proj_dim: int = 256  # LESS projection width (8192 at paper scale)
  gdig_layers: tuple[str, ...] = ("blocks/0/mlp/fc", "blocks/1/mlp/fc")
  gdig_damping: float = 0.5  # lambda of G-DIG's released scripts
  gdig_method: str = "kfac_factored"  # G-DIG's code path (see methods.kfac)
  damping_sweep: tuple[float, ...] = (1e-6, 1e-4, 1e-2, 0.5, 10.0)
  seed_batch: int = 8  # G-DIG's seed (query) batch size
  num_clusters: int = 8  # k of G-DIG's diversity step and of coverage
  keep_factor: float = 2.0  # G-DIG clusters keep_factor x budget candidates
  chunk_size: int = 64  # per-example gradients vmapped at once
  classifier_steps: int = 300  # the byte n-gram classifier baseline

  def __post_init__(self):
    check_profile(self.profile)
    _check_seeds(self)
    for name in self.sources:
      if name not in INSTRUCTION_SOURCES:
        raise ConfigError(
          f"SelectionConfig.sources has unknown source {name!r}; known "
          "sources are " + ", ".join(INSTRUCTION_SOURCES)
        )
    if len(set(self.sources)) != len(self.sources) or len(self.sources) < 2:
      raise ConfigError(
        f"SelectionConfig.sources = {self.sources!r} must name at least two "
        "distinct sources"
      )
    check_choice(self, "target", self.sources)
    check_in_range(self, "corrupt_rate", 0.0, 0.9)
    check_int(
      self,
      "pool_per_source",
      "seed_size",
      "eval_size",
      "d_model",
      "num_layers",
      "num_heads",
      "d_mlp",
      "warmup_steps",
      "warmup_batch",
      "checkpoints",
      "finetune_steps",
      "finetune_batch",
      "proj_dim",
      "seed_batch",
      "num_clusters",
      "chunk_size",
      "classifier_steps",
    )
    check_int(self, "pretrain_steps", minimum=0)
    check_int(self, "pretrain_batch")
    check_int(self, "seq_len", minimum=8)
    check_positive(self, "learning_rate", "gdig_damping")
    check_choice(self, "gdig_method", KFAC_METHODS)
    if not self.budgets or not all(0 < b < 1 for b in self.budgets):
      raise ConfigError(
        f"SelectionConfig.budgets = {self.budgets!r} must be fractions in (0, 1)"
      )
    if not self.gdig_layers:
      raise ConfigError("SelectionConfig.gdig_layers is empty; name MLP layers")
    if self.warmup_steps % self.checkpoints:
      raise ConfigError(
        f"SelectionConfig.checkpoints = {self.checkpoints} must divide "
        f"warmup_steps = {self.warmup_steps}"
      )
    if not all(d > 0 for d in self.damping_sweep):
      raise ConfigError(
        f"SelectionConfig.damping_sweep = {self.damping_sweep!r} must be > 0"
      )
    if not self.keep_factor >= 1:
      raise ConfigError(
        f"SelectionConfig.keep_factor = {self.keep_factor!r} must be >= 1"
      )


SELECTION_PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(
    seeds=(0,),
    sources=("chat", "glossary", "scripture"),
    pool_per_source=24,
    seed_size=8,
    eval_size=16,
    seq_len=32,
    d_model=16,
    num_layers=1,
    num_heads=2,
    d_mlp=32,
    pretrain_steps=4,
    pretrain_batch=8,
    warmup_steps=4,
    warmup_batch=8,
    finetune_steps=4,
    finetune_batch=8,
    proj_dim=16,
    gdig_layers=("blocks/0/mlp/fc",),
    seed_batch=4,
    num_clusters=3,
    chunk_size=8,
    classifier_steps=20,
    budgets=(0.25,),
  ),
  "book": {},
  "paper": dict(
    seeds=(0, 1, 2, 3, 4),
    pool_per_source=1000,
    seed_size=64,
    eval_size=400,
    seq_len=256,
    d_model=256,
    num_layers=6,
    num_heads=8,
    d_mlp=1024,
    pretrain_steps=20_000,
    pretrain_batch=64,
    warmup_steps=2000,
    warmup_batch=64,
    checkpoints=4,
    finetune_steps=2000,
    finetune_batch=64,
    learning_rate=1e-3,
    budgets=(0.05, 0.1, 0.25),
    proj_dim=8192,
    gdig_layers=tuple(f"blocks/{i}/mlp/fc" for i in range(6)),
    chunk_size=256,
    num_clusters=16,
  ),
}


def selection(profile: str = "book", **overrides: Any) -> SelectionConfig:
  """The selection study's config for ``profile``."""
  return from_profile(SelectionConfig, SELECTION_PRESETS, profile, overrides)
