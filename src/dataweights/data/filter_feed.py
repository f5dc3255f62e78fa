"""The batches of online filtering, drawn together, prefetched, resumable.

Online filtering (:mod:`dataweights.train.filtering`) consumes three named
batches per step: ``"generic"`` (the big batch of ``G = B x downsampling``
rows to score), ``"specific"`` (the target batch) and ``"train"`` (the
first B rows of the same big batch: what the baselines train on, so every
method sees the same generic rows). A :class:`FilterFeed` wraps a pair of
streams (:class:`~dataweights.data.mixture.FilterStreams` for text,
:class:`ArrayStreams` for in-memory arrays), draws each step's batches
once, and hands them to the training loop's
:class:`~dataweights.train.feeder.Feeder` as three sources::

  feed = FilterFeed(streams, batch_size=B, prefetch=4)
  trainer.run(feed.sources())

With ``prefetch > 0`` a background thread draws ahead into a bounded
queue, so the host prepares the next batches while the device computes.
Every queued item carries the streams' state right after it was drawn, so
:meth:`FilterFeed.get_state` is the state after the last batch *handed
out* (not the last one drawn): a run resumed from a checkpoint draws
exactly the batches the uninterrupted run drew, prefetch or not.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "dataweights.filter_feed/1"
ARRAY_FORMAT = "dataweights.array_streams/1"


class ArrayStreams:
  """Generic and specific batches drawn from in-memory arrays.

  Step ``s`` draws ``G`` distinct generic rows and ``S`` distinct specific
  rows uniformly, with ``Generator(Philox(key, counter=[0, 0, stream,
  s]))``: the batches depend only on ``(seed, s)``, so the state is the step.

  Args:
    generic: ``{name: array with M_g rows}`` (e.g. ``x_BxHxW``, ``y_B``,
      ``domain_B``).
    specific: ``{name: array with M_s rows}``, same keys.
    generic_batch_size: G.
    specific_batch_size: S.
    seed: seed of the draws.

  Raises:
    ValueError: a set smaller than its batch, mismatched keys or row counts.
  """

  def __init__(
    self,
    generic: Mapping[str, np.ndarray],
    specific: Mapping[str, np.ndarray],
    *,
    generic_batch_size: int,
    specific_batch_size: int,
    seed: int = 0,
  ):
    self.generic = {k: np.asarray(v) for k, v in generic.items()}
    self.specific = {k: np.asarray(v) for k, v in specific.items()}
    if set(self.generic) != set(self.specific):
      raise ValueError(
        f"generic arrays {sorted(self.generic)} and specific arrays "
        f"{sorted(self.specific)} must have the same keys"
      )
    self.m_gen = _rows_of(self.generic, "generic")
    self.m_spec = _rows_of(self.specific, "specific")
    for name, m, size in (
      ("generic", self.m_gen, generic_batch_size),
      ("specific", self.m_spec, specific_batch_size),
    ):
      if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(
          f"{name}_batch_size = {size!r} is invalid; it must be an integer >= 1"
        )
      if m < size:
        raise ValueError(
          f"the {name} set has {m} examples, fewer than its batch of {size}; "
          f"use a {name} batch of at most {m} rows or a larger set"
        )
    self.generic_batch_size = int(generic_batch_size)
    self.specific_batch_size = int(specific_batch_size)
    self.seed = int(seed)
    self._key = np.random.SeedSequence([self.seed, 3]).generate_state(
      2, np.uint64
    )
    self.step = 0

  def _draw(self, arrays, m: int, size: int, stream: int) -> dict[str, Any]:
    rng = np.random.Generator(
      np.random.Philox(key=self._key, counter=[0, 0, stream, self.step])
    )
    idx = rng.choice(m, size=size, replace=False)
    return {k: v[idx] for k, v in arrays.items()}

  def next(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(generic batch with G rows, specific batch with S rows)``."""
    out = (
      self._draw(self.generic, self.m_gen, self.generic_batch_size, 0),
      self._draw(self.specific, self.m_spec, self.specific_batch_size, 1),
    )
    self.step += 1
    return out

  def _config(self) -> dict[str, Any]:
    return {
      "seed": self.seed,
      "generic_rows": self.m_gen,
      "specific_rows": self.m_spec,
      "generic_batch_size": self.generic_batch_size,
      "specific_batch_size": self.specific_batch_size,
    }

  def get_state(self) -> dict[str, Any]:
    """JSON-able: the config and the step."""
    return {"format": ARRAY_FORMAT, **self._config(), "step": self.step}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores :meth:`get_state`'s output.

    Raises:
      ValueError: not such a state, or saved with another config.
    """
    if not isinstance(state, Mapping) or state.get("format") != ARRAY_FORMAT:
      raise ValueError(
        f"not an ArrayStreams state (expected format {ARRAY_FORMAT!r})"
      )
    for key, mine in self._config().items():
      if state.get(key) != mine:
        raise ValueError(
          f"saved ArrayStreams state has {key} = {state.get(key)!r} but "
          f"these streams have {key} = {mine!r}"
        )
    step = state.get("step")
    if not isinstance(step, int) or step < 0:
      raise ValueError(f"saved step = {step!r} must be an int >= 0")
    self.step = step


def _rows_of(arrays: Mapping[str, np.ndarray], name: str) -> int:
  rows = {v.shape[0] for v in arrays.values()}
  if len(rows) != 1:
    raise ValueError(
      f"the {name} arrays have different numbers of rows: "
      + ", ".join(f"{k}: {v.shape[0]}" for k, v in arrays.items())
    )
  return rows.pop()


class _Stop:
  """Queue sentinel."""


class FilterFeed:
  """Draws each step's generic and specific batches once; three sources.

  Args:
    streams: ``next() -> (generic batch, specific batch)`` with
      ``get_state()`` / ``set_state()`` (a
      :class:`~dataweights.data.mixture.FilterStreams` or
      :class:`ArrayStreams`).
    batch_size: B, rows of the ``"train"`` batch (the first B rows of the
      big batch).
    prefetch: batches drawn ahead by a background thread (0: none).

  Raises:
    ValueError: ``batch_size`` or ``prefetch`` invalid.
  """

  def __init__(self, streams: Any, batch_size: int, *, prefetch: int = 0):
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(
        f"batch_size = {batch_size!r} is invalid; it must be an integer >= 1"
      )
    if not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
      raise ValueError(
        f"prefetch = {prefetch!r} is invalid; it must be an integer >= 0"
      )
    self.streams = streams
    self.batch_size = int(batch_size)
    self.prefetch = int(prefetch)
    self._lock = threading.Lock()
    self._reset(0)

  # -- producer --------------------------------------------------------------
  def _reset(self, step: int) -> None:
    self._step = step  # the next step to hand out
    self._cache: dict[int, tuple[dict, dict]] = {}
    self._state = self.streams.get_state()  # after batch step - 1
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()

  def _draw(self) -> tuple[tuple[dict, dict], Any]:
    batches = self.streams.next()
    return batches, self.streams.get_state()

  def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
      try:
        item: Any = self._draw()
      except BaseException as e:  # handed to the consumer
        item = e
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return

  def _next_item(self) -> tuple[tuple[dict, dict], Any]:
    if self.prefetch == 0:
      return self._draw()
    if self._thread is None:
      self._queue = queue.Queue(maxsize=self.prefetch)
      self._stop = threading.Event()
      self._thread = threading.Thread(
        target=self._produce,
        args=(self._queue, self._stop),
        name="FilterFeed-prefetch",
        daemon=True,
      )
      self._thread.start()
    assert self._queue is not None
    item = self._queue.get()
    if isinstance(item, BaseException):
      self.close()
      raise item
    return item

  def batches(self, step: int) -> tuple[dict, dict]:
    """``(generic, specific)`` of ``step`` (drawn once, in step order).

    Raises:
      ValueError: a step already dropped from the cache, or one ahead of
        the next step to draw.
    """
    with self._lock:
      if step in self._cache:
        return self._cache[step]
      if step != self._step:
        raise ValueError(
          f"batches of step {step} requested, but the feed is at step "
          f"{self._step}; steps are drawn in order (resume with set_state)"
        )
      batches, state = self._next_item()
      g = next(iter(batches[0].values())).shape[0]
      if g < self.batch_size:
        self.close()
        raise ValueError(
          f"the generic batch has G = {g} rows but the step keeps B = "
          f"{self.batch_size}: downsampling G / B = {g / self.batch_size:.3g} "
          "must be >= 1"
        )
      self._cache = {k: v for k, v in self._cache.items() if k >= step - 1}
      self._cache[step] = batches
      self._step, self._state = step + 1, state
      return batches

  # -- sources ---------------------------------------------------------------
  def sources(self) -> dict[str, Any]:
    """``{"train", "generic", "specific"}`` sources for the Feeder."""
    return {
      "generic": _GenericSource(self),
      "train": lambda step: {
        k: v[: self.batch_size] for k, v in self.batches(step)[0].items()
      },
      "specific": lambda step: self.batches(step)[1],
    }

  def get_state(self) -> dict[str, Any]:
    """The streams' state after the last batch handed out (JSON-able)."""
    with self._lock:
      return {"format": FORMAT, "step": self._step, "streams": self._state}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores :meth:`get_state`'s output (stops and restarts prefetch).

    Raises:
      ValueError: not a FilterFeed state (or the streams reject theirs).
    """
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
      raise ValueError(
        f"not a FilterFeed state (expected format {FORMAT!r} from "
        "FilterFeed.get_state())"
      )
    self.close()
    with self._lock:
      self.streams.set_state(state["streams"])
      self._reset(int(state["step"]))

  def close(self) -> None:
    """Stops the prefetch thread (if any)."""
    thread, stop = self._thread, self._stop
    if thread is not None:
      stop.set()
      thread.join()
    self._thread, self._queue = None, None

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 (interpreter shutdown)
      pass


class _GenericSource:
  """The big generic batch; carries the feed's state for checkpoints."""

  def __init__(self, feed: FilterFeed):
    self.feed = feed
    self.count = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    out = self.feed.batches(self.count)[0]
    self.count += 1
    return out

  def get_state(self) -> dict[str, Any]:
    return self.feed.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.feed.set_state(state)
    self.count = int(state["step"])
