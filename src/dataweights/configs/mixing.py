"""Configs of chapter 1 ("Less is more": data mixing over a finite horizon T).

One frozen dataclass per published result, each with a factory
``name(profile="book", **overrides)``. Profiles: ``smoke`` (seconds, unit
tests), ``book`` (the published CPU run, minutes in all), ``paper`` (larger
budgets, more seeds; meant for a GPU).
"""

from __future__ import annotations

import dataclasses
import math
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

OUTER = ("eg", "pgd")


def _check_int_tuple(cfg: Any, name: str, minimum: int = 1) -> None:
  """Raises unless ``name`` is a non-empty, strictly increasing int tuple."""
  value = getattr(cfg, name)
  ok = isinstance(value, tuple) and len(value) > 0
  ok = ok and all(
    isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
  )
  ok = ok and all(a < b for a, b in zip(value, value[1:]))
  if not ok:
    raise ConfigError(
      f"{type(cfg).__name__}.{name} = {value!r} is invalid; it must be a "
      f"non-empty increasing tuple of integers >= {minimum}"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class HypergradCheckConfig:
  """Table: forward (Prop. 4.1) == reverse == finite differences == implicit."""

  profile: str = "book"
  horizons: tuple[int, ...] = (1, 10, 100)  # inner horizons T checked
  lr: float = 0.02  # inner step size eta (quadratic)
  implicit_steps: int = 2000  # T used to compare against the implicit limit
  fd_eps: float = 1e-6  # central-difference step (float64)
  seed: int = 0  # random weights and starting point

  def __post_init__(self):
    check_profile(self.profile)
    _check_int_tuple(self, "horizons")
    check_positive(self, "lr", "fd_eps")
    check_int(self, "implicit_steps")
    check_int(self, "seed", minimum=0)


@dataclasses.dataclass(frozen=True, slots=True)
class GreedyQuadraticConfig:
  """Greedy T = 1 fails on the 2-D quadratic (Theorem 5.1 style)."""

  profile: str = "book"
  horizons: tuple[int, ...] = (1, 10, 100)  # horizons whose runs are shown
  lr: float = 0.02  # inner step size eta
  beta: float = 1.0  # EG outer step size
  budget: int = 5000  # inner steps N per run
  points: int = 40  # points kept per trajectory / curve in the figure
  grid: int = 2001  # resolution of the exact optimum's grid search

  def __post_init__(self):
    check_profile(self.profile)
    _check_int_tuple(self, "horizons")
    check_positive(self, "lr", "beta")
    check_int(self, "budget", "points")
    check_int(self, "grid", minimum=3)
    if self.budget < max(self.horizons):
      raise ConfigError(
        f"GreedyQuadraticConfig.budget = {self.budget} is invalid; it must "
        f"be >= max(horizons) = {max(self.horizons)}"
      )


@dataclasses.dataclass(frozen=True, slots=True)
class HorizonFullConfig:
  """Figure-1 style: validation loss and w_2 against T, full gradients."""

  profile: str = "book"
  horizons: tuple[int, ...] = (1, 2, 3, 5, 8, 13, 20, 30, 50, 80, 130, 200, 300, 500, 1000)
  budgets: tuple[int, ...] = (1000, 5000)  # budgets N compared
  lr: float = 0.02  # inner step size eta
  beta: float = 0.1  # EG outer step size
  outer: str = "eg"  # outer update

  def __post_init__(self):
    check_profile(self.profile)
    _check_int_tuple(self, "horizons")
    _check_int_tuple(self, "budgets")
    check_positive(self, "lr", "beta")
    check_choice(self, "outer", OUTER)


@dataclasses.dataclass(frozen=True, slots=True)
class HorizonMinibatchConfig:
  """Figure-2 style: loss, accuracy and w_2 against T, minibatch gradients."""

  profile: str = "book"
  horizons: tuple[int, ...] = (1, 3, 10, 25, 50, 100, 250, 1000)
  budgets: tuple[int, ...] = (1000, 5000)  # budgets N compared
  seeds: int = 16  # independent runs (vmapped), common random numbers
  dim: int = 5  # feature dimension D
  pool_sizes: tuple[int, ...] = (4000, 1000, 2000)  # training pool per domain
  n_val: int = 2000  # validation examples
  batch_size: int = 8  # examples per domain per inner step
  val_batch_size: int = 64  # validation examples per hypergradient
  l2: float = 0.01  # ridge coefficient (strong convexity)
  lr: float = 0.3  # inner step size eta
  beta: float = 10.0  # EG outer step size
  level: float = 0.95  # confidence level of the intervals

  def __post_init__(self):
    check_profile(self.profile)
    _check_int_tuple(self, "horizons")
    _check_int_tuple(self, "budgets")
    check_int(self, "n_val", "batch_size", "val_batch_size")
    check_int(self, "seeds", minimum=2)
    check_int(self, "dim", minimum=3)
    check_positive(self, "l2", allow_zero=True)
    check_positive(self, "lr", "beta")
    check_in_range(self, "level", 0.5, 0.999)
    pools = self.pool_sizes
    if (
      not isinstance(pools, tuple)
      or len(pools) != 3
      or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in pools)
    ):
      raise ConfigError(
        f"HorizonMinibatchConfig.pool_sizes = {self.pool_sizes!r} is invalid; "
        "it must be 3 positive integers (one per domain)"
      )


