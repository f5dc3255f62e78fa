"""Figures of Chapter 4 (ScaleBiO). Plots compute nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure


def _style(ax, title: str | None = None) -> None:
  ax.grid(True, alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)


def plot_noise(data: dict[str, Any]) -> Figure:
  """Weights over training (coloured by noise rate) and final vs rate."""
  fig = Figure(figsize=(12, 4.2), layout="constrained")
  ax0, ax1 = fig.subplots(1, 2)
  rates = np.asarray(data["rates_K"])
  steps = np.asarray(data["steps_S"])
  lam = np.asarray(data["lambda_mean_SxK"])
  cmap = colormaps["viridis"]
  for k, rate in enumerate(rates):
    ax0.plot(steps, lam[:, k], color=cmap(rate), lw=1.6, label=f"{rate:.2f}")
  ax0.axhline(1 / len(rates), color="0.5", ls=":", lw=1)
  ax0.set_xlabel("ScaleBiO step")
  ax0.set_ylabel(r"$\lambda_k$ (mean over seeds)")
  ax0.legend(title="noise rate", fontsize=7, ncols=2, loc="upper left")
  _style(ax0, "weights of the 10 partitions during training")
  final = np.asarray(data["final_lambda_RxK"])
  for r_, row in enumerate(final):
    ax1.plot(
      rates, row, "o", ms=4, alpha=0.6, label=f"seed {data['seeds'][r_]}"
    )
  ax1.plot(rates, final.mean(0), "k-", lw=1.5, label="mean")
  ax1.axhline(1 / len(rates), color="0.5", ls=":", lw=1, label="uniform")
  rho = np.asarray(data["spearman_R"])
  ax1.set_xlabel("fraction of responses replaced by '.'")
  ax1.set_ylabel(r"final $\lambda_k$")
  ax1.legend(fontsize=8)
  _style(
    ax1,
    f"final weights; Spearman rho per seed {', '.join(f'{x:.2f}' for x in rho)}",
  )
  return fig


def plot_two_sources(data: dict[str, Any]) -> Figure:
  """The weight of each source over training (mean and seeds)."""
  fig = Figure(figsize=(7, 4.0), layout="constrained")
  ax = fig.subplots()
  steps = np.asarray(data["steps_S"])
  lam = np.asarray(data["lambda_SxRxK"])
  colors = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
  for k, name in enumerate(data["sources"]):
    c = colors[k % len(colors)]
    for run in range(lam.shape[1]):
      ax.plot(steps, lam[:, run, k], color=c, lw=0.8, alpha=0.35)
    ax.plot(
      steps,
      lam[:, :, k].mean(1),
      color=c,
      lw=2,
      label=f"{name} (mean over seeds)",
    )
    ax.axhline(
      data["natural_K"][k],
      color=c,
      ls="--",
      lw=1,
      label=f"{name}: natural share",
    )
  ax.set_ylim(0, 1)
  ax.set_xlabel("ScaleBiO step")
  ax.set_ylabel(r"$\lambda_k$")
  ax.legend(fontsize=8)
  _style(ax, f"validation set: {', '.join(data['valid_sources'])}")
  return fig


def plot_mixture(data: dict[str, Any]) -> Figure:
  """Learned weights against the baselines, and the target loss after
  fine-tuning on each mixture."""
  fig = Figure(figsize=(13, 4.4), layout="constrained")
  ax0, ax1 = fig.subplots(1, 2, width_ratios=(1.6, 1))
  names = data["sources"]
  k = np.arange(len(names))
  lam = np.asarray(data["final_lambda_RxK"])
  w = 0.27
  ax0.bar(
    k - w, np.full(len(names), 1 / len(names)), w, color="0.7", label="uniform"
  )
  ax0.bar(k, data["natural_K"], w, color="#2ca02c", label="natural")
  ax0.bar(k + w, lam.mean(0), w, color="#1f77b4", label="ScaleBiO (mean)")
  for run in lam:
    ax0.plot(k + w, run, "k.", ms=4)
  ax0.set_xticks(k, names, rotation=20)
  ax0.set_ylabel("weight")
  ax0.legend(fontsize=8)
  _style(ax0, f"source weights (target: {data['target']}, held out)")
  loss = np.asarray(data["test_loss_MxR"])
  mixes = data["mixtures"]
  for run in range(loss.shape[1]):
    ax1.plot(range(len(mixes)), loss[:, run], "-o", color="0.6", lw=0.8, ms=4)
  ax1.plot(
    range(len(mixes)), loss.mean(1), "s", color="#d62728", ms=8, label="mean"
  )
  ax1.set_xticks(range(len(mixes)), mixes)
  ax1.set_ylabel("target test loss (nats/byte)")
  ax1.legend(fontsize=8)
  _style(ax1, "after fine-tuning on the resampled set (lines: one seed)")
  return fig
