"""Figure 1 style: validation loss and w_2 against T, full gradients.

On the 3-domain quadratic :func:`dataweights.data.synthetic.sweep_quadratic`.
The algorithm has no budget-dependent schedule, so one run of the largest
budget per T gives every smaller budget ``N`` too: the state after round
``N // T`` (``R = N // T`` rounds, as in ``run_mixing``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.data import synthetic as syn
from dataweights.experiments.ch1_common import fmt_table, r
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel, mixing


def sweep_traces(
  problem: bilevel.MixingProblem,
  params0: Any,
  w0_K: Any,
  horizons: Sequence[int],
  n_max: int,
  **kwargs: Any,
) -> dict[int, mixing.MixingTrace]:
  """One ``run_mixing`` of budget ``n_max`` per horizon ``T <= n_max``."""
  return {
    T: mixing.run_mixing(problem, params0, w0_K, T=T, N=n_max, **kwargs)
    for T in horizons
    if T <= n_max
  }


def at_budget(x_R: np.ndarray, T: int, N: int) -> Any:
  """The entry of a per-round history after budget ``N`` (None if T > N)."""
  return None if T > N else x_R[N // T]


def run(cfg: mixing_configs.HorizonFullConfig) -> dict[str, Any]:
  """Validation loss, w_2 and the mixture's excess loss per (N, T)."""
  q = syn.sweep_quadratic()
  problem = bilevel.MixingProblem(*syn.quadratic_losses(q))
  K = q.num_domains
  w0_K = mixing.uniform_weights(K)
  theta0 = jnp.zeros(q.dim)
  n_max = max(cfg.budgets)
  traces = sweep_traces(
    problem,
    theta0,
    w0_K,
    cfg.horizons,
    n_max,
    lr=cfg.lr,
    beta=cfg.beta,
    outer=cfg.outer,
  )
  opt = syn.bilevel_optimum(q)
  step = int(np.gcd.reduce(np.array(cfg.budgets)))
  _, val_uniform = mixing.train_fixed(
    problem, theta0, w0_K, lr=cfg.lr, N=n_max, eval_every=step
  )
  val_uniform = np.asarray(val_uniform)
  per_budget = []
  for N in cfg.budgets:
    val_T, w2_T = [], []
    for T in cfg.horizons:
      tr = traces.get(T)
      val_T.append(
        None if tr is None else at_budget(np.asarray(tr.val_loss_R1), T, N)
      )
      w2_T.append(
        None if tr is None else at_budget(np.asarray(tr.w_RxK)[:, 1], T, N)
      )
    valid = [i for i, v in enumerate(val_T) if v is not None]
    best = min(valid, key=lambda i: val_T[i])
    per_budget.append(
      {
        "N": N,
        "val": val_T,
        "w2": w2_T,
        "best_T": cfg.horizons[best],
        "best_val": val_T[best],
        "greedy_val": val_T[0] if cfg.horizons[0] == 1 else None,
        "uniform_val": float(val_uniform[N // step]),
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
  """Per budget: best T, its loss and w_2, against greedy and uniform."""
  rows = []
  for b in data["budgets"]:
    i = data["horizons"].index(b["best_T"])
    rows.append(
      [
        b["N"],
        b["best_T"],
        b["best_val"],
        b["w2"][i],
        b["greedy_val"] if b["greedy_val"] is not None else "-",
        b["uniform_val"],
      ]
    )
  table = fmt_table(
    ["N", "best T", "val loss", "w_2", "T=1 loss", "uniform"], rows
  )
  o = data["optimum"]
  return (
    table
    + f"\nexact bilevel optimum: val loss {o['val']:.3g}, w_2 {o['w_K'][1]:.3g}"
  )


def _plot(data):
  from dataweights.plotting import mixing as plots

  return plots.plot_horizon_full(data)


register(
  Published(
    name="ch1_horizon_full",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.HorizonFullConfig,
    plot=_plot,
  )
)
