"""Figure 2 style: loss, accuracy and w_2 against T with minibatch gradients.

Three Gaussian classification domains
(:func:`dataweights.data.synthetic.classification_domains`), L2-regularised
logistic regression, per-domain minibatches and a validation minibatch per
hypergradient. Runs proceed in jitted chunks of ``cfg.chunk`` steps
(vmapped over seeds) so that every budget in ``cfg.budgets`` is read off
one run per T. Baselines: uniform and natural (pool-size) weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.data import synthetic as syn
from dataweights.experiments.ch1_common import fmt_table, r
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel, mixing


def _metrics(val_loss, data, params_S):
  acc = jax.vmap(lambda p: syn.accuracy(p, data["x_val_MxD"], data["y_val_M"]))
  return np.asarray(
    jax.vmap(lambda p: val_loss(p, None))(params_S)
  ), np.asarray(acc(params_S))


def run(cfg: mixing_configs.HorizonMinibatchConfig) -> dict[str, Any]:
  """Per (N, T): val loss, accuracy and w_2 over seeds; baselines."""
  key = jax.random.key(0)
  k_data, k_runs = jax.random.split(key)
  g = syn.classification_domains(cfg.dim)
  data = syn.make_datasets(g, k_data, cfg.pool_sizes, cfg.n_val)
  domain_losses, val_loss = syn.logistic_losses(data, cfg.l2)
  problem = bilevel.MixingProblem(domain_losses, val_loss)
  val_batch_fn = syn.val_sampler(data, cfg.val_batch_size)
  K, S = 3, cfg.seeds
  params_S = jax.tree.map(
    lambda x: jnp.broadcast_to(x, (S, *x.shape)), syn.logistic_params(cfg.dim)
  )
  seed_keys = jax.random.split(k_runs, S)
  n_chunks = max(cfg.budgets) // cfg.chunk

  def chunked(step_fn, state):
    """Runs ``n_chunks`` chunks; returns metrics after each budget."""
    out = {}
    for c in range(n_chunks):
      keys = jax.vmap(lambda k, c=c: jax.random.fold_in(k, c))(seed_keys)
      state = step_fn(state, keys)
      N = (c + 1) * cfg.chunk
      if N in cfg.budgets:
        loss_S, acc_S = _metrics(val_loss, data, state[0])
        out[N] = (loss_S, acc_S, np.asarray(state[1]))
    return out

  results = {}
  for T in cfg.horizons:
    batch_fn = syn.minibatch_sampler(data, cfg.batch_size, T)

    def one(p, w, k, batch_fn=batch_fn, T=T):
      tr = mixing.run_mixing(
        problem,
        p,
        w,
        lr=cfg.lr,
        T=T,
        N=cfg.chunk,
        beta=cfg.beta,
        batch_fn=batch_fn,
        val_batch_fn=val_batch_fn,
        key=k,
      )
      return tr.params, tr.w_RxK[-1]

    step = jax.jit(jax.vmap(one))
    w0 = jnp.broadcast_to(mixing.uniform_weights(K), (S, K))
    results[T] = chunked(
      lambda st, k, step=step: step(st[0], st[1], k), (params_S, w0)
    )

  baselines = {}
  batch_fn = syn.minibatch_sampler(data, cfg.batch_size, cfg.chunk)
  for name, w_K in (
    ("uniform", mixing.uniform_weights(K)),
    ("natural", mixing.natural_weights(cfg.pool_sizes)),
  ):

    def fixed(p, k, w_K=w_K):
      params, _ = mixing.train_fixed(
        problem, p, w_K, lr=cfg.lr, N=cfg.chunk, batch_fn=batch_fn, key=k
      )
      return params

    step = jax.jit(jax.vmap(fixed))
    w_S = jnp.broadcast_to(w_K, (S, K))
    baselines[name] = chunked(
      lambda st, k, step=step, w_S=w_S: (step(st[0], k), w_S), (params_S, w_S)
    )

  per_budget = []
  for N in cfg.budgets:
    entry = {"N": N}
    for field, i in (("val", 0), ("acc", 1)):
      entry[f"{field}_mean"] = [
        float(results[T][N][i].mean()) for T in cfg.horizons
      ]
      entry[f"{field}_std"] = [
        float(results[T][N][i].std()) for T in cfg.horizons
      ]
    entry["w2_mean"] = [
      float(results[T][N][2][:, 1].mean()) for T in cfg.horizons
    ]
    entry["w2_std"] = [
      float(results[T][N][2][:, 1].std()) for T in cfg.horizons
    ]
    entry["w_mean_TxK"] = [results[T][N][2].mean(0) for T in cfg.horizons]
    best = int(np.argmin(entry["val_mean"]))
    entry["best_T"] = cfg.horizons[best]
    for name in baselines:
      loss_S, acc_S, _ = baselines[name][N]
      entry[name] = {
        "val_mean": float(loss_S.mean()),
        "val_std": float(loss_S.std()),
        "acc_mean": float(acc_S.mean()),
        "acc_std": float(acc_S.std()),
      }
    per_budget.append(entry)
  return r(
    {
      "horizons": list(cfg.horizons),
      "seeds": S,
      "budgets": per_budget,
      "natural_w": np.asarray(mixing.natural_weights(cfg.pool_sizes)),
    }
  )


def summary(data: dict[str, Any]) -> str:
  """Per budget: greedy, best T and the baselines (mean over seeds)."""
  rows = []
  for b in data["budgets"]:
    i = data["horizons"].index(b["best_T"])
    j = data["horizons"].index(data["horizons"][0])
    rows.append(
      [
        b["N"],
        f"T={data['horizons'][j]}",
        b["val_mean"][j],
        b["acc_mean"][j],
        b["w2_mean"][j],
      ]
    )
    rows.append(
      [
        b["N"],
        f"T={b['best_T']} (best)",
        b["val_mean"][i],
        b["acc_mean"][i],
        b["w2_mean"][i],
      ]
    )
    for name in ("uniform", "natural"):
      rows.append([b["N"], name, b[name]["val_mean"], b[name]["acc_mean"], "-"])
  return fmt_table(["N", "method", "val loss", "val acc", "w_2"], rows)


def _plot(data):
  from dataweights.plotting import mixing as plots

  return plots.plot_horizon_minibatch(data)


register(
  Published(
    name="ch1_horizon_minibatch",
    chapter="ch1_mixing",
    run=run,
    make_config=mixing_configs.HorizonMinibatchConfig,
    plot=_plot,
  )
)
