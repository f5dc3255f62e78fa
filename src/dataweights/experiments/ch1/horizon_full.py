"""Figure 1 style: validation loss and w_2 against T, full gradients.

On the 3-domain quadratic :func:`dataweights.methods.synthetic.sweep_quadratic`.
Every horizon spends exactly N steps: one
:func:`dataweights.methods.mixing.run_mixing_schedule` per T (vmapped over
T) records the state after each budget, the ``N mod T`` leftover steps
taken with the weights of the last completed round.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.experiments.ch1.common import fmt_table, r
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel, mixing
from dataweights.methods import synthetic as syn


def run(cfg: mixing_configs.HorizonFullConfig) -> dict[str, Any]:
  """Validation loss, w_2 and the mixture's excess loss per (N, T)."""
  q = syn.sweep_quadratic()
  problem = bilevel.MixingProblem(*syn.quadratic_losses(q))
  K = q.num_domains
  w0_K = mixing.uniform_weights(K)
  theta0 = jnp.zeros(q.dim)

  def lane(T0):
    tr = mixing.run_mixing_schedule(
      problem,
      theta0,
      w0_K,
      lr=cfg.lr,
      beta=cfg.beta,
      budgets=cfg.budgets,
      T0=T0,
      outer=cfg.outer,
      check_finite=False,
    )
    return tr.val_loss_B, tr.w_BxK

  val_TxB, w_TxBxK = (
    np.asarray(x)
    for x in jax.jit(jax.vmap(lane))(jnp.asarray(cfg.horizons, jnp.float32))
  )
  if not (np.all(np.isfinite(val_TxB)) and np.all(np.isfinite(w_TxBxK))):
    raise FloatingPointError("a horizon_full run diverged; lower beta or lr")
  opt = syn.bilevel_optimum(q)
  unif = mixing.run_mixing_schedule(
    problem,
    theta0,
    w0_K,
    lr=cfg.lr,
    beta=cfg.beta,
    budgets=cfg.budgets,
    T0=1,
    update_weights=False,
  )
  per_budget = []
  for b, N in enumerate(cfg.budgets):
    valid = [i for i, T in enumerate(cfg.horizons) if T <= N]
    val_T = [
      float(val_TxB[i, b]) if i in valid else None
      for i in range(len(cfg.horizons))
    ]
    w2_T = [
      float(w_TxBxK[i, b, 1]) if i in valid else None
      for i in range(len(cfg.horizons))
    ]
    best = min(valid, key=lambda i: val_T[i])
    peak = max(valid, key=lambda i: w2_T[i])
    near = [cfg.horizons[i] for i in valid if val_T[i] <= 1.01 * val_T[best]]
    per_budget.append(
      {
        "N": N,
        "val": val_T,
        "w2": w2_T,
        "mixture_excess": [
          None
          if i not in valid
          else float(syn.val_at(q, w_TxBxK[i, b]) - opt["val"])
          for i in range(len(cfg.horizons))
        ],
        "best_T": cfg.horizons[best],
        "best_val": val_T[best],
        "w2_peak_T": cfg.horizons[peak],
        "w2_peak": w2_T[peak],
        "near_best_T": [min(near), max(near)],
        "greedy_val": val_T[0] if cfg.horizons[0] == 1 else None,
        "uniform_val": float(unif.val_loss_B[b]),
      }
    )
  return r(
    {
      "horizons": list(cfg.horizons),
      "budgets": per_budget,
      "optimum": {"val": opt["val"], "w_K": opt["w_K"]},
    }
  )


def summary(data: dict[str, Any]) -> str:
  """Per budget: best T, its loss and w_2, where w_2 peaks, the near-best range."""
  rows = []
  for b in data["budgets"]:
    i = data["horizons"].index(b["best_T"])
    rows.append(
      [
        b["N"],
        b["best_T"],
        b["best_val"],
        b["w2"][i],
        b["w2_peak_T"],
        "{}-{}".format(*b["near_best_T"]),
        b["greedy_val"] if b["greedy_val"] is not None else "-",
        b["uniform_val"],
      ]
    )
  table = fmt_table(
    [
      "N",
      "best T",
      "val loss",
      "w_2",
      "w_2 peaks at T",
      "T within 1%",
      "T=1 loss",
      "uniform",
    ],
    rows,
  )
  o = data["optimum"]
  return (
    table
    + f"\nexact bilevel optimum: val loss {o['val']:.3g}, w_2 {o['w_K'][1]:.3g}"
  )


def _plot(data):
  from dataweights.experiments.ch1 import plots

  return plots.plot_horizon_full(data)


register(
  Published(
    name="ch1_horizon_full",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.HorizonFullConfig,
    config=mixing_configs.horizon_full,
    summary=summary,
    plot=_plot,
  )
)
