"""Beyond the paper: the best horizon T*(N) with full gradients, and why.

The 3-domain quadratic :func:`dataweights.methods.synthetic.sweep_quadratic`
in float64, with the training curvature of coordinate 2 multiplied by
``s`` in ``cfg.curvature_scales``. Scaling a coordinate's training
curvatures leaves ``θ*(w)``, the outer objective ``Φ(w) = g(θ*(w))`` and
its optimum unchanged and sets the slowest inner rate ``ημ`` (``μ`` the
smallest eigenvalue of ``∇²F(θ; w*)``). Two outer steps: constant ``β``
(the chapter's set-up) and ``β_r = β / (1 + decay · r)``.

For every horizon of a geometric grid and every budget, a run (exactly N
steps, :mod:`.quadsim`) is scored by the excess of its final mixture,
``Φ(w_N) − Φ*``. T*(N) is the vertex of a parabola in ``log T`` through
``log excess`` around the grid argmin (:func:`.tstar.tstar`); budgets
whose best excess is below ``cfg.floor`` (float64 resolution) get none.
Four two-parameter laws are fitted on the smaller budgets and scored on
the larger, held-out ones.

A model (ours): with constant β the outer error decays geometrically in
the number of rounds, ``∝ exp(−κ N / T)`` (κ: the per-round rate of EG
with exact hypergradients, :func:`.common.outer_rate`), while the bias
of a T-step hypergradient decays like ``(1 − ημ)^{2T} = exp(−2νT)``;
balancing gives ``T* ≈ √(κ N / (2ν))``. With ``β_r = β/(1 + decay·r)``
the outer error decays like a power ``R^{−p}``, ``p = κ / decay``, and the
same balance gives the logarithmic law ``T* ≈ (p / 2ν) log N``.
"""

from __future__ import annotations

from typing import Any

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
from dataweights.methods import synthetic as syn

ARMS = ("constant", "decaying")


def scaled(q: syn.QuadraticDomains, s: float) -> syn.QuadraticDomains:
  """The problem with every training curvature of coordinate 2 times ``s``."""
  a = q.a_KxD.copy()
  a[:, 1] *= s
  return syn.make_quadratic(a, q.c_KxD, q.a_val_D, q.c_val_D)


def inner_rate(q: syn.QuadraticDomains, w_K: np.ndarray, lr: float) -> float:
  """``ημ`` with ``μ`` the smallest eigenvalue of ``∇²F(θ; w) = diag(Σ w_j a_j)``."""
  return float(lr * np.min(np.asarray(w_K) @ q.a_KxD))


