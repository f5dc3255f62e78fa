"""Real sources and a target: learned weights, then resample and fine-tune.

ScaleBiO's main use (Pan et al. 2024, Sec. 5.3: ten instruction sources,
weights learned against a target's validation set, then a training set
resampled by the weights and a model fine-tuned on it). Here: the
training sources ``cfg.sources`` of ``dw_instructions`` and a target
source held out of training (default ``news``: sentence -> next sentence
of ABC news); ScaleBiO's validation set is the target's validation split.

Stage 2, for every seed: three training sets of ``cfg.resample_rows``
rows, resampled (:func:`dataweights.data.instructions.resample`) by

* the weights ScaleBiO learned with that seed,
* uniform weights,
* the natural weights (proportional to the sources' sizes),

and the pre-trained model fine-tuned on each for ``cfg.finetune_steps``
steps of ``cfg.batch_size`` rows (the same token budget; one vmapped
program for all nine runs, so the three mixtures of a seed share the
sampling seed: common random numbers). Reported: the target's test loss
(nats per response byte), means with Student-t intervals over seeds and
paired differences against the baselines.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.configs import scalebio as configs
from dataweights.data import instructions as pairs_lib
from dataweights.experiments.ch1.common import fmt_table, r
from dataweights.experiments.ch4 import common, plots
from dataweights.experiments.registry import Published, register

MIXTURES: tuple[str, ...] = ("scalebio", "uniform", "natural")


def run(cfg: configs.MixtureConfig) -> dict[str, Any]:
  """Both stages; see the module docstring."""
  sets = common.pair_sets("train", cfg.sources, cfg.seq_len)
  valid = common.pair_sets("validation", [cfg.target], cfg.seq_len)[0]
  test = common.pair_sets("test", [cfg.target], cfg.seq_len)[0]
  res = common.run_scalebio(cfg, sets, valid, every=max(1, cfg.steps // 60))
  lam_RxK = res["lambda_SxRxK"][-1].astype(np.float64)
  k = len(sets)
  sizes = np.array([len(s) for s in sets], np.float64)
  weights = {
    "uniform": np.full(k, 1.0 / k),
    "natural": sizes / sizes.sum(),
  }
  train_sets, seeds, counts = [], [], {}
  for mix in MIXTURES:
    for i, seed in enumerate(cfg.seeds):
      w = lam_RxK[i] if mix == "scalebio" else weights[mix]
      data, n_K = pairs_lib.resample(
        sets, w / w.sum(), cfg.resample_rows, seed=seed, name=mix
      )
      train_sets.append(data)
      seeds.append(seed)
      counts[f"{mix}/{seed}"] = n_K
  params = common.run_finetune(cfg, train_sets, seeds)
  # The pre-trained model as a tenth run: one evaluation program.
  every = jax.tree.map(
    lambda a, b: jnp.concatenate([a, jnp.asarray(b)[None]]),
    params,
    common.pretrained(cfg)[1],
  )
  loss_all = common.eval_loss(cfg, every, test)
  loss, pretrained_loss = loss_all[:-1], loss_all[-1]
  n = len(cfg.seeds)
  loss_MxR = loss.reshape(len(MIXTURES), n)
  return r(
    {
      "sources": list(cfg.sources),
      "target": cfg.target,
      "sizes_K": sizes,
      "natural_K": weights["natural"],
      "steps_S": res["steps_S"],
      "lambda_SxRxK": res["lambda_SxRxK"],
      "final_lambda_RxK": lam_RxK,
      "val_loss_SxR": res["val_loss_SxR"],
      "mixtures": list(MIXTURES),
      "test_loss_MxR": loss_MxR,
      "pretrained_test_loss": pretrained_loss,
      "rows_per_source": {key: v.tolist() for key, v in counts.items()},
      "response_tokens": {
        f"{mix}/{seed}": s.response_tokens()
        for (mix, seed), s in zip(
          [(m, sd) for m in MIXTURES for sd in cfg.seeds], train_sets
        )
      },
      "test_pairs": len(test),
      "seeds": list(cfg.seeds),
    }
  )


def summary(data: dict[str, Any]) -> str:
  lam = np.asarray(data["final_lambda_RxK"])
  rows = []
  for k, name in enumerate(data["sources"]):
    m, h = common.t_interval(lam[:, k])
    rows.append(
      [
        name,
        int(data["sizes_K"][k]),
        f"{data['natural_K'][k]:.3f}",
        f"{m:.3f} ± {h:.3f}",
      ]
    )
  loss = np.asarray(data["test_loss_MxR"])
  lrows = []
  for i, mix in enumerate(data["mixtures"]):
    m, h = common.t_interval(loss[i])
    lrows.append([mix, f"{m:.4f} ± {h:.4f}"])
  drows = []
  for i, mix in enumerate(data["mixtures"][1:], start=1):
    m, h = common.t_interval(loss[0] - loss[i])
    drows.append([f"scalebio - {mix}", f"{m:+.4f} ± {h:.4f}"])
  return "\n".join(
    [
      f"target {data['target']!r} (held out of training); learned weights "
      f"(mean ± 95% t-interval over {lam.shape[0]} seeds)",
      fmt_table(["source", "pairs", "natural", "lambda"], rows),
      f"target test loss after fine-tuning (nats/byte, {data['test_pairs']} "
      f"pairs; pre-trained model {data['pretrained_test_loss']:.4f})",
      fmt_table(["mixture", "loss"], lrows),
      fmt_table(["paired difference", "loss"], drows),
    ]
  )


register(
  Published(
    name="ch4_mixture",
    chapter="ch4_scalebio",
    run=run,
    make_config=configs.MixtureConfig,
    config=configs.mixture,
    summary=summary,
    plot=plots.plot_mixture,
  )
)
