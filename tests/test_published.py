"""Drift guard for the published book (layers 1 and 2; nbval is layer 3).

1. numbers: every registered result published under ``book/results/`` is
   recomputed with the config stored in its JSON and compared with the
   published data (tolerances per result, documented in the registry);
2. pixels: every published PNG is re-rendered from its published JSON and
   compared with ``matplotlib.testing.compare.compare_images`` (tol 2 RMS:
   identical code and data give identical bytes; a marker-size change gives
   RMS > 4).

To refresh deliberately after an intended change: ``dataweights run <chapter>``
and commit the regenerated notebook, JSON and PNG together.
"""

import json
import math
import re
from pathlib import Path

import pytest

from dataweights import experiments, results
from dataweights.experiments.registry import REGISTRY, config_from_record

ROOT = Path(__file__).resolve().parents[1]
PUB = ROOT / "book" / "results"
NAMES = sorted(REGISTRY)


def _published(name):
  entry = REGISTRY[name]
  path = PUB / entry.chapter / f"{name}.json"
  if not path.exists():
    pytest.fail(f"{name} is registered but not published at {path}: run `dataweights run {entry.chapter}`")
  return entry, results.load(name, path.parent)


def assert_close_tree(got, want, *, rtol, atol, path="data"):
  """Recursive comparison of JSON trees: numbers within tolerance, rest equal."""
  if isinstance(want, dict):
    assert isinstance(got, dict), f"{path}: expected a dict, got {type(got).__name__}"
    assert sorted(got) == sorted(want), f"{path}: keys differ: {sorted(got)} vs {sorted(want)}"
    for k in want:
      assert_close_tree(got[k], want[k], rtol=rtol, atol=atol, path=f"{path}.{k}")
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), (
      f"{path}: expected a list of {len(want)}, got {type(got).__name__} "
      f"of {len(got) if isinstance(got, list) else '-'}")
    for i, (g, w) in enumerate(zip(got, want)):
      assert_close_tree(g, w, rtol=rtol, atol=atol, path=f"{path}[{i}]")
  elif isinstance(want, bool) or want is None or isinstance(want, str):
    assert got == want, f"{path}: {got!r} != published {want!r}"
  elif isinstance(want, (int, float)):
    assert isinstance(got, (int, float)) and not isinstance(got, bool), f"{path}: {got!r} is not a number"
    ok = math.isclose(got, want, rel_tol=rtol, abs_tol=atol)
    assert ok, (f"{path}: recomputed {got!r} vs published {want!r} "
                f"(rtol={rtol}, atol={atol}); if the change is intended, re-run the chapter")
  else:
    raise TypeError(f"{path}: unexpected JSON value {want!r}")


@pytest.mark.book
@pytest.mark.parametrize("name", NAMES)
def test_published_numbers_recompute(name):
  entry, record = _published(name)
  assert record["provenance"]["profile"] == "book", "published results must come from the book profile"
  cfg = config_from_record(entry, record["config"])
  fresh = results.to_jsonable(entry.run(cfg))
  assert_close_tree(fresh, record["data"], rtol=entry.rtol, atol=entry.atol, path=name)


@pytest.mark.book
@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].plot is not None])
def test_published_png_rerenders(name, tmp_path):
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib.testing.compare import compare_images

  entry, record = _published(name)
  png = PUB / entry.chapter / f"{name}.png"
  assert png.exists(), f"{png} is missing: re-run the chapter"
  fig = entry.plot(record["data"])
  fresh = results.save_figure(fig, name, tmp_path)
  diff = compare_images(str(png), str(fresh), tol=2)
  assert diff is None, f"{name}.png no longer matches a rendering of its published data: {diff}"


def test_every_published_json_is_registered():
  for path in sorted(PUB.glob("*/*.json")):
    assert path.stem in REGISTRY, f"{path} is published but not in the registry"
    assert REGISTRY[path.stem].chapter == path.parent.name


def _scale_numbers(x, factor):
  if isinstance(x, dict):
    return {k: _scale_numbers(v, factor) for k, v in x.items()}
  if isinstance(x, list):
    return [_scale_numbers(v, factor) for v in x]
  if isinstance(x, float):
    return x * factor
  return x


def test_the_drift_guard_detects_a_one_percent_change():
  """Layer 1 flags a 1% change in every published result (the guard can fail)."""
  want = {"loss": [1.0, 2.0], "w": 0.25}
  assert_close_tree({"loss": [1.0, 2.0], "w": 0.25}, want, rtol=1e-4, atol=1e-6)
  with pytest.raises(AssertionError, match="recomputed"):
    assert_close_tree({"loss": [1.0, 2.02], "w": 0.25}, want, rtol=1e-4, atol=1e-6)
  for name in NAMES:
    entry, record = _published(name)
    assert entry.rtol < 0.01, f"{name}: rtol={entry.rtol} would hide a 1% drift"
    with pytest.raises(AssertionError, match="recomputed"):
      assert_close_tree(_scale_numbers(record["data"], 1.01), record["data"],
                        rtol=entry.rtol, atol=entry.atol, path=name)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].plot is not None])
def test_the_pixel_guard_detects_a_changed_plot(name, tmp_path):
  """Layer 2 flags a plot drawn with other line widths / marker sizes."""
  import matplotlib
  from matplotlib.testing.compare import compare_images

  entry, record = _published(name)
  png = PUB / entry.chapter / f"{name}.png"
  with matplotlib.rc_context({"lines.linewidth": 4.0, "lines.markersize": 12.0,
                              "font.size": 14.0}):
    fresh = results.save_figure(entry.plot(record["data"]), name, tmp_path)
  assert compare_images(str(png), str(fresh), tol=2) is not None


def _notebooks():
  from dataweights import book

  return [ROOT / "book" / f"{c}.ipynb" for c in book.chapters(ROOT)]


@pytest.mark.parametrize("nb_path", _notebooks(), ids=lambda p: p.stem)
def test_published_notebook_is_clean(nb_path):
  nb = json.loads(nb_path.read_text())
  cells = nb["cells"]
  code = [c for c in cells if c["cell_type"] == "code"]
  assert any(c["outputs"] for c in code), f"{nb_path.name} has no outputs: run `dataweights run {nb_path.stem}`"
  for c in code:
    for out in c["outputs"]:
      assert out["output_type"] != "error", f"{nb_path.name} stores an error output"
  params = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
  assert len(params) == 1, f"{nb_path.name} needs exactly one cell tagged 'parameters'"
  src = "".join(params[0]["source"])
  assert re.search(r'^profile = "book"', src, re.M) and re.search(r'^results_dir = ""', src, re.M)
  assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in code)
  assert any("nbval-check-output" in c["metadata"].get("tags", []) for c in code), (
    f"{nb_path.name} has no cell tagged nbval-check-output: nbval would check nothing")
  text = nb_path.read_text()
  assert "/tmp/" not in text and "_build/scratch" not in text, f"{nb_path.name} leaks a scratch path"


def test_registry_is_populated_by_importing_experiments():
  assert experiments.REGISTRY is REGISTRY
