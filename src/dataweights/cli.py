"""Command line: ``dataweights`` or ``python -m dataweights``.

  dataweights book [--profile P]        prepare data, run every chapter, build
  dataweights run CHAPTER... [--all]    run chapters with papermill
  dataweights build                     strict HTML build (warnings = errors)
  dataweights list                      chapters in _toc.yml order
  dataweights data prepare [...]        build the offline data sets

A chapter is named by its stem, its notebook or its path (``ch1_mixing``,
``book/ch1_mixing.ipynb``); every name is checked before anything runs.

Exit codes:
  0    success
  1    a chapter, the build or the data preparation failed (published
       outputs are left untouched; the message says what to do)
  2    usage error: unknown command, chapter, profile or option
  130  interrupted (Ctrl-C); published outputs are left untouched
"""

from __future__ import annotations

import argparse
import sys
import time

from dataweights.configs.base import PROFILES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="dataweights", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)

  b = sub.add_parser("book", help="prepare data, run all chapters, build the HTML book")
  b.add_argument("--profile", default="book", choices=PROFILES)
  b.add_argument("--no-build", action="store_true", help="skip the HTML build")
  b.add_argument("--no-progress", action="store_true")

  r = sub.add_parser("run", help="run chapters with papermill and publish their results")
  r.add_argument("chapters", nargs="*", help="chapter names (see `dataweights list`)")
  r.add_argument("--all", action="store_true", help="run every chapter")
  r.add_argument("--profile", default="book", choices=PROFILES,
                 help="book = the published CPU run; others go to runs/<profile>/")
  r.add_argument("--no-progress", action="store_true")

  sub.add_parser("build", help="build the HTML book strictly")
  sub.add_parser("list", help="list chapters")

  d = sub.add_parser("data", help="offline data sets")
  d.add_argument("data_args", nargs=argparse.REMAINDER,
                 help="`prepare [--only NAME ...] [--data-dir DIR] [--force] [--list]`")
  return p


def _prepare_data(args: list[str]) -> int:
  from dataweights.data import prepare

  return prepare.main(args)


def _error(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (see the module docstring)."""
  args = _parser().parse_args(argv)
  from dataweights import book
  from dataweights.configs.base import ConfigError

  t0 = time.perf_counter()
  try:
    if args.cmd == "list":
      print("\n".join(book.chapters()))
    elif args.cmd == "build":
      book.build()
    elif args.cmd == "run":
      if args.all and args.chapters:
        _error("name chapters or pass --all, not both")
        return EXIT_USAGE
      names = book.chapters() if args.all else args.chapters
      if not names:
        _error("name at least one chapter or pass --all; chapters: " + ", ".join(book.chapters()))
        return EXIT_USAGE
      book.run_chapters(names, args.profile, progress=not args.no_progress)
    elif args.cmd == "book":
      rc = _prepare_data([])
      if rc:
        return rc
      book.run_chapters(None, args.profile, progress=not args.no_progress)
      if not args.no_build and args.profile == book.PUBLISHED_PROFILE:
        book.build()
    elif args.cmd == "data":
      data_args = args.data_args or ["prepare"]
      if data_args[0] != "prepare":
        _error(f"unknown data command {data_args[0]!r}; allowed: prepare")
        return EXIT_USAGE
      return _prepare_data(data_args[1:])
  except KeyboardInterrupt:
    _error("interrupted; published outputs were left untouched")
    return EXIT_INTERRUPTED
  except book.ChapterInterrupted as e:
    _error(str(e))
    return EXIT_INTERRUPTED
  except (book.UnknownChapterError, ConfigError) as e:
    _error(str(e))
    return EXIT_USAGE
  except (book.ChapterError, book.BuildError, FileNotFoundError, OSError) as e:
    _error(str(e))
    return EXIT_FAILED
  print(f"[dataweights] finished in {time.perf_counter() - t0:.0f} s")
  return EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
