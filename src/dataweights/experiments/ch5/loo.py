"""Figure: does influence predict leave-one-out retraining? (section 1)

On UCI digits (8x8 pixels / 16), an L2-regularised multinomial logistic
model and a small tanh MLP are trained to convergence in float64. For
``n_removed`` training examples, the model is retrained without that example
(its term dropped from the sum; the objective's ``1/N`` and the L2 penalty
stay, which is the removal that influence describes) and the change of the
mean test loss is recorded. Influence predicts the change as ``-s_i / N``
with ``s_i = -grad loss_i^T C^{-1} grad Q`` for five curvature matrices
``C``: the exact Hessian, the exact empirical Fisher (+ L2), K-FAC, K-FAC
with G-DIG's factored damping, and EK-FAC (all + the L2 coefficient).

Retraining: the full fit is L-BFGS followed by exact Newton steps; each
leave-one-out fit starts from it and iterates ``theta <- theta - a H_i^{-1}
grad J_i(theta)`` with ``H_i``, the leave-one-out objective's Hessian at the
full fit, factored once, and ``a`` chosen by backtracking (a safeguarded
chord Newton method: it converges to the leave-one-out optimum itself, whose
gradient norm is checked to be below ``loo_tol``; ``H_i`` only sets the
speed).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from flax import nnx

from dataweights.configs import influence as cfgs
from dataweights.data import prepared
from dataweights.experiments.ch5 import common
from dataweights.experiments.registry import Published, register
from dataweights.methods import influence, kfac
from dataweights.models.mlp import MLP, cross_entropy

ESTIMATORS: tuple[str, ...] = (
  "hessian",
  "fisher",
  "kfac",
  "kfac_factored",
  "ekfac",
)
MODELS: tuple[str, ...] = ("logistic", "mlp")


def digits_subsets(seed: int, n_train: int, n_query: int) -> dict[str, Any]:
  """``n_train`` UCI training digits and ``n_query`` UCI test digits."""
  d = prepared.load_digits()
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in (("train", n_train), ("test", n_query)):
    uci = np.flatnonzero(d[split]["domain_M"] == 1)
    if n > uci.size:
      raise ValueError(
        f"{n} {split} digits requested; the UCI {split} split has {uci.size}"
      )
    idx = np.sort(rng.choice(uci, size=n, replace=False))
    out[split] = {
      "x_BxI": d[split]["x_MxHxW"][idx].reshape(n, -1).astype(np.float64) / 16,
      "y_B": d[split]["y_M"][idx].astype(np.int32),
    }
  return out


STEP_SIZES = 0.5 ** jnp.arange(8)


def _newton_step(objective, theta, direction):
  """Backtracking (Armijo) along a descent direction, step sizes 1, 1/2, ...

  Near the optimum the predicted decrease falls below float64's resolution
  of the objective; the full step is then taken (Newton's local regime).
  """
  g = jax.grad(objective)(theta)
  f0 = objective(theta)
  slope = jnp.dot(g, direction)
  vals = jax.vmap(lambda a: objective(theta + a * direction))(STEP_SIZES)
  ok = (vals <= f0 + 1e-4 * STEP_SIZES * slope) & (slope < 0)
  resolved = -slope > 1e-12 * (1.0 + jnp.abs(f0))
  alpha = jnp.where(jnp.any(ok), STEP_SIZES[jnp.argmax(ok)], 0.0)
  alpha = jnp.where(resolved, alpha, 1.0)
  return theta + alpha * direction


def _damped_newton(
  objective, theta, hess, steps: int, cg_iters: int = 0, fallback=None
):
  """Safeguarded Newton steps preconditioned by a fixed ``hess``.

  With ``cg_iters = 0`` the direction is ``-hess^{-1} grad`` (chord Newton);
  otherwise it is the exact Newton direction at the current point, solved by
  conjugate gradients on exact Hessian-vector products with ``hess`` as the
  preconditioner. Every step backtracks to decrease the objective; if
  ``hess`` is not positive definite, ``fallback`` (a positive definite
  matrix, e.g. the full objective's Hessian at its minimum) preconditions
  instead; without one the direction falls back to ``-grad``.
  """
  chol = jax.scipy.linalg.cho_factor(hess)
  bad = ~jnp.all(jnp.isfinite(chol[0]))
  if fallback is not None:
    chol_fb = jax.scipy.linalg.cho_factor(fallback)
    chol = (jnp.where(bad, chol_fb[0], chol[0]), chol[1])
    bad = ~jnp.all(jnp.isfinite(chol[0]))
  grad = jax.grad(objective)

  def body(th, _):
    g = grad(th)
    d = -jax.scipy.linalg.cho_solve(chol, g)
    if cg_iters:
      hvp = lambda v: jax.jvp(grad, (th,), (v,))[1]
      d, _ = jax.scipy.sparse.linalg.cg(
        hvp,
        -g,
        x0=d,
        maxiter=cg_iters,
        M=lambda r: jax.scipy.linalg.cho_solve(chol, r),
      )
    d = jnp.where(bad | ~jnp.all(jnp.isfinite(d)) | (jnp.dot(d, g) >= 0), -g, d)
    return _newton_step(objective, th, d), None

  theta, _ = jax.lax.scan(body, theta, None, length=steps)
  return theta


def _fit(objective, theta0, lbfgs_steps: int, newton_steps: int):
  """L-BFGS, then safeguarded Newton steps (float64)."""
  opt = optax.lbfgs()
  vg = optax.value_and_grad_from_state(objective)

  def step(carry, _):
    th, st = carry
    value, grad = vg(th, state=st)
    upd, st = opt.update(
      grad, st, th, value=value, grad=grad, value_fn=objective
    )
    return (optax.apply_updates(th, upd), st), None

  (theta, _), _ = jax.lax.scan(
    step, (theta0, opt.init(theta0)), None, length=lbfgs_steps
  )
  hess = jax.hessian(objective)
  for _ in range(newton_steps):
    theta = _damped_newton(objective, theta, hess(theta), 1)
  return theta


@functools.lru_cache(maxsize=8)
def _programs(sizes: tuple[int, ...], l2: float, n: int, cfg_key: tuple) -> Any:
  """The jitted pieces of one study, compiled once per model shape."""
  lbfgs_steps, newton_steps, loo_steps, cg_iters, loo_batch = cfg_key
  model = MLP(sizes, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p, b: cross_entropy(nnx.merge(gd, p, rest, copy=True), b)
  _, flat_loss, unravel = influence.flat_problem(loss, params)
  layers = tuple(kfac.linear_layers(model))

  def objective(th, train, w_N=None):
    loss_N = flat_loss(th, train)
    w = jnp.ones(n) if w_N is None else w_N
    return jnp.sum(w * loss_N) / n + 0.5 * l2 * jnp.sum(th**2)

  @jax.jit
  def fit(theta0, train):
    theta = _fit(
      lambda th: objective(th, train), theta0, lbfgs_steps, newton_steps
    )
    hess = jax.hessian(objective)(theta, train)
    return theta, hess, jnp.linalg.norm(jax.grad(objective)(theta, train))

  @jax.jit
  def estimates(theta, train, query):
    est = {}
    est["hessian"] = influence.hessian_influence(
      flat_loss, theta, train, query, l2=l2
    )
    est["fisher"] = influence.hessian_influence(
      flat_loss, theta, train, query, l2=l2, curvature="fisher"
    )
    p_fit = unravel(theta)
    stats = lambda b: kfac.layer_stats(
      cross_entropy, gd, p_fit, rest, b, layers
    )
    st_train = stats(train)
    fitted = kfac.fit_kfac(stats, [train], ekfac=True)
    gq = influence.batch_layer_grads(stats(query))
    for method in ("kfac", "kfac_factored", "ekfac"):
      u = kfac.ihvp(fitted, gq, l2, method)
      est[method] = influence.gdig_scores_from_stats(st_train, u)
    return est

  @jax.jit
  def leave_one_out(theta, hess, train, query, removed_R):
    def qloss(th):
      return flat_loss(th, query).mean()

    def refit(i):
      w = jnp.ones(n).at[i].set(0.0)
      g_fn = jax.grad(lambda th: objective(th, train, w))
      # The leave-one-out Hessian at the full fit: H minus the example's own.
      ex = jax.tree.map(lambda x: x[i][None], train)
      h_i = hess - jax.hessian(lambda th: flat_loss(th, ex)[0])(theta) / n
      th = _damped_newton(
        lambda t: objective(t, train, w),
        theta,
        h_i,
        loo_steps,
        cg_iters=cg_iters,
        fallback=hess,
      )
      return qloss(th) - qloss(theta), jnp.linalg.norm(g_fn(th))

    return jax.lax.map(refit, removed_R, batch_size=loo_batch)

  @jax.jit
  def leave_one_out_slow(theta, train, query, i):
    """One refit by L-BFGS + Newton from the full fit (the fallback)."""
    w = jnp.ones(n).at[i].set(0.0)
    obj = lambda t: objective(t, train, w)
    th = _fit(obj, theta, lbfgs_steps, newton_steps)
    qloss = lambda t: flat_loss(t, query).mean()
    return qloss(th) - qloss(theta), jnp.linalg.norm(jax.grad(obj)(th))

  @jax.jit
  def accuracy(theta, x, y):
    logits = nnx.merge(gd, unravel(theta), rest)(x)
    return jnp.mean(jnp.argmax(logits, 1) == y)

  return {
    "params": params,
    "ravel": lambda p: influence.flat_problem(loss, p)[0],
    "fit": fit,
    "estimates": estimates,
    "loo": leave_one_out,
    "loo_slow": leave_one_out_slow,
    "accuracy": accuracy,
  }


def _study(
  model_name: str, seed: int, cfg: cfgs.InfluenceLOOConfig
) -> dict[str, Any]:
  data = digits_subsets(seed, cfg.n_train, cfg.n_query)
  sizes = (64, 10) if model_name == "logistic" else (64, cfg.hidden, 10)
  l2 = cfg.l2
  n = cfg.n_train
  prog = _programs(
    sizes,
    l2,
    n,
    (
      cfg.lbfgs_steps,
      cfg.newton_steps,
      cfg.loo_steps,
      cfg.cg_iters,
      cfg.loo_batch,
    ),
  )
  model = MLP(sizes, rngs=nnx.Rngs(seed), param_dtype=jnp.float64)
  theta0 = prog["ravel"](nnx.state(model, nnx.Param))
  train = jax.tree.map(jnp.asarray, data["train"])
  query = jax.tree.map(jnp.asarray, data["test"])
  theta, hess, grad_norm = prog["fit"](theta0, train)
  min_eig = float(jnp.linalg.eigvalsh(hess)[0])
  if not min_eig > 0:
    raise RuntimeError(
      f"{model_name}, seed {seed}: the fitted Hessian is not positive definite "
      f"(smallest eigenvalue {min_eig:.3g}); the fit is not at a minimum"
    )
  est = prog["estimates"](theta, train, query)
  removed = np.sort(
    np.random.default_rng(seed + 1000).choice(n, cfg.n_removed, replace=False)
  )
  delta_R, gnorm_R = prog["loo"](
    theta, hess, train, query, jnp.asarray(removed)
  )
  delta_R, gnorm_R = np.array(delta_R), np.array(gnorm_R)
  # The chord Newton refit can stall where the leave-one-out optimum is far
  # from the full fit; those few are refitted by L-BFGS + Newton.
  slow = np.flatnonzero(~(gnorm_R <= cfg.loo_tol))
  for j in slow:
    d, g = prog["loo_slow"](theta, train, query, int(removed[j]))
    delta_R[j], gnorm_R[j] = float(d), float(g)
  max_gnorm = float(jnp.max(gnorm_R))
  if not max_gnorm <= cfg.loo_tol:
    raise RuntimeError(
      f"{model_name}, seed {seed}: a leave-one-out refit did not converge "
      f"(gradient norm {max_gnorm:.2e} > loo_tol = {cfg.loo_tol}); raise "
      "loo_steps or the L2 coefficient"
    )
  actual = np.asarray(delta_R)
  rows = {}
  for name in ESTIMATORS:
    pred = -np.asarray(est[name])[removed] / n
    rows[name] = {
      "pearson": float(np.corrcoef(pred, actual)[0, 1]),
      "spearman": float(scipy.stats.spearmanr(pred, actual).statistic),
      "pearson_ci": common.bootstrap_corr(pred, actual, cfg.bootstrap, seed),
      "slope": float(np.polyfit(actual, pred, 1)[0]),
      "predicted": pred,
    }
  return {
    "actual": actual,
    "estimators": rows,
    "fit_grad_norm": float(grad_norm),
    "hessian_min_eig": min_eig,
    "loo_max_grad_norm": max_gnorm,
    "loo_fallbacks": int(slow.size),
    "train_acc": float(prog["accuracy"](theta, train["x_BxI"], train["y_B"])),
    "test_acc": float(prog["accuracy"](theta, query["x_BxI"], query["y_B"])),
  }


def run(cfg: cfgs.InfluenceLOOConfig) -> dict[str, Any]:
  """Per model and seed: correlations of each estimate with leave-one-out."""
  with jax.enable_x64(True):
    per = {m: [_study(m, s, cfg) for s in cfg.seeds] for m in MODELS}
  out: dict[str, Any] = {"seeds": list(cfg.seeds), "models": {}}
  for m, runs in per.items():
    summary = {}
    for name in ESTIMATORS:
      r_S = [r_["estimators"][name]["pearson"] for r_ in runs]
      rho_S = [r_["estimators"][name]["spearman"] for r_ in runs]
      summary[name] = {
        "pearson": common.corr_ci(r_S),
        "spearman": common.corr_ci(rho_S),
        "pearson_S": r_S,
        "spearman_S": rho_S,
        "slope_S": [r_["estimators"][name]["slope"] for r_ in runs],
      }
    first = runs[0]
    out["models"][m] = {
      "summary": summary,
      "scatter": {
        "actual": first["actual"],
        **{n_: first["estimators"][n_]["predicted"] for n_ in ESTIMATORS},
      },
      "per_seed_ci": [
        {n_: r_["estimators"][n_]["pearson_ci"] for n_ in ESTIMATORS}
        for r_ in runs
      ],
      "fit_grad_norm_max": max(r_["fit_grad_norm"] for r_ in runs),
      "hessian_min_eig_min": min(r_["hessian_min_eig"] for r_ in runs),
      "loo_max_grad_norm": max(r_["loo_max_grad_norm"] for r_ in runs),
      "loo_fallbacks": sum(r_["loo_fallbacks"] for r_ in runs),
      "train_acc": [r_["train_acc"] for r_ in runs],
      "test_acc": [r_["test_acc"] for r_ in runs],
    }
  return common.r(out)


def summary(data: dict[str, Any]) -> str:
  """Pearson and Spearman correlation with leave-one-out, mean [95% CI]."""
  rows = []
  for m in MODELS:
    for name in ESTIMATORS:
      s = data["models"][m]["summary"][name]
      rows.append(
        [
          m,
          name,
          common.fmt_ci(s["pearson"]),
          common.fmt_ci(s["spearman"]),
          f"{np.mean(s['slope_S']):.2f}",
        ]
      )
  table = common.fmt_table(
    ["model", "curvature", "Pearson r", "Spearman rho", "slope"], rows
  )
  notes = [
    f"{m}: test accuracy {np.mean(data['models'][m]['test_acc']):.2f}, "
    f"refits by the L-BFGS fallback {data['models'][m]['loo_fallbacks']}"
    for m in MODELS
  ]
  return table + "\n\n" + "\n".join(notes)


def _plot(data):
  from dataweights.experiments.ch5 import plots

  return plots.plot_loo(data)


register(
  Published(
    name="ch5_loo",
    chapter="ch5_influence",
    run=run,
    make_config=cfgs.InfluenceLOOConfig,
    config=cfgs.influence_loo,
    summary=summary,
    plot=_plot,
  )
)
