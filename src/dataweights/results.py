"""Published results: JSON data behind every figure, with provenance.

A published result is ``<results_dir>/<name>.json`` holding
``{"name", "data", "config", "provenance"}`` and, for figures,
``<results_dir>/<name>.png`` rendered from exactly that data with
:data:`PNG_KW` (no version string in the metadata, so the bytes are stable
across runs and the drift guard can compare pixels).

Where results go. A chapter passes ``results_dir`` (set by the book runner;
``""`` by default). When it is empty and the environment variable
:data:`RESULTS_ENV` names a folder, results go to ``$RESULTS_ENV/<chapter>/``
instead: that is how CI executes every chapter once (nbval) and still gets
fresh results to compare with the published ones. With neither, nothing is
written.

What the reader sees. :class:`FigureOutput` displays in a notebook as the
exact PNG bytes that were published (``image/png``), so the rendered book
shows every figure, and a test can check that notebook and results agree.
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

PNG_KW: dict[str, Any] = dict(dpi=100, metadata={"Software": None})
"""savefig keywords that make PNG bytes reproducible.

dpi 100 (not 80): at 80 a marker-size change of one point could leave the
PNG pixel-identical, so the pixel guard could not see it.
"""

RESULTS_ENV = "DATAWEIGHTS_RESULTS_DIR"
"""Environment variable: where chapters executed with ``results_dir=""``
write their results (``$DATAWEIGHTS_RESULTS_DIR/<chapter>/``)."""

_VERSIONED = (
  "dataweights", "jax", "jaxlib", "flax", "optax", "numpy", "matplotlib",
  "grain", "tensorflow-datasets", "orbax-checkpoint",
)


class ResultError(RuntimeError):
  """A published result is missing or unreadable."""


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(
      ["git", *args], capture_output=True, text=True, timeout=10,
      cwd=Path(__file__).resolve().parent,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout if out.returncode == 0 else None


def _git_commit() -> str:
  out = _git("rev-parse", "HEAD")
  return out.strip() if out else "unknown"


def _git_dirty() -> bool | None:
  """Whether the source tree has uncommitted changes (None: not a git tree).

  Published results and notebooks themselves are ignored: a chapter run
  rewrites them, and they are what the run produces, not its inputs.
  """
  out = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(top,exclude)book/results", ":(top,exclude)book/*.ipynb")
  return None if out is None else bool(out.strip())


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
    "git_dirty": _git_dirty(),
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


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def file_mode() -> int:
  """The mode a plain ``open(path, "w")`` would give (0o644 under umask 022)."""
  return 0o666 & ~_umask()


def atomic_write(path: Path, payload: bytes) -> None:
  """Writes ``payload`` to ``path`` atomically, with the usual file mode.

  ``mkstemp`` creates files with mode 0600; published files must be readable
  like any other file in the repository, so the mode is reset before the
  rename.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.chmod(tmp, file_mode())
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
  atomic_write(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
  return path


def output_dir(
  results_dir: str | os.PathLike[str] | None, chapter: str
) -> Path | None:
  """Where a chapter's results go: ``results_dir``, else ``$RESULTS_ENV/<chapter>``.

  Returns None when nothing should be written (the chapter's default
  ``results_dir=""`` and no :data:`RESULTS_ENV`).
  """
  if results_dir:
    return Path(results_dir)
  env = os.environ.get(RESULTS_ENV)
  return Path(env) / chapter if env else None


def render_png(fig: Any) -> bytes:
  """The PNG bytes of ``fig`` under :data:`PNG_KW` (stable across runs)."""
  import io

  buf = io.BytesIO()
  fig.savefig(buf, format="png", **PNG_KW)
  return buf.getvalue()


def save_figure(fig: Any, name: str, results_dir: str | os.PathLike[str] | None) -> Path | None:
  """Writes ``<results_dir>/<name>.png`` with :data:`PNG_KW`; no-op if falsy."""
  if not results_dir:
    return None
  path = Path(results_dir) / f"{name}.png"
  atomic_write(path, render_png(fig))
  return path


class FigureOutput:
  """A published figure as a notebook shows it.

  A bare :class:`matplotlib.figure.Figure` built without pyplot displays as
  ``<Figure size ...>`` text only, so the rendered book would show no image.
  This object displays as ``image/png``: exactly the bytes written to
  ``<name>.png``, so the book, the notebook and the published file agree.

  Attributes:
    name: the published result's name.
    figure: the matplotlib figure, for further use.
    png: the PNG bytes shown and published.
  """

  def __init__(self, name: str, figure: Any, png: bytes | None = None):
    self.name = name
    self.figure = figure
    self.png = render_png(figure) if png is None else png

  def _repr_png_(self) -> bytes:
    return self.png

  def __repr__(self) -> str:
    return f"<figure {self.name}.png>"


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
