"""Cost of one outer round of data mixing against T plain inner steps.

One outer round of ``methods.mixing.run_mixing`` is T inner steps plus the
hypergradient through them (Proposition 4.1, papers.md §1). Measured in one
run, for T in {1, 10, 100, 1000} and K (= m domains) in {2, 4, 8}:

* **plain** (the baseline): ``bilevel.inner_steps``, T gradient steps;
* **forward**: ``bilevel.hypergrad_forward`` (K JVP directions through the
  scan: carries θ and Z_K, memory independent of T);
* **reverse**: ``bilevel.hypergrad_reverse`` (backprop through the scan);
* **reverse_remat**: the same with ``jax.checkpoint`` on each inner step.

Each is jitted and compiled once (``jax.jit(f).lower(...).compile()``)
and timed after compilation: the minimum over repeats (the estimate least
disturbed by other processes on a shared machine; medians are stored
too), each repeat long enough to hide dispatch, the modes alternating
within each repeat so that outside load hits them alike. Compiled memory
comes from XLA's ``memory_analysis()`` (temp / argument / output bytes).
Each cell reports ``ratio = time(mode) / time(plain)`` at the same T, K.

Problem (representative of the chapter's small-MLP experiments): a tanh
MLP regressor 32 -> 32 -> 1 (|θ| = 1089 parameters, float32), full batch of
256 training examples split evenly over the K domains (so the plain step
costs the same for every K), 64 validation examples, squared loss.

Floors (task brief):
1. forward-mode memory does not grow with T: for every K, XLA temp bytes
   at the largest T are within 1% of those at the second-largest T
   (T >= 2; a length-1 scan is compiled with a smaller fixed buffer set,
   so T = 1 is reported but not compared). The JSON also gives each mode's
   extra bytes per extra inner step;
2. for K <= 4 and T >= 100 forward is no slower than reverse (min time).

  python benchmarks/bench_mixing.py --out bench-results/mixing.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.methods import bilevel

D_IN, HIDDEN, M_TRAIN, M_VAL, LR = 32, 32, 256, 64, 0.05


def make_problem(K: int, seed: int = 0):
  """The benchmark's MLP problem with K domains; returns (problem, params)."""
  rng = np.random.default_rng(seed)
  M = M_TRAIN // K
  x_KxMxD = rng.normal(size=(K, M, D_IN)).astype(np.float32)
  shift_KxD = rng.normal(size=(K, 1, D_IN)).astype(np.float32)
  u_D = rng.normal(size=D_IN).astype(np.float32) / np.sqrt(D_IN)
  y_KxM = np.sin((x_KxMxD + 0.3 * shift_KxD) @ u_D).astype(np.float32)
  xv_MxD = rng.normal(size=(M_VAL, D_IN)).astype(np.float32)
  yv_M = np.sin(xv_MxD @ u_D).astype(np.float32)
  x_KxMxD, y_KxM = jnp.asarray(x_KxMxD), jnp.asarray(y_KxM)
  xv_MxD, yv_M = jnp.asarray(xv_MxD), jnp.asarray(yv_M)
  params = {
    "W1_DxH": jnp.asarray(
      rng.normal(size=(D_IN, HIDDEN)) / np.sqrt(D_IN), jnp.float32
    ),
    "b1_H": jnp.zeros(HIDDEN, jnp.float32),
    "w2_H": jnp.asarray(rng.normal(size=HIDDEN) / np.sqrt(HIDDEN), jnp.float32),
    "b2": jnp.zeros((), jnp.float32),
  }

  def predict(p, x_MxD):
    h_MxH = jnp.tanh(x_MxD @ p["W1_DxH"] + p["b1_H"][None])
    return h_MxH @ p["w2_H"] + p["b2"]

  def domain_losses(p, batch):
    return jax.vmap(lambda x, y: 0.5 * jnp.mean((predict(p, x) - y) ** 2))(
      x_KxMxD, y_KxM
    )

  def val_loss(p, batch):
    return 0.5 * jnp.mean((predict(p, xv_MxD) - yv_M) ** 2)

  return bilevel.MixingProblem(domain_losses, val_loss), params


