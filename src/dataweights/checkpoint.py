"""Checkpoints of the whole training state: a thin, strict orbax wrapper.

Each checkpoint step holds two orbax items:

* ``state``: the :class:`~dataweights.train.state.TrainState` pytree
  (parameters, optimiser state, step, RNG key, method state ``extra``),
  saved with ``ocp.args.StandardSave`` and restored with
  ``ocp.args.StandardRestore`` into an abstract target that carries the
  shardings, so a sharded run restores straight into its shards;
* ``host``: JSON with the data-iterator state (``sampler.get_state()``), the
  metric history, the run's configs, the tree layout (path, shape, dtype of
  every leaf) and a bit-exact checksum of every leaf.

Saves are atomic (orbax writes a temporary directory and renames it when
complete) and keep the last ``keep`` steps. Restore never falls back
silently: a missing, truncated or incompatible checkpoint (other tree,
shapes, dtypes or config) raises :class:`CheckpointError` saying what
differs. Each leaf's checksum is two wrapping uint32 sums of a hash of
every element's bits keyed by its position (see :func:`tree_checksums`):
exact, position-sensitive and independent of sharding.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# 2: position-keyed hashed checksums (1 summed raw bits, blind to swaps).
FORMAT_VERSION = 2
_STATE, _HOST = "state", "host"


# One CheckpointError for training checkpoints and pretrained weights alike.
from dataweights.errors import CheckpointError  # noqa: E402, F401


@dataclasses.dataclass(frozen=True)
class Restored:
  """What :meth:`CheckpointManager.restore` returns.

  Attributes:
    step: the checkpoint step.
    state: the restored state, placed with the target's shardings.
    data_state: the data-iterator state saved with it (or None).
    history: the metric-history dict saved with it (or None).
    config: the config dict saved with it (or None).
  """

  step: int
  state: Any
  data_state: Any
  history: Any
  config: Any


def _path_str(path) -> str:
  return "/".join(
    str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    for k in path
  )


def tree_layout(tree: Any) -> dict[str, list]:
  """``{path: [shape, dtype]}`` of every array leaf of ``tree``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    _path_str(p): [list(np.shape(x)), str(np.dtype(x.dtype))] for p, x in flat
  }


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


@jax.jit
def _leaf_checksums(leaves):
  out = []
  for x in leaves:
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
      bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 1:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    else:  # 8-byte types (x64 mode): hash the high half into the low one
      halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
      bits = halves[..., 0] ^ _fmix32(halves[..., 1] + jnp.uint32(0x6A09E667))
    pos = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    key = _fmix32(pos * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15))
    h1 = _fmix32(bits ^ key)
    h2 = _fmix32(h1 + jnp.uint32(0x3C6EF372))
    # dtype: with x64 on, jnp.sum would widen uint32 to uint64 (no wrap).
    u32 = jnp.uint32
    out.append(jnp.stack([jnp.sum(h1, dtype=u32), jnp.sum(h2, dtype=u32)]))
  return out


