"""The book LM's step on one CPU device against data parallel over the cores.

On CPU, JAX has one device by default and XLA runs its program with a pool
of threads over every core: a large dot is split over the cores, but many of
the step's small fusions run on one thread. ``--xla_force_host_platform_
device_count=N`` makes N host devices of the same cores, and the library's
own sharded path (the ``Trainer``'s: :func:`dataweights.sharding.make_mesh`,
``create_sharded``, ``shard_batch``) then runs one program per device at
once. This asks whether that uses a 2-core machine better (issue 13's MFU
goal), and what it costs.

Variants (all through ``lm_compare.project_step``, the jitted, donated AdamW
train step of the book config):

* ``single``: one device, every core (the book's setting; the baseline);
* ``data``: mesh ``data=N``: the batch split over the devices, parameters
  and optimiser state replicated, so every device runs the whole optimiser
  update; the gradients are summed by one all-reduce;
* ``fsdp``: mesh ``fsdp=N``: parameters and optimiser state sharded too
  (ZeRO-3 style): all-gathers in the forward, reduce-scatters after;
* ``single+weight_dot``, ``data+weight_dot``: the model's opt-in weight
  gradient product (``bench_weight_grad.py``).

Each round (variants in rotated order) times every variant's ``step`` (mean
of ``--steps`` calls), ``forward`` and ``forward_backward`` (the step's loss
and gradient programs, median of ``--calls``), and the ``--peak-n``-cube
float32 matmul three ways: on one device with XLA's default kernels and with
oneDNN's (``lm_compare.PEAK_LIBRARIES``), and split by rows over the N
devices. Ratios are per round against ``single`` (paired), summarised by
their median; the MFU (``bench_lm_train.model_flops_per_step``) divides by
the fastest of the three matmuls' medians, so spreading the work over host
devices cannot raise the MFU by lowering the peak. The JSON also has each
variant's gradient difference from ``single``'s (largest absolute
difference over the largest entry), compiled memory and compile time.

The ratios are paired within a process, but they move between processes
by more than within one (on the development machine the data-parallel step
ranged over 0.80-1.01x of one device's in three processes, and the
one-device step itself over 102-119 ms): ``--processes`` (default 3) runs
the whole benchmark in that many fresh processes, one after another, and
reports each process's ratios and MFU with their median, min and max.

Run on an idle machine (wall time):

  python benchmarks/bench_host_devices.py --out bench-results/host_devices.json
  python benchmarks/bench_host_devices.py --quick   # seconds, smoke shape

``--devices`` (default: the CPU count) must be set before JAX starts, so the
benchmark sets ``XLA_FLAGS`` itself; run it in its own process.
"""

from __future__ import annotations

import argparse
import os
import re


def _parse(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=os.cpu_count() or 1)
  ap.add_argument("--layers", type=int, default=None, help="default: book")
  ap.add_argument("--rounds", type=int, default=11)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--calls", type=int, default=3)
  ap.add_argument("--peak-n", type=int, default=2048)
  ap.add_argument(
    "--processes",
    type=int,
    default=3,
    help="fresh processes, each a whole run (ratios vary between them)",
  )
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default="bench-results/host_devices.json")
  return ap.parse_args(argv)


def _set_host_devices(n: int) -> None:
  """Adds the host device count to ``XLA_FLAGS`` (before JAX starts)."""
  if n < 2:
    raise SystemExit(f"--devices {n}: data parallel needs at least 2")
  flags = os.environ.get("XLA_FLAGS", "")
  got = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
  if got and int(got.group(1)) != n:
    raise SystemExit(
      f"XLA_FLAGS already asks for {got.group(1)} host devices, not "
      f"--devices {n}; unset it or pass --devices {got.group(1)}"
    )
  if not got:
    flag = f"--xla_force_host_platform_device_count={n}"
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


if __name__ == "__main__":
  ARGS = _parse()
  _set_host_devices(ARGS.devices)

import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lm_compare  # noqa: E402
import numpy as np  # noqa: E402
import op_profile  # noqa: E402
from bench_lm_train import matmul_params, model_flops_per_step  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dataweights import results, sharding  # noqa: E402
from dataweights.configs import lm  # noqa: E402

_DATA = {"data": -1, "fsdp": 1, "model": 1}
_FSDP = {"data": 1, "fsdp": -1, "model": 1}
# name -> (mesh axes or None for one device, ModelConfig overrides)
VARIANTS: dict[str, tuple[dict | None, dict]] = {
  "single": (None, {}),
  "data": (_DATA, {}),
  "fsdp": (_FSDP, {}),
  "single+weight_dot": (None, {"weight_dot": True}),
  "data+weight_dot": (_DATA, {"weight_dot": True}),
}
_KEYS = ("step", "forward", "forward_backward")


