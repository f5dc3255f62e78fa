"""Orbax checkpoints: round trip, keep-last-k, and clear errors on bad input."""

import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dataweights.checkpoint import (
  CheckpointError,
  CheckpointManager,
  tree_checksums,
)
from dataweights.train.state import abstract_state, init_train_state

# A restore that fails part-way (the corrupt-checkpoint tests) can leave a
# tensorstore read future whose callback fires after orbax closed its asyncio
# loop: "RuntimeError: Event loop is closed", raised in a callback and
# reported by pytest as unraisable. It is orbax/tensorstore clean-up noise;
# the CheckpointError itself was raised and checked.
pytestmark = pytest.mark.filterwarnings(
  "ignore::pytest.PytestUnraisableExceptionWarning"
)


def _state(width=3, extra=None, seed=0):
  model = nnx.Linear(4, width, rngs=nnx.Rngs(seed))
  state, _, sh = init_train_state(
    model,
    optax.adamw(1e-2),
    seed=seed,
    extra={"w_K": jnp.array([0.2, 0.3, 0.5]), "net": {"b": jnp.arange(4.0)}}
    if extra is None
    else extra,
  )
  return state, sh


def _equal(a, b):
  return all(
    np.array_equal(x, y) and x.dtype == y.dtype
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ) and jax.tree.structure(a) == jax.tree.structure(b)


CFG = {"model": {"width": 3}, "train": {"lr": 0.01, "checkpoint_every": 5}}


def test_round_trip_restores_everything_bitwise(tmp_path):
  state, sh = _state()
  state = state.replace(step=state.step + 7)
  with CheckpointManager(tmp_path, keep=2) as mngr:
    mngr.save(
      7,
      state,
      data_state={"pos": 11, "rng": [1, 2]},
      history={"rows": [{"step": 7, "loss": 1.5}]},
      config=CFG,
    )
  fresh, _ = _state(seed=1)  # other values, same layout
  with CheckpointManager(tmp_path, keep=2) as mngr:
    r = mngr.restore(target=abstract_state(fresh, sh), config=CFG)
  assert r.step == 7 and int(r.state.step) == 7
  assert _equal(r.state, state)
  assert r.data_state == {"pos": 11, "rng": [1, 2]}
  assert r.history["rows"][0]["loss"] == 1.5
  leaf = jax.tree.leaves(r.state.params)[0]
  assert leaf.sharding == jax.tree.leaves(sh.params)[0]


def test_keeps_last_k(tmp_path):
  state, _ = _state()
  with CheckpointManager(tmp_path, keep=2) as mngr:
    for s in (1, 2, 3):
      mngr.save(s, state)
      mngr.wait()
    assert mngr.steps() == [2, 3]
    assert mngr.latest_step() == 3


def test_no_checkpoint_and_unknown_step_raise(tmp_path):
  state, sh = _state()
  with CheckpointManager(tmp_path) as mngr:
    with pytest.raises(CheckpointError, match="no checkpoint found"):
      mngr.restore(target=abstract_state(state, sh))
    mngr.save(1, state)
    mngr.wait()
    with pytest.raises(CheckpointError, match=r"no checkpoint step 5.*\[1\]"):
      mngr.restore(5, target=abstract_state(state, sh))


@pytest.fixture
def saved(tmp_path):
  state, sh = _state()
  with CheckpointManager(tmp_path) as mngr:
    mngr.save(3, state, data_state={"pos": 1}, config=CFG)
  return tmp_path, state, sh


def _array_files(step_dir: Path):
  """The files holding array data (OCDBT data files), largest first."""
  files = [
    p
    for p in (step_dir / "state").rglob("*")
    if p.is_file() and p.parent.name == "d"
  ]
  assert files, f"no array data files under {step_dir}"
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def test_missing_array_files_raise(saved):
  path, state, sh = saved
  for f in _array_files(path / "3"):
    f.unlink()
  with CheckpointManager(path) as mngr:
    with pytest.raises(CheckpointError, match="step 3 .*missing or corrupt"):
      mngr.restore(target=abstract_state(state, sh))


def test_missing_metadata_raises(saved):
  path, state, sh = saved
  for f in (path / "3" / "host").rglob("*"):
    if f.is_file():
      f.unlink()
  with CheckpointManager(path) as mngr:
    with pytest.raises(CheckpointError, match="missing or corrupt.*metadata"):
      mngr.restore(target=abstract_state(state, sh))


