"""Weight gradients on XLA:CPU: autodiff of ``tensordot`` vs ``weight_dot``.

JAX transposes ``y = x . w`` into ``dw = transpose(dot_general(dy, x))``
(contracting the token axes); XLA:CPU folds the transpose into one dot whose
left operand is read transposed, which its YNNPACK kernels do not take, so a
generic kernel runs it. :func:`dataweights.models.transformer.weight_dot`
routes the weight's tangent through a barrier so that the same gradient is a
row-major YNNPACK product followed by a small transpose.

Two parts, each timed in interleaved, paired rounds (every variant once per
round; ratios are medians of the per-round ratios ``weight_dot / plain``):

* ``products``: the vjp of one product at the ``book`` LM's shapes (2048
  tokens: D -> F, F -> D, D -> 3D, D -> V), the weight gradient alone and
  input + weight gradients together, with the GFLOP/s of each next to the
  forward product's;
* ``model``: the model's forward+backward (``lm_loss``) and the full jitted
  train step (AdamW), at each ``--depths``, with ``ModelConfig.weight_dot``
  off (the default, ``plain``) and on.

XLA keeps its default threading (both cores): this is the speed the book
runs at. Wall time, so use an otherwise idle machine.

  python benchmarks/bench_weight_grad.py --out bench-results/weight_grad.json
  python benchmarks/bench_weight_grad.py --quick   # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

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


def _plain_dot(x, w, num_in=1, preferred_element_type=None):
  return jnp.tensordot(
    x, w, axes=num_in, preferred_element_type=preferred_element_type
  )


IMPLS = {"plain": _plain_dot, "weight_dot": tr.weight_dot}


def _paired(fns: dict, args: dict, rounds: int, calls: int) -> dict:
  """Seconds per call of each ``fns[k](*args[k])``, interleaved rounds."""
  for k, f in fns.items():
    jax.block_until_ready(f(*args[k]))
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      out = None
      for _ in range(calls):
        out = f(*args[k])
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / calls)
  return times


def _summary(times: dict, base: str, flops: float | None = None) -> dict:
  out = {
    k: {"min_s": min(v), "median_s": statistics.median(v), "all_s": v}
    for k, v in times.items()
  }
  for k, v in times.items():
    out[k]["paired_median_ratio_to_" + base] = statistics.median(
      a / b for a, b in zip(v, times[base])
    )
    if flops:
      out[k]["gflops_best"] = flops / min(v) / 1e9
  return out


def products(tokens: int, shapes: dict, rounds: int, calls: int) -> dict:
  rng = np.random.default_rng(0)
  out = {}
  for name, (k, n) in shapes.items():
    x = jnp.asarray(rng.standard_normal((16, tokens // 16, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((16, tokens // 16, n)), jnp.float32)
    flops = 2.0 * tokens * k * n
    fns, args = {"forward": jax.jit(_plain_dot)}, {"forward": (x, w)}
    for impl_name, impl in IMPLS.items():
      fns[f"dw/{impl_name}"] = jax.jit(
        lambda x, w, dy, f=impl: jax.vjp(lambda w: f(x, w), w)[1](dy)[0]
      )
      args[f"dw/{impl_name}"] = (x, w, dy)
      fns[f"dx+dw/{impl_name}"] = jax.jit(
        lambda x, w, dy, f=impl: jax.vjp(f, x, w)[1](dy)
      )
      args[f"dx+dw/{impl_name}"] = (x, w, dy)
    times = _paired(fns, args, rounds, calls)
    res = {"in_out": [k, n], "flops_per_product": flops}
    for part in ("dw", "dx+dw"):
      sub = {i: times[f"{part}/{i}"] for i in IMPLS}
      res[part] = _summary(sub, "plain", flops * (1 if part == "dw" else 2))
    res["forward"] = _summary({"forward": times["forward"]}, "forward", flops)[
      "forward"
    ]
    out[name] = res
  return out


def model(profile: str, depth: int, rounds: int, steps: int) -> dict:
  cfg = dataclasses.replace(lm.lm_model(profile), num_layers=depth)
  train_cfg = train_configs.train(profile, progress=False)
  b, length = train_cfg.batch_size, cfg.max_len
  rng = np.random.default_rng(0)
  single = SingleDeviceSharding(jax.devices()[0])
  batch = jax.device_put(
    {
      "tokens_BxL": rng.integers(0, 256, (b, length + 1)).astype(np.int32),
      "mask_BxL": np.ones((b, length + 1), bool),
      "domain_B": rng.integers(0, 3, b).astype(np.int32),
    },
    single,
  )
  tx = optim.make_optimizer(train_cfg)
  fb, fb_args, step_fns, states = {}, {}, {}, {}
  for name in IMPLS:
    cfg_v = dataclasses.replace(cfg, weight_dot=name == "weight_dot")
    m = tr.Transformer(cfg_v, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m, nnx.Param)

    def loss(p, graphdef=graphdef):
      return jnp.mean(lm_loss(nnx.merge(graphdef, p), batch, None))

    state, static, shardings = init_train_state(m, tx, seed=0)
    step = jit_train_step(make_train_step(static), shardings, single, single)
    fb[name] = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    step_fns[name] = step.lower(state, batch).compile()
    fb_args[name] = (params,)
    states[name] = state
  out = {"layers": depth}
  out["forward_backward"] = _summary(_paired(fb, fb_args, rounds, 1), "plain")
  # The train step donates its state: carry it through the rounds.
  times = {k: [] for k in step_fns}
  for k, f in step_fns.items():
    states[k], _ = f(states[k], batch)
  for _ in range(rounds):
    for k, f in step_fns.items():
      t0 = time.perf_counter()
      m = None
      for _ in range(steps):
        states[k], m = f(states[k], batch)
      jax.block_until_ready(m)
      times[k].append((time.perf_counter() - t0) / steps)
  out["train_step"] = _summary(times, "plain")
  return out


def main() -> None:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  ap.add_argument("--out", default="bench-results/weight_grad.json")
  ap.add_argument("--quick", action="store_true", help="smoke shapes")
  ap.add_argument("--profile", default="book")
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8, 12])
  ap.add_argument("--note", default="")
  args = ap.parse_args()
  t0 = time.perf_counter()
  cfg = lm.lm_model(args.profile)
  d, f, v = cfg.d_model, cfg.d_mlp, cfg.vocab_size
  tokens = 16 * cfg.max_len
  rounds, calls, steps = args.rounds, 10, 3
  if args.quick:
    args.profile, args.depths, rounds, calls, steps = "smoke", [2], 3, 2, 1
    tokens, d, f, v = 256, 32, 64, 264
  shapes = {"D->F": (d, f), "F->D": (f, d), "D->3D": (d, 3 * d), "D->V": (d, v)}
  out = {
    "benchmark": "weight_grad",
    "profile": args.profile,
    "tokens": tokens,
    "products": products(tokens, shapes, rounds, calls),
    "model": [model(args.profile, n, rounds, steps) for n in args.depths],
    "measure": "wall seconds per call, XLA default threading",
    "note": args.note,
    "cpu_count": os.cpu_count(),
    "load_average": os.getloadavg(),
  }
  out["provenance"] = results.provenance(args.profile, time.perf_counter() - t0)
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results.to_jsonable(out), indent=1))
  for name, r in out["products"].items():
    dw, both = r["dw"], r["dx+dw"]
    print(
      f"{name:6s} forward {r['forward']['gflops_best']:5.0f} GFLOP/s | dw "
      f"plain {dw['plain']['gflops_best']:5.0f} -> weight_dot "
      f"{dw['weight_dot']['gflops_best']:5.0f} (paired x"
      f"{dw['weight_dot']['paired_median_ratio_to_plain']:.2f}) | dx+dw x"
      f"{both['weight_dot']['paired_median_ratio_to_plain']:.2f}"
    )
  for r in out["model"]:
    fb, st = r["forward_backward"], r["train_step"]
    print(
      f"{r['layers']:2d} layers: fwd+bwd {fb['plain']['median_s'] * 1e3:.1f} ms"
      f" plain, x{fb['weight_dot']['paired_median_ratio_to_plain']:.3f} "
      f"weight_dot | train step {st['plain']['median_s'] * 1e3:.1f} ms, x"
      f"{st['weight_dot']['paired_median_ratio_to_plain']:.3f}"
    )
  print(f"-> {path}")


if __name__ == "__main__":
  jnp.zeros(())  # start JAX before timing anything
  main()
