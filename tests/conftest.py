"""Test-wide settings: CPU only, Agg backend, strict rank promotion.

Multi-device tests live in ``tests/sharding/`` and run in their own pytest
process (the fake device count must be set before JAX starts).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("DATAWEIGHTS_SHARDING_RUN") == "1":
  # Must precede the first use of JAX in this process.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_ignore_collect(collection_path, config):
  # tests/sharding needs 8 fake devices set before JAX starts: its own process.
  if "sharding" in collection_path.parts and os.environ.get("DATAWEIGHTS_SHARDING_RUN") != "1":
    return True
  return None


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """A persistent XLA compilation cache for one test module.

  Loop tests build several trainers with the same config (as a resumed
  process would); XLA compiles are deterministic, so a cache hit only saves
  the 5-15 s compile of an identical program. Use it with
  ``pytestmark = pytest.mark.usefixtures("xla_cache")``.
  """
  keys = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update(keys[1], 0)
  jax.config.update(keys[2], 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


# Property-based tests (hypothesis): no example database (no .hypothesis/
# folder) and no deadline (timings on a shared machine are noise). The
# test_props_* files derandomize their own settings (tests/props.py), so CI
# runs the same cases every time; HYPOTHESIS_PROFILE=explore draws new
# random cases, 10x as many.
from hypothesis import settings  # noqa: E402

settings.register_profile("dataweights", database=None, deadline=None)
settings.register_profile("explore", database=None, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dataweights"))
