"""Figures of chapter 5 (influence-based selection). They compute nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

COLORS = {
  "hessian": "#1f77b4",
  "fisher": "#17becf",
  "kfac": "#d62728",
  "kfac_factored": "#ff7f0e",
  "ekfac": "#2ca02c",
  "random": "0.55",
  "loss": "#8c564b",
  "classifier": "#9467bd",
  "less": "#1f77b4",
  "gdig_quality": "#d62728",
  "gdig_diverse": "#ff7f0e",
}
LABELS = {
  "hessian": "exact Hessian",
  "fisher": "exact emp. Fisher",
  "kfac": "K-FAC",
  "kfac_factored": "K-FAC, factored damping",
  "ekfac": "EK-FAC",
  "random": "random",
  "loss": "lowest loss",
  "classifier": "classifier",
  "less": "LESS",
  "gdig_quality": "G-DIG quality",
  "gdig_diverse": "G-DIG quality+diversity",
}


# Fixed orders: a published JSON's keys come back sorted.
ESTIMATOR_ORDER = ("hessian", "fisher", "kfac", "kfac_factored", "ekfac")
METHOD_ORDER = (
  "random",
  "loss",
  "classifier",
  "less",
  "gdig_quality",
  "gdig_diverse",
)


def _ordered(keys: Any, order: tuple[str, ...]) -> list[str]:
  """``keys`` in ``order`` (unknown keys last, sorted; ``vs_random`` out)."""
  keys = [k for k in keys if k != "vs_random"]
  known = [k for k in order if k in keys]
  return known + sorted(k for k in keys if k not in order)


def _style(ax, title: str | None = None) -> None:
  ax.grid(True, axis="y", alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)


def _err(s: dict[str, float]) -> tuple[float, list[float]]:
  return s["mean"], [s["mean"] - s["lo"], s["hi"] - s["mean"]]


def plot_loo(data: dict[str, Any]) -> Figure:
  """Correlation with leave-one-out per curvature; two scatter panels."""
  models = _ordered(data["models"], ("logistic", "mlp"))
  names = _ordered(data["models"][models[0]]["summary"], ESTIMATOR_ORDER)
  fig = Figure(figsize=(13, 4.0), layout="constrained")
  ax0, ax1, ax2 = fig.subplots(1, 3)
  width = 0.8 / len(names)
  for j, name in enumerate(names):
    for i, m in enumerate(models):
      mean, err = _err(data["models"][m]["summary"][name]["pearson"])
      ax0.bar(
        i + (j - (len(names) - 1) / 2) * width,
        mean,
        width,
        yerr=np.array(err)[:, None],
        color=COLORS[name],
        capsize=2,
        label=LABELS[name] if i == 0 else None,
      )
  ax0.set_xticks(range(len(models)), models)
  ax0.axhline(0, color="black", lw=0.8)
  ax0.set(ylabel="Pearson r with leave-one-out", ylim=(-0.15, 1.05))
  ax0.legend(
    fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2
  )
  _style(ax0, f"mean over {len(data['seeds'])} seeds, 95% interval")
  for ax, m in ((ax1, models[0]), (ax2, models[-1])):
    sc = data["models"][m]["scatter"]
    actual = 1e3 * np.asarray(sc["actual"])
    for name in ("hessian", "kfac", "ekfac"):
      ax.plot(
        actual,
        1e3 * np.asarray(sc[name]),
        "o",
        ms=3.5,
        alpha=0.75,
        color=COLORS[name],
        label=LABELS[name],
      )
    lim = (
      np.abs(
        np.concatenate(
          [actual]
          + [1e3 * np.asarray(sc[n]) for n in ("hessian", "kfac", "ekfac")]
        )
      ).max()
      * 1.05
    )
    ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8, ls="--")
    ax.set(
      xlim=(-lim, lim),
      ylim=(-lim, lim),
      xlabel=r"actual change of test loss, retrained ($\times 10^{-3}$)",
      ylabel=r"predicted change $-s_i/N$ ($\times 10^{-3}$)",
    )
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, alpha=0.3)
    ax.set_title(
      f"{m}: removing one example (seed {data['seeds'][0]})", fontsize=10
    )
  return fig


def plot_selection(data: dict[str, Any]) -> Figure:
  """Target loss, corrupted share, AUROCs and G-DIG's damping sweep."""
  s = data["summary"]
  budgets = sorted(s["budgets"], key=int)
  methods = _ordered(s["budgets"][budgets[0]], METHOD_ORDER)
  fig = Figure(figsize=(14, 7.6), layout="constrained")
  axs = fig.subplots(2, 2)
  width = 0.8 / len(methods)
  for key, ax, ylabel in (
    ("target_loss", axs[0, 0], "target held-out loss (nats/byte)"),
    (
      "corrupted",
      axs[0, 1],
      "fraction of the selection with swapped responses",
    ),
  ):
    for j, m in enumerate(methods):
      for i, b in enumerate(budgets):
        mean, err = _err(s["budgets"][b][m][key])
        ax.bar(
          i + (j - (len(methods) - 1) / 2) * width,
          mean,
          width,
          yerr=np.array(err)[:, None],
          color=COLORS[m],
          capsize=2,
          label=LABELS[m] if i == 0 else None,
        )
    ax.set_xticks(
      range(len(budgets)),
      [
        f"budget {int(b) / data['pool_size']:.0%} of the pool ({b} pairs)"
        for b in budgets
      ],
    )
    ax.set_ylabel(ylabel)
    _style(ax)
  ax = axs[0, 0]
  ax.axhline(
    s["full_pool_loss"]["mean"],
    color="black",
    ls="--",
    lw=1,
    label="whole pool",
  )
  vals = [
    s["budgets"][b][m]["target_loss"]["lo"] for b in budgets for m in methods
  ]
  hi = [
    s["budgets"][b][m]["target_loss"]["hi"] for b in budgets for m in methods
  ]
  lo_y = min(vals + [s["full_pool_loss"]["mean"]])
  hi_y = max(hi + [s["full_pool_loss"]["mean"]])
  pad = 0.15 * (hi_y - lo_y + 1e-9)
  ax.set_ylim(lo_y - pad, hi_y + pad)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title(
    f"fine-tuned on each selection (mean over {len(data['seeds'])} seeds, 95% interval)",
    fontsize=10,
  )
  pool_line = axs[0, 1].axhline(
    s["pool_corrupted"]["mean"], color="black", ls="--", lw=1, label="pool"
  )
  axs[0, 1].legend(handles=[pool_line], fontsize=7, loc="upper right")
  axs[0, 1].set_title("corrupted pairs selected", fontsize=10)

  ax = axs[1, 0]
  scored = _ordered(s["auroc_clean"], METHOD_ORDER)
  for j, (key, hatch) in enumerate(
    (
      ("auroc_clean", None),
      ("auroc_target", "//"),
    )
  ):
    for i, m in enumerate(scored):
      mean, err = _err(s[key][m])
      ax.bar(
        i + (j - 0.5) * 0.38,
        mean,
        0.38,
        yerr=np.array(err)[:, None],
        color=COLORS[m],
        hatch=hatch,
        edgecolor="white",
        capsize=2,
      )

  ax.axhline(0.5, color="black", lw=0.8, ls="--")
  ax.set_xticks(range(len(scored)), [LABELS[m] for m in scored])
  ax.set(ylabel="AUROC of the score", ylim=(0, 1.02))
  ax.legend(
    handles=[
      Patch(facecolor="0.5", label="clean vs swapped"),
      Patch(
        facecolor="0.5",
        hatch="//",
        edgecolor="white",
        label="target source vs other",
      ),
    ],
    fontsize=7,
    loc="upper left",
  )
  _style(ax, "AUROC of each score (0.5 = chance)")

  ax = axs[1, 1]
  sweep = s["sweep_auroc_clean"]
  for method, color, marker, ms in (
    ("kfac", COLORS["kfac"], "o", 7),
    ("ekfac", COLORS["ekfac"], "x", 6),
  ):
    keys = [k for k in sweep if k.startswith(method + "@")]
    lam = np.array([float(k.split("@")[1]) for k in keys])
    order = np.argsort(lam)
    for key, ls, lab in (
      ("sweep_auroc_clean", "-", "clean"),
      ("sweep_auroc_target", "--", "target"),
    ):
      mean = np.array([s[key][keys[i]]["mean"] for i in order])
      lo = np.array([s[key][keys[i]]["lo"] for i in order])
      hi_ = np.array([s[key][keys[i]]["hi"] for i in order])
      ax.plot(
        lam[order],
        mean,
        ls,
        color=color,
        marker=marker,
        ms=ms,
        mfc="none",
        label=f"{LABELS[method]}: {lab}",
      )
      if method == "kfac":
        ax.fill_between(lam[order], lo, hi_, color="0.5", alpha=0.15)
  ax.axhline(0.5, color="black", lw=0.8, ls=":")
  ax.set(
    xscale="log",
    xlabel=r"damping $\lambda$",
    ylabel="AUROC of G-DIG's score",
    ylim=(0, 1.02),
  )
  ax.legend(fontsize=7)
  ax.grid(True, alpha=0.3)
  ax.set_title(
    "G-DIG's score against the damping (K-FAC and EK-FAC coincide; "
    "band: K-FAC's 95% interval)",
    fontsize=10,
  )
  return fig
