"""Chapter 3's published results: text, digits, noisy labels, SAR/GAR.

Every result is ``run(cfg) -> dict`` over the runs of
:func:`dataweights.experiments.ch3.common.run_method` (memoised, so the
SAR/GAR scatter reuses the other sections' runs), a ``summary(data)``
table, and a plot in :mod:`dataweights.experiments.ch3.plots`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from scipy import stats

from dataweights.configs import filtering as fcfg
from dataweights.experiments.ch1.common import fmt_table, r
from dataweights.experiments.ch3 import common, plots, tasks
from dataweights.experiments.registry import Published, register
from dataweights.methods import diagnostics
from dataweights.train import filtering as F


def _runs(task, cfg, methods) -> dict[str, list[common.RunResult]]:
  return {
    m: [common.run_method(task, m, cfg, seed) for seed in range(cfg.seeds)]
    for m in methods
  }


def _curves(runs) -> dict[str, Any]:
  out = {}
  for m, rs in runs.items():
    out[m] = {"steps": rs[0].steps}
    for k in rs[0].curves:
      out[m][k] = np.mean([res.curves[k] for res in rs], 0)
  return out


def _makeup(runs, names, steps) -> dict[str, Any]:
  mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:])]
  return {
    "domains": list(names),
    "steps": mids,
    "fractions": {
      m: np.mean([res.makeup for res in rs], 0) for m, rs in runs.items()
    },
  }


def _fmt(mean: float, ci: float) -> str:
  return f"{mean:.3f} ± {ci:.3f}"


def _table_summary(rows, keys_labels, ft=True) -> str:
  header = ["method"]
  for _, label in keys_labels:
    header += [label, f"Δ {label} vs base"]
    if ft:
      header += [f"{label} (ft)"]
  out = []
  for row in rows:
    line = [row["method"]]
    for k, _ in keys_labels:
      line.append(_fmt(row[f"pre/{k}"], row[f"pre/{k}/ci"]))
      if row["method"] == "base":
        line.append("-")
      else:
        line.append(_fmt(row[f"pre/{k}/vs_base"], row[f"pre/{k}/vs_base_ci"]))
      if ft:
        line.append(_fmt(row[f"ft/{k}"], row[f"ft/{k}/ci"]))
    out.append(line)
  return fmt_table(header, out)


# ---------------------------------------------------------------- text --


def run_lm(cfg: fcfg.FilterLMConfig) -> dict[str, Any]:
  """The language-modelling table, learning curves and batch make-up."""
  task = tasks.lm_task(cfg)
  runs = _runs(task, cfg, cfg.methods)
  rows = common.table(runs, ("spec_test", "gen_test"))
  steps = runs["base"][0].steps
  return r(
    {
      "target": cfg.target,
      "methods": list(cfg.methods),
      "seeds": cfg.seeds,
      "table": rows,
      "curves": _curves(runs),
      "makeup": _makeup(runs, task.domain_names, steps),
      "ft_steps": {m: [res.ft_step for res in rs] for m, rs in runs.items()},
    }
  )


def summary_lm(data: dict[str, Any]) -> str:
  """Held-out specific and generic loss (nats/byte), ± 95% intervals."""
  return (
    f"target: {data['target']} ({data['seeds']} seeds; mean ± 95% t-interval; "
    "Δ = paired difference from base)\n"
    + _table_summary(
      data["table"], (("spec_test", "specific"), ("gen_test", "generic"))
    )
  )


register(
  Published(
    name="ch3_lm",
    chapter="ch3_filtering",
    run=run_lm,
    make_config=fcfg.FilterLMConfig,
    plot=plots.plot_lm,
    config=fcfg.filter_lm,
    summary=summary_lm,
  )
)


# -------------------------------------------------------------- digits --


def run_digits(cfg: fcfg.FilterImageConfig) -> dict[str, Any]:
  """The digits table (MNIST -> a UCI target) and learning curves."""
  task = tasks.image_task(cfg)
  runs = _runs(task, cfg, cfg.methods)
  rows = common.table(runs, ("spec_test", "acc/spec_test", "gen_test"))
  return r(
    {
      "target": cfg.target,
      "methods": list(cfg.methods),
      "seeds": cfg.seeds,
      "table": rows,
      "curves": _curves(runs),
      "makeup": _makeup(runs, task.domain_names, runs["base"][0].steps),
    }
  )


def summary_digits(data: dict[str, Any]) -> str:
  """Held-out target loss and accuracy, generic (MNIST) loss."""
  return (
    f"target: {data['target']} ({data['seeds']} seeds; mean ± 95% t-interval; "
    "Δ = paired difference from base)\n"
    + _table_summary(
      data["table"],
      (
        ("spec_test", "target loss"),
        ("acc/spec_test", "target acc"),
        ("gen_test", "MNIST loss"),
      ),
    )
  )


register(
  Published(
    name="ch3_digits",
    chapter="ch3_filtering",
    run=run_digits,
    make_config=fcfg.FilterImageConfig,
    plot=plots.plot_digits,
    config=fcfg.filter_images,
    summary=summary_digits,
  )
)


# --------------------------------------------------------- noisy labels --

NOISE_RATES: tuple[float, ...] = (0.2, 0.4)


def run_noisy(cfg: fcfg.FilterImageConfig) -> dict[str, Any]:
  """AUROC of w_φ (clean vs corrupted) over training and clean accuracy,
  for label-noise rates 0.2 and 0.4 (``cfg.target`` is ignored)."""
  out = {
    "rates": list(NOISE_RATES),
    "methods": list(cfg.methods),
    "seeds": cfg.seeds,
  }
  for rate in NOISE_RATES:
    c = fcfg.filter_images(
      cfg.profile, **{**_fields(cfg), "target": f"noisy_{rate}"}
    )
    task = tasks.image_task(c)
    runs = _runs(task, c, cfg.methods)
    res = {"steps": runs["base"][0].steps, "auroc": {}, "kept_corrupted": {}}
    for m, rs in runs.items():
      if rs[0].auroc is not None and not np.isnan(rs[0].auroc[-1]):
        res["auroc"][m] = np.mean([x.auroc for x in rs], 0)
      res["kept_corrupted"][m] = np.mean([x.kept_flag for x in rs], 0)
    res["auroc"]["small loss (base model)"] = np.mean(
      [x.auroc_loss for x in runs["base"]], 0
    )
    res["table"] = common.table(runs, ("acc/spec_test", "spec_test"))
    res["final_auroc"] = {
      m: common.mean_ci([x.auroc[-1] for x in rs])
      for m, rs in runs.items()
      if rs[0].auroc is not None and not np.isnan(rs[0].auroc[-1])
    }
    out[str(rate)] = res
  return r(out)


def _fields(cfg) -> dict[str, Any]:
  return {
    f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f != "profile"
  }


def summary_noisy(data: dict[str, Any]) -> str:
  """Clean test accuracy, kept corrupted fraction and final AUROC."""
  parts = []
  for rate in data["rates"]:
    d = data[str(rate)]
    rows = []
    for row in d["table"]:
      m = row["method"]
      au = d["final_auroc"].get(m)
      rows.append(
        [
          m,
          _fmt(row["pre/acc/spec_test"], row["pre/acc/spec_test/ci"]),
          "-"
          if m == "base"
          else _fmt(
            row["pre/acc/spec_test/vs_base"],
            row["pre/acc/spec_test/vs_base_ci"],
          ),
          f"{d['kept_corrupted'][m][-1]:.2f}",
          "-" if au is None else _fmt(*au),
        ]
      )
    parts.append(
      f"label noise {rate}: {data['seeds']} seeds, mean ± 95% t-interval\n"
      + fmt_table(
        [
          "method",
          "clean test acc",
          "Δ acc vs base",
          "kept corrupted (last)",
          "AUROC w_φ (last)",
        ],
        rows,
      )
    )
  return "\n\n".join(parts)


register(
  Published(
    name="ch3_noisy",
    chapter="ch3_filtering",
    run=run_noisy,
    make_config=fcfg.FilterImageConfig,
    plot=plots.plot_noisy,
    config=fcfg.noisy_labels,
    summary=summary_noisy,
  )
)


# -------------------------------------------------------------- SAR/GAR --


def _sar_gar(task, runs, rows: int) -> dict[str, float]:
  """SAR / GAR of each base run's final model, averaged over seeds; at most
  ``rows`` evaluated examples per population."""
  spec_ref, gen_ref, spec_ev, gen_ev = task.sar_batches
  spec_ev = {k: v[:rows] for k, v in spec_ev.items()}
  gen_ev = {k: v[:rows] for k, v in gen_ev.items()}
  trainer = common.make_trainer(task, F.Base(), task.train_cfg(0))
  graphdef, model_state = trainer.static.graphdef, trainer.state.model_state

  @jax.jit
  def rates(params):
    def loss_B(p, b):
      return task.loss_fn(
        nnx.merge(graphdef, p, model_state, copy=True), b, None
      )

    return diagnostics.alignment_rates(
      loss_B,
      params,
      specific_ref=spec_ref,
      generic_ref=gen_ref,
      specific_eval=spec_ev,
      generic_eval=gen_ev,
    )

  vals = [jax.device_get(rates(res.params)) for res in runs["base"]]
  return {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}


def _image_config(profile: str, target: str) -> fcfg.FilterImageConfig:
  """The config a digits target runs with elsewhere in the chapter (so its
  runs are shared); targets only used here skip fine-tuning."""
  if target.startswith("noisy_"):
    return fcfg.noisy_labels(profile, target=target)
  if target == fcfg.filter_images(profile).target:
    return fcfg.filter_images(profile)
  return fcfg.filter_images(profile, target=target, finetune_steps=0)


def run_sargar(cfg: fcfg.SarGarConfig) -> dict[str, Any]:
  """SAR, GAR and the best selection method's relative gain per target."""
  targets = []
  sel = ("base",) + fcfg.SELECTION_METHODS
  for kind, names in (
    ("text", cfg.text_targets),
    ("digits", cfg.image_targets),
  ):
    for t in names:
      if kind == "text":
        c = fcfg.filter_lm(cfg.profile, target=t)
        task = tasks.lm_task(c)
      else:
        c = _image_config(cfg.profile, t)
        task = tasks.image_task(c)
      runs = _runs(task, c, sel)
      base = np.array([x.final["spec_test"] for x in runs["base"]])
      gains = {
        m: (base - np.array([x.final["spec_test"] for x in runs[m]])) / base
        for m in fcfg.SELECTION_METHODS
      }
      best = max(gains, key=lambda m: gains[m].mean())
      g, ci = common.mean_ci(gains[best])
      targets.append(
        {
          "target": f"{kind}:{t}",
          **_sar_gar(task, runs, cfg.rows),
          "best": best,
          "gain": g,
          "gain_ci": ci,
          "gains": {m: float(v.mean()) for m, v in gains.items()},
        }
      )
  sar = [t["sar"] for t in targets]
  gar = [t["gar"] for t in targets]
  gain = [t["gain"] for t in targets]
  return r(
    {
      "targets": targets,
      "spearman_sar": float(stats.spearmanr(sar, gain).statistic),
      "spearman_gar": float(stats.spearmanr(gar, gain).statistic),
      "spearman_sar_minus_gar": float(
        stats.spearmanr(np.array(sar) - np.array(gar), gain).statistic
      ),
    }
  )


def summary_sargar(data: dict[str, Any]) -> str:
  """SAR, GAR, best method and its relative gain per target."""
  rows = [
    [
      t["target"],
      f"{t['sar']:.2f}",
      f"{t['gar']:.2f}",
      t["best"],
      f"{100 * t['gain']:+.1f}% ± {100 * t['gain_ci']:.1f}",
    ]
    for t in data["targets"]
  ]
  return (
    fmt_table(["target", "SAR", "GAR", "best method", "gain over base"], rows)
    + f"\nSpearman(SAR, gain) = {data['spearman_sar']:+.2f}; "
    f"Spearman(GAR, gain) = {data['spearman_gar']:+.2f}; "
    f"Spearman(SAR - GAR, gain) = {data['spearman_sar_minus_gar']:+.2f}"
  )


register(
  Published(
    name="ch3_sargar",
    chapter="ch3_filtering",
    run=run_sargar,
    make_config=fcfg.SarGarConfig,
    plot=plots.plot_sargar,
    config=fcfg.sar_gar,
    summary=summary_sargar,
  )
)
