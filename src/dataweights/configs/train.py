"""Training-loop config: optimiser, schedule, batch, checkpoints, logging.

``train(profile="book", **overrides)`` returns a frozen :class:`TrainConfig`.
The ``paper`` preset is the reference byte-level LM's recipe of Grangier et
al. (AdamW, lr 2e-3, warm-up then inverse-square-root decay, 128 sequences
per step; the book's Sources §2), matching ``lm.lm_model("paper")`` and
``pipeline("paper")``. :data:`GPT2_124M` holds the nanoGPT GPT-2 124M recipe
(lr 6e-4, betas (0.9, 0.95), decay 0.1, clip 1.0, 2000 warm-up steps,
cosine to 10%, 512 sequences) as overrides, for
``lm.lm_model("paper", size="gpt2-124m")`` on a mesh. Compose them with
:func:`dataweights.configs.run.run`, which checks that they agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dataweights.configs.base import (
  ConfigError,
  check_choice,
  check_in_range,
  check_int,
  check_optional_str,
  check_positive,
  check_profile,
  from_profile,
)

OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "inverse_sqrt")

# Fields that may change between a run and its resumption without changing
# the arithmetic of the steps already taken (where to log, how often to save).
RESUME_MUTABLE_FIELDS: frozenset[str] = frozenset(
  {
    "checkpoint_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "log_every",
    "progress",
  }
)


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
  """How to train: optimiser, schedule, batching, checkpoints.

  Attributes:
    profile: the preset this config came from (smoke | book | paper).
    optimizer: ``adamw`` (decoupled weight decay), ``adam`` (no decay) or
      ``sgd`` (momentum ``b1``; decay added to the gradient).
    learning_rate: peak learning rate, reached at the end of warm-up.
    schedule: ``constant``, ``cosine`` (to ``min_lr_ratio * lr`` at ``steps``)
      or ``inverse_sqrt`` (``lr * sqrt(warmup / step)`` after warm-up).
    warmup_steps: linear warm-up from 0 to ``learning_rate``.
    min_lr_ratio: final learning rate of the cosine schedule, as a fraction.
    steps: number of optimiser updates.
    batch_size: sequences per optimiser update (all microbatches together).
    accumulation_steps: microbatches per update; must divide ``batch_size``.
      The update equals the one-big-batch update (up to float summation
      order).
    grad_clip: clip the global gradient norm to this value; 0 disables.
    weight_decay: decay coefficient; applied only to parameters with
      ``ndim >= 2`` (kernels, embeddings), never to biases or norm scales.
    b1: Adam first-moment decay, or SGD momentum (0 disables momentum).
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    eps_root: added to Adam's second moment under the square root; a tiny
      value (1e-30) leaves every update unchanged except where a gradient
      is ~0, and makes the update differentiable there (hypergradients
      through optimiser steps, e.g. finite-horizon mixing, are NaN
      otherwise: d sqrt(v)/dv is infinite at v = 0).
    seed: seed of the model initialisation and of the step RNG key.
    checkpoint_dir: where to keep checkpoints; ``None`` disables them.
    checkpoint_every: save every this many steps (and at the last step).
    keep_checkpoints: keep the last this many checkpoints.
    eval_every: evaluate every this many steps (0 disables evaluation).
    log_every: record metrics in the history every this many steps.
    progress: show a tqdm progress bar.
  """

  profile: str = "book"
  optimizer: str = "adamw"
  learning_rate: float = 3e-3
  schedule: str = "cosine"
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  steps: int = 200
  batch_size: int = 16
  accumulation_steps: int = 1
  grad_clip: float = 1.0
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  eps_root: float = 0.0
  seed: int = 0
  checkpoint_dir: str | None = None
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  eval_every: int = 0
  log_every: int = 1
  progress: bool = True

  def __post_init__(self):
    check_profile(self.profile)
    check_choice(self, "optimizer", OPTIMIZERS)
    check_choice(self, "schedule", SCHEDULES)
    check_positive(self, "learning_rate")
    check_positive(self, "grad_clip", "weight_decay", allow_zero=True)
    check_in_range(self, "min_lr_ratio", 0.0, 1.0)
    check_in_range(self, "b1", 0.0, 0.999999)
    check_in_range(self, "b2", 0.0, 0.999999)
    check_positive(self, "eps")
    check_positive(self, "eps_root", allow_zero=True)
    check_int(self, "steps", "batch_size", "accumulation_steps")
    check_int(self, "checkpoint_every", "keep_checkpoints", "log_every")
    check_int(self, "warmup_steps", "eval_every", "seed", minimum=0)
    if self.batch_size % self.accumulation_steps:
      raise ConfigError(
        f"TrainConfig.accumulation_steps = {self.accumulation_steps} must "
        f"divide batch_size = {self.batch_size}"
      )
    if self.schedule == "inverse_sqrt" and self.warmup_steps == 0:
      raise ConfigError(
        "TrainConfig.warmup_steps = 0 is invalid with schedule='inverse_sqrt'"
        "; it must be an integer >= 1 (the decay is lr * sqrt(warmup/step))"
      )
    if self.optimizer == "adam" and self.weight_decay:
      raise ConfigError(
        f"TrainConfig.weight_decay = {self.weight_decay!r} is invalid with "
        "optimizer='adam' (no decay); use optimizer='adamw' or weight_decay=0"
      )
    check_optional_str(self, "checkpoint_dir")
    if not isinstance(self.progress, bool):
      raise ConfigError(
        f"TrainConfig.progress = {self.progress!r} is invalid; it must be a bool"
      )

  @property
  def microbatch_size(self) -> int:
    """Sequences per microbatch."""
    return self.batch_size // self.accumulation_steps

  def to_dict(self) -> dict[str, Any]:
    """The fields as a JSON-able dict."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


PRESETS: dict[str, dict[str, Any]] = {
  # Seconds on CPU: the unit tests and the CI smoke run.
  "smoke": dict(
    learning_rate=1e-2,
    warmup_steps=2,
    steps=8,
    batch_size=4,
    checkpoint_every=4,
    keep_checkpoints=2,
    progress=False,
  ),
  # The published CPU run (a few minutes on 2 cores).
  "book": dict(
    learning_rate=3e-3,
    warmup_steps=20,
    steps=300,
    batch_size=16,
    checkpoint_every=100,
    keep_checkpoints=3,
  ),
  # Grangier et al.'s byte-level reference LM; meant for an accelerator.
  "paper": dict(
    learning_rate=2e-3,
    schedule="inverse_sqrt",
    warmup_steps=1000,
    steps=300_000,
    batch_size=128,
    grad_clip=1.0,
    weight_decay=0.1,
    b1=0.9,
    b2=0.99,
    checkpoint_every=1000,
    keep_checkpoints=3,
    log_every=10,
  ),
}

# nanoGPT's GPT-2 124M recipe, as overrides of the "paper" preset.
GPT2_124M: dict[str, Any] = dict(
  learning_rate=6e-4,
  schedule="cosine",
  warmup_steps=2000,
  steps=100_000,
  batch_size=512,
  min_lr_ratio=0.1,
  b2=0.95,
)


def train(profile: str = "book", **overrides: Any) -> TrainConfig:
  """The training config for ``profile`` with ``overrides`` applied.

  Raises:
    ConfigError: unknown profile, unknown field or invalid value.
  """
  return from_profile(TrainConfig, PRESETS, profile, overrides)
