"""Typed frozen configs with ``smoke`` / ``book`` / ``paper`` profiles.

One module per area, each with factories ``name(profile="book", **overrides)``:

  configs.mixing   Chapter 1 experiments (data mixing over a horizon T)
  configs.data     offline data sets and the text pipeline's shapes
  configs.lm       language-model shapes and device meshes
  configs.train    optimisers, schedules, checkpoints
  configs.run      a language-model run: model + pipeline + train + mesh,
                   with the rules between them

All of them are plain dataclasses (no JAX import), so importing is cheap.
"""

from dataweights.configs import data, lm, mixing, run, train
from dataweights.configs.base import (
  PROFILES,
  ConfigError,
  check_profile,
  from_profile,
)
from dataweights.configs.lm import MeshConfig, ModelConfig, lm_model, mesh

__all__ = [
  "PROFILES", "ConfigError", "MeshConfig", "ModelConfig", "check_profile",
  "data", "from_profile", "lm", "lm_model", "mesh", "mixing", "run", "train",
]
