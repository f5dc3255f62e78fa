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


# -- robustness: nothing published is lost, errors are one clear line --


def _published_state(root: Path) -> dict[str, bytes]:
  files = [root / "book" / "ch.ipynb", *sorted((root / "book" / "results").rglob("*"))]
  return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


def _no_run(*a, **k):
  raise AssertionError("the chapter must not be executed")


@pytest.fixture
def published(tmp_path):
  _make_book(tmp_path, GOOD)
  book.run_chapter("ch", "book", root=tmp_path, progress=False, log=lambda s: None)
  return tmp_path


@pytest.mark.slow
def test_published_files_have_normal_permissions(published):
  import stat

  mode = 0o666 & ~_umask()
  for p in [published / "book" / "ch.ipynb", published / "book/results/ch/r.json"]:
    assert stat.S_IMODE(p.stat().st_mode) == mode, f"{p} has mode {oct(p.stat().st_mode)}"
  assert stat.S_IMODE((published / "book/results/ch").stat().st_mode) == 0o777 & ~_umask()


def _umask():
  import os

  m = os.umask(0)
  os.umask(m)
  return m


@pytest.mark.slow
def test_a_failed_swap_rolls_back_and_keeps_the_published_run(published, monkeypatch):
  import os

  before = _published_state(published)
  real_replace = os.replace

  def failing_replace(src, dst):
    if str(dst).endswith("ch.ipynb"):  # the last step: the notebook
      raise PermissionError(13, "Permission denied", str(dst))
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(book.ChapterError, match="publishing it failed.*left as they were"):
    book.run_chapter("ch", "book", root=published, progress=False, log=lambda s: None)
  monkeypatch.undo()
  assert _published_state(published) == before
  leftovers = [p.name for p in (published / "book").rglob(".*")]
  assert not leftovers, f"staging files left behind: {leftovers}"
  assert not list((published / "_build" / "scratch").iterdir())


def test_unwritable_destinations_fail_before_executing(tmp_path, monkeypatch):
  import papermill

  _make_book(tmp_path, GOOD)
  monkeypatch.setattr(papermill, "execute_notebook", _no_run)
  (tmp_path / "book" / "results").write_text("a file where a folder belongs")
  with pytest.raises(book.ChapterError, match=r"results.* is not a directory"):
    book.run_chapter("ch", "book", root=tmp_path, progress=False, log=lambda s: None)
  with pytest.raises(book.ChapterError, match=r"is not a directory"):
    book.run_chapter("ch", "smoke", root=tmp_path, out_dir=tmp_path / "book" / "results" / "x",
                     progress=False, log=lambda s: None)


def test_every_chapter_name_is_checked_before_any_runs(tmp_path, monkeypatch):
  import papermill

  _make_book(tmp_path, GOOD)
  assert book.resolve_chapters(["ch", "ch.ipynb", "book/ch.ipynb"], tmp_path) == ["ch"] * 3
  monkeypatch.setattr(papermill, "execute_notebook", _no_run)
  with pytest.raises(book.UnknownChapterError, match=r"unknown chapters 'nope', 'other/ch.ipynb'.*ch"):
    book.run_chapters(["ch", "nope", "other/ch.ipynb"], root=tmp_path, progress=False)


def test_a_truncated_notebook_is_a_clear_error(tmp_path):
  _make_book(tmp_path, GOOD)
  nb = tmp_path / "book" / "ch.ipynb"
  nb.write_text(nb.read_text()[:100])
  with pytest.raises(book.ChapterError, match=r"not a readable notebook.*git checkout -- book/ch.ipynb"):
    book.run_chapter("ch", "book", root=tmp_path, progress=False, log=lambda s: None)


def test_ctrl_c_leaves_the_published_run_and_no_scratch(published, monkeypatch):
  import papermill

  before = _published_state(published)

  def interrupted(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(papermill, "execute_notebook", interrupted)
  with pytest.raises(book.ChapterInterrupted, match="interrupted.*left untouched"):
    book.run_chapter("ch", "book", root=published, progress=False, log=lambda s: None)
  assert _published_state(published) == before
  assert not list((published / "_build" / "scratch").iterdir())


@pytest.mark.parametrize(
  "argv, raised, code, message",
  [
    (["run", "nope"], None, 2, "error: unknown chapter 'nope'; chapters in _toc.yml: ch"),
    (["run", "--all", "ch"], None, 2, "error: name chapters or pass --all, not both"),
    (["run", "ch"], book.ChapterError("chapter 'ch' failed in cell [2]: boom"), 1, "error: chapter 'ch' failed"),
    (["run", "ch"], KeyboardInterrupt(), 130, "error: interrupted; published outputs were left untouched"),
    (["build"], book.BuildError("jupyter-book build failed (exit 1)"), 1, "error: jupyter-book build failed"),
  ],
)
def test_cli_errors_are_one_line_with_documented_exit_codes(
  argv, raised, code, message, tmp_path, monkeypatch, capsys
):
  from dataweights import cli

  _make_book(tmp_path, GOOD)
  monkeypatch.chdir(tmp_path)

  def fail(*a, **k):
    raise raised

  if raised is not None:
    monkeypatch.setattr(book, "run_chapters" if argv[0] == "run" else "build", fail)
  assert cli.main(argv) == code
  err = capsys.readouterr().err
  assert err.startswith(message) and "Traceback" not in err
  assert err.count("\n") == 1 + (argv[0] != "list" and code == 0), err
  assert f"  {code} " in cli.__doc__ or f"  {code}  " in cli.__doc__
