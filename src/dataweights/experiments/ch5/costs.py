"""Cost of per-example gradients, measured on the machine that runs the page.

Not a published result: timings depend on the machine and its load, so the
chapter prints them in an untagged cell and the drift guard never compares
them. ``benchmarks/bench_influence.py`` is the full benchmark (paired
rounds, the store's size and throughput, JSON).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dataweights.configs import influence as cfgs
from dataweights.experiments.ch5 import select
from dataweights.methods import pergrad
from dataweights.models.transformer import Transformer


def measure(profile: str = "book", batch: int = 32, rounds: int = 3) -> str:
  """Per-example gradients of the selection model: vmap vs a Python loop.

  Both compute every example's full gradient of a batch of ``batch`` random
  token rows; the two alternate within each round and the medians are
  compared (wall time).

  Returns:
    A short table (seconds and the speed-up).
  """
  cfg = cfgs.selection(profile)
  model = Transformer(select.model_config(cfg), rngs=nnx.Rngs(0))
  gd, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, b):
    return select._loss(nnx.merge(gd, p, rest, copy=True), b)

  rng = np.random.default_rng(0)
  tok = rng.integers(4, 256, (batch, cfg.seq_len)).astype(np.int32)
  b = {"tokens_BxL": jnp.asarray(tok), "mask_BxL": jnp.ones(tok.shape, bool)}
  vm = jax.jit(lambda p, x: pergrad.per_example_grads(loss, p, x))
  runs = {
    "vmap": lambda: vm(params, b),
    "loop": lambda: pergrad.per_example_grads_loop(loss, params, b),
  }
  for fn in runs.values():  # compile
    jax.block_until_ready(fn())
  t = {k: [] for k in runs}
  for _ in range(rounds):
    for k, fn in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      t[k].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in t.items()}
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return (
    f"{batch} examples x {n_params} parameters, median of {rounds} rounds:\n"
    f"  per-example loop  {med['loop']:.3f} s\n"
    f"  vmap              {med['vmap']:.3f} s\n"
    f"  speed-up          {med['loop'] / med['vmap']:.1f}x"
  )
