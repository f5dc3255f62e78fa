"""ScaleBiO's cost against plain fine-tuning (Chapter 4, issue 11 §4).

Two parts, each a ratio against a baseline measured in the same run:

* ``--part time``: step time at the chapter's shape (the ``book`` noise
  experiment's model and batch, one CPU device): the jitted plain AdamW
  fine-tuning step and the jitted ScaleBiO step, timed in interleaved pairs
  (:func:`dataweights.experiments.ch4.cost.measure`). Goal: ScaleBiO at most
  2.5x the plain step (the reference is about 3x).
* ``--part memory``: XLA's compiled memory analysis per device of one step
  at GPT-2 124M shape on an 8-way FSDP mesh of fake CPU devices (abstract
  inputs; nothing is allocated): plain full fine-tuning with AdamW,
  ScaleBiO without LISA (``w``'s pass joint over training and validation
  rows, and split, ``ScaleBiO.w_pass``), ScaleBiO with LISA at several
  numbers of active blocks, with the blocks chosen in the step and fixed
  per compiled step (``lisa.fixed_blocks``: no weight gradients for frozen
  blocks); and the optimiser-state bytes (``w``'s and ``u``'s) against the
  number of active blocks. Every row uses the same model and loss:
  unrolled blocks (``--scan``: one ``lax.scan``), the lean cross-entropy
  backward (``--loss autodiff``: the chapters' ``lm_loss``). Goals:
  ScaleBiO + LISA (2 blocks) at most 1.0x plain, without LISA at most 2.0x.
  Rows are saved after each compile.

  python benchmarks/bench_scalebio.py --part time --out bench-results/scalebio_time.json
  python benchmarks/bench_scalebio.py --part memory --out bench-results/scalebio_memory.json
  (--quick: smoke shapes; --layers/--d-model/--length/--batch: other shapes)
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _save(path: str, out: dict) -> None:
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_text(json.dumps(out, indent=1) + "\n")


def part_time(args) -> dict:
  from dataweights.configs import scalebio as configs
  from dataweights.experiments.ch4 import cost

  # The chapter's shape; the weights do not change the cost: no pre-training.
  cfg = configs.noise_ordering(
    "smoke" if args.quick else "book", pretrain_steps=0
  )
  res = cost.measure(cfg, rounds=args.rounds)
  print(cost.report(res))
  res["goal"] = {"ratio_max": 2.5, "ok": res["time"]["ratio_median"] <= 2.5}
  return res


def _with_fixed(step, fixed):
  from dataweights.train import lisa

  def fixed_step(state, batches):
    with lisa.fixed_blocks(fixed):
      return step(state, batches)

  return fixed_step


def part_memory(args, save) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from dataweights import sharding
  from dataweights.configs import lm
  from dataweights.configs import train as train_configs
  from dataweights.models import transformer as tr
  from dataweights.train import lisa, optim
  from dataweights.train.method import state_shardings
  from dataweights.train.scalebio import scalebio
  from dataweights.train.state import StaticParts, TrainState
  from dataweights.train.step import lm_loss, lm_loss_fused, make_train_step

  if args.quick:
    cfg = lm.lm_model(
      "smoke", num_layers=4, d_model=64, num_heads=4, d_mlp=256,
      max_len=args.length, scan_layers=args.scan, remat=args.remat,
    )  # fmt: skip
  else:
    over = {
      "max_len": args.length,
      "scan_layers": args.scan,
      "remat": args.remat,
    }
    if args.layers:
      over["num_layers"] = args.layers
    if args.d_model:
      over["d_model"] = args.d_model
      over["d_mlp"] = 4 * args.d_model
    if args.heads:
      over["num_heads"] = args.heads
    cfg = lm.lm_model("paper", size="gpt2-124m", **over)
  mesh = sharding.make_mesh(lm.MeshConfig(data=1, fsdp=-1, model=1))
  n_dev = mesh.devices.size
  graphdef0, abs_state = sharding.abstract_sharded(
    lambda: tr.Transformer(cfg, rngs=nnx.Rngs(0)), mesh
  )
  model = nnx.merge(graphdef0, abs_state)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  repl = NamedSharding(mesh, P())
  K, B, L1 = 4, args.batch, args.length + 1
  tok_sh, vec_sh = (
    sharding.batch_sharding(mesh, 2),
    sharding.batch_sharding(mesh, 1),
  )
  sds = jax.ShapeDtypeStruct
  batch = {
    "tokens_BxL": sds((B, L1), jnp.int32, sharding=tok_sh),
    "mask_BxL": sds((B, L1), jnp.bool_, sharding=tok_sh),
    "domain_B": sds((B,), jnp.int32, sharding=vec_sh),
  }
  BV = args.valid_batch or B
  valid = {
    "tokens_BxL": sds((BV, L1), jnp.int32, sharding=tok_sh),
    "mask_BxL": sds((BV, L1), jnp.bool_, sharding=tok_sh),
    "domain_B": sds((BV,), jnp.int32, sharding=vec_sh),
  }
  train_cfg = train_configs.train("paper", batch_size=B)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  def placed(tree):
    sh = state_shardings(tree, params, param_sh, repl)
    return jax.tree.map(
      lambda a, s: sds(a.shape, a.dtype, sharding=s), tree, sh
    ), sh

  # Optimiser-state bytes (w's and u's, all devices) for every number of
  # active blocks: shapes only, no compile.
  state_vs_active = {}
  for a in range(0, cfg.num_layers + 1):
    m = scalebio("paper", lisa_active=a, lisa_period=20, steps=1000)
    w_opt = jax.eval_shape(m.w_optimizer(train_cfg).init, params)
    u_opt = jax.eval_shape(m.u_optimizer().init, params)
    state_vs_active[str(a)] = int(
      lisa.state_bytes(w_opt) + lisa.state_bytes(u_opt)
    )
  plain_opt = int(
    lisa.state_bytes(
      jax.eval_shape(optim.make_optimizer(train_cfg).init, params)
    )
  )
  print("optimiser-state bytes (w + u) by active blocks (0: no LISA):")
  for a, b in state_vs_active.items():
    print(f"  {a:>2}: {b / 2**20:8.1f} MiB ({b / plain_opt:.2f} x plain AdamW)")
  rows = {}
  variants = [("plain", None), ("scalebio/joint", 0), ("scalebio", 0)]
  for a in args.active:
    if a <= cfg.num_layers:
      variants.append((f"scalebio+lisa{a}", a))
      variants.append((f"scalebio+lisa{a}/fixed", a))
  for name, active in variants:
    fixed = None
    if name.endswith("/fixed"):
      # The lean mode: the period's active blocks are constants of the
      # compiled step (lisa.fixed_blocks); here the first period's.
      fixed = lisa.blocks_at(
        0, seed=0, period=20, num_blocks=cfg.num_layers, num_active=active
      )
    if active is None:
      method, tx = None, optim.make_optimizer(train_cfg)
    else:
      method = scalebio(
        "paper", lisa_active=active, lisa_period=20, steps=1000,
        w_pass="joint" if name.endswith("/joint") else args.w_pass,
      )  # fmt: skip
      tx = method.w_optimizer(train_cfg)
    opt, opt_sh = placed(jax.eval_shape(tx.init, params))
    extra = {}
    opt_bytes = lisa.state_bytes(opt)
    if method is not None:
      m_abs = jax.eval_shape(
        lambda p, m=method: m.init(p, jax.random.key(0), K), params
      )
      m, _ = placed(m_abs)
      extra = {"method": m}
      opt_bytes += lisa.state_bytes(m["u_opt"])
    state = TrainState(
      step=sds((), jnp.int32, sharding=repl),
      params=params,
      opt_state=opt,
      rng=sds((2,), jnp.uint32, sharding=repl),
      model_state=jax.tree.map(
        lambda a: sds(a.shape, a.dtype, sharding=repl), model_state
      ),
      extra=extra,
      halted=sds((), jnp.int32, sharding=repl),
    )
    state_sh = jax.tree.map(lambda a: a.sharding, state)
    batches = {"train": batch}
    if method is not None:
      batches["valid"] = valid
    batch_sh = jax.tree.map(lambda a: a.sharding, batches)
    step = make_train_step(
      StaticParts(graphdef, tx),
      loss_fn=lm_loss_fused if args.loss == "fused" else lm_loss,
      domain_names=[str(k) for k in range(K)],
      method=method,
    )
    if fixed is not None:
      step = _with_fixed(step, fixed)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = (
        jax.jit(
          step,
          in_shardings=(state_sh, batch_sh),
          out_shardings=(state_sh, repl),
          donate_argnums=(0,),
        )
        .lower(state, batches)
        .compile()
      )
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    peak = (
      ma.argument_size_in_bytes
      + ma.temp_size_in_bytes
      + ma.output_size_in_bytes
      - ma.alias_size_in_bytes
    )
    rows[name] = {
      "lisa_active": active,
      "w_pass": None if method is None else method.w_pass,
      "lisa_fixed_blocks": None if fixed is None else list(fixed),
      "argument_bytes": int(ma.argument_size_in_bytes),
      "temp_bytes": int(ma.temp_size_in_bytes),
      "output_bytes": int(ma.output_size_in_bytes),
      "alias_bytes": int(ma.alias_size_in_bytes),
      "peak_bytes_per_device": int(peak),
      "optimizer_state_bytes_total": int(opt_bytes),
      "compile_s": round(compile_s, 1),
    }
    print(
      f"{name}: peak {peak / 2**20:.1f} MiB/device, optimiser state "
      f"{opt_bytes / 2**20:.1f} MiB (all devices), compile {compile_s:.0f} s",
      flush=True,
    )
    base = rows["plain"]["peak_bytes_per_device"]
    for r in rows.values():
      r["peak_ratio_to_plain"] = round(r["peak_bytes_per_device"] / base, 3)
    save(
      {
        "model": {
          "num_layers": cfg.num_layers,
          "d_model": cfg.d_model,
          "vocab_size": cfg.vocab_size,
          "num_params": n_params,
          "scan_layers": cfg.scan_layers,
          "remat": cfg.remat,
        },
        "loss": args.loss,
        "mesh": {"fsdp": n_dev},
        "batch": B,
        "valid_batch": BV,
        "length": L1,
        "num_sources": K,
        "rows": rows,
        "optimizer_state_bytes_by_active_blocks": state_vs_active,
        "plain_adamw_state_bytes": plain_opt,
        "partial": len(rows) < len(variants),
      }
    )
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--part", choices=("time", "memory"), required=True)
  ap.add_argument("--out", default=None)
  ap.add_argument("--quick", action="store_true", help="smoke shapes")
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=1024)
  ap.add_argument("--valid-batch", type=int, default=0, help="default: --batch")
  ap.add_argument("--layers", type=int, default=0)
  ap.add_argument(
    "--loss", choices=("fused", "autodiff"), default="fused",
    help="cross-entropy: lm_loss_fused or lm_loss (both runs use the same)",
  )  # fmt: skip
  ap.add_argument(
    "--scan", action="store_true",
    help="blocks scanned over layers (default: unrolled, a list of blocks)",
  )  # fmt: skip
  ap.add_argument(
    "--remat", default="dots_no_batch", help="ModelConfig.remat policy"
  )
  ap.add_argument("--d-model", type=int, default=0)
  ap.add_argument("--heads", type=int, default=0)
  ap.add_argument("--active", type=int, nargs="*", default=[2])
  ap.add_argument(
    "--w-pass", choices=("joint", "split"), default="split",
    help="ScaleBiO's w pass (ScaleBiO.w_pass)",
  )  # fmt: skip
  args = ap.parse_args()
  out_path = args.out or f"bench-results/scalebio_{args.part}.json"
  header = {"cpu_count": os.cpu_count(), "argv": sys.argv[1:]}
  if args.part == "time":
    _save(out_path, {**header, **part_time(args)})
  else:
    part_memory(args, lambda d: _save(out_path, {**header, **d}))
  print("wrote", out_path)


if __name__ == "__main__":
  if "--part" in sys.argv and "memory" in sys.argv:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_force_host_platform_device_count=8"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
