"""Command line: ``dataweights`` or ``python -m dataweights``.

  dataweights book [--profile P]        prepare data, run every chapter, build
  dataweights run CHAPTER... [--all]    run chapters with papermill
  dataweights build                     strict HTML build (warnings = errors)
  dataweights list                      chapters in _toc.yml order
  dataweights data prepare [...]        build the offline data sets
"""

from __future__ import annotations

import argparse
import sys
import time

from dataweights.configs.base import PROFILES


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


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from dataweights import book

  t0 = time.perf_counter()
  try:
    if args.cmd == "list":
      print("\n".join(book.chapters()))
    elif args.cmd == "build":
      book.build()
    elif args.cmd == "run":
      names = book.chapters() if args.all else args.chapters
      if not names:
        print("error: name at least one chapter or pass --all; chapters: "
              + ", ".join(book.chapters()), file=sys.stderr)
        return 2
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
        print(f"error: unknown data command {data_args[0]!r}; allowed: prepare", file=sys.stderr)
        return 2
      return _prepare_data(data_args[1:])
  except (book.ChapterError, book.BuildError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"[dataweights] finished in {time.perf_counter() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
