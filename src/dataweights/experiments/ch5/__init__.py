"""Chapter 5: influence-based data selection (G-DIG and LESS).

One module per published figure or table (``run(cfg) -> dict``, a
``summary(data) -> str`` table and the registration of the result), shared
helpers (:mod:`.common`) and the chapter's figures (:mod:`.plots`, which
read the published data and compute nothing).
"""

from dataweights.experiments.ch5 import (  # noqa: F401  (imported to register)
  loo,
  select,
)
