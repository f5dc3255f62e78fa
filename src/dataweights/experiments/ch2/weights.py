"""The learned domain weights over training (mean over seeds).

For each learning method: the weights every ``weight_every`` steps (DoReMi:
its proxy's ``α_t``, whose average trains the main model; ODM: the sampling
distribution; alignment and horizon: the loss weights), averaged over seeds,
and the final weights of each seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataweights.configs import lm_mixing as configs
from dataweights.experiments.ch2 import common, plots, runs
from dataweights.experiments.registry import Published, register


def run(cfg: configs.LMMixingConfig) -> dict[str, Any]:
  """Weights over training per (target, method), JSON-able."""
  all_runs = runs.run_all(cfg)["runs"]
  panels = []
  for target in ("A", "B"):
    for m in runs.methods(cfg, target):
      recs = all_runs[target][m]
      if "w_SxK" not in recs[0]:
        continue
      w_SxSxK = np.stack([r["w_SxK"] for r in recs])
      panels.append(
        {
          "target": target,
          "method": m,
          "steps": [
            cfg.weight_every * (i + 1) for i in range(w_SxSxK.shape[1])
          ],
          "w_SxK": w_SxSxK.mean(0),
          "final_w_seed_K": np.stack([r["final_w_K"] for r in recs]),
        }
      )
  return common.rnd(
    {
      "domains": list(cfg.domains),
      "target": cfg.target,
      "tokens_K": runs.run_all(cfg)["tokens_K"],
      "natural_K": runs.fixed_weights(
        cfg, runs.run_all(cfg)["tokens_K"], "natural", "A"
      ),
      "panels": panels,
    }
  )


def summary(data: dict[str, Any]) -> str:
  """Final weights (mean over seeds) of each learning method, in %."""
  names = data["domains"]
  short = [n[:5] for n in names]
  rows = [["natural (tokens)", *[f"{100 * w:.0f}" for w in data["natural_K"]]]]
  for p in data["panels"]:
    w = np.mean(p["final_w_seed_K"], axis=0)
    rows.append(
      [
        f"{p['target']}: {common.label(p['method'])}",
        *[f"{100 * x:.0f}" for x in w],
      ]
    )
  return (
    "Final domain weights in % (mean over seeds; DoReMi: the average ᾱ that "
    "trains the main model;\nA: all domains, B: target "
    f"{data['target']!r} left out)\n" + common.table(["", *short], rows)
  )


register(
  Published(
    name="ch2_weights",
    chapter="ch2_lm_mixing",
    run=run,
    make_config=configs.LMMixingConfig,
    plot=plots.weights,
    config=configs.lm_mixing,
    summary=summary,
  )
)
