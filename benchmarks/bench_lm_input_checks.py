"""Cost of the token-id check and the padding mask in the jitted train step.

The ``book`` LM (4 layers, D=128, L=128, 16 sequences per step) and the
jitted, donated train step, compiled three ways and timed in interleaved
rounds (paired: each round runs every variant once, so the load of a shared
machine hits all alike); best and median seconds per step over the rounds,
ratios against ``before``:

* ``before``: no token-id check, the model called without an attention mask
  (the train step before issue 14; the loss masked ``mask[:, 1:]`` only);
* ``ids``: the in-graph token-id check of :mod:`dataweights.models.ids`
  (model inputs and loss targets), still no attention mask;
* ``after``: the default :func:`dataweights.train.step.lm_loss` now: id
  checks and the padding mask passed to the model (explicit ``B x L x L``
  attention mask instead of ``is_causal``).

Batches are right-padded as the pipeline makes them (row b has ``b`` pads).

XLA runs single-threaded (set before JAX starts; ``--multithread`` keeps
XLA's default) and the ratios use the *process CPU time* of each round,
which other processes on a shared machine disturb far less than wall time
(wall times are recorded too).

  python benchmarks/bench_lm_input_checks.py --out bench-results/lm_input_checks.json
  python benchmarks/bench_lm_input_checks.py --quick   # smoke shape, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--multithread" not in sys.argv:  # must precede the first use of JAX
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  )

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from dataweights import results
from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.models import transformer as tr
from dataweights.train import optim
from dataweights.train.state import init_train_state
from dataweights.train.step import jit_train_step, lm_loss, make_train_step


@contextlib.contextmanager
def _no_id_check():
  """Traces the model with the id check replaced by a no-op."""
  saved = tr.check_token_ids
  tr.check_token_ids = lambda *a, **k: None
  try:
    yield
  finally:
    tr.check_token_ids = saved


def _loss_without_attention_mask(model, batch, key):
  """The train step's loss before issue 14 (no mask given to the model)."""
  del key
  tokens_BxL, mask_BxL = batch["tokens_BxL"], batch["mask_BxL"]
  logits_BxLxV = model(tokens_BxL[:, :-1])
  return tr.per_example_loss(logits_BxLxV, tokens_BxL[:, 1:], mask_BxL[:, 1:])


def run(profile: str, steps: int, rounds: int) -> dict:
  model_cfg = lm.lm_model(profile)
  train_cfg = train_configs.train(profile, progress=False)
  batch_size, length = train_cfg.batch_size, model_cfg.max_len
  rng = np.random.default_rng(0)
  single = SingleDeviceSharding(jax.devices()[0])
  mask = (
    np.arange(length + 1)[None, :]
    < (length + 1 - np.arange(batch_size))[:, None]
  )
  batch = jax.device_put(
    {
      "tokens_BxL": rng.integers(0, 256, (batch_size, length + 1)).astype(
        np.int32
      ),
      "mask_BxL": mask,
      "domain_B": rng.integers(0, 3, batch_size).astype(np.int32),
    },
    single,
  )
  tx = optim.make_optimizer(train_cfg)
  variants = {
    "before": (_loss_without_attention_mask, _no_id_check),
    "ids": (_loss_without_attention_mask, contextlib.nullcontext),
    "after": (lm_loss, contextlib.nullcontext),
  }
  compiled, states, compile_s = {}, {}, {}
  for name, (loss_fn, ctx) in variants.items():
    model = tr.Transformer(model_cfg, rngs=nnx.Rngs(0))
    state, static, shardings = init_train_state(model, tx, seed=0)
    step = jit_train_step(
      make_train_step(static, loss_fn=loss_fn), shardings, single, single
    )
    t0 = time.perf_counter()
    with ctx():
      compiled[name] = step.lower(state, batch).compile()
    compile_s[name] = time.perf_counter() - t0
    states[name] = state
  losses = {}
  for name, fn in compiled.items():  # warm-up; the losses must agree
    states[name], m = fn(states[name], batch)
    losses[name] = float(m["loss"])
  times = {name: [] for name in compiled}
  wall = {name: [] for name in compiled}
  for _ in range(rounds):
    for name, fn in compiled.items():
      t0, c0 = time.perf_counter(), time.process_time()
      m = None
      for _ in range(steps):
        states[name], m = fn(states[name], batch)
      jax.block_until_ready(m)
      times[name].append((time.process_time() - c0) / steps)
      wall[name].append((time.perf_counter() - t0) / steps)
  best = {k: min(v) for k, v in times.items()}
  median = {k: statistics.median(v) for k, v in times.items()}
  paired = {
    k: statistics.median(a / b for a, b in zip(v, times["before"]))
    for k, v in times.items()
  }
  return {
    "profile": profile,
    "shape": {
      "batch": batch_size,
      "length": length,
      "vocab": model_cfg.vocab_size,
    },
    "steps_per_round": steps,
    "rounds": rounds,
    "compile_s": compile_s,
    "first_step_loss": losses,
    "measure": "process CPU seconds per step",
    "step_s_best": best,
    "step_s_median": median,
    "ratio_best_vs_before": {k: best[k] / best["before"] for k in best},
    "ratio_median_vs_before": {k: median[k] / median["before"] for k in median},
    "ratio_paired_median_vs_before": paired,
    "step_s_all": times,
    "wall_s_all": wall,
  }


def main() -> None:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  ap.add_argument("--out", default="bench-results/lm_input_checks.json")
  ap.add_argument("--quick", action="store_true", help="smoke shape")
  ap.add_argument("--profile", default="book")
  ap.add_argument("--steps", type=int, default=5, help="steps per round")
  ap.add_argument("--rounds", type=int, default=15, help="paired rounds")
  ap.add_argument("--note", default="", help="free text stored in the JSON")
  ap.add_argument(
    "--multithread", action="store_true", help="keep XLA's threading"
  )
  args = ap.parse_args()
  if args.quick:
    args.profile, args.steps, args.rounds = "smoke", 2, 3
  t0 = time.perf_counter()
  out = run(args.profile, args.steps, args.rounds)
  out["note"] = args.note
  out["cpu_count"] = os.cpu_count()
  out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  out["provenance"] = results.provenance(args.profile, time.perf_counter() - t0)
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results.to_jsonable(out), indent=1))
  rb, rp = out["ratio_best_vs_before"], out["ratio_paired_median_vs_before"]
  print(
    f"[{args.profile}] step before {out['step_s_best']['before'] * 1e3:.1f} "
    f"ms CPU | ids x{rb['ids']:.3f} (paired median x{rp['ids']:.3f}) | after "
    f"x{rb['after']:.3f} (paired median x{rp['after']:.3f}) -> {path}"
  )


if __name__ == "__main__":
  jnp.zeros(())  # start JAX before timing anything
  main()
