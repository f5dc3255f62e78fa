"""The list of published figures/tables: how to recompute and re-plot each.

The drift guard (``tests/test_published.py``) iterates over this registry:
CI executes every chapter once (nbval) with ``$DATAWEIGHTS_RESULTS_DIR``
set, and the guard compares each fresh result with the published JSON
within ``rtol``/``atol`` and the fresh PNG with the published one; it also
re-renders every published PNG from its published data.
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


def publish(
  name: str,
  cfg: Any,
  results_dir: str | None,
  *,
  profile: str | None = None,
) -> tuple[dict[str, Any], Any]:
  """Runs a registered experiment, saves its JSON (+ PNG), returns (data, fig).

  This is what a chapter cell calls; ending the cell with ``fig`` shows the
  figure (``image/png``, the very bytes published). Results are written to
  ``results_dir`` when it is set (the book runner), else to
  ``$DATAWEIGHTS_RESULTS_DIR/<chapter>/`` when that is set (CI's single
  execution of each chapter), else nowhere (see
  :func:`dataweights.results.output_dir`).

  Args:
    name: a key of :data:`REGISTRY`.
    cfg: the experiment config (stored in the JSON so that the config of a
      fresh run can be checked against the published one).
    results_dir: where to write ``<name>.json`` / ``<name>.png``, or ``""``.
    profile: recorded in the provenance; defaults to ``cfg.profile``.

  Returns:
    The data dict and a :class:`dataweights.results.FigureOutput` (``None``
    for tables).
  """
  import time

  from dataweights import results

  if name not in REGISTRY:
    raise KeyError(f"unknown published result {name!r}; known: {', '.join(sorted(REGISTRY))}")
  entry = REGISTRY[name]
  out = results.output_dir(results_dir, entry.chapter)
  t0 = time.perf_counter()
  data = entry.run(cfg)
  wall = time.perf_counter() - t0
  profile = profile or getattr(cfg, "profile", "unknown")
  results.save(name, data, out, config=cfg, profile=profile, wall_time_s=wall)
  fig = None
  if entry.plot is not None:
    fig = results.FigureOutput(name, entry.plot(results.to_jsonable(data)))
    if out is not None:
      results.atomic_write(out / f"{name}.png", fig.png)
  return data, fig


def _tuplify(x: Any) -> Any:
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  return x


def config_from_record(entry: Published, stored: dict[str, Any]) -> Any:
  """Rebuilds the config stored in a published JSON (lists back to tuples)."""
  if not isinstance(stored, dict):
    raise ValueError(f"published result {entry.name!r} stores no config dict (got {stored!r})")
  return entry.make_config(**{k: _tuplify(v) for k, v in stored.items()})
