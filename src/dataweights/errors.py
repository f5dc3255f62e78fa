"""Error types shared across the library (one per kind of bad input).

Configs raise :class:`dataweights.configs.base.ConfigError`; the others live
here so that every layer can raise and catch the same class.
"""

from __future__ import annotations


class WeightsError(ValueError):
  """Domain or mixture weights that are not what is allowed (wrong length,
  negative, non-finite, not summing to one); the message names the bad value
  and what is allowed."""


class CheckpointError(ValueError):
  """A checkpoint (a training checkpoint or pretrained weights) that is
  missing, corrupt or does not fit the run; the message says what to do."""
