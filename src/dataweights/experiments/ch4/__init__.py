"""Chapter 4: LLM-scale data reweighting with ScaleBiO and LISA.

noise         noise ordering: partitions with "." responses
two_sources   two sources, the validation set in one's style
mixture       real sources and a held-out target: weights, resample,
              fine-tune, against uniform and natural mixtures
cost          step time and memory against plain fine-tuning (printed,
              not published)
"""

from dataweights.experiments.ch4 import mixture, noise, two_sources  # noqa: F401  (registers)
