"""Target B, one domain out of the mixture with a small validation set.

The target domain's training data are not used; the methods see only
``target_valid_docs`` documents of its validation split. Reported: the
target's held-out loss (test split), and what the other domains lose
(their average held-out loss), each with paired differences to stratified
uniform sampling over the other domains. The stratified run of target A,
which *did* train on the target's training data, is shown as the
in-domain reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataweights.configs import lm_mixing as configs
from dataweights.experiments.ch2 import common, plots, runs
from dataweights.experiments.registry import Published, register

BASELINE = "stratified"


def run(cfg: configs.LMMixingConfig) -> dict[str, Any]:
  """Target B's table (JSON-able, rounded)."""
  all_runs = runs.run_all(cfg)["runs"]
  k = list(cfg.domains).index(cfg.target)
  others = [j for j in range(cfg.num_domains) if j != k]
  loss = {
    m: np.array([r["loss_K"] for r in all_runs["B"][m]])
    for m in runs.methods(cfg, "B")
  }
  base = loss[BASELINE]
  rows = {}
  for m, L_SxK in loss.items():
    tgt_S, oth_S = L_SxK[:, k], L_SxK[:, others].mean(1)
    rows[m] = {
      "target": common.t_interval(tgt_S),
      "others": common.t_interval(oth_S),
      "target_minus_stratified": common.t_interval(tgt_S - base[:, k]),
      "others_minus_stratified": common.t_interval(
        oth_S - base[:, others].mean(1)
      ),
      "final_w_K": np.mean([r["final_w_K"] for r in all_runs["B"][m]], axis=0),
    }
  in_domain = np.array([r["loss_K"] for r in all_runs["A"]["stratified"]])
  return common.rnd(
    {
      "target": cfg.target,
      "target_valid_docs": cfg.target_valid_docs,
      "domains": list(cfg.domains),
      "methods": list(loss),
      "seeds": list(cfg.seeds),
      "rows": rows,
      "in_domain": {
        "target": common.t_interval(in_domain[:, k]),
        "others": common.t_interval(in_domain[:, others].mean(1)),
      },
    }
  )


def summary(data: dict[str, Any]) -> str:
  """Target and others' held-out loss, and paired differences."""
  rows = []
  for m in data["methods"]:
    r = data["rows"][m]
    rows.append(
      [
        common.label(m),
        common.fmt_ci(r["target"]),
        common.fmt_ci(r["others"]),
        common.fmt_ci(r["target_minus_stratified"], sign=True),
        common.fmt_ci(r["others_minus_stratified"], sign=True),
      ]
    )
  ref = data["in_domain"]
  rows.append(
    [
      "in-domain reference*",
      common.fmt_ci(ref["target"]),
      common.fmt_ci(ref["others"]),
      "",
      "",
    ]
  )
  n = len(data["seeds"])
  head = (
    f"Target B ({data['target']!r}, left out of training, "
    f"{data['target_valid_docs']} validation documents): held-out loss in "
    f"nats/byte,\nmean ± 95% t-interval over {n} seeds; Δ: paired "
    "difference to stratified uniform sampling over the other domains.\n"
  )
  foot = (
    "\n* stratified uniform over all domains including the target's "
    "training data (target A's run)."
  )
  return (
    head
    + common.table(
      ["method", data["target"], "others", f"Δ {data['target']}", "Δ others"],
      rows,
    )
    + foot
  )


register(
  Published(
    name="ch2_specific",
    chapter="ch2_lm_mixing",
    run=run,
    make_config=configs.LMMixingConfig,
    plot=plots.specific,
    config=configs.lm_mixing,
    summary=summary,
  )
)
