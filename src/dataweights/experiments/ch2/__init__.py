"""Chapter 2: learned domain mixtures for a language model.

``runs`` trains every method and baseline once per seed and target (cached
by config); each module below publishes one result read from those runs:

``all_domains``       target A: average and worst-domain held-out loss
``specific``          target B: one left-out domain with a small validation set
``weights``           the learned weights over training (stacked areas)
``horizon_question``  does a horizon T > 1 beat T = 1?
"""

from dataweights.experiments.ch2 import (  # noqa: F401  (imported to register)
  all_domains,
  horizon_question,
  specific,
  weights,
)
