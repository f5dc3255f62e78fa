"""Helpers shared by the chapter-1 experiments (no published result here)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def log_subsample(n_points: int, length: int) -> np.ndarray:
  """About ``n_points`` distinct indices in ``[0, length)``, log-spaced, with 0."""
  if length <= n_points:
    return np.arange(length)
  idx = np.unique(np.round(np.geomspace(1, length, n_points)).astype(int) - 1)
  return np.unique(np.concatenate([[0], idx, [length - 1]]))


def r(x: Any, digits: int = 6) -> Any:
  """Rounds floats (recursively) to ``digits`` significant digits for JSON."""
  if isinstance(x, dict):
    return {k: r(v, digits) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [r(v, digits) for v in x]
  if isinstance(x, np.ndarray):
    return r(x.tolist(), digits)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    if not math.isfinite(x) or x == 0.0:
      return x
    return float(f"{x:.{digits}g}")
  if isinstance(x, np.integer):
    return int(x)
  return x


def fmt_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A fixed-width text table; floats with 3 significant digits."""

  def cell(v: Any) -> str:
    if isinstance(v, float):
      return f"{v:.3g}"
    return str(v)

  cells = [[cell(v) for v in row] for row in rows]
  widths = [
    max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)
  ]
  lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)
