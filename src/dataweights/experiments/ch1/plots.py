"""Figures of chapter 1 (data mixing over a finite horizon T)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from matplotlib.ticker import MaxNLocator

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
OPT_KW = dict(color="black", ls="--", lw=1.2)
GREEDY_KW = dict(color="#d62728", ls=":", lw=1.5)


def _nan(x: Any) -> np.ndarray:
  return np.array([np.nan if v is None else v for v in x], dtype=float)


def _style(ax, title: str | None = None) -> None:
  ax.grid(True, which="major", alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)


def plot_greedy(data: dict[str, Any]) -> Figure:
  """Greedy T = 1 versus the exact bilevel optimum on the 2-D quadratic."""
  fig = Figure(figsize=(13, 4.0), layout="constrained")
  ax0, ax1, ax2 = fig.subplots(1, 3)
  c_KxD = np.array(data["problem"]["c_KxD"])
  cv = np.array(data["problem"]["c_val_D"])
  for radius in (0.25, 0.5, 1.0, 1.5, 2.0):
    ax0.add_patch(Circle(cv, radius, fill=False, color="0.75", lw=0.8))
  theta = np.array(data["curve"]["theta"])
  ax0.plot(theta[:, 0], theta[:, 1], color="0.3", lw=1.5, label=r"$\theta^*(w)$, $w_2\in[0,1]$")
  ax0.plot(*c_KxD[0], "s", color=COLORS[0], ms=7, label=r"$c_1$ ($A_1=I$)")
  ax0.plot(*c_KxD[1], "s", color=COLORS[2], ms=7, label=r"$c_2$ ($A_2=$diag(40,1))")
  ax0.plot(*cv, "o", color="black", ms=6, label=r"$c_v$ (validation)")
  ax0.plot(*data["optimum"]["theta"], "*", color="black", ms=14, label="exact optimum")
  ax0.plot(*data["greedy"]["theta"], "X", color=GREEDY_KW["color"], ms=10,
           label="greedy fixed point")
  ax0.set(xlabel=r"$\theta_1$", ylabel=r"$\theta_2$", aspect="equal",
          xlim=(-0.6, 2.4), ylim=(-0.6, 2.4))
  ax0.legend(fontsize=7, loc="lower right")
  _style(ax0, "inner optima and validation level sets")

  w2 = np.array(data["curve"]["w2"])
  ax1.plot(w2, data["curve"]["val"], color="0.2", lw=1.8)
  ax1.axvline(data["optimum"]["w2"], **OPT_KW, label="exact optimum")
  ax1.axvline(data["greedy"]["w2"], **GREEDY_KW, label="greedy (T=1) fixed point")
  ax1.axvline(0.5, color="0.5", lw=1, ls="-.", label="uniform")
  ax1.set(xlabel=r"weight of domain 2, $w_2$", ylabel=r"validation loss $g(\theta^*(w))$",
          yscale="log")
  ax1.legend(fontsize=8)
  _style(ax1, "outer objective")

  for i, run in enumerate(data["runs"]):
    steps = np.maximum(np.array(run["steps"]), 1)
    ax2.plot(steps, run["w2"], color=COLORS[i % len(COLORS)], lw=1.8,
             label=f"T = {run['T']}")
  ax2.axhline(data["optimum"]["w2"], **OPT_KW, label="exact optimum")
  ax2.axhline(data["greedy"]["w2"], **GREEDY_KW, label="greedy fixed point")
  ax2.set(xscale="log", xlabel="inner steps n", ylabel=r"$w_2$", ylim=(0, 1))
  ax2.legend(fontsize=8)
  _style(ax2, "mixing runs (EG)")
  return fig


def plot_horizon_full(data: dict[str, Any]) -> Figure:
  """Figure-1 style: validation loss and w_2 against T (full gradients)."""
  fig = Figure(figsize=(11, 4.0), layout="constrained")
  ax0, ax1 = fig.subplots(1, 2)
  T = np.array(data["horizons"], float)
  for i, b in enumerate(data["budgets"]):
    c = COLORS[i % len(COLORS)]
    ax0.plot(T, _nan(b["val"]), "o-", color=c, ms=4, label=f"N = {b['N']}")
    ax0.plot(b["best_T"], b["best_val"], "*", color=c, ms=14)
    ax0.axhline(b["uniform_val"], color=c, lw=1, ls="-.", alpha=0.7)
    ax1.plot(T, _nan(b["w2"]), "o-", color=c, ms=4, label=f"N = {b['N']}")
  ax0.axhline(data["optimum"]["val"], **OPT_KW, label="exact optimum")
  ax0.plot([], [], color="0.4", ls="-.", label="uniform weights")
  ax0.set(xscale="log", yscale="log", xlabel="inner horizon T",
          ylabel="final validation loss")
  ax0.legend(fontsize=8)
  _style(ax0, "validation loss (star: best T)")
  ax1.axhline(data["optimum"]["w_K"][1], **OPT_KW, label="exact optimum")
  ax1.set(xscale="log", xlabel="inner horizon T", ylabel=r"final $w_2$", ylim=(0, 1))
  ax1.legend(fontsize=8)
  _style(ax1, "weight of the domain most aligned with validation")
  return fig


def plot_horizon_minibatch(data: dict[str, Any]) -> Figure:
  """Figure-2 style: loss, accuracy and w_2 against T (minibatch), CI bands."""
  fig = Figure(figsize=(14, 4.0), layout="constrained")
  axes = fig.subplots(1, 3)
  T = np.array(data["horizons"], float)
  keys = (("val", "validation loss"), ("acc", "validation accuracy"), ("w2", r"$w_2$"))
  for i, b in enumerate(data["budgets"]):
    c = COLORS[i % len(COLORS)]
    for ax, (k, _) in zip(axes, keys):
      m = np.array(b[f"{k}_mean"])
      ax.plot(T, m, "o-", color=c, ms=4, label=f"N = {b['N']}")
      ax.fill_between(T, b[f"{k}_lo"], b[f"{k}_hi"], color=c, alpha=0.2, lw=0)
    for name, ls in (("uniform", "-."), ("natural", ":")):
      axes[0].axhline(b[name]["val_mean"], color=c, ls=ls, lw=1, alpha=0.8)
      axes[1].axhline(b[name]["acc_mean"], color=c, ls=ls, lw=1, alpha=0.8)
  for ax in axes[:2]:
    ax.plot([], [], color="0.4", ls="-.", label="uniform weights")
    ax.plot([], [], color="0.4", ls=":", label="natural proportions")
  for ax, (_, label) in zip(axes, keys):
    ax.set(xscale="log", xlabel="inner horizon T", ylabel=label)
    ax.legend(fontsize=8)
    _style(ax)
  axes[2].set_ylim(0, 1)
  pct = int(round(100 * data["level"]))
  fig.suptitle(f"minibatch gradients, mean and {pct}% interval over {data['seeds']} seeds",
               fontsize=10)
  return fig


def _tstar_points(cond: dict[str, Any]):
  rows = [row for row in cond["rows"] if row["T"] is not None]
  N = np.array([row["N"] for row in rows], float)
  T = np.array([row["T"] for row in rows], float)
  lo = np.array([row["range"][0] for row in rows], float)
  hi = np.array([row["range"][1] for row in rows], float)
  return N, T, lo, hi


def plot_scaling(data: dict[str, Any]) -> Figure:
  """T*(N) with full gradients: constant and decaying outer step, local slopes."""
  fig = Figure(figsize=(15, 4.3), layout="constrained")
  axes = fig.subplots(1, 3)
  titles = {"constant": r"constant $\beta$: model $\sqrt{\kappa N / 2\nu}$ (dashed)",
            "decaying": r"$\beta_r = \beta/(1+0.1r)$: fit $a + b\log N$ (dashed)"}
  for ax, arm in zip(axes[:2], ("constant", "decaying")):
    for i, cond in enumerate(data["arms"][arm]):
      c = COLORS[i % len(COLORS)]
      N, T, lo, hi = _tstar_points(cond)
      # Bars: grid horizons within 10% of the best (the vertex may lie
      # between grid points, outside a one-point range).
      yerr = [np.maximum(T - lo, 0), np.maximum(hi - T, 0)]
      ax.errorbar(N, T, yerr=yerr, fmt="o", color=c, ms=4, capsize=2, lw=0.8,
                  label=rf"$\eta\mu$ = {cond['eta_mu']:.3g}")
      if arm == "constant":
        ax.plot(N, cond["model_T"], "--", color=c, lw=1.2)
      elif "laws" in cond:
        law = cond["laws"]["log"]
        fit = law["a"] + law["b"] * np.log(N)
        ax.plot(N, np.where(fit > 0, fit, np.nan), "--", color=c, lw=1.2)
    ax.set(xscale="log", yscale="log", xlabel="budget N (inner steps)",
           ylabel="best horizon T* (bars: within 10% of best)")
    ax.legend(fontsize=8, loc="upper left")
    _style(ax, titles[arm])
  ax = axes[2]
  for arm, mk, ls in (("constant", "o", "-"), ("decaying", "s", ":")):
    for i, cond in enumerate(data["arms"][arm]):
      N, T, _, _ = _tstar_points(cond)
      if len(N) < 2:
        continue
      mid = np.sqrt(N[1:] * N[:-1])
      ax.plot(mid, cond["local_slopes"], ls, marker=mk, ms=3.5, color=COLORS[i % len(COLORS)],
              mfc="white" if arm == "decaying" else None, lw=1)
  ax.axhline(0.5, color="black", lw=1, ls="--", label="1/2 (square-root law)")
  ax.plot([], [], "o-", color="0.4", label=r"constant $\beta$")
  ax.plot([], [], "s:", color="0.4", mfc="white", label=r"decaying $\beta$")
  ax.set(xscale="log", ylim=(0, 1.5), xlabel="budget N",
         ylabel=r"local slope $\Delta\log T^* / \Delta\log N$")
  ax.legend(fontsize=8)
  _style(ax, "local log-log slope of T*(N)")
  return fig


def plot_scaling_minibatch(data: dict[str, Any]) -> Figure:
  """Noisy gradients: excess at T*, T*(N) with bootstrap intervals, U-curves."""
  fig = Figure(figsize=(15, 4.3), layout="constrained")
  ax0, ax1, ax2 = fig.subplots(1, 3)
  pct = int(round(100 * data["level"]))
  for i, (arm, label) in enumerate((("constant", r"constant $\eta$"),
                                    ("decaying", r"$\eta_N \propto N^{-1/2}$"))):
    e = data["arms"][arm]
    c = COLORS[i]
    N = np.array([row["N"] for row in e["rows"]], float)
    ex = np.array([row["excess"] for row in e["rows"]])
    ax0.errorbar(N, ex, yerr=[ex - np.array([row["excess_lo"] for row in e["rows"]]),
                              np.array([row["excess_hi"] for row in e["rows"]]) - ex],
                 fmt="o-", color=c, ms=4, capsize=3, label=label)
    ok = [j for j, row in enumerate(e["rows"]) if row["T"] is not None]
    T = np.array([e["rows"][j]["T"] for j in ok])
    lo = np.array([e["rows"][j]["T_lo"] for j in ok])
    hi = np.array([e["rows"][j]["T_hi"] for j in ok])
    ax1.errorbar(N[ok], T, yerr=[T - lo, hi - T], fmt="o", color=c, ms=5, capsize=3, label=label)
    if "laws" in e and arm == "decaying":
      Nf = np.geomspace(N.min(), N.max(), 50)
      p = e["laws"]["power"]
      ax1.plot(Nf, np.exp(p["a"]) * Nf ** p["b"], color=c, lw=1.2,
               label=f"fit c N^p, p = {p['b']:.2f}")
      s_ = e["laws"]["sqrt_nlogn"]
      ax1.plot(Nf, s_["a"] + s_["b"] * np.sqrt(Nf * np.log(Nf)), color=c, lw=1.2, ls=":",
               label=r"fit $a + b\sqrt{N\log N}$")
      ax1.plot(N, e["model_T"], "--", color="0.3", lw=1, label="deterministic model")
  ax0.set(xscale="log", yscale="log", xlabel="budget N", ylabel="excess at the best T (95% CI)")
  ax0.legend(fontsize=8)
  _style(ax0, "excess of the final mixture")
  ax1.set(xscale="log", yscale="log", xlabel="budget N", ylabel=f"T* ({pct}% bootstrap interval)")
  ax1.legend(fontsize=7, loc="upper left")
  _style(ax1, f"best horizon, {data['seeds']} seeds")
  for j, row in enumerate(data["arms"]["decaying"]["rows"]):
    ax2.plot(row["grid_T"], row["mean_excess_T"], "-", color=COLORS[j % len(COLORS)], lw=1.3,
             label=f"N = {row['N']}")
    if row["T"] is not None:
      ax2.axvline(row["T"], color=COLORS[j % len(COLORS)], lw=0.8, ls=":")
  ax2.set(xscale="log", yscale="log", xlabel="inner horizon T", ylabel="mean excess over seeds")
  ax2.legend(fontsize=8)
  _style(ax2, r"$\eta_N \propto N^{-1/2}$: excess against T (dotted: T*)")
  return fig


def plot_adaptive(data: dict[str, Any]) -> Figure:
  """Growing horizon T_r = 1 + c r against fixed horizons."""
  fig = Figure(figsize=(15, 4.3), layout="constrained")
  ax0, ax1, ax2 = fig.subplots(1, 3)
  qd = data["quadratic"]
  N = np.array([row["N"] for row in qd["rows"]], float)
  for key, label, kw in (
    ("T1", "T = 1", dict(color=COLORS[1], ls=":")),
    ("best_T_excess", "best fixed T for each N", dict(color="black", ls="-")),
    ("single_T_excess", f"fixed T = {qd['single_T']} for all N", dict(color=COLORS[0], ls="--")),
    ("single_c_excess", f"growing, c = {qd['single_c']:.3g} for all N", dict(color=COLORS[2], ls="-")),
  ):
    ax0.plot(N, [row[key] for row in qd["rows"]], marker="o", ms=4, lw=1.5, label=label, **kw)
  ax0.set(xscale="log", yscale="log", xlabel="budget N", ylabel=r"excess $\Phi(w_N) - \Phi^*$")
  ax0.legend(fontsize=8)
  _style(ax0, "quadratic, full gradients")
  ex_c = np.array(qd["excess_c_BxC"])
  best = np.array([row["best_T_excess"] for row in qd["rows"]])
  for b in range(len(N)):
    if b % 2 and b != len(N) - 1:
      continue
    ax1.plot(qd["c_grid"], ex_c[b] / best[b], "o-", ms=3, color=COLORS[(b // 2) % len(COLORS)],
             label=f"N = {int(N[b])}")
  ax1.axhline(1.0, color="black", lw=1, ls="--", label="best fixed T")
  ax1.axvline(qd["model_c"], color="0.4", lw=1, ls=":", label=r"model $c^* = \kappa/2\nu$")
  ax1.set(xscale="log", yscale="log", xlabel=r"growth rate c ($T_r = 1 + c\,r$)",
          ylabel="excess / best fixed-T excess")
  ax1.legend(fontsize=7)
  _style(ax1, "below 1: growing horizon wins")
  cl = data["classification"]
  Nc = np.array([row["N"] for row in cl["rows"]], float)
  m = np.array([row["diff"] for row in cl["rows"]])
  lo = np.array([row["diff_lo"] for row in cl["rows"]])
  hi = np.array([row["diff_hi"] for row in cl["rows"]])
  ax2.errorbar(Nc, m, yerr=[m - lo, hi - m], fmt="o", color=COLORS[2], capsize=4,
               label="growing minus best fixed T")
  t1 = np.array([row["T1_minus_bestT"] for row in cl["rows"]])
  ax2.errorbar(Nc * 1.06, t1[:, 0], yerr=[t1[:, 0] - t1[:, 1], t1[:, 2] - t1[:, 0]], fmt="s",
               color=COLORS[1], capsize=4, label="T = 1 minus best fixed T")
  ax2.axhline(0, color="black", lw=1)
  pct = int(round(100 * data["level"]))
  ax2.set(xscale="log", xlabel="budget N", ylabel=f"test loss difference ({pct}% CI)")
  ax2.legend(fontsize=8)
  _style(ax2, f"classification, minibatches, {cl['seeds']} paired seeds")
  return fig


def plot_adult(data: dict[str, Any]) -> Figure:
  """Per target: learned weights and test-loss differences with the pooled baseline."""
  targets = data["targets"]
  fig = Figure(figsize=(14, 4.0 * len(targets)), layout="constrained")
  axes = np.atleast_2d(fig.subplots(len(targets), 2, width_ratios=(1.6, 1)))
  names = data["domain_names"]
  x = np.arange(len(names))
  pct = int(round(100 * data["level"]))
  for (ax0, ax1), t in zip(axes, targets):
    shown = [m for m in t["methods"] if m["name"] == "natural" or m["name"].startswith(("T=", "adaptive"))]
    width = 0.8 / len(shown)
    for i, m in enumerate(shown):
      ax0.bar(x + (i - (len(shown) - 1) / 2) * width, np.maximum(m["w_mean"], 1e-4), width,
              color=COLORS[i % len(COLORS)], label=m["name"])
    ax0.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax0.set(ylabel="final domain weight (mean over seeds)", yscale="log", ylim=(1e-4, 1.0))
    ax0.legend(fontsize=7, ncol=2)
    _style(ax0, f"target: {', '.join(t['target_domains']) if t['target'] != 'all' else 'all domains'}")
    labels = [m["name"] for m in t["methods"]]
    y = np.arange(len(labels))
    d = np.array([m["diff_vs_pooled"] for m in t["methods"]])
    lo = np.array([m["diff_lo"] for m in t["methods"]])
    hi = np.array([m["diff_hi"] for m in t["methods"]])
    ax1.errorbar(d, y, xerr=[d - lo, hi - d], fmt="o", color="black", capsize=3)
    ax1.axvline(0, color=COLORS[1], lw=1)
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set(xlabel=f"test loss minus natural (pooled), {pct}% CI, {data['seeds']} paired seeds")
    ax1.xaxis.set_major_locator(MaxNLocator(5))
    _style(ax1, "left of the line: better than pooled natural sampling")
  return fig
