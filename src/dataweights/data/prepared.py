"""Stage 3 of the data flow: read the prepared data sets.

The data flow: pinned archives are fetched and parsed
(:mod:`dataweights.data.sources`), the TFDS data sets are built and verified
(:mod:`dataweights.data.build`, CLI :mod:`dataweights.data.prepare`), this
module reads them (building or repairing them on first use), and the
pipelines and samplers (:mod:`dataweights.data.pipeline`,
:mod:`dataweights.data.mixture`) turn them into batches.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import tensorflow_datasets as tfds

from dataweights.data import build
from dataweights.data.build import (
  ADULT_DOMAINS,
  DATASETS,
  MANIFEST,
  SPLITS,
  DataIntegrityError,
  check_name,
  ensure_prepared,
  version_dir,
)
from dataweights.data.sources import adult, fetch, instructions, text
from dataweights.data.sources import digits as digits_lib

__all__ = [
  "DATASETS", "SPLITS", "adult_table", "check_domains", "digits_arrays",
  "domain_indices", "domain_names", "instruction_split", "load_adult",
  "load_digits", "load_source", "text_split",
]


def load_source(
  name: str,
  split: str,
  data_dir: str | os.PathLike[str] | None = None,
):
  """``tfds.data_source`` of a prepared data set (built/repaired if needed).

  Args:
    name: one of :data:`DATASETS`.
    split: ``train``, ``validation`` or ``test`` (TFDS slicing such as
      ``train[:10%]`` is also accepted).
    data_dir: data directory.

  Returns:
    A random-access source of dicts (see the module docstring).

  Raises:
    ValueError: unknown data set or split.
  """
  check_name(name)
  base = split.split("[")[0]
  if base not in SPLITS:
    raise ValueError(
      f"unknown split {split!r}; allowed splits are {', '.join(SPLITS)}"
    )
  root = fetch.data_dir(data_dir)
  man = version_dir(name, root) / MANIFEST
  stamp = man.stat().st_mtime if man.exists() else -1.0
  build.verified(name, str(root), stamp)
  return tfds.data_source(name, data_dir=str(root), split=split)


def domain_names(name: str) -> tuple[str, ...]:
  """ClassLabel names of the ``domain`` feature of data set ``name``."""
  check_name(name)
  return {
    "dw_text_domains": text.DOMAIN_NAMES,
    "dw_digits": digits_lib.DIGIT_DOMAINS,
    "dw_adult": ADULT_DOMAINS,
    "dw_instructions": instructions.SOURCE_NAMES,
  }[name]


def _column(src, key: str) -> np.ndarray:
  n = len(src)
  if n == 0:
    return np.zeros(0, np.int64)
  recs = src.__getitems__(list(range(n)))
  return np.array([r[key] for r in recs])


def check_domains(name: str, domains: Sequence[str] | None = None) -> tuple[str, ...]:
  """The requested domains of data set ``name`` (all if ``None``), validated.

  Raises:
    ValueError: unknown data set or domain, naming the known domains.
  """
  names = domain_names(name)
  wanted = tuple(names) if domains is None else tuple(domains)
  bad = [d for d in wanted if d not in names]
  if bad:
    raise ValueError(
      f"unknown domain(s) {bad} for {name}; known domains are "
      + ", ".join(names)
    )
  return wanted


def domain_indices(
  name: str,
  split: str,
  data_dir: str | os.PathLike[str] | None = None,
  domains: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
  """Record indices of each domain in one split (for per-domain sampling).

  Args:
    name: data set name.
    split: split name.
    data_dir: data directory.
    domains: restrict to these domain names (default: all).

  Returns:
    ``{domain name: int64 sorted indices into load_source(name, split)}``.

  Raises:
    ValueError: unknown data set, split or domain.
  """
  names = domain_names(name)
  wanted = check_domains(name, domains)
  dom_M = _column(load_source(name, split, data_dir), "domain")
  return {d: np.flatnonzero(dom_M == names.index(d)) for d in wanted}


def _records(name: str, split: str, data_dir) -> list[dict[str, Any]]:
  src = load_source(name, split, data_dir)
  return src.__getitems__(list(range(len(src)))) if len(src) else []


def _str(v: Any) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def adult_table(data_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
  """The raw Adult table from ``dw_adult`` with a ``split`` column, in
  original row order (what :func:`load_adult` uses)."""
  root = fetch.data_dir(data_dir)
  ensure_prepared("dw_adult", root)
  man = version_dir("dw_adult", root) / MANIFEST
  return _adult_table_cached(str(root), man.stat().st_mtime).copy()


@functools.lru_cache(maxsize=4)
def _adult_table_cached(data_dir: str, stamp: float) -> pd.DataFrame:
  del stamp
  rows: list[tuple[int, str, int]] = []
  for k, split in enumerate(SPLITS):
    for r in _records("dw_adult", split, data_dir):
      rows.append((int(r["row"]), _str(r["line"]), k))
  rows.sort()
  if [r[0] for r in rows] != list(range(len(rows))):
    raise DataIntegrityError("dw_adult: row ids are not 0..M-1")
  df = adult.parse_adult("\n".join(r[1] for r in rows).encode("utf-8"))
  df["split"] = np.array([r[2] for r in rows], np.int8)
  return df


def digits_arrays(
  data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
  """``dw_digits`` splits as arrays, ordered by (domain, source index)."""
  out = {}
  for split in SPLITS:
    recs = _records("dw_digits", split, data_dir)
    order = sorted(
      range(len(recs)),
      key=lambda i: (int(recs[i]["domain"]), int(recs[i]["index"])),
    )
    out[split] = {
      "x_MxHxW": np.stack([recs[i]["image"] for i in order]).astype(np.uint8),
      "y_M": np.array([recs[i]["label"] for i in order], np.int32),
      "domain_M": np.array([recs[i]["domain"] for i in order], np.int32),
    }
  return out


def text_split(
  split: str,
  data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
  """All of one ``dw_text_domains`` split in memory: ``{"text": [str],
  "domain_M": int32, "doc_id_M": int64}``."""
  recs = _records("dw_text_domains", split, data_dir)
  return {
    "text": [_str(r["text"]) for r in recs],
    "domain_M": np.array([r["domain"] for r in recs], np.int32),
    "doc_id_M": np.array([r["doc_id"] for r in recs], np.int64),
  }


def instruction_split(
  split: str,
  data_dir: str | os.PathLike[str] | None = None,
  sources: Sequence[str] | None = None,
) -> dict[str, Any]:
  """One ``dw_instructions`` split in memory, in stored order.

  Args:
    split: ``train``, ``validation`` or ``test``.
    data_dir: data directory.
    sources: keep only these instruction sources (default: all).

  Returns:
    ``{"prompt": [str], "response": [str], "source_M": int32 (index into
    :data:`~dataweights.data.sources.instructions.SOURCE_NAMES`),
    "doc_id_M": int64}``.

  Raises:
    ValueError: unknown split or source (naming the known sources).
  """
  wanted = check_domains("dw_instructions", sources)
  ids = {instructions.SOURCE_NAMES.index(s) for s in wanted}
  recs = _records("dw_instructions", split, data_dir)
  recs = [r for r in recs if int(r["domain"]) in ids]
  return {
    "prompt": [_str(r["prompt"]) for r in recs],
    "response": [_str(r["response"]) for r in recs],
    "source_M": np.array([r["domain"] for r in recs], np.int32),
    "doc_id_M": np.array([r["doc_id"] for r in recs], np.int64),
  }


def hash_text(text: str) -> str:
  """Short content hash used by the overlap checks."""
  return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_adult(
  data_dir: str | os.PathLike[str] | None = None,
  *,
  domain_column: str = "workclass",
  min_domain_size: int = 100,
  include_domain_feature: bool = False,
) -> dict[str, Any]:
  """UCI Adult as standardised features, income labels and domain ids.

  Args:
    data_dir: data directory (see :func:`dataweights.data.sources.fetch.data_dir`).
    domain_column: one of :data:`DOMAIN_COLUMNS` (``workclass``,
      ``marital-status``, ``occupation``, ``relationship``, ``race``,
      ``gender``, ``native-country``).
    min_domain_size: categories with fewer rows (whole table) are merged,
      with ``?``, into the domain ``Other/unknown``.
    include_domain_feature: keep the domain column's one-hot features.

  Returns:
    ``{"train"|"validation"|"test": {"x_MxP": float32, "y_M": int32
    (income > 50K), "domain_M": int32}, "domain_names": [...],
    "feature_names": [...], "domain_column": str}``.

  Raises:
    ValueError: unknown ``domain_column`` or ``min_domain_size`` < 1.
  """
  if domain_column not in adult.DOMAIN_COLUMNS:
    raise ValueError(
      f"unknown domain_column {domain_column!r}; allowed are "
      + ", ".join(adult.DOMAIN_COLUMNS)
    )
  if not isinstance(min_domain_size, int) or min_domain_size < 1:
    raise ValueError(
      f"min_domain_size = {min_domain_size!r} must be an int >= 1"
    )
  df = adult_table(data_dir)
  return adult.adult_arrays(
    df,
    domain_column=domain_column,
    min_domain_size=min_domain_size,
    include_domain_feature=include_domain_feature,
  )


def load_digits(
  data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
  """The prepared ``dw_digits`` splits as arrays.

  Returns:
    ``{"train"|"validation"|"test": {"x_MxHxW": uint8 (M, 8, 8) in 0..16,
    "y_M": int32, "domain_M": int32 (0 mnist, 1 uci)}}``.
  """
  return digits_arrays(data_dir)
