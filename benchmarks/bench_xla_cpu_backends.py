"""The book LM's step under each XLA:CPU kernel-library and codegen option.

XLA:CPU can hand dots, reductions and elementwise ops to kernel libraries
(YNNPACK, oneDNN) or emit its own loops, and has scheduler and vector-width
options. This asks whether any choice other than XLA's default makes the
book model's train step faster on this machine (issue 13's MFU and
backward/forward goals), and by how much each changes the gradient.

Each variant is a dict of XLA debug options passed per executable
(``jax.jit(f).lower(...).compile(compiler_options)``), so every variant
lives in one process and the library could adopt one without touching
``XLA_FLAGS``. Rounds are interleaved and paired: each round calls every
variant's

* ``forward``: the mean loss (``lm_loss``) at the book shape;
* ``forward_backward``: its gradient as the train step builds it
  (``lm_compare.train_grad``);
* ``step``: the jitted, donated AdamW train step;
* ``matmul``: a 2048-cube float32 ``jnp.dot`` (the MFU peak of
  ``bench_lm_train.py``) compiled with the same options;

``--calls`` times each (median), and ratios are ``variant / default`` per
round, summarised by their median over rounds. For each variant the JSON
also has the number of library fusions and custom calls in its gradient
program (an option that was ignored leaves them as the default's; a variant
whose optimized HLO is the default's is flagged) and the gradient's largest
difference from the default's, relative to the gradient's largest entry
(one scale for all leaves: the key-bias gradients are zero in exact
arithmetic, so per-leaf relative differences would compare noise with
noise). Two more variants switch the model's opt-in ``weight_dot`` (a
different weight-gradient product, see ``bench_weight_grad.py``), alone and
with the options, to put the options on the same scale.

Wall time with XLA's default threading (both cores): use an idle machine.
Options were checked by hand to be accepted by the pinned jaxlib; XNNPACK
(``xla_cpu_experimental_xnn_fusion_type``) produced no XNNPACK fusion in
it and is not listed.

  python benchmarks/bench_xla_cpu_backends.py --out bench-results/xla_cpu_backends.json
  python benchmarks/bench_xla_cpu_backends.py --quick   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import lm_compare
import numpy as np

from dataweights import results
from dataweights.configs import lm

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_ONEDNN = lm_compare.PEAK_LIBRARIES["onednn"]  # oneDNN custom calls on

# name -> XLA debug options. In the pinned jaxlib the YNNPACK default is
# DOT, INDIVIDUAL_DOT and REDUCE (the JSON checks: same optimized HLO).
OPTIONS: dict[str, dict] = {
  "default": {},
  "ynn_default_spelled_out": {
    _YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
    "LIBRARY_FUSION_TYPE_REDUCE"
  },
  "ynn_dot": {_YNN: "LIBRARY_FUSION_TYPE_DOT"},
  "ynn_dot_reduce": {
    _YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
  },
  "ynn_all": {
    _YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
    "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
  },
  "no_library": {_YNN: ""},
  "onednn": {_YNN: "", **_ONEDNN},
  "ynn_and_onednn": dict(_ONEDNN),
  "concurrency_scheduler": {
    "xla_cpu_enable_concurrency_optimized_scheduler": True
  },
  "vector_width_512": {"xla_cpu_prefer_vector_width": 512},
}

# name -> (ModelConfig overrides, XLA debug options): every option above on
# the default model, and the model's own opt-in ``weight_dot`` alone and with
# the options that helped in a first run, for scale.
VARIANTS: dict[str, tuple[dict, dict]] = {
  **{name: ({}, opts) for name, opts in OPTIONS.items()},
  "weight_dot": ({"weight_dot": True}, {}),
  "weight_dot+ynn_and_onednn+vector_width_512": (
    {"weight_dot": True},
    {**OPTIONS["ynn_and_onednn"], **OPTIONS["vector_width_512"]},
  ),
}

_KEYS = ("forward", "forward_backward", "step", "matmul")


def _library_calls(text: str) -> dict[str, int]:
  """Library fusions / custom calls in an optimized HLO text."""
  return {
    "ynn_fusions": text.count('"kind":"__ynn_fusion"'),
    "onednn_custom_calls": len(
      re.findall(r'custom_call_target="__onednn', text)
    ),
    "dots": len(re.findall(r" dot\(", text)),
  }


def _variant(model: dict, options: dict, n: int) -> tuple[dict, dict]:
  """(callables, facts) of one variant at the book shape."""
  cfg = dataclasses.replace(lm.lm_model("book"), **model)
  run, extras = lm_compare.project_step(
    cfg, batch_size=16, compiler_options=options
  )
  args = extras["args"]
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(jnp.dot).lower(a, a).compile(options)
  fns = {
    "forward": lambda: extras["forward"](*args),
    "forward_backward": lambda: extras["grad"](*args),
    "step": run,
    "matmul": lambda: matmul(a, a),
  }
  text = extras["grad"].as_text()
  grads = [np.asarray(g) for g in jax.tree.leaves(extras["grad"](*args))]
  return fns, {"text": text, "grads": grads}


def run(names: list[str], rounds: int, calls: int, n: int = 2048) -> dict:
  """Interleaved, paired rounds of every variant in ``names`` (default first)."""
  fns, facts = {}, {}
  for name in names:
    fns[name], facts[name] = _variant(*VARIANTS[name], n)
    for f in fns[name].values():
      jax.block_until_ready(f())
  per_round = []
  for r in range(rounds):
    shift = r % len(names)
    got = {}
    for name in names[shift:] + names[:shift]:
      times = {k: [] for k in _KEYS}
      for _ in range(calls):
        for k in _KEYS:
          t0 = time.perf_counter()
          jax.block_until_ready(fns[name][k]())
          times[k].append(time.perf_counter() - t0)
      got[name] = {k: statistics.median(v) for k, v in times.items()}
    per_round.append(got)
    print(f"round {r + 1}/{rounds}", flush=True)
  out = {}
  ref = facts["default"]
  for name in names:
    med = {k: statistics.median(rd[name][k] for rd in per_round) for k in _KEYS}
    ratio = {
      k: statistics.median(rd[name][k] / rd["default"][k] for rd in per_round)
      for k in _KEYS
    }
    bwd = statistics.median(
      (rd[name]["forward_backward"] - rd[name]["forward"]) / rd[name]["forward"]
      for rd in per_round
    )
    out[name] = {
      "model_overrides": VARIANTS[name][0],
      "compiler_options": VARIANTS[name][1],
      "median_s": med,
      "ratio_to_default": ratio,
      "backward_over_forward": bwd,
      "matmul_gflops": 2 * n**3 / med["matmul"] / 1e9,
      "grad_max_rel_diff_vs_default": lm_compare.grad_rel_diff(
        ref["grads"], facts[name]["grads"]
      ),
      "same_hlo_as_default": facts[name]["text"] == ref["text"],
      "library_calls": _library_calls(facts[name]["text"]),
      "per_round_s": [rd[name] for rd in per_round],
    }
  return {
    "variants": out,
    "rounds": rounds,
    "calls_per_round": calls,
    "peak_n": n,
    "fastest_step": min(
      names, key=lambda k: out[k]["ratio_to_default"]["step"]
    ),
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=9)
  ap.add_argument("--calls", type=int, default=3)
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default="bench-results/xla_cpu_backends.json")
  args = ap.parse_args()
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    raise SystemExit(
      f"unknown variants {unknown}; allowed: {', '.join(VARIANTS)}"
    )
  names = ["default"] + [v for v in args.variants if v != "default"]
  n = 2048
  if args.quick:
    names, args.rounds, args.calls, n = names[:3], 1, 1, 256
  t0 = time.perf_counter()
  load0 = os.getloadavg()
  out = run(names, args.rounds, args.calls, n)
  out["load_average"] = {"start": load0, "end": os.getloadavg()}
  out["provenance"] = results.provenance("book", time.perf_counter() - t0)
  for name, v in out["variants"].items():
    r = v["ratio_to_default"]
    print(
      f"{name:44s} step {r['step']:.3f}  fwd+bwd {r['forward_backward']:.3f}"
      f"  fwd {r['forward']:.3f}  bwd/fwd {v['backward_over_forward']:.2f}  "
      f"matmul {v['matmul_gflops']:.0f} GFLOP/s  "
      f"grad diff {v['grad_max_rel_diff_vs_default']:.1e}  "
      f"same HLO {v['same_hlo_as_default']}  {v['library_calls']}"
    )
  print("fastest step:", out["fastest_step"])
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results.to_jsonable(out), indent=1))
  print("wrote", path)


if __name__ == "__main__":
  main()
