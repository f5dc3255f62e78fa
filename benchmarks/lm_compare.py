"""Side-by-side LM train-step measurements for ``bench_lm_train.py``.

Everything here is timed in interleaved rounds: each round runs every
variant once (``steps`` steps each), so the load of a shared machine hits
them alike; ratios are formed per round (paired) and summarised by their
median. Absolute times are reported as min and median over rounds.

* :func:`compare_steps`: the project's step (default config and its
  options: no barrier, each remat policy, scan) against the peers (a plain
  Flax linen GPT-2, and MaxText when a worker is given), plus a large
  matmul each round for the peak.
* :func:`depth_sweep`: compile time, forward and forward+backward time
  against depth, with and without scan over layers.
* :func:`remat_memory`: XLA's compiled memory analysis of the step for
  each remat policy.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import op_profile
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from peers import linen_gpt2

from dataweights import sharding
from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.models.transformer import Transformer
from dataweights.train import optim
from dataweights.train.jaxpr_passes import drop_noop_reduce_precision
from dataweights.train.state import init_train_state
from dataweights.train.step import (
  guard_for,
  jit_train_step,
  lm_loss,
  make_train_step,
)


def _stats(xs: list[float]) -> dict:
  return {
    "min": min(xs),
    "median": statistics.median(xs),
    "all": xs,
  }


def project_step(
  cfg: lm.ModelConfig,
  batch_size: int,
  seed: int = 0,
  drop_reduce_precision: bool = True,
  compiler_options: dict | None = None,
  mesh: Mesh | None = None,
):
  """The project's jitted, donated train step at ``cfg`` (book training).

  ``drop_reduce_precision`` is :func:`make_train_step`'s switch; the
  breakdown's gradient gets the same pass, so that it is the step's program.
  ``compiler_options`` (XLA debug options, e.g.
  ``{"xla_cpu_prefer_vector_width": 512}``) compile all three programs.
  ``mesh`` (:func:`dataweights.sharding.make_mesh`) runs all three
  programs sharded over it, as :class:`dataweights.train.loop.Trainer`
  does: the model born in its shards, the batch split over the example
  axes, the step's guard from ``guard_for(mesh)``; ``None`` is one device.

  Returns:
    ``(run, extras)``: ``run()`` does one step and returns the loss;
    ``extras`` has ``compile_s``, ``memory``, the step's optimized HLO
    ``step_text`` and the un-donating
    ``forward`` / ``grad`` functions of the same loss for the breakdown,
    compiled for their ``args``: ``(params, batch)``.
  """
  train_cfg = train_configs.train("book", progress=False)
  rng = np.random.default_rng(seed)
  length = cfg.max_len
  host_batch = {
    "tokens_BxL": rng.integers(0, 256, (batch_size, length + 1)).astype(
      np.int32
    ),
    "mask_BxL": np.ones((batch_size, length + 1), np.float32),
    "domain_B": rng.integers(0, 3, batch_size).astype(np.int32),
  }
  if mesh is None:
    single = SingleDeviceSharding(jax.devices()[0])
    batch = jax.device_put(host_batch, single)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    batch_sh = metrics_sh = single
  else:
    batch = sharding.shard_batch(host_batch, mesh)
    model = sharding.create_sharded(
      lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh
    )
    batch_sh = sharding.batch_sharding(mesh, 1)
    metrics_sh = sharding.replicated(mesh)
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = jax.tree.map(jnp.copy, params0)
  tx = optim.make_optimizer(train_cfg)
  state, static, shardings = init_train_state(model, tx, seed=seed)
  step = jit_train_step(
    make_train_step(
      static,
      domain_names=["a", "b", "c"],
      schedule=optim.make_schedule(train_cfg),
      drop_reduce_precision=drop_reduce_precision,
      guard=guard_for(mesh),
    ),
    shardings,
    batch_sh,
    metrics_sh,
  )
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile(compiler_options)
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run():
    holder["state"], m = compiled(holder["state"], batch)
    return m["loss"]

  def loss(p, b):
    return jnp.mean(lm_loss(nnx.merge(graphdef, p), b, None))

  # The batch is an argument, not a closed-over constant: a sharded
  # constant made the forward 1.6x slower than the step's own program.
  args = (params0, batch)
  return run, {
    "compile_s": compile_s,
    "memory": _memory(compiled),
    "step_text": compiled.as_text(),
    "forward": jax.jit(loss).lower(*args).compile(compiler_options),
    "grad": jax.jit(train_grad(loss, drop_reduce_precision))
    .lower(*args)
    .compile(compiler_options),
    "args": args,
  }


def grad_rel_diff(ref: list, other: list) -> float:
  """Largest absolute difference of two gradients' leaves over ``ref``'s
  largest entry (one scale for all leaves: the key-bias gradients are zero
  in exact arithmetic, so per-leaf relative differences compare noise)."""
  scale = max(float(np.max(np.abs(x))) for x in ref) or 1.0
  return max(float(np.max(np.abs(x - y))) for x, y in zip(ref, other)) / scale


def train_grad(loss, drop_reduce_precision: bool = True):
  """``jax.grad(loss)`` as the train step builds it (see make_grad_fn)."""
  g = jax.grad(loss)
  return drop_noop_reduce_precision(g) if drop_reduce_precision else g


# Variant keys that are switches of the train step, not ModelConfig fields.
STEP_SWITCHES = ("drop_reduce_precision",)


def split_overrides(over: dict) -> tuple[dict, dict]:
  """(ModelConfig overrides, train-step switches) of a variant."""
  model = {k: v for k, v in over.items() if k not in STEP_SWITCHES}
  step = {k: v for k, v in over.items() if k in STEP_SWITCHES}
  return model, step


def _memory(compiled) -> dict | None:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return {
    "temp_bytes": int(stats.temp_size_in_bytes),
    "argument_bytes": int(stats.argument_size_in_bytes),
    "output_bytes": int(stats.output_size_in_bytes),
    "alias_bytes": int(getattr(stats, "alias_size_in_bytes", 0)),
  }


def linen_step(cfg: lm.ModelConfig, batch_size: int, seed: int = 0):
  """The linen peer's step, with its forward/grad for the breakdown."""
  step, state, fns = linen_gpt2.make_step(cfg, batch_size, seed=seed)
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(
    rng.integers(0, 256, (batch_size, cfg.max_len + 1)).astype(np.int32)
  )
  params0 = jax.tree.map(jnp.copy, state[0])
  t0 = time.perf_counter()
  compiled = step.lower(state, tokens).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run():
    holder["state"], loss = compiled(holder["state"], tokens)
    return loss

  fwd = fns["forward"].lower(params0, tokens).compile()
  grad = fns["grad"].lower(params0, tokens).compile()
  return run, {
    "compile_s": compile_s,
    "memory": _memory(compiled),
    "params_count": linen_gpt2.num_params(state),
    "forward": fwd,
    "grad": grad,
    "args": (params0, tokens),
  }


