"""Shared machinery for typed, frozen experiment configs with profiles.

Every config is a ``@dataclasses.dataclass(frozen=True, slots=True)`` whose
``__post_init__`` calls the checks below, and every area exposes a factory
``name(profile="book", **overrides)`` built with :func:`from_profile`.

Profiles:
  * ``smoke``: seconds on a laptop CPU; used by unit tests.
  * ``book``:  the published CPU run (what the committed chapters show).
  * ``paper``: paper scale, meant for a GPU/TPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

PROFILES: tuple[str, ...] = ("smoke", "book", "paper")

class ConfigError(ValueError):
  """An invalid config value or an unknown profile."""


def check_profile(profile: str) -> str:
  """Returns ``profile`` if known, else raises :class:`ConfigError`."""
  if profile not in PROFILES:
    raise ConfigError(
      f"unknown profile {profile!r}; allowed profiles are {', '.join(PROFILES)}"
    )
  return profile


def check_positive(cfg: Any, *names: str, allow_zero: bool = False) -> None:
  """Raises if any named numeric field is not a finite number > 0 (or >= 0)."""
  for name in names:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
      bound = ">= 0" if allow_zero else "> 0"
      raise ConfigError(
        f"{type(cfg).__name__}.{name} = {value!r} is invalid; it must be a finite number {bound}"
      )


def check_int(cfg: Any, *names: str, minimum: int = 1) -> None:
  """Raises if any named field is not an int >= ``minimum``."""
  for name in names:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise ConfigError(
        f"{type(cfg).__name__}.{name} = {value!r} is invalid; it must be an integer >= {minimum}"
      )


def check_choice(cfg: Any, name: str, allowed: Iterable[Any]) -> None:
  """Raises if field ``name`` is not one of ``allowed``.

  The comparison is type-strict: ``0`` is not ``False`` and ``1`` is not
  ``True`` (a plain ``in`` would accept them).
  """
  allowed = tuple(allowed)
  value = getattr(cfg, name)
  if not any(isinstance(value, type(a)) and value == a for a in allowed):
    raise ConfigError(
      f"{type(cfg).__name__}.{name} = {value!r} is invalid; allowed values are "
      + ", ".join(repr(a) for a in allowed)
    )


def check_optional_str(cfg: Any, *names: str) -> None:
  """Raises if any named field is neither a ``str`` nor ``None``."""
  for name in names:
    value = getattr(cfg, name)
    if value is not None and not isinstance(value, str):
      raise ConfigError(
        f"{type(cfg).__name__}.{name} = {value!r} is invalid; it must be a str or None"
      )


def check_in_range(cfg: Any, name: str, low: float, high: float) -> None:
  """Raises if field ``name`` is not a finite number in ``[low, high]``."""
  value = getattr(cfg, name)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not ok or not math.isfinite(value) or not low <= value <= high:
    raise ConfigError(
      f"{type(cfg).__name__}.{name} = {value!r} is invalid; it must lie in [{low}, {high}]"
    )


def from_profile[C](
  cls: Callable[..., C],
  presets: Mapping[str, Mapping[str, Any]],
  profile: str,
  overrides: Mapping[str, Any],
) -> C:
  """Builds ``cls`` from the preset for ``profile`` plus keyword overrides.

  Args:
    cls: a frozen dataclass type.
    presets: maps every profile in :data:`PROFILES` to field values.
    profile: one of :data:`PROFILES`.
    overrides: field values that replace the preset's.

  Returns:
    The validated config (its ``__post_init__`` runs the checks).

  Raises:
    ConfigError: unknown profile or unknown field name.
  """
  check_profile(profile)
  fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(
      f"unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
      f"known fields are {', '.join(sorted(fields))}"
    )
  values = {**presets[profile], **overrides}
  if "profile" in fields:
    values.setdefault("profile", profile)
  return cls(**values)
