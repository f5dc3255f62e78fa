"""Stratified draws of the mixture sampler: counts, frequencies, resume.

``draw="stratified"`` gives every batch ``floor`` or ``ceil`` of ``B w_k``
rows of domain ``k``; the leftover rows go to domains with probability equal
to their remainders, so the long-run frequencies equal the weights exactly
(a deterministic largest-remainder rule would not: the oracle below is the
exact mean and a bound on the variance of the leftover rows).
"""

import json

import numpy as np
import pytest

from dataweights.data.mixture import MixtureSampler
from dataweights.data.pipeline import DomainSource

NAMES = ("a", "b", "c", "d", "e")


def _domains(k=5):
  return [
    DomainSource(n, [{"text": f"{n}{j}".encode() * (j + 1)} for j in range(4)])
    for n in NAMES[:k]
  ]


def _sampler(weights, batch_size=16, seed=0, draw="stratified", k=None):
  k = len(weights) if k is None else k
  return MixtureSampler(
    _domains(k),
    batch_size=batch_size,
    seq_len=6,
    seed=seed,
    weights=weights,
    draw=draw,
  )


@pytest.mark.parametrize("seed", range(5))
def test_every_batch_has_floor_or_ceil_of_b_w_rows(seed):
  rng = np.random.default_rng(seed)
  w = rng.random(5) ** 3
  w[rng.integers(5)] = 0.0  # a zero-weight domain is never drawn
  w /= w.sum()
  s = _sampler(w, batch_size=13, seed=seed)
  for step in range(50):
    count_K = np.bincount(s.draw_domains(step), minlength=5)
    assert count_K.sum() == 13
    assert np.all(count_K >= np.floor(13 * w)), (count_K, 13 * w)
    assert np.all(count_K <= np.ceil(13 * w)), (count_K, 13 * w)
    assert np.all(count_K[w == 0] == 0)


def test_long_run_frequencies_equal_the_weights():
  # Per batch, count_k = floor(B w_k) + Bernoulli(r_k), r_k the remainder;
  # over N batches the sum deviates from N B w_k by a sum of N such
  # Bernoullis (negatively correlated within a batch), whose standard
  # deviation is at most sqrt(N r_k (1 - r_k)). A biased rule (largest
  # remainder first) is off by about N * 0.2 = 400 rows here, 20 sigma.
  w = np.array([0.45, 0.55 - 1e-9, 1e-9])
  w_norm = w / w.sum()
  s = _sampler(w, batch_size=16, k=3)
  n = 2000
  total = np.zeros(3)
  for step in range(n):
    total += np.bincount(s.draw_domains(step), minlength=3)
  r = 16 * w_norm - np.floor(16 * w_norm)
  sd = np.sqrt(n * r * (1 - r))
  assert np.all(np.abs(total - n * 16 * w_norm) <= 5 * sd + 1), (total, sd)


def test_uniform_weights_do_not_favour_the_first_domains():
  # K = 5 uniform, B = 8: 3 leftover rows per batch; each domain must get
  # them equally often (a rule breaking ties by index gives them to a, b, c).
  s = _sampler(np.full(5, 0.2), batch_size=8)
  total = sum(np.bincount(s.draw_domains(t), minlength=5) for t in range(1000))
  # Each domain: 1 row + Bernoulli(0.6) per batch; mean 1600, sd <= 15.5.
  assert np.all(np.abs(total - 1600) < 5 * np.sqrt(1000 * 0.6 * 0.4)), total


def test_rows_are_shuffled_deterministically():
  s = _sampler(np.full(5, 0.2), batch_size=10)
  d0 = s.draw_domains(0)
  np.testing.assert_array_equal(d0, s.draw_domains(0))  # same step, same rows
  assert np.bincount(d0, minlength=5).tolist() == [2] * 5
  # Not grouped by domain, and a different order at another step.
  firsts = {int(s.draw_domains(t)[0]) for t in range(30)}
  assert len(firsts) == 5
  assert not np.array_equal(d0, np.sort(d0))


def test_next_batch_rows_come_from_their_domain_and_resume_is_exact():
  def weights_at(t):
    w = np.random.default_rng(t).random(5)
    w[t % 5] = 0.0
    return w

  ref = _sampler(np.full(5, 0.2), batch_size=7)
  ref_batches = [ref.next_batch(weights_at(t)) for t in range(20)]
  run = _sampler(np.full(5, 0.2), batch_size=7)
  for t in range(9):
    run.next_batch(weights_at(t))
  saved = json.loads(json.dumps(run.get_state()))
  assert saved["draw"] == "stratified"
  resumed = _sampler(np.full(5, 0.2), batch_size=7)
  resumed.set_state(saved)
  for t in range(9, 20):
    got = resumed.next_batch(weights_at(t))
    for key in ("tokens_BxL", "mask_BxL", "domain_B"):
      np.testing.assert_array_equal(got[key], ref_batches[t][key])
    assert np.all(got["domain_B"] != t % 5)
  # The first byte of each row names its domain (documents "a0", "b1a"...).
  first = ref_batches[3]["tokens_BxL"][:, 1]  # after BOS
  assert all(
    chr(c) == NAMES[d] for c, d in zip(first, ref_batches[3]["domain_B"])
  )


def test_draw_is_part_of_the_state_and_checked():
  strat = _sampler(np.full(5, 0.2))
  iid = _sampler(np.full(5, 0.2), draw="iid")
  with pytest.raises(
    ValueError, match="draw = 'stratified' but this sampler has draw = 'iid'"
  ):
    iid.set_state(strat.get_state())
  # A state saved before stratified draws existed restores as i.i.d.
  old = iid.get_state()
  del old["draw"]
  iid.set_state(old)
  with pytest.raises(ValueError, match="draw = 'stratified'"):
    strat.set_state(old)


def test_iid_default_is_unchanged():
  # The default draw is still B independent categorical draws (inverse CDF
  # of B uniforms from the step's Philox stream).
  s = _sampler([0.1, 0.2, 0.3, 0.4], draw="iid", batch_size=9)
  rng = np.random.Generator(
    np.random.Philox(key=s._step_key, counter=[0, 0, 0, 4])
  )
  want = np.searchsorted(
    np.cumsum([0.1, 0.2, 0.3, 0.4]), rng.random(9), side="right"
  )
  np.testing.assert_array_equal(s.draw_domains(4), want)
  assert MixtureSampler(_domains(2), batch_size=2, seq_len=4).draw == "iid"


def test_bad_draw_is_a_clear_error():
  with pytest.raises(
    ValueError,
    match=r"draw = 'systematic' is invalid; allowed values are 'iid', 'stratified'",
  ):
    _sampler([0.5, 0.5], draw="systematic")
