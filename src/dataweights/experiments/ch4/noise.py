"""Noise ordering: one source in partitions with more and more "." answers.

ScaleBiO's first experiment (Pan et al. 2024, Sec. 5.1: Alpaca in 10
partitions, responses replaced by "." at a rate rising with the partition).
Here the source is ``cfg.source`` of ``dw_instructions`` (default the
Friends dialogue pairs), its training pairs shuffled and dealt into
``cfg.partitions`` partitions; partition ``i`` has exactly
``round(r_i M_i)`` responses replaced by "." with ``r_i = i / (P - 1)``
(:func:`dataweights.data.instructions.noisy_partitions`). The validation
set is the source's clean validation split. ScaleBiO learns one weight per
partition, one run per seed (batches drawn uniformly over partitions).

Reported: the weights over training, the final weights against the noise
rate, Spearman's rho between them per seed (the claim: rho <= -0.9, fully
corrupted partitions near 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from dataweights.configs import scalebio as configs
from dataweights.data import instructions as pairs_lib
from dataweights.experiments.ch1.common import fmt_table, r
from dataweights.experiments.ch4 import common, plots
from dataweights.experiments.registry import Published, register


def run(cfg: configs.NoiseOrderingConfig) -> dict[str, Any]:
  """ScaleBiO on the noisy partitions; see the module docstring."""
  from dataweights.data.sources.instructions import SOURCE_NAMES

  split = common._split("train")
  rows = np.flatnonzero(split["source_M"] == SOURCE_NAMES.index(cfg.source))
  rates = np.linspace(0.0, 1.0, cfg.partitions)
  sets, masks = pairs_lib.noisy_partitions(
    [split["prompt"][i] for i in rows],
    [split["response"][i] for i in rows],
    rates,
    cfg.seq_len,
    seed=0,
  )
  valid = common.pair_sets("validation", [cfg.source], cfg.seq_len)[0]
  every = max(1, cfg.steps // 60)
  res = common.run_scalebio(cfg, sets, valid, every=every)
  lam = res["lambda_SxRxK"]
  final_RxK = lam[-1]
  rho_R = [stats.spearmanr(rates, f).statistic for f in final_RxK]
  return r(
    {
      "source": cfg.source,
      "rates_K": rates,
      "sizes_K": [len(s) for s in sets],
      "replaced_K": [int(m.sum()) for m in masks],
      "steps_S": res["steps_S"],
      "lambda_mean_SxK": lam.mean(axis=1),
      "lambda_SxRxK": lam,
      "final_lambda_RxK": final_RxK,
      "spearman_R": rho_R,
      "val_loss_SxR": res["val_loss_SxR"],
      "seeds": list(cfg.seeds),
    }
  )


def summary(data: dict[str, Any]) -> str:
  final = np.asarray(data["final_lambda_RxK"])
  rows = []
  for k, rate in enumerate(data["rates_K"]):
    m, h = common.t_interval(final[:, k])
    rows.append(
      [
        f"{rate:.2f}",
        data["replaced_K"][k],
        data["sizes_K"][k],
        f"{m:.3f} ± {h:.3f}",
      ]
    )
  rho = np.asarray(data["spearman_R"])
  lines = [
    f"noise ordering on {data['source']!r}: final weights (mean ± 95% t-interval over {final.shape[0]} seeds)",
    fmt_table(["rate", "replaced", "pairs", "lambda"], rows),
    "Spearman rho(rate, lambda) per seed: "
    + ", ".join(f"{x:.3f}" for x in rho),
    f"fully corrupted partition: lambda = {final[:, -1].mean():.4f} (uniform start {1 / final.shape[1]:.3f})",
  ]
  return "\n".join(lines)


register(
  Published(
    name="ch4_noise",
    chapter="ch4_scalebio",
    run=run,
    make_config=configs.NoiseOrderingConfig,
    config=configs.noise_ordering,
    summary=summary,
    plot=plots.plot_noise,
  )
)
