"""The same method on UCI Adult, domains = the values of a natural column.

L2-regularised logistic regression on the standardised Adult features
(:func:`dataweights.data.prepared.load_adult`, the domain column itself is
not a feature); the training domains are the values of
``cfg.domain_column`` (default ``workclass``). Two targets
(``cfg.targets``):

* ``all``: validation and test are the whole splits, i.e. the natural
  mixture of the domains;
* ``smallest2``: validation and test are the rows of the two smallest
  training domains only, a target that differs from the training mixture
  (chosen by this rule before looking at any result).

Methods, all with ``cfg.seeds`` seeds: fixed weights (uniform, natural
proportions, and for ``smallest2`` the target domains in proportion to
their sizes), mixing with fixed horizons ``cfg.horizons`` and with the
adaptive horizon ``T_r = 1 + growth · r``. All of them draw, at step n of
seed s, the same per-domain minibatches (``batch_size`` rows per domain;
common random numbers via :func:`dataweights.methods.mixing.run_mixing_schedule`).
``natural (pooled)`` instead draws ``K · batch_size`` rows i.i.d. from the
pooled training set: the natural mixture without the variance of putting
most of the weight on ``batch_size`` rows. Results are test metrics and
paired differences with the pooled natural baseline (Student-t
intervals over seeds, ddof = 1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.experiments.ch1 import tstar as ts
from dataweights.experiments.ch1.common import fmt_table, r
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel, mixing

POOLED = "natural (pooled)"


def _loss_M(params, x_MxP, y_M):
  logits_M = x_MxP @ params["w"] + params["b"]
  return jnp.logaddexp(0.0, logits_M) - y_M * logits_M


def target_domains(target: str, counts_K: np.ndarray) -> np.ndarray:
  """Domain ids of a target: all, or the two smallest by training count."""
  if target == "all":
    return np.arange(len(counts_K))
  if target == "smallest2":
    return np.sort(np.argsort(counts_K, kind="stable")[:2])
  raise ValueError(
    f"target = {target!r} is invalid; allowed: {mixing_configs.ADULT_TARGETS}"
  )


def build(
  cfg: mixing_configs.AdultMixingConfig, d: dict[str, Any], target: str
):
  """The mixing problem, samplers and test arrays of one target."""
  tr, va, te = d["train"], d["validation"], d["test"]
  K = len(d["domain_names"])
  x = jnp.asarray(tr["x_MxP"])
  y = jnp.asarray(tr["y_M"], jnp.float32)
  dom = np.asarray(tr["domain_M"])
  counts_K = np.bincount(dom, minlength=K)
  idx_KxM = np.zeros((K, int(counts_K.max())), np.int32)
  for k in range(K):
    rows = np.flatnonzero(dom == k)
    idx_KxM[k, : len(rows)] = rows
  idx_KxM, n_K = jnp.asarray(idx_KxM), jnp.asarray(counts_K)
  tgt = target_domains(target, counts_K)
  sel_v = np.isin(va["domain_M"], tgt)
  sel_t = np.isin(te["domain_M"], tgt)
  xv, yv = (
    jnp.asarray(va["x_MxP"][sel_v]),
    jnp.asarray(va["y_M"][sel_v], jnp.float32),
  )
  xt, yt = (
    jnp.asarray(te["x_MxP"][sel_t]),
    jnp.asarray(te["y_M"][sel_t], jnp.float32),
  )
  l2 = cfg.l2

  def domain_losses(params, batch=None):
    if batch is None:
      raise ValueError("the Adult problem is minibatch only; pass a batch")
    loss_K = jax.vmap(lambda xx, yy: jnp.mean(_loss_M(params, xx, yy)))(
      batch["x"], batch["y"]
    )
    return loss_K + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  def pooled_losses(params, batch=None):
    loss = jnp.mean(_loss_M(params, batch["x"], batch["y"]))
    return (loss + 0.5 * l2 * jnp.sum(params["w"] ** 2))[None]

  def val_loss(params, batch=None):
    xx, yy = (xv, yv) if batch is None else (batch["x"], batch["y"])
    return jnp.mean(_loss_M(params, xx, yy))

  def step_batch_fn(key):
    u_KxB = jax.random.uniform(key, (K, cfg.batch_size))
    local = jnp.floor(u_KxB * n_K[:, None]).astype(jnp.int32)
    rows = idx_KxM[jnp.arange(K)[:, None], local]
    return {"x": x[rows], "y": y[rows]}

  def pooled_batch_fn(key):
    rows = jax.random.randint(key, (K * cfg.batch_size,), 0, y.shape[0])
    return {"x": x[rows], "y": y[rows]}

  def val_batch_fn(key):
    i = jax.random.randint(key, (cfg.val_batch_size,), 0, yv.shape[0])
    return {"x": xv[i], "y": yv[i]}

  return {
    "problem": bilevel.MixingProblem(domain_losses, val_loss),
    "pooled": bilevel.MixingProblem(pooled_losses, val_loss),
    "step_batch_fn": step_batch_fn,
    "pooled_batch_fn": pooled_batch_fn,
    "val_batch_fn": val_batch_fn,
    "test": (xt, yt),
    "counts_K": counts_K,
    "target_ids": tgt,
    "n_val": int(sel_v.sum()),
    "n_test": int(sel_t.sum()),
  }


def _test_metrics(params, xt, yt):
  logits = xt @ params["w"] + params["b"]
  loss = jnp.mean(jnp.logaddexp(0.0, logits) - yt * logits)
  acc = jnp.mean((logits > 0).astype(jnp.float32) == yt)
  return loss, acc


def run_target(
  cfg: mixing_configs.AdultMixingConfig, d: dict[str, Any], target: str
) -> dict[str, Any]:
  """Every method on one target; per-seed test loss, accuracy, weights."""
  b = build(cfg, d, target)
  K, P = len(d["domain_names"]), d["train"]["x_MxP"].shape[1]
  params0 = {"w": jnp.zeros((P,)), "b": jnp.zeros(())}
  keys = jax.random.split(jax.random.key(0), cfg.seeds)
  xt, yt = b["test"]
  counts = b["counts_K"]

  def metrics(tr):
    loss, acc = _test_metrics(jax.tree.map(lambda a: a[0], tr.params_B), xt, yt)
    return loss, acc, tr.val_loss_B[0], tr.w_BxK[0]

  fixed = {"uniform": np.full(K, 1.0 / K), "natural": counts / counts.sum()}
  if target != "all":
    only = np.zeros(K)
    only[b["target_ids"]] = counts[b["target_ids"]]
    fixed["target domains only"] = only / only.sum()
  w_MxK = jnp.asarray(np.stack(list(fixed.values())), jnp.float32)

  def fixed_lane(w0, key):
    return metrics(
      mixing.run_mixing_schedule(
        b["problem"],
        params0,
        w0,
        lr=cfg.lr,
        beta=cfg.beta,
        budgets=cfg.budget,
        T0=1,
        step_batch_fn=b["step_batch_fn"],
        key=key,
        update_weights=False,
        check_finite=False,
      )
    )

  def pooled_lane(key):
    return metrics(
      mixing.run_mixing_schedule(
        b["pooled"],
        params0,
        jnp.ones(1),
        lr=cfg.lr,
        beta=cfg.beta,
        budgets=cfg.budget,
        T0=1,
        step_batch_fn=b["pooled_batch_fn"],
        key=key,
        update_weights=False,
        check_finite=False,
      )
    )

  T0 = np.array(list(cfg.horizons) + [1], np.float32)
  growth = np.array([0.0] * len(cfg.horizons) + [cfg.growth], np.float32)

  def mix_lane(t0, c, key):
    return metrics(
      mixing.run_mixing_schedule(
        b["problem"],
        params0,
        mixing.uniform_weights(K),
        lr=cfg.lr,
        beta=cfg.beta,
        budgets=cfg.budget,
        T0=t0,
        T_growth=c,
        step_batch_fn=b["step_batch_fn"],
        val_batch_fn=b["val_batch_fn"],
        key=key,
        check_finite=False,
      )
    )

  inner = lambda f: jax.vmap(f, in_axes=(0, None))  # noqa: E731
  res_fixed = jax.jit(jax.vmap(inner(fixed_lane), in_axes=(None, 0)))(
    w_MxK, keys
  )
  res_pooled = jax.jit(jax.vmap(pooled_lane))(keys)
  res_mix = jax.jit(
    jax.vmap(jax.vmap(mix_lane, in_axes=(0, 0, None)), in_axes=(None, None, 0))
  )(jnp.asarray(T0), jnp.asarray(growth), keys)
  names = (
    list(fixed)
    + [POOLED]
    + [f"T={T}" for T in cfg.horizons]
    + [f"adaptive c={cfg.growth:g}"]
  )
  pooled_w = np.broadcast_to(counts / counts.sum(), (cfg.seeds, 1, K))
  loss_SxM = np.concatenate(
    [
      np.asarray(res_fixed[0]),
      np.asarray(res_pooled[0])[:, None],
      np.asarray(res_mix[0]),
    ],
    axis=1,
  ).astype(np.float64)
  acc_SxM = np.concatenate(
    [
      np.asarray(res_fixed[1]),
      np.asarray(res_pooled[1])[:, None],
      np.asarray(res_mix[1]),
    ],
    axis=1,
  ).astype(np.float64)
  val_SxM = np.concatenate(
    [
      np.asarray(res_fixed[2]),
      np.asarray(res_pooled[2])[:, None],
      np.asarray(res_mix[2]),
    ],
    axis=1,
  ).astype(np.float64)
  w_SxMxK = np.concatenate(
    [np.asarray(res_fixed[3]), pooled_w, np.asarray(res_mix[3])], axis=1
  )
  if not np.all(np.isfinite(loss_SxM)):
    raise FloatingPointError(
      f"an Adult run diverged on target {target!r}; lower beta or lr"
    )
  ref = names.index(POOLED)
  methods = []
  for m, name in enumerate(names):
    lm, llo, lhi = ts.mean_ci(loss_SxM[:, m], cfg.level)
    am, alo, ahi = ts.mean_ci(acc_SxM[:, m], cfg.level)
    dm, dlo, dhi = ts.mean_ci(loss_SxM[:, m] - loss_SxM[:, ref], cfg.level)
    methods.append(
      {
        "name": name,
        "w_mean": w_SxMxK[:, m].mean(0),
        "w_sd": w_SxMxK[:, m].std(0, ddof=1),
        "test_loss": lm,
        "test_loss_lo": llo,
        "test_loss_hi": lhi,
        "test_acc": am,
        "test_acc_lo": alo,
        "test_acc_hi": ahi,
        "val_loss": float(val_SxM[:, m].mean()),
        "diff_vs_pooled": dm,
        "diff_lo": dlo,
        "diff_hi": dhi,
      }
    )
  first_T = names.index(f"T={cfg.horizons[0]}")
  fixed_T = range(first_T, first_T + len(cfg.horizons))
  best = min(fixed_T, key=lambda m: val_SxM[:, m].mean())
  ad = len(names) - 1
  dm, dlo, dhi = ts.mean_ci(loss_SxM[:, ad] - loss_SxM[:, best], cfg.level)
  return {
    "target": target,
    "target_domains": [d["domain_names"][k] for k in b["target_ids"]],
    "n_val": b["n_val"],
    "n_test": b["n_test"],
    "methods": methods,
    "best_T": names[best],
    "adaptive_minus_best_T": [dm, dlo, dhi],
  }


def run(cfg: mixing_configs.AdultMixingConfig) -> dict[str, Any]:
  """Every target; JSON-able dict."""
  from dataweights.data import prepared

  d = prepared.load_adult(domain_column=cfg.domain_column)
  counts = np.bincount(d["train"]["domain_M"], minlength=len(d["domain_names"]))
  return r(
    {
      "domain_column": cfg.domain_column,
      "domain_names": d["domain_names"],
      "train_counts": counts,
      "seeds": cfg.seeds,
      "level": cfg.level,
      "budget": cfg.budget,
      "targets": [run_target(cfg, d, t) for t in cfg.targets],
    }
  )


def summary(data: dict[str, Any]) -> str:
  """Per target: test loss and the paired difference with the pooled baseline."""
  pct = int(round(100 * data["level"]))
  lines = []
  for t in data["targets"]:
    rows = [
      [
        m["name"],
        f"{m['test_loss']:.4f}",
        f"{m['test_acc']:.3f}",
        f"{m['diff_vs_pooled']:+.4f} [{m['diff_lo']:+.4f}, {m['diff_hi']:+.4f}]",
      ]
      for m in t["methods"]
    ]
    lines.append(
      f"target {t['target']} ({', '.join(t['target_domains'])}; "
      f"{t['n_val']} validation, {t['n_test']} test rows), {data['seeds']} seeds"
    )
    lines.append(
      fmt_table(
        ["method", "test loss", "test acc", f"minus {POOLED} ({pct}% CI)"], rows
      )
    )
    dm, dlo, dhi = t["adaptive_minus_best_T"]
    lines.append(
      f"best fixed horizon on validation: {t['best_T']}; adaptive minus it: "
      f"{dm:+.4f} [{dlo:+.4f}, {dhi:+.4f}]"
    )
    names = [
      m["name"] for m in t["methods"] if m["name"] not in ("uniform", POOLED)
    ]
    rows = [
      [name, data["train_counts"][k]]
      + [f"{m['w_mean'][k]:.3f}" for m in t["methods"] if m["name"] in names]
      for k, name in enumerate(data["domain_names"])
    ]
    lines.append(fmt_table(["domain", "n_train"] + names, rows))
    lines.append("")
  return "\n".join(lines).rstrip()


def _plot(data):
  from dataweights.experiments.ch1 import plots

  return plots.plot_adult(data)


register(
  Published(
    name="ch1_adult",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.AdultMixingConfig,
    config=mixing_configs.adult_mixing,
    summary=summary,
    plot=_plot,
  )
)