def test_truncated_array_file_raises(saved):
  path, state, sh = saved
  # Truncate every data file: OCDBT keeps per-process files that restore may
  # not read after the merge, and the largest file is not unique (equal
  # sizes tie), so truncating only one made this test depend on file order.
  for big in _array_files(path / "3"):
    with open(big, "r+b") as f:
      f.truncate(big.stat().st_size // 2)
  with CheckpointManager(path) as mngr:
    with pytest.raises(CheckpointError, match="step 3 .*(missing or )?corrupt"):
      mngr.restore(target=abstract_state(state, sh))


def test_flipped_bytes_are_caught_by_checksums(saved):
  path, state, sh = saved
  # One byte changed in the middle of every array data file: tensorstore may
  # or may not notice; either way restore must fail, never return garbage.
  for f in _array_files(path / "3"):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
  with CheckpointManager(path) as mngr:
    with pytest.raises(CheckpointError, match="corrupt"):
      mngr.restore(target=abstract_state(state, sh))


def test_wrong_shapes_raise_naming_the_array(saved):
  path, _, _ = saved
  other, sh = _state(width=5)
  with CheckpointManager(path) as mngr:
    with pytest.raises(
      CheckpointError, match=r"does not fit.*kernel.*\[4, 3\]"
    ):
      mngr.restore(target=abstract_state(other, sh))


def test_wrong_tree_structure_raises(saved):
  path, _, _ = saved
  other, sh = _state(extra={"w_K": jnp.zeros(3), "v": jnp.zeros(2)})
  with CheckpointManager(path) as mngr:
    with pytest.raises(CheckpointError, match="missing in the checkpoint.*v"):
      mngr.restore(target=abstract_state(other, sh))


def test_wrong_config_raises_naming_the_field(saved):
  path, state, sh = saved
  cfg = {"model": {"width": 3}, "train": {"lr": 0.02, "checkpoint_every": 9}}
  with CheckpointManager(path) as mngr:
    with pytest.raises(CheckpointError, match=r"train\.lr: checkpoint 0.01"):
      mngr.restore(target=abstract_state(state, sh), config=cfg)
    # A field declared mutable may differ.
    with pytest.raises(CheckpointError) as e:
      mngr.restore(
        target=abstract_state(state, sh),
        config=cfg,
        ignore_config=["train.checkpoint_every"],
      )
    assert "checkpoint_every" not in str(e.value)
    r = mngr.restore(
      target=abstract_state(state, sh),
      config={**cfg, "train": {**CFG["train"], "checkpoint_every": 9}},
      ignore_config=["train.checkpoint_every"],
    )
    assert r.step == 3


def test_unjsonable_data_state_raises(tmp_path):
  state, _ = _state()
  with CheckpointManager(tmp_path) as mngr:
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
      mngr.save(1, state, data_state={"obj": object()})


def test_incomplete_save_is_invisible(saved):
  # orbax writes to a temporary folder and renames it when complete: a crash
  # mid-save leaves only such a folder, which must not count as a step.
  path, state, sh = saved
  tmp = path / "5.orbax-checkpoint-tmp-123"
  tmp.mkdir()
  (tmp / "junk").write_text("partial")
  with CheckpointManager(path) as mngr:
    assert mngr.steps() == [3]
    assert mngr.restore(target=abstract_state(state, sh)).step == 3
  assert os.path.isdir(path / "3")


def test_checksum_mismatch_raises(saved):
  # Silent corruption that the storage layer cannot see (e.g. a bit flip
  # before compression) shows up as a checksum mismatch.
  import json

  path, state, sh = saved
  (host,) = [
    p
    for p in (path / "3" / "host").rglob("*")
    if p.is_file() and "checksums" in p.read_text()
  ]
  meta = json.loads(host.read_text())
  key = sorted(k for k in meta["checksums"] if "kernel" in k)[0]
  meta["checksums"][key][0] += 1
  host.write_text(json.dumps(meta))
  with CheckpointManager(path) as mngr:
    with pytest.raises(CheckpointError, match="corrupt.*kernel.*checksums"):
      mngr.restore(target=abstract_state(state, sh))


# --- checksums: position-sensitive, per leaf --------------------------------


def _np_fmix32(h):
  h = h.astype(np.uint64)
  m = np.uint64(0xFFFFFFFF)
  h ^= h >> np.uint64(16)
  h = (h * np.uint64(0x85EBCA6B)) & m
  h ^= h >> np.uint64(13)
  h = (h * np.uint64(0xC2B2AE35)) & m
  return h ^ (h >> np.uint64(16))


def _np_checksum(bits_N):
  """The documented checksum, in numpy (uint64 arithmetic masked to 32 bit)."""
  m = np.uint64(0xFFFFFFFF)
  pos = np.arange(bits_N.size, dtype=np.uint64)
  key = _np_fmix32((pos * np.uint64(0x9E3779B9) + np.uint64(0x7F4A7C15)) & m)
  h1 = _np_fmix32(bits_N.astype(np.uint64) ^ key)
  h2 = _np_fmix32((h1 + np.uint64(0x3C6EF372)) & m)
  return [int(h1.sum() & m), int(h2.sum() & m)]


def test_checksums_match_a_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 5)).astype(np.float32)
  i8 = rng.integers(-128, 128, size=9).astype(np.int8)
  b = rng.uniform(size=11) < 0.5
  tree = {"x": jnp.asarray(x), "i8": jnp.asarray(i8), "b": jnp.asarray(b)}
  got = tree_checksums(tree)
  assert got == {
    "x": _np_checksum(x.reshape(-1).view(np.uint32)),
    "i8": _np_checksum(i8.view(np.uint8)),
    "b": _np_checksum(b.astype(np.uint32)),
  }
  # The same with x64 on (sums still wrap at 32 bits): a checkpoint saved
  # in one mode restores in the other.
  with jax.enable_x64(True):
    assert tree_checksums(tree) == got
  # 8-byte values: the high 32 bits hashed into the low ones.
  x64 = rng.normal(size=13)
  lo, hi = x64.view(np.uint32).reshape(-1, 2).T.astype(np.uint64)
  bits = lo ^ _np_fmix32((hi + np.uint64(0x6A09E667)) & np.uint64(0xFFFFFFFF))
  with jax.enable_x64(True):
    assert tree_checksums({"x": jnp.asarray(x64)}) == {"x": _np_checksum(bits)}