def _check_t_max(cfg: Any, name: str) -> None:
  value = getattr(cfg, name)
  if (not isinstance(value, (int, float)) or isinstance(value, bool)
      or not math.isfinite(value) or not value >= 2):
    raise ConfigError(
      f"{type(cfg).__name__}.{name} = {value!r} is invalid; it must be a finite number >= 2")


def _check_positive_tuple(cfg: Any, name: str) -> None:
  """Raises unless ``name`` is a non-empty tuple of finite numbers > 0."""
  value = getattr(cfg, name)
  ok = isinstance(value, tuple) and len(value) > 0 and all(
    isinstance(v, (int, float)) and not isinstance(v, bool)
    and math.isfinite(v) and v > 0
    for v in value)
  if not ok:
    raise ConfigError(
      f"{type(cfg).__name__}.{name} = {value!r} is invalid; it must be a "
      "non-empty tuple of finite numbers > 0")


@dataclasses.dataclass(frozen=True, slots=True)
class HorizonScalingConfig:
  """Beyond the paper: T*(N) with full gradients, four conditionings, two outer steps.

  The 3-domain quadratic with the training curvature of coordinate 2 scaled
  by each of ``curvature_scales`` (this changes ημ, not the outer
  objective), a geometric grid of ``n_horizons`` horizons from 1 to
  ``t_max`` and budgets ``budgets``; outer step constant (``β``) or
  decaying (``β / (1 + beta_decay · r)``). float64.
  """

  profile: str = "book"
  budgets: tuple[int, ...] = (250, 400, 630, 1000, 1600, 2500, 4000, 6300,
                              10000, 16000, 25000, 40000, 63000, 100000,
                              160000, 250000)
  n_horizons: int = 48  # geometric T grid from 1 to t_max (duplicates merged)
  t_max: float = 100000.0
  curvature_scales: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
  lr: float = 0.02  # inner step size eta
  beta: float = 0.1  # EG outer step size
  beta_decay: float = 0.1  # decaying arm: beta_r = beta / (1 + beta_decay r)
  half: int = 3  # parabola fit: argmin +- half grid points
  floor: float = 1e-12  # no T* where the excess is below this (float64 limit)
  fit_fraction: float = 0.67  # law fits: first fraction of budgets; rest held out

  def __post_init__(self):
    check_profile(self.profile)
    _check_int_tuple(self, "budgets", minimum=2)
    check_int(self, "n_horizons", minimum=8)
    _check_t_max(self, "t_max")
    check_positive(self, "lr", "beta", "beta_decay", "floor")
    check_int(self, "half")
    check_in_range(self, "fit_fraction", 0.3, 0.9)
    _check_positive_tuple(self, "curvature_scales")


