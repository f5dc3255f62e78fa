"""Type aliases and the dimension glossary used in array names.

Array locals carry their shape in their name (``loss_B``, ``w_K``,
``logits_BxLxV``). Letters:

  B  batch                      L  sequence length
  D  model width                F  MLP width
  H  attention heads            Dh head width
  V  vocabulary                 K  domains or sources (mixture weights w_K)
  T  inner horizon (steps)      C  candidates scored by a weighting net
  N  selection pool / budget    P  parameter (flattened) or projected width
  M  number of examples         S  seeds
  G  big generic batch (B x downsampling)

New letters are added here, not ad hoc.
"""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any
Params = PyTree
Batch = dict[str, jax.Array]
PRNGKey = jax.Array
