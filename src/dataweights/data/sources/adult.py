"""UCI Adult with a natural domain column, from the pinned mglearn wheel.

Source: ``mglearn==0.2.0``, file ``mglearn/data/adult.data`` (32,561 rows,
15 columns, no header; UCI Adult, CC BY 4.0), fetched and sha256-checked by
:mod:`dataweights.data.sources.fetch`. The TFDS builder ``dw_adult``
(:mod:`dataweights.data.build`) stores the raw rows with the same fixed
split; :func:`load_adult` turns them into model-ready arrays.

Splits are fixed (seed 0), 70 / 15 / 15 % train / validation / test,
stratified by ``workclass`` so that every workclass appears in every split.
The split does not depend on ``domain_column``.

Features (``feature_names`` lists them):
  * numeric: ``age``, ``education-num``, ``log1p(capital-gain)``,
    ``log1p(capital-loss)``, ``hours-per-week``;
  * one-hot: ``workclass``, ``marital-status``, ``occupation``,
    ``relationship``, ``race``, ``gender``, ``native-country`` (countries
    with fewer than 10 rows become ``other``; ``?`` is its own category).
  * dropped: ``fnlwgt`` (a census sampling weight, not an attribute) and
    ``education`` (the same information as ``education-num``).
  * The domain column is left out of the features unless
    ``include_domain_feature=True`` (so a model cannot read the domain off
    one column; it must generalise across domains).
  Every column is standardised with the train split's mean and standard
  deviation (a column constant on train gets scale 1).

Domains: the values of ``domain_column``. Values with fewer than
``min_domain_size`` rows in the whole table are merged with the missing
value ``?`` into one domain ``Other/unknown`` (for workclass: Never-worked,
7 rows, and Without-pay, 14 rows, join the 1,836 rows with workclass
``?``, who also have no occupation). Domains are ordered by size, largest
first.
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
from typing import Any

import numpy as np
import pandas as pd

from dataweights.data.sources import fetch

ADULT_PACKAGE = "mglearn"
ADULT_MEMBER = "mglearn/data/adult.data"
ADULT_COLUMNS: tuple[str, ...] = (
  "age",
  "workclass",
  "fnlwgt",
  "education",
  "education-num",
  "marital-status",
  "occupation",
  "relationship",
  "race",
  "gender",
  "capital-gain",
  "capital-loss",
  "hours-per-week",
  "native-country",
  "income",
)
NUMERIC_COLUMNS: tuple[str, ...] = (
  "age",
  "education-num",
  "capital-gain",
  "capital-loss",
  "hours-per-week",
)
CATEGORICAL_COLUMNS: tuple[str, ...] = (
  "workclass",
  "marital-status",
  "occupation",
  "relationship",
  "race",
  "gender",
  "native-country",
)
DOMAIN_COLUMNS = CATEGORICAL_COLUMNS
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
SPLIT_SEED = 0
OTHER = "Other/unknown"
_RARE_COUNTRY = 10


def parse_adult(raw: bytes) -> pd.DataFrame:
  """Parses ``adult.data`` bytes into a DataFrame with :data:`ADULT_COLUMNS`.

  Raises:
    ValueError: the table does not have 15 columns or has an income value
      other than ``<=50K``/``>50K``.
  """
  df = pd.read_csv(
    io.BytesIO(raw),
    header=None,
    names=list(ADULT_COLUMNS),
    skipinitialspace=True,
    dtype=str,
    keep_default_na=False,
  )
  df = df[df["age"].str.len() > 0].reset_index(drop=True)
  if df.shape[1] != len(ADULT_COLUMNS) or (df["income"] == "").any():
    raise ValueError("adult.data: expected 15 comma-separated columns per row")
  bad = sorted(set(df["income"]) - {"<=50K", ">50K"})
  if bad:
    raise ValueError(f"adult.data: unknown income values {bad}")
  for col in NUMERIC_COLUMNS + ("fnlwgt",):
    df[col] = df[col].astype(np.int64)
  return df


@functools.lru_cache(maxsize=4)
def _read_adult_cached(archive: str, mtime: float) -> pd.DataFrame:
  del mtime  # part of the cache key only
  return parse_adult(fetch.read_member(archive, ADULT_MEMBER))


def read_adult(data_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
  """The raw Adult table from the pinned, hash-checked mglearn wheel."""
  path = fetch.fetch(ADULT_PACKAGE, data_dir)
  return _read_adult_cached(str(path), path.stat().st_mtime).copy()


def split_assignment(
  strata_M: np.ndarray,
  fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
  seed: int = SPLIT_SEED,
) -> np.ndarray:
  """Assigns each row to split 0/1/2 (train/validation/test), stratified.

  Within each stratum the rows are shuffled with ``seed`` and cut at the
  cumulative ``fractions`` (rounded down), so every stratum with at least
  a handful of rows appears in every split.

  Args:
    strata_M: one hashable stratum label per row.
    fractions: train, validation, test fractions (sum to 1).
    seed: shuffling seed.

  Returns:
    int8 array of split ids, shape ``(M,)``.
  """
  if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
    raise ValueError(f"split fractions {fractions} must be >= 0 and sum to 1")
  strata_M = np.asarray(strata_M)
  split_M = np.zeros(len(strata_M), np.int8)
  rng = np.random.default_rng(seed)
  for value in sorted(set(strata_M.tolist())):
    idx = np.flatnonzero(strata_M == value)
    idx = idx[rng.permutation(len(idx))]
    n_train = int(len(idx) * fractions[0])
    n_val = int(len(idx) * fractions[1])
    split_M[idx[n_train : n_train + n_val]] = 1
    split_M[idx[n_train + n_val :]] = 2
  return split_M


def domain_groups(values_M: np.ndarray, min_domain_size: int) -> dict[str, str]:
  """Maps each raw category to its domain name (tiny ones and ``?`` merged).

  Args:
    values_M: the domain column over the whole table.
    min_domain_size: categories with fewer rows are merged into
      :data:`OTHER` together with the missing value ``?``.

  Returns:
    ``{raw value: domain name}``.
  """
  vals, counts = np.unique(values_M, return_counts=True)
  mapping = {}
  for v, c in zip(vals.tolist(), counts.tolist()):
    mapping[v] = OTHER if (v == "?" or c < min_domain_size) else v
  return mapping


def _domain_names(values_M: np.ndarray, mapping: dict[str, str]) -> list[str]:
  mapped = np.array([mapping[v] for v in values_M])
  names, counts = np.unique(mapped, return_counts=True)
  order = sorted(
    zip(names.tolist(), counts.tolist()), key=lambda t: (-t[1], t[0])
  )
  return [n for n, _ in order]


def _features(
  df: pd.DataFrame, exclude: str | None
) -> tuple[np.ndarray, list[str]]:
  cols = [df[c].to_numpy(np.float64) for c in NUMERIC_COLUMNS]
  cols[2] = np.log1p(cols[2])
  cols[3] = np.log1p(cols[3])
  names = [
    "age",
    "education-num",
    "log1p(capital-gain)",
    "log1p(capital-loss)",
    "hours-per-week",
  ]
  for col in CATEGORICAL_COLUMNS:
    if col == exclude:
      continue
    values = df[col].to_numpy()
    if col == "native-country":
      vals, counts = np.unique(values, return_counts=True)
      rare = set(vals[counts < _RARE_COUNTRY].tolist())
      values = np.array(["other" if v in rare else v for v in values])
    for cat in sorted(set(values.tolist())):
      cols.append((values == cat).astype(np.float64))
      names.append(f"{col}={cat}")
  return np.stack(cols, axis=1), names


def adult_arrays(
  df: pd.DataFrame,
  *,
  domain_column: str = "workclass",
  min_domain_size: int = 100,
  include_domain_feature: bool = False,
) -> dict[str, Any]:
  """:func:`load_adult` on a raw table that has a ``split`` column (0/1/2)."""
  values_M = df[domain_column].to_numpy()
  mapping = domain_groups(values_M, min_domain_size)
  names = _domain_names(values_M, mapping)
  index = {n: i for i, n in enumerate(names)}
  domain_M = np.array([index[mapping[v]] for v in values_M], np.int32)
  x_MxP, feature_names = _features(
    df, None if include_domain_feature else domain_column
  )
  y_M = (df["income"].to_numpy() == ">50K").astype(np.int32)
  split_M = df["split"].to_numpy()
  train = split_M == 0
  mean_P = x_MxP[train].mean(axis=0)
  std_P = x_MxP[train].std(axis=0)
  std_P = np.where(std_P > 1e-12, std_P, 1.0)
  x_MxP = ((x_MxP - mean_P) / std_P).astype(np.float32)
  out: dict[str, Any] = {}
  for s, split in enumerate(SPLITS):
    sel = split_M == s
    out[split] = {
      "x_MxP": x_MxP[sel],
      "y_M": y_M[sel],
      "domain_M": domain_M[sel],
    }
  out["domain_names"] = names
  out["feature_names"] = feature_names
  out["domain_column"] = domain_column
  return out


def adult_archive(
  data_dir: str | os.PathLike[str] | None = None,
) -> pathlib.Path:
  """Path of the verified mglearn wheel (downloading it if needed)."""
  return fetch.fetch(ADULT_PACKAGE, data_dir)