class MaxTextWorker:
  """MaxText's train step in its own process (its own venv), on demand.

  The worker (``peers/maxtext_worker.py``) compiles MaxText's step at the
  same shape, then answers each ``run N`` line with the seconds of N steps
  (and ``fwd`` / ``grad`` lines with one forward / forward+backward), so
  its rounds interleave with this process's.
  """

  def __init__(
    self,
    python: str,
    cfg: lm.ModelConfig,
    batch_size: int,
    overrides: dict | None = None,
  ):
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    args = [
      python,
      os.path.join(here, "peers", "maxtext_worker.py"),
      json.dumps(
        {
          "layers": cfg.num_layers,
          "d_model": cfg.d_model,
          "heads": cfg.num_heads,
          "d_mlp": cfg.d_mlp,
          "vocab": cfg.vocab_size,
          "length": cfg.max_len,
          "batch": batch_size,
        }
      ),
      json.dumps(overrides or {}),
    ]
    self.proc = subprocess.Popen(
      args,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      bufsize=1,
    )
    self.info = self._read()

  def _read(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError("the MaxText worker exited; see its stderr")
      if line.startswith("{"):
        return json.loads(line)

  def time(self, what: str, n: int = 1) -> float:
    self.proc.stdin.write(f"{what} {n}\n")
    self.proc.stdin.flush()
    return self._read()["seconds"]

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


# The float32 matmul kernels the peak is taken over: XLA's default (YNNPACK
# on CPU) and oneDNN (XLA debug options; ignored by GPU/TPU backends).
PEAK_LIBRARIES: dict[str, dict] = {
  "default": {},
  "onednn": {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_custom_call": True,
  },
}


def peak_matmuls(n: int) -> tuple[jax.Array, jax.Array, dict]:
  """``(a, b, {library: compiled jnp.dot})`` for the matmul peak.

  ``a`` and ``b`` are random ``n x n`` float32 matrices; the dot is compiled
  for each of ``PEAK_LIBRARIES`` (oneDNN's is faster on some CPUs;
  ``bench_xla_cpu_backends.py``).
  """
  key1, key2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key1, (n, n), jnp.float32)
  b = jax.random.normal(key2, (n, n), jnp.float32)
  dots = {
    lib: jax.jit(jnp.dot).lower(a, b).compile(opts)
    for lib, opts in PEAK_LIBRARIES.items()
  }
  return a, b, dots


