"""Per-device memory of one LM train step, from XLA's compiled memory analysis.

The train step is loss + gradient + AdamW update (params and optimiser state
donated), jitted with the shardings of :mod:`dataweights.sharding` and
lowered on abstract inputs (``jax.ShapeDtypeStruct`` with shardings), so
nothing, not even GPT-2 124M, is materialised. For each case it records
``compiled.memory_analysis()`` (argument / output / temp / alias bytes, per
device) and the bytes of parameters and AdamW moments one device holds.

Cases:
  * ``book``: the book-profile LM on 1 device (the CPU chapters' shape);
  * ``gpt2-124m`` on 1 device (baseline) and under FSDP on 8 fake CPU
    devices, same global batch; ratios are FSDP / 1 device (ideal 1/8 for
    parameters and optimiser state).

Runs as its own process: it sets ``XLA_FLAGS`` (8 host devices) before
importing JAX.

  python benchmarks/bench_lm_memory.py --out bench-results/lm_memory.json
  python benchmarks/bench_lm_memory.py --quick   # smoke shapes, seconds
  python benchmarks/bench_lm_memory.py --with-remat  # + FSDP with remat
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dataweights import sharding  # noqa: E402
from dataweights.configs import lm  # noqa: E402
from dataweights.models import transformer as tr  # noqa: E402


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
  return total


def measure(
  cfg: lm.ModelConfig, mesh_cfg: lm.MeshConfig, devices, batch: int, length: int
) -> dict:
  """Compiles the train step abstractly and returns its memory analysis."""
  mesh = sharding.make_mesh(mesh_cfg, devices)
  sharding.check_divisible(mesh, batch_size=batch, model_cfg=cfg)
  graphdef, abs_state = sharding.abstract_sharded(
    lambda: tr.Transformer(cfg, rngs=nnx.Rngs(0)), mesh
  )
  treedef = jax.tree.structure(abs_state)
  params = jax.tree.leaves(abs_state)  # list of sharded ShapeDtypeStructs
  param_sh = [p.sharding for p in params]
  tx = optax.adamw(1e-3, weight_decay=0.1)
  abs_opt = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abs_opt,
    param_sh,
    transform_non_params=lambda _: NamedSharding(mesh, P()),
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )
  abs_opt = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abs_opt,
    opt_sh,
  )
  tok_sh = sharding.batch_sharding(mesh, 2)
  tokens = jax.ShapeDtypeStruct((batch, length + 1), np.int32, sharding=tok_sh)

  def train_step(params, opt_state, tokens_BxL):
    def loss_fn(p):
      model = nnx.merge(graphdef, jax.tree.unflatten(treedef, p))
      return tr.next_token_loss(model, tokens_BxL).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(
    train_step,
    in_shardings=(param_sh, opt_sh, tok_sh),
    out_shardings=(param_sh, opt_sh, NamedSharding(mesh, P())),
    donate_argnums=(0, 1),
  )
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(params, abs_opt, tokens).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  n_params = sum(int(np.prod(p.shape)) for p in params)
  return {
    "mesh": dict(mesh.shape),
    "batch": batch,
    "length": length,
    "num_params": n_params,
    "param_bytes_per_device": _per_device_bytes(params),
    "opt_state_bytes_per_device": _per_device_bytes(abs_opt),
    "argument_bytes": int(ma.argument_size_in_bytes),
    "output_bytes": int(ma.output_size_in_bytes),
    "alias_bytes": int(ma.alias_size_in_bytes),
    "temp_bytes": int(ma.temp_size_in_bytes),
    # peak estimate: live arguments + temporaries + outputs not aliased
    "peak_bytes": int(
      ma.argument_size_in_bytes
      + ma.temp_size_in_bytes
      + ma.output_size_in_bytes
      - ma.alias_size_in_bytes
    ),
    "compile_s": round(compile_s, 1),
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default="bench-results/lm_memory.json")
  ap.add_argument(
    "--quick",
    action="store_true",
    help="smoke-sized models instead of book / GPT-2 124M",
  )
  ap.add_argument(
    "--with-remat",
    action="store_true",
    help="also the big model under FSDP with remat=True",
  )
  ap.add_argument("--gpt2-batch", type=int, default=8)
  ap.add_argument("--gpt2-length", type=int, default=1024)
  args = ap.parse_args()
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 fake devices, got {len(devices)}"
  one = devices[:1]

  if args.quick:
    book_cfg = lm.lm_model("smoke")
    big_cfg = lm.lm_model("smoke", num_heads=8, d_model=64, d_mlp=256)
    book_shape, big_shape = (8, 32), (8, 32)
  else:
    book_cfg = lm.lm_model("book")
    big_cfg = lm.lm_model("paper", size="gpt2-124m")
    book_shape = (32, book_cfg.max_len)
    big_shape = (args.gpt2_batch, args.gpt2_length)

  single = lm.MeshConfig(data=1, fsdp=1, model=1)
  fsdp8 = lm.MeshConfig(data=1, fsdp=8, model=1)
  runs = [
    ("book_1dev", book_cfg, single, one, book_shape),
    ("big_1dev", big_cfg, single, one, big_shape),
    ("big_fsdp8", big_cfg, fsdp8, devices, big_shape),
  ]
  if args.with_remat:
    remat_cfg = dataclasses.replace(big_cfg, remat=True)
    runs.append(("big_fsdp8_remat", remat_cfg, fsdp8, devices, big_shape))
  cases = {}
  for name, cfg, mesh_cfg, devs, shape in runs:
    cases[name] = measure(cfg, mesh_cfg, devs, *shape)
    print(name, json.dumps(cases[name]), flush=True)

  base, fsdp = cases["big_1dev"], cases["big_fsdp8"]
  ratio = lambda k: round(fsdp[k] / base[k], 4) if base[k] else None
  out = {
    "what": "per-device bytes of one LM train step (loss+grad+AdamW), XLA "
    "compiled memory analysis, abstract inputs",
    "quick": args.quick,
    "big_model": "smoke-64" if args.quick else "gpt2-124m",
    "device": str(devices[0].platform),
    "cases": cases,
    "ratios_fsdp8_over_1dev": {
      k: ratio(k)
      for k in (
        "param_bytes_per_device",
        "opt_state_bytes_per_device",
        "argument_bytes",
        "temp_bytes",
        "peak_bytes",
      )
    },
  }
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  print(json.dumps(out["ratios_fsdp8_over_1dev"]))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
