"""Methods: hypergradients and outer updates for learning data weights.

``bilevel``  unrolled (forward Prop. 4.1, reverse) and implicit hypergradients
``simplex``  simplex checks, projection, exponentiated / projected updates
``mixing``   finite-horizon data mixing ``run_mixing`` and its baselines
"""

from dataweights.methods.bilevel import (
  MixingProblem,
  hypergrad_forward,
  hypergrad_implicit,
  hypergrad_reverse,
  inner_steps,
  solve_inner,
)
from dataweights.methods.mixing import (
  MixingError,
  MixingTrace,
  NonFiniteHypergradientError,
  natural_weights,
  run_mixing,
  train_fixed,
  uniform_weights,
)
from dataweights.methods.simplex import (
  SimplexError,
  check_simplex,
  eg_update,
  project_simplex,
  projected_update,
)

__all__ = [
  "MixingError", "MixingProblem", "MixingTrace", "NonFiniteHypergradientError",
  "SimplexError", "check_simplex", "eg_update", "hypergrad_forward",
  "hypergrad_implicit", "hypergrad_reverse", "inner_steps", "natural_weights",
  "project_simplex", "projected_update", "run_mixing", "solve_inner",
  "train_fixed", "uniform_weights",
]
