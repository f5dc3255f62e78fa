"""Property-based tests of the command line: no input gives a traceback.

Random argument lists, built from the CLI's own words, chapter names in every
accepted spelling, and arbitrary text, either run or fail with one ``error:``
line (or argparse's usage message) and a documented exit code. The expensive
actions (executing chapters, building, preparing data) are replaced by fakes
that still validate their inputs as the real ones do, so the property is
about the CLI's handling of arguments and errors.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataweights import book, cli
from dataweights.data import prepare

WORDS = ["book", "run", "build", "list", "data", "prepare", "erase", "--all", "--profile",
         "smoke", "book", "paper", "fast", "--no-progress", "--no-build", "--only", "--data-dir",
         "--force", "--list", "--quiet", "dw_adult", "dw_nope", "-h", "--help", "--", "-"]
CHAPTERS = ["ch1_mixing", "ch1_mixing.ipynb", "book/ch1_mixing.ipynb", "appendix_data",
            "other/ch1_mixing.ipynb", "ch9", ""]
ARG = st.one_of(st.sampled_from(WORDS), st.sampled_from(CHAPTERS),
                st.text(min_size=0, max_size=12))


@pytest.fixture
def fakes(monkeypatch, tmp_path):
  calls = []

  def run_chapters(names, profile="book", **kw):
    if names:
      book.resolve_chapters(names)  # unknown names fail as in the real runner
    calls.append(("run", names, profile))

  monkeypatch.setattr(book, "run_chapters", run_chapters)
  monkeypatch.setattr(book, "build", lambda *a, **k: calls.append(("build",)))
  monkeypatch.setattr(prepare, "prepare", lambda *a, **k: calls.append(("prepare",)) or {})
  monkeypatch.setenv("DATAWEIGHTS_DATA_DIR", str(tmp_path / "data"))
  return calls


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(ARG, max_size=6))
def test_random_arguments_never_give_a_traceback(argv, fakes, capsys):
  try:
    code = cli.main(argv)
  except SystemExit as e:  # argparse: --help (0) or a usage error (2)
    code = e.code
    assert code in (0, 2), f"argparse exited with {code} for {argv}"
  assert code in (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_INTERRUPTED), (argv, code)
  err = capsys.readouterr().err
  assert "Traceback" not in err, f"{argv} printed a traceback:\n{err}"
  if code not in (0,) and err:
    last = err.strip().split("\n")[-1]  # not splitlines: arguments may hold \r
    assert last.startswith(("error:", "dataweights", "usage:")) or ": error:" in last, (argv, err)
