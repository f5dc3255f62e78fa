"""Typed frozen configs with ``smoke`` / ``book`` / ``paper`` profiles.

Each area has its own module; this package re-exports the public factories.
"""

from dataweights.configs.base import (
  PROFILES,
  ConfigError,
  check_profile,
  from_profile,
)

__all__ = ["PROFILES", "ConfigError", "check_profile", "from_profile"]