def _modes(problem, T):
  return {
    "plain": lambda p, w: bilevel.inner_steps(problem, p, w, lr=LR, T=T),
    "forward": lambda p, w: bilevel.hypergrad_forward(
      problem, p, w, lr=LR, T=T
    ),
    "reverse": lambda p, w: bilevel.hypergrad_reverse(
      problem, p, w, lr=LR, T=T
    ),
    "reverse_remat": lambda p, w: bilevel.hypergrad_reverse(
      problem, p, w, lr=LR, T=T, remat=True
    ),
  }


def _time_interleaved(
  compiled: dict, args, repeats: int, min_s: float
) -> dict[str, dict[str, float]]:
  """Median/min seconds per call; modes alternate within each repeat so
  that load from other processes hits every mode alike."""
  number = {}
  for name, fn in compiled.items():
    jax.block_until_ready(fn(*args))  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    number[name] = max(1, int(min_s / max(time.perf_counter() - t0, 1e-9)))
  per_call = {name: [] for name in compiled}
  for _ in range(repeats):
    for name, fn in compiled.items():
      t0 = time.perf_counter()
      for _ in range(number[name]):
        out = fn(*args)
      jax.block_until_ready(out)
      per_call[name].append((time.perf_counter() - t0) / number[name])
  return {
    name: {
      "median_s": statistics.median(ts),
      "min_s": min(ts),
      "calls_per_repeat": number[name],
    }
    for name, ts in per_call.items()
  }


def _memory(compiled) -> dict[str, int] | None:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  mem = {
    "temp_bytes": int(stats.temp_size_in_bytes),
    "argument_bytes": int(stats.argument_size_in_bytes),
    "output_bytes": int(stats.output_size_in_bytes),
    "alias_bytes": int(getattr(stats, "alias_size_in_bytes", 0)),
  }
  mem["total_bytes"] = (
    mem["temp_bytes"]
    + mem["argument_bytes"]
    + mem["output_bytes"]
    - mem["alias_bytes"]
  )
  return mem


def bench_cell(K: int, T: int, repeats: int, min_s: float) -> dict:
  """One (K, T) cell: time and compiled memory of every mode."""
  problem, params = make_problem(K)
  w_K = jnp.full((K,), 1.0 / K, jnp.float32)
  cell = {"K": K, "T": T, "modes": {}}
  compiled, outs = {}, {}
  for name, fn in _modes(problem, T).items():
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(params, w_K).compile()
    cell["modes"][name] = {
      "compile_s": time.perf_counter() - t0,
      "memory": _memory(compiled[name]),
    }
    outs[name] = compiled[name](params, w_K)
  timing = _time_interleaved(compiled, (params, w_K), repeats, min_s)
  for name, t in timing.items():
    cell["modes"][name].update(t)
  base = cell["modes"]["plain"]["min_s"]
  for m in cell["modes"].values():
    m["ratio_to_plain"] = m["min_s"] / base
  h_f, h_r = np.asarray(outs["forward"][0]), np.asarray(outs["reverse"][0])
  cell["max_abs_forward_minus_reverse"] = float(np.max(np.abs(h_f - h_r)))
  cell["max_abs_h"] = float(np.max(np.abs(h_r)))
  return cell


