"""Wall time of every chapter under a profile, executed exactly as published.

Each chapter runs with papermill into a scratch directory (nothing published
is touched). The baseline, measured in the same run, is an empty notebook
that only imports jax: the fixed cost of a kernel.

  python benchmarks/bench_chapters.py --out bench-results/chapters.json [--profile book]

Floor (issue 2): Chapter 1 under ``book`` on 2 CPU cores takes <= 180 s.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nbformat
import papermill as pm

from dataweights import book


def _time_notebook(src: Path, cwd: Path, params: dict) -> float:
  with tempfile.TemporaryDirectory() as tmp:
    params = {**params, "results_dir": tmp} if "results_dir" in params else params
    t0 = time.perf_counter()
    pm.execute_notebook(str(src), str(Path(tmp) / "out.ipynb"), parameters=params,
                        kernel_name="python3", cwd=str(cwd), progress_bar=False)
    return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default="bench-results/chapters.json")
  ap.add_argument("--profile", default="book")
  ap.add_argument("--quick", action="store_true", help="smoke profile")
  ap.add_argument("--chapters", nargs="*")
  args = ap.parse_args()
  profile = "smoke" if args.quick else args.profile
  root = book.repo_root()
  with tempfile.TemporaryDirectory() as tmp:
    empty = Path(tmp) / "empty.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import jax\njax.devices()")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, empty)
    baseline = _time_notebook(empty, Path(tmp), {})
  rows = {}
  for ch in args.chapters or book.chapters(root):
    wall = _time_notebook(root / "book" / f"{ch}.ipynb", root / "book",
                          {"profile": profile, "results_dir": ""})
    rows[ch] = {"wall_s": round(wall, 1), "ratio_to_empty_kernel": round(wall / baseline, 1)}
    print(f"{ch}: {wall:.1f} s ({wall / baseline:.1f}x an empty kernel)")
  out = {
    "profile": profile, "cpu_count": os.cpu_count(),
    "empty_kernel_s": round(baseline, 2), "chapters": rows,
    "floor": {"ch1_mixing_book_max_s": 180,
              "ok": rows.get("ch1_mixing", {}).get("wall_s", 0) <= 180 if profile == "book" else None},
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  main()
