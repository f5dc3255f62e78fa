"""Cost of one outer round of data mixing against T plain inner steps.

One outer round of ``methods.mixing.run_mixing`` is T inner steps plus the
hypergradient through them (Proposition 4.1; the book's Sources §1). Measured in one
run, for T in {1, 10, 100, 1000} and K (= m domains) in {2, 4, 8}:

* **plain** (the baseline): ``bilevel.inner_steps``, T gradient steps;
* **forward**: ``bilevel.hypergrad_forward`` (K JVP directions through the
  scan: carries θ and Z_K, memory independent of T);
* **reverse**: ``bilevel.hypergrad_reverse`` (backprop through the scan);
* **reverse_remat**: the same with ``jax.checkpoint`` on each inner step;
* **auto**: ``bilevel.hypergrad(mode="auto")``, the mode chosen by the
  cost model of ``bilevel.choose_hypergrad_mode``; floor 3 compares the
  chosen mode's time with the fastest mode's in each cell.

Each is jitted and compiled once (``jax.jit(f).lower(...).compile()``)
and timed after compilation, the modes alternating within each repeat so
that outside load hits them alike, each repeat long enough to hide
dispatch. On CPU, XLA runs single-threaded (set below, before JAX starts;
``--multithread`` keeps XLA's default) and ratios use the *process CPU
time*, minimum over repeats: on a shared machine wall time mostly measures
the other tenants (wall times are stored too). On GPU, wall time is used.
Compiled memory comes from XLA's ``memory_analysis()`` (temp / argument /
output bytes).
Each cell reports ``ratio = time(mode) / time(plain)`` at the same T, K.

Problems (``--problem``, default both), full batch, float32, lr 0.05:

* ``mlp``: a tanh MLP regressor 32 -> 32 -> 1 (|θ| = 1089), 256 training
  examples split evenly over the K domains (the plain step costs the same
  for every K), 64 validation examples, squared loss; compute-bound with
  large per-step residuals (activations) for reverse mode;
* ``logistic``: logistic regression on 1024 features (|θ| = 1025), 512
  training examples split over K domains with label noise growing with
  the domain index; matrix-vector bound with tiny per-step residuals.
  Its 2.25 MiB of features sit at the 2 MiB L2 of one core of the
  development machine, where forward and reverse mode trade places between
  processes; ``--logistic-features 256 512 2048 4096`` runs the same
  problem (``logistic_<D>``) with data well inside and well outside that
  cache, the two regimes of ``bilevel.choose_hypergrad_mode``.

Data as constants or arguments. By default each problem closes over its
data, so XLA compiles them in as constants. ``--data-as-args`` builds the
problem inside the jitted function from data passed as arguments, as a
caller does whose data are not known at compile time. On XLA:CPU this
changes reverse mode: its backward loop multiplies by the data transposed,
and the transposed copy of a constant is folded at compile time, while that
of an argument is made again in every backward step (XLA does not hoist
it out of the loop; no ``xla_cpu_*`` library option tried changes that).

Floors (task brief):
1. forward-mode memory does not grow with T: for every K, XLA temp bytes
   at the largest T are within 1% of those at the second-largest T
   (T >= 2; a length-1 scan is compiled with a smaller fixed buffer set,
   so T = 1 is reported but not compared). The JSON also gives each mode's
   extra bytes per extra inner step;
2. for K <= 4 and T >= 100 forward is no slower than reverse (min time);
3. auto is within 10% of the fastest mode in every cell.

What to expect: forward mode does K Hessian-vector products per inner
step, reverse mode about one, so on FLOPs forward loses once K >= 2; it
wins on memory always and on time only where reverse mode is memory-bound
(long T with large residuals). The floors are reported as measured.

  python benchmarks/bench_mixing.py --out bench-results/mixing.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--multithread" not in sys.argv:  # must precede the first use of JAX
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  ).strip()

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.methods import bilevel

D_IN, HIDDEN, M_TRAIN, M_VAL, LR = 32, 32, 256, 64, 0.05
D_LOGIT, M_LOGIT = 1024, 512  # logistic regression: features, train examples
TIME_KEY = "cpu_min_s"  # what ratios and floors use (see the docstring)
DATA_AS_ARGS = False  # --data-as-args (see the docstring)


def make_mlp(K: int, seed: int = 0):
  """The MLP problem with K domains; returns (build, data, params).

  ``build(data)`` is the :class:`bilevel.MixingProblem` closing over
  ``data`` (see ``make_problem``).
  """
  rng = np.random.default_rng(seed)
  M = M_TRAIN // K
  x_KxMxD = rng.normal(size=(K, M, D_IN)).astype(np.float32)
  shift_KxD = rng.normal(size=(K, 1, D_IN)).astype(np.float32)
  u_D = rng.normal(size=D_IN).astype(np.float32) / np.sqrt(D_IN)
  y_KxM = np.sin((x_KxMxD + 0.3 * shift_KxD) @ u_D).astype(np.float32)
  xv_MxD = rng.normal(size=(M_VAL, D_IN)).astype(np.float32)
  yv_M = np.sin(xv_MxD @ u_D).astype(np.float32)
  data = tuple(jnp.asarray(a) for a in (x_KxMxD, y_KxM, xv_MxD, yv_M))
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

  def build(data):
    x_KxMxD, y_KxM, xv_MxD, yv_M = data

    def domain_losses(p, batch):
      return jax.vmap(lambda x, y: 0.5 * jnp.mean((predict(p, x) - y) ** 2))(
        x_KxMxD, y_KxM
      )

    def val_loss(p, batch):
      return 0.5 * jnp.mean((predict(p, xv_MxD) - yv_M) ** 2)

    return bilevel.MixingProblem(domain_losses, val_loss)

  return build, data, params


def make_logistic(K: int, seed: int = 0, features: int = D_LOGIT):
  """Logistic regression with K domains; returns (build, data, params)."""
  rng = np.random.default_rng(seed)
  M = M_LOGIT // K
  u_D = rng.normal(size=features) / np.sqrt(features)
  x_KxMxD = rng.normal(size=(K, M, features))
  flip_K = np.linspace(0.0, 0.4, K)[:, None]  # domain k: labels flipped
  y_KxM = ((x_KxMxD @ u_D > 0) ^ (rng.uniform(size=(K, M)) < flip_K)) * 1.0
  xv_MxD = rng.normal(size=(M_VAL, features))
  yv_M = (xv_MxD @ u_D > 0) * 1.0
  data = tuple(
    jnp.asarray(a, jnp.float32) for a in (x_KxMxD, y_KxM, xv_MxD, yv_M)
  )
  params = {
    "w_D": jnp.zeros(features, jnp.float32),
    "b": jnp.zeros((), jnp.float32),
  }

  def nll(p, x_MxD, y_M):
    z_M = x_MxD @ p["w_D"] + p["b"]
    return jnp.mean(jnp.logaddexp(0.0, z_M) - y_M * z_M)

  def build(data):
    x_KxMxD, y_KxM, xv_MxD, yv_M = data

    def domain_losses(p, batch):
      return jax.vmap(lambda x, y: nll(p, x, y))(x_KxMxD, y_KxM)

    def val_loss(p, batch):
      return nll(p, xv_MxD, yv_M)

    return bilevel.MixingProblem(domain_losses, val_loss)

  return build, data, params


def _logistic_description(D: int) -> str:
  return (
    f"logistic regression, {D} features (+bias: {D + 1} params), float32, "
    f"{M_LOGIT} train examples split over K domains, {M_VAL} validation; "
    f"{(M_LOGIT + M_VAL) * D * 4 / 2**20:.2f} MiB of features"
  )


PROBLEMS = {
  "mlp": (
    make_mlp,
    f"tanh MLP {D_IN}->{HIDDEN}->1, float32, "
    f"{D_IN * HIDDEN + 2 * HIDDEN + 1} params, {M_TRAIN} train "
    f"examples split over K domains, {M_VAL} validation",
  ),
  "logistic": (make_logistic, _logistic_description(D_LOGIT)),
}


def logistic_name(features: int) -> str:
  """The problem name of logistic regression on ``features`` features."""
  return "logistic" if features == D_LOGIT else f"logistic_{features}"


def _logistic_features(name: str) -> int | None:
  """D of a problem name ``logistic_<D>``; None for the PROBLEMS names."""
  prefix = "logistic_"
  return int(name[len(prefix) :]) if name.startswith(prefix) else None


def make_problem(name: str, K: int):
  """(build, data, params) of a problem name: PROBLEMS or logistic_<D>."""
  D = _logistic_features(name)
  return PROBLEMS[name][0](K) if D is None else make_logistic(K, features=D)


def describe(name: str) -> str:
  D = _logistic_features(name)
  return PROBLEMS[name][1] if D is None else _logistic_description(D)


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
    # chosen at trace time by the cost model: the same program as the
    # chosen mode's
    "auto": lambda p, w: bilevel.hypergrad(
      problem, p, w, lr=LR, T=T, mode="auto"
    ),
  }


def _time_interleaved(
  compiled: dict, args, repeats: int, min_s: float
) -> dict[str, dict[str, float]]:
  """Seconds per call, wall and process CPU, min and median over repeats.

  The modes alternate within each repeat so that outside load hits every
  mode alike.
  """
  number = {}
  for name, fn in compiled.items():
    jax.block_until_ready(fn(*args))  # warm-up
    t0 = time.process_time()
    jax.block_until_ready(fn(*args))
    number[name] = max(1, int(min_s / max(time.process_time() - t0, 1e-6)))
  wall = {name: [] for name in compiled}
  cpu = {name: [] for name in compiled}
  for _ in range(repeats):
    for name, fn in compiled.items():
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(number[name]):
        out = fn(*args)
      jax.block_until_ready(out)
      wall[name].append((time.perf_counter() - t0) / number[name])
      cpu[name].append((time.process_time() - c0) / number[name])
  return {
    name: {
      "cpu_min_s": min(cpu[name]),
      "cpu_median_s": statistics.median(cpu[name]),
      "wall_min_s": min(wall[name]),
      "wall_median_s": statistics.median(wall[name]),
      "calls_per_repeat": number[name],
    }
    for name in compiled
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


def bench_cell(name: str, K: int, T: int, repeats: int, min_s: float) -> dict:
  """One (problem, K, T) cell: time and compiled memory of every mode."""
  build, data, params = make_problem(name, K)
  problem = build(data)  # closes over the data: XLA constants
  w_K = jnp.full((K,), 1.0 / K, jnp.float32)
  cell = {"problem": name, "K": K, "T": T, "data_as_args": DATA_AS_ARGS}
  cell["modes"] = {}
  args = (params, w_K, data) if DATA_AS_ARGS else (params, w_K)
  compiled, outs = {}, {}
  for name, fn in _modes(problem, T).items():
    if DATA_AS_ARGS:  # the problem built inside the jit from its arguments
      fn = (lambda m: lambda p, w, d: _modes(build(d), T)[m](p, w))(name)
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(*args).compile()
    cell["modes"][name] = {
      "compile_s": time.perf_counter() - t0,
      "memory": _memory(compiled[name]),
    }
    outs[name] = compiled[name](*args)
  timing = _time_interleaved(compiled, args, repeats, min_s)
  for name, t in timing.items():
    cell["modes"][name].update(t)
  for m in cell["modes"].values():
    m["ratio_to_plain"] = m[TIME_KEY] / cell["modes"]["plain"][TIME_KEY]
    m["wall_ratio_to_plain"] = (
      m["wall_min_s"] / cell["modes"]["plain"]["wall_min_s"]
    )
  if DATA_AS_ARGS:  # chosen as the auto program chooses: under the trace
    seen = {}

    def _choose(d):
      seen["choice"] = bilevel.choose_hypergrad_mode(
        build(d), params, w_K, lr=LR, T=T
      )
      return 0.0

    jax.jit(_choose).lower(data)
    choice = seen["choice"]
  else:
    choice = bilevel.choose_hypergrad_mode(problem, params, w_K, lr=LR, T=T)
  modes = ("forward", "reverse", "reverse_remat")
  fastest = min(modes, key=lambda n: cell["modes"][n][TIME_KEY])
  best = cell["modes"][fastest][TIME_KEY]
  cell["auto"] = {
    "mode": choice.mode,
    "reason": choice.reason,
    "estimated_time_steps": choice.time_steps,
    "traced_data_bytes": choice.traced_data_bytes,
    "estimated_memory_bytes": choice.memory_bytes,
    "residual_bytes_per_step": choice.residual_bytes,
    "step_flops": choice.step_flops,
    "fastest_mode": fastest,
    "chosen_over_fastest": cell["modes"][choice.mode][TIME_KEY] / best,
    "auto_measured_over_fastest": cell["modes"]["auto"][TIME_KEY] / best,
  }
  h_f, h_r = np.asarray(outs["forward"][0]), np.asarray(outs["reverse"][0])
  cell["max_abs_auto_minus_reverse"] = float(
    np.max(np.abs(np.asarray(outs["auto"][0]) - h_r))
  )
  cell["max_abs_forward_minus_reverse"] = float(np.max(np.abs(h_f - h_r)))
  cell["max_abs_h"] = float(np.max(np.abs(h_r)))
  return cell


def _memory_floor(cells: list[dict]) -> list[dict]:
  rows = []
  for K in sorted({c["K"] for c in cells}):
    row = sorted((c for c in cells if c["K"] == K), key=lambda c: c["T"])
    if any(m["memory"] is None for c in row for m in c["modes"].values()):
      rows.append({"K": K, "ok": None, "why": "no memory_analysis"})
      continue
    temp = {
      mode: {c["T"]: c["modes"][mode]["memory"]["temp_bytes"] for c in row}
      for mode in ("forward", "reverse", "reverse_remat")
    }
    # The two largest horizons with T >= 2 (a trip-count-1 scan is compiled
    # with a smaller fixed buffer set; T = 1 is reported, not compared).
    big = [c["T"] for c in row if c["T"] >= 2][-2:]
    r = {"K": K, "temp_bytes_by_T": temp, "ok": None}
    if len(big) == 2:
      t0, t1 = big
      r["T_pair"] = big
      for mode in temp:
        r[f"{mode}_bytes_per_extra_step"] = (
          temp[mode][t1] - temp[mode][t0]
        ) / (t1 - t0)
      r["ok"] = temp["forward"][t1] <= 1.01 * temp["forward"][t0]
    rows.append(r)
  return rows


def _speed_floor(cells: list[dict]) -> list[dict]:
  rows = []
  for c in cells:
    if c["K"] <= 4 and c["T"] >= 100:
      f = c["modes"]["forward"][TIME_KEY]
      r = c["modes"]["reverse"][TIME_KEY]
      rr = c["modes"]["reverse_remat"][TIME_KEY]
      rows.append(
        {
          "K": c["K"],
          "T": c["T"],
          "forward_over_reverse": f / r,
          "forward_over_reverse_remat": f / rr,
          "ok": f <= r,
        }
      )
  return rows


def _all_ok(rows: list[dict]) -> bool | None:
  oks = [r["ok"] for r in rows]
  return None if not oks or None in oks else all(oks)


def _auto_floor(cells: list[dict]) -> list[dict]:
  return [
    {
      "K": c["K"],
      "T": c["T"],
      "auto_mode": c["auto"]["mode"],
      "fastest_mode": c["auto"]["fastest_mode"],
      "chosen_over_fastest": c["auto"]["chosen_over_fastest"],
      "auto_measured_over_fastest": c["auto"]["auto_measured_over_fastest"],
      "ok": c["auto"]["chosen_over_fastest"] <= 1.10,
    }
    for c in cells
  ]


def floors(cells: list[dict]) -> dict:
  """The floors of the briefs, per problem, from the measured cells."""
  out = {}
  for name in sorted({c["problem"] for c in cells}):
    mine = [c for c in cells if c["problem"] == name]
    mem, speed = _memory_floor(mine), _speed_floor(mine)
    auto = _auto_floor(mine)
    out[name] = {
      "auto_within_10pct_of_fastest": {
        "ok": _all_ok(auto),
        "rule": f"{TIME_KEY}(mode auto chose) <= 1.10 x {TIME_KEY}(fastest "
        "of forward, reverse, reverse_remat); the auto program is the "
        "chosen mode's (its own measured ratio is reported too)",
        "rows": auto,
      },
      "forward_memory_flat_in_T": {
        "ok": _all_ok(mem),
        "rule": "forward temp bytes at the largest T <= 1.01 x those at "
        "the second-largest T (T >= 2)",
        "rows": mem,
      },
      "forward_no_slower_than_reverse_K_le_4_T_ge_100": {
        "ok": _all_ok(speed),
        "rule": f"{TIME_KEY}(forward) <= {TIME_KEY}(reverse)",
        "rows": speed,
      },
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
  ap.add_argument(
    "--problem",
    nargs="*",
    choices=sorted(PROBLEMS),
    help="problems to run (default: all)",
  )
  ap.add_argument(
    "--multithread",
    action="store_true",
    help="keep XLA's multi-threaded CPU defaults",
  )
  ap.add_argument(
    "--wall",
    action="store_true",
    help="ratios and floors from wall time (default on GPU)",
  )
  ap.add_argument(
    "--logistic-features",
    type=int,
    nargs="*",
    help="run logistic regression at these feature counts (problems "
    f"logistic_<D>; {D_LOGIT} is 'logistic'), e.g. 256 512 2048 4096: data "
    "below and above one core's cache",
  )
  ap.add_argument(
    "--data-as-args",
    action="store_true",
    help="pass the data to the jitted programs as arguments (the problem "
    "built inside the jit) instead of closing over them as constants",
  )
  ap.add_argument("--T", type=int, nargs="*", help="override the T grid")
  ap.add_argument("--K", type=int, nargs="*", help="override the K grid")
  args = ap.parse_args()
  global TIME_KEY, DATA_AS_ARGS
  DATA_AS_ARGS = args.data_as_args
  if args.wall or jax.default_backend() != "cpu":
    TIME_KEY = "wall_min_s"
  Ts = args.T or ([1, 10, 100] if args.quick else [1, 10, 100, 1000])
  Ks = args.K or ([2, 4] if args.quick else [2, 4, 8])
  names = args.problem or sorted(PROBLEMS)
  if args.logistic_features:
    if args.problem is None:
      names = [n for n in names if n != "logistic"]
    names += [logistic_name(D) for D in args.logistic_features]
  repeats, min_s = (5, 0.02) if args.quick else (7, 0.05)
  cells = []
  for name in names:
    for K in Ks:
      for T in Ts:
        c = bench_cell(name, K, T, repeats, min_s)
        cells.append(c)
        m = c["modes"]
        print(
          f"{name:8s} K={K} T={T:5d}  plain "
          f"{m['plain'][TIME_KEY] * 1e3:9.3f} ms  "
          + "  ".join(
            f"{n} x{m[n]['ratio_to_plain']:6.2f}"
            for n in ("forward", "reverse", "reverse_remat")
          )
          + f"  auto={c['auto']['mode']} x{c['auto']['chosen_over_fastest']:.2f}"
          + " of fastest  temp KiB "
          + " ".join(
            f"{n[:3]}={(m[n]['memory'] or {}).get('temp_bytes', -1) / 1024:.0f}"
            for n in ("forward", "reverse", "reverse_remat")
          ),
          flush=True,
        )
  out = {
    "benchmark": "mixing_outer_round_vs_plain_steps",
    "problems": {n: describe(n) for n in names},
    "data_cache_bytes": bilevel.default_data_cache_bytes(),
    "lr": LR,
    "grid": {"T": Ts, "K": Ks, "repeats": repeats, "min_repeat_s": min_s},
    "time_key": TIME_KEY,
    "data_as_args": DATA_AS_ARGS,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "device": str(jax.devices()[0]),
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "jax": jax.__version__,
    "quick": args.quick,
    "cells": cells,
    "floors": floors(cells),
  }
  for name, fl in out["floors"].items():
    for floor, f in fl.items():
      verdict = {True: "OK", False: "FAILED", None: "n/a"}[f["ok"]]
      print(f"{name}: floor {floor}: {verdict}")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