@dataclasses.dataclass(frozen=True, slots=True)
class MinibatchScalingConfig:
  """Beyond the paper: T*(N) with noisy gradients, seeds bootstrapped.

  The 3-domain quadratic with additive Gaussian gradient noise. Two arms:
  constant steps (``lr``, ``beta``) and the inner step ``lr_N = lr ·
  (budget0 / N)^lr_power`` (``beta`` constant). Per budget a geometric grid
  of ``n_horizons`` horizons from ``max(1, N / t_span)`` to ``N / 2``.
  """

  profile: str = "book"
  budgets: tuple[int, ...] = (1000, 2000, 5000, 10000, 20000)
  n_horizons: int = 30
  t_span: float = 2000.0  # the grid spans N / t_span .. N / 2
  seeds: int = 64
  noise: float = 2.0  # std of the additive gradient noise
  lr: float = 0.02
  budget0: int = 1000  # lr_N = lr at N = budget0
  lr_power: float = 0.5
  beta: float = 0.1
  bootstrap: int = 1000  # seed resamples
  level: float = 0.90  # percentile interval of the bootstrap
  half: int = 3
  fit_fraction: float = 0.6

  def __post_init__(self):
    check_profile(self.profile)
    _check_int_tuple(self, "budgets", minimum=10)
    check_int(self, "n_horizons", minimum=8)
    check_int(self, "seeds", "bootstrap", minimum=2)
    check_int(self, "budget0", "half")
    check_positive(self, "t_span", "noise", "lr", "lr_power", "beta")
    check_in_range(self, "level", 0.5, 0.999)
    check_in_range(self, "fit_fraction", 0.3, 0.9)


@dataclasses.dataclass(frozen=True, slots=True)
class AdaptiveHorizonConfig:
  """Beyond the paper: a horizon growing with the round, T_r = 1 + c r.

  Quadratic (full gradients, float64): fixed horizons on a geometric grid
  against growth rates ``c`` on a geometric grid, at every budget.
  Classification (the Figure-2 problem, minibatches, common random
  numbers): ``horizons`` against ``growths``; the best of each is chosen
  on the validation set and reported on a held-out test set.
  """

  profile: str = "book"
  quad_budgets: tuple[int, ...] = (250, 500, 1000, 2000, 5000, 10000, 20000,
                                   50000, 100000)
  quad_n_horizons: int = 48  # fixed T grid, 1 .. quad_t_max
  quad_t_max: float = 100000.0
  quad_growths: tuple[float, ...] = (0.03, 0.06, 0.1, 0.18, 0.3, 0.53, 0.95,
                                     1.7, 3.0, 5.3, 9.5, 17.0, 30.0)
  quad_lr: float = 0.02
  quad_beta: float = 0.1
  budgets: tuple[int, ...] = (1000, 2000, 5000)  # classification budgets
  horizons: tuple[int, ...] = (1, 10, 30, 100, 300, 1000)
  growths: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
  seeds: int = 16
  n_test: int = 4000  # held-out test examples (classification)
  level: float = 0.95

  def __post_init__(self):
    check_profile(self.profile)
    _check_int_tuple(self, "quad_budgets")
    _check_int_tuple(self, "budgets")
    _check_int_tuple(self, "horizons")
    check_int(self, "quad_n_horizons", minimum=8)
    _check_t_max(self, "quad_t_max")
    check_positive(self, "quad_lr", "quad_beta")
    _check_positive_tuple(self, "quad_growths")
    _check_positive_tuple(self, "growths")
    check_int(self, "seeds", minimum=2)
    check_int(self, "n_test")
    check_in_range(self, "level", 0.5, 0.999)


ADULT_TARGETS = ("all", "smallest2")


