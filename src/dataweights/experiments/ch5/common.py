"""Helpers shared by the chapter-5 experiments (no published result here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats

from dataweights.experiments.ch1.common import fmt_table, r

__all__ = [
  "bootstrap_corr",
  "corr_ci",
  "fmt_ci",
  "fmt_table",
  "mean_ci",
  "r",
]


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
  """Mean and Student-t interval over seeds (ddof = 1).

  Returns:
    ``{"mean", "lo", "hi", "n"}``; with one value the interval is the point.
  """
  v = np.asarray(values, np.float64)
  m = float(v.mean())
  if v.size < 2:
    return {"mean": m, "lo": m, "hi": m, "n": int(v.size)}
  half = scipy.stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1)
  half /= np.sqrt(v.size)
  return {"mean": m, "lo": m - half, "hi": m + half, "n": int(v.size)}


def corr_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
  """Mean correlation over seeds with a t-interval on Fisher's z = atanh(r).

  The interval is computed for ``z`` and mapped back with ``tanh``, so it
  stays inside (-1, 1); the centre is ``tanh(mean z)``.
  """
  z = np.arctanh(np.clip(np.asarray(values, np.float64), -1 + 1e-12, 1 - 1e-12))
  s = mean_ci(z, level)
  return {
    "mean": float(np.tanh(s["mean"])),
    "lo": float(np.tanh(s["lo"])),
    "hi": float(np.tanh(s["hi"])),
    "n": s["n"],
  }


def fmt_ci(s: dict[str, float], digits: int = 2) -> str:
  """``"0.93 [0.90, 0.95]"``."""
  return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def bootstrap_corr(
  x: Any, y: Any, resamples: int, seed: int, level: float = 0.95
) -> list[float]:
  """Percentile bootstrap interval of Pearson's r over the pairs."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, x.size, (resamples, x.size))
  xs, ys = x[idx], y[idx]
  xs = xs - xs.mean(1, keepdims=True)
  ys = ys - ys.mean(1, keepdims=True)
  den = np.sqrt((xs**2).sum(1) * (ys**2).sum(1))
  rs = (xs * ys).sum(1) / np.where(den > 0, den, 1.0)
  lo, hi = np.quantile(rs, [(1 - level) / 2, (1 + level) / 2])
  return [float(lo), float(hi)]
