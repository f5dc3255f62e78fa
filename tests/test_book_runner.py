"""The papermill runner publishes atomically and never loses published work."""

import json
from pathlib import Path

import nbformat
import pytest

from dataweights import book
from dataweights.configs.base import ConfigError


def _make_book(root: Path, body: str) -> None:
  (root / "book").mkdir(parents=True, exist_ok=True)
  (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/ch\n")
  (root / "book" / "intro.md").write_text("# intro\n")
  nb = nbformat.v4.new_notebook()
  params = nbformat.v4.new_code_cell('profile = "book"\nresults_dir = ""')
  params.metadata["tags"] = ["parameters"]
  nb.cells = [params, nbformat.v4.new_code_cell(body)]
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nbformat.write(nb, root / "book" / "ch.ipynb")


GOOD = (
  "import json, pathlib\n"
  "if results_dir:\n"
  "  pathlib.Path(results_dir, 'r.json').write_text(json.dumps({'profile': profile, 'x': 1}))\n"
  "print('value', 42)"
)


@pytest.mark.slow
def test_run_publishes_then_failure_keeps_published_outputs(tmp_path):
  _make_book(tmp_path, GOOD)
  assert book.chapters(tmp_path) == ["ch"]
  run = book.run_chapter("ch", "book", root=tmp_path, progress=False, log=lambda s: None)
  published_nb = tmp_path / "book" / "ch.ipynb"
  published_json = tmp_path / "book" / "results" / "ch" / "r.json"
  assert run.notebook == published_nb
  assert json.loads(published_json.read_text()) == {"profile": "book", "x": 1}
  nb = nbformat.read(published_nb, as_version=4)
  assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
  assert "value 42" in nb.cells[-1].outputs[0]["text"]
  assert "papermill" not in nb.cells[-1].metadata
  before_json = published_json.read_bytes()

  # A failing chapter: nothing published changes, the failure is kept and reported.
  failing = nbformat.read(published_nb, as_version=4)
  failing.cells[-1].source = "raise RuntimeError('boom in cell')"
  nbformat.write(failing, published_nb)  # the source notebook is the published one
  with pytest.raises(book.ChapterError, match="boom in cell") as err:
    book.run_chapter("ch", "book", root=tmp_path, progress=False, log=lambda s: None)
  assert "left untouched" in str(err.value)
  assert published_json.read_bytes() == before_json
  assert (tmp_path / "_build" / "failed" / "ch.book.ipynb").exists()
  assert not list((tmp_path / "_build" / "scratch").iterdir())


@pytest.mark.slow
def test_other_profiles_never_touch_the_published_run(tmp_path):
  _make_book(tmp_path, GOOD)
  run = book.run_chapter("ch", "smoke", root=tmp_path, progress=False, log=lambda s: None)
  assert run.notebook == tmp_path / "runs" / "smoke" / "ch.ipynb"
  assert json.loads((tmp_path / "runs/smoke/results/ch/r.json").read_text())["profile"] == "smoke"
  assert not (tmp_path / "book" / "results").exists()


def test_unknown_chapter_and_profile_are_clear_errors(tmp_path):
  _make_book(tmp_path, GOOD)
  with pytest.raises(book.ChapterError, match=r"unknown chapter 'nope'.*ch"):
    book.run_chapter("nope", root=tmp_path)
  with pytest.raises(ConfigError, match=r"unknown profile 'fast'.*smoke, book, paper"):
    book.run_chapter("ch", "fast", root=tmp_path)


def test_cli_lists_chapters(capsys, monkeypatch, tmp_path):
  from dataweights import cli

  _make_book(tmp_path, GOOD)
  monkeypatch.chdir(tmp_path)
  assert cli.main(["list"]) == 0
  assert capsys.readouterr().out.split()[0] == "ch"
  assert cli.main(["run"]) == 2


def test_cli_book_prepares_data_runs_chapters_and_builds(monkeypatch):
  """``dataweights book`` = data prepare (default flags) + run all + build."""
  from dataweights import cli
  from dataweights.data import prepare

  calls = []
  monkeypatch.setattr(prepare, "main", lambda argv: calls.append(("prepare", list(argv))) or 0)
  monkeypatch.setattr(book, "run_chapters", lambda names, profile, progress: calls.append(("run", names, profile)))
  monkeypatch.setattr(book, "build", lambda: calls.append(("build",)))
  assert cli.main(["book", "--no-progress"]) == 0
  assert calls == [("prepare", []), ("run", None, "book"), ("build",)]
  calls.clear()
  assert cli.main(["data", "prepare", "--only", "dw_adult"]) == 0
  assert calls == [("prepare", ["--only", "dw_adult"])]
  assert cli.main(["data", "erase"]) == 2


def test_cli_data_prepare_list_runs_the_real_parser(capsys):
  from dataweights import cli

  assert cli.main(["data", "prepare", "--list"]) == 0
  assert "dw_text_domains" in capsys.readouterr().out
