"""Tokenised prompt/response batches with a response-only loss mask.

The data flow for instruction data: pairs are parsed from the pinned
archives (:mod:`dataweights.data.sources.instructions`), built into the
``dw_instructions`` TFDS data set (:mod:`dataweights.data.build`), read with
:func:`dataweights.data.prepared.instruction_split`, and turned into
batches here.

Row layout (byte-level ids, :mod:`dataweights.data.tokenize`)::

  [BOS] prompt bytes [SEP] response bytes [EOS] [PAD ...]     (L tokens)
  mask:  0     0 ...   0   1 ...          1     1   0 ...

``mask_BxL`` is true on the response bytes and the closing EOS: the tokens
the loss counts (the train step predicts ``tokens[:, 1:]`` and reads
``mask[:, 1:]``, see :func:`dataweights.train.step.lm_loss`), so the model
is trained to answer, not to repeat prompts. A pair longer than the row is
cut: the prompt keeps its last bytes (at most half the row when the
response needs the rest), the response its first bytes; the EOS is always
kept.

:class:`PairSet` holds one named source's encoded rows; :class:`PairSampler`
draws batches from several sources, each row's source uniformly over the
sources (``draw="stratified"``: ``B // K`` rows per source and the
remainder spread at random, ScaleBiO's sampling) or i.i.d. by weights
(``draw="weighted"``). A batch is a pure function of ``(seed, stream,
step)``, so the sampler's state is its step and resume is exact.
:func:`resample` draws a fixed training set by source weights (ScaleBiO's
second stage).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dataweights.data import tokenize
from dataweights.data.sources import corrupt

STATE_FORMAT = "dataweights.pairs/1"
DRAWS: tuple[str, ...] = ("stratified", "weighted")


def encode_pair(
  prompt: str | bytes, response: str | bytes, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """One row: ``[BOS] prompt [SEP] response [EOS]``, padded to ``seq_len``.

  Args:
    prompt: the instruction (UTF-8 text or bytes).
    response: the answer.
    seq_len: L, tokens per row (>= 4).

  Returns:
    ``(tokens_L int32, mask_L bool)``; mask true on the response bytes and
    the EOS.

  Raises:
    ValueError: ``seq_len < 4``.
  """
  if not isinstance(seq_len, int) or seq_len < 4:
    raise ValueError(f"seq_len = {seq_len!r} must be an int >= 4")
  p = tokenize.to_bytes(prompt)
  r = tokenize.to_bytes(response)
  budget = seq_len - 3
  r_keep = min(len(r), budget - min(len(p), budget // 2))
  p_keep = min(len(p), budget - r_keep)
  p, r = p[len(p) - p_keep :], r[:r_keep]
  tokens_L = np.full(seq_len, tokenize.PAD_ID, np.int32)
  mask_L = np.zeros(seq_len, bool)
  row = [tokenize.BOS_ID, *p, tokenize.SEP_ID, *r, tokenize.EOS_ID]
  tokens_L[: len(row)] = row
  mask_L[len(p) + 2 : len(row)] = True
  return tokens_L, mask_L


@dataclasses.dataclass(frozen=True)
class PairSet:
  """The encoded rows of one named source.

  Attributes:
    name: the source's name (what ``domain_B`` indexes in a sampler).
    tokens_MxL: int32 rows (see the module docstring).
    mask_MxL: bool response-only loss mask.
  """

  name: str
  tokens_MxL: np.ndarray
  mask_MxL: np.ndarray

  def __post_init__(self):
    if self.tokens_MxL.ndim != 2 or self.tokens_MxL.shape[0] == 0:
      raise ValueError(
        f"source {self.name!r} has no pairs (tokens shape "
        f"{self.tokens_MxL.shape}); every source needs at least one pair"
      )
    if self.mask_MxL.shape != self.tokens_MxL.shape:
      raise ValueError(
        f"source {self.name!r}: mask shape {self.mask_MxL.shape} != tokens "
        f"shape {self.tokens_MxL.shape}"
      )

  @classmethod
  def from_pairs(
    cls,
    name: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    seq_len: int,
  ) -> PairSet:
    """Encodes ``prompts[i] -> responses[i]`` rows (see :func:`encode_pair`).

    Raises:
      ValueError: different numbers of prompts and responses, or none.
    """
    if len(prompts) != len(responses):
      raise ValueError(
        f"source {name!r}: {len(prompts)} prompts but {len(responses)} "
        "responses; give one response per prompt"
      )
    rows = [encode_pair(p, r, seq_len) for p, r in zip(prompts, responses)]
    if not rows:
      return cls(
        name, np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), bool)
      )
    return cls(
      name,
      np.stack([t for t, _ in rows]),
      np.stack([m for _, m in rows]),
    )

  def __len__(self) -> int:
    return int(self.tokens_MxL.shape[0])

  @property
  def seq_len(self) -> int:
    """L, tokens per row."""
    return int(self.tokens_MxL.shape[1])

  def take(self, rows: np.ndarray, name: str | None = None) -> PairSet:
    """The rows ``rows`` as a new set."""
    rows = np.asarray(rows, np.int64)
    return PairSet(
      name or self.name, self.tokens_MxL[rows], self.mask_MxL[rows]
    )

  def response_tokens(self) -> int:
    """Loss tokens (response bytes + EOS) in the set."""
    return int(self.mask_MxL.sum())


def pair_sets(
  data: Mapping[str, Any],
  seq_len: int,
  names: Sequence[str],
) -> list[PairSet]:
  """One :class:`PairSet` per source of an :func:`instruction_split` dict.

  Args:
    data: ``{"prompt", "response", "source_M"}`` as returned by
      :func:`dataweights.data.prepared.instruction_split`.
    seq_len: L.
    names: the source names to build, in order (must be in
      :data:`~dataweights.data.sources.instructions.SOURCE_NAMES`).

  Raises:
    ValueError: an unknown source name, or a source with no pairs.
  """
  from dataweights.data.sources.instructions import SOURCE_NAMES

  out = []
  for name in names:
    if name not in SOURCE_NAMES:
      raise ValueError(
        f"unknown instruction source {name!r}; known sources are "
        + ", ".join(SOURCE_NAMES)
      )
    rows = np.flatnonzero(
      np.asarray(data["source_M"]) == SOURCE_NAMES.index(name)
    )
    out.append(
      PairSet.from_pairs(
        name,
        [data["prompt"][i] for i in rows],
        [data["response"][i] for i in rows],
        seq_len,
      )
    )
  return out


def noisy_partitions(
  prompts: Sequence[str],
  responses: Sequence[str],
  rates: Sequence[float],
  seq_len: int,
  *,
  seed: int = 0,
  replacement: str = ".",
  prefix: str = "part",
) -> tuple[list[PairSet], list[np.ndarray]]:
  """Cuts one source into partitions with responses replaced at given rates.

  The pairs are shuffled (seeded) and dealt into ``len(rates)`` equal
  partitions; in partition ``i`` exactly ``round(rates[i] * M_i)`` responses
  become ``replacement`` (:func:`corrupt.replace_responses`). ScaleBiO's noise
  experiment (Pan et al. 2024, Sec. 5.1).

  Returns:
    ``(sets, corrupted)``: the partitions (named ``f"{prefix}{i}"``) and each
    one's boolean mask of replaced responses.

  Raises:
    ValueError: a rate outside ``[0, 1]``, fewer pairs than partitions.
  """
  n, k = len(prompts), len(rates)
  if n < k:
    raise ValueError(f"{n} pairs cannot fill {k} partitions")
  rng = np.random.default_rng([seed, 0x6E6F6973])
  order = rng.permutation(n)
  sets, masks = [], []
  for i, (rows, rate) in enumerate(zip(np.array_split(order, k), rates)):
    resp, hit = corrupt.replace_responses(
      [responses[j] for j in rows], rate, rng, replacement
    )
    sets.append(
      PairSet.from_pairs(
        f"{prefix}{i}", [prompts[j] for j in rows], resp, seq_len
      )
    )
    masks.append(hit)
  return sets, masks


def _check_sets(sets: Sequence[PairSet]) -> None:
  if not sets:
    raise ValueError("a sampler needs at least one source; got none")
  names = [s.name for s in sets]
  if len(set(names)) != len(names):
    raise ValueError(f"source names must be distinct; got {names}")
  lengths = {s.seq_len for s in sets}
  if len(lengths) != 1:
    raise ValueError(
      f"sources have different row lengths {sorted(lengths)}; encode them "
      "with one seq_len"
    )


def _check_weights(weights: Any, names: Sequence[str]) -> np.ndarray:
  from dataweights.data.mixture import validate_weights

  return validate_weights(weights, names)


class PairSampler:
  """Batches of prompt/response rows from K named sources.

  Args:
    sets: the K sources (distinct names, one ``seq_len``).
    batch_size: B rows per batch.
    seed: seed of every draw.
    stream: makes this sampler independent of others with the same seed.
    draw: ``"stratified"`` (rows' sources uniform over the sources:
      ``B // K`` each, the remainder to distinct random sources) or
      ``"weighted"`` (i.i.d. sources by ``weights``).
    weights: source weights for ``"weighted"`` (default uniform).

  Raises:
    ValueError: no source, duplicate names, mixed row lengths, unknown
      ``draw``, bad weights or batch size.
  """

  def __init__(
    self,
    sets: Sequence[PairSet],
    batch_size: int,
    *,
    seed: int = 0,
    stream: int = 0,
    draw: str = "stratified",
    weights: Any = None,
  ):
    _check_sets(sets)
    if draw not in DRAWS:
      raise ValueError(
        f"draw = {draw!r} is invalid; allowed values are "
        + ", ".join(map(repr, DRAWS))
      )
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size = {batch_size!r} must be an int >= 1")
    self.sets = list(sets)
    self.names = [s.name for s in sets]
    self.batch_size = batch_size
    self.seed, self.stream, self.draw = int(seed), int(stream), draw
    k = len(sets)
    self.weights = (
      np.full(k, 1.0 / k)
      if weights is None
      else _check_weights(weights, self.names)
    )
    self.step = 0

  @property
  def num_sources(self) -> int:
    """K."""
    return len(self.sets)

  def _rng(self, step: int, part: int) -> np.random.Generator:
    """Independent streams per (seed, stream, step, part)."""
    return np.random.default_rng(
      [self.seed, self.stream, 0x70616972, step, part]
    )

  def sources_of(self, step: int) -> np.ndarray:
    """``domain_B`` of batch ``step`` (a pure function of the step)."""
    rng = self._rng(step, 0)
    k, b = self.num_sources, self.batch_size
    if self.draw == "stratified":
      counts_K = np.full(k, b // k)
      counts_K[rng.choice(k, size=b % k, replace=False)] += 1
      return np.repeat(np.arange(k), counts_K).astype(np.int32)
    return rng.choice(k, size=b, p=self.weights).astype(np.int32)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Batch ``step``: ``{"tokens_BxL", "mask_BxL", "domain_B"}``.

    Rows within a source are drawn uniformly with replacement.
    """
    domain_B = self.sources_of(step)
    rng = self._rng(step, 1)
    rows_B = np.empty(self.batch_size, np.int64)
    for k, s in enumerate(self.sets):
      sel = np.flatnonzero(domain_B == k)
      rows_B[sel] = rng.integers(0, len(s), size=sel.size)
    tokens = np.stack(
      [self.sets[d].tokens_MxL[r] for d, r in zip(domain_B, rows_B)]
    )
    mask = np.stack(
      [self.sets[d].mask_MxL[r] for d, r in zip(domain_B, rows_B)]
    )
    return {"tokens_BxL": tokens, "mask_BxL": mask, "domain_B": domain_B}

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return self.batch(step)

  def next_batch(self, weights: Any = None) -> dict[str, np.ndarray]:
    """The next batch (``weights`` replace the ``"weighted"`` draw's)."""
    if weights is not None:
      if self.draw != "weighted":
        raise ValueError(
          "a stratified PairSampler draws sources uniformly and takes no "
          "weights; use draw='weighted'"
        )
      self.weights = _check_weights(weights, self.names)
    out = self.batch(self.step)
    self.step += 1
    return out

  def get_state(self) -> dict[str, Any]:
    """JSON-able: the step and what the draws depend on."""
    return {
      "format": STATE_FORMAT,
      "step": self.step,
      "config": self._config(),
      "weights": [float(w) for w in self.weights],
    }

  def _config(self) -> dict[str, Any]:
    return {
      "names": self.names,
      "sizes": [len(s) for s in self.sets],
      "batch_size": self.batch_size,
      "seed": self.seed,
      "stream": self.stream,
      "draw": self.draw,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores :meth:`get_state` output.

    Raises:
      ValueError: a state of another format or another sampler config.
    """
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
      raise ValueError(
        f"not a PairSampler state (format {STATE_FORMAT!r}): {state!r}"
      )
    if state.get("config") != self._config():
      raise ValueError(
        f"the saved PairSampler state is for {state.get('config')}, this "
        f"sampler is {self._config()}"
      )
    step = state.get("step")
    if not isinstance(step, int) or step < 0:
      raise ValueError(f"PairSampler state step = {step!r} must be an int >= 0")
    self.step = step
    self.weights = _check_weights(state["weights"], self.names)


def resample(
  sets: Sequence[PairSet],
  weights: Any,
  num_rows: int,
  *,
  seed: int = 0,
  name: str = "resampled",
) -> tuple[PairSet, np.ndarray]:
  """A fixed training set of ``num_rows`` rows drawn by source weights.

  Source ``k`` gives ``n_k`` rows, ``n_K`` the largest-remainder rounding of
  ``num_rows * w_K`` (so ``sum n_K = num_rows`` and ``|n_k - num_rows
  w_k| < 1``); within a source the rows are drawn without replacement
  while the source lasts, then again from a fresh permutation. ScaleBiO's
  second stage (Pan et al. 2024: resample by the learned weights, then
  fine-tune).

  Returns:
    ``(set, n_K)``.

  Raises:
    ValueError: bad weights or ``num_rows < 1``.
  """
  _check_sets(sets)
  if not isinstance(num_rows, int) or num_rows < 1:
    raise ValueError(f"num_rows = {num_rows!r} must be an int >= 1")
  w_K = _check_weights(weights, [s.name for s in sets])
  exact_K = num_rows * w_K
  n_K = np.floor(exact_K).astype(np.int64)
  rest = num_rows - int(n_K.sum())
  n_K[np.argsort(-(exact_K - n_K), kind="stable")[:rest]] += 1
  rng = np.random.default_rng([seed, 0x72657361])
  toks, masks = [], []
  for s, n in zip(sets, n_K):
    reps = -(-int(n) // len(s)) if n else 0
    rows = np.concatenate(
      [rng.permutation(len(s)) for _ in range(reps)] or [np.zeros(0, np.int64)]
    )[: int(n)]
    toks.append(s.tokens_MxL[rows])
    masks.append(s.mask_MxL[rows])
  order = rng.permutation(num_rows)
  return (
    PairSet(name, np.concatenate(toks)[order], np.concatenate(masks)[order]),
    n_K,
  )
