"""Per-domain document sources, packing, and the pipeline config.

The text pipeline has three layers:

1. **Sources.** A :class:`DomainSource` gives random access to the encoded
   documents (``int32`` ``[BOS, bytes..., EOS]``, see
   :mod:`dataweights.data.tokenize`) of one domain. It wraps any record
   source with ``__len__``/``__getitem__`` (a list of dicts, a
   ``tfds.data_source``) read through grain
   (``grain.MapDataset.source(records).map(encode)``), optionally
   materialised in memory. :func:`group_by_domain` splits one record source
   into per-domain sources by a ``ClassLabel``-style field.
2. **Packing.** A :class:`DomainCursor` walks one domain's documents in a
   fresh seeded permutation every epoch and fills rows of ``seq_len``
   tokens:

   * ``"pack"``: each row is filled to ``seq_len`` with consecutive
     documents of its domain (separated by EOS/BOS); a document cut at the
     end of a row continues at the start of the next row of that domain;
   * ``"pad"``: each row holds (a piece of) one document, right-padded with
     :data:`~dataweights.data.tokenize.PAD_ID`; a document longer than a row
     continues in the next row of that domain.

   Either way no token is dropped or duplicated: the rows a domain receives,
   concatenated in order, are exactly its documents' tokens in permutation
   order. ``mask_BxL`` is ``True`` on real tokens and ``False`` on padding.
3. **Sampling** (:mod:`dataweights.data.mixture`): which domain each row
   comes from, under weights that may change every step.

Batches are ``{"tokens_BxL": int32, "mask_BxL": bool, "domain_B": int32}``.
The training step reads ``tokens_BxL[:, :-1]`` and predicts
``tokens_BxL[:, 1:]``, so ``seq_len`` is the model's context plus one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dataweights.configs.base import ConfigError

# The pipeline's config lives with the other configs (configs.data); it is
# re-exported here, where the pipeline's users look for it.
from dataweights.configs.data import (  # noqa: F401
  PACKINGS,
  PIPELINE_PRESETS,
  PipelineConfig,
  pipeline,
)
from dataweights.data import tokenize


class _IndexedView:
  """``source[indices[i]]``: a random-access view on part of a source."""

  def __init__(self, source: Any, indices: np.ndarray | None):
    self._source = source
    self._indices = indices

  def __len__(self) -> int:
    return len(self._source) if self._indices is None else len(self._indices)

  def __getitem__(self, i: int) -> Any:
    if self._indices is None:
      return self._source[int(i)]
    return self._source[int(self._indices[i])]

  def read_all(self) -> list[Any]:
    """Every record, with one bulk read if the source supports it."""
    ids = (
      list(range(len(self._source)))
      if self._indices is None
      else [int(i) for i in self._indices]
    )
    if hasattr(self._source, "__getitems__"):  # tfds / grain sources
      try:
        return list(self._source.__getitems__(ids))
      except TypeError:  # e.g. tfds.testing.mock_data's patched sources
        pass
    return [self._source[i] for i in ids]


def _field_encoder(text_key: str) -> Callable[[Any], np.ndarray]:
  def encode_record(record: Any) -> np.ndarray:
    if isinstance(record, Mapping):
      if text_key not in record:
        raise KeyError(
          f"record has no field {text_key!r}; its fields are "
          + ", ".join(repr(k) for k in record)
        )
      value, what = record[text_key], f"field {text_key!r}"
    else:
      value, what = record, f"a raw record (not a dict with {text_key!r})"
    try:
      return tokenize.encode(value)
    except TypeError as e:
      raise TypeError(f"record {what}: {e}") from e

  return encode_record


def _check_indices(indices: Any, num_records: int) -> np.ndarray | None:
  """``indices`` as int64 within ``[0, num_records)``, else ValueError."""
  if indices is None:
    return None
  try:
    idx = np.asarray(indices)
  except (TypeError, ValueError):
    idx = np.asarray([None])
  ok = idx.ndim == 1 and (
    idx.size == 0
    or (np.issubdtype(idx.dtype, np.integer) and idx.dtype != np.bool_)
  )
  if ok and idx.size:
    ok = bool(idx.min() >= 0 and idx.max() < num_records)
  if not ok:
    raise ValueError(
      f"indices {indices!r:.80} are invalid; they must be a 1-D sequence of "
      f"integers in [0, {num_records}) (the source has {num_records} records)"
    )
  return idx.astype(np.int64)


class DomainSource:
  """Random access to the encoded documents of one domain.

  Args:
    name: the domain's name.
    records: any random-access source of records (``__len__`` and
      ``__getitem__``): dicts with a ``text_key`` field, or raw
      ``bytes``/``str``/``uint8`` arrays.
    indices: the records of ``records`` that belong to this domain (``None``:
      all of them).
    text_key: the field holding the document (bytes, str or a uint8 array).
    in_memory: encode every document once, now, and keep them (fast random
      access); otherwise read and encode on demand through grain.

  Raises:
    ValueError: the domain has no documents, or ``indices`` are not
      integers in ``[0, len(records))`` (a negative index would silently
      count from the end).
    KeyError: a record lacks ``text_key`` (naming it and the fields it has).
    TypeError: a document that cannot be tokenised (naming the field).
  """

  def __init__(
    self,
    name: str,
    records: Any,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    text_key: str = "text",
    in_memory: bool = True,
  ):
    self.name = str(name)
    idx = _check_indices(indices, len(records))
    view = _IndexedView(records, idx)
    if len(view) == 0:
      raise ValueError(f"domain {self.name!r} has no documents")
    encode_record = _field_encoder(text_key)
    self._dataset = grain.MapDataset.source(view).map(encode_record)
    self._docs: list[np.ndarray] | None = None
    if in_memory:  # one bulk read, then encode
      self._docs = [encode_record(r) for r in view.read_all()]
    self._len = len(view)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> np.ndarray:
    """The ``i``-th document of this domain, encoded (``int32``)."""
    if self._docs is not None:
      return self._docs[i]
    return self._dataset[int(i)]

  def num_tokens(self) -> int:
    """Total encoded tokens (reads every document once if not in memory)."""
    return int(sum(len(self[i]) for i in range(len(self))))

  def __repr__(self) -> str:
    return f"DomainSource({self.name!r}, {len(self)} documents)"


def group_by_domain(
  records: Any,
  *,
  domain_key: str = "domain",
  text_key: str = "text",
  names: Sequence[str] | None = None,
  in_memory: bool = True,
) -> list[DomainSource]:
  """Splits one record source into per-domain sources by a label field.

  Reads every record's ``domain_key`` once. Domains are ordered by label id.

  Args:
    records: random-access records (dicts with ``text_key`` and
      ``domain_key``), e.g. a ``tfds.data_source`` of the project's builders.
    domain_key: the integer (ClassLabel) domain field.
    text_key: the document field.
    names: the domain names indexed by label id; by default the
      ``ClassLabel`` names of a TFDS source if available, else ``"0"``,
      ``"1"``, ...
    in_memory: passed to :class:`DomainSource`.

  Returns:
    One :class:`DomainSource` per label present, in label order.

  Raises:
    KeyError: a record lacks ``domain_key``.
    ValueError: a label is not an integer, or has no name in ``names``.
  """
  labels_M = np.empty(len(records), dtype=np.int64)
  for i in range(len(records)):
    record = records[i]
    if domain_key not in record:
      raise KeyError(
        f"record {i} has no field {domain_key!r}; its fields are "
        + ", ".join(repr(k) for k in record)
      )
    label = record[domain_key]
    if not isinstance(label, (int, np.integer)) or isinstance(
      label, (bool, np.bool_)
    ):
      label = np.asarray(label) if isinstance(label, np.ndarray) else label
      if not (
        isinstance(label, np.ndarray)
        and label.ndim == 0
        and np.issubdtype(label.dtype, np.integer)
      ):
        raise ValueError(
          f"record {i} has {domain_key} = {record[domain_key]!r}; domain "
          "labels must be integers (ClassLabel ids)"
        )
    labels_M[i] = int(label)
  if names is None:
    names = _classlabel_names(records, domain_key)
  out = []
  for label in np.unique(labels_M):
    if names is not None and not 0 <= label < len(names):
      raise ValueError(
        f"domain label {label} has no name; names has {len(names)} entries "
        f"(labels 0..{len(names) - 1})"
      )
    name = names[label] if names is not None else str(label)
    out.append(
      DomainSource(
        name,
        records,
        np.flatnonzero(labels_M == label),
        text_key=text_key,
        in_memory=in_memory,
      )
    )
  return out


def prepared_domains(
  split: str = "train",
  *,
  name: str = "dw_text_domains",
  data_dir: str | None = None,
  domains: Sequence[str] | None = None,
  in_memory: bool = True,
) -> list[DomainSource]:
  """Per-domain sources of one of the project's prepared TFDS data sets.

  Reads ``prepared.load_source(name, split)`` (prepared on first use) and
  splits it with ``prepared.domain_indices``; domains keep the ClassLabel
  order, so ``domain_B`` ids agree across splits when ``domains`` is the
  same.

  Args:
    split: ``train``, ``validation`` or ``test``.
    name: the data set (default the text domains).
    data_dir: data directory (see :func:`dataweights.data.sources.fetch.data_dir`).
    domains: the domains to use, in this order (default: all).
    in_memory: passed to :class:`DomainSource`.

  Returns:
    One :class:`DomainSource` per domain.

  Raises:
    ValueError: unknown data set, split or domain; or a domain with no
      documents in ``split``.
  """
  from dataweights.data import prepared

  source = prepared.load_source(name, split, data_dir)
  text_key = "image" if name == "dw_digits" else "text"
  if not in_memory:
    index = prepared.domain_indices(name, split, data_dir, domains)
    return [
      DomainSource(d, source, idx, text_key=text_key, in_memory=False)
      for d, idx in index.items()
    ]
  # In memory: decode every record once (what domain_indices would also do).
  names = prepared.domain_names(name)
  wanted = prepared.check_domains(name, domains)
  records = _IndexedView(source, None).read_all()
  label_M = np.array([int(r["domain"]) for r in records], dtype=np.int64)
  return [
    DomainSource(
      d, records, np.flatnonzero(label_M == names.index(d)), text_key=text_key
    )
    for d in wanted
  ]


def _classlabel_names(records: Any, key: str) -> list[str] | None:
  try:
    return list(records.dataset_info.features[key].names)
  except (AttributeError, KeyError, TypeError):
    return None


class DomainCursor:
  """Walks one domain's documents, a new seeded permutation every epoch.

  The cursor's whole state is ``(docs_done, offset)``: the number of
  documents fully consumed since the start, and how many tokens of the
  current one are already in earlier rows. The permutation of epoch ``e`` is
  ``default_rng([seed, stream, 1, domain, e]).permutation(n)``, so it never
  needs saving.

  Args:
    source: the domain's documents.
    seed: the pipeline seed.
    stream: distinguishes independent streams drawing from the same domains.
    domain: the domain's index (part of the permutation seed).
  """

  def __init__(self, source: DomainSource, seed: int, stream: int, domain: int):
    self.source = source
    self._key = (int(seed), int(stream), 1, int(domain))
    self.docs_done = 0
    self.offset = 0
    self._n = len(source)
    self._epoch = -1
    self._perm_N: np.ndarray | None = None
    self._cached: tuple[int, np.ndarray] | None = None
    self._stream: tuple[int, np.ndarray, np.ndarray] | None = None

  def permutation(self, epoch: int) -> np.ndarray:
    """The document order of ``epoch`` (indices into the source)."""
    if epoch != self._epoch:
      rng = np.random.default_rng([*self._key, epoch])
      self._perm_N = rng.permutation(self._n)
      self._epoch = epoch
    assert self._perm_N is not None
    return self._perm_N

  def document(self, k: int) -> np.ndarray:
    """The ``k``-th document this cursor visits (counting from 0)."""
    if self._cached is not None and self._cached[0] == k:
      return self._cached[1]
    epoch, j = divmod(k, self._n)
    doc = self.source[int(self.permutation(epoch)[j])]
    self._cached = (k, doc)
    return doc

  def fill(self, row_L: np.ndarray, packing: str) -> int:
    """Writes the next tokens into ``row_L`` and advances.

    Args:
      row_L: the row to fill (already set to PAD).
      packing: ``"pack"`` or ``"pad"``.

    Returns:
      The number of real tokens written (``len(row_L)`` when packing).
    """
    length, pos = row_L.shape[0], 0
    while pos < length:
      doc = self.document(self.docs_done)
      take = min(length - pos, doc.shape[0] - self.offset)
      row_L[pos : pos + take] = doc[self.offset : self.offset + take]
      pos += take
      self.offset += take
      if self.offset == doc.shape[0]:
        self.docs_done += 1
        self.offset = 0
      if packing == "pad":
        break
    return pos

  def take(self, n: int) -> np.ndarray:
    """The next ``n`` tokens of the domain's stream (``"pack"`` rows).

    ``take(k * L).reshape(k, L)`` equals ``k`` calls of :meth:`fill` in
    ``"pack"`` mode, with one Python iteration per document instead of per
    row.
    """
    out_N = np.empty(n, np.int32)
    pos = 0
    while pos < n:
      epoch, j = divmod(self.docs_done, self._n)
      stream_T, starts_N1 = self._epoch_stream(epoch)
      cur = int(starts_N1[j]) + self.offset
      take = min(n - pos, stream_T.shape[0] - cur)
      out_N[pos : pos + take] = stream_T[cur : cur + take]
      pos += take
      cur += take
      if cur == stream_T.shape[0]:
        self.docs_done, self.offset = (epoch + 1) * self._n, 0
      else:
        k = int(np.searchsorted(starts_N1, cur, side="right")) - 1
        self.docs_done, self.offset = epoch * self._n + k, cur - int(starts_N1[k])
    return out_N

  def _epoch_stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Epoch ``epoch``'s documents concatenated, and their start offsets."""
    if self._stream is None or self._stream[0] != epoch:
      docs = [self.source[int(i)] for i in self.permutation(epoch)]
      lengths = np.array([d.shape[0] for d in docs], np.int64)
      starts_N1 = np.concatenate([[0], np.cumsum(lengths)])
      self._stream = (epoch, np.concatenate(docs).astype(np.int32), starts_N1)
    return self._stream[1], self._stream[2]

  def get_state(self) -> list[int]:
    """``[docs_done, offset]``."""
    return [int(self.docs_done), int(self.offset)]

  def set_state(self, state: Sequence[int]) -> None:
    """Restores ``[docs_done, offset]``.

    Raises:
      ValueError: malformed state, naming it.
    """
    ok = (
      isinstance(state, Sequence)
      and not isinstance(state, (str, bytes))
      and len(state) == 2
      and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
        for v in state
      )
    )
    if ok:
      ok = int(state[1]) < len(self.document(int(state[0])))
    if not ok:
      raise ValueError(
        f"cursor state {state!r} of domain {self.source.name!r} is "
        "invalid; it must be [docs_done >= 0, 0 <= offset < document length]"
      )
    self.docs_done, self.offset = int(state[0]), int(state[1])


