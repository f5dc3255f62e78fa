"""Config of chapter 2 (learned domain mixtures for a language model).

One frozen dataclass, :class:`LMMixingConfig`, shared by the chapter's
published results (they read different parts of the same runs), with a
factory ``lm_mixing(profile="book", **overrides)``. Profiles: ``smoke``
(seconds, unit tests), ``book`` (the published CPU run: a 2-layer byte-level
decoder, a few hundred steps, three seeds), ``paper`` (the reference
byte-level LM of Grangier et al. on an accelerator).
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

ENGLISH_DOMAINS: tuple[str, ...] = (
  "fiction",
  "encyclopaedic",
  "news",
  "forum",
  "dialogue",
  "social",
  "code",
  "legal",
  "religious",
  "glossary",
  "chat",
)
"""The eleven English text domains of ``dw_text_domains`` (no noise)."""

HYPERGRAD_MODES = (
  "auto",
  "forward",
  "reverse",
  "reverse_remat",
  "reverse_sweep",
)


@dataclasses.dataclass(frozen=True, slots=True)
class LMMixingConfig:
  """Every method and baseline on two targets, several seeds.

  Target A: all domains (validation: a uniform mixture of every domain's
  validation split; report the average and worst held-out loss). Target B:
  one domain, out of the training mixture, known only through a small
  validation set (report its held-out loss and the others').
  """

  profile: str = "book"
  domains: tuple[str, ...] = ENGLISH_DOMAINS  # the K training domains
  target: str = "religious"  # target B's domain
  target_valid_docs: int = 4  # target B's small validation set (documents)
  # Model: a GPT-2-style byte-level decoder.
  num_layers: int = 2
  d_model: int = 32
  num_heads: int = 4
  d_mlp: int = 128
  context: int = 64  # tokens the model reads; rows hold context + 1
  # Init std of the weights. GPT-2's 0.02 suits width 768; at width 32 it
  # leaves the model on the unigram plateau (2.9 nats/byte) for 100-300
  # steps, so that which seed escapes first decides every comparison.
  init_std: float = 0.1
  # Training (AdamW, warm-up + cosine; equal token budget for every method).
  steps: int = 150  # N updates of every main model
  batch_size: int = 16  # B rows; >= K so every domain is in every batch
  valid_batch_size: int = 8  # rows of the methods' validation batch
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  seeds: tuple[int, ...] = (0, 1, 2)  # model init and data order
  eval_rows: int = 32  # held-out rows per domain (test split)
  # Baselines.
  temperature: float = 3.0  # w ∝ n^(1/τ), n = training tokens
  # Methods.
  doremi_step_size: float = 1.0  # η (the paper's)
  doremi_smoothing: float = 1e-3  # c (the paper's)
  odm_reward_scale: float = 0.1  # s (the authors' code)
  align_beta: float = 0.05  # EG step of the T = 1 rule, per update
  horizon_beta: float = 0.05  # EG step per inner step: a round moves T beta
  horizons: tuple[int, ...] = (1, 8)  # T of finite-horizon mixing
  hypergrad_mode: str = "auto"  # see methods.horizon.choose_hypergrad_mode
  unroll: bool = True  # unroll the replayed steps (see methods.horizon)
  weight_every: int = 5  # keep the weights every this many steps (figure)

  def __post_init__(self):
    check_profile(self.profile)
    ok = isinstance(self.domains, tuple) and len(self.domains) >= 2
    ok = ok and len(set(self.domains)) == len(self.domains)
    if not ok:
      raise ConfigError(
        f"LMMixingConfig.domains = {self.domains!r} is invalid; it must be a "
        "tuple of at least 2 distinct domain names"
      )
    check_choice(self, "target", self.domains)
    check_int(
      self,
      "target_valid_docs",
      "num_layers",
      "d_model",
      "num_heads",
      "d_mlp",
      "context",
      "steps",
      "batch_size",
      "valid_batch_size",
      "eval_rows",
      "weight_every",
    )
    check_int(self, "warmup_steps", minimum=0)
    if self.batch_size < len(self.domains):
      raise ConfigError(
        f"LMMixingConfig.batch_size = {self.batch_size} is invalid; it must "
        f"be >= the number of domains ({len(self.domains)}) so that "
        "stratified batches hold every domain"
      )
    seeds_ok = isinstance(self.seeds, tuple) and len(self.seeds) >= 2
    seeds_ok = seeds_ok and all(
      isinstance(s, int) and not isinstance(s, bool) and s >= 0
      for s in self.seeds
    )
    if not seeds_ok or len(set(self.seeds)) != len(self.seeds):
      raise ConfigError(
        f"LMMixingConfig.seeds = {self.seeds!r} is invalid; it must be a "
        "tuple of >= 2 distinct integers >= 0 (intervals need 2 seeds)"
      )
    hz_ok = isinstance(self.horizons, tuple) and len(self.horizons) >= 1
    hz_ok = hz_ok and all(
      isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= self.steps
      for t in self.horizons
    )
    if not hz_ok:
      raise ConfigError(
        f"LMMixingConfig.horizons = {self.horizons!r} is invalid; it must be "
        f"a tuple of integers in [1, steps = {self.steps}]"
      )
    check_positive(
      self,
      "learning_rate",
      "temperature",
      "doremi_step_size",
      "odm_reward_scale",
      "align_beta",
      "horizon_beta",
    )
    check_positive(self, "doremi_smoothing", allow_zero=True)
    if self.temperature < 1:
      raise ConfigError(
        f"LMMixingConfig.temperature = {self.temperature} is invalid; it "
        "must be >= 1"
      )
    check_choice(self, "hypergrad_mode", HYPERGRAD_MODES)
    check_choice(self, "unroll", (True, False))
    if self.d_model % self.num_heads:
      raise ConfigError(
        f"LMMixingConfig.d_model = {self.d_model} is not divisible by "
        f"num_heads = {self.num_heads}"
      )

  @property
  def num_domains(self) -> int:
    """K."""
    return len(self.domains)

  def to_dict(self) -> dict[str, Any]:
    """The fields as a JSON-able dict."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(
    num_layers=1,
    d_model=16,
    num_heads=2,
    d_mlp=32,
    context=16,
    steps=6,
    warmup_steps=2,
    batch_size=12,
    valid_batch_size=4,
    seeds=(0, 1),
    eval_rows=2,
    horizons=(1, 2),
    weight_every=2,
    target_valid_docs=2,
  ),
  "book": dict(),
  # The reference byte-level LM of Grangier et al. (Sources §2), for a GPU.
  "paper": dict(
    num_layers=12,
    d_model=256,
    num_heads=8,
    d_mlp=1024,
    context=256,
    steps=20_000,
    batch_size=128,
    valid_batch_size=128,
    learning_rate=2e-3,
    warmup_steps=1000,
    seeds=(0, 1, 2, 3, 4),
    eval_rows=256,
    horizons=(1, 8, 32),
    weight_every=100,
    target_valid_docs=8,
    align_beta=0.005,
    horizon_beta=0.005,
  ),
}


def lm_mixing(profile: str = "book", **overrides: Any) -> LMMixingConfig:
  """The chapter-2 config for ``profile`` with ``overrides``.

  Raises:
    ConfigError: unknown profile or field, or an invalid value.
  """
  return from_profile(LMMixingConfig, PRESETS, profile, overrides)
