"""The one check of domain weights, used by samplers and methods alike.

Two kinds of weights appear in the library: *mixture* weights given to a
sampler (any non-negative finite numbers, normalised here) and *simplex*
points computed by a method (they must already sum to one). Both are checked
by :func:`check_weights`, and every failure is a
:class:`~dataweights.errors.WeightsError` naming the bad value and what is
allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dataweights.errors import WeightsError


def _fmt(x: np.ndarray) -> str:
  return np.array2string(np.asarray(x), precision=6, threshold=20)


def check_weights(
  weights: Any,
  *,
  names: Sequence[str] | None = None,
  normalise: bool = False,
  atol: float = 1e-5,
  what: str = "weights",
) -> np.ndarray:
  """Checks one weight per domain; returns them as float64 ``w_K``.

  Args:
    weights: ``K`` numbers (list, numpy or JAX array), or with ``names`` a
      mapping ``{domain name: weight}`` (domains left out get 0).
    names: the ``K`` domain names, in order (fixes ``K``; optional).
    normalise: mixture weights: any non-negative finite numbers, not all 0,
      returned divided by their sum. Otherwise a simplex point: entries
      ``>= -atol`` summing to 1 within ``atol``, returned as given.
    atol: tolerance of the simplex check.
    what: how the message calls the weights (e.g. ``"w0_K"``).

  Returns:
    ``w_K``, float64 of shape ``(K,)``.

  Raises:
    WeightsError: a non-numeric value, the wrong shape or length, an
      unknown domain name, a negative or non-finite entry, all zeros, or (not
      normalising) a sum other than 1.
  """
  k = None if names is None else len(names)
  per = "" if names is None else f" (one per domain: {', '.join(names)})"
  if isinstance(weights, Mapping):
    if names is None:
      raise WeightsError(f"{what} given by name need the domain names")
    unknown = [n for n in weights if n not in names]
    if unknown:
      raise WeightsError(
        f"unknown domain {unknown[0]!r} in {what}; allowed domains are "
        + ", ".join(repr(n) for n in names)
      )
    weights = [weights.get(n, 0.0) for n in names]
  allowed = (
    "non-negative finite numbers, not all 0"
    if normalise
    else f"non-negative finite numbers that sum to 1 (atol={atol:g})"
  )
  try:
    w_K = np.asarray(weights, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise WeightsError(
      f"{what} {weights!r} are not numbers; expected {allowed}{per}"
    ) from e
  if w_K.ndim != 1 or w_K.shape[0] < 1 or (k is not None and w_K.shape != (k,)):
    want = f"shape ({k},)" if k is not None else "a 1-D array of K >= 1"
    raise WeightsError(
      f"{what} {_fmt(w_K)} have shape {w_K.shape}; expected {want}: "
      f"{allowed}{per}"
    )

  def at(mask) -> str:
    idx = np.flatnonzero(mask).tolist()
    if names is None:
      return f"at {idx}"
    return f"at {idx} (domain {', '.join(repr(names[i]) for i in idx)})"

  bad = ~np.isfinite(w_K)
  if bad.any():
    raise WeightsError(
      f"{what} {_fmt(w_K)} have non-finite entries {at(bad)}; expected "
      f"{allowed}"
    )
  floor = 0.0 if normalise else -atol
  if (w_K < floor).any():
    raise WeightsError(
      f"{what} {_fmt(w_K)} have negative entries {at(w_K < floor)}; expected "
      f"{allowed}"
    )
  if normalise:
    if not w_K.max() > 0:
      raise WeightsError(
        f"{what} {_fmt(w_K)} sum to 0; at least one weight must be > 0"
      )
    with np.errstate(over="ignore"):
      total = float(w_K.sum())
    if not math.isfinite(total):
      # Large finite weights whose sum overflows: scale by the largest first
      # (dividing by an inf sum would turn every weight into 0).
      w_K = w_K / w_K.max()
      total = float(w_K.sum())
    return w_K / total
  total = float(w_K.sum())
  if abs(total - 1.0) > atol:
    raise WeightsError(
      f"{what} {_fmt(w_K)} sum to {total:.8g}, not 1; expected {allowed}"
    )
  return w_K


def natural_weights(counts_K: Any, what: str = "counts_K") -> np.ndarray:
  """Weights proportional to the domain sizes, ``w_j = n_j / sum_i n_i``.

  Args:
    counts_K: examples (or documents, tokens) per domain: finite, > 0.
    what: the argument's name, for error messages.

  Raises:
    WeightsError: not 1-D, or an entry that is not a finite number > 0.
  """
  try:
    c_K = np.asarray(counts_K, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise WeightsError(
      f"{what} {counts_K!r} are not numbers; expected finite counts > 0"
    ) from e
  if c_K.ndim != 1 or c_K.shape[0] < 1:
    raise WeightsError(
      f"{what} have shape {c_K.shape}; expected a 1-D array of K >= 1 counts"
    )
  if not np.all(np.isfinite(c_K)) or np.any(c_K <= 0):
    raise WeightsError(
      f"{what} {_fmt(c_K)} are invalid; every count must be finite and > 0"
    )
  return c_K / c_K.sum()
