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
  widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]
  lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def geometric_grid(lo: float, hi: float, n: int) -> np.ndarray:
  """``n`` geometric points from ``lo`` to ``hi`` rounded to integers, unique."""
  return np.unique(np.round(np.geomspace(lo, hi, n))).astype(np.int64)


def outer_rate(q: Any, beta: float, w0_K: Any, rounds: int = 4000,
               band: tuple[float, float] = (1e-12, 1e-6)) -> float:
  """Per-round decay rate κ of the excess under EG with exact hypergradients.

  Runs ``w ← w ⊙ exp(−β ∇Φ(w))`` (normalised) with the closed-form
  implicit hypergradient ``∇Φ(w) = −∇g(θ*)ᵀ H⁻¹ ∇f_j(θ*)`` of a diagonal
  quadratic (the ``T → ∞`` limit of the algorithm) and fits ``log(Φ(w_r)
  − Φ*)`` against r where the excess lies in ``band``: ``κ`` is minus the
  slope. Float64 numpy.
  """
  from dataweights.methods import synthetic as syn

  g_star = syn.bilevel_optimum(q)["val"]
  w = np.asarray(w0_K, np.float64)
  ex = []
  for _ in range(rounds):
    theta = syn.inner_optimum(q, w)
    grad_f = q.a_KxD * (theta[None] - q.c_KxD)
    grad_g = q.a_val_D * (theta - q.c_val_D)
    h = -(grad_f / (w @ q.a_KxD)[None]) @ grad_g
    z = np.log(w) - beta * h
    w = np.exp(z - z.max())
    w /= w.sum()
    ex.append(float(syn.val_at(q, w)) - g_star)
  ex = np.asarray(ex)
  r = np.flatnonzero((ex > band[0]) & (ex < band[1]))
  if len(r) < 5:
    raise ValueError(f"the excess never spans {band} in {rounds} rounds; raise rounds")
  slope = np.polyfit(r, np.log(ex[r]), 1)[0]
  return float(-slope)