def tree_checksums(tree: Any) -> dict[str, list[int]]:
  """Bit-exact, position-sensitive checksums ``{path: [s1, s2]}`` per leaf.

  Element ``i`` of a flattened leaf with bit pattern ``b_i`` contributes
  ``h_i = fmix32(b_i XOR key_i)`` to ``s1`` and ``fmix32(h_i + c)`` to
  ``s2``, with ``key_i = fmix32(i * 0x9E3779B9 + 0x7F4A7C15)`` (MurmurHash3's
  finaliser, a bijection of uint32). Changing, moving or swapping values
  changes a sum unless the hashes cancel by chance (about 2**-32 per sum),
  where a plain sum of bits, even weighted by position, misses swaps whose
  bit and position differences multiply to a multiple of 2**32 (1.0 and
  0.0 at positions 512 apart). Sums wrap modulo 2**32 and integer addition
  is associative, so the result does not depend on how the leaves are
  sharded. Checksums are keyed by the leaf's path: swapped leaves are
  reported by name.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  sums = jax.device_get(_leaf_checksums([x for _, x in flat]))
  return {_path_str(p): [int(a), int(b)] for (p, _), (a, b) in zip(flat, sums)}


def _layout_diff(saved: Mapping[str, list], wanted: Mapping[str, list]) -> str:
  lines = []
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  if missing:
    lines.append(
      f"missing in the checkpoint: {missing[:8]}"
      + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
    )
  if unexpected:
    lines.append(
      f"in the checkpoint but not in this run: {unexpected[:8]}"
      + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
    )
  for key in sorted(set(saved) & set(wanted)):
    if list(saved[key]) != list(wanted[key]):
      lines.append(
        f"{key}: checkpoint has shape/dtype {saved[key]}, this run expects "
        f"{wanted[key]}"
      )
  return "; ".join(lines[:12])


def _config_diff(saved: Any, wanted: Any, ignore: Iterable[str]) -> list[str]:
  ignore = set(ignore)
  diffs = []

  def walk(a, b, prefix):
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      for k in sorted(set(a) | set(b)):
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in ignore:
          continue
        if k not in a or k not in b:
          diffs.append(
            f"{key}: checkpoint {a.get(k, '<absent>')!r}, this run "
            f"{b.get(k, '<absent>')!r}"
          )
        else:
          walk(a[k], b[k], key)
    elif a != b:
      diffs.append(f"{prefix}: checkpoint {a!r}, this run {b!r}")

  walk(saved, wanted, "")
  return diffs


def _jsonable(x: Any) -> Any:
  """Round-trips through JSON (tuples become lists) so configs compare."""
  return json.loads(json.dumps(x, default=_json_default))


def _json_default(x):
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return dataclasses.asdict(x)
  if hasattr(x, "tolist"):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON-serialisable: {x!r}")


class CheckpointManager:
  """Saves and restores training states under one directory.

  Args:
    directory: where the step folders live (created if absent).
    keep: keep the last ``keep`` checkpoints (older ones are deleted).
    async_save: let orbax write in a background thread; :meth:`save`
      returns once the arrays are copied off the device. Call :meth:`wait`
      (or :meth:`close`) before relying on the files.

  Example:
    >>> mngr = CheckpointManager(tmpdir, keep=2)  # doctest: +SKIP
    >>> mngr.save(10, state, data_state=sampler.get_state())  # doctest: +SKIP
    >>> r = mngr.restore(target=abstract_state(state))  # doctest: +SKIP
  """

  def __init__(
    self, directory: str | Path, *, keep: int = 3, async_save: bool = True
  ):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep = {keep!r} is invalid; it must be an int >= 1")
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save,
    )
    self._mngr = ocp.CheckpointManager(
      self.directory, options=options, item_names=(_STATE, _HOST)
    )

  # -- queries --------------------------------------------------------------
  def steps(self) -> list[int]:
    """The steps with a complete checkpoint, ascending."""
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint step, or None."""
    steps = self.steps()
    return steps[-1] if steps else None

  # -- save -----------------------------------------------------------------
  def save(
    self,
    step: int,
    state: Any,
    *,
    data_state: Any = None,
    history: Any = None,
    config: Any = None,
  ) -> None:
    """Saves ``state`` and host-side JSON as checkpoint ``step``.

    Args:
      step: the step number (usually ``int(state.step)``).
      state: the pytree of arrays to save (a ``TrainState``).
      data_state: JSON-able data-iterator state.
      history: JSON-able metric history.
      config: JSON-able run config, checked on restore.

    Raises:
      CheckpointError: ``data_state``/``history``/``config`` is not JSON-able
        or orbax fails to write.
    """
    try:
      host = _jsonable(
        {
          "format_version": FORMAT_VERSION,
          "step": int(step),
          "data_state": data_state,
          "history": history,
          "config": config,
          "layout": tree_layout(state),
          "checksums": tree_checksums(state),
        }
      )
    except TypeError as e:
      raise CheckpointError(
        f"cannot save checkpoint step {step}: host-side state is not "
        f"JSON-serialisable ({e})"
      ) from e
    try:
      self._mngr.save(
        int(step),
        args=ocp.args.Composite(
          **{
            _STATE: ocp.args.StandardSave(state),
            _HOST: ocp.args.JsonSave(host),
          }
        ),
        force=True,
      )
    except Exception as e:  # noqa: BLE001 - re-raised with context
      raise CheckpointError(
        f"saving checkpoint step {step} under {self.directory} failed: "
        f"{type(e).__name__}: {e}"
      ) from e

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax resources."""
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- restore --------------------------------------------------------------
  def read_host(self, step: int) -> dict[str, Any]:
    """The JSON half of checkpoint ``step``.

    Raises:
      CheckpointError: missing or unreadable.
    """
    where = self.directory / str(step)
    try:
      host = self._mngr.restore(
        step, args=ocp.args.Composite(**{_HOST: ocp.args.JsonRestore()})
      )[_HOST]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
        f"checkpoint step {step} at {where} is missing or corrupt: its "
        f"metadata cannot be read ({type(e).__name__}: {e})"
      ) from e
    if not isinstance(host, dict) or host.get("format_version") is None:
      raise CheckpointError(
        f"checkpoint step {step} at {where} has no dataweights metadata; it "
        "was not written by dataweights.checkpoint"
      )
    if host["format_version"] != FORMAT_VERSION:
      raise CheckpointError(
        f"checkpoint step {step} at {where} has format version "
        f"{host['format_version']}; this code reads version {FORMAT_VERSION}"
      )
    return host

  def restore(
    self,
    step: int | None = None,
    *,
    target: Any,
    config: Any = None,
    ignore_config: Iterable[str] = (),
    verify: bool = True,
  ) -> Restored:
    """Restores checkpoint ``step`` (default: the latest) into ``target``.

    Args:
      step: the step to restore; None for the latest.
      target: the abstract state (``jax.ShapeDtypeStruct`` leaves with
        shardings, e.g. :func:`dataweights.train.state.abstract_state`); the
        restored arrays get these shapes, dtypes and shardings.
      config: this run's JSON-able config; if given, the saved config must
        equal it except for the dotted keys in ``ignore_config``.
      ignore_config: dotted config keys allowed to differ (e.g.
        ``"train.checkpoint_every"``).
      verify: compare the restored leaves with the saved checksums.

    Returns:
      A :class:`Restored`.

    Raises:
      CheckpointError: no checkpoint, missing or corrupt files, or a tree,
        shape, dtype or config that does not match this run.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint found under {self.directory}")
    elif step not in self.steps():
      raise CheckpointError(
        f"no checkpoint step {step} under {self.directory}; available steps: "
        f"{self.steps()}"
      )
    where = self.directory / str(step)
    host = self.read_host(step)
    if config is not None:
      diffs = _config_diff(host.get("config"), _jsonable(config), ignore_config)
      if diffs:
        raise CheckpointError(
          f"checkpoint step {step} at {where} was written with another "
          f"config; differences: {'; '.join(diffs[:12])}. Use another "
          "checkpoint_dir, or resume with the same config"
        )
    diff = _layout_diff(host["layout"], tree_layout(target))
    if diff:
      raise CheckpointError(
        f"checkpoint step {step} at {where} does not fit this run's state "
        f"(other model, optimiser or method state?): {diff}"
      )
    try:
      state = self._mngr.restore(
        step,
        args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}),
      )[_STATE]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
        f"checkpoint step {step} at {where} is missing or corrupt: its arrays "
        f"cannot be read ({type(e).__name__}: {e})"
      ) from e
    if verify:
      sums = tree_checksums(state)
      bad = sorted(k for k, v in sums.items() if host["checksums"].get(k) != v)
      if bad:
        raise CheckpointError(
          f"checkpoint step {step} at {where} is corrupt: the restored values "
          f"of {bad[:8]} do not match the checksums written at save time"
        )
    return Restored(
      step=int(step),
      state=state,
      data_state=host.get("data_state"),
      history=host.get("history"),
      config=host.get("config"),
    )
