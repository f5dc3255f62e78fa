"""Figure: greedy T = 1 mixing converges to a biased mixture (2-D quadratic).

On :func:`dataweights.methods.synthetic.greedy_quadratic` (``A_1 = I``,
``A_2 = diag(40, 1)``): the exact bilevel optimum (float64 grid + Brent),
the greedy fixed point, uniform weights, and mixing runs with
``T ∈ cfg.horizons`` showing where each settles.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.experiments.ch1.common import fmt_table, log_subsample, r
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel, mixing
from dataweights.methods import synthetic as syn


def run(cfg: mixing_configs.GreedyQuadraticConfig) -> dict[str, Any]:
  """Exact optimum, greedy fixed point and mixing runs. JSON-able dict."""
  q = syn.greedy_quadratic()
  problem = bilevel.MixingProblem(*syn.quadratic_losses(q))
  opt = syn.bilevel_optimum(q, cfg.grid)
  greedy = syn.greedy_fixed_point(q, cfg.grid)
  uniform_w = np.array([0.5, 0.5])
  w2_S = np.linspace(0.0, 1.0, cfg.points + 1)
  curve = {
    "w2": w2_S,
    "val": syn.val_at(q, np.stack([1 - w2_S, w2_S], axis=1)),
    "theta": syn.inner_optimum(q, np.stack([1 - w2_S, w2_S], axis=1)),
  }
  runs = []
  for T in cfg.horizons:
    trace = mixing.run_mixing(
      problem, jnp.zeros(q.dim), jnp.asarray(uniform_w, jnp.float32),
      lr=cfg.lr, T=T, N=cfg.budget, beta=cfg.beta,
    )
    w2_R = np.asarray(trace.w_RxK)[:, 1]
    val_R = np.asarray(trace.val_loss_R1)
    idx = log_subsample(cfg.points, len(w2_R))
    runs.append({
      "T": T,
      "steps": idx * T,
      "w2": w2_R[idx],
      "val": val_R[idx],
      "final_w2": float(w2_R[-1]),
      "final_val": float(val_R[-1]),
      "final_theta": np.asarray(trace.params),
      "mixture_val": float(syn.val_at(q, np.asarray(trace.w_RxK)[-1])),
    })
  return r({
    "problem": {"a_KxD": q.a_KxD, "c_KxD": q.c_KxD, "c_val_D": q.c_val_D},
    "optimum": {"w2": opt["w_K"][1], "val": opt["val"],
                "theta": syn.inner_optimum(q, opt["w_K"])},
    "greedy": {"w2": greedy["w_K"][1], "val": greedy["val"],
               "theta": syn.inner_optimum(q, greedy["w_K"])},
    "uniform": {"w2": 0.5, "val": float(syn.val_at(q, uniform_w))},
    "curve": curve,
    "runs": runs,
    "budget": cfg.budget,
  })


def summary(data: dict[str, Any]) -> str:
  """Where each method settles: w_2 and g(θ*(w)) relative to the optimum."""
  best = data["optimum"]["val"]
  rows = [
    ["exact optimum", data["optimum"]["w2"], best, 1.0],
    ["greedy fixed point", data["greedy"]["w2"], data["greedy"]["val"],
     data["greedy"]["val"] / best],
    ["uniform", data["uniform"]["w2"], data["uniform"]["val"],
     data["uniform"]["val"] / best],
  ]
  for run_ in data["runs"]:
    rows.append([f"mixing T={run_['T']}, N={data['budget']}", run_["final_w2"],
                 run_["final_val"], run_["final_val"] / best])
  return fmt_table(["method", "w_2", "val loss", "x optimum"], rows)


def _plot(data):
  from dataweights.experiments.ch1 import plots

  return plots.plot_greedy(data)


register(Published(
  name="ch1_greedy",
  chapter="ch1_mixing",
  run=run,
  make_config=mixing_configs.GreedyQuadraticConfig,
  config=mixing_configs.greedy_quadratic,
  summary=summary,
  plot=_plot,
))