def _peaks(n: int) -> tuple[dict, dict]:
  """(callables, facts) of the n-cube matmul: one device, and row-split."""
  a, b, dots = lm_compare.peak_matmuls(n)
  fns = {f"one_device_{lib}": (lambda d=d: d(a, b)) for lib, d in dots.items()}
  mesh = jax.make_mesh((jax.device_count(),), ("rows",))
  rows, full = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())
  a_r, b_r = jax.device_put(a, rows), jax.device_put(b, full)
  split = jax.jit(jnp.dot, out_shardings=rows).lower(a_r, b_r).compile()
  fns["row_split_default"] = lambda: split(a_r, b_r)
  err = float(
    jnp.max(jnp.abs(np.asarray(fns["row_split_default"]()) - (a @ b)))
  )
  return fns, {"row_split_max_abs_diff": err}


def _variant(cfg: lm.ModelConfig, axes, over: dict, batch: int):
  """(callables, JSON facts, the rest: gradient, programs, matmul params)."""
  mesh = None if axes is None else sharding.make_mesh(lm.MeshConfig(**axes))
  run, x = lm_compare.project_step(
    dataclasses.replace(cfg, **over), batch, mesh=mesh
  )
  args = x["args"]
  fns = {
    "step": run,
    "forward": lambda: x["forward"](*args),
    "forward_backward": lambda: x["grad"](*args),
  }
  rest = {
    "grads": [np.asarray(g) for g in jax.tree.leaves(x["grad"](*args))],
    "texts": {"step": x["step_text"], "forward_backward": x["grad"].as_text()},
    "n_matmul": matmul_params(cfg, args[0]),
  }
  facts = {
    "mesh": None if mesh is None else dict(mesh.shape),
    "model_overrides": over,
    "compile_s": x["compile_s"],
    "memory": x["memory"],
  }
  return fns, facts, rest


def _time(fn, calls: int) -> float:
  ts = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def run(
  cfg: lm.ModelConfig,
  batch: int,
  names: list[str],
  rounds: int,
  steps: int,
  calls: int,
  peak_n: int,
) -> dict:
  """Interleaved, paired rounds of ``names`` (``single`` first) and peaks."""
  fns, facts, rest = {}, {}, {}
  for name in names:
    axes, over = VARIANTS[name]
    fns[name], facts[name], rest[name] = _variant(cfg, axes, over, batch)
    for f in fns[name].values():
      jax.block_until_ready(f())
    print(f"compiled {name}", flush=True)
  peak_fns, peak_facts = _peaks(peak_n)
  for f in peak_fns.values():
    jax.block_until_ready(f())

  per_round, peak_s = [], {k: [] for k in peak_fns}
  for r in range(rounds):
    shift = r % len(names)
    got = {}
    for name in names[shift:] + names[:shift]:
      t0 = time.perf_counter()
      out = None
      for _ in range(steps):
        out = fns[name]["step"]()
      jax.block_until_ready(out)
      got[name] = {"step": (time.perf_counter() - t0) / steps}
      for k in ("forward", "forward_backward"):
        got[name][k] = _time(fns[name][k], calls)
    for k, f in peak_fns.items():
      peak_s[k].append(_time(f, calls))
    per_round.append(got)
    print(f"round {r + 1}/{rounds}", flush=True)
  # After the timed rounds, so that tracing cannot perturb them.
  conc = {
    name: {
      k: op_profile.concurrency(fns[name][k], rest[name]["texts"][k], 10)
      for k in ("step", "forward_backward")
    }
    for name in names
  }

  flops = model_flops_per_step(
    cfg, rest["single"]["n_matmul"], batch, cfg.max_len
  )
  peak = {
    k: {
      "median_s": statistics.median(v),
      "gflops": 2 * peak_n**3 / statistics.median(v) / 1e9,
    }
    for k, v in peak_s.items()
  }
  best = max(peak, key=lambda k: peak[k]["gflops"])
  variants = {}
  for name in names:
    med = {k: statistics.median(rd[name][k] for rd in per_round) for k in _KEYS}
    variants[name] = {
      **facts[name],
      "median_s": med,
      "ratio_to_single": {
        k: statistics.median(rd[name][k] / rd["single"][k] for rd in per_round)
        for k in _KEYS
      },
      "backward_over_forward": statistics.median(
        (rd[name]["forward_backward"] - rd[name]["forward"])
        / rd[name]["forward"]
        for rd in per_round
      ),
      "step_minus_forward_backward_s": med["step"] - med["forward_backward"],
      "mfu": flops / med["step"] / (peak[best]["gflops"] * 1e9),
      "grad_max_rel_diff_vs_single": lm_compare.grad_rel_diff(
        rest["single"]["grads"], rest[name]["grads"]
      ),
      "instruction_concurrency": conc[name],
      "per_round_s": [rd[name] for rd in per_round],
    }
  return {
    "devices": jax.device_count(),
    "model": dataclasses.asdict(cfg),
    "batch_size": batch,
    "rounds": rounds,
    "steps_per_round": steps,
    "calls_per_round": calls,
    "model_flops_per_step": flops,
    "peak": {"n": peak_n, "by_layout": peak, "best": best, **peak_facts},
    "variants": variants,
    "fastest_step": min(names, key=lambda k: variants[k]["median_s"]["step"]),
  }