def floors(cells: list[dict]) -> dict:
  """The two floors of the brief, computed from the measured cells."""
  out = {}
  mem_rows = []
  for K in sorted({c["K"] for c in cells}):
    row = sorted((c for c in cells if c["K"] == K), key=lambda c: c["T"])
    if any(m["memory"] is None for c in row for m in c["modes"].values()):
      mem_rows.append({"K": K, "ok": None, "why": "no memory_analysis"})
      continue
    temp = {
      mode: {c["T"]: c["modes"][mode]["memory"]["temp_bytes"] for c in row}
      for mode in ("forward", "reverse", "reverse_remat")
    }
    # Compare the two largest horizons with T >= 2 (a trip-count-1 scan is
    # compiled with a smaller fixed buffer set; reported, not used).
    big = [c["T"] for c in row if c["T"] >= 2][-2:]
    r = {"K": K, "temp_bytes_by_T": temp}
    if len(big) == 2:
      t0, t1 = big
      r["T_pair"] = big
      for mode in temp:
        r[f"{mode}_bytes_per_extra_step"] = (
          temp[mode][t1] - temp[mode][t0]
        ) / (t1 - t0)
      r["ok"] = temp["forward"][t1] <= 1.01 * temp["forward"][t0]
    else:
      r["ok"] = None
    mem_rows.append(r)
  oks = [r["ok"] for r in mem_rows]
  out["forward_memory_flat_in_T"] = {
    "ok": None if None in oks or not oks else all(oks),
    "rule": "forward temp bytes at the largest T <= 1.01 x at the "
    "second-largest T (T >= 2)",
    "rows": mem_rows,
  }
  speed_rows = []
  for c in cells:
    if c["K"] <= 4 and c["T"] >= 100:
      f = c["modes"]["forward"]["min_s"]
      r = c["modes"]["reverse"]["min_s"]
      rr = c["modes"]["reverse_remat"]["min_s"]
      speed_rows.append(
        {
          "K": c["K"],
          "T": c["T"],
          "forward_over_reverse": f / r,
          "forward_over_reverse_remat": f / rr,
          "ok": f <= r,
        }
      )
  out["forward_no_slower_than_reverse_K_le_4_T_ge_100"] = {
    "ok": all(r["ok"] for r in speed_rows) if speed_rows else None,
    "rows": speed_rows,
  }
  return out


def main() -> None:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  ap.add_argument("--out", default="bench-results/mixing.json")
  ap.add_argument(
    "--quick",
    action="store_true",
    help="T in {1, 10, 100}, K in {2, 4}, fewer repeats",
  )
  ap.add_argument("--T", type=int, nargs="*", help="override the T grid")
  ap.add_argument("--K", type=int, nargs="*", help="override the K grid")
  args = ap.parse_args()
  Ts = args.T or ([1, 10, 100] if args.quick else [1, 10, 100, 1000])
  Ks = args.K or ([2, 4] if args.quick else [2, 4, 8])
  repeats, min_s = (5, 0.02) if args.quick else (9, 0.05)
  cells = []
  for K in Ks:
    for T in Ts:
      c = bench_cell(K, T, repeats, min_s)
      cells.append(c)
      m = c["modes"]
      print(
        f"K={K} T={T:5d}  plain {m['plain']['min_s'] * 1e3:9.3f} ms  "
        + "  ".join(
          f"{n} x{m[n]['ratio_to_plain']:6.2f}"
          for n in ("forward", "reverse", "reverse_remat")
        )
        + "  temp KiB "
        + " ".join(
          f"{n[:3]}={(m[n]['memory'] or {}).get('temp_bytes', -1) / 1024:.0f}"
          for n in ("forward", "reverse", "reverse_remat")
        ),
        flush=True,
      )
  out = {
    "benchmark": "mixing_outer_round_vs_plain_steps",
    "problem": {
      "model": f"tanh MLP {D_IN}->{HIDDEN}->1, float32",
      "num_params": D_IN * HIDDEN + 2 * HIDDEN + 1,
      "train_examples_total": M_TRAIN,
      "val_examples": M_VAL,
      "lr": LR,
      "batch": "full batch",
    },
    "grid": {"T": Ts, "K": Ks, "repeats": repeats, "min_repeat_s": min_s},
    "device": str(jax.devices()[0]),
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "jax": jax.__version__,
    "quick": args.quick,
    "cells": cells,
    "floors": floors(cells),
  }
  for name, f in out["floors"].items():
    print(f"floor {name}: {'OK' if f['ok'] else 'FAILED'}")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
