"""Estimating the best horizon T*(N) and comparing growth laws (chapter 1).

* :func:`tstar` — the minimiser of a loss measured on a geometric T grid:
  a parabola in ``log T`` fitted to ``log loss`` at the grid argmin and its
  ``half`` neighbours on each side; its vertex (clipped to the window) is
  T*. A raw argmin can only return grid values; the vertex interpolates.
* :func:`near_optimal_range` — the T range whose loss is within a factor
  of the minimum (how sharply T* is defined).
* :func:`fit_law` / :func:`compare_laws` — two-parameter growth laws
  ``a + b·log N``, ``a + b·√(N log N)``, ``a + b·√N`` and ``c·N^p``, all
  fitted by least squares on relative errors (so small and large T* count
  alike), compared by their error on held-out (largest) budgets.
* :func:`loglog_slope` — the OLS slope of ``log T*`` on ``log N`` with a
  Student-t interval (ddof = 2 for the two fitted parameters).
* :func:`bootstrap_tstar` — T* under resampling of seeds (percentile
  intervals), the seeds of all budgets resampled jointly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

LAWS = ("log", "sqrt_nlogn", "sqrt", "power")
LAW_NAMES = {
  "log": "a + b log N",
  "sqrt_nlogn": "a + b √(N log N)",
  "sqrt": "a + b √N",
  "power": "c N^p",
}


def tstar(
  T_grid: Sequence[float], loss_T: Sequence[float], half: int = 3
) -> dict[str, Any]:
  """T* from a parabola in ``log T`` through ``log loss`` around the argmin.

  Args:
    T_grid: increasing horizons (geometric grid recommended).
    loss_T: positive loss per horizon; NaN entries (horizon > budget) are
      ignored.
    half: neighbours on each side of the grid argmin used in the fit.

  Returns:
    ``{"T": vertex or NaN, "grid_T": argmin on the grid, "edge": bool,
    "loss": min loss}``. ``edge`` is True (and ``T`` NaN) when the argmin
    is the first or last valid grid point: the minimum is not bracketed.

  Raises:
    ValueError: mismatched lengths or fewer than 3 valid points.
  """
  T = np.asarray(T_grid, np.float64)
  y = np.asarray(loss_T, np.float64)
  if T.shape != y.shape or T.ndim != 1:
    raise ValueError(
      f"T_grid {T.shape} and loss_T {y.shape} must be 1-D of equal length"
    )
  ok = np.isfinite(y) & (y > 0)
  if ok.sum() < 3:
    raise ValueError(f"need >= 3 positive finite losses, got {int(ok.sum())}")
  idx = np.flatnonzero(ok)
  i = idx[int(np.argmin(y[idx]))]
  out = {
    "grid_T": float(T[i]),
    "loss": float(y[i]),
    "edge": bool(i in (idx[0], idx[-1])),
  }
  if out["edge"]:
    return {**out, "T": float("nan")}
  pos = int(np.searchsorted(idx, i))
  win = idx[max(pos - half, 0) : pos + half + 1]
  x, v = np.log(T[win]), np.log(y[win])
  c2, c1, _ = np.polyfit(x, v, 2)
  if c2 <= 0:
    return {**out, "T": float(T[i])}
  xv = float(np.clip(-c1 / (2 * c2), x[0], x[-1]))
  return {**out, "T": float(np.exp(xv))}


def near_optimal_range(
  T_grid, loss_T, factor: float = 1.1
) -> tuple[float, float]:
  """The smallest and largest grid T with ``loss <= factor · min loss``."""
  T = np.asarray(T_grid, np.float64)
  y = np.asarray(loss_T, np.float64)
  ok = np.isfinite(y)
  sel = T[ok & (y <= factor * np.nanmin(y))]
  return float(sel.min()), float(sel.max())


def _features(N: np.ndarray, law: str) -> np.ndarray:
  if law == "log":
    return np.log(N)
  if law == "sqrt_nlogn":
    return np.sqrt(N * np.log(N))
  if law == "sqrt":
    return np.sqrt(N)
  raise ValueError(f"law = {law!r} is invalid; allowed: {LAWS}")


def fit_law(N, T, law: str) -> dict[str, float]:
  """Fits one two-parameter law to ``T*(N)`` by relative least squares.

  ``a + b φ(N)`` minimises ``Σ ((T − a − b φ) / T)²`` (a linear problem);
  ``c N^p`` is ordinary least squares of ``log T`` on ``log N``.

  Returns:
    ``{"a", "b"}`` (for ``power``: ``a = log c``, ``b = p``).
  """
  N = np.asarray(N, np.float64)
  T = np.asarray(T, np.float64)
  if law == "power":
    b, a = np.polyfit(np.log(N), np.log(T), 1)
    return {"a": float(a), "b": float(b)}
  phi = _features(N, law)
  X = np.stack([np.ones_like(phi), phi], axis=1) / T[:, None]
  coef, *_ = np.linalg.lstsq(X, np.ones_like(T), rcond=None)
  return {"a": float(coef[0]), "b": float(coef[1])}


def predict(N, law: str, params: dict[str, float]) -> np.ndarray:
  """The fitted law at budgets N."""
  N = np.asarray(N, np.float64)
  if law == "power":
    return np.exp(params["a"]) * N ** params["b"]
  return params["a"] + params["b"] * _features(N, law)


def _log_err(T, pred) -> np.ndarray:
  pred = np.asarray(pred, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    err = np.log(np.where(pred > 0, pred, np.nan) / np.asarray(T, np.float64))
  return np.where(np.isfinite(err), err, np.inf)


def compare_laws(N, T, n_fit: int) -> dict[str, dict[str, float]]:
  """Fits every law on the ``n_fit`` smallest budgets, scores the rest.

  Returns:
    Per law: its parameters fitted on all budgets (``a``, ``b``), the RMS
    relative error (of ``log T*``) in sample on all budgets
    (``rms_all``), and the RMS error on the held-out budgets of the fit on
    the first ``n_fit`` (``rms_heldout``; inf if a prediction is <= 0).
  """
  N = np.asarray(N, np.float64)
  T = np.asarray(T, np.float64)
  if not 2 <= n_fit < len(N):
    raise ValueError(
      f"n_fit = {n_fit} must be in [2, {len(N) - 1}] for {len(N)} budgets"
    )
  out = {}
  for law in LAWS:
    p_all = fit_law(N, T, law)
    p_fit = fit_law(N[:n_fit], T[:n_fit], law)
    e_all = _log_err(T, predict(N, law, p_all))
    e_out = _log_err(T[n_fit:], predict(N[n_fit:], law, p_fit))
    out[law] = {
      **p_all,
      "rms_all": float(np.sqrt(np.mean(e_all**2))),
      "rms_heldout": float(np.sqrt(np.mean(e_out**2))),
    }
  return out


def loglog_slope(N, T, level: float = 0.95) -> dict[str, float]:
  """OLS slope of ``log T`` on ``log N`` with a Student-t interval."""
  x = np.log(np.asarray(N, np.float64))
  y = np.log(np.asarray(T, np.float64))
  n = len(x)
  if n < 3:
    raise ValueError(f"a slope interval needs >= 3 budgets, got {n}")
  res = stats.linregress(x, y)
  q = stats.t.ppf(0.5 + level / 2, n - 2)
  return {
    "slope": float(res.slope),
    "lo": float(res.slope - q * res.stderr),
    "hi": float(res.slope + q * res.stderr),
    "n": n,
  }


def local_slopes(N, T) -> np.ndarray:
  """``Δ log T / Δ log N`` between consecutive budgets."""
  return np.diff(np.log(np.asarray(T, np.float64))) / np.diff(
    np.log(np.asarray(N, np.float64))
  )


def bootstrap_tstar(
  loss_BxSxT: np.ndarray,
  T_BxT: np.ndarray,
  resamples: int,
  seed: int = 0,
  half: int = 3,
) -> np.ndarray:
  """T* per budget under resampling of seeds, jointly across budgets.

  Args:
    loss_BxSxT: loss per budget, seed and grid horizon.
    T_BxT: the horizon grid of each budget.
    resamples: number of bootstrap resamples.
    seed: numpy seed of the resampling.
    half: as :func:`tstar`.

  Returns:
    ``T*`` of shape ``(resamples, B)`` (NaN where the minimum is at the
    grid edge).
  """
  B, S, _ = loss_BxSxT.shape
  rng = np.random.default_rng(seed)
  out = np.full((resamples, B), np.nan)
  for i in range(resamples):
    pick = rng.integers(0, S, S)
    mean_BxT = loss_BxSxT[:, pick].mean(axis=1)
    for b in range(B):
      out[i, b] = tstar(T_BxT[b], mean_BxT[b], half)["T"]
  return out


def mean_ci(x, level: float = 0.95) -> tuple[float, float, float]:
  """Mean and Student-t interval over the first axis (ddof = 1)."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  m = x.mean(axis=0)
  if n < 2:
    return m, m, m
  h = stats.t.ppf(0.5 + level / 2, n - 1) * x.std(axis=0, ddof=1) / np.sqrt(n)
  return m, m - h, m + h
