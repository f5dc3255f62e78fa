"""Experiments: one package per chapter, one module per published result.

Each result is registered once (:func:`registry.register`) with its config
factory, ``run(cfg) -> dict``, plot and summary; a chapter calls
``publish(name, profile, results_dir)``. Importing this package registers
every published result in :data:`dataweights.experiments.registry.REGISTRY`.

  ch1   data mixing over a finite horizon
  ch2   learned domain mixtures for a language model
  ch3   online data filtering with a weighting network
  ch4   LLM-scale data reweighting with ScaleBiO and LISA
  ch5   influence-based selection (G-DIG and LESS)
"""

from dataweights.experiments import (  # noqa: F401  (imported to register)
  ch1,
  ch2,
  ch3,
  ch4,
  ch5,
)
from dataweights.experiments.registry import (
  REGISTRY,
  Published,
  Result,
  publish,
  register,
)

__all__ = ["REGISTRY", "Published", "Result", "publish", "register"]
