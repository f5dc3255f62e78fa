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
  ax0.plot(
    theta[:, 0],
    theta[:, 1],
    color="0.3",
    lw=1.5,
    label=r"$\theta^*(w)$, $w_2\in[0,1]$",
  )
  ax0.plot(*c_KxD[0], "s", color=COLORS[0], ms=7, label=r"$c_1$ ($A_1=I$)")
  ax0.plot(
    *c_KxD[1], "s", color=COLORS[2], ms=7, label=r"$c_2$ ($A_2=$diag(40,1))"
  )
  ax0.plot(*cv, "o", color="black", ms=6, label=r"$c_v$ (validation)")
  ax0.plot(
    *data["optimum"]["theta"], "*", color="black", ms=14, label="exact optimum"
  )
  ax0.plot(
    *data["greedy"]["theta"],
    "X",
    color=GREEDY_KW["color"],
    ms=10,
    label="greedy fixed point",
  )
  ax0.set(
    xlabel=r"$\theta_1$",
    ylabel=r"$\theta_2$",
    aspect="equal",
    xlim=(-0.6, 2.4),
    ylim=(-0.6, 2.4),
  )
  ax0.legend(fontsize=7, loc="lower right")
  _style(ax0, "inner optima and validation level sets")

  w2 = np.array(data["curve"]["w2"])
  ax1.plot(w2, data["curve"]["val"], color="0.2", lw=1.8)
  ax1.axvline(data["optimum"]["w2"], **OPT_KW, label="exact optimum")
  ax1.axvline(
    data["greedy"]["w2"], **GREEDY_KW, label="greedy (T=1) fixed point"
  )
  ax1.axvline(0.5, color="0.5", lw=1, ls="-.", label="uniform")
  ax1.set(
    xlabel=r"weight of domain 2, $w_2$",
    ylabel=r"validation loss $g(\theta^*(w))$",
    yscale="log",
  )
  ax1.legend(fontsize=8)
  _style(ax1, "outer objective")

  for i, run in enumerate(data["runs"]):
    steps = np.maximum(np.array(run["steps"]), 1)
    ax2.plot(
      steps,
      run["w2"],
      color=COLORS[i % len(COLORS)],
      lw=1.8,
      label=f"T = {run['T']}",
    )
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
  ax0.set(
    xscale="log",
    yscale="log",
    xlabel="inner horizon T",
    ylabel="final validation loss",
  )
  ax0.legend(fontsize=8)
  _style(ax0, "validation loss (star: best T)")
  ax1.axhline(data["optimum"]["w_K"][1], **OPT_KW, label="exact optimum")
  ax1.set(
    xscale="log", xlabel="inner horizon T", ylabel=r"final $w_2$", ylim=(0, 1)
  )
  ax1.legend(fontsize=8)
  _style(ax1, "weight of the domain most aligned with validation")
  return fig


def plot_horizon_minibatch(data: dict[str, Any]) -> Figure:
  """Figure-2 style: loss, accuracy and w_2 against T (minibatch), ±1 std."""
  fig = Figure(figsize=(14, 4.0), layout="constrained")
  axes = fig.subplots(1, 3)
  T = np.array(data["horizons"], float)
  keys = (
    ("val", "validation loss"),
    ("acc", "validation accuracy"),
    ("w2", r"$w_2$"),
  )
  for i, b in enumerate(data["budgets"]):
    c = COLORS[i % len(COLORS)]
    for ax, (k, _) in zip(axes, keys):
      m, s = np.array(b[f"{k}_mean"]), np.array(b[f"{k}_std"])
      ax.plot(T, m, "o-", color=c, ms=4, label=f"N = {b['N']}")
      ax.fill_between(T, m - s, m + s, color=c, alpha=0.18, lw=0)
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
  fig.suptitle(
    f"minibatch gradients, mean ± std over {data['seeds']} seeds", fontsize=10
  )
  return fig


def plot_scaling(data: dict[str, Any]) -> Figure:
  """T*(N) with the log N and √(N log N) least-squares fits."""
  fig = Figure(figsize=(11, 4.0), layout="constrained")
  axes = fig.subplots(1, 2)
  N = np.array(data["budgets"], float)
  N_fine = np.geomspace(N.min(), N.max(), 60)
  for ax, case in zip(axes, ("full", "minibatch")):
    d = data[case]
    ax.plot(N, d["T_star"], "o", color="black", ms=7, label="empirical T*(N)")
    fl, fs = d["fit_log"], d["fit_sqrt"]
    fit_log = fl["a"] + fl["b"] * np.log(N_fine)
    fit_sqrt = fs["a"] + fs["b"] * np.sqrt(N_fine * np.log(N_fine))
    # A fit can dip below T = 1 at small N; a horizon < 1 is meaningless.
    ax.plot(
      N_fine,
      np.where(fit_log >= 1, fit_log, np.nan),
      color=COLORS[0],
      label=f"a + b log N (R² = {fl['r2']:.2f})",
    )
    ax.plot(
      N_fine,
      np.where(fit_sqrt >= 1, fit_sqrt, np.nan),
      color=COLORS[1],
      ls="--",
      label=f"a + b √(N log N) (R² = {fs['r2']:.2f})",
    )
    top = max(
      max(d["T_star"]), float(np.nanmax(fit_log)), float(np.nanmax(fit_sqrt))
    )
    ax.set(
      xscale="log",
      yscale="log",
      ylim=(1, 2 * top),
      xlabel="budget N (inner steps)",
      ylabel="best horizon T*",
    )
    ax.legend(fontsize=8)
    _style(ax, f"{case} gradients")
  return fig


def plot_adult(data: dict[str, Any]) -> Figure:
  """Learned domain weights on UCI Adult against the baselines, test metrics."""
  fig = Figure(figsize=(13, 4.2), layout="constrained")
  ax0, ax1 = fig.subplots(1, 2, width_ratios=(2, 1))
  names = data["domain_names"]
  methods = data["methods"]
  x = np.arange(len(names))
  width = 0.8 / len(methods)
  for i, m in enumerate(methods):
    ax0.bar(
      x + (i - (len(methods) - 1) / 2) * width,
      m["w_mean"],
      width,
      yerr=m["w_std"],
      color=COLORS[i % len(COLORS)],
      label=m["name"],
    )
  ax0.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
  ax0.set(ylabel="domain weight", yscale="log", ylim=(1e-3, 1.0))
  ax0.legend(fontsize=8)
  _style(ax0, f"domain weights ({data['domain_column']})")
  labels = [m["name"] for m in methods]
  ax1.barh(
    np.arange(len(methods)),
    [m["test_loss_mean"] for m in methods],
    xerr=[m["test_loss_std"] for m in methods],
    color=[COLORS[i % len(COLORS)] for i in range(len(methods))],
  )
  ax1.set_yticks(np.arange(len(methods)), labels, fontsize=8)
  lo = min(m["test_loss_mean"] for m in methods)
  hi = max(m["test_loss_mean"] for m in methods)
  ax1.set(
    xlabel="test log-loss",
    xlim=(lo - 0.1 * (hi - lo) - 0.005, hi + 0.1 * (hi - lo) + 0.005),
  )
  ax1.xaxis.set_major_locator(MaxNLocator(4))
  _style(ax1, "test loss (mean ± std)")
  return fig
