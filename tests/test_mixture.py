"""Mixture sampler: frequencies, changing weights, exact resume, errors."""

import json

import numpy as np
import pytest
from scipy import stats

from dataweights.data import mixture, pipeline
from dataweights.data.mixture import FilterStreams, MixtureSampler
from dataweights.data.pipeline import DomainSource

NAMES = ("news", "fiction", "code", "legal")


def _domains(sizes=(5, 3, 7, 4), names=NAMES):
  # Document j of domain k reads "<name>:<j>:" plus k+j filler bytes, so that
  # lengths differ and every row can be traced back to its domain.
  return [
    DomainSource(
      name,
      [{"text": f"{name}:{j}:".encode() + b"x" * (k + j)} for j in range(n)],
    )
    for k, (name, n) in enumerate(zip(names, sizes, strict=True))
  ]


def _sampler(packing="pack", seed=0, batch_size=8, seq_len=12, **kw):
  return MixtureSampler(
    _domains(),
    batch_size=batch_size,
    seq_len=seq_len,
    packing=packing,
    seed=seed,
    **kw,
  )


def _counts(sampler, steps, weights=None):
  counts = np.zeros(sampler.num_domains, np.int64)
  for _ in range(steps):
    batch = sampler.next_batch(weights)
    counts += np.bincount(batch["domain_B"], minlength=sampler.num_domains)
  return counts


# A chi-square goodness-of-fit test at level ALPHA rejects a correct sampler
# with probability ALPHA (the false-alarm rate) for a random seed; the seed
# is fixed, so the test is deterministic.
ALPHA = 1e-3


def test_empirical_frequencies_match_weights_and_follow_changes():
  s = _sampler(batch_size=32)
  w1 = np.array([0.1, 0.2, 0.3, 0.4])
  c1 = _counts(s, 100, w1)  # 3,200 draws
  assert stats.chisquare(c1, c1.sum() * w1).pvalue > ALPHA
  w2 = np.array([0.45, 0.05, 0.15, 0.35])
  s.set_weights(w2)
  c2 = _counts(s, 100)
  assert stats.chisquare(c2, c2.sum() * w2).pvalue > ALPHA
  # The change is visible: the new counts are far from the old weights.
  assert stats.chisquare(c2, c2.sum() * w1).pvalue < 1e-12


def test_zero_weight_domains_are_never_drawn_and_weights_are_normalised():
  s = _sampler(batch_size=32, weights={"fiction": 2.0, "legal": 6.0})
  np.testing.assert_allclose(s.weights, [0.0, 0.25, 0.0, 0.75], rtol=1e-15)
  c = _counts(s, 50)
  assert c[0] == 0 and c[2] == 0
  assert (
    stats.chisquare(c[[1, 3]], c.sum() * np.array([0.25, 0.75])).pvalue > ALPHA
  )


def test_domains_of_a_step_depend_only_on_seed_step_and_current_weights():
  a, b = _sampler(), _sampler()
  w = [0.3, 0.3, 0.2, 0.2]
  for _ in range(5):  # different weight histories
    a.next_batch([1, 0, 0, 0])
    b.next_batch([0, 0, 1, 1])
  np.testing.assert_array_equal(
    a.next_batch(w)["domain_B"], b.next_batch(w)["domain_B"]
  )
  # ... and a different seed gives different draws.
  c = _sampler(seed=1)
  c.step = a.step - 1
  assert not np.array_equal(
    c.draw_domains(c.step, w), a.draw_domains(c.step, w)
  )


def _weights_at(step):
  # Weights that change every step, as an online method's would.
  rng = np.random.default_rng(100 + step)
  w = rng.random(4)
  w[step % 4] = 0.0
  return w


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_resume_is_exact_after_weight_changes(packing):
  # 40 steps of 8 rows over domains of 3-7 short documents: many epochs,
  # documents split across rows and steps.
  ref = _sampler(packing)
  ref_batches = [ref.next_batch(_weights_at(t)) for t in range(40)]

  run = _sampler(packing)
  for t in range(17):
    run.next_batch(_weights_at(t))
  saved = json.loads(json.dumps(run.get_state()))  # through JSON, as on disk
  assert saved["step"] == 17

  resumed = _sampler(packing)  # a fresh process would build it anew
  resumed.set_state(saved)
  np.testing.assert_array_equal(resumed.weights, run.weights)
  for t in range(17, 40):
    batch = resumed.next_batch(_weights_at(t))
    for key in ("tokens_BxL", "mask_BxL", "domain_B"):
      np.testing.assert_array_equal(
        batch[key], ref_batches[t][key], err_msg=key
      )
  assert resumed.get_state() == ref.get_state()


def test_resume_keeps_weights_set_before_saving():
  ref = _sampler()
  ref.set_weights([0, 1, 0, 3])
  state = ref.get_state()
  expected = [ref.next_batch() for _ in range(3)]
  resumed = _sampler()
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(
      resumed.next_batch()["tokens_BxL"], want["tokens_BxL"]
    )


