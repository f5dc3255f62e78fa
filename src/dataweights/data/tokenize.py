"""Byte-level tokenisation: no vocabulary files, no hub downloads.

Token ids:

  * ``0 .. 255``: the raw bytes (id == byte value; UTF-8 for text, the pixel
    values for ``uint8`` images);
  * :data:`PAD_ID` ``= 256``: padding (always masked out of the loss);
  * :data:`BOS_ID` ``= 257``: beginning of a document;
  * :data:`EOS_ID` ``= 258``: end of a document (also the separator between
    packed documents);
  * :data:`SEP_ID` ``= 259``: between a prompt and its response
    (instruction pairs, :mod:`dataweights.data.instructions`).

Ids ``260 .. 263`` are reserved (unused), so :data:`VOCAB_SIZE` ``= 264``
(``configs.lm.BYTE_VOCAB_SIZE``: 256 bytes + 8 specials keeps V divisible
by 8 for tensor parallelism). Tokens are ``int32``. A document encodes to
``[BOS, b_0, ..., b_{n-1}, EOS]``, so every document has at least two tokens
and :func:`decode` inverts :func:`encode` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUM_BYTES: int = 256
PAD_ID: int = 256
BOS_ID: int = 257
EOS_ID: int = 258
SEP_ID: int = 259
NUM_SPECIAL: int = 8  # ids 256..263: pad, bos, eos, sep, then reserved
VOCAB_SIZE: int = NUM_BYTES + NUM_SPECIAL
SPECIAL_IDS: dict[str, int] = {
  "pad": PAD_ID,
  "bos": BOS_ID,
  "eos": EOS_ID,
  "sep": SEP_ID,
}


def to_bytes(value: object) -> bytes:
  """The raw bytes of a record field: text, bytes or a ``uint8`` array.

  Args:
    value: ``bytes``; ``str`` (encoded as UTF-8); a numpy scalar of either;
      or a ``uint8`` array (e.g. an image), flattened in C order.

  Returns:
    The bytes.

  Raises:
    TypeError: any other type or array dtype, naming what is allowed.
  """
  if isinstance(value, np.ndarray) and value.dtype == np.uint8:
    return value.tobytes(order="C")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value)
  if isinstance(value, str):
    return value.encode("utf-8")
  what = type(value).__name__
  if isinstance(value, np.ndarray):
    what = f"ndarray of dtype {value.dtype}"
  raise TypeError(
    f"cannot tokenise a value of type {what}; allowed are bytes, str "
    "(UTF-8) and uint8 arrays"
  )


def encode(value: object) -> np.ndarray:
  """Encodes one document as ``[BOS, bytes..., EOS]``.

  Args:
    value: anything :func:`to_bytes` accepts.

  Returns:
    ``int32`` array of length ``len(bytes) + 2``.

  Raises:
    TypeError: from :func:`to_bytes`.
  """
  raw_N = np.frombuffer(to_bytes(value), dtype=np.uint8)
  out = np.empty(raw_N.shape[0] + 2, dtype=np.int32)
  out[0] = BOS_ID
  out[1:-1] = raw_N
  out[-1] = EOS_ID
  return out


def _as_ids(tokens: object) -> np.ndarray:
  """``tokens`` as a flat integer array; ValueError if they are not ids."""
  try:
    ids = np.asarray(tokens).reshape(-1)
  except (TypeError, ValueError) as e:  # ragged or unconvertible
    raise ValueError(
      f"token ids {tokens!r:.80} are not an array of integers: {e}"
    ) from e
  if ids.size and (
    not np.issubdtype(ids.dtype, np.integer) or ids.dtype == np.bool_
  ):
    raise ValueError(
      f"token ids must be integers in [0, {VOCAB_SIZE}), got dtype {ids.dtype}"
    )
  return ids.astype(np.int64)


def decode(tokens: Sequence[int] | np.ndarray) -> bytes:
  """The bytes of ``tokens`` with the special ids (PAD, BOS, EOS) dropped.

  Args:
    tokens: integer ids in ``[0, VOCAB_SIZE)``.

  Returns:
    The byte string.

  Raises:
    ValueError: not integer ids, or an id outside ``[0, VOCAB_SIZE)``,
      naming it.
  """
  ids = _as_ids(tokens)
  bad = ids[(ids < 0) | (ids >= VOCAB_SIZE)]
  if bad.size:
    raise ValueError(
      f"token id {int(bad[0])} is out of range; allowed ids are 0..{VOCAB_SIZE - 1}"
    )
  return ids[ids < NUM_BYTES].astype(np.uint8).tobytes()


def split_documents(tokens: Sequence[int] | np.ndarray) -> list[bytes]:
  """Splits a token stream at EOS into document byte strings.

  Useful to read packed rows back: every complete ``[BOS ... EOS]`` document
  in ``tokens`` gives one entry (an unterminated tail gives a last entry).

  Args:
    tokens: integer ids in ``[0, VOCAB_SIZE)``.

  Returns:
    The documents' bytes, in order.

  Raises:
    ValueError: not integer ids, or an id outside ``[0, VOCAB_SIZE)``.
  """
  ids = _as_ids(tokens)
  ends = np.flatnonzero(ids == EOS_ID)
  docs, start = [], 0
  for end in ends:
    docs.append(decode(ids[start:end]))
    start = end + 1
  if start < ids.shape[0] and np.any(ids[start:] != PAD_ID):
    docs.append(decode(ids[start:]))
  return docs
