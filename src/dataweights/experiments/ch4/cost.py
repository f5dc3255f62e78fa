"""Cost of a ScaleBiO step against plain fine-tuning, at the chapter's shape.

Printed by the chapter (an untagged cell), never published: timings vary
from machine to machine. The paper's numbers (Pan et al. 2024): a
ScaleBiO step costs about three forward/backward passes, and the method
keeps two model copies and two optimiser states.

Measured in one process on one device, the model and batch of
``cfg`` (:class:`~dataweights.configs.scalebio.ScaleBiOChapterConfig`):

* step time: the jitted plain fine-tuning step (AdamW on ``batch_size``
  rows) and the jitted ScaleBiO step (the same rows plus
  ``valid_batch_size`` validation rows), timed in interleaved pairs; the
  median of the per-pair ratios;
* memory: bytes of the state each run keeps (parameters, optimiser
  moments, the second model ``u`` and its moments), with and without LISA
  for 1..L active blocks, and XLA's compiled memory analysis (arguments +
  temporaries + unaliased outputs) of both steps.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dataweights.configs import scalebio as configs
from dataweights.configs.scalebio import ScaleBiOChapterConfig
from dataweights.data import instructions as pairs_lib
from dataweights.experiments.ch4 import common
from dataweights.train import lisa, optim
from dataweights.train.state import init_train_state
from dataweights.train.step import make_train_step


def _bytes(tree: Any) -> int:
  return int(
    sum(
      int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
    )
  )


def _peak(compiled) -> int:
  ma = compiled.memory_analysis()
  return int(
    ma.argument_size_in_bytes
    + ma.temp_size_in_bytes
    + ma.output_size_in_bytes
    - ma.alias_size_in_bytes
  )


def _batch(b: int, seq_len: int, k: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  sets = [
    pairs_lib.PairSet.from_pairs(
      str(j),
      ["".join(rng.choice(list("abcdefgh"), 12)) for _ in range(8)],
      ["".join(rng.choice(list("abcdefgh"), 20)) for _ in range(8)],
      seq_len,
    )
    for j in range(k)
  ]
  return pairs_lib.PairSampler(sets, b, seed=seed).batch(0)


def measure(
  cfg: ScaleBiOChapterConfig | str = "book", rounds: int = 10
) -> dict:
  """Step-time ratio and memory of ScaleBiO against plain fine-tuning.

  Args:
    cfg: a chapter config or a profile (then :func:`configs.noise_ordering`).
    rounds: interleaved timing pairs.

  Returns:
    ``{"time": {...}, "state_bytes": {...}, "xla_peak_bytes": {...}}``.
  """
  if isinstance(cfg, str):
    cfg = configs.noise_ordering(cfg)
  graphdef, params = common.pretrained(cfg)
  k = 4
  method = common.scalebio_method(cfg)
  train_cfg = common._train_cfg(cfg, cfg.lr_w, 1, "constant")
  steps = {}
  states = {}
  for name in ("plain", "scalebio"):
    model = nnx.merge(graphdef, jax.tree.map(jnp.array, params))
    if name == "plain":
      tx, meth, extra = optim.make_optimizer(train_cfg), None, {}
    else:
      tx, meth = method.w_optimizer(train_cfg), method
      p0 = nnx.state(model, nnx.Param)
      extra = {"method": method.init(p0, jax.random.key(0), k)}
    state, static, _ = init_train_state(model, tx, seed=0, extra=extra)
    step = make_train_step(
      static, domain_names=[str(i) for i in range(k)], method=meth
    )
    batches = {"train": _batch(cfg.batch_size, cfg.seq_len, k, 0)}
    if meth is not None:
      batches["valid"] = _batch(cfg.valid_batch_size, cfg.seq_len, 1, 1)
    batches = jax.tree.map(jnp.asarray, batches)
    compiled = jax.jit(step).lower(state, batches).compile()
    steps[name] = (compiled, state, batches)
    states[name] = state
  # Interleaved timing: plain, scalebio, plain, scalebio, ...
  ratios, times = [], {"plain": [], "scalebio": []}
  for _ in range(2):  # warm-up
    for _name, (fn, st, b) in steps.items():
      jax.block_until_ready(fn(st, b))
  for _ in range(rounds):
    pair = {}
    for name, (fn, st, b) in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(st, b))
      pair[name] = time.perf_counter() - t0
      times[name].append(pair[name])
    ratios.append(pair["scalebio"] / pair["plain"])
  p_bytes = _bytes(params)
  plain_opt = _bytes(states["plain"].opt_state)
  sb = states["scalebio"]
  state_bytes = {
    "params": p_bytes,
    "plain": p_bytes + plain_opt,
    "scalebio": p_bytes
    + _bytes(sb.opt_state)
    + _bytes(sb.extra["method"]["u"])
    + _bytes(sb.extra["method"]["u_opt"]),
  }
  for a in range(1, cfg.num_layers + 1):
    tx = lisa.lisa(1e-3, num_active=a, period=cfg.lisa_period)
    opt = lisa.state_bytes(tx.init(params))
    state_bytes[f"scalebio+lisa{a}"] = 2 * (p_bytes + opt)
  return {
    "shape": {
      "d_model": cfg.d_model,
      "num_layers": cfg.num_layers,
      "seq_len": cfg.seq_len,
      "batch_size": cfg.batch_size,
      "valid_batch_size": cfg.valid_batch_size,
    },
    "time": {
      "plain_ms": 1e3 * float(np.median(times["plain"])),
      "scalebio_ms": 1e3 * float(np.median(times["scalebio"])),
      "ratio_median": float(np.median(ratios)),
      "ratio_quartiles": [float(np.quantile(ratios, q)) for q in (0.25, 0.75)],
      "rounds": rounds,
    },
    "state_bytes": state_bytes,
    "xla_peak_bytes": {n: _peak(s[0]) for n, s in steps.items()},
  }


def report(res: dict) -> str:
  """The measurement beside the paper's claims, as text."""
  t, sb = res["time"], res["state_bytes"]
  lines = [
    "one step at the chapter's shape "
    f"(B={res['shape']['batch_size']} + {res['shape']['valid_batch_size']} "
    f"validation rows, L={res['shape']['seq_len']}):",
    f"  plain fine-tuning {t['plain_ms']:.1f} ms, ScaleBiO "
    f"{t['scalebio_ms']:.1f} ms: ratio {t['ratio_median']:.2f}",
    f"  (quartiles {t['ratio_quartiles'][0]:.2f}-"
    f"{t['ratio_quartiles'][1]:.2f}, {t['rounds']} interleaved pairs); "
    "paper: about 3",
    "state kept (parameters + optimiser moments, both models):",
  ]
  for name, b in sb.items():
    if name == "params":
      continue
    lines.append(
      f"  {name:<16} {b / 1e6:7.2f} MB  ({b / sb['plain']:.2f} x plain)"
    )
  lines.append("  paper: two model copies and two optimiser states (2 x plain)")
  peak = res["xla_peak_bytes"]
  lines.append(
    f"XLA peak of one step: plain {peak['plain'] / 1e6:.1f} MB, ScaleBiO "
    f"{peak['scalebio'] / 1e6:.1f} MB ({peak['scalebio'] / peak['plain']:.2f} x)"
  )
  return "\n".join(lines)


