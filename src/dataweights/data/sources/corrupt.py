"""Seeded synthetic corruptions with a known noise level.

A chapter builds a noisy source from a clean one with a known rate ``p``,
so a data-selection method can be scored on how well it finds the noise
(the book's Sources, The data). Every function takes ``seed`` (an int or a
``np.random.Generator``) and is deterministic given it. Functions over
collections return the corrupted items and a boolean mask ``corrupted_M``
of which items were changed.

Text (normalised, see :func:`dataweights.data.sources.text.normalize`):
  * :func:`shuffle_words`: word order destroyed, vocabulary kept.
  * :func:`substitute_chars`: each character replaced with probability p.
  * :func:`splice_spans`: a fraction p of the words replaced by spans of
    another text (a donor domain).
  * :func:`random_letters`: random letters of matched length (pure noise).
  * :func:`corrupt_texts`: one of the above on a fraction p of documents.
Labels and pairs:
  * :func:`corrupt_labels`: a fraction p of labels set to a different class.
  * :func:`corrupt_responses`: a fraction p of responses swapped between
    pairs (instruction/response mismatch).
  * :func:`replace_responses`: a fraction p of responses replaced by a
    fixed string (ScaleBiO's noise: ``"."``).
Images:
  * :func:`permute_pixels`, :func:`gaussian_noise`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEXT_KINDS: tuple[str, ...] = ("shuffle", "substitute", "splice", "random")


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
  if isinstance(seed, np.random.Generator):
    return seed
  return np.random.default_rng(seed)


def _check_rate(p: float, name: str = "p") -> float:
  if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
    raise ValueError(f"{name} = {p!r} must be a number in [0, 1]")
  return float(p)


def shuffle_words(text: str, seed: int | np.random.Generator = 0) -> str:
  """The words of ``text`` in a random order (same multiset of words)."""
  words = text.split()
  order = _rng(seed).permutation(len(words))
  return " ".join(words[i] for i in order)


def substitute_chars(
  text: str,
  p: float,
  seed: int | np.random.Generator = 0,
  alphabet: str = LETTERS,
) -> str:
  """Replaces each non-space character, with probability ``p``, by a
  different character drawn uniformly from ``alphabet``.

  Spaces are kept so word boundaries survive. The expected fraction of
  changed non-space characters is ``p``.
  """
  _check_rate(p)
  rng = _rng(seed)
  chars = np.array(list(text))
  if chars.size == 0:
    return text
  hit_M = (rng.random(chars.size) < p) & (chars != " ")
  alpha = np.array(list(alphabet))
  for i in np.flatnonzero(hit_M):
    choices = alpha[alpha != chars[i]]
    chars[i] = choices[rng.integers(len(choices))]
  return "".join(chars.tolist())


def splice_spans(
  text: str,
  donor: str,
  p: float,
  seed: int | np.random.Generator = 0,
  span_words: int = 8,
) -> str:
  """Replaces about a fraction ``p`` of the words of ``text`` with spans of
  ``span_words`` consecutive words copied from ``donor``.

  The output has the same number of words as ``text``.

  Raises:
    ValueError: ``donor`` has no words or ``span_words`` < 1.
  """
  _check_rate(p)
  if span_words < 1:
    raise ValueError(f"span_words = {span_words!r} must be >= 1")
  rng = _rng(seed)
  words, dwords = text.split(), donor.split()
  if not dwords:
    raise ValueError("donor text has no words")
  n = len(words)
  n_spans = int(round(p * n / span_words))
  starts = rng.choice(
    max(n - span_words + 1, 1),
    size=min(n_spans, max(n - span_words + 1, 1)),
    replace=False,
  )
  for s in np.sort(starts):
    d = int(rng.integers(max(len(dwords) - span_words + 1, 1)))
    span = dwords[d : d + span_words]
    for j, w in enumerate(span):
      if s + j < n:
        words[s + j] = w
  return " ".join(words)


def random_letters(text: str, seed: int | np.random.Generator = 0) -> str:
  """Uniform random letters with the same length and space positions."""
  rng = _rng(seed)
  return "".join(c if c == " " else LETTERS[rng.integers(26)] for c in text)


def corrupt_texts(
  texts: Sequence[str],
  kind: str,
  p_docs: float,
  seed: int = 0,
  *,
  p_chars: float = 0.3,
  donors: Sequence[str] | None = None,
) -> tuple[list[str], np.ndarray]:
  """Corrupts a fraction ``p_docs`` of documents with one corruption.

  Exactly ``round(p_docs * M)`` documents, chosen at random, are corrupted.

  Args:
    texts: M normalised documents.
    kind: one of :data:`TEXT_KINDS` (``shuffle``, ``substitute``,
      ``splice``, ``random``).
    p_docs: fraction of documents to corrupt.
    seed: seed.
    p_chars: per-character rate for ``substitute``; fraction of words
      spliced for ``splice``.
    donors: donor texts for ``splice`` (e.g. another domain).

  Returns:
    ``(texts, corrupted_M)``.

  Raises:
    ValueError: unknown ``kind``, bad rates, or ``splice`` without donors.
  """
  if kind not in TEXT_KINDS:
    raise ValueError(
      f"unknown corruption kind {kind!r}; allowed: {', '.join(TEXT_KINDS)}"
    )
  _check_rate(p_docs, "p_docs")
  _check_rate(p_chars, "p_chars")
  if kind == "splice" and not donors:
    raise ValueError("kind='splice' needs a non-empty list of donor texts")
  rng = _rng(seed)
  m = len(texts)
  corrupted_M = np.zeros(m, bool)
  corrupted_M[rng.choice(m, size=int(round(p_docs * m)), replace=False)] = True
  out = list(texts)
  for i in np.flatnonzero(corrupted_M):
    if kind == "shuffle":
      out[i] = shuffle_words(out[i], rng)
    elif kind == "substitute":
      out[i] = substitute_chars(out[i], p_chars, rng)
    elif kind == "splice":
      donor = donors[int(rng.integers(len(donors)))]  # type: ignore[index]
      out[i] = splice_spans(out[i], donor, p_chars, rng)
    else:
      out[i] = random_letters(out[i], rng)
  return out, corrupted_M


def corrupt_labels(
  y_M: np.ndarray,
  p: float,
  num_classes: int,
  seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Sets exactly ``round(p * M)`` random labels to a *different* class.

  Returns:
    ``(y_M corrupted, corrupted_M)``; the input is not modified.

  Raises:
    ValueError: bad ``p``, ``num_classes`` < 2, or labels out of range.
  """
  _check_rate(p)
  if num_classes < 2:
    raise ValueError(f"num_classes = {num_classes!r} must be >= 2")
  y_M = np.asarray(y_M)
  if y_M.size and (y_M.min() < 0 or y_M.max() >= num_classes):
    raise ValueError(
      f"labels must lie in [0, {num_classes}), got {y_M.min()}..{y_M.max()}"
    )
  rng = _rng(seed)
  m = y_M.shape[0]
  corrupted_M = np.zeros(m, bool)
  corrupted_M[rng.choice(m, size=int(round(p * m)), replace=False)] = True
  out = y_M.copy()
  shift = rng.integers(1, num_classes, size=int(corrupted_M.sum()))
  out[corrupted_M] = (y_M[corrupted_M] + shift) % num_classes
  return out, corrupted_M


