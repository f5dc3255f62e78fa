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
  check_in_range,
  check_int,
  check_profile,
  from_profile,
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
  """

  profile: str = "book"
  data_dir: str | None = None
  text_bytes_per_domain: int = 200_000
  text_max_doc_bytes: int = 4096
  text_max_group_bytes: int = 12_500
  text_split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
  seed: int = 0

  def __post_init__(self) -> None:
    check_profile(self.profile)
    check_int(self, "text_bytes_per_domain", "text_max_doc_bytes")
    check_int(self, "text_max_group_bytes")
    check_int(self, "seed", minimum=0)
    check_in_range(self, "text_max_doc_bytes", 64, 1 << 20)
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


PRESETS: dict[str, dict[str, Any]] = {
  "smoke": {
    "text_bytes_per_domain": 6_000,
    "text_max_doc_bytes": 1024,
    "text_max_group_bytes": 1_000,
  },
  "book": {},
  "paper": {"text_bytes_per_domain": 1_000_000, "text_max_group_bytes": 50_000},
}


def data(profile: str = "book", **overrides: Any) -> DataConfig:
  """The :class:`DataConfig` preset for ``profile`` with ``overrides``."""
  return from_profile(DataConfig, PRESETS, profile, overrides)
