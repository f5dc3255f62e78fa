"""Target A, all domains: average and worst-domain held-out loss per method.

Every method and baseline trains the same model for the same number of
tokens; the held-out loss of each domain is measured on its test split.
Intervals are Student-t over seeds; differences to stratified uniform
sampling are paired by seed (same initialisation and data order).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataweights.configs import lm_mixing as configs
from dataweights.experiments.ch2 import common, plots, runs
from dataweights.experiments.registry import Published, register

BASELINE = "stratified"


def analyse(cfg: configs.LMMixingConfig, target: str = "A") -> dict[str, Any]:
  """Per method: per-domain losses, average and worst, paired differences."""
  out = runs.run_all(cfg)["runs"][target]
  loss = {
    m: np.array([r["loss_K"] for r in out[m]])
    for m in runs.methods(cfg, target)
  }
  base = loss[BASELINE]
  rows = {}
  for m, L_SxK in loss.items():
    avg_S, worst_S = L_SxK.mean(1), L_SxK.max(1)
    rows[m] = {
      "avg": common.t_interval(avg_S),
      "worst": common.t_interval(worst_S),
      "avg_minus_stratified": common.t_interval(avg_S - base.mean(1)),
      "worst_minus_stratified": common.t_interval(worst_S - base.max(1)),
      "loss_K": L_SxK.mean(0),
      "loss_K_minus_stratified": (L_SxK - base).mean(0),
      "worst_domain": [cfg.domains[k] for k in L_SxK.argmax(1)],
      "per_seed_avg": avg_S,
      "final_w_K": np.mean([r["final_w_K"] for r in out[m]], axis=0),
    }
  return {
    "methods": list(loss),
    "domains": list(cfg.domains),
    "seeds": list(cfg.seeds),
    "rows": rows,
  }


def run(cfg: configs.LMMixingConfig) -> dict[str, Any]:
  """Target A's table and per-domain losses (JSON-able, rounded)."""
  return common.rnd(analyse(cfg, "A"))


def summary(data: dict[str, Any]) -> str:
  """Average and worst held-out loss (nats/byte), and paired differences."""
  rows = []
  for m in data["methods"]:
    r = data["rows"][m]
    rows.append(
      [
        common.label(m),
        common.fmt_ci(r["avg"]),
        common.fmt_ci(r["worst"]),
        common.fmt_ci(r["avg_minus_stratified"], sign=True),
        common.fmt_ci(r["worst_minus_stratified"], sign=True),
      ]
    )
  n = len(data["seeds"])
  head = (
    f"Target A (all {len(data['domains'])} domains): held-out loss in nats/byte, "
    f"mean ± 95% t-interval over {n} seeds;\nthe last two columns are paired "
    "differences to stratified uniform sampling (negative = better).\n"
  )
  return head + common.table(
    ["method", "average", "worst domain", "Δ average", "Δ worst"], rows
  )


def make_config(**fields: Any) -> configs.LMMixingConfig:
  return configs.LMMixingConfig(**fields)


register(
  Published(
    name="ch2_all_domains",
    chapter="ch2_lm_mixing",
    run=run,
    make_config=make_config,
    plot=plots.all_domains,
    config=configs.lm_mixing,
    summary=summary,
  )
)
