"""Step cost of each method relative to base, measured here and now.

Not a published result (timings depend on the machine and its load): the
chapter prints it in a cell that the drift guard does not compare. It
times the compiled steps the chapter already built (no new compilation
when run after the language-modelling section), the methods alternating
within each round; the ratio is the minimum over rounds of a method's time
over base's. ``benchmarks/bench_filtering.py`` measures the same more
carefully (single-threaded XLA, process CPU time, FLOPs).
"""

from __future__ import annotations

import time

import jax

from dataweights.configs import filtering as fcfg
from dataweights.data import filter_feed
from dataweights.experiments.ch1.common import fmt_table
from dataweights.experiments.ch3 import common, tasks
from dataweights.train.feeder import Feeder

REFERENCE: dict[str, str] = {
  "base": "1",
  "mixing": "2",
  "classifier": "~7 (downsampling 256)",
  "cds": "1.2",
  "dds": "~3.7",
  "anograd": "~3.5",
  "soba": "~4.7",
}
"""Step cost relative to standard training in the reference logs."""


def measure(profile: str = "book", rounds: int = 5, steps: int = 10) -> str:
  """A table of step time ratios to base at the chapter's text shape."""
  cfg = fcfg.filter_lm(profile)
  task = tasks.lm_task(cfg)
  runs = {}
  for name in fcfg.METHOD_NAMES:
    method = common.build_method(name, cfg, task.scorer)
    trainer = common.make_trainer(task, method, task.train_cfg(0))
    feed = filter_feed.FilterFeed(task.make_streams(0), cfg.batch_size)
    fd = Feeder(feed.sources())
    batches = [trainer.put_batch(fd.next(s)) for s in range(4)]
    state = trainer.state
    for b in batches:  # compile (or hit the cache) and warm up
      state, m = trainer.jit_step(state, b)
    jax.block_until_ready(state)
    runs[name] = [trainer.jit_step, state, batches, []]
  for _ in range(rounds):
    for run in runs.values():
      step, state, batches, times = run
      t0 = time.perf_counter()
      for s in range(steps):
        state, m = step(state, batches[s % len(batches)])
      jax.block_until_ready((state, m))
      times.append((time.perf_counter() - t0) / steps)
      run[1] = state
  base = min(runs["base"][3])
  rows = [
    [name, f"{1e3 * min(r[3]):.1f}", f"{min(r[3]) / base:.2f}", REFERENCE[name]]
    for name, r in runs.items()
  ]
  return fmt_table(
    ["method", "step (ms)", "x base (here)", "x base (reference)"], rows
  )