def corrupt_responses(
  responses: Sequence[str],
  p: float,
  seed: int | np.random.Generator = 0,
) -> tuple[list[str], np.ndarray]:
  """Swaps a fraction ``p`` of responses among themselves (a derangement).

  Each chosen response is replaced by another chosen pair's response, so
  the instruction no longer matches; when two chosen responses are
  identical the swap is a no-op and the mask says so.

  Returns:
    ``(responses, corrupted_M)`` with ``corrupted_M`` true where the text
    changed.
  """
  _check_rate(p)
  rng = _rng(seed)
  m = len(responses)
  k = int(round(p * m))
  out = list(responses)
  if k >= 2:
    idx = rng.choice(m, size=k, replace=False)
    rolled = np.roll(idx, 1)  # a cyclic shift is a derangement
    for i, j in zip(idx, rolled):
      out[i] = responses[j]
  corrupted_M = np.array([a != b for a, b in zip(out, responses)], bool)
  return out, corrupted_M


def replace_responses(
  responses: Sequence[str],
  p: float,
  seed: int | np.random.Generator = 0,
  replacement: str = ".",
) -> tuple[list[str], np.ndarray]:
  """Replaces exactly ``round(p * M)`` random responses by ``replacement``.

  ScaleBiO's noise experiment (Pan et al. 2024, Sec. 5.1): the chosen
  responses become ``"."``, so the pair teaches nothing about the prompt.

  Returns:
    ``(responses, corrupted_M)``; ``corrupted_M`` marks the chosen pairs
    (a response that already equals ``replacement`` counts as chosen).

  Raises:
    ValueError: bad ``p``, or ``replacement`` not a string.
  """
  _check_rate(p)
  if not isinstance(replacement, str):
    raise ValueError(f"replacement = {replacement!r} must be a str")
  rng = _rng(seed)
  m = len(responses)
  corrupted_M = np.zeros(m, bool)
  corrupted_M[rng.choice(m, size=int(round(p * m)), replace=False)] = True
  out = [replacement if c else r for r, c in zip(responses, corrupted_M)]
  return out, corrupted_M


def permute_pixels(
  x_MxHxW: np.ndarray, seed: int | np.random.Generator = 0
) -> np.ndarray:
  """Applies one fixed random pixel permutation to every image."""
  x = np.asarray(x_MxHxW)
  m = x.shape[0]
  flat = x.reshape(m, -1)
  perm = _rng(seed).permutation(flat.shape[1])
  return flat[:, perm].reshape(x.shape)


def gaussian_noise(
  x: np.ndarray,
  sigma: float,
  seed: int | np.random.Generator = 0,
  clip: tuple[float, float] | None = None,
) -> np.ndarray:
  """``x`` plus i.i.d. N(0, sigma^2) noise, optionally clipped; float32."""
  if not sigma >= 0:
    raise ValueError(f"sigma = {sigma!r} must be >= 0")
  out = np.asarray(x, np.float32) + _rng(seed).normal(
    0, sigma, np.shape(x)
  ).astype(np.float32)
  if clip is not None:
    out = np.clip(out, *clip)
  return out