@pytest.mark.parametrize(
  "weights, match",
  [
    (
      [0.5, -0.1, 0.3, 0.3],
      r"negative entries at \[1\] \(domain 'fiction'\).*non-negative finite",
    ),
    ([0.5, np.nan, 0.3, 0.3], r"non-finite entries at \[1\] \(domain 'fiction'\)"),
    ([0.5, 0.1, np.inf, 0.3], r"non-finite entries at \[2\] \(domain 'code'\)"),
    (
      [0.5, 0.5],
      r"shape \(2,\); expected shape \(4,\).*news, fiction, code, legal",
    ),
    ([[0.25] * 4], r"shape \(1, 4\); expected shape \(4,\)"),
    ([0, 0, 0, 0], r"sum to 0; at least one weight must be > 0"),
    (
      {"news": 1.0, "poetry": 1.0},
      r"unknown domain 'poetry'.*'news', 'fiction'",
    ),
    (["a", "b", "c", "d"], r"not numbers; expected non-negative finite numbers.*one per domain"),
  ],
)
def test_bad_weights_raise_and_leave_the_sampler_unchanged(weights, match):
  s = _sampler()
  before = s.get_state()
  with pytest.raises(ValueError, match=match):
    s.next_batch(weights)
  assert s.get_state() == before
  with pytest.raises(ValueError, match=match):
    MixtureSampler(_domains(), batch_size=2, seq_len=4, weights=weights)


def test_bad_sampler_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="at least one domain"):
    MixtureSampler([], batch_size=2, seq_len=4)
  with pytest.raises(
    ValueError, match=r"duplicate domain name\(s\) \['news'\]"
  ):
    MixtureSampler(_domains()[:1] * 2, batch_size=2, seq_len=4)
  with pytest.raises(ValueError, match="batch_size = 0 is invalid"):
    MixtureSampler(_domains(), batch_size=0, seq_len=4)
  with pytest.raises(
    ValueError, match="packing = 'zip' is invalid.*'pack', 'pad'"
  ):
    MixtureSampler(_domains(), batch_size=2, seq_len=4, packing="zip")
  with pytest.raises(ValueError, match="unknown domain 'poetry'.*'news'"):
    _sampler().domain_index("poetry")
  with pytest.raises(ValueError, match="domain 'empty' has no documents"):
    DomainSource("empty", [])


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(seed=1), r"seed = 0 but this sampler has seed = 1"),
    (dict(seq_len=13), r"seq_len = 12 but this sampler has seq_len = 13"),
    (
      dict(packing="pad"),
      r"packing = 'pack' but this sampler has packing = 'pad'",
    ),
    (dict(batch_size=4), r"batch_size = 8 but this sampler has batch_size = 4"),
  ],
)
def test_restoring_a_state_from_another_config_raises(change, match):
  state = _sampler().get_state()
  with pytest.raises(ValueError, match=match):
    _sampler(**change).set_state(state)


def test_restoring_a_state_with_other_domains_or_garbage_raises():
  state = _sampler().get_state()
  other = MixtureSampler(_domains(sizes=(5, 3, 7, 9)), batch_size=8, seq_len=12)
  with pytest.raises(
    ValueError,
    match=r"num_docs = \[5, 3, 7, 4\] but this sampler has num_docs = \[5, 3, 7, 9\]",
  ):
    other.set_state(state)
  renamed = MixtureSampler(
    _domains(names=("a", "b", "c", "d")), batch_size=8, seq_len=12
  )
  with pytest.raises(
    ValueError, match="domains = .*'news'.*but this sampler has domains = .*'a'"
  ):
    renamed.set_state(state)
  with pytest.raises(ValueError, match="not a mixture sampler state"):
    _sampler().set_state({"step": 3})
  bad = dict(state, cursors=[[0, 0]] * 3)
  with pytest.raises(
    ValueError, match="one \\[docs_done, offset\\] per domain"
  ):
    _sampler().set_state(bad)
  bad = dict(state, cursors=[[0, 999]] + state["cursors"][1:])
  with pytest.raises(
    ValueError, match=r"cursor state \[0, 999\] of domain 'news'"
  ):
    _sampler().set_state(bad)


def _filter_streams():
  cfg = pipeline.pipeline("smoke", seq_len=16, batch_size=2, downsampling=3)
  generic, specific = mixture.split_specific(_domains(), "code")
  return FilterStreams(generic, specific, cfg), cfg


def test_filter_streams_shapes_domains_and_resume():
  streams, cfg = _filter_streams()
  assert [d.name for d in streams.generic.domains] == [
    "news",
    "fiction",
    "legal",
  ]
  # Default generic weights: the pool's natural proportions (5, 3, 4 docs).
  np.testing.assert_allclose(streams.generic.weights, [5 / 12, 3 / 12, 4 / 12])
  big, spec = streams.next()
  assert (
    big["tokens_BxL"].shape == (cfg.generic_batch_size, cfg.seq_len) == (6, 16)
  )
  assert spec["tokens_BxL"].shape == (cfg.specific_batch_size, cfg.seq_len)
  np.testing.assert_array_equal(spec["domain_B"], 0)
  state = json.loads(json.dumps(streams.get_state()))
  want = [streams.next() for _ in range(4)]
  again, _ = _filter_streams()
  again.set_state(state)
  for want_big, want_spec in want:
    got_big, got_spec = again.next()
    np.testing.assert_array_equal(got_big["tokens_BxL"], want_big["tokens_BxL"])
    np.testing.assert_array_equal(
      got_spec["tokens_BxL"], want_spec["tokens_BxL"]
    )


def test_filter_streams_errors():
  with pytest.raises(
    ValueError, match="unknown domain 'poetry'; allowed domains are 'news'"
  ):
    mixture.split_specific(_domains(), "poetry")
  cfg = pipeline.pipeline("smoke")
  ds = _domains()
  with pytest.raises(ValueError, match="'code' is also in the generic pool"):
    FilterStreams(ds, ds[2], cfg)
  streams, _ = _filter_streams()
  with pytest.raises(ValueError, match="not a FilterStreams state"):
    streams.set_state({"generic": {}})
