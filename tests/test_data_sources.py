"""Sources, fetch/hash logic, normalisation, corruptions, digits, Adult.

Unit tests run on small fixture archives (tests/fixtures/data_archives.py)
with the real layout. ``test_real_*`` run on the real prepared data when
it exists (CI prepares it first) and are skipped otherwise.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from dataweights.data import prepared
from dataweights.data.sources import adult, corrupt, digits, fetch
from dataweights.data.sources import text as text_src
from fixtures.data_archives import make_archives


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
  src = tmp_path_factory.mktemp("fixture_archives")
  return src, make_archives(src)


@pytest.fixture
def data_dir(tmp_path, archives):
  src, pins = archives
  (tmp_path / "_wheels").mkdir()
  for p in pins.values():
    shutil.copy(src / p.filename, tmp_path / "_wheels" / p.filename)
  return tmp_path, pins


# ------------------------------------------------------------------ fetch --


def test_data_dir_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv(fetch.ENV_VAR, str(tmp_path / "env"))
  assert fetch.data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
  assert fetch.data_dir() == tmp_path / "env"
  monkeypatch.delenv(fetch.ENV_VAR)
  assert (
    fetch.data_dir() == pathlib.Path("~/.cache/dataweights/data").expanduser()
  )


def test_fetch_uses_verified_cache_without_downloading(data_dir, monkeypatch):
  root, pins = data_dir
  monkeypatch.setattr(fetch, "_pip_download", _no_download)
  path = fetch.fetch("mglearn", root, pins=pins)
  assert fetch.sha256_file(path) == pins["mglearn"].sha256


def _no_download(pin, dest):
  raise AssertionError(f"unexpected download of {pin.requirement}")


def test_fetch_redownloads_truncated_archive(data_dir, archives, monkeypatch):
  root, pins = data_dir
  src, _ = archives
  target = root / "_wheels" / pins["mglearn"].filename
  target.write_bytes(target.read_bytes()[:100])  # truncated
  calls = []

  def fake(pin, dest):
    calls.append(pin.name)
    shutil.copy(src / pin.filename, dest / pin.filename)

  monkeypatch.setattr(fetch, "_pip_download", fake)
  path = fetch.fetch("mglearn", root, pins=pins)
  assert calls == ["mglearn"]
  assert fetch.sha256_file(path) == pins["mglearn"].sha256


def test_fetch_rejects_wrong_hash_and_keeps_cache_clean(data_dir, monkeypatch):
  root, pins = data_dir
  (root / "_wheels" / pins["lice"].filename).unlink()

  def fake(pin, dest):
    (dest / pin.filename).write_bytes(b"not the pinned archive")

  monkeypatch.setattr(fetch, "_pip_download", fake)
  with pytest.raises(fetch.FetchError, match="sha256 mismatch"):
    fetch.fetch("lice", root, pins=pins)
  assert not (root / "_wheels" / pins["lice"].filename).exists()


def test_fetch_unknown_package_and_member(data_dir):
  root, pins = data_dir
  with pytest.raises(KeyError, match="unknown pinned package 'nope'"):
    fetch.fetch("nope", root, pins=pins)
  path = fetch.fetch("mglearn", root, pins=pins)
  with pytest.raises(fetch.FetchError, match="no member"):
    fetch.read_member(path, "missing.txt")


def test_pins_are_complete():
  for p in fetch.PINS.values():
    assert len(p.sha256) == 64 and p.version in p.filename.replace("_", "-")
    assert p.licence


# -------------------------------------------------------------- sources --


def test_normalize_removes_case_punctuation_digits_accents():
  assert (
    text_src.normalize("Héllo,  World! 42 -- it's\nOK") == "hello world it s ok"
  )
  assert text_src.normalize("ДОБРО") == ""


def test_all_domains_read_from_fixtures(data_dir):
  root, pins = data_dir
  for dom in text_src.TEXT_DOMAINS:
    ex = text_src.domain_examples(
      dom.name,
      fetch.fetch(dom.package, root, pins=pins),
      bytes_per_domain=3000,
      max_doc_bytes=500,
      max_group_bytes=600,
    )
    assert sum(len(e.text) for e in ex) >= 3000 - 500, dom.name
    for e in ex:
      assert len(e.text) <= 500 and set(e.text) <= set(
        "abcdefghijklmnopqrstuvwxyz "
      )
    split = text_src.split_groups(ex, seed=0)
    groups = [
      {e.group for e in split[s]} for s in ("train", "validation", "test")
    ]
    assert all(groups), dom.name
    assert not (
      groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2]
    )


def test_wikitext_is_stripped_and_redirects_skipped(data_dir):
  root, pins = data_dir
  docs = text_src.DOMAINS["encyclopaedic"].reader(
    fetch.fetch("gensim", root, pins=pins)
  )
  assert len(docs) == 10  # the redirect page is skipped
  text = text_src.strip_wikitext(docs[0][1])
  assert "Infobox" not in text and "[[" not in text and "cite" not in text
  assert "a thing" in text


def test_unknown_domain_and_bad_split_raise():
  with pytest.raises(KeyError, match="unknown text domain 'poetry'"):
    text_src.get_domain("poetry")
  ex = [
    text_src.TextExample("a b", "news", "g1"),
    text_src.TextExample("c", "news", "g2"),
  ]
  with pytest.raises(ValueError, match=">= 3 document groups"):
    text_src.split_groups(ex)
  with pytest.raises(ValueError, match="sum to 1"):
    text_src.split_groups(ex, (0.5, 0.5, 0.5))


def test_chunk_respects_limit_and_keeps_words():
  text = "alpha beta gamma delta " * 50
  pieces = text_src.chunk(text.strip(), 40)
  assert all(len(p) <= 40 for p in pieces)
  assert " ".join(pieces).split() == text.split()


# ------------------------------------------------------------ corruptions --

TEXT = " ".join(f"w{i % 37}" for i in range(2000))


def test_shuffle_keeps_words_and_is_seeded():
  a = corrupt.shuffle_words(TEXT, 1)
  assert sorted(a.split()) == sorted(TEXT.split()) and a != TEXT
  assert a == corrupt.shuffle_words(TEXT, 1) != corrupt.shuffle_words(TEXT, 2)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_substitute_rate(p):
  text = "abcdefghij " * 2000
  out = corrupt.substitute_chars(text, p, seed=0)
  assert len(out) == len(text)
  idx = [i for i, c in enumerate(text) if c != " "]
  rate = np.mean([out[i] != text[i] for i in idx])
  # 20000 Bernoulli(p) draws: standard error <= 0.0035.
  assert abs(rate - p) < 0.015
  assert all(out[i] == " " for i, c in enumerate(text) if c == " ")


def test_substitute_replaces_with_a_different_letter():
  # p = 1 changes every non-space character (a draw that may return the
  # same letter would leave about 1 in 26 unchanged); p = 0 changes none.
  text = "abcdefghij klmnop " * 200
  out = corrupt.substitute_chars(text, 1.0, seed=0)
  assert all((o != t) == (t != " ") for o, t in zip(out, text, strict=True))
  assert set(out) <= set(corrupt.LETTERS + " ")
  assert corrupt.substitute_chars(text, 0.0, seed=0) == text


def test_splice_replaces_about_p_of_words():
  out = corrupt.splice_spans(TEXT, "zz " * 100, 0.2, seed=0, span_words=5)
  w = out.split()
  assert len(w) == len(TEXT.split())
  assert 0.1 < np.mean([x == "zz" for x in w]) <= 0.2 + 1e-9


def test_corrupt_texts_exact_fraction_and_errors():
  texts = [f"doc {i} words here" for i in range(50)]
  out, mask = corrupt.corrupt_texts(texts, "random", 0.2, seed=3)
  assert mask.sum() == 10
  assert all((o != t) == m for o, t, m in zip(out, texts, mask))
  with pytest.raises(ValueError, match="unknown corruption kind 'blur'"):
    corrupt.corrupt_texts(texts, "blur", 0.2)
  with pytest.raises(ValueError, match="donor"):
    corrupt.corrupt_texts(texts, "splice", 0.2)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    corrupt.corrupt_texts(texts, "shuffle", 1.5)


def test_corrupt_labels_flips_exactly_p_to_other_classes():
  y = np.arange(100) % 4
  out, mask = corrupt.corrupt_labels(y, 0.3, 4, seed=0)
  assert mask.sum() == 30
  assert np.all(out[mask] != y[mask]) and np.all(out[~mask] == y[~mask])
  assert out.min() >= 0 and out.max() < 4


def test_corrupt_responses_is_a_derangement_of_chosen():
  r = [f"answer {i}" for i in range(40)]
  out, mask = corrupt.corrupt_responses(r, 0.5, seed=0)
  assert mask.sum() == 20 and sorted(out) == sorted(r)


_DOCS = [
  f"doc {i} " + " ".join(f"w{j}" for j in range(i, i + 30)) for i in range(40)
]
# Every seeded corruption, as seed -> a hashable output (arrays as bytes).
SEEDED = {
  "shuffle_words": lambda s: corrupt.shuffle_words(TEXT, s),
  "substitute_chars": lambda s: corrupt.substitute_chars(TEXT, 0.2, s),
  "splice_spans": lambda s: corrupt.splice_spans(TEXT, "zz yy " * 50, 0.2, s),
  "random_letters": lambda s: corrupt.random_letters(TEXT, s),
  **{
    f"corrupt_texts[{kind}]": lambda s, kind=kind: repr(
      corrupt.corrupt_texts(_DOCS, kind, 0.5, s, donors=["zz yy xx"] * 3)
    )
    for kind in corrupt.TEXT_KINDS
  },
  "corrupt_labels": lambda s: repr(
    corrupt.corrupt_labels(np.arange(200) % 5, 0.3, 5, s)
  ),
  "corrupt_responses": lambda s: repr(
    corrupt.corrupt_responses([f"answer {i}" for i in range(40)], 0.5, s)
  ),
  "permute_pixels": lambda s: corrupt.permute_pixels(
    np.arange(3 * 8 * 8).reshape(3, 8, 8), s
  ).tobytes(),
  "gaussian_noise": lambda s: corrupt.gaussian_noise(
    np.zeros(100), 1.0, s
  ).tobytes(),
}


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_every_corruption_depends_on_its_seed_and_is_reproducible(name):
  fn = SEEDED[name]
  seeds = [0, 1, 2, 12345]
  outs = [fn(s) for s in seeds]
  assert len(set(outs)) == len(seeds), f"{name} gave equal outputs for seeds"
  assert [fn(s) for s in seeds] == outs, f"{name} is not reproducible"
  # A Generator is the same stream as its int seed, and it is consumed:
  # two calls with one Generator draw different corruptions.
  rng = np.random.default_rng(2)
  assert fn(rng) == outs[2]
  assert fn(rng) != outs[2], f"{name} restarts a Generator it is given"


def test_corrupt_texts_draws_each_document_independently():
  # One call corrupts many documents from one stream: identical inputs must
  # not all get the identical corruption.
  docs = [TEXT[:400]] * 12
  for kind in corrupt.TEXT_KINDS:
    out, mask = corrupt.corrupt_texts(
      docs, kind, 1.0, seed=0, donors=[TEXT[400:1200], TEXT[1200:]]
    )
    assert mask.all()
    assert len(set(out)) == len(docs), kind


def test_image_corruptions():
  x = np.arange(2 * 8 * 8).reshape(2, 8, 8)
  p = corrupt.permute_pixels(x, 0)
  assert np.array_equal(
    np.sort(p.reshape(2, -1), 1), np.sort(x.reshape(2, -1), 1)
  )
  # One permutation for every image (image 0 holds 0..63, so it spells the
  # permutation out), and not the identity.
  perm_P = p[0].reshape(-1)
  assert not np.array_equal(perm_P, np.arange(64))
  np.testing.assert_array_equal(p[1].reshape(-1), x[1].reshape(-1)[perm_P])
  g = corrupt.gaussian_noise(np.zeros((2000,)), 2.0, 0)
  assert g.dtype == np.float32
  # 2000 draws: the standard errors of mean and std are 0.045 and 0.032.
  assert abs(g.mean()) < 0.2 and abs(g.std() - 2.0) < 0.15
  c = corrupt.gaussian_noise(np.zeros((2000,)), 2.0, 0, clip=(-1.0, 1.0))
  np.testing.assert_array_equal(c, np.clip(g, -1.0, 1.0))
  with pytest.raises(ValueError, match="sigma = -1"):
    corrupt.gaussian_noise(np.zeros(3), -1, 0)


# ----------------------------------------------------------------- digits --


def test_mnist_to_uci_grid_oracles():
  full = np.full((1, 28, 28), 255, np.uint8)
  assert np.all(digits.mnist_to_uci_grid(full) == 16)
  blank = np.zeros((1, 28, 28), np.uint8)
  assert np.all(digits.mnist_to_uci_grid(blank) == 0)
  # A 20x4 bar: cropped and padded to 20x20, it becomes a 32x6.4 bar at
  # columns 12.8..19.2 of 32, i.e. 3 lit columns in blocks 3 and 4 each:
  # 4 rows x 3 columns = 12 per block, nothing elsewhere, wherever it was.
  for left in (2, 12, 20):
    bar = np.zeros((1, 28, 28), np.uint8)
    bar[0, 4:24, left : left + 4] = 255
    g = digits.mnist_to_uci_grid(bar)[0]
    assert np.all(g[:, 3:5] == 12) and g[:, [0, 1, 2, 5, 6, 7]].sum() == 0


def test_resize_bilinear_identity_and_constant():
  img = np.random.default_rng(0).random((5, 7))
  np.testing.assert_allclose(digits.resize_bilinear(img, 5, 7), img, atol=1e-12)
  np.testing.assert_allclose(digits.resize_bilinear(np.ones((3, 3)), 8, 8), 1.0)


def test_digits_examples_from_fixture(data_dir, monkeypatch):
  root, pins = data_dir
  monkeypatch.setattr(fetch, "PINS", pins)
  d = digits.digits_examples(root)
  assert d["mnist"]["x_MxHxW"].shape == (200, 8, 8)
  assert d["uci"]["x_MxHxW"].max() <= 16


# ------------------------------------------------------------------ adult --


def test_load_adult_direct_from_fixture(data_dir, monkeypatch):
  root, pins = data_dir
  monkeypatch.setattr(fetch, "PINS", pins)
  df = adult.read_adult(root)
  assert len(df) == 400
  df["split"] = adult.split_assignment(df["workclass"].to_numpy())
  d = adult.adult_arrays(df, domain_column="workclass", min_domain_size=100)
  # Private has ~240 of 400 rows; all other workclasses have < 100.
  assert d["domain_names"] == ["Private", adult.OTHER]
  x = d["train"]["x_MxP"]
  np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
  assert x.shape[1] == len(d["feature_names"])
  assert not any(f.startswith("workclass=") for f in d["feature_names"])
  n = sum(len(d[s]["y_M"]) for s in adult.SPLITS)
  assert n == 400
  with pytest.raises(ValueError, match="unknown domain_column 'colour'"):
    prepared.load_adult(root, domain_column="colour")


def test_split_assignment_stratified_and_seeded():
  strata = np.repeat(np.arange(3), 100)
  s = adult.split_assignment(strata)
  for k in range(3):
    assert np.bincount(s[strata == k], minlength=3).tolist() == [70, 15, 15]
  assert np.array_equal(s, adult.split_assignment(strata))


# ------------------------------------------------ real prepared data (CI) --


def _real_root():
  root = fetch.data_dir()
  man = root / "dw_text_domains" / "1.0.0" / "dw_manifest.json"
  if not man.exists():
    why = (
      f"real data not prepared in {root}; run `dataweights data prepare` "
      "(make test does) to enable this test"
    )
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(why)
    pytest.skip(why)
  return root


def test_real_text_domains_sizes_and_no_overlap():
  root = _real_root()
  from dataweights.data import build

  man = json.loads(
    (root / "dw_text_domains/1.0.0/dw_manifest.json").read_text()
  )
  budget = man["fingerprint"]["text_bytes_per_domain"]
  seen: dict[str, str] = {}
  sizes = {d: 0 for d in text_src.DOMAIN_NAMES}
  docs: dict[str, set] = {}
  for split in build.SPLITS:
    t = prepared.text_split(split, root)
    docs[split] = set(t["doc_id_M"].tolist())
    for text, dom in zip(t["text"], t["domain_M"]):
      assert seen.setdefault(text, split) == split, "text in two splits"
      sizes[text_src.DOMAIN_NAMES[dom]] += len(text)
  assert not (
    docs["train"] & docs["validation"] or docs["train"] & docs["test"]
  )
  for d, n in sizes.items():
    # Every domain is present; all but the small (source-limited, see the
    # sources docstring) reach the budget.
    small = {"legal": 90_000, "chat": 80_000, "noise_multilingual": 170_000}
    assert n >= small.get(d, 0.95 * budget), (d, n)
    assert n <= budget + man["fingerprint"]["text_max_doc_bytes"], (d, n)
