"""Per-operation profile of the LM's forward and forward+backward.

Profiles whatever ``dataweights`` is importable, so the same script gives
the "before" profile from an older checkout::

  git worktree add /tmp/before <old commit>
  PYTHONPATH=/tmp/before/src python benchmarks/profile_lm_ops.py \\
    --label before --out bench-results/lm_ops_before.json
  python benchmarks/profile_lm_ops.py --label after \\
    --out bench-results/lm_ops_after.json

At the ``book`` shape (16 x 128 tokens), the model's default config; the
loss is the mean next-token cross-entropy (``lm_loss``). See
``op_profile.py`` for what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import op_profile
from flax import nnx

from dataweights import results
from dataweights.configs import lm
from dataweights.models.transformer import Transformer
from dataweights.train.step import lm_loss


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--label", required=True)
  ap.add_argument("--profile", default="book")
  ap.add_argument("--calls", type=int, default=20)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  t0 = time.perf_counter()
  cfg = lm.lm_model(args.profile)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(
    rng.integers(0, 256, (16, cfg.max_len + 1)).astype(np.int32)
  )

  def loss(p):
    return jnp.mean(
      lm_loss(nnx.merge(graphdef, p), {"tokens_BxL": tokens}, None)
    )

  out = {
    "label": args.label,
    "model_config": {
      k: getattr(cfg, k)
      for k in ("num_layers", "d_model", "d_mlp", "max_len", "remat")
      + tuple(k for k in ("grad_barrier", "scan_layers") if hasattr(cfg, k))
    },
    "batch": 16,
  }
  for name, fn in (("forward", loss), ("forward_backward", jax.grad(loss))):
    compiled = jax.jit(fn).lower(params).compile()
    out[name] = op_profile.profile(compiled, (params,), calls=args.calls)
    r = out[name]
    print(
      f"[{args.label}] {name}: busy {r['busy_ms_per_call']:.1f} ms/call, "
      f"max fusion inputs {r['max_fusion_inputs']}, "
      + ", ".join(
        f"{c} {v['ms']:.1f} ms ({v['count']})"
        for c, v in r["by_category"].items()
      ),
      flush=True,
    )
  out["cpu_count"] = os.cpu_count()
  out["load_average"] = os.getloadavg()
  out["provenance"] = results.provenance(args.profile, time.perf_counter() - t0)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(results.to_jsonable(out), indent=1))


if __name__ == "__main__":
  main()
