"""Text pipeline throughput against the training step that consumes it.

Measured in one run, at a profile's batch shapes (default ``book``):

* **pipeline, train stream**: :class:`MixtureSampler` batches of B x L rows
  (weights changed every step, as an online method does);
* **pipeline, filter streams**: :class:`FilterStreams` steps, a big generic
  batch of G = B x downsampling rows plus a specific batch;
* **training step** (the baseline): the project's LM
  (``models.transformer.Transformer`` with ``configs.lm.lm_model(profile)``)
  and jitted step (``train.step.make_train_step`` with
  ``train.optim.make_optimizer``), on a batch from the pipeline, timed after
  compilation, host-to-device transfer included.

Floor (issue 3): the pipeline delivers at least 10x the examples per second
the step consumes. For the filter streams, one pipeline step (G + specific
rows) is compared with one plain training step, a conservative baseline:
the filtering step also scores the big batch, so it is slower.

Data: the prepared real text corpus if ``dataweights.data.prepare`` can load
it, else synthetic documents with log-normal lengths (median 400 bytes).

  python benchmarks/bench_pipeline.py --out bench-results/pipeline.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

FLOOR = 10.0


def _synthetic_domains(num_domains: int, docs_per_domain: int, seed: int = 0):
  from dataweights.data.pipeline import DomainSource

  rng = np.random.default_rng(seed)
  out = []
  for k in range(num_domains):
    lengths = np.clip(rng.lognormal(np.log(400), 1.0, docs_per_domain), 1, 8192)
    records = [
      {"text": rng.integers(32, 127, int(n)).astype(np.uint8).tobytes()}
      for n in lengths
    ]
    out.append(DomainSource(f"domain{k}", records))
  return out


def _real_domains():
  """The prepared text domains (built once if missing), or None."""
  try:
    from dataweights.data import prepare
    from dataweights.data.pipeline import prepared_domains

    prepare.prepare(["dw_text_domains"], progress=False)  # idempotent
    return prepared_domains("train"), "prepared:dw_text_domains/train"
  except Exception as e:  # noqa: BLE001 (any failure -> synthetic data)
    return None, f"synthetic ({type(e).__name__}: {str(e)[:120]})"


def _time_pipeline(make_next, n: int) -> float:
  make_next()  # warm caches (permutations, first documents)
  t0 = time.perf_counter()
  for _ in range(n):
    make_next()
  return (time.perf_counter() - t0) / n


def _train_step(profile: str, batch, num_domains: int, steps: int):
  import jax
  from flax import nnx
  from jax.sharding import SingleDeviceSharding

  from dataweights.configs import lm, train
  from dataweights.models.transformer import Transformer
  from dataweights.train import optim
  from dataweights.train.state import init_train_state
  from dataweights.train.step import jit_train_step, make_train_step

  model_cfg = lm.lm_model(profile)
  train_cfg = train.train(profile)
  model = Transformer(model_cfg, rngs=nnx.Rngs(0))
  tx = optim.make_optimizer(train_cfg)
  state, static, shardings = init_train_state(model, tx, seed=0)
  # As the training loop does it: explicit shardings, state donated.
  device = SingleDeviceSharding(jax.devices()[0])
  step = jit_train_step(
    make_train_step(static, domain_names=[f"d{k}" for k in range(num_domains)]),
    shardings,
    device,
    device,
  )
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  state, metrics = step(state, batch)  # a second warm-up call
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  per_step = (time.perf_counter() - t0) / steps
  return per_step, compile_s, model_cfg


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default="bench-results/pipeline.json")
  ap.add_argument("--profile", default="book")
  ap.add_argument("--quick", action="store_true", help="fewer repetitions")
  ap.add_argument("--synthetic", action="store_true", help="skip real data")
  args = ap.parse_args()

  import jax

  from dataweights.data import mixture, pipeline

  n_batches, n_steps = (30, 3) if args.quick else (200, 20)
  cfg = pipeline.pipeline(args.profile)
  domains, data = (None, "synthetic (--synthetic)")
  if not args.synthetic:
    domains, data = _real_domains()
  if domains is None:
    domains = _synthetic_domains(8, 300 if args.quick else 2000)
  k = len(domains)
  rng = np.random.default_rng(0)
  w_SxK = rng.random((n_batches + 2, k)) + 0.05

  sampler = mixture.train_sampler(domains, cfg)
  it = iter(range(10**9))
  train_s = _time_pipeline(
    lambda: sampler.next_batch(w_SxK[next(it) % len(w_SxK)]), n_batches
  )
  generic, specific = domains[:-1], domains[-1]
  streams = mixture.FilterStreams(generic, specific, cfg)
  filter_s = _time_pipeline(
    lambda: streams.next(w_SxK[next(it) % len(w_SxK), :-1]),
    max(n_batches // 4, 5),
  )
  pad = mixture.train_sampler(
    domains, pipeline.pipeline(args.profile, packing="pad")
  )
  pad_s = _time_pipeline(pad.next_batch, n_batches)

  batch = sampler.next_batch()
  step_s, compile_s, model_cfg = _train_step(args.profile, batch, k, n_steps)

  b, g, length = cfg.batch_size, cfg.generic_batch_size, cfg.seq_len
  filter_rows = g + cfg.specific_batch_size

  def rates(seconds, rows):
    return {
      "s_per_batch": seconds,
      "examples_per_s": rows / seconds,
      "tokens_per_s": rows * length / seconds,
    }

  consumed = rates(step_s, b)
  out = {
    "benchmark": "bench_pipeline",
    "profile": args.profile,
    "quick": args.quick,
    "data": data,
    "num_domains": k,
    "shapes": {
      "B": b,
      "L": length,
      "G": g,
      "specific_B": cfg.specific_batch_size,
    },
    "device": str(jax.devices()[0]),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "train_step": {
      "model": "dataweights.models.transformer.Transformer",
      "model_cfg": {
        f: getattr(model_cfg, f)
        for f in ("num_layers", "d_model", "d_mlp", "num_heads", "max_len")
      },
      "step": "dataweights.train.step.make_train_step (jax.jit)",
      "compile_s": compile_s,
      **consumed,
    },
    "pipeline": {
      "train_pack": rates(train_s, b),
      "train_pad": rates(pad_s, b),
      "filter_streams": {**rates(filter_s, filter_rows), "rows": filter_rows},
    },
  }
  ratios = {
    "train_pack": step_s / train_s,
    "train_pad": step_s / pad_s,
    # Per step: one filter-stream draw against one plain training step.
    "filter_streams_per_step": step_s / filter_s,
  }
  out["ratio_pipeline_over_step"] = ratios
  out["floor"] = {"min_ratio": FLOOR, "ok": min(ratios.values()) >= FLOOR}
  for name, r in ratios.items():
    print(f"{name}: pipeline delivers {r:.1f}x what the step consumes")
  print(
    f"train step {step_s * 1e3:.1f} ms ({consumed['examples_per_s']:.0f} ex/s); "
    f"pipeline {train_s * 1e3:.2f} ms/batch, filter {filter_s * 1e3:.2f} ms/step"
  )
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
