"""An on-disk store of projected per-example gradients that streams.

LESS keeps ``N x 8192`` projected gradients per checkpoint (peers.md: "N x
8192 fp16/ckpt"); a pool of a few million examples is tens of GB, more than
host memory. The store is a memory-mapped ``.npy`` file (numpy's own
format, readable by anything) plus a JSON sidecar:

  ``<dir>/grads.npy``  ``(N, d)`` float16 or float32, written in row chunks;
  ``<dir>/meta.json``  shape, dtype, rows written, and free-form metadata
                       (projection seed/kind/block, checkpoint, model).

Writing is append-only in row order (:meth:`GradientStore.append`) and
marks the store complete when every row is written (:meth:`close`); a
store left incomplete by a crash refuses to be read. Reading streams
chunks of rows (:meth:`iter_chunks`) and multiplies by a small matrix
chunk by chunk (:meth:`matmul`), so scoring a pool never loads it whole.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

DTYPES: tuple[str, ...] = ("float16", "float32")
_GRADS, _META = "grads.npy", "meta.json"


class StoreError(ValueError):
  """A store that is missing, incomplete, or used in the wrong way."""


class GradientStore:
  """Rows of projected gradients on disk (create with :meth:`create`).

  Attributes:
    path: the store's directory.
    num_rows: N.
    dim: d.
    dtype: storage dtype name.
    meta: the free-form metadata given at creation.
  """

  def __init__(self, path: pathlib.Path, meta: dict[str, Any], mode: str):
    self.path = path
    self._meta = meta
    self.mode = mode
    self._arr = np.load(path / _GRADS, mmap_mode="r+" if mode == "w" else "r")

  # ------------------------------------------------------------- creation --

  @classmethod
  def create(
    cls,
    path: str | os.PathLike[str],
    num_rows: int,
    dim: int,
    *,
    dtype: str = "float16",
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
  ) -> GradientStore:
    """A new, empty store of ``num_rows x dim`` (opened for appending).

    Raises:
      StoreError: bad shape or dtype, or the directory already holds a
        store and ``overwrite`` is False.
    """
    for name, v in (("num_rows", num_rows), ("dim", dim)):
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise StoreError(f"{name} = {v!r} must be an int >= 1")
    if dtype not in DTYPES:
      raise StoreError(f"dtype = {dtype!r}; allowed: {', '.join(DTYPES)}")
    path = pathlib.Path(path)
    if (path / _META).exists() and not overwrite:
      raise StoreError(
        f"{path} already holds a gradient store; pass overwrite=True or "
        "choose another directory"
      )
    path.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(
      path / _GRADS, mode="w+", dtype=dtype, shape=(int(num_rows), int(dim))
    )
    del arr
    info = {
      "num_rows": int(num_rows),
      "dim": int(dim),
      "dtype": dtype,
      "rows_written": 0,
      "complete": False,
      "meta": dict(meta or {}),
    }
    _write_json(path / _META, info)
    return cls(path, info, "w")

  @classmethod
  def open(cls, path: str | os.PathLike[str]) -> GradientStore:
    """Opens a complete store for reading.

    Raises:
      StoreError: no store at ``path``, or it was never completed.
    """
    path = pathlib.Path(path)
    if not (path / _META).exists() or not (path / _GRADS).exists():
      raise StoreError(
        f"no gradient store at {path} (expected {_META} and {_GRADS})"
      )
    info = json.loads((path / _META).read_text())
    if not info.get("complete"):
      raise StoreError(
        f"the gradient store at {path} is incomplete ({info.get('rows_written')} "
        f"of {info.get('num_rows')} rows written); recompute it"
      )
    return cls(path, info, "r")

  # ----------------------------------------------------------- properties --

  @property
  def num_rows(self) -> int:
    return int(self._meta["num_rows"])

  @property
  def dim(self) -> int:
    return int(self._meta["dim"])

  @property
  def dtype(self) -> str:
    return str(self._meta["dtype"])

  @property
  def meta(self) -> dict[str, Any]:
    return dict(self._meta["meta"])

  @property
  def rows_written(self) -> int:
    return int(self._meta["rows_written"])

  @property
  def nbytes(self) -> int:
    """Bytes of the gradient file on disk (header included)."""
    return (self.path / _GRADS).stat().st_size

  # -------------------------------------------------------------- writing --

  def append(self, rows_RxD: Any) -> None:
    """Writes the next rows (in order) and flushes them to disk.

    Raises:
      StoreError: store not open for writing, wrong width, or more rows
        than the store holds.
    """
    if self.mode != "w":
      raise StoreError(
        "the store is open for reading; create() a new one to write"
      )
    rows = np.asarray(rows_RxD)
    if rows.ndim != 2 or rows.shape[1] != self.dim:
      raise StoreError(
        f"rows of shape {rows.shape} do not fit a store of width {self.dim}"
      )
    start = self.rows_written
    stop = start + rows.shape[0]
    if stop > self.num_rows:
      raise StoreError(
        f"appending {rows.shape[0]} rows at row {start} overflows the store's "
        f"{self.num_rows} rows"
      )
    self._arr[start:stop] = rows.astype(self.dtype)
    self._arr.flush()
    self._meta["rows_written"] = stop
    _write_json(self.path / _META, self._meta)

  def close(self) -> GradientStore:
    """Marks a fully written store complete; returns it opened for reading.

    Raises:
      StoreError: rows are missing.
    """
    if self.mode == "w":
      if self.rows_written != self.num_rows:
        raise StoreError(
          f"cannot close the store at {self.path}: {self.rows_written} of "
          f"{self.num_rows} rows written"
        )
      self._arr.flush()
      self._meta["complete"] = True
      _write_json(self.path / _META, self._meta)
      del self._arr
      return GradientStore.open(self.path)
    return self

  # -------------------------------------------------------------- reading --

  def _check_readable(self) -> None:
    if self.mode != "r":
      raise StoreError("close() the store before reading it")

  def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` as float32 (a copy)."""
    self._check_readable()
    return np.asarray(self._arr[start:stop], np.float32)

  def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows float32)`` for consecutive chunks of ``chunk_rows``."""
    self._check_readable()
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
      raise StoreError(f"chunk_rows = {chunk_rows!r} must be an int >= 1")
    for start in range(0, self.num_rows, chunk_rows):
      yield start, np.asarray(self._arr[start : start + chunk_rows], np.float32)

  def matmul(
    self, v_DxQ: Any, *, chunk_rows: int = 65536, normalize: bool = False
  ) -> np.ndarray:
    """``G @ v`` streamed over row chunks (``G`` the stored ``N x d``).

    Args:
      v_DxQ: a ``(d, Q)`` matrix (or a ``(d,)`` vector).
      chunk_rows: rows read at once (memory: ``chunk_rows x d`` float32).
      normalize: use unit rows ``g_n / ||g_n||`` (cosine similarity when
        ``v`` has unit columns); zero rows stay zero.

    Returns:
      ``(N, Q)`` float32 (or ``(N,)`` for a vector).
    """
    v = np.asarray(v_DxQ, np.float32)
    vec = v.ndim == 1
    v = v[:, None] if vec else v
    if v.shape[0] != self.dim:
      raise StoreError(
        f"matrix of shape {v.shape} does not match width {self.dim}"
      )
    out = np.empty((self.num_rows, v.shape[1]), np.float32)
    for start, rows in self.iter_chunks(chunk_rows):
      if normalize:
        rows = rows / np.maximum(
          np.linalg.norm(rows, axis=1, keepdims=True), 1e-30
        )
      out[start : start + rows.shape[0]] = rows @ v
    return out[:, 0] if vec else out


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
  os.replace(tmp, path)
