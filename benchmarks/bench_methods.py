"""Step cost of every data-mixing method relative to the plain train step.

Two parts, both in one process:

1. **Chapter shape** (the ``book`` config of chapter 2: a 2-layer byte LM,
   B x L = 16 x 65, K = 11 domains): each method's jitted train step is
   compiled once (AOT, on real arrays from the chapter's data), then timed
   in interleaved rounds: every round runs ``steps`` steps of each method
   back to back (``steps`` a multiple of every horizon T, so each round holds
   the same number of hypergradients), and the ratio to the plain step is
   taken within the round; the report gives the median over rounds of the
   per-round ratio and of the per-step time. Host work (samplers, metrics)
   is not included: this is the device step.
2. **GPT-2 124M shape** (12 layers, width 768, vocabulary 50257, B x L =
   8 x 1025, K = 11): each method's train step is lowered on *abstract*
   inputs (``jax.ShapeDtypeStruct``: nothing is materialised) and compiled;
   the report gives XLA's memory analysis (argument, temp, output bytes; the
   peak estimate as in ``bench_lm_memory.py``) and the FLOPs of the step
   (``cost_analysis``), each relative to the plain step. Horizons use the
   mode the cost model picks (``"auto"``).

  python benchmarks/bench_methods.py --out bench-results/methods.json
  python benchmarks/bench_methods.py --quick   # smoke shapes, a minute
  python benchmarks/bench_methods.py --skip-gpt2
  python benchmarks/bench_methods.py --gpt2-only  # part 2 only; saved as it goes
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dataweights.configs import lm  # noqa: E402
from dataweights.configs import train as train_configs  # noqa: E402
from dataweights.configs.lm_mixing import lm_mixing  # noqa: E402
from dataweights.experiments.ch2 import runs  # noqa: E402
from dataweights.models.transformer import Transformer  # noqa: E402
from dataweights.train import mixers, optim  # noqa: E402
from dataweights.train.feeder import Feeder  # noqa: E402
from dataweights.train.state import StaticParts, TrainState  # noqa: E402
from dataweights.train.step import make_train_step  # noqa: E402


def _methods(K, spec, horizons, reference):
  out = {
    "plain": None,
    "fixed (loss weights)": mixers.FixedWeights(
      weights=(1.0,) * K, apply="loss"
    ),
    "odm": mixers.OnlineDataMixing(),
    "doremi proxy": mixers.DoReMiProxy(reference=reference),
    "alignment": mixers.OnlineAlignment(beta=0.05),
  }
  for T in horizons:
    out[f"horizon T={T}"] = mixers.HorizonMixing(
      T=T, beta=0.05 * T, batch_spec=spec
    )
  return out


def chapter_shape(profile: str, rounds: int, steps: int) -> dict:
  """Interleaved timing of every method's compiled step at the chapter's shape."""
  cfg = lm_mixing(profile)
  data = runs._load(cfg)
  P = runs._Programs(cfg, data)
  K = cfg.num_domains
  uniform = np.ones(K) / K
  src = P.sources(0, uniform, "stratified", "A")
  spec = mixers.batch_spec(src["train"].next_batch())
  reference = P.trainer("plain", None).state.params
  reference = jax.tree.map(np.asarray, jax.device_get(reference))
  if steps % int(np.lcm.reduce(cfg.horizons)):
    raise SystemExit(
      f"--steps {steps} must be a multiple of every horizon {cfg.horizons}"
    )
  progs = {}
  for name, method in _methods(K, spec, cfg.horizons, reference).items():
    trainer = P.trainer(name, method)
    feeder = Feeder(P.sources(0, uniform, "stratified", "A"))
    batch = trainer.put_batch(
      {
        k: v
        for k, v in feeder.next(0).items()
        if k == "train" or (method is not None and k in method.batches)
      }
    )
    t0 = time.perf_counter()
    compiled = trainer.jit_step.lower(trainer.state, batch).compile()
    compile_s = time.perf_counter() - t0
    state = trainer.state
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(state)
    mode = None
    if isinstance(method, mixers.HorizonMixing):
      mode = method.resolve_mode(
        state.params, state.opt_state, _loss_fn(trainer), trainer.static.tx, K
      ).mode
    progs[name] = {
      "compiled": compiled,
      "state": state,
      "batch": batch,
      "compile_s": compile_s,
      "mode": mode,
    }
    print(f"compiled {name}: {compile_s:.1f} s", flush=True)
  times = {n: [] for n in progs}
  for r in range(rounds):
    for name, p in progs.items():
      state = p["state"]
      t0 = time.perf_counter()
      for _ in range(steps):
        state, m = p["compiled"](state, p["batch"])
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - t0) / steps)
      p["state"] = state
      assert float(m["nonfinite"]) == 0.0, name
    print(f"round {r + 1}/{rounds}", flush=True)
  plain = times["plain"]
  rows = {}
  for name, t in times.items():
    ratios = [a / b for a, b in zip(t, plain)]
    rows[name] = {
      "ms_per_step_median": round(1e3 * statistics.median(t), 2),
      "ratio_to_plain_median": round(statistics.median(ratios), 2),
      "ratio_to_plain_min": round(min(ratios), 2),
      "ratio_to_plain_max": round(max(ratios), 2),
      "compile_s": round(progs[name]["compile_s"], 1),
      **(
        {"hypergrad_mode": progs[name]["mode"]} if progs[name]["mode"] else {}
      ),
    }
  return {
    "config": {
      k: v
      for k, v in cfg.to_dict().items()
      if k
      in (
        "profile",
        "num_layers",
        "d_model",
        "num_heads",
        "d_mlp",
        "context",
        "batch_size",
        "valid_batch_size",
        "horizons",
      )
    },
    "num_domains": K,
    "rounds": rounds,
    "steps_per_round": steps,
    "methods": rows,
  }


def _loss_fn(trainer):
  from dataweights.train.step import lm_loss

  graphdef = trainer.static.graphdef

  def loss(params, batch):
    return lm_loss(
      nnx.merge(graphdef, params, trainer.state.model_state, copy=True),
      batch,
      None,
    )

  return loss


def gpt2_shape(
  batch: int, length: int, K: int, horizons, quick: bool, save=None
) -> dict:
  """Compiled memory and FLOPs of every method's step on abstract inputs.

  ``save(rows)``, if given, is called after each method with the rows so far
  (a long run keeps what it has measured).
  """
  if quick:
    cfg = lm.lm_model(
      "smoke", num_layers=2, d_model=64, num_heads=4, d_mlp=256, max_len=length
    )
  else:
    cfg = lm.lm_model("paper", size="gpt2-124m", max_len=length)
  train_cfg = train_configs.train("paper", batch_size=batch, eps_root=1e-30)
  abstract_model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
  tx = optim.make_optimizer(train_cfg)
  opt = jax.eval_shape(tx.init, params)
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
  L1 = length + 1
  train = {
    "tokens_BxL": sds((batch, L1), jnp.int32),
    "mask_BxL": sds((batch, L1), jnp.bool_),
    "domain_B": sds((batch,), jnp.int32),
  }
  valid = dict(train)
  spec = tuple(
    (k, tuple(v.shape), np.dtype(v.dtype).name)
    for k, v in sorted(train.items())
  )
  static = StaticParts(graphdef, tx)
  rows = {}
  for name, method in _methods(K, spec, horizons, None).items():
    if name == "doremi proxy":
      make_state = lambda p, r: mixers.DoReMiProxy(reference=r).init(
        p, jax.random.key(0), K
      )  # noqa: E731
      mstate = jax.eval_shape(make_state, params, params)
    elif method is None:
      mstate = None
    else:
      mstate = jax.eval_shape(
        lambda p, m=method: m.init_for_run(p, jax.random.key(0), K, tx), params
      )
    extra = {} if mstate is None else {"method": mstate}
    state = TrainState(
      step=sds((), jnp.int32),
      params=params,
      opt_state=opt,
      rng=sds((2,), jnp.uint32),
      model_state=model_state,
      extra=extra,
      halted=sds((), jnp.int32),
    )
    batches = {"train": train}
    if method is not None and "valid" in method.batches:
      batches["valid"] = valid
    step = make_train_step(
      static, domain_names=[str(k) for k in range(K)], method=method
    )
    mode = None
    if isinstance(method, mixers.HorizonMixing):
      from dataweights.train.step import lm_loss

      def loss_fn(p, b):
        return lm_loss(nnx.merge(graphdef, p, model_state), b, None)

      choice = method.resolve_mode(params, opt, loss_fn, tx, K)
      mode = choice.mode
    t0 = time.perf_counter()
    compiled = (
      jax.jit(step, donate_argnums=(0,)).lower(state, batches).compile()
    )
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    peak = (
      ma.argument_size_in_bytes
      + ma.temp_size_in_bytes
      + ma.output_size_in_bytes
      - ma.alias_size_in_bytes
    )
    rows[name] = {
      "argument_bytes": int(ma.argument_size_in_bytes),
      "temp_bytes": int(ma.temp_size_in_bytes),
      "output_bytes": int(ma.output_size_in_bytes),
      "alias_bytes": int(ma.alias_size_in_bytes),
      "peak_bytes": int(peak),
      "flops": float(ca.get("flops", float("nan"))),
      "compile_s": round(compile_s, 1),
      **({"hypergrad_mode": mode} if mode else {}),
    }
    print(
      f"{name}: peak {peak / 2**30:.2f} GiB, {rows[name]['flops']:.3g} flops, compile {compile_s:.0f} s",
      flush=True,
    )
    if save is not None:
      save(rows)
  base = rows["plain"]
  for r in rows.values():
    r["peak_ratio_to_plain"] = round(r["peak_bytes"] / base["peak_bytes"], 2)
    r["flops_ratio_to_plain"] = round(r["flops"] / base["flops"], 2)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return {
    "model": "smoke" if quick else "gpt2-124m",
    "num_params": n_params,
    "batch": batch,
    "length": L1,
    "num_domains": K,
    "methods": rows,
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default="bench-results/methods.json")
  ap.add_argument("--quick", action="store_true", help="smoke shapes")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--skip-gpt2", action="store_true")
  ap.add_argument("--gpt2-batch", type=int, default=8)
  ap.add_argument("--gpt2-length", type=int, default=1024)
  ap.add_argument(
    "--gpt2-only", action="store_true", help="skip the chapter-shape timings"
  )
  args = ap.parse_args()
  profile = "smoke" if args.quick else "book"
  out = {"cpu_count": os.cpu_count(), "jax": jax.__version__}
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)

  def write():
    path.write_text(json.dumps(out, indent=1) + "\n")

  if not args.gpt2_only:
    out["chapter_shape"] = chapter_shape(profile, args.rounds, args.steps)
    print(json.dumps(out["chapter_shape"]["methods"], indent=1))
    write()
  if not args.skip_gpt2:
    hz = lm_mixing(profile).horizons

    def save(rows):
      out["gpt2_124m_shape"] = {"partial": True, "methods": rows}
      write()

    out["gpt2_124m_shape"] = gpt2_shape(
      2 if args.quick else args.gpt2_batch,
      32 if args.quick else args.gpt2_length,
      11,
      hz,
      args.quick,
      save=save,
    )
  write()
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