@dataclasses.dataclass(frozen=True, slots=True)
class AdultMixingConfig:
  """The same method on UCI Adult, domains = a natural column.

  Two targets: ``all`` (validation and test = the whole splits, i.e. the
  natural mixture) and ``smallest2`` (validation and test = the rows of
  the two smallest training domains: a target that differs from the
  training mixture). Every method of a seed sees the same per-domain
  minibatch at every step (common random numbers); ``natural (pooled)``
  samples its ``K · batch_size`` examples i.i.d. from the pooled training
  set instead.
  """

  profile: str = "book"
  domain_column: str = "workclass"  # see data.tabular.DOMAIN_COLUMNS
  targets: tuple[str, ...] = ADULT_TARGETS
  horizons: tuple[int, ...] = (1, 5, 20, 100)  # fixed horizons
  growth: float = 1.0  # adaptive horizon T_r = 1 + growth * r
  budget: int = 2000  # inner steps N
  seeds: int = 6  # independent runs (vmapped)
  batch_size: int = 16  # examples per domain per inner step
  val_batch_size: int = 256  # validation examples per hypergradient
  l2: float = 1e-3  # ridge coefficient
  lr: float = 0.1  # inner step size eta
  beta: float = 30.0  # EG outer step size
  level: float = 0.95

  def __post_init__(self):
    check_profile(self.profile)
    check_choice(
      self,
      "domain_column",
      ("workclass", "marital-status", "occupation", "relationship", "race",
       "gender", "native-country"),
    )
    if not (isinstance(self.targets, tuple) and self.targets
            and all(t in ADULT_TARGETS for t in self.targets)):
      raise ConfigError(
        f"AdultMixingConfig.targets = {self.targets!r} is invalid; allowed "
        f"values are tuples of {ADULT_TARGETS}")
    _check_int_tuple(self, "horizons")
    check_int(self, "budget", "batch_size", "val_batch_size")
    check_int(self, "seeds", minimum=2)
    check_positive(self, "l2", allow_zero=True)
    check_positive(self, "lr", "beta", "growth")
    check_in_range(self, "level", 0.5, 0.999)
    if self.budget < max(self.horizons):
      raise ConfigError(
        f"AdultMixingConfig.budget = {self.budget} is invalid; it must be "
        f">= max(horizons) = {max(self.horizons)}"
      )


