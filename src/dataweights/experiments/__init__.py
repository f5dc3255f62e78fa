"""Experiments: one module per published figure or table, ``run(cfg) -> dict``.

Importing this package registers every published result in
:data:`dataweights.experiments.registry.REGISTRY`.
"""

from dataweights.experiments import (  # noqa: F401  (imported to register)
  ch1_adult,
  ch1_greedy,
  ch1_horizon_full,
  ch1_horizon_minibatch,
  ch1_hypergrad,
  ch1_scaling,
  ch3,
)
from dataweights.experiments.registry import (
  REGISTRY,
  Published,
  Result,
  publish,
  register,
)

__all__ = ["REGISTRY", "Published", "Result", "publish", "register"]
