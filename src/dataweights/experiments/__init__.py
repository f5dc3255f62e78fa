"""Experiments: one module per published figure or table, ``run(cfg) -> dict``.

Importing this package registers every published result in
:data:`dataweights.experiments.registry.REGISTRY`.
"""

from dataweights.experiments.registry import REGISTRY, Published, publish, register

__all__ = ["REGISTRY", "Published", "publish", "register"]
from dataweights.experiments import ch1_hypergrad  # noqa: F401
from dataweights.experiments import ch1_greedy  # noqa: F401
from dataweights.experiments import ch1_horizon_full  # noqa: F401
from dataweights.experiments import ch1_horizon_minibatch  # noqa: F401
from dataweights.experiments import ch1_scaling  # noqa: F401
from dataweights.experiments import ch1_adult  # noqa: F401
