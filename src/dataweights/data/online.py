"""Real TFDS data sets by name, for users with internet.

:func:`tfds_domains` opens any TFDS data set with
``tfds.data_source(name, split=..., data_dir=...)`` (random access, no
TensorFlow needed to read) and returns per-domain
:class:`~dataweights.data.pipeline.DomainSource` s that feed the same mixture
sampler as the offline corpora. Text fields (``lm1b``, ``c4``) and ``uint8``
images (``mnist``: 784 pixel bytes per example) are byte-tokenised alike.

This path is never taken by default: the data set must have been prepared
in ``data_dir`` (``tfds.builder(name).download_and_prepare()``, which needs
the internet and, for most data sets, TensorFlow). Tests run it offline
under ``tfds.testing.mock_data(..., policy=tfds.testing.MockPolicy.USE_CODE)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np

from dataweights.data.pipeline import DomainSource, group_by_domain

# Above this many records, documents are read on demand instead of being
# encoded into memory up front.
IN_MEMORY_MAX_RECORDS = 200_000


def open_tfds(name: str, *, split: str = "train", data_dir: str | None = None):
  """``tfds.data_source(name, split=split, data_dir=data_dir)``.

  Raises:
    ValueError: unknown data set name (with the closest registered names),
      or a data set that is registered but not prepared in ``data_dir``.
  """
  import tensorflow_datasets as tfds  # noqa: PLC0415 (slow import, optional path)

  if not isinstance(name, str) or not name:
    raise ValueError(f"data set name {name!r} is invalid; expected a TFDS name")
  base = name.split("/")[0].split(":")[0]
  known = sorted(set(tfds.list_builders(with_community_datasets=False)))
  if base not in known:
    close = difflib.get_close_matches(base, known, n=5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(
      f"unknown TFDS data set {name!r}: not among the {len(known)} registered "
      f"builders (see tfds.list_builders()){hint}"
    )
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
      f"TFDS data set {name!r} is registered but could not be opened from "
      f"data_dir={data_dir!r}; prepare it first with "
      f"tfds.builder({name!r}, data_dir=...).download_and_prepare() "
      f"(needs the internet): {str(e).splitlines()[0]}"
    ) from e


def _infer_text_key(features: Any, name: str) -> str:
  keys = list(features.keys())
  for key in ("text", "image"):
    if key in keys:
      return key
  raise ValueError(
    f"cannot tell which field of {name!r} holds the document; pass "
    f"text_key= one of {', '.join(repr(k) for k in keys)}"
  )


def tfds_domains(
  name: str,
  *,
  split: str = "train",
  data_dir: str | None = None,
  text_key: str | None = None,
  domain_key: str | None = None,
  max_examples: int | None = None,
  in_memory: bool | None = None,
) -> list[DomainSource]:
  """Per-domain sources of a TFDS data set, opened by name.

  Args:
    name: a TFDS name, e.g. ``"lm1b"``, ``"c4/en"``, ``"mnist"``, or one of
      the project's builders.
    split: a TFDS split (slicing like ``"train[:10%]"`` is allowed).
    data_dir: where the prepared data set lives (TFDS default if ``None``).
    text_key: the field to tokenise; default ``"text"`` or ``"image"``,
      whichever exists.
    domain_key: an integer (ClassLabel) field whose values define domains
      (e.g. ``"label"`` for mnist, ``"domain"`` for the project's builders);
      ``None`` makes the whole split one domain named after the data set.
      Grouping reads every record's label once.
    max_examples: use only the first this many records (a cap for huge sets
      such as c4, whose per-epoch permutation would otherwise be large).
    in_memory: encode all documents up front; default: only if at most
      :data:`IN_MEMORY_MAX_RECORDS` records.

  Returns:
    One :class:`DomainSource` per domain.

  Raises:
    ValueError: unknown data set, unknown field, or bad ``max_examples``.
  """
  source = open_tfds(name, split=split, data_dir=data_dir)
  features = source.dataset_info.features
  keys = list(features.keys())
  if text_key is None:
    text_key = _infer_text_key(features, name)
  for field, key in (("text_key", text_key), ("domain_key", domain_key)):
    if key is not None and key not in keys:
      raise ValueError(
        f"{field} = {key!r} is not a field of {name!r}; its fields are "
        + ", ".join(repr(k) for k in keys)
      )
  n = len(source)
  if max_examples is not None:
    if not isinstance(max_examples, int) or max_examples < 1:
      raise ValueError(
        f"max_examples = {max_examples!r} is invalid; it must be an int >= 1"
      )
    n = min(n, max_examples)
  records: Any = source if n == len(source) else _Prefix(source, n)
  if in_memory is None:
    in_memory = n <= IN_MEMORY_MAX_RECORDS
  if domain_key is None:
    return [DomainSource(name, records, text_key=text_key, in_memory=in_memory)]
  names = _label_names(features, domain_key)
  return group_by_domain(
    records,
    domain_key=domain_key,
    text_key=text_key,
    names=names,
    in_memory=in_memory,
  )


class _Prefix:
  """The first ``n`` records of ``source``."""

  def __init__(self, source: Any, n: int):
    self._source, self._n = source, n
    self.dataset_info = getattr(source, "dataset_info", None)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> Any:
    if not 0 <= i < self._n:
      raise IndexError(f"index {i} out of range [0, {self._n})")
    return self._source[i]


def _label_names(features: Any, key: str) -> Sequence[str] | None:
  names = getattr(features[key], "names", None)
  return None if names is None else list(names)


def domain_ids(domains: Sequence[DomainSource]) -> dict[str, int]:
  """``{name: index}`` for a list of domains (the ids in ``domain_B``)."""
  return {d.name: k for k, d in enumerate(domains)}


def domain_sizes(domains: Sequence[DomainSource]) -> np.ndarray:
  """Documents per domain, ``n_K``."""
  return np.array([len(d) for d in domains], dtype=np.int64)
