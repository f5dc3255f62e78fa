"""The same method on UCI Adult, domains = the values of a natural column.

L2-regularised logistic regression on the standardised Adult features
(:func:`dataweights.data.tabular.load_adult`); the training domains are the
values of ``cfg.domain_column`` (default ``workclass``), the validation
target is the whole validation split, and we report the test split.
Compared: uniform weights, natural proportions, greedy ``T = 1`` and longer
horizons, all with the same minibatches per step (seeds vmapped).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.experiments.ch1_common import fmt_table, r
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel, mixing


def _loss_M(params, x_MxP, y_M):
  logits_M = x_MxP @ params["w"] + params["b"]
  return jnp.logaddexp(0.0, logits_M) - y_M * logits_M


def build(cfg: mixing_configs.AdultMixingConfig):
  """Adult arrays, the mixing problem and samplers."""
  from dataweights.data import tabular

  d = tabular.load_adult(domain_column=cfg.domain_column)
  tr, va, te = d["train"], d["validation"], d["test"]
  K = len(d["domain_names"])
  x = jnp.asarray(tr["x_MxP"])
  y = jnp.asarray(tr["y_M"], jnp.float32)
  dom = np.asarray(tr["domain_M"])
  counts_K = np.bincount(dom, minlength=K)
  M = int(counts_K.max())
  idx_KxM = np.zeros((K, M), np.int32)
  for k in range(K):
    rows = np.flatnonzero(dom == k)
    idx_KxM[k, : len(rows)] = rows
  idx_KxM = jnp.asarray(idx_KxM)
  n_K = jnp.asarray(counts_K)
  onehot_MxK = jax.nn.one_hot(jnp.asarray(dom), K)
  xv, yv = jnp.asarray(va["x_MxP"]), jnp.asarray(va["y_M"], jnp.float32)
  l2 = cfg.l2

  def domain_losses(params, batch=None):
    if batch is None:
      loss_K = (_loss_M(params, x, y) @ onehot_MxK) / n_K
    else:
      loss_K = jax.vmap(lambda xx, yy: jnp.mean(_loss_M(params, xx, yy)))(
        batch["x"], batch["y"]
      )
    return loss_K + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  def val_loss(params, batch=None):
    xx, yy = (xv, yv) if batch is None else (batch["x"], batch["y"])
    return jnp.mean(_loss_M(params, xx, yy))

  def sampler(T):
    def batch_fn(key):
      u = jax.random.uniform(key, (T, K, cfg.batch_size))
      local = jnp.floor(u * n_K[None, :, None]).astype(jnp.int32)
      rows = idx_KxM[jnp.arange(K)[None, :, None], local]
      return {"x": x[rows], "y": y[rows]}

    return batch_fn

  def val_batch_fn(key):
    i = jax.random.randint(key, (cfg.val_batch_size,), 0, yv.shape[0])
    return {"x": xv[i], "y": yv[i]}

  problem = bilevel.MixingProblem(domain_losses, val_loss)
  test = (jnp.asarray(te["x_MxP"]), jnp.asarray(te["y_M"], jnp.float32))
  return d, problem, sampler, val_batch_fn, counts_K, test


def run(cfg: mixing_configs.AdultMixingConfig) -> dict[str, Any]:
  """Final weights and test metrics per method (mean ± std over seeds)."""
  d, problem, sampler, val_batch_fn, counts_K, (xt, yt) = build(cfg)
  K, P = len(d["domain_names"]), d["train"]["x_MxP"].shape[1]
  S = cfg.seeds
  params_S = {"w": jnp.zeros((S, P)), "b": jnp.zeros((S,))}
  keys = jax.random.split(jax.random.key(0), S)

  def test_metrics(params):
    logits = xt @ params["w"] + params["b"]
    loss = jnp.mean(jnp.logaddexp(0.0, logits) - yt * logits)
    acc = jnp.mean((logits > 0).astype(jnp.float32) == yt)
    return loss, acc

  methods = []

  def record(name, params, w_SxK):
    loss_S, acc_S = jax.vmap(test_metrics)(params)
    w_SxK = np.asarray(w_SxK)
    methods.append(
      {
        "name": name,
        "w_mean": w_SxK.mean(0),
        "w_std": w_SxK.std(0),
        "test_loss_mean": float(np.mean(loss_S)),
        "test_loss_std": float(np.std(loss_S)),
        "test_acc_mean": float(np.mean(acc_S)),
        "test_acc_std": float(np.std(acc_S)),
      }
    )

  chunk = 100 if cfg.budget % 100 == 0 else cfg.budget
  fixed_fn = sampler(chunk)
  for name, w_K in (
    ("uniform", mixing.uniform_weights(K)),
    ("natural", mixing.natural_weights(counts_K)),
  ):

    def fixed(p, k, w_K=w_K):
      return mixing.train_fixed(
        problem, p, w_K, lr=cfg.lr, N=cfg.budget, batch_fn=fixed_fn, key=k
      )[0]

    params = jax.jit(jax.vmap(fixed))(params_S, keys)
    record(name, params, np.broadcast_to(np.asarray(w_K), (S, K)))
  for T in cfg.horizons:
    batch_fn = sampler(T)

    def one(p, k, batch_fn=batch_fn, T=T):
      tr = mixing.run_mixing(
        problem,
        p,
        mixing.uniform_weights(K),
        lr=cfg.lr,
        T=T,
        N=cfg.budget,
        beta=cfg.beta,
        batch_fn=batch_fn,
        val_batch_fn=val_batch_fn,
        key=k,
      )
      return tr.params, tr.w_RxK[-1]

    params, w_SxK = jax.jit(jax.vmap(one))(params_S, keys)
    record(f"mixing T={T}" + (" (greedy)" if T == 1 else ""), params, w_SxK)
  return r(
    {
      "domain_column": cfg.domain_column,
      "domain_names": d["domain_names"],
      "train_counts": counts_K,
      "methods": methods,
    }
  )


def summary(data: dict[str, Any]) -> str:
  """Test metrics per method, then the learned weights per domain."""
  rows = [
    [m["name"], m["test_loss_mean"], m["test_acc_mean"]]
    for m in data["methods"]
  ]
  t1 = fmt_table(["method", "test loss", "test acc"], rows)
  header = ["domain", "n_train"] + [
    m["name"].replace(" (greedy)", "") for m in data["methods"]
  ]
  rows = [
    [name, data["train_counts"][k]] + [m["w_mean"][k] for m in data["methods"]]
    for k, name in enumerate(data["domain_names"])
  ]
  return t1 + "\n\n" + fmt_table(header, rows)


def _plot(data):
  from dataweights.plotting import mixing as plots

  return plots.plot_adult(data)


register(
  Published(
    name="ch1_adult",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.AdultMixingConfig,
    plot=_plot,
  )
)
