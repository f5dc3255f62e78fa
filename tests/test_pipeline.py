"""Sources, packing and the offline (mock) TFDS path."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dataweights.configs import lm
from dataweights.configs.base import ConfigError
from dataweights.data import pipeline, prepared
from dataweights.data import tokenize as tok
from dataweights.data.mixture import MixtureSampler
from dataweights.data.pipeline import (
  DomainSource,
  group_by_domain,
  pack_documents,
)


def _texts(name, n, seed):
  rng = np.random.default_rng(seed)
  # Lengths 0..40 bytes around a row length of 12: short and long documents.
  return [
    f"{name}{j}|".encode()
    + rng.integers(97, 123, rng.integers(0, 30)).astype(np.uint8).tobytes()
    for j in range(n)
  ]


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_pack_documents_keeps_every_token_once_and_respects_length(packing):
  docs = [tok.encode(t) for t in _texts("d", 9, 0)]
  tokens, mask = pack_documents(docs, 12, packing)
  assert tokens.shape[1] == 12 and tokens.dtype == np.int32
  # Padding is exactly where the mask is off (bytes and BOS/EOS are < PAD...
  # and PAD never occurs inside a document).
  np.testing.assert_array_equal(tokens == tok.PAD_ID, ~mask)
  np.testing.assert_array_equal(tokens[mask], np.concatenate(docs))
  if packing == "pad":  # a row never mixes two documents
    for row, m in zip(tokens, mask, strict=True):
      assert np.sum(row[m] == tok.EOS_ID) <= 1
      assert np.sum(row[m][:-1] == tok.EOS_ID) == 0


def _epoch_stream(domain_docs, k, seed, stream, epochs):
  # Oracle for the documented order: a fresh permutation per epoch, seeded
  # by [seed, stream, 1, domain, epoch].
  out = []
  for e in range(epochs):
    perm = np.random.default_rng([seed, stream, 1, k, e]).permutation(
      len(domain_docs)
    )
    out += [domain_docs[i] for i in perm]
  return out


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_sampler_rows_are_the_domain_streams_without_loss_or_repeat(packing):
  texts = {
    "a": _texts("a", 6, 1),
    "b": _texts("b", 4, 2),
    "c": _texts("c", 9, 3),
  }
  domains = [
    DomainSource(n, [{"text": t} for t in ts]) for n, ts in texts.items()
  ]
  s = MixtureSampler(
    domains,
    batch_size=5,
    seq_len=12,
    packing=packing,
    seed=7,
    weights=[0.5, 0.3, 0.2],
  )
  rows = {k: [] for k in range(3)}
  masks = {k: [] for k in range(3)}
  for t in range(30):
    batch = s.next_batch(None if t < 15 else [0.1, 0.1, 0.8])
    assert batch["tokens_BxL"].shape == (5, 12)
    assert (
      batch["mask_BxL"].dtype == bool and batch["domain_B"].dtype == np.int32
    )
    for row, m, d in zip(
      batch["tokens_BxL"], batch["mask_BxL"], batch["domain_B"], strict=True
    ):
      rows[int(d)].append(row)
      masks[int(d)].append(m)
  for k, name in enumerate(texts):
    got_BxL, m_BxL = np.array(rows[k]), np.array(masks[k])
    np.testing.assert_array_equal(got_BxL == tok.PAD_ID, ~m_BxL)
    assert np.all(m_BxL[:, 0])  # padding only on the right
    assert np.all(m_BxL[:, :-1] >= m_BxL[:, 1:])
    if packing == "pack":
      assert np.all(m_BxL)  # packed rows are always full
    # Every document of the domain once per epoch, in order, nothing else.
    stream = got_BxL[m_BxL]
    docs = tok.split_documents(stream)
    n = len(texts[name])
    full = int(np.sum(stream == tok.EOS_ID)) // n  # complete epochs
    assert full >= 2, "the test should span several epochs"
    for e in range(full):
      assert sorted(docs[e * n : (e + 1) * n]) == sorted(texts[name])
    # The exact order and row split match the documented construction.
    want = _epoch_stream(
      [tok.encode(t) for t in texts[name]], k, 7, 0, full + 1
    )
    ref_tokens, ref_mask = pack_documents(want, 12, packing)
    np.testing.assert_array_equal(got_BxL, ref_tokens[: len(got_BxL)])
    np.testing.assert_array_equal(m_BxL, ref_mask[: len(got_BxL)])


def test_group_by_domain_and_lazy_sources_agree():
  records = [
    {"text": f"doc{i}".encode(), "domain": np.int64(i % 3)} for i in range(10)
  ]
  groups = group_by_domain(records, names=["x", "y", "z"])
  assert [g.name for g in groups] == ["x", "y", "z"]
  assert [len(g) for g in groups] == [4, 3, 3]
  assert [tok.decode(groups[1][j]) for j in range(3)] == [
    b"doc1",
    b"doc4",
    b"doc7",
  ]
  lazy = group_by_domain(records, names=["x", "y", "z"], in_memory=False)
  for g, h in zip(groups, lazy, strict=True):
    for j in range(len(g)):
      np.testing.assert_array_equal(g[j], h[j])
  assert [g.name for g in group_by_domain(records)] == ["0", "1", "2"]
  with pytest.raises(
    KeyError, match="no field 'domain'; its fields are 'text'"
  ):
    group_by_domain([{"text": b"a"}])
  with pytest.raises(ValueError, match=r"label 2 has no name; names has 2"):
    group_by_domain(records, names=["x", "y"])
  with pytest.raises(KeyError, match="no field 'body'"):
    DomainSource("d", [{"text": b"a"}], text_key="body")


def test_pipeline_config_presets_and_errors():
  for profile in ("smoke", "book", "paper"):
    cfg = pipeline.pipeline(profile)
    assert cfg.generic_batch_size == cfg.batch_size * cfg.downsampling
  for profile in ("smoke", "book", "paper"):
    # The step reads tokens[:, :-1]: rows are one longer than the context.
    assert (
      pipeline.pipeline(profile).seq_len == lm.lm_model(profile).max_len + 1
    )
  with pytest.raises(ConfigError, match="packing = 'zip' is invalid"):
    pipeline.pipeline("smoke", packing="zip")
  with pytest.raises(ConfigError, match="seq_len = 1 is invalid"):
    pipeline.pipeline("smoke", seq_len=1)
  with pytest.raises(ConfigError, match="unknown profile 'big'"):
    pipeline.pipeline("big")


def test_mock_tfds_text_and_image_sets_feed_the_sampler_offline():
  from dataweights.data import online

  mock = dict(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE)
  with tfds.testing.mock_data(**mock):
    (lm1b,) = online.tfds_domains("lm1b", split="train")
    raw = tfds.data_source("lm1b", split="train")
    assert len(lm1b) == len(raw) == 24
    assert tok.decode(lm1b[5]) == tok.to_bytes(raw[5]["text"])
    s = MixtureSampler([lm1b], batch_size=3, seq_len=20, seed=0)
    assert s.next_batch()["tokens_BxL"].shape == (3, 20)

    digits = online.tfds_domains("mnist", domain_key="label")
    raw = tfds.data_source("mnist", split="train")
    labels = np.array([int(raw[i]["label"]) for i in range(len(raw))])
    assert [d.name for d in digits] == [str(v) for v in np.unique(labels)]
    first = digits[0]
    i = int(np.flatnonzero(labels == int(first.name))[0])
    np.testing.assert_array_equal(first[0][1:-1], raw[i]["image"].reshape(-1))
    s = MixtureSampler(digits, batch_size=4, seq_len=28 * 28 + 2, packing="pad")
    assert s.next_batch()["mask_BxL"].all()  # one whole image per row

    with pytest.raises(
      ValueError,
      match="text_key = 'body' is not a field of 'mnist'; its fields are 'image', 'label'",
    ):
      online.tfds_domains("mnist", text_key="body")
    with pytest.raises(ValueError, match="max_examples = 0 is invalid"):
      online.tfds_domains("lm1b", max_examples=0)
    (few,) = online.tfds_domains("lm1b", max_examples=5)
    assert len(few) == 5


def test_unknown_tfds_name_raises_with_close_matches():
  from dataweights.data import online

  with pytest.raises(
    ValueError, match="unknown TFDS data set 'mnistt'.*close matches: .*mnist"
  ):
    online.tfds_domains("mnistt")


def test_prepared_domains_reads_the_builders_split(monkeypatch):
  # The project's builders, faked in memory: the glue is what is tested here
  # (tests of the builders themselves live with them).
  names = ("fiction", "news", "code")
  records = [
    {"text": f"t{i}".encode(), "domain": np.int64(i % 3)} for i in range(11)
  ]

  class FakeSource:
    def __len__(self):
      return len(records)

    def __getitem__(self, i):
      return records[i]

    def __getitems__(self, ids):
      return [records[i] for i in ids]

  def fake_indices(name, split, data_dir=None, domains=None):
    wanted = domains or names
    return {
      d: np.array(
        [i for i, r in enumerate(records) if r["domain"] == names.index(d)]
      )
      for d in wanted
    }

  monkeypatch.setattr(prepared, "load_source", lambda *a, **k: FakeSource())
  monkeypatch.setattr(prepared, "domain_names", lambda name: names)
  monkeypatch.setattr(prepared, "domain_indices", fake_indices)
  for in_memory in (True, False):
    ds = pipeline.prepared_domains(
      "train", domains=["code", "fiction"], in_memory=in_memory
    )
    assert [d.name for d in ds] == ["code", "fiction"]
    assert [tok.decode(ds[0][j]) for j in range(len(ds[0]))] == [
      b"t2",
      b"t5",
      b"t8",
    ]
    assert len(ds[1]) == 4
  with pytest.raises(ValueError, match=r"unknown domain\(s\) \['poetry'\]"):
    pipeline.prepared_domains("train", domains=["poetry"])
