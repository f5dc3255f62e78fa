"""Chapter 3: online data filtering with a weighting network."""

from dataweights.experiments.ch3 import experiments  # noqa: F401  (registers)
