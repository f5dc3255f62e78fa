"""Figures of chapter 3 (they read the published data, compute nothing)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

COLORS = {
  "base": "0.35",
  "mixing": "#8c564b",
  "classifier": "#ff7f0e",
  "cds": "#9467bd",
  "dds": "#2ca02c",
  "anograd": "#1f77b4",
  "soba": "#d62728",
  "small loss (base model)": "0.6",
}
STYLES = {"base": "--", "mixing": ":", "small loss (base model)": "-."}


def _style(ax, title: str | None = None) -> None:
  ax.grid(True, alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)


def _ordered(d: dict[str, Any], methods: list[str]) -> list[tuple[str, Any]]:
  """``d``'s items in table order, then any extra keys sorted: a figure
  must not depend on dict order (the published JSON sorts its keys)."""
  extra = sorted(k for k in d if k not in methods)
  return [(m, d[m]) for m in [*methods, *extra] if m in d]


def _curves(
  ax, curves: dict[str, Any], key: str, ylabel: str, methods: list[str]
) -> None:
  for m, c in _ordered(curves, methods):
    ax.plot(
      c["steps"],
      c[key],
      STYLES.get(m, "-"),
      color=COLORS.get(m),
      lw=1.6,
      label=m,
    )
  ax.set(xlabel="step", ylabel=ylabel)


def _kept_bars(ax, makeup: dict[str, Any], methods: list[str]) -> None:
  names = makeup["domains"]
  x = np.arange(len(names))
  width = 0.8 / len(methods)
  for i, m in enumerate(methods):
    frac = np.asarray(makeup["fractions"][m])[-1]
    ax.bar(
      x + (i - (len(methods) - 1) / 2) * width,
      frac,
      width,
      color=COLORS.get(m),
      label=m,
    )
  ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
  ax.set(ylabel="share of kept rows (last interval)")


def plot_lm(data: dict[str, Any]) -> Figure:
  """Learning curves, kept rows per domain, kept noise over training."""
  fig = Figure(figsize=(14, 4.2), layout="constrained")
  ax0, ax1, ax2 = fig.subplots(1, 3, width_ratios=(1, 1.4, 1))
  _curves(
    ax0,
    data["curves"],
    "spec_test",
    "held-out target loss (nats/byte)",
    data["methods"],
  )
  ax0.legend(fontsize=7)
  _style(ax0, f"target: {data['target']}")
  sel = [m for m in data["methods"] if m != "mixing"]
  _kept_bars(ax1, data["makeup"], sel)
  ax1.legend(fontsize=7, ncol=2)
  _style(ax1, "where the kept rows come from")
  mk = data["makeup"]
  noise = [i for i, n in enumerate(mk["domains"]) if n.startswith("noise")]
  for m in sel:
    frac = np.asarray(mk["fractions"][m])[:, noise].sum(1)
    ax2.plot(
      mk["steps"],
      frac,
      STYLES.get(m, "-"),
      color=COLORS.get(m),
      lw=1.6,
      label=m,
    )
  ax2.set(
    xlabel="step",
    ylabel="share of kept rows from noise domains",
    ylim=(0, None),
  )
  _style(ax2, "noise (Slovenian, non-English chat)")
  return fig


def plot_digits(data: dict[str, Any]) -> Figure:
  """Learning curves and target accuracy before / after fine-tuning."""
  fig = Figure(figsize=(12, 4.0), layout="constrained")
  ax0, ax1 = fig.subplots(1, 2)
  _curves(
    ax0, data["curves"], "spec_test", "held-out target loss", data["methods"]
  )
  ax0.legend(fontsize=7)
  _style(ax0, f"target: {data['target']}")
  rows = data["table"]
  x = np.arange(len(rows))
  for off, when, label in (
    (-0.2, "pre", "after pre-training"),
    (0.2, "ft", "after fine-tuning"),
  ):
    ax1.errorbar(
      x + off,
      [row[f"{when}/acc/spec_test"] for row in rows],
      yerr=[row[f"{when}/acc/spec_test/ci"] for row in rows],
      fmt="o" if when == "pre" else "s",
      capsize=3,
      label=label,
    )
  ax1.set_xticks(x, [row["method"] for row in rows])
  ax1.set(ylabel="target test accuracy (95% interval)")
  ax1.legend(fontsize=8)
  _style(ax1, "accuracy on the target")
  return fig


def plot_noisy(data: dict[str, Any]) -> Figure:
  """AUROC of w_φ over training, and the corrupted share of kept rows."""
  rates = data["rates"]
  fig = Figure(figsize=(12, 3.6 * len(rates)), layout="constrained")
  axes = fig.subplots(len(rates), 2, squeeze=False)
  for i, rate in enumerate(rates):
    d = data[str(rate)]
    a0, a1 = axes[i]
    for m, curve in _ordered(d["auroc"], data["methods"]):
      a0.plot(
        d["steps"],
        curve,
        STYLES.get(m, "-"),
        color=COLORS.get(m),
        lw=1.6,
        label=m,
      )
    a0.axhline(0.5, color="0.7", lw=1)
    a0.set(xlabel="step", ylabel="AUROC (clean vs corrupted)", ylim=(0.3, 1.0))
    a0.legend(fontsize=7)
    _style(a0, f"label noise {rate}: does the score separate clean labels?")
    mids = [(a + b) / 2 for a, b in zip(d["steps"][:-1], d["steps"][1:])]
    for m, frac in _ordered(d["kept_corrupted"], data["methods"]):
      a1.plot(
        mids, frac, STYLES.get(m, "-"), color=COLORS.get(m), lw=1.6, label=m
      )
    a1.axhline(rate, color="0.7", lw=1)
    a1.set(xlabel="step", ylabel="corrupted share of kept rows", ylim=(0, None))
    a1.legend(fontsize=7)
    _style(a1, f"label noise {rate}: what the step trains on")
  return fig


def plot_sargar(data: dict[str, Any]) -> Figure:
  """SAR and GAR against the best selection method's gain over base."""
  fig = Figure(figsize=(11, 4.0), layout="constrained")
  axes = fig.subplots(1, 2)
  gain = [100 * t["gain"] for t in data["targets"]]
  err = [100 * t["gain_ci"] for t in data["targets"]]
  for ax, key, rho in (
    (axes[0], "sar", data["spearman_sar"]),
    (axes[1], "gar", data["spearman_gar"]),
  ):
    xs = [t[key] for t in data["targets"]]
    ax.errorbar(xs, gain, yerr=err, fmt="o", color="#d62728", capsize=3)
    for t, x, y in zip(data["targets"], xs, gain):
      ax.annotate(
        f"{t['target']} ({t['best']})",
        (x, y),
        fontsize=7,
        xytext=(4, 4),
        textcoords="offset points",
      )
    ax.axhline(0, color="0.7", lw=1)
    ax.set(
      xlabel=key.upper(), ylabel="best selection method's gain over base (%)"
    )
    _style(ax, f"{key.upper()} vs gain: Spearman {rho:+.2f}")
  return fig
