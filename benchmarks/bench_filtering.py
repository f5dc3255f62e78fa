"""Cost of online filtering: step time per method, SOBA's interval, streams.

Measured in one run at the chapter's language-modelling shape
(``configs.filtering.filter_lm("book")``: a byte LM, B = 16 rows of 33
tokens kept from a big batch of 64, a specific batch of 16):

1. **step cost** (at the text shape and at the digits shape: 32 of 128
   8x8 images, an MLP): the compiled train step of every method (base, mixing,
   classifier, CDS, DDS, Anograd, SOBA; SOBA also unfused and with a
   meta-step every k = 2, 4, 8 steps), called on fixed device batches. The
   methods alternate within each round so that outside load hits them
   alike; XLA runs single-threaded (set before JAX starts) and the ratio to
   base uses the *process CPU time*, minimum over rounds (on a shared
   machine wall time mostly measures the other tenants; it is stored too).
   XLA's FLOP count of each compiled step is a load-free cross-check (it
   counts both branches of ``lax.cond``, so it does not see ``meta_every``).
   Reference (Grangier et al.'s released logs, steps/s relative to standard
   training): mixed 2x, Anograd ~3.5x, DDS ~3.7x, SOBA ~4.7x, classifier
   (downsampling 256) ~7x, CDS 1.2x.
2. **SOBA's gain against its meta-step interval** (``--gain``): the
   held-out specific loss of SOBA with a meta-step every k steps, minus
   base's, paired over seeds on the chapter's digits task (where SOBA beats
   base; see the chapter), and the largest k that keeps >= 90% of the gain
   at k = 1.
3. **streams**: batches per second the filtering streams produce at the
   chapter's shape (text: :class:`~dataweights.data.mixture.FilterStreams`;
   digits: :class:`~dataweights.data.filter_feed.ArrayStreams`), raw and
   through the prefetching :class:`~dataweights.data.filter_feed.FilterFeed`
   while the consumer sleeps 5 ms per step (the time it waits per batch),
   against what a step consumes: the measured base step and a 5 ms step.

Floors (issue 10, §3): SOBA's step <= 3.5x base at k = 1; <= 2.0x at the
interval keeping >= 90% of the gain; streams >= 10x what the step consumes
(at the chapter's shape and at 5 ms). They are reported as measured.

  python benchmarks/bench_filtering.py --out bench-results/filtering.json [--gain] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if "--multithread" not in sys.argv:  # must precede the first use of JAX
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  ).strip()

import dataclasses

import jax
import numpy as np

from dataweights.configs import filtering as fcfg
from dataweights.data import filter_feed
from dataweights.experiments.ch3 import common, tasks
from dataweights.train.feeder import Feeder

REFERENCE = {
  "mixing": 2.0,
  "anograd": 3.5,
  "dds": 3.7,
  "soba": 4.7,
  "classifier": 7.0,
  "cds": 1.2,
}


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan")))


def step_costs(
  profile: str, rounds: int, steps: int, kind: str = "text"
) -> dict:
  """CPU-time ratios of every method's compiled step to base's."""
  if kind == "text":
    cfg = fcfg.filter_lm(profile)
    task = tasks.lm_task(cfg)
  else:
    cfg = fcfg.filter_images(profile)
    task = tasks.image_task(cfg)
  variants = {
    n: common.build_method(n, cfg, task.scorer) for n in fcfg.METHOD_NAMES
  }
  soba = variants["soba"]
  variants["soba (unfused)"] = dataclasses.replace(soba, fused=False)
  for k in (2, 4, 8):
    variants[f"soba (every {k})"] = dataclasses.replace(soba, meta_every=k)
  runs = {}
  for name, method in variants.items():
    trainer = common.make_trainer(task, method, task.train_cfg(0))
    feed = filter_feed.FilterFeed(task.make_streams(0), cfg.batch_size)
    fd = Feeder(feed.sources())
    batches = [trainer.put_batch(fd.next(s)) for s in range(8)]
    t0 = time.perf_counter()
    compiled = trainer.jit_step.lower(trainer.state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    state = trainer.state
    for b in batches[:2]:  # warm up
      state, m = compiled(state, b)
    jax.block_until_ready(state)
    runs[name] = {
      "compiled": compiled,
      "state": state,
      "batches": batches,
      "cpu": [],
      "wall": [],
      "flops": _flops(compiled),
      "compile_s": compile_s,
    }
    print(f"compiled {name} ({compile_s:.1f} s)", flush=True)
  for r in range(rounds):
    for run in runs.values():
      state, bs = run["state"], run["batches"]
      c0, w0 = time.process_time(), time.perf_counter()
      for s in range(steps):
        state, m = run["compiled"](state, bs[s % len(bs)])
      jax.block_until_ready((state, m))
      run["cpu"].append((time.process_time() - c0) / steps)
      run["wall"].append((time.perf_counter() - w0) / steps)
      run["state"] = state
    print(f"round {r + 1}/{rounds}", flush=True)
  base = runs["base"]
  out = {}
  for name, run in runs.items():
    out[name] = {
      "cpu_min_ms": 1e3 * min(run["cpu"]),
      "wall_median_ms": 1e3 * float(np.median(run["wall"])),
      "ratio_cpu": min(run["cpu"]) / min(base["cpu"]),
      "ratio_wall": float(np.median(run["wall"]))
      / float(np.median(base["wall"])),
      "ratio_flops": run["flops"] / base["flops"],
      "compile_s": run["compile_s"],
      "reference": REFERENCE.get(name),
    }
  return out


def interval_gain(profile: str, intervals: tuple[int, ...], seeds: int) -> dict:
  """SOBA's paired specific-loss gain over base against its interval."""
  cfg = fcfg.filter_images(profile, seeds=seeds, finetune_steps=0)
  task = tasks.image_task(cfg)
  base = [
    common.run_method(task, "base", cfg, s).final["spec_test"]
    for s in range(seeds)
  ]
  res = {}
  for k in intervals:
    c = dataclasses.replace(cfg, meta_every=k)
    soba = [
      common.run_method(task, "soba", c, s).final["spec_test"]
      for s in range(seeds)
    ]
    gain = [b - x for b, x in zip(base, soba)]
    m, ci = common.mean_ci(gain)
    res[str(k)] = {"gain": m, "gain_ci": ci, "per_seed": gain}
    print(f"interval {k}: gain {m:.4f} ± {ci:.4f}", flush=True)
  g1 = res[str(intervals[0])]["gain"]
  keep = [k for k in intervals if g1 > 0 and res[str(k)]["gain"] >= 0.9 * g1]
  return {
    "task": f"digits:{cfg.target}",
    "intervals": res,
    "largest_interval_keeping_90pct": max(keep) if keep else None,
  }


