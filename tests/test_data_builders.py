"""TFDS builders on fixture archives: splits, uniform records, manifest
verification, corruption -> clear message + rebuild, prepare()."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dataweights.configs import data as data_config
from dataweights.data import build, prepare, prepared
from dataweights.data.sources import fetch, text
from fixtures.data_archives import make_archives


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("dwdata")
  pins = make_archives(root / "_wheels")
  opts = build.BuildOptions(
    config=data_config.data("smoke"), pins=pins, progress=False
  )
  for n in build.DATASETS:
    build.ensure_prepared(n, root, opts)
  return root, opts


def test_text_records_uniform_all_domains_no_overlap(built):
  root, _ = built
  texts, docs = {}, {}
  for split in build.SPLITS:
    src = prepared.load_source("dw_text_domains", split, root)
    r = src[0]
    assert set(r) == {"text", "domain", "doc_id"} and isinstance(
      r["text"], bytes
    )
    t = prepared.text_split(split, root)
    texts[split], docs[split] = set(t["text"]), set(t["doc_id_M"].tolist())
    assert set(t["domain_M"].tolist()) == set(range(len(text.DOMAIN_NAMES)))
  for a, b in [
    ("train", "validation"),
    ("train", "test"),
    ("validation", "test"),
  ]:
    assert not texts[a] & texts[b] and not docs[a] & docs[b]


def test_domain_indices(built):
  root, _ = built
  idx = prepared.domain_indices("dw_text_domains", "train", root)
  assert list(idx) == list(text.DOMAIN_NAMES)
  src = prepared.load_source("dw_text_domains", "train", root)
  assert sum(len(v) for v in idx.values()) == len(src)
  assert src[int(idx["legal"][0])]["domain"] == text.DOMAIN_NAMES.index(
    "legal"
  )
  with pytest.raises(ValueError, match="unknown domain.*poetry"):
    prepared.domain_indices("dw_text_domains", "train", root, ["poetry"])


def test_unknown_names_raise(built):
  root, _ = built
  with pytest.raises(ValueError, match="unknown data set 'dw_nope'"):
    prepared.load_source("dw_nope", "train", root)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    prepared.load_source("dw_digits", "dev", root)
  with pytest.raises(ValueError, match="unknown data set"):
    prepare.prepare(["dw_nope"], data_dir=str(root))


def test_digits_and_adult_from_builders(built):
  root, _ = built
  d = prepared.digits_arrays(root)
  n = sum(len(d[s]["y_M"]) for s in build.SPLITS)
  assert n == 400 and d["train"]["x_MxHxW"].dtype == np.uint8
  assert set(d["test"]["domain_M"].tolist()) == {0, 1}
  df = prepared.adult_table(root)
  # Every fixture row once, and the split column agrees with the records
  # stored under each split.
  assert len(df) == 400
  counts = [
    len(prepared.load_source("dw_adult", s, root)) for s in build.SPLITS
  ]
  assert all(counts) and sum(counts) == 400
  assert np.bincount(df["split"], minlength=3).tolist() == counts
  direct = fetch.read_member(
    root / "_wheels" / fetch.PINS["mglearn"].filename, "mglearn/data/adult.data"
  )
  from dataweights.data.sources import adult

  ref = adult.parse_adult(direct)
  assert df[list(adult.ADULT_COLUMNS)].equals(ref)


def test_truncated_artefact_is_reported_and_rebuilt(built, capsys):
  root, opts = built
  vdir = build.version_dir("dw_digits", root)
  rec = next(vdir.glob("*train.array_record*"))
  rec.write_bytes(rec.read_bytes()[:1000])
  problems = build.verify("dw_digits", root)
  assert problems and "truncated" in problems[0]
  s = build.ensure_prepared("dw_digits", root, opts)
  assert s["rebuilt"] and "failed verification" in capsys.readouterr().err
  assert build.verify("dw_digits", root) == []


def test_missing_manifest_means_rebuild_and_prepare_is_idempotent(built):
  root, opts = built
  (build.version_dir("dw_digits", root) / build.MANIFEST).unlink()
  assert "missing" in build.verify("dw_digits", root)[0]
  s = build.ensure_prepared("dw_digits", root, opts)
  assert s["rebuilt"]
  again = build.ensure_prepared("dw_digits", root, opts, check_config=True)
  assert not again["rebuilt"]
  other = build.BuildOptions(
    config=data_config.data("smoke", seed=1), pins=opts.pins, progress=False
  )
  assert build.verify(
    "dw_digits", root, fingerprint=build._fingerprint(other)
  ), "a different config must not verify"


def test_prepare_main_list(capsys):
  assert prepare.main(["--list"]) == 0
  assert capsys.readouterr().out.split() == list(prepare.DATASETS)


def test_manifest_records_every_file(built):
  root, _ = built
  vdir = build.version_dir("dw_text_domains", root)
  man = json.loads((vdir / build.MANIFEST).read_text())
  on_disk = {str(p.relative_to(vdir)) for p in vdir.rglob("*") if p.is_file()}
  assert set(man["files"]) == on_disk - {build.MANIFEST}
  shutil.copy(vdir / "features.json", vdir / "stray.json")
  assert any(
    "not in the manifest" in p for p in build.verify("dw_text_domains", root)
  )
  (vdir / "stray.json").unlink()
