"""Figure 2 style: loss, accuracy and w_2 against T with minibatch gradients.

Three Gaussian classification domains
(:func:`dataweights.methods.synthetic.classification_domains`), L2-regularised
logistic regression, per-domain minibatches and a validation minibatch per
hypergradient. One :func:`dataweights.methods.mixing.run_mixing_schedule`
per (T, seed), vmapped, records every budget; all runs of a seed, the
fixed-weight baselines (uniform and natural pool-size weights) included,
see the same minibatch at every step (common random numbers). Intervals
are Student-t intervals of the mean over seeds (ddof = 1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.experiments.ch1 import tstar as ts
from dataweights.experiments.ch1.common import fmt_table, r
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel, mixing
from dataweights.methods import synthetic as syn


def run(cfg: mixing_configs.HorizonMinibatchConfig) -> dict[str, Any]:
  """Per (N, T): val loss, accuracy and w_2 over seeds; baselines."""
  k_data, k_runs = jax.random.split(jax.random.key(0))
  g = syn.classification_domains(cfg.dim)
  data = syn.make_datasets(g, k_data, cfg.pool_sizes, cfg.n_val)
  problem = bilevel.MixingProblem(*syn.logistic_losses(data, cfg.l2))
  val_batch_fn = syn.val_sampler(data, cfg.val_batch_size)
  batch_T1 = syn.minibatch_sampler(data, cfg.batch_size, 1)

  def step_batch_fn(key):
    return jax.tree.map(lambda x: x[0], batch_T1(key))

  K = 3
  params0 = syn.logistic_params(cfg.dim)
  keys = jax.random.split(k_runs, cfg.seeds)

  def metrics(tr):
    acc = jax.vmap(
      lambda p: syn.accuracy(p, data["x_val_MxD"], data["y_val_M"])
    )(tr.params_B)
    return tr.val_loss_B, acc, tr.w_BxK

  def lane(T0, key):
    return metrics(
      mixing.run_mixing_schedule(
        problem,
        params0,
        mixing.uniform_weights(K),
        lr=cfg.lr,
        beta=cfg.beta,
        budgets=cfg.budgets,
        T0=T0,
        step_batch_fn=step_batch_fn,
        val_batch_fn=val_batch_fn,
        key=key,
        check_finite=False,
      )
    )

  def fixed(w0, key):
    return metrics(
      mixing.run_mixing_schedule(
        problem,
        params0,
        w0,
        lr=cfg.lr,
        beta=cfg.beta,
        budgets=cfg.budgets,
        T0=1,
        step_batch_fn=step_batch_fn,
        key=key,
        update_weights=False,
        check_finite=False,
      )
    )

  both = lambda f: jax.jit(
    jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(None, 0))
  )  # noqa: E731
  val, acc, w = (
    np.asarray(x, np.float64)
    for x in both(lane)(jnp.asarray(cfg.horizons, jnp.float32), keys)
  )  # S, T, B (, K)
  natural = mixing.natural_weights(cfg.pool_sizes)
  base = [
    np.asarray(x, np.float64)
    for x in both(fixed)(jnp.stack([mixing.uniform_weights(K), natural]), keys)
  ]
  if not (np.all(np.isfinite(val)) and np.all(np.isfinite(base[0]))):
    raise FloatingPointError("a minibatch run diverged; lower beta or lr")

  def ci(x_S):
    m, lo, hi = ts.mean_ci(x_S, cfg.level)
    return m, lo, hi

  per_budget = []
  for b, N in enumerate(cfg.budgets):
    entry: dict[str, Any] = {"N": N}
    for field, arr in (("val", val), ("acc", acc), ("w2", w[..., 1])):
      stats = [ci(arr[:, i, b]) for i in range(len(cfg.horizons))]
      entry[f"{field}_mean"] = [s[0] for s in stats]
      entry[f"{field}_lo"] = [s[1] for s in stats]
      entry[f"{field}_hi"] = [s[2] for s in stats]
    entry["w_mean_TxK"] = w[:, :, b].mean(axis=0)
    best = int(np.argmin(entry["val_mean"]))
    entry["best_T"] = cfg.horizons[best]
    entry["best_minus_T1"] = list(ci(val[:, best, b] - val[:, 0, b]))
    for name, i in (("uniform", 0), ("natural", 1)):
      v, a = ci(base[0][:, i, b]), ci(base[1][:, i, b])
      entry[name] = {
        "val_mean": v[0],
        "val_lo": v[1],
        "val_hi": v[2],
        "acc_mean": a[0],
        "acc_lo": a[1],
        "acc_hi": a[2],
      }
    per_budget.append(entry)
  return r(
    {
      "horizons": list(cfg.horizons),
      "seeds": cfg.seeds,
      "level": cfg.level,
      "budgets": per_budget,
      "natural_w": np.asarray(natural),
    }
  )


def summary(data: dict[str, Any]) -> str:
  """Per budget: greedy, best T and the baselines, mean with intervals."""
  pct = int(round(100 * data["level"]))
  fmt = lambda m, lo, hi: f"{m:.4f} [{lo:.4f}, {hi:.4f}]"  # noqa: E731
  rows = []
  for b in data["budgets"]:
    for label, i in (
      ("T=1", 0),
      (f"T={b['best_T']} (best)", data["horizons"].index(b["best_T"])),
    ):
      rows.append(
        [
          b["N"],
          label,
          fmt(b["val_mean"][i], b["val_lo"][i], b["val_hi"][i]),
          f"{b['acc_mean'][i]:.3f}",
          f"{b['w2_mean'][i]:.3f}",
        ]
      )
    for name in ("uniform", "natural"):
      e = b[name]
      rows.append(
        [
          b["N"],
          name,
          fmt(e["val_mean"], e["val_lo"], e["val_hi"]),
          f"{e['acc_mean']:.3f}",
          "-",
        ]
      )
  out = fmt_table(
    ["N", "method", f"val loss ({pct}% CI)", "val acc", "w_2"], rows
  )
  for b in data["budgets"]:
    m, lo, hi = b["best_minus_T1"]
    out += f"\nN={b['N']}: best T minus T=1 (paired): {m:+.4f} [{lo:+.4f}, {hi:+.4f}]"
  return out


def _plot(data):
  from dataweights.experiments.ch1 import plots

  return plots.plot_horizon_minibatch(data)


register(
  Published(
    name="ch1_horizon_minibatch",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.HorizonMinibatchConfig,
    config=mixing_configs.horizon_minibatch,
    summary=summary,
    plot=_plot,
  )
)