def compare_steps(
  base_cfg: lm.ModelConfig,
  batch_size: int,
  rounds: int,
  steps: int,
  variants: dict[str, dict],
  peak_n: int,
  maxtext_python: str | None = None,
  maxtext_variants: dict[str, dict] | None = None,
) -> dict:
  """Interleaved rounds of every variant's step, forward and fwd+bwd.

  Args:
    base_cfg: the project's default model config.
    batch_size: sequences per step.
    rounds: interleaved rounds.
    steps: steps per round and variant (their mean is one sample).
    variants: name -> ModelConfig overrides of the project's variants;
      ``"project"`` (no overrides) is always included.
    peak_n: size of the square float32 matmul timed each round under each
      of ``PEAK_LIBRARIES``; the peak is the faster by median.
    maxtext_python: the python of MaxText's own venv, or None.
    maxtext_variants: name -> MaxText config overrides, one worker each
      (default: ``{"maxtext": {}}``, MaxText's defaults).

  Returns:
    Per variant: step / forward / fwd+bwd seconds (min, median, all),
    backward/forward, compile seconds, compiled memory; paired per-round
    ratios of the project's step to each other variant; the peak (with
    each library's under ``by_library``).
  """
  runs, extras = {}, {}
  for name, over in {"project": {}, **variants}.items():
    model_over, step_over = split_overrides(over)
    cfg = dataclasses.replace(base_cfg, **model_over)
    runs[name], extras[name] = project_step(cfg, batch_size, **step_over)
  runs["linen"], extras["linen"] = linen_step(base_cfg, batch_size)
  workers, maxtext_status = {}, "not requested (--maxtext-python)"
  if maxtext_python:
    maxtext_status = {}
    for name, over in (maxtext_variants or {"maxtext": {}}).items():
      try:
        workers[name] = MaxTextWorker(
          maxtext_python, base_cfg, batch_size, over
        )
        maxtext_status[name] = {"overrides": over, **workers[name].info}
      except Exception as e:  # noqa: BLE001 -- reported in the JSON
        maxtext_status[name] = f"failed: {type(e).__name__}: {e}"
  # The MFU divides by the faster library's rate.
  a, b, dots = peak_matmuls(peak_n)

  names = list(runs) + list(workers)
  step_s = {n: [] for n in names}
  fwd_s = {n: [] for n in names}
  grad_s = {n: [] for n in names}
  peak_s = {lib: [] for lib in dots}
  for n in runs:  # warm-up
    jax.block_until_ready(runs[n]())
  for f in dots.values():
    jax.block_until_ready(f(a, b))
  for _ in range(rounds):
    for lib, f in dots.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(a, b))
      peak_s[lib].append(time.perf_counter() - t0)
    for n in names:
      if n in workers:
        step_s[n].append(workers[n].time("run", steps) / steps)
        fwd_s[n].append(workers[n].time("fwd"))
        grad_s[n].append(workers[n].time("grad"))
        continue
      t0 = time.perf_counter()
      out = None
      for _ in range(steps):
        out = runs[n]()
      jax.block_until_ready(out)
      step_s[n].append((time.perf_counter() - t0) / steps)
      x = extras[n]
      t0 = time.perf_counter()
      jax.block_until_ready(x["forward"](*x["args"]))
      fwd_s[n].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      jax.block_until_ready(x["grad"](*x["args"]))
      grad_s[n].append(time.perf_counter() - t0)
  for w in workers.values():
    w.close()
  out = {"rounds": rounds, "steps_per_round": steps, "variants": {}}
  for n in names:
    med_f = statistics.median(fwd_s[n])
    med_g = statistics.median(grad_s[n])
    row = {
      "step_s": _stats(step_s[n]),
      "forward_s": _stats(fwd_s[n]),
      "forward_backward_s": _stats(grad_s[n]),
      "backward_over_forward_median": med_g / med_f - 1,
      "backward_over_forward_min": min(grad_s[n]) / min(fwd_s[n]) - 1,
      "project_step_over_this_paired": _stats(
        [p / q for p, q in zip(step_s["project"], step_s[n], strict=True)]
      ),
    }
    if n in extras:
      row["compile_s"] = extras[n]["compile_s"]
      row["memory"] = extras[n]["memory"]
    out["variants"][n] = row
  out["variants"]["project"]["overrides"] = {}
  for n, over in variants.items():
    out["variants"][n]["overrides"] = over
  out["maxtext"] = maxtext_status
  by_lib = {
    lib: {
      "seconds": _stats(ts),
      "gflops_best": 2 * peak_n**3 / min(ts) / 1e9,
      "gflops_median": 2 * peak_n**3 / statistics.median(ts) / 1e9,
    }
    for lib, ts in peak_s.items()
  }
  fastest = max(by_lib, key=lambda lib: by_lib[lib]["gflops_median"])
  out["peak_matmul"] = {
    "n": peak_n,
    **by_lib[fastest],
    "library": fastest,
    "by_library": by_lib,
  }
  return out


