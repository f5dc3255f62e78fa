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
from dataweights.methods.kfac import METHODS as KFAC_METHODS


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
      self, "lbfgs_steps", "newton_steps", "loo_steps", "cg_iters",
      "loo_batch", "bootstrap",
    )
    check_positive(self, "l2", "loo_tol")
    if self.n_removed > self.n_train:
      raise ConfigError(
        f"InfluenceLOOConfig.n_removed = {self.n_removed} exceeds n_train = "
        f"{self.n_train}; at most every training example can be removed"
      )


LOO_PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(
    seeds=(0,), n_train=60, n_query=20, n_removed=8, hidden=4,
    lbfgs_steps=200, loo_steps=8, loo_batch=4, bootstrap=50,
  ),
  "book": {},
  "paper": dict(
    seeds=(0, 1, 2, 3, 4), n_train=1000, n_query=279, n_removed=1000,
    hidden=32, loo_batch=100,
  ),
}


def influence_loo(profile: str = "book", **overrides: Any) -> InfluenceLOOConfig:
  """The leave-one-out study's config for ``profile``."""
  return from_profile(InfluenceLOOConfig, LOO_PRESETS, profile, overrides)


__all__ = [
  "KFAC_METHODS",
  "InfluenceLOOConfig",
  "check_choice",
  "check_in_range",
  "influence_loo",
]