def _child_argv(args: argparse.Namespace, out: str) -> list[str]:
  argv = [sys.executable, __file__, "--processes", "1", "--out", out]
  for flag in ("devices", "layers", "rounds", "steps", "calls", "peak_n"):
    value = getattr(args, flag)
    if value is not None:
      argv += [f"--{flag.replace('_', '-')}", str(value)]
  return argv + (["--quick"] if args.quick else [])


def across_processes(runs: list[dict]) -> dict:
  """Per variant: each process's paired step / fwd+bwd ratios and MFU."""
  out = {}
  for name in runs[0]["variants"]:
    per = [r["variants"][name] for r in runs]
    row = {
      "step_ratio": [v["ratio_to_single"]["step"] for v in per],
      "forward_backward_ratio": [
        v["ratio_to_single"]["forward_backward"] for v in per
      ],
      "backward_over_forward": [v["backward_over_forward"] for v in per],
      "mfu": [v["mfu"] for v in per],
      "step_minus_forward_backward_s": [
        v["step_minus_forward_backward_s"] for v in per
      ],
    }
    out[name] = {
      k: {
        "median": statistics.median(v),
        "min": min(v),
        "max": max(v),
        "all": v,
      }
      for k, v in row.items()
    }
  return out


def _save(result: dict, args: argparse.Namespace, t0: float) -> None:
  """Adds provenance (wall time since ``t0``) and writes ``args.out``."""
  result["provenance"] = results.provenance(
    "smoke" if args.quick else "book", time.perf_counter() - t0
  )
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results.to_jsonable(result), indent=1))
  print("wrote", path)


def main_processes(args: argparse.Namespace) -> None:
  """``--processes`` fresh runs of this benchmark, one after another."""
  t0 = time.perf_counter()
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.processes):
      out = f"{tmp}/run{i}.json"
      print(f"=== process {i + 1}/{args.processes}", flush=True)
      subprocess.run(_child_argv(args, out), check=True)
      runs.append(json.loads(Path(out).read_text()))
  summary = across_processes(runs)
  result = {
    "processes": len(runs),
    "across_processes": summary,
    "runs": runs,
  }
  print("across processes (median [min, max]):")
  for name, v in summary.items():
    st, mfu = v["step_ratio"], v["mfu"]
    print(
      f"{name:18s} step {st['median']:.3f} [{st['min']:.3f}, {st['max']:.3f}]"
      f"  MFU {mfu['median']:.1%} [{mfu['min']:.1%}, {mfu['max']:.1%}]"
    )
  _save(result, args, t0)


def main(args: argparse.Namespace) -> None:
  if args.processes > 1:
    main_processes(args)
    return
  if jax.device_count() != args.devices:
    raise SystemExit(
      f"JAX sees {jax.device_count()} devices, not --devices {args.devices}: "
      "was JAX imported before XLA_FLAGS was set?"
    )
  cfg = lm.lm_model("smoke" if args.quick else "book")
  if args.layers is not None:
    cfg = dataclasses.replace(cfg, num_layers=args.layers)
  names = list(VARIANTS)
  if args.quick:
    args.rounds, args.steps, args.calls, args.peak_n = 1, 1, 1, 256
  t0 = time.perf_counter()
  load0 = os.getloadavg()
  out = run(cfg, 16, names, args.rounds, args.steps, args.calls, args.peak_n)
  out["load_average"] = {"start": load0, "end": os.getloadavg()}
  out["cpu_count"] = os.cpu_count()
  for k, v in out["peak"]["by_layout"].items():
    print(f"peak {k:22s} {v['gflops']:.0f} GFLOP/s")
  for name, v in out["variants"].items():
    r = v["ratio_to_single"]
    print(
      f"{name:18s} step {v['median_s']['step'] * 1e3:6.1f} ms ({r['step']:.3f})"
      f"  fwd {r['forward']:.3f}  fwd+bwd {r['forward_backward']:.3f}"
      f"  bwd/fwd {v['backward_over_forward']:.2f}"
      f"  step-fwd+bwd {v['step_minus_forward_backward_s'] * 1e3:.1f} ms"
      f"  concurrency {v['instruction_concurrency']['step']['mean_concurrency']:.2f}"
      f"  MFU {v['mfu']:.1%}  grad diff {v['grad_max_rel_diff_vs_single']:.1e}"
    )
  _save(out, args, t0)


if __name__ == "__main__":
  main(ARGS)