def streams(profile: str, batches: int) -> dict:
  """Batches per second of the filtering streams at the chapter's shapes."""
  out = {}
  lm = fcfg.filter_lm(profile)
  img = fcfg.filter_images(profile)
  for name, task, b in (
    ("text", tasks.lm_task(lm), lm.batch_size),
    ("digits", tasks.image_task(img), img.batch_size),
  ):
    s = task.make_streams(0)
    for _ in range(
      50
    ):  # first epochs: each domain's stream is concatenated once
      s.next()
    t0 = time.perf_counter()
    for _ in range(batches):
      s.next()
    raw = batches / (time.perf_counter() - t0)
    feed = filter_feed.FilterFeed(task.make_streams(0), b, prefetch=8)
    fd = Feeder(feed.sources())
    fd.next(0)
    waits = []
    for step in range(1, batches // 4):
      time.sleep(0.005)  # the device computing a 5 ms step
      t0 = time.perf_counter()
      fd.next(step)
      waits.append(time.perf_counter() - t0)
    feed.close()
    out[name] = {
      "raw_batches_per_s": raw,
      "prefetch_wait_ms_per_batch_at_5ms_step": 1e3 * float(np.median(waits)),
      "x_consumption_at_5ms_step": raw * 0.005,
    }
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default="bench-results/filtering.json")
  ap.add_argument("--profile", default="book")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument(
    "--gain", action="store_true", help="also SOBA's gain vs interval"
  )
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--multithread", action="store_true")
  args = ap.parse_args()
  if args.quick:
    args.rounds, args.steps, args.seeds = 2, 3, 2
  profile = "smoke" if args.quick else args.profile
  costs = step_costs(profile, args.rounds, args.steps, "text")
  costs_digits = step_costs(profile, args.rounds, args.steps, "digits")
  st = streams(profile, 400 if not args.quick else 100)
  base_ms = costs["base"]["wall_median_ms"]
  for s in st.values():
    s["x_consumption_at_base_step"] = s["raw_batches_per_s"] * base_ms / 1e3
  out = {
    "profile": profile,
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "load_average": os.getloadavg(),
    "step_cost": costs,
    "step_cost_digits": costs_digits,
    "streams": st,
  }
  floors = {
    "soba_le_3.5x_base": costs["soba"]["ratio_cpu"] <= 3.5,
    "streams_ge_10x_at_5ms": all(
      s["x_consumption_at_5ms_step"] >= 10 for s in st.values()
    ),
    "streams_ge_10x_at_base_step": all(
      s["x_consumption_at_base_step"] >= 10 for s in st.values()
    ),
  }
  if args.gain:
    gain = interval_gain(profile, (1, 2, 4, 8), args.seeds)
    out["soba_interval_gain"] = gain
    k = gain["largest_interval_keeping_90pct"]
    if k is not None:
      name = "soba" if k == 1 else f"soba (every {k})"
      for shape, c in (("text", costs), ("digits", costs_digits)):
        floors[f"soba_le_2x_base_at_90pct_interval_{shape}"] = (
          c[name]["ratio_cpu"] <= 2.0 if name in c else None
        )
  out["floors"] = floors
  for shape, cs in (("text", costs), ("digits", costs_digits)):
    for name, c in cs.items():
      print(
        f"{shape:6s} {name:16s} cpu x{c['ratio_cpu']:.2f}  wall x{c['ratio_wall']:.2f}"
        f"  flops x{c['ratio_flops']:.2f}  (reference {c['reference']})"
      )
  print(json.dumps(st, indent=1))
  print("floors:", floors)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  main()
