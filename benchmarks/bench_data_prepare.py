"""One-time preparation cost of all offline data sets.

Times a cold ``prepare()`` (empty data directory: downloads + builds) and
a warm one (everything verified, nothing rebuilt; the baseline), and
reports disk sizes. JSON to ``--out``.

  python benchmarks/bench_data_prepare.py --out bench_data_prepare.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shutil
import tempfile
import time

from dataweights.data import prepare


def _du(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="bench_data_prepare.json")
  ap.add_argument("--data-dir", default=None, help="default: a temp dir")
  args = ap.parse_args(argv)
  root = pathlib.Path(args.data_dir or tempfile.mkdtemp(prefix="dw_bench_"))
  shutil.rmtree(root, ignore_errors=True)
  t0 = time.perf_counter()
  cold = prepare.prepare(data_dir=str(root), progress=False)
  cold_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  warm = prepare.prepare(data_dir=str(root), progress=False)
  warm_s = time.perf_counter() - t0
  assert not any(v["rebuilt"] for v in warm.values())
  res = {
    "host": platform.node(),
    "python": platform.python_version(),
    "cold_seconds": round(cold_s, 2),
    "warm_seconds": round(warm_s, 2),
    "cold_over_warm": round(cold_s / max(warm_s, 1e-9), 1),
    "wheels_bytes": _du(root / "_wheels"),
    "total_bytes": _du(root),
    "datasets": {
      n: {
        "build_seconds": v["build_seconds"],
        "bytes_on_disk": v["bytes_on_disk"],
        "num_examples": v["num_examples"],
      }
      for n, v in cold.items()
    },
  }
  pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  print(json.dumps(res, indent=1))
  if args.data_dir is None:
    shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
