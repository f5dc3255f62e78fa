"""A resumable mixture sampler whose domain weights may change every step.

Semantics follow levanter's ``MixtureDataset`` (weights are validated and
normalised; sampling is deterministic so resume is exact) with two changes
the online reweighting methods need: the weights ``w_K`` may be replaced at
every step, and every batch says which domain each row came from.

**Draws.** ``draw="iid"`` (the default): the domains of step ``s`` are
``B`` independent draws from ``Categorical(w_K)``. ``draw="stratified"``:
every batch holds ``floor(B w_k)`` or ``ceil(B w_k)`` rows of domain ``k``,
``B`` in all: the floors, plus the ``B - sum_k floor(B w_k)`` leftover rows
given to domains with probability equal to their remainders ``B w_k -
floor(B w_k)`` (systematic sampling over a random order of the domains),
so that ``E[count_k] = B w_k`` exactly; then the rows are shuffled. This is
largest-remainder apportionment made unbiased: a fixed rule (largest
remainders first, ties by index) would give the same domains the extra rows
at every step, e.g. with ``K = 11`` uniform domains and ``B = 16`` the first
five would get twice the data of the others.

**Determinism.** Either way the draws of step ``s`` use the generator
``Generator(Philox(key=SeedSequence([seed, stream, 0]).generate_state(2,
uint64), counter=[0, 0, 0, s]))``: they depend only on
``(seed, stream, s, w_K)`` (the weights in force at that step), not on
earlier weights. Within a domain, rows are
filled by a :class:`~dataweights.data.pipeline.DomainCursor` (a seeded
permutation per epoch). The full state, :meth:`MixtureSampler.get_state`, is a
small JSON-able dict (step, weights, one ``[docs_done, offset]`` per domain);
restoring it makes the following batches identical to an uninterrupted
run's.

Example:
  >>> from dataweights.data.pipeline import DomainSource
  >>> a = DomainSource("a", [{"text": b"aaaa"}] * 3)
  >>> b = DomainSource("b", [{"text": b"bb"}] * 5)
  >>> s = MixtureSampler([a, b], batch_size=4, seq_len=8, seed=0)
  >>> batch = s.next_batch([0.25, 0.75])
  >>> batch["tokens_BxL"].shape, batch["domain_B"].dtype
  ((4, 8), dtype('int32'))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dataweights import weights as weights_lib
from dataweights.data import tokenize
from dataweights.data.pipeline import (
  PACKINGS,
  DomainCursor,
  DomainSource,
  PipelineConfig,
)
from dataweights.weights import check_weights

STATE_FORMAT = "dataweights.mixture/1"
DRAWS: tuple[str, ...] = ("iid", "stratified")


def validate_weights(
  weights: Any, names: Sequence[str], *, normalise: bool = True
) -> np.ndarray:
  """Checks mixture weights and returns them as a float64 ``w_K``.

  The library's one weight check
  (:func:`dataweights.weights.check_weights`) with the sampler's domain
  names: ``weights`` may be ``K`` non-negative finite numbers or a mapping
  ``{domain name: weight}`` (domains left out get 0).

  Raises:
    WeightsError: wrong shape or length, a non-numeric, negative or
      non-finite weight, all weights zero, or an unknown domain name.
  """
  return check_weights(weights, names=list(names), normalise=normalise)


def natural_weights(domains: Sequence[DomainSource]) -> np.ndarray:
  """Weights proportional to each domain's number of documents."""
  return weights_lib.natural_weights(
    [len(d) for d in domains], what="domain document counts"
  )