_HYPERGRAD = {
  "smoke": dict(horizons=(1, 5), implicit_steps=1000),
  "book": {},
  "paper": dict(horizons=(1, 10, 100, 1000), implicit_steps=5000),
}
_GREEDY = {
  "smoke": dict(budget=400, horizons=(1, 20), points=20, grid=401),
  "book": {},
  "paper": dict(budget=20000, horizons=(1, 10, 100, 1000)),
}
_FULL = {
  "smoke": dict(horizons=(1, 5, 50), budgets=(100, 300)),
  "book": {},
  "paper": dict(
    horizons=(1, 2, 3, 5, 8, 13, 20, 30, 50, 80, 130, 200, 300, 500, 800, 1300, 2000, 5000),
    budgets=(1000, 5000, 20000),
  ),
}
_MINIBATCH = {
  "smoke": dict(horizons=(1, 10, 50), budgets=(100, 200), seeds=2,
                pool_sizes=(200, 100, 100), n_val=200),
  "book": {},
  "paper": dict(horizons=(1, 2, 3, 5, 10, 25, 50, 100, 250, 500, 1000),
                budgets=(1000, 5000, 20000), seeds=64),
}
_SCALING = {
  "smoke": dict(budgets=(100, 200, 400, 800), n_horizons=16, t_max=400.0,
                curvature_scales=(1.0, 10.0)),
  "book": {},
  "paper": dict(
    budgets=(250, 400, 630, 1000, 1600, 2500, 4000, 6300, 10000, 16000, 25000,
             40000, 63000, 100000, 160000, 250000, 400000, 630000, 1000000,
             2000000),
    n_horizons=72, t_max=1000000.0,
    curvature_scales=(0.1, 0.3, 1.0, 3.0, 10.0)),
}
_SCALING_MB = {
  "smoke": dict(budgets=(200, 400, 800), n_horizons=10, seeds=4, bootstrap=20,
                t_span=100.0, budget0=200),
  "book": {},
  "paper": dict(budgets=(1000, 2000, 5000, 10000, 20000, 50000, 100000,
                         200000, 500000, 1000000),
                n_horizons=40, seeds=256, bootstrap=2000),
}
_ADAPTIVE = {
  "smoke": dict(quad_budgets=(100, 200, 400), quad_n_horizons=12,
                quad_t_max=200.0, quad_growths=(0.3, 1.0, 3.0), budgets=(200,),
                horizons=(1, 10, 50), growths=(1.0,), seeds=2, n_test=200),
  "book": {},
  "paper": dict(quad_budgets=(250, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                              100000, 200000, 500000, 1000000),
                quad_n_horizons=72, quad_t_max=1000000.0,
                budgets=(1000, 2000, 5000, 10000, 20000),
                horizons=(1, 3, 10, 30, 100, 300, 1000, 3000),
                growths=(0.1, 0.3, 1.0, 3.0, 10.0, 30.0), seeds=64),
}
_ADULT = {
  "smoke": dict(budget=100, horizons=(1, 10), seeds=2, batch_size=4,
                val_batch_size=32),
  "book": {},
  "paper": dict(budget=20000, horizons=(1, 5, 20, 100, 500), seeds=16),
}


def hypergrad_check(profile: str = "book", **overrides: Any) -> HypergradCheckConfig:
  """Config of ``ch1_hypergrad`` (see :class:`HypergradCheckConfig`)."""
  return from_profile(HypergradCheckConfig, _HYPERGRAD, profile, overrides)


def greedy_quadratic(profile: str = "book", **overrides: Any) -> GreedyQuadraticConfig:
  """Config of ``ch1_greedy`` (see :class:`GreedyQuadraticConfig`)."""
  return from_profile(GreedyQuadraticConfig, _GREEDY, profile, overrides)


def horizon_full(profile: str = "book", **overrides: Any) -> HorizonFullConfig:
  """Config of ``ch1_horizon_full`` (see :class:`HorizonFullConfig`)."""
  return from_profile(HorizonFullConfig, _FULL, profile, overrides)


def horizon_minibatch(profile: str = "book", **overrides: Any) -> HorizonMinibatchConfig:
  """Config of ``ch1_horizon_minibatch`` (see :class:`HorizonMinibatchConfig`)."""
  return from_profile(HorizonMinibatchConfig, _MINIBATCH, profile, overrides)


def horizon_scaling(profile: str = "book", **overrides: Any) -> HorizonScalingConfig:
  """Config of ``ch1_scaling`` (see :class:`HorizonScalingConfig`)."""
  return from_profile(HorizonScalingConfig, _SCALING, profile, overrides)


def minibatch_scaling(profile: str = "book", **overrides: Any) -> MinibatchScalingConfig:
  """Config of ``ch1_scaling_minibatch`` (see :class:`MinibatchScalingConfig`)."""
  return from_profile(MinibatchScalingConfig, _SCALING_MB, profile, overrides)


def adaptive_horizon(profile: str = "book", **overrides: Any) -> AdaptiveHorizonConfig:
  """Config of ``ch1_adaptive`` (see :class:`AdaptiveHorizonConfig`)."""
  return from_profile(AdaptiveHorizonConfig, _ADAPTIVE, profile, overrides)


def adult_mixing(profile: str = "book", **overrides: Any) -> AdultMixingConfig:
  """Config of ``ch1_adult`` (see :class:`AdultMixingConfig`)."""
  return from_profile(AdultMixingConfig, _ADULT, profile, overrides)
