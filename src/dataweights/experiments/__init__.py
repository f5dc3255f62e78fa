"""Experiments: one module per published figure or table, ``run(cfg) -> dict``.

Importing this package registers every published result in
:data:`dataweights.experiments.registry.REGISTRY`.
"""

from dataweights.experiments.registry import REGISTRY, Published, publish, register

__all__ = ["REGISTRY", "Published", "publish", "register"]
