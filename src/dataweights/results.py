"""Published results: JSON data behind every figure, with provenance.

A published result is ``<results_dir>/<name>.json`` holding
``{"name", "data", "config", "provenance"}`` and, for figures,
``<results_dir>/<name>.png`` rendered from exactly that data with
:data:`PNG_KW` (no version string in the metadata, so the bytes are stable
across runs and the drift guard can compare pixels).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

PNG_KW: dict[str, Any] = dict(dpi=80, metadata={"Software": None})
"""savefig keywords that make PNG bytes reproducible."""

_VERSIONED = (
  "dataweights", "jax", "jaxlib", "flax", "optax", "numpy", "matplotlib",
  "grain", "tensorflow-datasets", "orbax-checkpoint",
)


class ResultError(RuntimeError):
  """A published result is missing or unreadable."""


def _git_commit() -> str:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
      cwd=Path(__file__).resolve().parent,
    )
    return out.stdout.strip() if out.returncode == 0 else "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def provenance(profile: str, wall_time_s: float | None = None) -> dict[str, Any]:
  """Where and how a result was computed: versions, device, profile, commit."""
  import jax  # local: keep this module importable without initialising jax

  versions = {}
  for pkg in _VERSIONED:
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  devices = jax.devices()
  return {
    "profile": profile,
    "versions": versions,
    "python": platform.python_version(),
    "device": f"{devices[0].platform}:{devices[0].device_kind} x{len(devices)}",
    "machine": platform.machine(),
    "cpu_count": os.cpu_count(),
    "git_commit": _git_commit(),
    "wall_time_s": None if wall_time_s is None else round(wall_time_s, 2),
    "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
  }


def to_jsonable(x: Any) -> Any:
  """Converts numpy/jax arrays, scalars and dataclasses to plain JSON types."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if hasattr(x, "tolist"):  # numpy / jax arrays and scalars
    return to_jsonable(x.tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)  # JSON has no inf/nan; keep them visible
  return x


def _atomic_write(path: Path, payload: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def save(
  name: str,
  data: Any,
  results_dir: str | os.PathLike[str] | None,
  *,
  config: Any = None,
  profile: str,
  wall_time_s: float | None = None,
) -> Path | None:
  """Writes ``<results_dir>/<name>.json``; does nothing if ``results_dir`` is falsy.

  Chapters pass ``results_dir=""`` by default so that re-executing them
  (nbval in CI) never touches the published files; the book runner passes a
  real directory.
  """
  if not results_dir:
    return None
  record = {
    "name": name,
    "data": to_jsonable(data),
    "config": to_jsonable(config),
    "provenance": provenance(profile, wall_time_s),
  }
  path = Path(results_dir) / f"{name}.json"
  _atomic_write(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
  return path


def save_figure(fig: Any, name: str, results_dir: str | os.PathLike[str] | None) -> Path | None:
  """Writes ``<results_dir>/<name>.png`` with :data:`PNG_KW`; no-op if falsy."""
  if not results_dir:
    return None
  import io

  buf = io.BytesIO()
  fig.savefig(buf, format="png", **PNG_KW)
  path = Path(results_dir) / f"{name}.png"
  _atomic_write(path, buf.getvalue())
  return path


def load(name: str, results_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads a published record (``name``, ``data``, ``config``, ``provenance``)."""
  path = Path(results_dir) / f"{name}.json"
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise ResultError(f"no published result {name!r} at {path}; run the chapter first") from e
  except json.JSONDecodeError as e:
    raise ResultError(f"published result {path} is corrupt ({e}); re-run the chapter") from e
  for key in ("name", "data", "provenance"):
    if key not in record:
      raise ResultError(f"published result {path} lacks the field {key!r}; re-run the chapter")
  return record