def depth_sweep(
  base_cfg: lm.ModelConfig, batch_size: int, depths: list[int], rounds: int
) -> list[dict]:
  """Compile time, forward, fwd+bwd against depth, unrolled and scanned.

  Per depth the variants (unrolled and scanned with the project's
  defaults; unrolled with ``weight_dot``; unrolled keeping JAX's no-op
  ``reduce_precision``; unrolled without barrier and remat, i.e. before the
  fix) are compiled, then timed in interleaved rounds. The gradient is
  built as the train step builds it (:func:`train_grad`).
  """
  rows = []
  for depth in depths:
    row = {"layers": depth, "variants": {}}
    fns = {}
    for name, over in (
      ("unrolled", {}),
      ("scan", {"scan_layers": True}),
      ("weight_dot", {"weight_dot": True}),
      ("keep_reduce_precision", {"drop_reduce_precision": False}),
      # the model as it was before the fix: no barrier, no remat
      ("no_barrier_no_remat", {"grad_barrier": False, "remat": "none"}),
    ):
      model_over, step_over = split_overrides(over)
      cfg = dataclasses.replace(base_cfg, num_layers=depth, **model_over)
      model = Transformer(cfg, rngs=nnx.Rngs(0))
      graphdef, params = nnx.split(model, nnx.Param)
      tokens = jax.random.randint(
        jax.random.key(0), (batch_size, cfg.max_len + 1), 0, 256
      )

      def loss(p, tokens=tokens, graphdef=graphdef):
        return jnp.mean(
          lm_loss(nnx.merge(graphdef, p), {"tokens_BxL": tokens}, None)
        )

      t0 = time.perf_counter()
      grad = jax.jit(train_grad(loss, **step_over)).lower(params).compile()
      compile_grad_s = time.perf_counter() - t0
      fwd = jax.jit(loss).lower(params).compile()
      fns[name] = (fwd, grad, params)
      row["variants"][name] = {
        "compile_forward_backward_s": compile_grad_s,
        "max_fusion_inputs": op_profile.max_fusion_inputs(grad.as_text()),
      }
    f_s = {n: [] for n in fns}
    g_s = {n: [] for n in fns}
    for _, grad, p in fns.values():
      jax.block_until_ready(grad(p))
    for _ in range(rounds):
      for n, (fwd, grad, p) in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(p))
        f_s[n].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(grad(p))
        g_s[n].append(time.perf_counter() - t0)
    for n in fns:
      v = row["variants"][n]
      v["forward_s"] = _stats(f_s[n])
      v["forward_backward_s"] = _stats(g_s[n])
      v["backward_over_forward_median"] = (
        statistics.median(g_s[n]) / statistics.median(f_s[n]) - 1
      )
      v["backward_over_forward_min"] = min(g_s[n]) / min(f_s[n]) - 1
      v["backward_over_forward_paired_median"] = statistics.median(
        [g / f - 1 for g, f in zip(g_s[n], f_s[n], strict=True)]
      )
    rows.append(row)
    print(
      f"  depth {depth:2d}: "
      + " | ".join(
        f"{n} compile {v['compile_forward_backward_s']:.1f}s fwd "
        f"{v['forward_s']['median'] * 1e3:.0f} ms bwd/fwd "
        f"{v['backward_over_forward_paired_median']:.2f} "
        f"max fusion inputs {v['max_fusion_inputs']}"
        for n, v in row["variants"].items()
      ),
      flush=True,
    )
  return rows


