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
    config: ``config(profile) -> cfg``, the experiment's config factory
      (so that a chapter names only the experiment and the profile).
    summary: ``summary(data) -> str``, the table a chapter prints (and nbval
      compares).
  """

  name: str
  chapter: str
  run: Callable[[Any], dict[str, Any]]
  make_config: Callable[..., Any]
  plot: Callable[[dict[str, Any]], Any] | None = None
  rtol: float = 1e-4
  atol: float = 1e-6
  note: str = "float32 on CPU is deterministic run to run; 1e-4 absorbs XLA version noise"
  config: Callable[[str], Any] | None = None
  summary: Callable[[dict[str, Any]], str] | None = None


@dataclasses.dataclass
class Result:
  """What :func:`publish` returns: the data, the figure and the summary.

  In a notebook it displays as the figure (``image/png``, the published
  bytes). ``data, fig = result`` unpacks like a pair.

  Attributes:
    name: the experiment.
    data: the JSON-able data.
    figure: a :class:`dataweights.results.FigureOutput` or None.
    summary: the summary table (a string), or None.
  """

  name: str
  data: dict[str, Any]
  figure: Any = None
  summary: str | None = None

  def __iter__(self):
    return iter((self.data, self.figure))

  def _repr_png_(self) -> bytes | None:
    return None if self.figure is None else self.figure.png

  def __repr__(self) -> str:
    return f"<result {self.name}>"


REGISTRY: dict[str, Published] = {}


def register(entry: Published) -> Published:
  if entry.name in REGISTRY:
    raise ValueError(f"published result {entry.name!r} registered twice")
  REGISTRY[entry.name] = entry
  return entry


def publish(
  name: str,
  profile_or_cfg: Any,
  results_dir: str | None,
  *,
  profile: str | None = None,
) -> Result:
  """Runs a registered experiment, saves its JSON (+ PNG), returns a Result.

  This is what a chapter cell calls::

    res = experiments.publish("ch1_greedy", profile, results_dir)
    res                 # shows the figure (image/png, the published bytes)
    print(res.summary)  # the table (a cell tagged nbval-check-output)

  Results are written to ``results_dir`` when it is set (the book runner),
  else to ``$DATAWEIGHTS_RESULTS_DIR/<chapter>/`` when that is set (CI's
  single execution of each chapter), else nowhere (see
  :func:`dataweights.results.output_dir`).

  Args:
    name: a key of :data:`REGISTRY`.
    profile_or_cfg: the profile (the experiment's ``config`` factory builds
      the config), or a config object.
    results_dir: where to write ``<name>.json`` / ``<name>.png``, or ``""``.
    profile: recorded in the provenance; defaults to the config's.

  Returns:
    The :class:`Result` (``data, fig = result`` also works).
  """
  import time

  from dataweights import results

  if name not in REGISTRY:
    raise KeyError(f"unknown published result {name!r}; known: {', '.join(sorted(REGISTRY))}")
  entry = REGISTRY[name]
  if isinstance(profile_or_cfg, str):
    if entry.config is None:
      raise ValueError(f"{name!r} has no config factory; pass its config object")
    cfg = entry.config(profile_or_cfg)
  else:
    cfg = profile_or_cfg
  out = results.output_dir(results_dir, entry.chapter)
  t0 = time.perf_counter()
  data = entry.run(cfg)
  wall = time.perf_counter() - t0
  profile = profile or getattr(cfg, "profile", "unknown")
  results.save(name, data, out, config=cfg, profile=profile, wall_time_s=wall)
  fig = None
  jsonable = results.to_jsonable(data)
  if entry.plot is not None:
    fig = results.FigureOutput(name, entry.plot(jsonable))
    if out is not None:
      results.atomic_write(out / f"{name}.png", fig.png)
  summary = None if entry.summary is None else entry.summary(data)
  return Result(name, data, fig, summary)


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
