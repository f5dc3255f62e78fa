"""Counting primitives in a jaxpr, sub-jaxprs included (structural tests)."""

from __future__ import annotations

import jax


def count_primitive(jaxpr, name: str = "dot_general") -> int:
  """Equations of primitive ``name`` in ``jaxpr`` and every sub-jaxpr
  (``pjit``, ``scan``, ``cond`` branches, ``remat``, custom rules)."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      n += 1
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += count_primitive(sub.jaxpr, name)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += count_primitive(sub, name)
  return n
