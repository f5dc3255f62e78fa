"""The book runner: execute chapters with papermill, publish atomically, build.

A chapter is a notebook ``book/<chapter>.ipynb`` listed in ``_toc.yml``. Its
``parameters`` cell defines ``profile`` and ``results_dir``. Running a chapter

1. executes it with papermill into a scratch directory, passing ``profile``
   and a scratch ``results_dir`` (JSON + PNG behind every figure);
2. only if every cell succeeded, swaps the new results directory and the new
   notebook into place (``book/results/<chapter>/`` and ``book/<chapter>.ipynb``
   for the ``book`` profile; ``runs/<profile>/`` for any other profile, so
   that GPU/TPU runs never overwrite the published CPU run);
3. on failure, leaves the published files untouched, keeps the failed
   notebook under ``_build/failed/`` for inspection and raises
   :class:`ChapterError` with the failing cell and error.

The published notebook keeps the chapter's default parameters
(``results_dir = ""``), so re-executing it (nbval in CI) writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dataweights import results
from dataweights.configs.base import check_profile

PUBLISHED_PROFILE = "book"


class ChapterError(RuntimeError):
  """A chapter failed to execute; published outputs were left untouched."""


class UnknownChapterError(ChapterError):
  """A name that is not a chapter of ``_toc.yml`` (a usage error)."""


class ChapterInterrupted(ChapterError):
  """A chapter run was interrupted (Ctrl-C); published outputs are untouched."""


class BuildError(RuntimeError):
  """The strict Jupyter Book build failed."""


def _runner_modules():
  """papermill and nbformat, or a clear error naming the extra to install."""
  try:
    import nbformat
    import papermill
  except ImportError as e:
    raise ChapterError(
      f"running chapters needs the book extra ({e.name} is missing): "
      "pip install 'dataweights[book]'"
    ) from None
  return nbformat, papermill


def repo_root(start: Path | None = None) -> Path:
  """The directory holding ``_toc.yml`` (searched upwards from ``start``/cwd)."""
  here = (start or Path.cwd()).resolve()
  for d in (here, *here.parents):
    if (d / "_toc.yml").is_file() and (d / "book").is_dir():
      return d
  pkg_root = Path(__file__).resolve().parents[2]
  if (pkg_root / "_toc.yml").is_file():
    return pkg_root
  raise FileNotFoundError(
    f"no _toc.yml with a book/ folder above {here}; run from the dataweights repository"
  )


def chapters(root: Path | None = None) -> list[str]:
  """Notebook chapters in ``_toc.yml`` order (stems, e.g. ``"ch1_mixing"``)."""
  import yaml

  root = root or repo_root()
  toc = yaml.safe_load((root / "_toc.yml").read_text())
  files: list[str] = []

  def walk(node):
    if isinstance(node, dict):
      for key in ("root", "file"):
        if key in node:
          files.append(str(node[key]))
      for v in node.values():
        if isinstance(v, (list, dict)):
          walk(v)
    elif isinstance(node, list):
      for v in node:
        walk(v)

  walk(toc)
  out = []
  for f in files:
    p = root / f
    nb = p if p.suffix == ".ipynb" else p.with_suffix(".ipynb")
    if nb.is_file():
      out.append(nb.stem)
  return out


def resolve_chapters(names: Sequence[str], root: Path | None = None) -> list[str]:
  """Chapter stems for ``names``; every name is checked before any runs.

  A chapter may be named by its stem (``ch1_mixing``), its notebook
  (``ch1_mixing.ipynb``) or its path (``book/ch1_mixing.ipynb``).

  Raises:
    ChapterError: some names are not chapters in ``_toc.yml`` (all listed).
  """
  root = root or repo_root()
  known = chapters(root)
  out, bad = [], []
  for name in names:
    stem = Path(str(name)).name.removesuffix(".ipynb")
    parent = Path(str(name)).parent
    if stem in known and parent in (Path("."), Path("book")):
      out.append(stem)
    else:
      bad.append(str(name))
  if bad:
    raise UnknownChapterError(
      f"unknown chapter{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
      f"chapters in _toc.yml: {', '.join(known)}"
    )
  return out


def _check_writable(directory: Path, what: str) -> None:
  """Fails early (before executing anything) if ``directory`` cannot take files."""
  for d in (directory, *directory.parents):
    if d.exists():
      break
  if not d.is_dir():
    raise ChapterError(f"{what}: {d} is not a directory; move it away or choose another folder")
  if d == directory:
    try:
      tempfile.NamedTemporaryFile(dir=directory).close()
    except OSError as e:
      raise ChapterError(f"{what}: cannot write in {directory} ({e.strerror}); "
                         "fix its permissions or choose another folder") from None
  elif not os.access(d, os.W_OK | os.X_OK):
    raise ChapterError(f"{what}: cannot create {directory} under {d} (not writable); "
                       "fix its permissions or choose another folder")


@dataclasses.dataclass(frozen=True)
class ChapterRun:
  chapter: str
  profile: str
  notebook: Path
  results_dir: Path
  wall_time_s: float


def _check_parameters(src: Path) -> None:
  """Every chapter must take ``profile`` and ``results_dir`` as parameters."""
  import nbformat

  try:
    nb = nbformat.read(src, as_version=4)
  except Exception as e:  # JSON errors, truncated files, schema errors
    raise ChapterError(
      f"{src} is not a readable notebook ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
      f"restore it, e.g. `git checkout -- {src.relative_to(src.parents[1])}`"
    ) from None
  cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
  if len(cells) != 1:
    raise ChapterError(f"{src.name} needs exactly one cell tagged 'parameters' (found {len(cells)})")
  import papermill as pm

  inferred = pm.inspect_notebook(str(src))  # what papermill itself can parse
  missing = [n for n in ("profile", "results_dir") if n not in inferred]
  if missing:
    raise ChapterError(
      f"{src.name}: papermill finds no {', '.join(missing)} in the parameters cell; "
      'define them one per line, e.g. profile = "book" and results_dir = "" '
      "(a comment after the value must not contain '=')"
    )


def _clean_notebook(nb, profile: str) -> None:
  """Drops volatile metadata and the injected-parameters cell (in place)."""
  kept = []
  for cell in nb.cells:
    tags = cell.get("metadata", {}).get("tags", [])
    if "injected-parameters" in tags:
      if profile == PUBLISHED_PROFILE:
        continue  # published notebooks keep their defaults (results_dir = "")
      cell["source"] = f'# Parameters injected by `dataweights run`\nprofile = "{profile}"\n'
    md = cell.get("metadata", {})
    md.pop("papermill", None)
    md.pop("execution", None)
    kept.append(cell)
  nb.cells = kept
  nb.metadata.pop("papermill", None)  # per-run timestamps and paths


def _publish(tmp_nb: Path, tmp_results: Path, dest_nb: Path, dest_results: Path) -> None:
  """Puts the new notebook and results in place together, or neither.

  Both are first staged next to their destinations (same file system, so
  the final renames are atomic); a failure while staging changes nothing
  published. The old results are kept aside until the new notebook is in
  place, and put back if anything fails.
  """
  dest_results.parent.mkdir(parents=True, exist_ok=True)
  staged_nb = dest_nb.with_name(f".{dest_nb.name}.new")
  staged_results = dest_results.with_name(f".{dest_results.name}.new")
  backup = dest_results.with_name(f".{dest_results.name}.old")
  for leftover in (staged_results, backup):
    if leftover.exists():
      shutil.rmtree(leftover)
  moved_old = moved_new = False
  try:
    shutil.copyfile(tmp_nb, staged_nb)
    os.chmod(staged_nb, results.file_mode())
    shutil.copytree(tmp_results, staged_results)
    if dest_results.exists():
      os.replace(dest_results, backup)
      moved_old = True
    os.replace(staged_results, dest_results)
    moved_new = True
    os.replace(staged_nb, dest_nb)
  except BaseException:
    if moved_new:
      shutil.rmtree(dest_results, ignore_errors=True)
    if moved_old:
      os.replace(backup, dest_results)
    staged_nb.unlink(missing_ok=True)
    shutil.rmtree(staged_results, ignore_errors=True)
    raise
  shutil.rmtree(backup, ignore_errors=True)


def run_chapter(
  chapter: str,
  profile: str = PUBLISHED_PROFILE,
  *,
  root: Path | None = None,
  out_dir: Path | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
) -> ChapterRun:
  """Executes one chapter with papermill and publishes it atomically.

  Args:
    chapter: notebook stem in ``book/`` (see :func:`chapters`).
    profile: ``smoke``, ``book`` (the published run) or ``paper``.
    root: repository root (default: found from the working directory).
    out_dir: where to publish; default ``book/`` for the ``book`` profile,
      ``runs/<profile>/`` otherwise.
    progress: show papermill's per-cell progress bar.
    log: where progress lines go.

  Returns:
    Where the executed notebook and results went, and the wall time.

  Raises:
    ChapterError: the chapter failed; nothing published was changed.
  """
  check_profile(profile)
  nbformat, pm = _runner_modules()
  root = root or repo_root()
  (chapter,) = resolve_chapters([chapter], root)
  book_dir = root / "book"
  src = book_dir / f"{chapter}.ipynb"
  if out_dir is None:
    out_dir = book_dir if profile == PUBLISHED_PROFILE else root / "runs" / profile
  out_dir = Path(out_dir)
  dest_nb = out_dir / f"{chapter}.ipynb"
  dest_results = out_dir / "results" / chapter

  _check_parameters(src)
  # Everything that will be written is checked before anything runs.
  _check_writable(out_dir, "cannot publish the chapter")
  if dest_nb.exists() and not os.access(dest_nb, os.W_OK):
    raise ChapterError(f"cannot publish the chapter: {dest_nb} is not writable; fix its permissions")
  if dest_nb.exists() and not dest_nb.is_file():
    raise ChapterError(f"cannot publish the chapter: {dest_nb} is not a file; move it away")
  _check_writable(dest_results.parent, "cannot publish the chapter's results")
  if dest_results.exists() and not dest_results.is_dir():
    raise ChapterError(f"cannot publish the chapter's results: {dest_results} is not a directory; move it away")
  scratch_parent = root / "_build" / "scratch"
  _check_writable(scratch_parent, "no scratch space for the run")
  scratch_parent.mkdir(parents=True, exist_ok=True)
  scratch = Path(tempfile.mkdtemp(prefix=f"{chapter}.", dir=scratch_parent))
  tmp_nb = scratch / f"{chapter}.ipynb"
  tmp_results = scratch / "results"
  tmp_results.mkdir()
  log(f"[dataweights] running {chapter} (profile={profile}) ...")
  t0 = time.perf_counter()
  try:
    try:
      pm.execute_notebook(
        str(src), str(tmp_nb),
        parameters={"profile": profile, "results_dir": str(tmp_results)},
        kernel_name="python3", cwd=str(book_dir), progress_bar=progress,
      )
    except KeyboardInterrupt:
      raise ChapterInterrupted(
        f"chapter {chapter!r} interrupted after {time.perf_counter() - t0:.0f} s; "
        f"published outputs in {out_dir} were left untouched (run it again to redo it)"
      ) from None
    except Exception as e:  # papermill raises PapermillExecutionError and others
      failed = root / "_build" / "failed"
      failed.mkdir(parents=True, exist_ok=True)
      kept = failed / f"{chapter}.{profile}.ipynb"
      if tmp_nb.exists():
        shutil.copyfile(tmp_nb, kept)
      detail = getattr(e, "evalue", None) or str(e).strip().splitlines()[-1:] or [repr(e)]
      cell = getattr(e, "exec_count", None)
      where = f" in cell [{cell}]" if cell is not None else ""
      raise ChapterError(
        f"chapter {chapter!r} failed{where} after {time.perf_counter() - t0:.0f} s: "
        f"{getattr(e, 'ename', type(e).__name__)}: {detail if isinstance(detail, str) else detail[0]}; "
        f"published outputs in {out_dir} were left untouched; the failed notebook is {kept}"
      ) from e
    wall = time.perf_counter() - t0
    nb = nbformat.read(tmp_nb, as_version=4)
    _clean_notebook(nb, profile)
    nbformat.write(nb, tmp_nb)
    try:
      _publish(tmp_nb, tmp_results, dest_nb, dest_results)
    except OSError as e:
      raise ChapterError(
        f"chapter {chapter!r} ran, but publishing it failed ({e}); "
        f"the published notebook and results in {out_dir} were left as they were"
      ) from e
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  log(f"[dataweights] {chapter}: done in {wall:.0f} s -> {dest_nb.relative_to(root) if dest_nb.is_relative_to(root) else dest_nb}")
  return ChapterRun(chapter, profile, dest_nb, dest_results, wall)


def run_chapters(
  names: Sequence[str] | None = None,
  profile: str = PUBLISHED_PROFILE,
  *,
  root: Path | None = None,
  progress: bool = True,
  log: Callable[[str], None] = print,
) -> list[ChapterRun]:
  """Runs several chapters in order; stops at the first failure.

  Chapters that ran before a failure stay published (each is atomic).
  """
  root = root or repo_root()
  names = resolve_chapters(names, root) if names else chapters(root)
  runs = []
  t0 = time.perf_counter()
  for i, name in enumerate(names, 1):
    log(f"[dataweights] chapter {i}/{len(names)}: {name} (elapsed {time.perf_counter() - t0:.0f} s)")
    runs.append(run_chapter(name, profile, root=root, progress=progress, log=log))
  return runs


def build(root: Path | None = None, *, log: Callable[[str], None] = print) -> Path:
  """Builds the HTML book strictly (warnings are errors); returns index.html.

  Every page is rebuilt (``--all``, a few seconds): an incremental build
  leaves citation links of unchanged pages pointing at stale anchors.

  Raises:
    BuildError: the build emitted a warning or an error.
  """
  root = root or repo_root()
  exe = Path(sys.executable).with_name("jupyter-book")
  cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(root),
         "--builder", "html", "--all", "-W", "-n", "--keep-going"]
  log(f"[dataweights] building the book: {' '.join(cmd[1:])}")
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
    raise BuildError(f"jupyter-book build failed (exit {proc.returncode}):\n{tail}")
  index = root / "_build" / "html" / "index.html"
  log(f"[dataweights] book built in {time.perf_counter() - t0:.0f} s: open {index}")
  return index
