"""The host side of the data: named batch sources, method weights, resume.

A :class:`Feeder` gives the training loop, for each step, a dict of named
batches (``"train"`` and whatever a method consumes: ``"valid"``,
``"specific"``, a big ``"generic"`` batch). Each source is one of

* a *sampler*: ``next_batch(weights=None)`` (or ``__next__``) with
  ``get_state() -> dict`` and ``set_state(dict)`` (the pipeline's
  :class:`~dataweights.data.mixture.MixtureSampler`); its state is
  checkpointed, so a resumed run sees the same batches;
* a *batch function* ``fn(step) -> batch`` (stateless, random access);
* a plain iterator (on resume the first ``step`` batches are drawn again and
  dropped: exact for deterministic iterators, slow).

A method's per-domain sampling weights (:meth:`Method.sampling_weights`) go
to the ``"train"`` source. Batch ``s`` is drawn with the weights after
``s - lag`` updates: ``lag=1`` (the default) reads them from the device one
step late, so the device never waits for the host; ``lag=0`` uses the
newest weights and waits for every step. The
weights a pending batch will use are part of :meth:`Feeder.get_state`, so a
resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "dataweights.feeder/1"


class FeederError(ValueError):
  """A source cannot be used as asked (weights, state, resume)."""


class _Source:
  """Uniform access to a sampler, a batch function or an iterator."""

  def __init__(self, name: str, source: Any):
    self.name, self.source = name, source
    has_state = hasattr(source, "get_state") and hasattr(source, "set_state")
    if has_state:
      self.kind = "sampler"
    elif callable(source) and not hasattr(source, "__next__"):
      self.kind = "function"
    else:
      self.kind = "iterator"
    self.it = iter(source) if self.kind == "iterator" else None
    self.takes_weights = hasattr(source, "next_batch")

  def next(self, step: int, weights: Any = None) -> dict:
    if weights is not None:
      if not self.takes_weights:
        raise FeederError(
          f"the method emits domain weights but the {self.name!r} source "
          f"({type(self.source).__name__}) has no next_batch(weights); use a "
          "MixtureSampler"
        )
      return self.source.next_batch(weights)
    if self.kind == "function":
      return self.source(step)
    if self.kind == "sampler":
      return (
        self.source.next_batch()
        if self.takes_weights
        else next(self.source)
      )
    return next(self.it)

  def get_state(self) -> Any:
    return self.source.get_state() if self.kind == "sampler" else None

  def resume(self, step: int, state: Any) -> None:
    if self.kind == "sampler":
      if state is None:
        raise FeederError(
          f"the checkpoint at step {step} has no state for the {self.name!r} "
          "source, which has get_state/set_state; cannot resume its stream "
          "exactly"
        )
      self.source.set_state(state)
    elif self.kind == "iterator":
      log.warning("plain iterator %r: skipping %d batches", self.name, step)
      for _ in range(step):
        next(self.it)


class Feeder:
  """Named batch sources for the training loop.

  Args:
    sources: ``{"train": source, ...}``; a bare source means
      ``{"train": source}``.
    lag: batch ``s`` uses the method weights after ``s - lag`` updates
      (1: the device never waits for the host; 0: the newest weights, but
      the host waits for every step).

  Raises:
    FeederError: no ``"train"`` source, or ``lag`` not 0 or 1.
  """

  def __init__(self, sources: Any, *, lag: int = 1):
    if not isinstance(sources, Mapping) or not all(isinstance(k, str) for k in sources):
      sources = {"train": sources}
    if "train" not in sources:
      raise FeederError(
        f"the feeder needs a 'train' source; got {', '.join(map(repr, sources))}"
      )
    if lag not in (0, 1):
      raise FeederError(f"lag = {lag!r} is invalid; allowed values are 0 and 1")
    self.sources = {k: _Source(k, v) for k, v in sources.items()}
    self.lag = lag
    self.pending_weights: np.ndarray | None = None

  @property
  def names(self) -> list[str]:
    """The batch names this feeder gives every step."""
    return list(self.sources)

  def next(self, step: int, weights: Any = None) -> dict[str, dict]:
    """The batches of ``step``; ``weights`` (if any) go to ``"train"``."""
    if weights is not None:
      self.pending_weights = np.asarray(weights, np.float64)
    return {
      name: src.next(step, self.pending_weights if name == "train" else None)
      for name, src in self.sources.items()
    }

  def get_state(self) -> dict[str, Any]:
    """JSON-able: every source's state and the weights of the next batch."""
    return {
      "format": FORMAT,
      "sources": {k: s.get_state() for k, s in self.sources.items()},
      "pending_weights": None
      if self.pending_weights is None
      else [float(w) for w in self.pending_weights],
    }

  def resume(self, step: int, state: Any) -> None:
    """Restores :meth:`get_state` output saved at ``step``.

    A state saved by a single-source loop (a bare sampler state) is
    accepted for the ``"train"`` source.
    """
    if isinstance(state, Mapping) and state.get("format") == FORMAT:
      saved = state.get("sources", {})
      missing = [k for k in self.sources if k not in saved]
      if missing:
        raise FeederError(
          f"the checkpoint at step {step} has no state for source(s) "
          f"{', '.join(map(repr, missing))}; it was saved with sources "
          f"{', '.join(map(repr, saved))}"
        )
      for k, src in self.sources.items():
        src.resume(step, saved[k])
      pw = state.get("pending_weights")
      self.pending_weights = None if pw is None else np.asarray(pw, np.float64)
    else:
      if len(self.sources) != 1:
        raise FeederError(
          f"the checkpoint at step {step} holds one data stream's state but "
          f"this run has sources {', '.join(map(repr, self.sources))}"
        )
      self.sources["train"].resume(step, state)
