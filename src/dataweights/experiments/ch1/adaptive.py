"""Beyond the paper: a horizon that grows with the round, ``T_r = 1 + c·r``.

Our model of the full-gradient trade-off (:mod:`.scaling`) balances an
outer error ``exp(−κ R)`` after R rounds against a hypergradient bias
``exp(−2ν T)``. A horizon growing linearly with the round keeps the two
balanced at every round without knowing N: after R rounds the budget is
``N ≈ c R² / 2`` and the current horizon ``T_R ≈ √(2cN)``. The model
predicts the best growth rate ``c* = κ / (2ν)`` and, for large N, an
excess ``≈ exp(−2√(κνN))`` against ``≈ exp(−√(2κνN))`` for the best fixed
horizon: an exponent larger by up to √2.

Two problems here (UCI Adult is in :mod:`.adult`):

* the 3-domain quadratic with full gradients (float64): fixed horizons on a
  geometric grid against growth rates on a geometric grid, scored by the
  excess ``Φ(w_N) − Φ*`` at every budget;
* the Figure-2 classification problem (minibatches): fixed horizons against
  growth rates, every run of a seed on the same minibatches; the best fixed
  horizon and the best growth rate are chosen per budget on the validation
  set and reported on a held-out test set, as paired differences over seeds.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.experiments.ch1 import quadsim as qs
from dataweights.experiments.ch1 import tstar as ts
from dataweights.experiments.ch1.common import (
  fmt_table,
  geometric_grid,
  outer_rate,
  r,
)
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel, mixing
from dataweights.methods import synthetic as syn


def quadratic(cfg: mixing_configs.AdaptiveHorizonConfig) -> dict[str, Any]:
  """Fixed T against T_r = 1 + c r on the full-gradient quadratic."""
  q = syn.sweep_quadratic()
  opt = syn.bilevel_optimum(q)
  T_grid = geometric_grid(1, cfg.quad_t_max, cfg.quad_n_horizons)
  c_grid = np.asarray(cfg.quad_growths, np.float64)
  lanes = qs.lanes(
    T0=np.concatenate([T_grid, np.ones_like(c_grid)]),
    growth=np.concatenate([np.zeros(len(T_grid)), c_grid]),
    lr=cfg.quad_lr,
    beta=cfg.quad_beta,
  )
  res = qs.simulate(q, lanes, budgets=cfg.quad_budgets)
  B, nT = len(cfg.quad_budgets), len(T_grid)
  ex = np.stack(
    [qs.excess(q, res.w_BxKxSxM[b], opt["val"])[0] for b in range(B)]
  )
  N_B = np.array(cfg.quad_budgets)
  ex_T = np.where(T_grid[None] <= N_B[:, None], ex[:, :nT], np.nan)
  ex_c = ex[:, nT:]
  # One setting for every budget (no knowledge of N): the one whose worst
  # ratio to the best fixed horizon of each budget is smallest.
  best_B = np.nanmin(ex_T, axis=1)
  worst_T = np.nanmax(
    np.where(np.isnan(ex_T), np.inf, ex_T) / best_B[:, None], axis=0
  )
  worst_c = np.max(ex_c / best_B[:, None], axis=0)
  single_T, single_c = int(np.argmin(worst_T)), int(np.argmin(worst_c))
  kappa = outer_rate(
    q, cfg.quad_beta, np.full(q.num_domains, 1.0 / q.num_domains)
  )
  nu = -np.log1p(-cfg.quad_lr * float(np.min(opt["w_K"] @ q.a_KxD)))
  rows = []
  for b, N in enumerate(cfg.quad_budgets):
    i, j = int(np.nanargmin(ex_T[b])), int(np.argmin(ex_c[b]))
    rows.append(
      {
        "N": N,
        "T1": float(ex_T[b, 0]),
        "best_T": int(T_grid[i]),
        "best_T_excess": float(ex_T[b, i]),
        "best_c": float(c_grid[j]),
        "best_c_excess": float(ex_c[b, j]),
        "single_T_excess": float(ex_T[b, single_T]),
        "single_c_excess": float(ex_c[b, single_c]),
      }
    )
  return {
    "T_grid": T_grid,
    "c_grid": c_grid,
    "rows": rows,
    "single_T": int(T_grid[single_T]),
    "single_c": float(c_grid[single_c]),
    "single_T_worst_ratio": float(worst_T[single_T]),
    "single_c_worst_ratio": float(worst_c[single_c]),
    "kappa": kappa,
    "nu": nu,
    "model_c": kappa / (2 * nu),
    "excess_c_BxC": ex_c,
  }


def _classification(cfg: mixing_configs.AdaptiveHorizonConfig):
  base = mixing_configs.horizon_minibatch("book")
  k_data, k_runs = jax.random.split(jax.random.key(0))
  g = syn.classification_domains(base.dim)
  data = syn.make_datasets(g, k_data, base.pool_sizes, base.n_val)
  x_test, y_test = syn.sample_domain(
    jax.random.key(7), g.val_mean_D, cfg.n_test
  )
  problem = bilevel.MixingProblem(*syn.logistic_losses(data, base.l2))
  batch_T1 = syn.minibatch_sampler(data, base.batch_size, 1)
  return base, data, (x_test, y_test), problem, batch_T1, k_runs


def classification(cfg: mixing_configs.AdaptiveHorizonConfig) -> dict[str, Any]:
  """Fixed T against T_r = 1 + c r on the Figure-2 problem (paired seeds)."""
  base, data, (x_test, y_test), problem, batch_T1, k_runs = _classification(cfg)
  val_batch_fn = syn.val_sampler(data, base.val_batch_size)

  def step_batch_fn(key):
    return jax.tree.map(lambda x: x[0], batch_T1(key))

  T0 = np.concatenate(
    [
      np.asarray(cfg.horizons, np.float32),
      np.ones(len(cfg.growths), np.float32),
    ]
  )
  growth = np.concatenate(
    [
      np.zeros(len(cfg.horizons), np.float32),
      np.asarray(cfg.growths, np.float32),
    ]
  )
  params0 = syn.logistic_params(base.dim)
  w0 = mixing.uniform_weights(3)

  def lane(t0, c, key):
    tr = mixing.run_mixing_schedule(
      problem,
      params0,
      w0,
      lr=base.lr,
      beta=base.beta,
      budgets=cfg.budgets,
      T0=t0,
      T_growth=c,
      step_batch_fn=step_batch_fn,
      val_batch_fn=val_batch_fn,
      key=key,
      check_finite=False,
    )
    test = jax.vmap(lambda p: syn._logistic_loss(p, x_test, y_test))(
      tr.params_B
    )
    return tr.val_loss_B, test

  keys = jax.random.split(k_runs, cfg.seeds)
  run_all = jax.jit(
    jax.vmap(jax.vmap(lane, in_axes=(0, 0, None)), in_axes=(None, None, 0))
  )
  val_SxMxB, test_SxMxB = (
    np.asarray(x, np.float64)
    for x in run_all(jnp.asarray(T0), jnp.asarray(growth), keys)
  )
  if not (np.all(np.isfinite(val_SxMxB)) and np.all(np.isfinite(test_SxMxB))):
    raise FloatingPointError("a classification run diverged; lower beta or lr")
  nT = len(cfg.horizons)
  rows = []
  for b, N in enumerate(cfg.budgets):
    val_M = val_SxMxB[:, :, b].mean(axis=0)
    valid = [i for i in range(nT) if cfg.horizons[i] <= N]
    i = min(valid, key=lambda k: val_M[k])
    j = nT + int(np.argmin(val_M[nT:]))
    diff = test_SxMxB[:, j, b] - test_SxMxB[:, i, b]
    m, lo, hi = ts.mean_ci(diff, cfg.level)
    mt = [
      ts.mean_ci(test_SxMxB[:, k, b], cfg.level) for k in range(T0.shape[0])
    ]
    rows.append(
      {
        "N": N,
        "best_T": int(cfg.horizons[i]),
        "best_c": float(cfg.growths[j - nT]),
        "test_mean": [x[0] for x in mt],
        "test_lo": [x[1] for x in mt],
        "test_hi": [x[2] for x in mt],
        "diff": m,
        "diff_lo": lo,
        "diff_hi": hi,
        "T1_minus_bestT": list(
          ts.mean_ci(test_SxMxB[:, 0, b] - test_SxMxB[:, i, b], cfg.level)
        ),
      }
    )
  return {
    "horizons": list(cfg.horizons),
    "growths": list(cfg.growths),
    "seeds": cfg.seeds,
    "rows": rows,
  }


def run(cfg: mixing_configs.AdaptiveHorizonConfig) -> dict[str, Any]:
  """Both problems; JSON-able."""
  return r(
    {
      "quadratic": quadratic(cfg),
      "classification": classification(cfg),
      "level": cfg.level,
    }
  )


def summary(data: dict[str, Any]) -> str:
  """Quadratic: excess per budget; classification: paired test differences."""
  qd = data["quadratic"]
  rows = [
    [
      row["N"],
      f"{row['T1']:.2e}",
      row["best_T"],
      f"{row['best_T_excess']:.2e}",
      f"{row['single_T_excess']:.2e}",
      f"{row['best_c']:.3g}",
      f"{row['single_c_excess']:.2e}",
    ]
    for row in qd["rows"]
  ]
  lines = [
    "quadratic, full gradients: excess Phi(w_N) - Phi*",
    fmt_table(
      [
        "N",
        "T=1",
        "best T",
        "its excess",
        f"T={qd['single_T']} (all N)",
        "best c",
        f"c={qd['single_c']:.3g} (all N)",
      ],
      rows,
    ),
    f"one setting for all N (smallest worst ratio to the best T of each N): "
    f"T = {qd['single_T']} (worst ratio {qd['single_T_worst_ratio']:.3g}), "
    f"c = {qd['single_c']:.3g} (worst ratio {qd['single_c_worst_ratio']:.3g})",
    f"model: best growth c* = kappa/(2 nu) = {qd['model_c']:.2f}",
    "",
  ]
  cl = data["classification"]
  pct = int(round(100 * data["level"]))
  rows = []
  for row in cl["rows"]:
    i = cl["horizons"].index(row["best_T"])
    rows.append(
      [
        row["N"],
        row["best_T"],
        f"{row['test_mean'][i]:.4f}",
        f"{row['best_c']:.3g}",
        f"{row['diff']:+.4f} [{row['diff_lo']:+.4f}, {row['diff_hi']:+.4f}]",
      ]
    )
  lines += [
    f"classification, minibatches ({cl['seeds']} seeds, chosen on validation, test loss)",
    fmt_table(
      ["N", "best T", "test loss", "best c", f"adaptive - best T ({pct}% CI)"],
      rows,
    ),
  ]
  return "\n".join(lines)


def _plot(data):
  from dataweights.experiments.ch1 import plots

  return plots.plot_adaptive(data)


register(
  Published(
    name="ch1_adaptive",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.AdaptiveHorizonConfig,
    config=mixing_configs.adaptive_horizon,
    summary=summary,
    plot=_plot,
  )
)
