"""Drift guard for the published book.

CI executes every chapter exactly once (nbval, ``book`` profile) with
``$DATAWEIGHTS_RESULTS_DIR`` set, so each ``experiments.publish`` call of the
chapter writes a fresh JSON and PNG under ``$DATAWEIGHTS_RESULTS_DIR/<chapter>/``.
This file then checks, for every registered result:

1. numbers (marker ``chapters``): the fresh data equal the published data
   within the result's documented ``rtol``/``atol``, under the same config;
2. pixels: the published PNG re-renders bit-for-bit (``PNG_TOL``) from the
   published JSON, so any change of plotting code is seen; and the fresh
   PNG matches the published one within ``FRESH_PNG_TOL``;
3. what the reader sees: every published figure is an ``image/png`` output
   of its chapter's notebook, byte-identical to the published PNG;
4. nbval itself compares the printed tables of cells tagged
   ``nbval-check-output``.

The self-tests below show that a 1% change of any result and small
restylings of any figure fail the guard.

To refresh deliberately after an intended change: ``dataweights run
<chapter>`` and commit the regenerated notebook, JSON and PNG together.
"""

import base64
import json
import math
import os
import re
from pathlib import Path

import pytest

from dataweights import experiments, results
from dataweights.experiments.registry import REGISTRY, config_from_record

ROOT = Path(__file__).resolve().parents[1]
PUB = ROOT / "book" / "results"
NAMES = sorted(REGISTRY)
FIGURES = [n for n in NAMES if REGISTRY[n].plot is not None]

# Re-rendering the published JSON with the same code and matplotlib gives
# identical pixels (RMS 0: Agg is deterministic, and the data are the same
# JSON). The smallest restylings guarded against below give, at dpi 100, RMS
# 2.7-5.3 (a marker one point larger), 3.3-13 (colours 0.15 lighter) and
# 6.4-11 (lines 0.5 pt wider); 0.5 sits well between the two.
PNG_TOL = 0.5
# A fresh run's data differ from the published data by float noise (within
# rtol), which can move antialiased edges by a fraction of a pixel.
FRESH_PNG_TOL = 1.0


def _published(name):
  entry = REGISTRY[name]
  path = PUB / entry.chapter / f"{name}.json"
  if not path.exists():
    pytest.fail(f"{name} is registered but not published at {path}: run `dataweights run {entry.chapter}`")
  return entry, results.load(name, path.parent)


def _fresh_dir() -> Path:
  """The folder CI's chapter execution wrote to, or skip/fail clearly."""
  env = os.environ.get(results.RESULTS_ENV)
  why = None
  if not env:
    why = (f"${results.RESULTS_ENV} is not set: these checks compare the results of "
           "`make test`'s single execution of every chapter with the published ones")
  elif not Path(env).is_dir():
    why = f"${results.RESULTS_ENV}={env} does not exist: the chapters were not executed"
  if why:
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(why)
    pytest.skip(why)
  return Path(env)


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


# -- 1. numbers: the fresh single execution against the published results --


@pytest.mark.chapters
@pytest.mark.parametrize("name", NAMES)
def test_fresh_result_matches_published(name):
  entry, record = _published(name)
  fresh_dir = _fresh_dir() / entry.chapter
  assert (fresh_dir / f"{name}.json").exists(), (
    f"executing {entry.chapter} did not publish {name} (no {fresh_dir / name}.json)")
  fresh = results.load(name, fresh_dir)
  assert record["provenance"]["profile"] == "book", "published results must come from the book profile"
  assert fresh["provenance"]["profile"] == "book", "CI must execute the chapters under the book profile"
  assert fresh["config"] == record["config"], (
    f"{name}: the chapter now runs another config than the published one; re-run the chapter")
  assert_close_tree(fresh["data"], record["data"], rtol=entry.rtol, atol=entry.atol, path=name)


@pytest.mark.chapters
@pytest.mark.parametrize("name", FIGURES)
def test_fresh_png_matches_published(name):
  from matplotlib.testing.compare import compare_images

  entry, _ = _published(name)
  fresh = _fresh_dir() / entry.chapter / f"{name}.png"
  assert fresh.exists(), f"executing {entry.chapter} did not draw {name}.png"
  diff = compare_images(str(PUB / entry.chapter / f"{name}.png"), str(fresh), tol=FRESH_PNG_TOL)
  assert diff is None, f"{name}.png of the fresh run differs from the published one: {diff}"


def test_published_configs_rebuild():
  """The config stored with each result is still a valid config."""
  for name in NAMES:
    entry, record = _published(name)
    cfg = config_from_record(entry, record["config"])
    assert results.to_jsonable(cfg) == record["config"], name


# -- 2. pixels: plotting code against the published PNGs --