def pack_documents(
  docs: Sequence[np.ndarray], seq_len: int, packing: str = "pack"
) -> tuple[np.ndarray, np.ndarray]:
  """Packs encoded documents, in order, into rows (a pure reference).

  Args:
    docs: encoded documents (``int32``).
    seq_len: L, tokens per row.
    packing: ``"pack"`` or ``"pad"`` (see the module docstring).

  Returns:
    ``(tokens_RxL, mask_RxL)`` with as many rows R as needed; the last row
    is right-padded in ``"pack"`` mode.

  Raises:
    ConfigError: unknown ``packing`` or ``seq_len < 1``.
  """
  if packing not in PACKINGS:
    raise ConfigError(
      f"packing = {packing!r} is invalid; allowed values are "
      + ", ".join(repr(p) for p in PACKINGS)
    )
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
    raise ConfigError(
      f"seq_len = {seq_len!r} is invalid; it must be an int >= 1"
    )
  rows: list[np.ndarray] = []
  if packing == "pack":
    stream = np.concatenate([np.asarray(d, np.int32) for d in docs] or [[]])
    for start in range(0, stream.shape[0], seq_len):
      rows.append(stream[start : start + seq_len])
  else:
    for doc in docs:
      for start in range(0, len(doc), seq_len):
        rows.append(np.asarray(doc[start : start + seq_len], np.int32))
  tokens = np.full((len(rows), seq_len), tokenize.PAD_ID, dtype=np.int32)
  mask = np.zeros((len(rows), seq_len), dtype=bool)
  for r, row in enumerate(rows):
    tokens[r, : row.shape[0]] = row
    mask[r, : row.shape[0]] = True
  return tokens, mask
