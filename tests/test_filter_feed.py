"""FilterFeed and the fast packing path: same batches, any prefetch, resume.

Oracles: the per-row ``DomainCursor.fill`` (the reference packing) for
``take``; the unprefetched feed for the prefetching one; an uninterrupted
feed for a resumed one.
"""

import json

import numpy as np
import pytest

from dataweights.data import filter_feed, mixture, pipeline
from dataweights.data.pipeline import DomainCursor, DomainSource
from dataweights.train.feeder import Feeder


def _domain(name, seed, n=7):
  rng = np.random.default_rng(seed)
  return DomainSource(
    name,
    [
      {
        "text": bytes(
          rng.integers(97, 123, rng.integers(1, 40)).astype(np.uint8)
        )
      }
      for _ in range(n)
    ],
  )


@pytest.mark.parametrize("seq_len", [1, 5, 33])
def test_take_equals_per_row_fill(seq_len):
  dom = _domain("a", 0)
  a, b = DomainCursor(dom, 3, 1, 0), DomainCursor(dom, 3, 1, 0)
  for rows in (1, 4, 9, 30, 2):  # crosses documents and epochs
    want = np.full((rows, seq_len), -1, np.int32)
    for r in range(rows):
      assert a.fill(want[r], "pack") == seq_len
    got = b.take(rows * seq_len).reshape(rows, seq_len)
    np.testing.assert_array_equal(got, want)
    assert a.get_state() == b.get_state()


def test_mixture_pack_batches_equal_the_per_row_reference():
  doms = [_domain(n, i) for i, n in enumerate("abc")]
  s = mixture.MixtureSampler(doms, batch_size=16, seq_len=9, seed=4)
  cursors = [DomainCursor(d, 4, 0, k) for k, d in enumerate(doms)]
  for step in range(12):
    batch = s.next_batch()
    want = np.full((16, 9), 256, np.int32)
    for r, d in enumerate(batch["domain_B"].tolist()):
      cursors[d].fill(want[r], "pack")
    np.testing.assert_array_equal(
      batch["tokens_BxL"], want, err_msg=f"step {step}"
    )
    assert batch["mask_BxL"].all()


def _streams(seed=0):
  gen = [_domain("a", 1), _domain("b", 2), _domain("c", 3)]
  cfg = pipeline.pipeline(
    "smoke",
    seq_len=9,
    batch_size=4,
    downsampling=3,
    specific_batch_size=5,
    seed=seed,
  )
  return mixture.FilterStreams(gen, _domain("t", 9), cfg)


def _steps(feed, start, stop):
  fd = Feeder(feed.sources())
  return [fd.next(s) for s in range(start, stop)]


def _same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert set(x) == set(y) == {"train", "generic", "specific"}
    for name in x:
      for k in x[name]:
        np.testing.assert_array_equal(x[name][k], y[name][k])


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetch_gives_the_same_batches(prefetch):
  ref = _steps(filter_feed.FilterFeed(_streams(), 4), 0, 25)
  feed = filter_feed.FilterFeed(_streams(), 4, prefetch=prefetch)
  got = _steps(feed, 0, 25)
  feed.close()
  _same(got, ref)
  b = ref[3]
  np.testing.assert_array_equal(
    b["train"]["tokens_BxL"], b["generic"]["tokens_BxL"][:4]
  )
  assert b["generic"]["tokens_BxL"].shape == (12, 9)
  assert b["specific"]["tokens_BxL"].shape == (5, 9)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_the_state_after_the_last_batch_handed_out(prefetch):
  ref = _steps(filter_feed.FilterFeed(_streams(), 4), 0, 20)
  a = filter_feed.FilterFeed(_streams(), 4, prefetch=prefetch)
  fd = Feeder(a.sources())
  for s in range(8):
    fd.next(s)
  state = json.loads(json.dumps(fd.get_state()))  # what a checkpoint keeps
  a.close()
  b = filter_feed.FilterFeed(_streams(), 4, prefetch=prefetch)
  fd2 = Feeder(b.sources())
  fd2.resume(8, state)
  got = [fd2.next(s) for s in range(8, 20)]
  b.close()
  _same(got, ref[8:])


def test_array_streams_are_a_function_of_seed_and_step():
  rng = np.random.default_rng(0)
  gen = {"x_BxHxW": rng.normal(size=(50, 2, 2)), "y_B": np.arange(50)}
  spec = {"x_BxHxW": rng.normal(size=(9, 2, 2)), "y_B": np.arange(9)}
  s1 = filter_feed.ArrayStreams(
    gen, spec, generic_batch_size=20, specific_batch_size=4
  )
  draws = [s1.next() for _ in range(5)]
  assert all(len(set(g["y_B"].tolist())) == 20 for g, _ in draws)  # distinct
  s2 = filter_feed.ArrayStreams(
    gen, spec, generic_batch_size=20, specific_batch_size=4
  )
  s2.set_state({**s1.get_state(), "step": 3})
  g, sp = s2.next()
  np.testing.assert_array_equal(g["y_B"], draws[3][0]["y_B"])
  np.testing.assert_array_equal(sp["y_B"], draws[3][1]["y_B"])
  other = filter_feed.ArrayStreams(
    gen, spec, generic_batch_size=20, specific_batch_size=4, seed=1
  )
  with pytest.raises(
    ValueError, match="seed = 0 but these streams have seed = 1"
  ):
    other.set_state(s1.get_state())
  with pytest.raises(ValueError, match="must have the same keys"):
    filter_feed.ArrayStreams(
      gen, {"y_B": spec["y_B"]}, generic_batch_size=2, specific_batch_size=2
    )


def test_a_failing_stream_raises_in_the_consumer():
  class Broken:
    def __init__(self):
      self.n = 0

    def next(self):
      self.n += 1
      if self.n == 3:
        raise RuntimeError("disk on fire")
      return {"x": np.zeros((4, 1))}, {"x": np.zeros((2, 1))}

    def get_state(self):
      return {"n": self.n}

  feed = filter_feed.FilterFeed(Broken(), 2, prefetch=2)
  feed.batches(0), feed.batches(1)
  with pytest.raises(RuntimeError, match="disk on fire"):
    feed.batches(2)
  with pytest.raises(ValueError, match="steps are drawn in order"):
    filter_feed.FilterFeed(Broken(), 2).batches(5)
