"""Beyond the paper: the best horizon T*(N) with stochastic gradients.

The 3-domain quadratic with additive Gaussian noise on every domain
gradient (:func:`dataweights.methods.synthetic.noisy_quadratic_losses`: an
unbiased gradient with the exact Hessian), float64, ``cfg.seeds`` seeds.
Two step-size arms:

* ``constant``: ``η`` and ``β`` fixed whatever the budget. The iterate
  noise puts a floor under the excess (it stops falling with N), so T* is
  not defined at large N.
* ``decaying``: ``η_N = η (N₀ / N)^{1/2}`` (the usual budget-dependent SGD
  step), ``β`` fixed: the hypergradient noise and its noise-induced bias
  scale with ``η``, so the excess can keep falling.

Per budget a geometric grid of horizons; T*(N) is the parabola vertex of
:func:`.tstar.tstar` on the seed-mean excess, with percentile
intervals from a bootstrap over seeds (resampled jointly for all
budgets, which also gives an interval for the log-log slope). Every
horizon of a seed sees the same noise (common random numbers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.experiments.ch1 import quadsim as qs
from dataweights.experiments.ch1 import tstar as ts
from dataweights.experiments.ch1.common import fmt_table, outer_rate, r
from dataweights.experiments.registry import Published, register
from dataweights.methods import synthetic as syn

ARMS = ("constant", "decaying")


def horizon_grid(
  N: int, cfg: mixing_configs.MinibatchScalingConfig
) -> np.ndarray:
  """``n_horizons`` rounded geometric horizons from max(1, N/t_span) to N/2."""
  return np.round(np.geomspace(max(1.0, N / cfg.t_span), N / 2, cfg.n_horizons))


def step_size(
  arm: str, N: int, cfg: mixing_configs.MinibatchScalingConfig
) -> float:
  """The inner step of an arm at budget N."""
  if arm == "constant":
    return cfg.lr
  return cfg.lr * (cfg.budget0 / N) ** cfg.lr_power


def run(cfg: mixing_configs.MinibatchScalingConfig) -> dict[str, Any]:
  """T*(N) with bootstrap intervals per arm; excess at T*; law comparison."""
  q = syn.sweep_quadratic()
  opt = syn.bilevel_optimum(q)
  mu = float(np.min(opt["w_K"] @ q.a_KxD))
  kappa = outer_rate(q, cfg.beta, np.full(q.num_domains, 1.0 / q.num_domains))
  lo_q, hi_q = 50 * (1 - cfg.level), 50 * (1 + cfg.level)
  out: dict[str, Any] = {
    "budgets": list(cfg.budgets),
    "seeds": cfg.seeds,
    "level": cfg.level,
    "kappa": kappa,
    "arms": {},
  }
  for arm in ARMS:
    ex_BxSxT, T_BxT = [], []
    for N in cfg.budgets:
      grid = horizon_grid(N, cfg)
      res = qs.simulate(
        q,
        qs.lanes(T0=grid, lr=step_size(arm, N, cfg), beta=cfg.beta),
        budgets=(N,),
        seeds=cfg.seeds,
        sigma=cfg.noise,
      )
      ex_SxT = qs.excess(q, res.w_BxKxSxM[0], opt["val"])
      uniq, first = np.unique(
        grid, return_index=True
      )  # duplicates are identical runs
      ex_BxSxT.append(ex_SxT[:, first])
      T_BxT.append(uniq)
    # Budgets may have grids of different lengths after merging duplicates.
    width = max(len(t) for t in T_BxT)
    pad = lambda a, w: np.pad(
      a,
      [(0, 0)] * (a.ndim - 1) + [(0, w - a.shape[-1])],  # noqa: E731
      constant_values=np.nan,
    )
    ex = np.stack([pad(e, width) for e in ex_BxSxT])
    T_grid = np.stack([pad(t[None], width)[0] for t in T_BxT])
    boot = ts.bootstrap_tstar(ex, T_grid, cfg.bootstrap, seed=1, half=cfg.half)
    rows = []
    for b, N in enumerate(cfg.budgets):
      n_b = len(T_BxT[b])  # the rest is NaN padding
      mean_T = np.full(width, np.nan)
      mean_T[:n_b] = ex[b][:, :n_b].mean(axis=0)
      est = ts.tstar(T_grid[b], mean_T, cfg.half)
      i = int(np.nanargmin(mean_T))
      m, lo, hi = ts.mean_ci(ex[b][:, i], 0.95)
      bt = boot[:, b]
      rows.append(
        {
          "N": N,
          "lr": step_size(arm, N, cfg),
          "T": None if est["edge"] else est["T"],
          "T_lo": float(np.nanpercentile(bt, lo_q))
          if np.isfinite(bt).any()
          else None,
          "T_hi": float(np.nanpercentile(bt, hi_q))
          if np.isfinite(bt).any()
          else None,
          "boot_edge_frac": float(np.mean(~np.isfinite(bt))),
          "excess": m,
          "excess_lo": lo,
          "excess_hi": hi,
          "grid_T": T_BxT[b],
          "mean_excess_T": mean_T[: len(T_BxT[b])],
        }
      )
    T_hat = np.array([np.nan if row["T"] is None else row["T"] for row in rows])
    entry: dict[str, Any] = {"rows": rows}
    if np.all(np.isfinite(T_hat)) and len(T_hat) >= 3:
      N_arr = np.array(cfg.budgets, np.float64)
      entry["slope"] = ts.loglog_slope(N_arr, T_hat)
      ok = np.all(np.isfinite(boot), axis=1)
      sl = np.array([ts.loglog_slope(N_arr, row)["slope"] for row in boot[ok]])
      entry["slope_boot"] = {
        "lo": float(np.percentile(sl, lo_q)),
        "hi": float(np.percentile(sl, hi_q)),
        "resamples": int(ok.sum()),
      }
      if len(T_hat) >= 4:
        n_fit = min(
          max(2, int(round(cfg.fit_fraction * len(T_hat)))), len(T_hat) - 1
        )
        entry["laws"] = ts.compare_laws(N_arr, T_hat, n_fit)
        entry["n_fit"] = n_fit
      nu = -np.log1p(-np.array([row["lr"] for row in rows]) * mu)
      entry["model_T"] = np.sqrt(kappa * N_arr / (2 * nu))
    out["arms"][arm] = entry
  return r(out)


def summary(data: dict[str, Any]) -> str:
  """T* with bootstrap intervals and the excess at T* per arm and budget."""
  lines = []
  pct = int(round(100 * data["level"]))
  for arm in ARMS:
    e = data["arms"][arm]
    rows = []
    for row in e["rows"]:
      T = "edge" if row["T"] is None else f"{row['T']:.0f}"
      ci = (
        "-"
        if row["T_lo"] is None
        else f"[{row['T_lo']:.0f}, {row['T_hi']:.0f}]"
      )
      rows.append(
        [
          row["N"],
          f"{row['lr']:.4g}",
          T,
          ci,
          f"{row['excess']:.2e} [{row['excess_lo']:.1e}, {row['excess_hi']:.1e}]",
        ]
      )
    lines.append(
      f"{arm} steps ({data['seeds']} seeds; T* interval: {pct}% bootstrap)"
    )
    lines.append(
      fmt_table(
        ["N", "eta", "T*", "interval", "excess at best T (95% CI)"], rows
      )
    )
    if "slope" in e:
      s, sb = e["slope"], e["slope_boot"]
      lines.append(
        f"log-log slope {s['slope']:.2f} ({pct}% bootstrap [{sb['lo']:.2f}, {sb['hi']:.2f}])"
      )
    if "laws" in e:
      errs = ", ".join(
        f"{ts.LAW_NAMES[k]} {v['rms_heldout']:.3f}"
        for k, v in e["laws"].items()
      )
      lines.append(
        f"held-out error of log T* ({len(data['budgets']) - e['n_fit']} largest N): {errs}"
      )
    lines.append("")
  return "\n".join(lines).rstrip()


def _plot(data):
  from dataweights.experiments.ch1 import plots

  return plots.plot_scaling_minibatch(data)


register(
  Published(
    name="ch1_scaling_minibatch",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.MinibatchScalingConfig,
    config=mixing_configs.minibatch_scaling,
    summary=summary,
    plot=_plot,
    note="float64; noise from fixed keys, so the run is deterministic",
  )
)
