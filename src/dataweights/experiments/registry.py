"""The list of published figures/tables: how to recompute and re-plot each.

The drift guard (``tests/test_published.py``) iterates over this registry:
for every entry whose chapter has published results it recomputes the data
under the config stored in the published JSON and compares numbers within
``rtol``/``atol``, and re-renders the PNG from the published data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Published:
  """One published result.

  Attributes:
    name: file stem under ``book/results/<chapter>/``.
    chapter: chapter id (notebook stem), e.g. ``"ch1_mixing"``.
    run: ``run(cfg) -> dict`` computing the JSON-able data.
    make_config: ``make_config(**fields) -> cfg``, rebuilding the config from
      the dict stored in the published JSON.
    plot: ``plot(data) -> matplotlib Figure`` or ``None`` for tables.
    rtol, atol: tolerances for the recomputation check; document why in
      ``note`` when they are not the defaults.
    note: why the tolerance is what it is.
  """

  name: str
  chapter: str
  run: Callable[[Any], dict[str, Any]]
  make_config: Callable[..., Any]
  plot: Callable[[dict[str, Any]], Any] | None = None
  rtol: float = 1e-4
  atol: float = 1e-6
  note: str = "float32 on CPU is deterministic run to run; 1e-4 absorbs XLA version noise"


REGISTRY: dict[str, Published] = {}


def register(entry: Published) -> Published:
  if entry.name in REGISTRY:
    raise ValueError(f"published result {entry.name!r} registered twice")
  REGISTRY[entry.name] = entry
  return entry