def snapshot_report(root: str | None = None) -> str:
  """The committed benchmark snapshots (``benchmarks/bench_scalebio.py``).

  Reads ``benchmarks/results/scalebio_{time,memory,memory_len128}.json``
  under the repository root: the step-time ratio at the chapter's shape and
  XLA's compiled memory per device at GPT-2 124M shape on an 8-device FSDP
  mesh. Returns a note instead if the files are absent (an installed
  package without the repository).
  """
  import json
  from pathlib import Path

  if root is None:
    # The repository holding this file, else the first one above the cwd
    # (experiments sit below the book layer: no dataweights.book here).
    here = Path.cwd().resolve()
    candidates = [Path(__file__).resolve().parents[4], here, *here.parents]
    root = next(
      (d for d in candidates if (d / "benchmarks" / "results").is_dir()),
      candidates[0],
    )
  base = Path(root) / "benchmarks" / "results"
  try:
    t = json.loads((base / "scalebio_time.json").read_text())
    mems = [
      json.loads((base / f"scalebio_memory{s}.json").read_text())
      for s in ("", "_len128")
    ]
  except OSError:
    return "benchmark snapshots not found (run benchmarks/bench_scalebio.py)"
  q = t["time"]["ratio_quartiles"]
  lines = [
    "benchmarks/results/scalebio_time.json (chapter's shape):",
    f"  ScaleBiO step / plain step = {t['time']['ratio_median']:.2f} "
    f"(quartiles {q[0]:.2f}-{q[1]:.2f}, {t['time']['rounds']} interleaved "
    f"pairs, {t['cpu_count']} CPU cores)",
  ]
  mib = 2**20
  for m in mems:
    md = m["model"]
    lines.append(
      f"compiled memory per device: {md['num_params'] / 1e6:.0f}M parameters"
      f" ({md['num_layers']} blocks), {m['mesh']['fsdp']}-way FSDP,"
    )
    lines.append(
      f"  batch {m['batch']} + {m['valid_batch']} validation rows of "
      f"{m['length']} tokens"
    )
    lines.append(
      f"  {'step':<22}{'state MiB':>10}{'temp MiB':>10}{'peak MiB':>10}"
      f"{'x plain':>9}"
    )
    for name, r in m["rows"].items():
      lines.append(
        f"  {name:<22}{r['argument_bytes'] / mib:>10.1f}"
        f"{r['temp_bytes'] / mib:>10.1f}"
        f"{r['peak_bytes_per_device'] / mib:>10.1f}"
        f"{r['peak_ratio_to_plain']:>9.2f}"
      )
  m = mems[0]
  plain = m["plain_adamw_state_bytes"]
  by_a = m["optimizer_state_bytes_by_active_blocks"]
  lines.append(
    "optimiser state of w and u (all devices) / plain AdamW's, by LISA's"
    " active blocks:"
  )
  items = [f"{a}: {b / plain:.2f}" for a, b in by_a.items() if a != "0"]
  for k in range(0, len(items), 6):
    lines.append("  " + ", ".join(items[k : k + 6]))
  lines.append(f"  no LISA: {by_a['0'] / plain:.2f}")
  return "\n".join(lines)
