"""Helpers of chapter 2's experiments: intervals, rounding, tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

# JSON rounding is shared with Chapter 1 (one definition).
from dataweights.experiments.ch1.common import r as rnd  # noqa: F401

CONFIDENCE = 0.95

LABELS = {
  "uniform": "uniform (i.i.d.)",
  "natural": "natural (tokens)",
  "temperature": "temperature",
  "stratified": "stratified uniform",
  "doremi": "DoReMi",
  "odm": "ODM (EXP3)",
  "alignment": "alignment (T=1 rule)",
}


def label(method: str) -> str:
  """A method's display name (``horizon_T8`` -> ``horizon T=8``)."""
  if method.startswith("horizon_T"):
    return f"horizon T={method[len('horizon_T') :]}"
  return LABELS.get(method, method)


def t_interval(
  x: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, float]:
  """Mean and Student-t interval over seeds (``ddof=1``).

  ``mean ± t_{(1+c)/2, n-1} s / sqrt(n)`` with ``s`` the sample standard
  deviation; for paired differences pass the per-seed differences.

  Raises:
    ValueError: fewer than two values.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 1 or x.size < 2:
    raise ValueError(f"a t-interval needs >= 2 values; got {x.size}")
  mean = float(x.mean())
  half = float(
    stats.t.ppf((1 + confidence) / 2, x.size - 1)
    * x.std(ddof=1)
    / math.sqrt(x.size)
  )
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "half": half}


def fmt_ci(ci: dict[str, float], digits: int = 3, sign: bool = False) -> str:
  """``mean ± half`` with a fixed number of decimals."""
  s = f"{ci['mean']:+.{digits}f}" if sign else f"{ci['mean']:.{digits}f}"
  return f"{s} ± {ci['half']:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A fixed-width text table (first column left-aligned)."""
  cells = [[str(v) for v in row] for row in rows]
  widths = [
    max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)
  ]
  just = lambda i, v: v.ljust(widths[i]) if i == 0 else v.rjust(widths[i])
  lines = ["  ".join(just(i, h) for i, h in enumerate(header))]
  lines += ["  ".join(just(i, v) for i, v in enumerate(row)) for row in cells]
  return "\n".join(lines)
