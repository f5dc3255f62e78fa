"""Configs of chapter 1 ("Less is more": data mixing over a finite horizon T).

One frozen dataclass per published result, each with a factory
``name(profile="book", **overrides)``. Profiles: ``smoke`` (seconds, unit
tests), ``book`` (the published CPU run, minutes in all), ``paper`` (larger
budgets, more seeds; meant for a GPU).
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

OUTER = ("eg", "pgd")


def _check_int_tuple(cfg: Any, name: str, minimum: int = 1) -> None:
  """Raises unless ``name`` is a non-empty, strictly increasing int tuple."""
  value = getattr(cfg, name)
  ok = isinstance(value, tuple) and len(value) > 0
  ok = ok and all(
    isinstance(v, int) and not isinstance(v, bool) and v >= minimum
    for v in value
  )
  ok = ok and all(a < b for a, b in zip(value, value[1:]))
  if not ok:
    raise ConfigError(
      f"{type(cfg).__name__}.{name} = {value!r} is invalid; it must be a "
      f"non-empty increasing tuple of integers >= {minimum}"
    )


def _check_divides(cfg: Any, name: str, of: str) -> None:
  chunk = getattr(cfg, of)
  bad = [t for t in getattr(cfg, name) if chunk % t]
  if bad:
    raise ConfigError(
      f"{type(cfg).__name__}.{name} = {getattr(cfg, name)!r} is invalid: "
      f"{bad} do not divide {of} = {chunk}; allowed values are divisors of it"
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
  horizons: tuple[int, ...] = (
    1,
    2,
    3,
    5,
    8,
    13,
    20,
    30,
    50,
    80,
    130,
    200,
    300,
    500,
    1000,
  )
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
  horizons: tuple[int, ...] = (1, 10, 25, 250, 1000)  # divide chunk
  chunk: int = 1000  # steps per jitted chunk; budgets are multiples of it
  budgets: tuple[int, ...] = (1000, 5000)  # budgets N compared
  seeds: int = 3  # independent runs (vmapped)
  dim: int = 5  # feature dimension D
  pool_sizes: tuple[int, ...] = (4000, 1000, 2000)  # training pool per domain
  n_val: int = 2000  # validation examples
  batch_size: int = 8  # examples per domain per inner step
  val_batch_size: int = 64  # validation examples per hypergradient
  l2: float = 0.01  # ridge coefficient (strong convexity)
  lr: float = 0.3  # inner step size eta
  beta: float = 10.0  # EG outer step size

  def __post_init__(self):
    check_profile(self.profile)
    _check_int_tuple(self, "horizons")
    _check_int_tuple(self, "budgets")
    check_int(self, "chunk", "seeds", "n_val", "batch_size", "val_batch_size")
    check_int(self, "dim", minimum=3)
    check_positive(self, "l2", allow_zero=True)
    check_positive(self, "lr", "beta")
    _check_divides(self, "horizons", "chunk")
    bad = [n for n in self.budgets if n % self.chunk]
    if bad:
      raise ConfigError(
        f"HorizonMinibatchConfig.budgets = {self.budgets!r} is invalid: {bad} "
        f"are not multiples of chunk = {self.chunk}; allowed values are multiples of it"
      )
    if len(self.pool_sizes) != 3 or any(
      not isinstance(n, int) or n < 1 for n in self.pool_sizes
    ):
      raise ConfigError(
        f"HorizonMinibatchConfig.pool_sizes = {self.pool_sizes!r} is invalid; "
        "it must be 3 positive integers (one per domain)"
      )


@dataclasses.dataclass(frozen=True, slots=True)
class HorizonScalingConfig:
  """Beyond the paper: best horizon T*(N) against log N and sqrt(N log N)."""

  profile: str = "book"
  horizons: tuple[int, ...] = (1, 3, 8, 20, 50, 130, 300, 800, 2000)
  budgets: tuple[int, ...] = (250, 500, 1000, 2000, 5000, 10000, 20000)
  lr: float = 0.02  # inner step size eta
  beta: float = 0.1  # EG outer step size
  noise: float = 2.0  # std of the additive gradient noise (minibatch case)
  seeds: int = (
    32  # minibatch runs per horizon (vmapped); 4 gave an unstable argmin
  )

  def __post_init__(self):
    check_profile(self.profile)
    _check_int_tuple(self, "horizons")
    _check_int_tuple(self, "budgets")
    check_positive(self, "lr", "beta", "noise")
    check_int(self, "seeds")


@dataclasses.dataclass(frozen=True, slots=True)
class AdultMixingConfig:
  """The same method on UCI Adult, domains = a natural column."""

  profile: str = "book"
  domain_column: str = "workclass"  # see data.tabular.DOMAIN_COLUMNS
  horizons: tuple[int, ...] = (1, 20)  # greedy and a longer horizon
  budget: int = 2000  # inner steps N
  seeds: int = 3  # independent runs (vmapped)
  batch_size: int = 16  # examples per domain per inner step
  val_batch_size: int = 256  # validation examples per hypergradient
  l2: float = 1e-3  # ridge coefficient
  lr: float = 0.1  # inner step size eta
  beta: float = 30.0  # EG outer step size

  def __post_init__(self):
    check_profile(self.profile)
    check_choice(
      self,
      "domain_column",
      (
        "workclass",
        "marital-status",
        "occupation",
        "relationship",
        "race",
        "gender",
        "native-country",
      ),
    )
    _check_int_tuple(self, "horizons")
    check_int(self, "budget", "seeds", "batch_size", "val_batch_size")
    check_positive(self, "l2", allow_zero=True)
    check_positive(self, "lr", "beta")
    if self.budget < max(self.horizons):
      raise ConfigError(
        f"AdultMixingConfig.budget = {self.budget} is invalid; it must be "
        f">= max(horizons) = {max(self.horizons)}"
      )


_HYPERGRAD = {
  "smoke": dict(horizons=(1, 5), implicit_steps=300),
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
    horizons=(
      1,
      2,
      3,
      5,
      8,
      13,
      20,
      30,
      50,
      80,
      130,
      200,
      300,
      500,
      800,
      1300,
      2000,
      5000,
    ),
    budgets=(1000, 5000, 20000),
  ),
}
_MINIBATCH = {
  "smoke": dict(
    horizons=(1, 50),
    chunk=100,
    budgets=(100, 200),
    seeds=2,
    pool_sizes=(200, 100, 100),
    n_val=200,
  ),
  "book": {},
  "paper": dict(
    horizons=(1, 2, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000), seeds=16
  ),
}
_SCALING = {
  "smoke": dict(horizons=(1, 5, 20, 50), budgets=(100, 200, 400), seeds=2),
  "book": {},
  "paper": dict(
    horizons=(
      1,
      2,
      3,
      4,
      5,
      7,
      10,
      13,
      17,
      20,
      25,
      30,
      40,
      50,
      65,
      80,
      100,
      130,
      160,
      200,
      250,
      300,
      400,
      500,
      650,
      800,
      1000,
      1300,
      1600,
      2000,
      3000,
      5000,
    ),
    budgets=(250, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000),
    seeds=32,
  ),
}
_ADULT = {
  "smoke": dict(
    budget=100, horizons=(1, 10), seeds=1, batch_size=4, val_batch_size=32
  ),
  "book": {},
  "paper": dict(budget=20000, horizons=(1, 5, 20, 100), seeds=8),
}


def hypergrad_check(
  profile: str = "book", **overrides: Any
) -> HypergradCheckConfig:
  """Config of ``ch1_hypergrad`` (see :class:`HypergradCheckConfig`)."""
  return from_profile(HypergradCheckConfig, _HYPERGRAD, profile, overrides)


def greedy_quadratic(
  profile: str = "book", **overrides: Any
) -> GreedyQuadraticConfig:
  """Config of ``ch1_greedy`` (see :class:`GreedyQuadraticConfig`)."""
  return from_profile(GreedyQuadraticConfig, _GREEDY, profile, overrides)


def horizon_full(profile: str = "book", **overrides: Any) -> HorizonFullConfig:
  """Config of ``ch1_horizon_full`` (see :class:`HorizonFullConfig`)."""
  return from_profile(HorizonFullConfig, _FULL, profile, overrides)


def horizon_minibatch(
  profile: str = "book", **overrides: Any
) -> HorizonMinibatchConfig:
  """Config of ``ch1_horizon_minibatch`` (see :class:`HorizonMinibatchConfig`)."""
  return from_profile(HorizonMinibatchConfig, _MINIBATCH, profile, overrides)


def horizon_scaling(
  profile: str = "book", **overrides: Any
) -> HorizonScalingConfig:
  """Config of ``ch1_scaling`` (see :class:`HorizonScalingConfig`)."""
  return from_profile(HorizonScalingConfig, _SCALING, profile, overrides)


def adult_mixing(profile: str = "book", **overrides: Any) -> AdultMixingConfig:
  """Config of ``ch1_adult`` (see :class:`AdultMixingConfig`)."""
  return from_profile(AdultMixingConfig, _ADULT, profile, overrides)
