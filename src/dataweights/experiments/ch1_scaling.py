"""Beyond the paper: the empirical best horizon T*(N) over budgets N.

Full gradients: the 3-domain quadratic. Minibatch: the same quadratic with
additive Gaussian gradient noise (:func:`noisy_quadratic_losses`), several
seeds (vmapped). The score of a run is the excess outer objective of its
final mixture, ``g(θ*(w_N)) − min_w g(θ*(w))``, in float64 (free of the
float32 noise in ``g(θ_N)`` at near-optimal losses). T*(N) is the grid T
with the smallest score (mean over seeds); we fit ``T* ≈ a + b log N`` and
``T* ≈ a + b √(N log N)`` by least squares and report both fits' R².
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.data import synthetic as syn
from dataweights.experiments.ch1_common import fmt_table, r
from dataweights.experiments.ch1_horizon_full import at_budget
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel, mixing


def fit(N: np.ndarray, T_star: np.ndarray, feature: str) -> dict[str, float]:
  """Least squares ``T* ≈ a + b φ(N)``; φ = log N or √(N log N)."""
  phi = np.log(N) if feature == "log" else np.sqrt(N * np.log(N))
  X = np.stack([np.ones_like(phi), phi], axis=1)
  coef, *_ = np.linalg.lstsq(X, T_star, rcond=None)
  pred = X @ coef
  ss_tot = float(np.sum((T_star - T_star.mean()) ** 2))
  r2 = 1.0 - float(np.sum((T_star - pred) ** 2)) / ss_tot if ss_tot > 0 else 0.0
  return {"a": float(coef[0]), "b": float(coef[1]), "r2": r2}


def _best(gap_TxN: np.ndarray, horizons) -> list[int]:
  return [
    int(horizons[int(np.nanargmin(gap_TxN[:, n]))])
    for n in range(gap_TxN.shape[1])
  ]


def run(cfg: mixing_configs.HorizonScalingConfig) -> dict[str, Any]:
  """T*(N) for full and minibatch gradients, with the two fits."""
  q = syn.sweep_quadratic()
  K, D = q.num_domains, q.dim
  g_star = syn.bilevel_optimum(q)["val"]
  theta0, w0 = jnp.zeros(D), mixing.uniform_weights(K)
  n_max = max(cfg.budgets)
  horizons = [T for T in cfg.horizons if T <= n_max]
  gap = {
    "full": np.full((len(horizons), len(cfg.budgets)), np.nan),
    "minibatch": np.full((len(horizons), len(cfg.budgets)), np.nan),
  }
  exact = bilevel.MixingProblem(*syn.quadratic_losses(q))
  noisy = bilevel.MixingProblem(*syn.noisy_quadratic_losses(q))
  seed_keys = jax.random.split(jax.random.key(0), cfg.seeds)
  for i, T in enumerate(horizons):
    tr = mixing.run_mixing(
      exact, theta0, w0, lr=cfg.lr, T=T, N=n_max, beta=cfg.beta
    )
    w_RxK = np.asarray(tr.w_RxK, np.float64)
    batch_fn = syn.noise_sampler(K, D, cfg.noise, T)

    def one(k, batch_fn=batch_fn, T=T):
      return mixing.run_mixing(
        noisy,
        theta0,
        w0,
        lr=cfg.lr,
        T=T,
        N=n_max,
        beta=cfg.beta,
        batch_fn=batch_fn,
        key=k,
      ).w_RxK

    w_SxRxK = np.asarray(jax.jit(jax.vmap(one))(seed_keys), np.float64)
    for n, N in enumerate(cfg.budgets):
      if T <= N:
        gap["full"][i, n] = syn.val_at(q, at_budget(w_RxK, T, N)) - g_star
        gap["minibatch"][i, n] = (
          np.mean(syn.val_at(q, w_SxRxK[:, N // T])) - g_star
        )
  N_arr = np.array(cfg.budgets, np.float64)
  out: dict[str, Any] = {"horizons": horizons, "budgets": list(cfg.budgets)}
  for case in ("full", "minibatch"):
    T_star = np.array(_best(gap[case], horizons), np.float64)
    out[case] = {
      "gap_TxN": [
        [None if np.isnan(v) else float(max(v, 0.0)) for v in row]
        for row in gap[case]
      ],
      "T_star": T_star,
      "fit_log": fit(N_arr, T_star, "log"),
      "fit_sqrt": fit(N_arr, T_star, "sqrt"),
    }
  return r(out)


def summary(data: dict[str, Any]) -> str:
  """T*(N) per case and the R² of both fits."""
  rows = [
    [N, data["full"]["T_star"][i], data["minibatch"]["T_star"][i]]
    for i, N in enumerate(data["budgets"])
  ]
  table = fmt_table(["N", "T* full", "T* minibatch"], rows)
  lines = [table]
  for case in ("full", "minibatch"):
    fl, fs = data[case]["fit_log"], data[case]["fit_sqrt"]
    lines.append(
      f"{case}: R2 of a+b*log N = {fl['r2']:.2f}; "
      f"R2 of a+b*sqrt(N log N) = {fs['r2']:.2f}"
    )
  return "\n".join(lines)


def _plot(data):
  from dataweights.plotting import mixing as plots

  return plots.plot_scaling(data)


register(
  Published(
    name="ch1_scaling",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.HorizonScalingConfig,
    plot=_plot,
  )
)