def _render(name, data, tmp_path, mutate=None):
  import matplotlib

  matplotlib.use("Agg")
  fig = REGISTRY[name].plot(data)
  if mutate is not None:
    mutate(fig)
  return results.save_figure(fig, name, tmp_path)


@pytest.mark.parametrize("name", FIGURES)
def test_published_png_rerenders(name, tmp_path):
  from matplotlib.testing.compare import compare_images

  entry, record = _published(name)
  png = PUB / entry.chapter / f"{name}.png"
  assert png.exists(), f"{png} is missing: re-run the chapter"
  fresh = _render(name, record["data"], tmp_path)
  diff = compare_images(str(png), str(fresh), tol=PNG_TOL)
  assert diff is None, f"{name}.png no longer matches a rendering of its published data: {diff}"


def _artists(fig):
  """Lines, patches (bars) and collections (scatters, bands) of every axes."""
  for ax in fig.axes:
    yield from ax.get_lines()
    yield from ax.patches
    yield from ax.collections


def _has_markers(fig):
  return any(getattr(a, "get_marker", lambda: None)() not in (None, "None", "")
             for a in _artists(fig)) or any(
    hasattr(a, "get_sizes") and len(a.get_sizes()) for a in _artists(fig))


def _bigger_markers(fig):
  """Every marker one point larger (scatter areas grown to match)."""
  for a in _artists(fig):
    if hasattr(a, "set_markersize"):
      a.set_markersize(a.get_markersize() + 1)
    elif hasattr(a, "get_sizes") and len(a.get_sizes()):
      a.set_sizes((a.get_sizes() ** 0.5 + 1) ** 2)


def _lighter(c):
  from matplotlib.colors import to_rgba_array

  rgba = to_rgba_array(c).copy()
  rgba[:, :3] += 0.15 * (1 - rgba[:, :3])
  return rgba


def _lighter_colours(fig):
  """Every colour moved 0.15 towards white (a grey 0.2 -> 0.32)."""
  from matplotlib.colors import to_rgba

  for a in _artists(fig):
    if hasattr(a, "set_markerfacecolor"):  # Line2D
      a.set_color(tuple(_lighter(a.get_color())[0]))
      a.set_markerfacecolor(tuple(_lighter(to_rgba(a.get_markerfacecolor()))[0]))
    else:
      a.set_facecolor(_lighter(a.get_facecolor()))
      a.set_edgecolor(_lighter(a.get_edgecolor()))


def _wider_lines(fig):
  """Every line and edge 0.5 pt wider."""
  for a in _artists(fig):
    lw = a.get_linewidth()
    a.set_linewidth(lw + 0.5 if not hasattr(lw, "__len__") else [w + 0.5 for w in lw])


@pytest.mark.parametrize("mutate", [_bigger_markers, _lighter_colours, _wider_lines])
@pytest.mark.parametrize("name", FIGURES)
def test_the_pixel_guard_detects_a_small_restyling(name, mutate, tmp_path):
  """Layer 2 flags a marker one point larger, lighter colours, wider lines."""
  from matplotlib.testing.compare import compare_images

  entry, record = _published(name)
  if mutate is _bigger_markers and not _has_markers(REGISTRY[name].plot(record["data"])):
    pytest.skip(f"{name} draws no markers")
  png = PUB / entry.chapter / f"{name}.png"
  fresh = _render(name, record["data"], tmp_path, mutate)
  assert compare_images(str(png), str(fresh), tol=PNG_TOL) is not None


# -- 3. what the reader sees --


def _notebooks():
  from dataweights import book

  return [ROOT / "book" / f"{c}.ipynb" for c in book.chapters(ROOT)]


def _image_outputs(nb):
  for c in nb["cells"]:
    if c["cell_type"] != "code":
      continue
    for out in c.get("outputs", []):
      data = out.get("data", {})
      if "image/png" in data:
        yield base64.b64decode(data["image/png"])


@pytest.mark.parametrize("nb_path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_shows_every_published_figure(nb_path):
  """Each registered figure of a chapter is an image output of its notebook.

  The image is byte-identical to the published PNG, so the rendered book
  shows exactly what was published.
  """
  nb = json.loads(nb_path.read_text())
  shown = set(_image_outputs(nb))
  for name in FIGURES:
    entry = REGISTRY[name]
    if entry.chapter != nb_path.stem:
      continue
    png = (PUB / entry.chapter / f"{name}.png").read_bytes()
    assert png in shown, (
      f"{nb_path.name} does not show {name}.png as an image output: end the cell with the "
      "figure returned by experiments.publish, then re-run the chapter")
  for c in nb["cells"]:
    for out in c.get("outputs", []):
      text = "".join(out.get("data", {}).get("text/plain", ""))
      assert not (text.startswith("<Figure size") and "image/png" not in out.get("data", {})), (
        f"{nb_path.name} stores a figure as text only ({text}): the book would show no image")


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
