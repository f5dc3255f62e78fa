"""Config of the offline real-data layer (``dataweights data prepare``).

``data(profile="book", **overrides)`` returns a frozen :class:`DataConfig`.
The prepared data sets on disk are the ``book`` preset (the one CI and the
published chapters use); ``smoke`` is for unit tests on small fixtures;
``paper`` prepares more text per domain.

Changing any field except ``data_dir`` changes the prepared data: its
fingerprint (:meth:`DataConfig.fingerprint`) is stored in each data set's
manifest and ``prepare`` rebuilds on a mismatch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dataweights.configs.base import (
  ConfigError,
  check_choice,
  check_in_range,
  check_int,
  check_profile,
  from_profile,
)

# The sources of ``dw_instructions`` (configs sit below the data layer, so
# the names are listed here once for every config that takes a source;
# tests check they equal ``dataweights.data.sources.instructions.SOURCE_NAMES``).
INSTRUCTION_SOURCES: tuple[str, ...] = (
  "chat",
  "multilingual",
  "dialogue",
  "glossary",
  "scripture",
  "fiction",
  "encyclopaedic",
  "news",
)


@dataclasses.dataclass(frozen=True, slots=True)
class DataConfig:
  """How the offline data sets are built.

  Attributes:
    profile: the preset this config came from (smoke | book | paper).
    data_dir: data directory; ``None`` means ``$DATAWEIGHTS_DATA_DIR`` or
      ``~/.cache/dataweights/data``.
    text_bytes_per_domain: budget of normalised text per domain (all
      splits); a source with less text gives all it has.
    text_max_doc_bytes: long documents are cut into chunks of at most this
      many bytes, at word boundaries.
    text_max_group_bytes: at most this many bytes from one document group
      (an article, an episode, a file), for diversity and balanced splits.
    text_split_fractions: train, validation, test byte fractions (by group).
    seed: subsampling and split seed.
    instr_pairs_per_source: at most this many prompt/response pairs per
      instruction source (``dw_instructions``, all splits).
    instr_max_prompt_bytes: prompts are cut at a word boundary to this.
    instr_max_response_bytes: responses likewise.
    instr_max_pairs_per_group: at most this many pairs from one document
      group (a conversation, an episode, a chapter), for diversity.
  """

  profile: str = "book"
  data_dir: str | None = None
  text_bytes_per_domain: int = 200_000
  text_max_doc_bytes: int = 4096
  text_max_group_bytes: int = 12_500
  text_split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
  seed: int = 0
  instr_pairs_per_source: int = 4000
  instr_max_prompt_bytes: int = 256
  instr_max_response_bytes: int = 256
  instr_max_pairs_per_group: int = 40

  def __post_init__(self) -> None:
    check_profile(self.profile)
    check_int(self, "text_bytes_per_domain", "text_max_doc_bytes")
    check_int(self, "text_max_group_bytes")
    check_int(self, "seed", minimum=0)
    check_in_range(self, "text_max_doc_bytes", 64, 1 << 20)
    check_int(self, "instr_pairs_per_source", "instr_max_pairs_per_group")
    check_int(
      self, "instr_max_prompt_bytes", "instr_max_response_bytes", minimum=16
    )
    fr = self.text_split_fractions
    if (
      not isinstance(fr, tuple)
      or len(fr) != 3
      or not all(
        isinstance(f, (int, float))
        and not isinstance(f, bool)
        and math.isfinite(f)
        and f > 0
        for f in fr
      )
      or abs(sum(fr) - 1) > 1e-9
    ):
      raise ConfigError(
        f"DataConfig.text_split_fractions = {fr!r} is invalid; it must be "
        "a tuple of 3 positive numbers summing to 1"
      )
    if self.data_dir is not None and not isinstance(self.data_dir, str):
      raise ConfigError(
        f"DataConfig.data_dir = {self.data_dir!r} is invalid; it must be a "
        "str or None"
      )

  def fingerprint(self) -> dict[str, Any]:
    """The fields that determine the prepared bytes (not where they live)."""
    return {
      "text_bytes_per_domain": self.text_bytes_per_domain,
      "text_max_doc_bytes": self.text_max_doc_bytes,
      "text_max_group_bytes": self.text_max_group_bytes,
      "text_split_fractions": list(self.text_split_fractions),
      "seed": self.seed,
    }

  def instruction_fingerprint(self) -> dict[str, Any]:
    """The fields that determine the ``dw_instructions`` bytes (the split
    fractions and the seed are shared with the text domains)."""
    return {
      "instr_pairs_per_source": self.instr_pairs_per_source,
      "instr_max_prompt_bytes": self.instr_max_prompt_bytes,
      "instr_max_response_bytes": self.instr_max_response_bytes,
      "instr_max_pairs_per_group": self.instr_max_pairs_per_group,
      "text_split_fractions": list(self.text_split_fractions),
      "seed": self.seed,
    }


PRESETS: dict[str, dict[str, Any]] = {
  "smoke": {
    "text_bytes_per_domain": 6_000,
    "text_max_doc_bytes": 1024,
    "text_max_group_bytes": 1_000,
    "instr_pairs_per_source": 60,
    "instr_max_prompt_bytes": 64,
    "instr_max_response_bytes": 64,
    "instr_max_pairs_per_group": 4,
  },
  "book": {},
  "paper": {
    "text_bytes_per_domain": 1_000_000,
    "text_max_group_bytes": 50_000,
    "instr_pairs_per_source": 20_000,
    "instr_max_pairs_per_group": 200,
  },
}


def data(profile: str = "book", **overrides: Any) -> DataConfig:
  """The :class:`DataConfig` preset for ``profile`` with ``overrides``."""
  return from_profile(DataConfig, PRESETS, profile, overrides)


# --- the text pipeline: shapes and seeds of the batches ---------------------

PACKINGS: tuple[str, ...] = ("pack", "pad")


@dataclasses.dataclass(frozen=True, slots=True)
class PipelineConfig:
  """Shapes and seeds of the text pipeline.

  Attributes:
    profile: the preset this config came from (smoke | book | paper).
    seq_len: L, tokens per row: the model context plus one (the step reads
      ``tokens_BxL[:, :-1]`` and predicts ``tokens_BxL[:, 1:]``).
    batch_size: B, rows per training step.
    downsampling: the online-filtering big batch has ``G = B * downsampling``
      generic rows per step, scored and filtered down to B.
    specific_batch_size: rows of the specific (target) batch per step.
    packing: ``"pack"`` (fill rows with consecutive documents) or ``"pad"``
      (one document piece per row, right-padded).
    seed: seed of the domain draws and of the per-epoch permutations.
  """

  profile: str = "book"
  seq_len: int = 129
  batch_size: int = 16
  downsampling: int = 8
  specific_batch_size: int = 16
  packing: str = "pack"
  seed: int = 0

  def __post_init__(self):
    check_profile(self.profile)
    check_int(self, "seq_len", minimum=2)
    check_int(self, "batch_size", "downsampling", "specific_batch_size")
    check_int(self, "seed", minimum=0)
    check_choice(self, "packing", PACKINGS)

  @property
  def generic_batch_size(self) -> int:
    """G = B * downsampling: rows of the online-filtering big batch."""
    return self.batch_size * self.downsampling

  def to_dict(self) -> dict[str, Any]:
    """The fields as a JSON-able dict."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# seq_len = the LM's max_len + 1 (configs/lm.py: 32, 128, 256); batch sizes
# follow configs/train.py; paper: Grangier et al. (batch 128, length 256,
# downsampling 32).
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(
    seq_len=33, batch_size=4, downsampling=4, specific_batch_size=4
  ),
  "book": dict(
    seq_len=129, batch_size=16, downsampling=8, specific_batch_size=16
  ),
  "paper": dict(
    seq_len=257, batch_size=128, downsampling=32, specific_batch_size=128
  ),
}


def pipeline(profile: str = "book", **overrides: Any) -> PipelineConfig:
  """The pipeline config for ``profile`` with ``overrides`` applied.

  Raises:
    ConfigError: unknown profile, unknown field or invalid value.
  """
  return from_profile(PipelineConfig, PIPELINE_PRESETS, profile, overrides)
