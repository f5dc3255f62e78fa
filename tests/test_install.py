"""Installing the library keeps a pre-installed jax (Colab, GPU/TPU machines).

A plain ``pip install dataweights`` into an environment with an older jax
upgrades it (the newest flax needs a newer jax), which on Colab would replace
the accelerator build. Every chapter's first cell therefore installs the
library with the installed jax packages pinned. These tests execute that cell
(with ``google.colab`` faked and pip captured) and let pip resolve its
command, in dry-run mode, against a real environment holding an old jax.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import pytest

from dataweights import book

ROOT = Path(__file__).resolve().parents[1]
GIT_URL = "dataweights @ git+https://github.com/dataweights/dataweights"
OLD_JAX = ("jax==0.10.2", "jaxlib==0.10.2")


def _colab_cells():
  cells = {}
  for ch in book.chapters(ROOT):
    nb = json.loads((ROOT / "book" / f"{ch}.ipynb").read_text())
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "google.colab" in "".join(first["source"]), f"{ch}: the first code cell is not the Colab install cell"
    assert "remove-cell" in first["metadata"].get("tags", []), f"{ch}: tag the Colab cell remove-cell"
    cells[ch] = "".join(first["source"])
  return cells


class _Dist(importlib.metadata.Distribution):
  """An installed distribution with only a name and a version."""

  def __init__(self, name, version):
    self._text = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"

  def read_text(self, filename):
    return self._text if filename == "METADATA" else None

  def locate_file(self, path):
    return Path("/nonexistent") / path


def _pip_argv(installed):
  """Runs the Colab cell as Colab would; returns the pip command it runs."""
  calls = []
  src = next(iter(_colab_cells().values()))
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(sys.modules, "google", types.ModuleType("google"))
    mp.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    mp.setattr(importlib.metadata, "distributions",
               lambda: [_Dist(n, v) for n, v in installed])
    mp.setattr(subprocess, "run", lambda argv, **kw: calls.append(argv))
    exec(compile(src, "colab-cell", "exec"), {"__name__": "__main__"})
  assert len(calls) == 1, f"the Colab cell ran {len(calls)} commands"
  return calls[0]


def test_every_chapter_has_the_same_colab_cell():
  cells = _colab_cells()
  assert len(set(cells.values())) == 1, f"Colab cells differ between {sorted(cells)}"


def test_colab_cell_pins_every_installed_jax_package():
  installed = [("jax", "0.10.2"), ("jaxlib", "0.10.2"), ("jax-cuda12-plugin", "0.10.2"),
               ("jax-cuda12-pjrt", "0.10.2"), ("numpy", "2.0.2"), ("flax", "0.10.0")]
  argv = _pip_argv(installed)
  assert argv[:4] == [sys.executable, "-m", "pip", "install"]
  assert GIT_URL in argv
  pins = [a for a in argv if "==" in a]
  assert sorted(pins) == ["jax-cuda12-pjrt==0.10.2", "jax-cuda12-plugin==0.10.2",
                          "jax==0.10.2", "jaxlib==0.10.2"]


def _pypi_reachable() -> bool:
  try:
    urllib.request.urlopen("https://pypi.org/simple/jax/", timeout=15).close()
    return True
  except OSError:
    return False


def _resolve(py, args, report):
  proc = subprocess.run(
    [py, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), *args],
    capture_output=True, text=True, timeout=900,
  )
  assert proc.returncode == 0, f"pip could not resolve {args}:\n{proc.stderr[-3000:]}"
  return {i["metadata"]["name"].lower(): i["metadata"]["version"]
          for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_pip_keeps_a_preinstalled_jax(tmp_path):
  if not _pypi_reachable():
    msg = "PyPI is not reachable: cannot resolve the install command"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = str(venv / "bin" / "python")
  subprocess.run([py, "-m", "pip", "install", "--quiet", *OLD_JAX], check=True, timeout=900)

  # The Colab cell's own command, with the local checkout for the git URL.
  argv = _pip_argv([tuple(p.split("==")) for p in OLD_JAX])
  args = [str(ROOT) if a == GIT_URL else a for a in argv[4:] if a != "-q"]
  to_install = _resolve(py, args, tmp_path / "pinned.json")
  assert "jax" not in to_install and "jaxlib" not in to_install, (
    f"pip would replace the installed jax: {to_install.get('jax')}, {to_install.get('jaxlib')}")
  assert "flax" in to_install and "dataweights" in to_install

  # Why the pins are needed: without them pip upgrades jax.
  unpinned = _resolve(py, [str(ROOT)], tmp_path / "plain.json")
  assert "jax" in unpinned, (
    "pip no longer upgrades a pre-installed jax for this package; the Colab pins are "
    "still harmless, but update this test's premise")
