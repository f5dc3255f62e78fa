"""MaxText's own train step at the benchmark's shape, timed on request.

Run with the python of MaxText's venv (``peers/setup_maxtext.sh``), by
``lm_compare.MaxTextWorker``: argv[1] is a JSON shape ``{layers, d_model,
heads, d_mlp, vocab, length, batch}`` (argv[2], optional, JSON of extra
MaxText overrides). It builds MaxText's gpt3 decoder (``gpt3-52k`` model
config resized: learned positions, LayerNorm, GELU MLP, tied embeddings,
fused QKV, AdamW with clipping) in float32 with MaxText's defaults (scanned
layers, full remat) and its synthetic data, jits MaxText's ``train_step``
exactly as its trainer does, prints one JSON line, then answers stdin
lines ``run N`` (N steps) / ``fwd 1`` / ``grad 1`` (forward, forward +
backward of MaxText's ``loss_fn`` on the same batch) with
``{"seconds": ...}``.
"""

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
  shape = json.loads(sys.argv[1])
  extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from maxtext.configs import pyconfig
  from maxtext.trainers.pre_train import train
  from maxtext.utils import train_utils

  out_dir = tempfile.mkdtemp(prefix="maxtext_bench_")
  base = os.path.join(os.path.dirname(pyconfig.__file__), "base.yml")
  overrides = {
    "model_name": "gpt3-52k",
    "run_name": "bench",
    "base_output_directory": out_dir,
    "hardware": "cpu",
    "skip_jax_distributed_system": True,
    "dataset_type": "synthetic",
    "enable_checkpointing": False,
    "enable_tensorboard": False,
    "steps": 10**6,
    "per_device_batch_size": shape["batch"],
    "max_target_length": shape["length"],
    "trainable_position_size": shape["length"],
    "override_model_config": True,
    "base_num_decoder_layers": shape["layers"],
    "base_emb_dim": shape["d_model"],
    "base_num_query_heads": shape["heads"],
    "base_num_kv_heads": shape["heads"],
    "head_dim": shape["d_model"] // shape["heads"],
    "base_mlp_dim": shape["d_mlp"],
    "vocab_size": shape["vocab"],
    "dtype": "float32",
    "weight_dtype": "float32",
    "learning_rate": 3e-3,
    "log_period": 10**6,
    **extra,
  }
  argv = ["worker", base] + [f"{k}={v}" for k, v in overrides.items()]
  config = pyconfig.initialize(argv)
  (
    _init_rng,
    _ckpt,
    state_mesh_shardings,
    _model,
    mesh,
    _lr,
    data_iterator,
    _loader,
    _rampup,
    _eval_it,
    state,
  ) = train_utils.setup_train_loop(config, None)
  jit_model, state = nnx.split(state)
  params_shardings, state_mesh_shardings = (
    train.sharding.maybe_update_params_sharding_with_opt(
      config, state_mesh_shardings
    )
  )
  p_train_step, _ = train_utils.jit_train_and_eval_step(
    config,
    jit_model,
    mesh,
    state,
    state_mesh_shardings,
    train.train_step,
    train.eval_step,
    None,
    params_shardings,
  )
  batch = next(data_iterator)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = p_train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  # Forward and forward+backward of MaxText's own loss_fn (as its
  # train_step calls it), for the backward/forward ratio.
  ts = nnx.merge(jit_model, jax.tree.map(jnp.copy, state))
  graphdef, params, rest = nnx.split(ts.model, nnx.Param, ...)

  def loss(p):
    model = nnx.merge(graphdef, p, rest, copy=True)
    out, _ = train.loss_fn(model, config, batch, None, None, is_train=True)
    return out

  with jax.set_mesh(mesh):
    fwd = jax.jit(loss).lower(params).compile()
    grad = jax.jit(jax.grad(loss)).lower(params).compile()

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics

  n_params = sum(
    x.size
    for x in jax.tree.leaves(nnx.state(nnx.merge(jit_model, state), nnx.Param))
  )
  jax.block_until_ready(step())
  mem = compiled.memory_analysis()
  print(
    json.dumps(
      {
        "status": "ok",
        "compile_s": compile_s,
        "params": int(n_params),
        "temp_bytes": int(mem.temp_size_in_bytes) if mem else None,
        "config": {
          k: str(getattr(config, k))
          for k in (
            "decoder_block",
            "scan_layers",
            "remat_policy",
            "dtype",
            "attention",
            "fused_qkv",
            "opt_type",
          )
        },
      }
    ),
    flush=True,
  )
  for line in sys.stdin:
    what, n = line.split()
    n = int(n)
    t0 = time.perf_counter()
    if what in ("fwd", "grad"):
      fn = fwd if what == "fwd" else grad
      jax.block_until_ready(fn(params))
      print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
      continue
    out = None
    for _ in range(n):
      out = step()
    jax.block_until_ready(out)
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
  main()