class MixtureSampler:
  """Draws batches of rows from K domains under changing weights.

  Args:
    domains: the K :class:`DomainSource` s (distinct names).
    batch_size: B, rows per batch.
    seq_len: L, tokens per row.
    packing: ``"pack"`` or ``"pad"`` (see :mod:`dataweights.data.pipeline`).
    seed: seed of the domain draws and of the permutations.
    weights: initial weights (see :func:`validate_weights`); default
      :func:`natural_weights`.
    stream: an integer that makes this sampler's randomness independent of
      another sampler's with the same seed (e.g. generic vs specific).
    draw: ``"iid"`` (independent rows) or ``"stratified"`` (per-batch
      counts ``floor`` or ``ceil`` of ``B w_k``; see the module docstring).

  Raises:
    ValueError: no domains, duplicate names, bad sizes, weights or draw.
  """

  def __init__(
    self,
    domains: Sequence[DomainSource],
    *,
    batch_size: int,
    seq_len: int,
    packing: str = "pack",
    seed: int = 0,
    weights: Any = None,
    stream: int = 0,
    draw: str = "iid",
  ):
    domains = list(domains)
    if not domains:
      raise ValueError("MixtureSampler needs at least one domain; got none")
    names = [d.name for d in domains]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f"duplicate domain name(s) {dup}; names must be unique")
    for field, value, low in (
      ("batch_size", batch_size, 1),
      ("seq_len", seq_len, 1),
      ("seed", seed, 0),
      ("stream", stream, 0),
    ):
      if (
        not isinstance(value, (int, np.integer))
        or isinstance(value, bool)
        or value < low
      ):
        raise ValueError(
          f"{field} = {value!r} is invalid; it must be an integer >= {low}"
        )
    if packing not in PACKINGS:
      raise ValueError(
        f"packing = {packing!r} is invalid; allowed values are "
        + ", ".join(repr(p) for p in PACKINGS)
      )
    if draw not in DRAWS:
      raise ValueError(
        f"draw = {draw!r} is invalid; allowed values are "
        + ", ".join(repr(d) for d in DRAWS)
      )
    self.draw = draw
    self.domains = domains
    self.names: tuple[str, ...] = tuple(names)
    self.batch_size, self.seq_len = int(batch_size), int(seq_len)
    self.packing, self.seed, self.stream = packing, int(seed), int(stream)
    self._cursors = [
      DomainCursor(d, self.seed, self.stream, k) for k, d in enumerate(domains)
    ]
    self.step = 0
    # Philox key of the per-step domain draws; step s uses counter [0,0,0,s].
    self._step_key = np.random.SeedSequence(
      [self.seed, self.stream, 0]
    ).generate_state(2, np.uint64)
    self._w_K = (
      natural_weights(domains)
      if weights is None
      else validate_weights(weights, self.names)
    )

  @property
  def num_domains(self) -> int:
    """K."""
    return len(self.domains)

  @property
  def weights(self) -> np.ndarray:
    """The current normalised weights ``w_K`` (a copy)."""
    return self._w_K.copy()

  def set_weights(self, weights: Any) -> None:
    """Replaces the weights used from the next batch on.

    Raises:
      ValueError: see :func:`validate_weights`.
    """
    self._w_K = validate_weights(weights, self.names)

  def domain_index(self, name: str) -> int:
    """The index of domain ``name``.

    Raises:
      ValueError: unknown domain, listing the known ones.
    """
    if name not in self.names:
      raise ValueError(
        f"unknown domain {name!r}; allowed domains are "
        + ", ".join(repr(n) for n in self.names)
      )
    return self.names.index(name)

  def draw_domains(self, step: int, weights: Any = None) -> np.ndarray:
    """The domains ``domain_B`` of ``step`` (no state change).

    Args:
      step: the step index.
      weights: the weights to use (default: the current ones).

    Returns:
      ``int32`` array of B domain indices.
    """
    w_K = (
      self._w_K if weights is None else validate_weights(weights, self.names)
    )
    rng = np.random.Generator(
      np.random.Philox(key=self._step_key, counter=[0, 0, 0, int(step)])
    )
    if self.draw == "stratified":
      return _stratified_domains(w_K, self.batch_size, rng)
    # Inverse-CDF draws: B uniforms, searchsorted in the cumulative weights.
    cdf_K = np.cumsum(w_K)
    cdf_K /= cdf_K[-1]
    u_B = rng.random(self.batch_size)
    domain_B = np.searchsorted(cdf_K, u_B, side="right")
    # Guard against float round-off landing on a zero-weight domain.
    domain_B = np.minimum(domain_B, self.num_domains - 1)
    return domain_B.astype(np.int32)

  def next_batch(self, weights: Any = None) -> dict[str, np.ndarray]:
    """The next batch; ``weights``, if given, replace the current ones first.

    Args:
      weights: new weights for this and later steps (see
        :func:`validate_weights`), e.g. the output of an online reweighting
        method at this step; ``None`` keeps the current weights.

    Returns:
      ``{"tokens_BxL": int32, "mask_BxL": bool, "domain_B": int32}``.

    Raises:
      ValueError: bad weights (the sampler is left unchanged).
    """
    if weights is not None:
      self.set_weights(weights)
    domain_B = self.draw_domains(self.step)
    tokens_BxL = np.full(
      (self.batch_size, self.seq_len), tokenize.PAD_ID, dtype=np.int32
    )
    cursors, packing = self._cursors, self.packing
    if packing == "pack":
      # Rows of one domain are consecutive pieces of its stream, in batch
      # order: one take() per domain (the same rows as a fill() per row).
      order_B = np.argsort(domain_B, kind="stable")
      count_K = np.bincount(domain_B, minlength=self.num_domains)
      start, seq_len = 0, self.seq_len
      for d in np.flatnonzero(count_K).tolist():
        c = int(count_K[d])
        rows = order_B[start : start + c]
        start += c
        tokens_BxL[rows] = cursors[d].take(c * seq_len).reshape(c, seq_len)
      n_B = np.full(self.batch_size, seq_len, dtype=np.int64)
    else:
      n_B = np.empty(self.batch_size, dtype=np.int64)
      for b, d in enumerate(domain_B.tolist()):
        n_B[b] = cursors[d].fill(tokens_BxL[b], packing)
    mask_BxL = np.arange(self.seq_len)[None, :] < n_B[:, None]
    self.step += 1
    return {
      "tokens_BxL": tokens_BxL,
      "mask_BxL": mask_BxL,
      "domain_B": domain_B,
    }

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self.next_batch()

  def _config(self) -> dict[str, Any]:
    return {
      "draw": self.draw,
      "seed": self.seed,
      "stream": self.stream,
      "batch_size": self.batch_size,
      "seq_len": self.seq_len,
      "packing": self.packing,
      "domains": list(self.names),
      "num_docs": [len(d) for d in self.domains],
    }

  def get_state(self) -> dict[str, Any]:
    """The full state as a JSON-able dict (config, step, weights, cursors)."""
    return {
      "format": STATE_FORMAT,
      **self._config(),
      "step": self.step,
      # float64 -> Python float -> JSON repr round-trips exactly.
      "weights": [float(w) for w in self._w_K],
      "cursors": [c.get_state() for c in self._cursors],
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores :meth:`get_state`'s output.

    Args:
      state: a state from a sampler with the same domains and config.

    Raises:
      ValueError: the state is not a mixture state, or it was saved by a
        sampler with other domains, sizes, seed or packing (the message
        names the field, the saved value and this sampler's value).
    """
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
      got = state.get("format") if isinstance(state, Mapping) else type(state)
      raise ValueError(
        f"not a mixture sampler state (format {got!r}); expected format "
        f"{STATE_FORMAT!r} from MixtureSampler.get_state()"
      )
    for key, mine in self._config().items():
      # States saved before stratified draws existed were i.i.d.
      saved = state.get(key, "iid" if key == "draw" else None)
      if saved != mine:
        raise ValueError(
          f"saved sampler state has {key} = {saved!r} but this sampler has "
          f"{key} = {mine!r}; restore into a sampler built with the same "
          "domains and config"
        )
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
      raise ValueError(
        f"saved step = {step!r} is invalid; it must be an int >= 0"
      )
    cursors = state.get("cursors")
    if not isinstance(cursors, Sequence) or len(cursors) != self.num_domains:
      raise ValueError(
        f"saved cursors = {cursors!r} are invalid; expected one "
        f"[docs_done, offset] per domain ({self.num_domains})"
      )
    w_K = validate_weights(state.get("weights"), self.names)
    for k, (cursor, c) in enumerate(zip(self._cursors, cursors, strict=True)):
      try:
        cursor.set_state(c)
      except ValueError as e:
        raise ValueError(f"saved cursors[{k}] is invalid: {e}") from e
    self.step, self._w_K = step, w_K


def _stratified_domains(
  w_K: np.ndarray, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
  """``floor``/``ceil`` of ``B w_K`` rows per domain, unbiased, shuffled."""
  target_K = batch_size * w_K
  count_K = np.floor(target_K).astype(np.int64)
  left = batch_size - int(count_K.sum())
  if left > 0:
    # Systematic sampling: the remainders tile [0, left) in a random domain
    # order; the points u, u + 1, ..., u + left - 1 each pick the domain
    # whose tile holds them. A tile is shorter than 1, so a domain gets at
    # most one extra row, with probability equal to its remainder.
    order_K = rng.permutation(w_K.shape[0])
    rem_K = (target_K - count_K)[order_K]
    cum_K1 = np.concatenate([[0.0], np.cumsum(rem_K)])
    cum_K1 *= left / cum_K1[-1]  # the remainders sum to `left` up to round-off
    u = rng.random()
    extra_K = np.ceil(cum_K1[1:] - u) - np.ceil(cum_K1[:-1] - u)
    count_K[order_K] += extra_K.astype(np.int64)
  domain_B = np.repeat(np.arange(w_K.shape[0]), count_K)
  return rng.permutation(domain_B).astype(np.int32)


class FilterStreams:
  """The two streams of online data selection (Grangier et al., §2).

  Each step gives a big generic batch of ``G = B * downsampling`` rows drawn
  from the generic pool (to be scored and filtered down to B) and a small
  specific batch from the target domain. The big batch's ``domain_B``
  indexes ``self.generic.names`` (the generic domains only); the specific
  batch's is all zeros.

  Args:
    generic: the generic pool's domains.
    specific: the target domain.
    cfg: shapes, packing and seed.
    generic_weights: weights over the generic domains; default
      :func:`natural_weights` (the pool as it comes).

  Raises:
    ValueError: the specific domain is also in the generic pool, holds fewer
      tokens than one specific batch, or bad weights.
  """

  def __init__(
    self,
    generic: Sequence[DomainSource],
    specific: DomainSource,
    cfg: PipelineConfig,
    generic_weights: Any = None,
  ):
    if specific.name in [d.name for d in generic]:
      raise ValueError(
        f"specific domain {specific.name!r} is also in the generic pool; "
        "keep the target out of the generic domains"
      )
    need = cfg.specific_batch_size * cfg.seq_len
    have = specific.num_tokens()
    if have < need:
      raise ValueError(
        f"specific domain {specific.name!r} has {have} tokens, fewer than one "
        f"specific batch of {cfg.specific_batch_size} x {cfg.seq_len} = {need} "
        "tokens; use a smaller specific batch or a larger specific set"
      )
    common = dict(seq_len=cfg.seq_len, packing=cfg.packing, seed=cfg.seed)
    self.generic = MixtureSampler(
      generic,
      batch_size=cfg.generic_batch_size,
      weights=generic_weights,
      stream=1,
      **common,
    )
    self.specific = MixtureSampler(
      [specific], batch_size=cfg.specific_batch_size, stream=2, **common
    )

  def next(
    self, generic_weights: Any = None
  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(big generic batch with G rows, specific batch)``."""
    return self.generic.next_batch(generic_weights), self.specific.next_batch()

  def get_state(self) -> dict[str, Any]:
    """Both samplers' states (JSON-able)."""
    return {
      "generic": self.generic.get_state(),
      "specific": self.specific.get_state(),
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores :meth:`get_state`'s output.

    Raises:
      ValueError: see :meth:`MixtureSampler.set_state`.
    """
    if not isinstance(state, Mapping) or set(state) != {"generic", "specific"}:
      raise ValueError(
        "not a FilterStreams state; expected a dict with keys 'generic' and "
        "'specific' from FilterStreams.get_state()"
      )
    self.generic.set_state(state["generic"])
    self.specific.set_state(state["specific"])


def split_specific(
  domains: Sequence[DomainSource], specific: str
) -> tuple[list[DomainSource], DomainSource]:
  """Splits domains into the generic pool and the named target domain.

  Raises:
    ValueError: unknown domain name, listing the allowed ones.
  """
  names = [d.name for d in domains]
  if specific not in names:
    raise ValueError(
      f"unknown domain {specific!r}; allowed domains are "
      + ", ".join(repr(n) for n in names)
    )
  target = domains[names.index(specific)]
  return [d for d in domains if d.name != specific], target


def train_sampler(
  domains: Sequence[DomainSource],
  cfg: PipelineConfig,
  weights: Any = None,
  stream: int = 0,
  draw: str = "iid",
) -> MixtureSampler:
  """A :class:`MixtureSampler` with ``cfg``'s training shapes (B x L)."""
  return MixtureSampler(
    domains,
    batch_size=cfg.batch_size,
    seq_len=cfg.seq_len,
    packing=cfg.packing,
    seed=cfg.seed,
    weights=weights,
    stream=stream,
    draw=draw,
  )