def _swapped(x, i, j):
  y = np.array(x)
  flat = y.reshape(-1)
  flat[i], flat[j] = flat[j], flat[i]
  return y


@pytest.mark.parametrize(
  "dtype", ["float32", "bfloat16", "int8", "int32", "bool", "float64"]
)
def test_checksums_see_values_swapped_within_a_leaf(dtype):
  with jax.enable_x64(dtype == "float64"):
    _check_swaps_within_a_leaf(dtype)


def _check_swaps_within_a_leaf(dtype):
  rng = np.random.default_rng(1)
  if dtype == "bool":
    x = rng.uniform(size=1024) < 0.5
  elif dtype.startswith("int"):
    x = rng.integers(-100, 100, size=1024).astype(dtype)
  else:
    x = jnp.asarray(rng.normal(size=1024), dtype)
  base = tree_checksums({"a": jnp.asarray(x)})["a"]
  pairs = [tuple(rng.choice(1024, 2, replace=False)) for _ in range(200)]
  pairs = [(i, j) for i, j in pairs if np.asarray(x)[i] != np.asarray(x)[j]]
  assert len(pairs) > 50
  for i, j in pairs:
    got = tree_checksums({"a": jnp.asarray(_swapped(x, i, j))})["a"]
    assert got[0] != base[0] and got[1] != base[1], (dtype, i, j)


def test_checksums_see_a_swap_that_a_position_weighted_sum_misses():
  # 1.0 is 0x3F800000 = 127 * 2**23: moving it by 512 positions changes
  # Σ bits * position by 127 * 2**32, nothing modulo 2**32.
  x = np.zeros(1024, np.float32)
  x[:8] = 1.0
  y = _swapped(x, 3, 3 + 512)
  assert tree_checksums({"a": jnp.asarray(x)}) != tree_checksums(
    {"a": jnp.asarray(y)}
  )


def _restore_with_arrays_of(tmp_path, state, other, sh):
  """Saves ``state`` and ``other``, then puts the arrays of ``other``
  under the metadata (checksums) of ``state`` and restores: what a
  corruption that keeps every file readable looks like."""
  for name, s in (("good", state), ("bad", other)):
    with CheckpointManager(tmp_path / name) as mngr:
      mngr.save(3, s)
  shutil.rmtree(tmp_path / "good" / "3" / "state")
  shutil.copytree(
    tmp_path / "bad" / "3" / "state", tmp_path / "good" / "3" / "state"
  )
  with CheckpointManager(tmp_path / "good") as mngr:
    return mngr.restore(target=abstract_state(state, sh))


SWAP_EXTRA = {
  "u_K": jnp.array([0.1, 0.1, 0.8]),
  "w_K": jnp.array([0.2, 0.3, 0.5]),
}


def test_transplanted_identical_arrays_restore(tmp_path):
  # Control for the corruption tests below: the transplant itself is fine.
  state, sh = _state(extra=SWAP_EXTRA)
  r = _restore_with_arrays_of(tmp_path, state, state, sh)
  assert _equal(r.state, state)


@pytest.mark.parametrize("where", ["params", "extra"])
def test_values_swapped_within_a_leaf_are_corruption(tmp_path, where):
  state, sh = _state(extra=SWAP_EXTRA)
  if where == "params":
    other = state.replace(
      params=jax.tree_util.tree_map_with_path(
        lambda p, x: (
          _swapped(x, 0, 5) if "kernel" in jax.tree_util.keystr(p) else x
        ),
        state.params,
      )
    )
    name = "kernel"
  else:
    other = state.replace(
      extra={**state.extra, "w_K": jnp.array([0.5, 0.3, 0.2])}
    )
    name = "w_K"
  with pytest.raises(
    CheckpointError, match=f"corrupt.*{name}.*do not match the checksums"
  ):
    _restore_with_arrays_of(tmp_path, state, other, sh)


def test_two_swapped_leaves_of_one_shape_are_corruption(tmp_path):
  state, sh = _state(extra=SWAP_EXTRA)
  other = state.replace(
    extra={"u_K": state.extra["w_K"], "w_K": state.extra["u_K"]}
  )
  with pytest.raises(
    CheckpointError, match=r"corrupt.*\['extra/u_K', 'extra/w_K'\]"
  ):
    _restore_with_arrays_of(tmp_path, state, other, sh)
