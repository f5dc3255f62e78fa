"""Cost of influence-based selection (Chapter 5, section 3).

Measured in one run at the chapter's selection shape
(``configs.influence.selection("book")``: the byte transformer, rows of
``seq_len`` tokens):

1. **per-example gradients**: ``jax.vmap(jax.grad(...))`` over a batch of
   ``--batch`` examples (jitted, whole batch at once and in chunks of
   ``chunk_size``) against a Python loop over the examples calling one
   jitted per-example gradient (what batch-size-1 code does). Both return
   every example's full gradient and block until it is ready. The variants
   alternate within each round (paired rounds) so that outside load hits
   them alike; the speed-up is the loop's time over vmap's, median over
   rounds, with process CPU time and wall time both stored.
2. **projection + store**: the projected (``proj_dim``) per-example
   gradients of a pool of ``--pool`` examples computed by vmap and appended
   to a memory-mapped :class:`~dataweights.methods.gradstore.GradientStore`
   (float16): its size on disk, rows per second written (projection
   included), and rows per second of the streamed cosine product against
   the seed set's gradients (``GradientStore.matmul``, chunked reads).

  python benchmarks/bench_influence.py --out bench-results/influence.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dataweights.configs import influence as cfgs
from dataweights.experiments.ch5 import select
from dataweights.methods import gradstore, pergrad
from dataweights.methods.projection import Projector
from dataweights.models.transformer import Transformer


def _timed(fn) -> tuple[float, float]:
  w0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default="bench-results/influence.json")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--pool", type=int, default=1200)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  profile = "smoke" if args.quick else "book"
  cfg = cfgs.selection(profile)
  if args.quick:
    args.batch, args.pool, args.rounds = 8, 32, 2
  model = Transformer(select.model_config(cfg), rngs=nnx.Rngs(0))
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  def loss(p, b):
    return select._loss(nnx.merge(gd, p, rest, copy=True), b)

  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 256, (args.pool, cfg.seq_len)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[:, : cfg.seq_len // 2] = False  # a prompt half without loss
  pool = {"tokens_BxL": tokens, "mask_BxL": mask}
  batch = {k: jnp.asarray(v[: args.batch]) for k, v in pool.items()}

  vmap_all = jax.jit(lambda p, b: pergrad.per_example_grads(loss, p, b))
  vmap_chunk = jax.jit(
    lambda p, b: pergrad.per_example_grads(
      loss, p, b, chunk_size=cfg.chunk_size
    )
  )
  variants = {
    "loop": lambda: pergrad.per_example_grads_loop(loss, params, batch),
    "vmap": lambda: vmap_all(params, batch),
    f"vmap_chunk{cfg.chunk_size}": lambda: vmap_chunk(params, batch),
  }
  # Correctness before speed: the three agree.
  ref = pergrad.flatten_per_example(variants["loop"]())
  for name, fn in variants.items():
    err = float(jnp.max(jnp.abs(pergrad.flatten_per_example(fn()) - ref)))
    scale = float(jnp.max(jnp.abs(ref)))
    assert err <= 1e-5 * scale, (name, err, scale)
  times = {k: {"wall": [], "cpu": []} for k in variants}
  for _ in range(args.rounds):
    for name, fn in variants.items():
      w, c = _timed(fn)
      times[name]["wall"].append(w)
      times[name]["cpu"].append(c)
  med = {
    k: {m: statistics.median(v[m]) for m in ("wall", "cpu")}
    for k, v in times.items()
  }
  speedup = {
    k: {m: med["loop"][m] / med[k][m] for m in ("wall", "cpu")}
    for k in variants
    if k != "loop"
  }

  # Projection + store.
  proj = Projector(dim=cfg.proj_dim, seed=0xC5)
  featurize = jax.jit(
    lambda p, b: pergrad.per_example_features(
      loss, p, b, feature_fn=proj.project, chunk_size=cfg.chunk_size
    )
  )
  step = 4 * cfg.chunk_size
  chunks = [
    {k: jnp.asarray(v[i : i + step]) for k, v in pool.items()}
    for i in range(0, args.pool - args.pool % step, step)
  ]
  rows = len(chunks) * step
  jax.block_until_ready(featurize(params, chunks[0]))  # compile
  seed_g = np.array(featurize(params, chunks[0]))[:32].T  # d x 32
  seed_g /= np.linalg.norm(seed_g, axis=0, keepdims=True)
  write_s, read_s, size = [], [], None
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(max(2, args.rounds // 2)):
      path = Path(tmp) / f"store{r}"
      t0 = time.perf_counter()
      st = gradstore.GradientStore.create(path, rows, cfg.proj_dim)
      for c in chunks:
        st.append(np.asarray(featurize(params, c)))
      st.close()
      write_s.append(time.perf_counter() - t0)
      size = sum(f.stat().st_size for f in path.iterdir())
      st = gradstore.GradientStore.open(path)
      t0 = time.perf_counter()
      st.matmul(seed_g, chunk_rows=256, normalize=True)
      read_s.append(time.perf_counter() - t0)
  out = {
    "profile": profile,
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "load_average": os.getloadavg(),
    "jax": jax.__version__,
    "shape": {
      "batch": args.batch,
      "seq_len": cfg.seq_len,
      "params": int(n_params),
      "proj_dim": cfg.proj_dim,
      "pool_rows": rows,
    },
    "per_example_grads": {
      "median_s": med,
      "speedup_over_loop": speedup,
      "rounds": args.rounds,
    },
    "store": {
      "bytes": int(size),
      "bytes_per_row": size / rows,
      "write_rows_per_s": rows / statistics.median(write_s),
      "cosine_rows_per_s": rows / statistics.median(read_s),
    },
  }
  print(json.dumps(out, indent=1))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  main()
