"""Chapter 1: data mixing over a finite horizon (Das et al., 2026).

One module per published figure or table (``run(cfg) -> dict``, a
``summary(data) -> str`` table and the registration of the result), shared
helpers (:mod:`.common`, :mod:`.quadsim`, :mod:`.tstar`) and the chapter's
figures (:mod:`.plots`, which read the published data and compute nothing).
"""

from dataweights.experiments.ch1 import (  # noqa: F401  (imported to register)
  adaptive,
  adult,
  greedy,
  horizon_full,
  horizon_minibatch,
  hypergrad,
  scaling,
  scaling_minibatch,
)
