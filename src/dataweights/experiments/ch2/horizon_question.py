"""Chapter 1's question on a language model: does a horizon T > 1 beat T = 1?

Finite-horizon mixing with the exact hypergradient through T AdamW steps,
for every T of the config, against T = 1 on the same seeds: paired
differences of the target metric (A: the average held-out loss over all
domains; B: the held-out loss of the target domain), with Student-t
intervals. The alignment rule (the SGD linearisation of T = 1) and
stratified uniform sampling are compared to T = 1 in the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataweights.configs import lm_mixing as configs
from dataweights.experiments.ch2 import common, plots, runs
from dataweights.experiments.registry import Published, register


def _metric(cfg: configs.LMMixingConfig, target: str, recs: list) -> np.ndarray:
  L_SxK = np.array([r["loss_K"] for r in recs])
  if target == "A":
    return L_SxK.mean(1)
  return L_SxK[:, list(cfg.domains).index(cfg.target)]


def run(cfg: configs.LMMixingConfig) -> dict[str, Any]:
  """Paired differences to T = 1 per target (JSON-able, rounded)."""
  all_runs = runs.run_all(cfg)["runs"]
  ref = (
    runs.horizon_name(1)
    if 1 in cfg.horizons
    else runs.horizon_name(cfg.horizons[0])
  )
  others = [
    runs.horizon_name(T) for T in cfg.horizons if runs.horizon_name(T) != ref
  ]
  others += ["alignment", "stratified"]
  out = {}
  for target in ("A", "B"):
    base = _metric(cfg, target, all_runs[target][ref])
    out[target] = {
      "metric": "average held-out loss"
      if target == "A"
      else f"held-out loss of {cfg.target}",
      "reference": ref,
      "reference_value": common.t_interval(base),
      "methods": list(others),  # the order of the table and figure rows
      "rows": {
        m: {
          "value": common.t_interval(_metric(cfg, target, all_runs[target][m])),
          "minus_reference": common.t_interval(
            _metric(cfg, target, all_runs[target][m]) - base
          ),
          "per_seed_minus_reference": _metric(cfg, target, all_runs[target][m])
          - base,
        }
        for m in others
      },
    }
  return common.rnd(
    {"horizons": list(cfg.horizons), "seeds": list(cfg.seeds), "targets": out}
  )


def summary(data: dict[str, Any]) -> str:
  """The paired differences to T = 1 and whether their intervals exclude 0."""
  lines = []
  for target in sorted(data["targets"]):
    d = data["targets"][target]
    rows = []
    for m in d["methods"]:
      r = d["rows"][m]
      ci = r["minus_reference"]
      verdict = (
        "better"
        if ci["hi"] < 0
        else ("worse" if ci["lo"] > 0 else "no difference resolved")
      )
      rows.append(
        [
          common.label(m),
          common.fmt_ci(r["value"]),
          common.fmt_ci(ci, sign=True),
          verdict,
        ]
      )
    lines.append(
      f"Target {target}: {d['metric']}; {common.label(d['reference'])} = "
      f"{common.fmt_ci(d['reference_value'])}"
    )
    lines.append(
      common.table(
        [
          "method",
          "value",
          f"minus {common.label(d['reference'])}",
          "95% interval",
        ],
        rows,
      )
    )
    lines.append("")
  n = len(data["seeds"])
  return (
    f"Paired over {n} seeds (negative = lower loss than T = 1).\n"
    + "\n".join(lines).rstrip()
  )


register(
  Published(
    name="ch2_horizon",
    chapter="ch2_lm_mixing",
    run=run,
    make_config=configs.LMMixingConfig,
    plot=plots.horizon,
    config=configs.lm_mixing,
    summary=summary,
  )
)
