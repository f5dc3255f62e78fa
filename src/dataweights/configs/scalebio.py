"""Configs of Chapter 4 (ScaleBiO data reweighting with LISA).

Every experiment starts from the same small byte-level decoder pre-trained
on the generic text mixture (``dw_text_domains``), then runs ScaleBiO
(:class:`dataweights.train.scalebio.ScaleBiO`) on instruction sources
(``dw_instructions``). Factories: :func:`noise_ordering`,
:func:`two_sources`, :func:`mixture`.

Profiles: ``smoke`` (seconds, tests), ``book`` (the published CPU run),
``paper`` (GPT-2 124M from a local safetensors file, the released scripts'
settings: alpha 10, peak lr 1e-5, lambda lr 1e-2, LISA 2 blocks every 20
steps; for a GPU/TPU, not run here).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dataweights.configs.base import (
  ConfigError,
  check_choice,
  check_int,
  check_positive,
  check_profile,
  from_profile,
)
from dataweights.configs.data import INSTRUCTION_SOURCES

# The sources of ``dw_instructions`` (one list for all configs).
SOURCE_NAMES: tuple[str, ...] = INSTRUCTION_SOURCES


def _check_source(cfg: Any, name: str) -> None:
  value = getattr(cfg, name)
  if value not in SOURCE_NAMES:
    raise ConfigError(
      f"{type(cfg).__name__}.{name} = {value!r} is not an instruction "
      "source; known sources are " + ", ".join(SOURCE_NAMES)
    )


def _check_sources(cfg: Any, name: str) -> None:
  value = getattr(cfg, name)
  kind = type(cfg).__name__
  if not isinstance(value, tuple) or not value:
    raise ConfigError(
      f"{kind}.{name} = {value!r} is invalid; it must be a non-empty tuple "
      "of instruction sources (a validation set needs at least one source)"
    )
  bad = [v for v in value if v not in SOURCE_NAMES]
  if bad:
    raise ConfigError(
      f"{kind}.{name} has unknown source(s) {bad}; known sources are "
      + ", ".join(SOURCE_NAMES)
    )
  if len(set(value)) != len(value):
    raise ConfigError(f"{kind}.{name} = {value!r} repeats a source")


@dataclasses.dataclass(frozen=True, slots=True)
class ScaleBiOChapterConfig:
  """What every Chapter-4 experiment shares.

  Attributes:
    profile: smoke | book | paper.
    d_model, num_layers, num_heads: the byte-level decoder (MLP 4 D).
    seq_len: tokens per row (prompt, SEP, response, EOS; cut to fit).
    gpt2_path: ``paper`` only: a local GPT-2 ``model.safetensors`` to start
      from instead of the pre-trained byte model ("" for the byte model).
    pretrain_steps, pretrain_batch, pretrain_lr: the generic pre-training
      (AdamW, cosine) on the English text domains, uniform mixture.
    batch_size: training rows per ScaleBiO step (drawn uniformly over the
      sources; ``B // K`` each and the remainder spread at random).
    valid_batch_size: validation rows per step.
    steps: ScaleBiO steps.
    alpha: penalty weight (the released GPT-2 script: 10).
    lr_w, lr_u: AdamW peak learning rates of ``w`` and ``u`` (constant
      after ``warmup_steps``).
    lr_p: AdamW learning rate of the source logits ``p``.
    warmup_steps: linear warm-up of ``w`` and ``u``.
    weight_decay: AdamW decay of ``w`` and ``u`` (the paper: 5e-4).
    lisa_active: LISA's active blocks (0: no LISA).
    lisa_period: steps between LISA redraws.
    w_pass: ``ScaleBiO.w_pass``: ``joint`` (one pass of ``w`` over the
      training and validation rows; the book's runs) or ``split`` (two
      passes: the lower memory peak at GPT-2 scale, the paper profile).
    seeds: independent runs (sampling order, LISA draws), vmapped.
    pad_sources: the ScaleBiO runs carry this many source weights, the
      unused ones fixed at exactly 0, so that every experiment of the
      chapter reuses one compiled step (results are those of an unpadded
      run).
  """

  profile: str = "book"
  d_model: int = 32
  num_layers: int = 3
  num_heads: int = 4
  seq_len: int = 48
  gpt2_path: str = ""
  pretrain_steps: int = 250
  pretrain_batch: int = 32
  pretrain_lr: float = 3e-3
  batch_size: int = 20
  valid_batch_size: int = 10
  steps: int = 150
  alpha: float = 10.0
  lr_w: float = 1e-3
  lr_u: float = 1e-3
  lr_p: float = 0.05
  warmup_steps: int = 10
  weight_decay: float = 5e-4
  lisa_active: int = 0
  lisa_period: int = 20
  w_pass: str = "joint"
  seeds: tuple[int, ...] = (0, 1, 2)
  pad_sources: int = 10

  def _check_common(self) -> None:
    check_profile(self.profile)
    check_int(self, "d_model", "num_layers", "num_heads", "pretrain_batch")
    check_int(self, "batch_size", "valid_batch_size", "steps", "lisa_period")
    check_int(self, "pad_sources")
    check_int(self, "seq_len", minimum=8)
    check_int(self, "pretrain_steps", "warmup_steps", "lisa_active", minimum=0)
    check_positive(self, "alpha", "lr_w", "lr_u", "lr_p", "pretrain_lr")
    check_positive(self, "weight_decay", allow_zero=True)
    check_choice(self, "w_pass", ("joint", "split"))
    if self.d_model % self.num_heads:
      raise ConfigError(
        f"{type(self).__name__}.d_model = {self.d_model} is not divisible "
        f"by num_heads = {self.num_heads}"
      )
    if self.lisa_active > self.num_layers:
      raise ConfigError(
        f"{type(self).__name__}.lisa_active = {self.lisa_active} is invalid:"
        f" the model has only num_layers = {self.num_layers} blocks; LISA "
        f"can activate at most {self.num_layers}"
      )
    seeds = self.seeds
    if (
      not isinstance(seeds, tuple)
      or not seeds
      or not all(isinstance(s, int) and s >= 0 for s in seeds)
      or len(set(seeds)) != len(seeds)
    ):
      raise ConfigError(
        f"{type(self).__name__}.seeds = {seeds!r} is invalid; it must be a "
        "non-empty tuple of distinct ints >= 0"
      )
    if not isinstance(self.gpt2_path, str):
      raise ConfigError(
        f"{type(self).__name__}.gpt2_path = {self.gpt2_path!r} must be a str"
      )


@dataclasses.dataclass(frozen=True, slots=True)
class NoiseOrderingConfig(ScaleBiOChapterConfig):
  """One source cut into partitions with responses replaced by ``"."``.

  Attributes:
    source: the instruction source cut into partitions; its validation
      split (clean) is the validation set.
    partitions: number of partitions; partition ``i`` has the rate
      ``i / (partitions - 1)`` of its responses replaced by ``"."``.
  """

  source: str = "dialogue"
  partitions: int = 10

  def __post_init__(self):
    self._check_common()
    _check_source(self, "source")
    check_int(self, "partitions", minimum=2)


@dataclasses.dataclass(frozen=True, slots=True)
class TwoSourcesConfig(ScaleBiOChapterConfig):
  """Two sources; the validation set is drawn from ``valid_sources``.

  Attributes:
    sources: the training sources.
    valid_sources: the sources of the validation set (validation splits).
  """

  sources: tuple[str, ...] = ("chat", "multilingual")
  valid_sources: tuple[str, ...] = ("chat",)

  def __post_init__(self):
    self._check_common()
    _check_sources(self, "sources")
    _check_sources(self, "valid_sources")


@dataclasses.dataclass(frozen=True, slots=True)
class MixtureConfig(ScaleBiOChapterConfig):
  """Several real sources and a target: weights, then resample and tune.

  Attributes:
    sources: the training sources.
    target: the target source: its validation split is ScaleBiO's
      validation set, its test split the final evaluation.
    resample_rows: rows of the resampled fine-tuning set (every mixture).
    finetune_steps: fine-tuning steps (``batch_size`` rows each; the same
      token budget for every mixture).
    finetune_lr: AdamW peak learning rate of the fine-tuning (cosine).
  """

  sources: tuple[str, ...] = (
    "chat",
    "multilingual",
    "dialogue",
    "glossary",
    "scripture",
    "fiction",
    "encyclopaedic",
  )
  target: str = "news"
  resample_rows: int = 1500
  finetune_steps: int = 150
  finetune_lr: float = 2e-3

  def __post_init__(self):
    self._check_common()
    _check_sources(self, "sources")
    _check_source(self, "target")
    if self.target in self.sources:
      raise ConfigError(
        f"MixtureConfig.target = {self.target!r} is also a training source;"
        " the target must be held out of training (drop it from sources)"
      )
    check_int(self, "resample_rows", "finetune_steps")
    check_positive(self, "finetune_lr")


_SMOKE: dict[str, Any] = dict(
  d_model=16,
  num_layers=2,
  num_heads=2,
  seq_len=24,
  pretrain_steps=4,
  pretrain_batch=8,
  batch_size=8,
  valid_batch_size=4,
  steps=4,
  warmup_steps=0,
  seeds=(0, 1),
  pad_sources=4,
)
# GPT-2 124M from a local file, the released scripts' settings.
_PAPER: dict[str, Any] = dict(
  d_model=768,
  num_layers=12,
  num_heads=12,
  seq_len=512,
  gpt2_path="gpt2/model.safetensors",
  pretrain_steps=0,
  batch_size=64,
  valid_batch_size=32,
  steps=3000,
  lr_w=1e-5,
  lr_u=1e-5,
  lr_p=1e-2,
  warmup_steps=100,
  lisa_active=2,
  lisa_period=20,
  w_pass="split",
)
_NOISE = {"smoke": dict(_SMOKE, partitions=4), "book": {}, "paper": _PAPER}
_TWO = {"smoke": _SMOKE, "book": dict(steps=100), "paper": _PAPER}
_MIX = {
  "smoke": dict(
    _SMOKE,
    sources=("chat", "glossary", "scripture"),
    resample_rows=64,
    finetune_steps=4,
  ),
  "book": {},
  "paper": dict(
    _PAPER, resample_rows=20_000, finetune_steps=2000, finetune_lr=2e-5
  ),
}


def noise_ordering(
  profile: str = "book", **overrides: Any
) -> NoiseOrderingConfig:
  """Config of ``ch4_noise`` (see :class:`NoiseOrderingConfig`)."""
  return from_profile(NoiseOrderingConfig, _NOISE, profile, overrides)


def two_sources(profile: str = "book", **overrides: Any) -> TwoSourcesConfig:
  """Config of ``ch4_two_sources`` (see :class:`TwoSourcesConfig`)."""
  return from_profile(TwoSourcesConfig, _TWO, profile, overrides)


def mixture(profile: str = "book", **overrides: Any) -> MixtureConfig:
  """Config of ``ch4_mixture`` (see :class:`MixtureConfig`)."""
  return from_profile(MixtureConfig, _MIX, profile, overrides)