def op_profiles(variants: dict[str, tuple], calls: int) -> dict:
  """Per-op profile of each variant's forward+backward (op_profile)."""
  out = {}
  for name, (grad, args) in variants.items():
    out[name] = op_profile.profile(grad, args, calls=calls, top=30)
  return out


def matmul_layouts(rounds: int, m: int = 2048, k: int = 512, n: int = 128):
  """The rate of the three matmuls of a Dense layer, at equal FLOPs.

  Forward ``x W`` (``m x k`` by ``k x n``), input gradient ``dy W^T`` and
  weight gradient ``x^T dy`` (contracting over the ``m = B L`` rows, the
  major axis of both operands). Interleaved rounds; GFLOP/s of the best.
  """
  key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key1, (m, k), jnp.float32)
  w = jax.random.normal(key2, (k, n), jnp.float32)
  dy = jax.random.normal(key3, (m, n), jnp.float32)
  fns = {
    "forward_x_W": (jax.jit(lambda x, w: x @ w), (x, w)),
    "input_grad_dy_WT": (jax.jit(lambda dy, w: dy @ w.T), (dy, w)),
    "weight_grad_xT_dy": (jax.jit(lambda x, dy: x.T @ dy), (x, dy)),
  }
  times = {name: [] for name in fns}
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
  for _ in range(rounds):
    for name, (fn, args) in fns.items():
      t0 = time.perf_counter()
      for _ in range(5):
        out = fn(*args)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / 5)
  flops = 2 * m * k * n
  return {
    "shape_m_k_n": [m, k, n],
    **{
      name: {"seconds": _stats(t), "gflops_best": flops / min(t) / 1e9}
      for name, t in times.items()
    },
  }
