"""Figures of chapter 2 (they read published data and compute nothing)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dataweights.experiments.ch2.common import label

DOMAIN_COLORS = [
  colormaps["tab20"](i) for i in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5)
]


def _style(ax, title: str | None = None) -> None:
  ax.grid(True, alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)


def _forest(ax, names, cis, color="C0") -> None:
  y = np.arange(len(names))[::-1]
  mean = np.array([c["mean"] for c in cis])
  err = np.array([[c["mean"] - c["lo"], c["hi"] - c["mean"]] for c in cis]).T
  ax.errorbar(mean, y, xerr=err, fmt="o", color=color, capsize=3, ms=5)
  ax.set_yticks(y, [label(n) for n in names], fontsize=8)


def all_domains(data: dict[str, Any]) -> Figure:
  """Paired Δ of average/worst loss per method; per-domain Δ heatmap."""
  fig = Figure(figsize=(13, 4.6), layout="constrained")
  ax0, ax1 = fig.subplots(1, 2, width_ratios=[1, 1.9])
  methods = data["methods"]
  rows = data["rows"]
  y = np.arange(len(methods))[::-1]
  for key, color, dy, name in (
    ("avg_minus_stratified", "C0", 0.12, "average over domains"),
    ("worst_minus_stratified", "C3", -0.12, "worst domain"),
  ):
    ci = [rows[m][key] for m in methods]
    mean = np.array([c["mean"] for c in ci])
    err = np.array([[c["mean"] - c["lo"], c["hi"] - c["mean"]] for c in ci]).T
    ax0.errorbar(
      mean, y + dy, xerr=err, fmt="o", color=color, capsize=3, ms=5, label=name
    )
  ax0.axvline(0, color="0.3", lw=1)
  ax0.set_yticks(y, [label(m) for m in methods], fontsize=8)
  ax0.set_xlabel("Δ held-out loss to stratified uniform (nats/byte)")
  ax0.legend(
    fontsize=8,
    loc="upper center",
    bbox_to_anchor=(0.5, -0.14),
    ncol=2,
    frameon=False,
  )
  _style(ax0, "Target A: paired differences, 95% t-intervals")
  d = np.array([rows[m]["loss_K_minus_stratified"] for m in methods])
  lim = max(float(np.abs(d).max()), 1e-6)
  im = ax1.imshow(
    d, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto"
  )
  ax1.set_xticks(
    range(len(data["domains"])),
    data["domains"],
    rotation=40,
    ha="right",
    fontsize=8,
  )
  ax1.set_yticks(range(len(methods)), [label(m) for m in methods], fontsize=8)
  for i in range(d.shape[0]):
    for j in range(d.shape[1]):
      v = int(round(1000 * d[i, j]))
      ax1.text(
        j,
        i,
        f"{v:+d}" if v else "0",
        ha="center",
        va="center",
        fontsize=6.5,
        color="white" if abs(d[i, j]) > 0.6 * lim else "black",
      )
  cb = fig.colorbar(im, ax=ax1, shrink=0.9)
  cb.set_label("Δ loss to stratified (nats/byte)", fontsize=8)
  ax1.set_title(
    "per-domain held-out loss minus stratified uniform "
    "(mean over seeds, in millinats/byte)",
    fontsize=10,
  )
  return fig


def specific(data: dict[str, Any]) -> Figure:
  """Target B: the target's loss against what the others lose."""
  fig = Figure(figsize=(11, 4.4), layout="constrained")
  ax0, ax1 = fig.subplots(1, 2, width_ratios=[1.2, 1])
  rows, methods = data["rows"], data["methods"]
  for i, m in enumerate(methods):
    tx, oy = (
      rows[m]["others_minus_stratified"],
      rows[m]["target_minus_stratified"],
    )
    ax0.errorbar(
      tx["mean"],
      oy["mean"],
      xerr=[[tx["mean"] - tx["lo"]], [tx["hi"] - tx["mean"]]],
      yerr=[[oy["mean"] - oy["lo"]], [oy["hi"] - oy["mean"]]],
      fmt="o",
      color=f"C{i}",
      capsize=3,
      ms=6,
      label=label(m),
    )
  ax0.axhline(0, color="0.4", lw=0.8)
  ax0.axvline(0, color="0.4", lw=0.8)
  ax0.set_xlabel("Δ average loss of the other domains (nats/byte)")
  ax0.set_ylabel(f"Δ loss of {data['target']} (nats/byte)")
  ax0.legend(fontsize=8)
  _style(
    ax0,
    "paired differences to stratified uniform (lower left = better on both)",
  )
  names = [*methods, "in-domain reference"]
  cis = [rows[m]["target"] for m in methods] + [data["in_domain"]["target"]]
  _forest(ax1, names, cis)
  ax1.set_xlabel(f"held-out loss of {data['target']} (nats/byte)")
  _style(
    ax1,
    f"target {data['target']!r} ({data['target_valid_docs']} validation documents)",
  )
  return fig


def weights(data: dict[str, Any]) -> Figure:
  """Stacked areas: each learning method's weights over training."""
  panels = data["panels"]
  ncol = 4
  nrow = int(np.ceil(len(panels) / ncol))
  fig = Figure(figsize=(13, 2.9 * nrow + 0.6), layout="constrained")
  axes = np.atleast_1d(fig.subplots(nrow, ncol, sharey=True)).ravel()
  names = data["domains"]
  for ax, p in zip(axes, panels):
    w = np.asarray(p["w_SxK"])
    ax.stackplot(
      p["steps"],
      w.T,
      colors=DOMAIN_COLORS[: len(names)],
      edgecolor="white",
      lw=0.4,
    )
    ax.set_xlim(p["steps"][0], p["steps"][-1])
    ax.set_ylim(0, 1)
    tgt = "A: all domains" if p["target"] == "A" else f"B: {data['target']}"
    ax.set_title(f"{label(p['method'])} ({tgt})", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in axes[len(panels) :]:
    ax.axis("off")
  axes[0].set_ylabel("weight", fontsize=8)
  fig.legend(
    [Patch(color=DOMAIN_COLORS[i]) for i in range(len(names))],
    names,
    loc="outside lower center",
    ncol=len(names),
    fontsize=8,
    frameon=False,
  )
  return fig


def horizon(data: dict[str, Any]) -> Figure:
  """Paired differences to T = 1, per target."""
  targets = data["targets"]
  fig = Figure(figsize=(11, 2.9), layout="constrained")
  axes = fig.subplots(1, len(targets))
  for ax, t in zip(np.atleast_1d(axes), sorted(targets)):
    d = targets[t]
    names = d["methods"]
    _forest(ax, names, [d["rows"][m]["minus_reference"] for m in names])
    ax.axvline(0, color="0.3", lw=1)
    ax.set_xlabel(
      f"Δ {d['metric']} to {label(d['reference'])} (nats/byte)", fontsize=8
    )
    _style(ax, f"target {t}")
  return fig
