"""Two sources, one in the validation set's style: the weight moves to it.

ScaleBiO's second demonstration (Pan et al. 2024: Alpaca against
GPT-4-Alpaca with a GPT-4-style validation set). Here the two training
sources are English chatbot turns (``chat``) and the same kind of turns in
eight other Latin-script languages (``multilingual``); the validation set
is the held-out English ``chat`` split. The natural mixture (proportional
to the number of pairs) gives ``chat`` less than a third.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataweights.configs import scalebio as configs
from dataweights.experiments.ch1.common import fmt_table, r
from dataweights.experiments.ch4 import common, plots
from dataweights.experiments.registry import Published, register


def run(cfg: configs.TwoSourcesConfig) -> dict[str, Any]:
  """ScaleBiO on ``cfg.sources`` with the validation split of
  ``cfg.valid_sources``."""
  sets = common.pair_sets("train", cfg.sources, cfg.seq_len)
  valid = common.merged(
    common.pair_sets("validation", cfg.valid_sources, cfg.seq_len), "valid"
  )
  res = common.run_scalebio(cfg, sets, valid, every=max(1, cfg.steps // 60))
  lam = res["lambda_SxRxK"]
  sizes = np.array([len(s) for s in sets], np.float64)
  return r(
    {
      "sources": list(cfg.sources),
      "valid_sources": list(cfg.valid_sources),
      "sizes_K": sizes,
      "natural_K": sizes / sizes.sum(),
      "steps_S": res["steps_S"],
      "lambda_SxRxK": lam,
      "final_lambda_RxK": lam[-1],
      "val_loss_SxR": res["val_loss_SxR"],
      "seeds": list(cfg.seeds),
    }
  )


def summary(data: dict[str, Any]) -> str:
  final = np.asarray(data["final_lambda_RxK"])
  rows = []
  for k, name in enumerate(data["sources"]):
    m, h = common.t_interval(final[:, k])
    rows.append(
      [
        name,
        int(data["sizes_K"][k]),
        f"{data['natural_K'][k]:.3f}",
        f"{m:.3f} ± {h:.3f}",
      ]
    )
  return "\n".join(
    [
      f"two sources, validation from {', '.join(data['valid_sources'])} "
      f"(final weights, mean ± 95% t-interval over {final.shape[0]} seeds)",
      fmt_table(["source", "pairs", "natural", "lambda"], rows),
    ]
  )


register(
  Published(
    name="ch4_two_sources",
    chapter="ch4_scalebio",
    run=run,
    make_config=configs.TwoSourcesConfig,
    config=configs.two_sources,
    summary=summary,
    plot=plots.plot_two_sources,
  )
)