def analyse(T_grid, ex_BxT, budgets, cfg) -> dict[str, Any]:
  """T*(N), near-optimal ranges, law comparison and slopes for one condition."""
  rows = []
  for b, N in enumerate(budgets):
    col = np.where(T_grid <= N, ex_BxT[b], np.nan)
    best = float(np.nanmin(col))
    if best < cfg.floor:
      rows.append(
        {
          "N": N,
          "T": None,
          "edge": False,
          "floored": True,
          "excess": best,
          "range": [None, None],
        }
      )
      continue
    est = ts.tstar(T_grid, col, cfg.half)
    lo, hi = ts.near_optimal_range(T_grid, col, 1.1)
    rows.append(
      {
        "N": N,
        "T": None if est["edge"] else est["T"],
        "edge": est["edge"],
        "floored": False,
        "excess": best,
        "range": [lo, hi],
      }
    )
  ok = [i for i, row in enumerate(rows) if row["T"] is not None]
  N_ok = np.array([rows[i]["N"] for i in ok], np.float64)
  T_ok = np.array([rows[i]["T"] for i in ok], np.float64)
  out: dict[str, Any] = {"rows": rows}
  if len(ok) >= 4:
    n_fit = min(max(2, int(round(cfg.fit_fraction * len(ok)))), len(ok) - 1)
    out["laws"] = ts.compare_laws(N_ok, T_ok, n_fit)
    out["n_fit"] = n_fit
    tail = max(3, len(ok) // 2)
    out["slope_all"] = ts.loglog_slope(N_ok, T_ok)
    out["slope_tail"] = ts.loglog_slope(N_ok[-tail:], T_ok[-tail:])
  out["local_slopes"] = ts.local_slopes(N_ok, T_ok) if len(ok) >= 2 else []
  out["N_ok"] = N_ok
  return out


def run(cfg: mixing_configs.HorizonScalingConfig) -> dict[str, Any]:
  """T*(N) per condition and outer step, with fits and the model prediction."""
  q = syn.sweep_quadratic()
  opt = syn.bilevel_optimum(q)
  T_grid = geometric_grid(1, cfg.t_max, cfg.n_horizons)
  conds = [(arm, s) for arm in ARMS for s in cfg.curvature_scales]
  nT = len(T_grid)
  lanes = qs.lanes(
    T0=np.tile(T_grid, len(conds)).astype(np.float64),
    lr=cfg.lr,
    beta=cfg.beta,
    decay=np.repeat(
      [0.0 if a == "constant" else cfg.beta_decay for a, _ in conds], nT
    ),
    scale=np.repeat([[1.0, s] for _, s in conds], nT, axis=0),
  )
  res = qs.simulate(q, lanes, budgets=cfg.budgets)
  ex_BxM = np.stack(
    [
      qs.excess(q, res.w_BxKxSxM[b], opt["val"])[0]
      for b in range(len(cfg.budgets))
    ]
  )
  kappa = outer_rate(q, cfg.beta, np.full(q.num_domains, 1.0 / q.num_domains))
  out: dict[str, Any] = {
    "T_grid": T_grid,
    "budgets": list(cfg.budgets),
    "kappa": kappa,
    "optimum": {"val": opt["val"], "w_K": opt["w_K"]},
    "arms": {},
  }
  for c, (arm, s) in enumerate(conds):
    eta_mu = inner_rate(scaled(q, s), opt["w_K"], cfg.lr)
    nu = -np.log1p(-eta_mu)
    a = analyse(T_grid, ex_BxM[:, c * nT : (c + 1) * nT], cfg.budgets, cfg)
    N_ok = a.pop("N_ok")
    if arm == "constant":
      model = np.sqrt(kappa * N_ok / (2 * nu))
    else:
      model = kappa / cfg.beta_decay / (2 * nu) * np.log(N_ok)
    a.update({"scale": s, "eta_mu": eta_mu, "nu": nu, "model_T": model})
    out["arms"].setdefault(arm, []).append(a)
  return r(out)


def _fmt_T(row) -> str:
  if row["floored"]:
    return "floor"
  return "edge" if row["T"] is None else f"{row['T']:.0f}"


def summary(data: dict[str, Any]) -> str:
  """T* per budget and condition; slopes with 95% intervals; best law."""
  lines = []
  for arm in ARMS:
    conds = data["arms"][arm]
    show = [
      i
      for i, N in enumerate(data["budgets"])
      if i % 3 == 0 or i == len(data["budgets"]) - 1
    ]
    header = ["N"] + [f"eta*mu={c['eta_mu']:.3g}" for c in conds]
    rows = [
      [data["budgets"][i]] + [_fmt_T(c["rows"][i]) for c in conds] for i in show
    ]
    lines.append(
      f"T*(N), {arm} outer step (floor: excess < 1e-12, no estimate)"
    )
    lines.append(fmt_table(header, rows))
    rows = []
    for c in conds:
      if "laws" not in c:
        continue
      st = c["slope_tail"]
      best = min(c["laws"], key=lambda k: c["laws"][k]["rms_heldout"])
      ratio = (
        np.array([row["T"] for row in c["rows"] if row["T"] is not None])[-1]
        / c["model_T"][-1]
      )
      rows.append(
        [
          f"{c['eta_mu']:.3g}",
          f"{st['slope']:.2f} [{st['lo']:.2f}, {st['hi']:.2f}]",
          ts.LAW_NAMES[best],
          f"{c['laws'][best]['rms_heldout']:.3f}",
          f"{c['laws']['log']['rms_heldout']:.3f}",
          f"{c['laws']['sqrt_nlogn']['rms_heldout']:.3f}",
          f"{ratio:.2f}",
        ]
      )
    lines.append(
      fmt_table(
        [
          "eta*mu",
          "slope, large N (95% CI)",
          "best law (held out)",
          "its err",
          "err log N",
          "err sqrt(NlogN)",
          "T*/model",
        ],
        rows,
      )
    )
    lines.append("")
  lines.append(
    f"kappa (EG rate with exact hypergradients, per round) = {data['kappa']:.4f}"
  )
  return "\n".join(lines)


def _plot(data):
  from dataweights.experiments.ch1 import plots

  return plots.plot_scaling(data)


register(
  Published(
    name="ch1_scaling",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.HorizonScalingConfig,
    config=mixing_configs.horizon_scaling,
    summary=summary,
    plot=_plot,
    note="float64 and deterministic; T* is a parabola vertex (smooth in the data)",
  )
)
