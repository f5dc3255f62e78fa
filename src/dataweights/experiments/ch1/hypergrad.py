"""Table: the three hypergradients agree (Prop. 4.1 forward == reverse == FD).

On the 3-domain quadratic of :func:`dataweights.methods.synthetic.sweep_quadratic`
at a random starting point and random weights: forward mode
(Proposition 4.1), reverse mode and float64 central finite differences of
``w ↦ g(θ_T(w))`` for several T, and, at ``θ = θ*(w)``, the implicit
hypergradient against its closed form ``−∇gᵀ H⁻¹ ∇f_j`` and the unrolled
one at a long horizon.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from dataweights.configs import mixing as mixing_configs
from dataweights.experiments.ch1.common import fmt_table, r
from dataweights.experiments.registry import Published, register
from dataweights.methods import bilevel
from dataweights.methods import synthetic as syn


def _theta_T(q: syn.QuadraticDomains, theta_D, w_K, lr: float, T: int) -> np.ndarray:
  """``θ_T(w)`` in float64 (unconstrained w: the partial derivative)."""
  theta = np.array(theta_D, np.float64)
  for _ in range(T):
    grad = np.sum(w_K[:, None] * q.a_KxD * (theta[None] - q.c_KxD), axis=0)
    theta = theta - lr * grad
  return theta


def _g(q: syn.QuadraticDomains, theta_D: np.ndarray) -> float:
  d = theta_D - q.c_val_D
  return float(0.5 * np.sum(q.a_val_D * d * d))


def finite_differences(q, theta_D, w_K, lr: float, T: int, eps: float) -> np.ndarray:
  """Central differences of ``w ↦ g(θ_T(w))`` in float64."""
  h = np.zeros(len(w_K))
  for j in range(len(w_K)):
    e = np.zeros(len(w_K))
    e[j] = eps
    h[j] = (_g(q, _theta_T(q, theta_D, w_K + e, lr, T))
            - _g(q, _theta_T(q, theta_D, w_K - e, lr, T))) / (2 * eps)
  return h


def implicit_closed_form(q, w_K) -> np.ndarray:
  """``h_j = −∇g(θ*)ᵀ H⁻¹ ∇f_j(θ*)`` in float64 (diagonal H)."""
  theta = syn.inner_optimum(q, w_K)
  grad_f = q.a_KxD * (theta[None] - q.c_KxD)
  grad_g = q.a_val_D * (theta - q.c_val_D)
  h_D = w_K @ q.a_KxD
  return -(grad_f / h_D[None]) @ grad_g


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# Agreement is published as a digit count capped at a bound: the float32
# errors (1e-8 .. 2e-6) are float noise that would be brittle to compare
# across machines, and as raw numbers they sit below the drift guard's atol
# (so a broken hypergradient could not fail it). A capped integer is
# robust to that noise (the caps are >= 40x above the observed errors) and
# any real disagreement changes it, which the guard catches exactly.
DIGITS_CAP = 5  # forward == reverse == FD, implicit == closed form: rel < 1e-5
DIGITS_CAP_LONG = 4  # unrolled at T_long from θ* == implicit: rel < 1e-4


def agree_digits(rel: float, cap: int) -> int:
  """``min(cap, floor(−log10 rel))``: agreeing significant digits, capped."""
  if not math.isfinite(rel):
    return 0
  if rel <= 0:
    return cap
  return int(max(0, min(cap, math.floor(-math.log10(rel)))))


def run(cfg: mixing_configs.HypergradCheckConfig) -> dict[str, Any]:
  """Computes the agreement table. Returns a JSON-able dict."""
  q = syn.sweep_quadratic()
  problem = bilevel.MixingProblem(*syn.quadratic_losses(q))
  rng = np.random.default_rng(cfg.seed)
  w_K = rng.dirichlet(np.ones(q.num_domains))
  theta0_D = rng.normal(size=q.dim)
  w32, th32 = jnp.asarray(w_K, jnp.float32), jnp.asarray(theta0_D, jnp.float32)
  rows = []
  for T in cfg.horizons:
    h_fwd, _ = bilevel.hypergrad_forward(problem, th32, w32, lr=cfg.lr, T=T)
    h_rev, _ = bilevel.hypergrad_reverse(problem, th32, w32, lr=cfg.lr, T=T)
    h_fd = finite_differences(q, theta0_D, w_K, cfg.lr, T, cfg.fd_eps)
    rows.append({
      "T": T,
      "forward": np.asarray(h_fwd),
      "reverse": np.asarray(h_rev),
      "fd": h_fd,
      "digits_fwd_rev": agree_digits(_rel(h_fwd, h_rev), DIGITS_CAP),
      "digits_fwd_fd": agree_digits(_rel(h_fwd, h_fd), DIGITS_CAP),
    })
  theta_star = jnp.asarray(syn.inner_optimum(q, w_K), jnp.float32)
  h_imp = bilevel.hypergrad_implicit(problem, theta_star, w32)
  h_cf = implicit_closed_form(q, w_K)
  h_long, _ = bilevel.hypergrad_forward(
    problem, theta_star, w32, lr=cfg.lr, T=cfg.implicit_steps
  )
  implicit = {
    "implicit": np.asarray(h_imp),
    "closed_form": h_cf,
    "unrolled_long": np.asarray(h_long),
    "T_long": cfg.implicit_steps,
    "digits_implicit_closed": agree_digits(_rel(h_imp, h_cf), DIGITS_CAP),
    "digits_unrolled_implicit": agree_digits(_rel(h_long, h_cf), DIGITS_CAP_LONG),
  }
  return r({"w_K": w_K, "rows": rows, "implicit": implicit})


def summary(data: dict[str, Any]) -> str:
  """Fixed-format table of the hypergradients and their agreement."""
  def ok(digits, cap):
    return "yes" if digits >= cap else f"NO ({digits} digits)"

  rows = []
  for row in data["rows"]:
    h = ", ".join(f"{v:+.3g}" for v in row["forward"])
    rows.append([row["T"], h, ok(row["digits_fwd_rev"], DIGITS_CAP),
                 ok(row["digits_fwd_fd"], DIGITS_CAP)])
  imp = data["implicit"]
  h = ", ".join(f"{v:+.3g}" for v in imp["closed_form"])
  rows.append(["inf", h, "-", "-"])
  table = fmt_table(["T", "h_K (forward)", "rev agrees (1e-5)", "FD agrees (1e-5)"], rows)
  return (
    table
    + f"\nimplicit == closed form (1e-5): {ok(imp['digits_implicit_closed'], DIGITS_CAP)}"
    + f"\nunrolled T={imp['T_long']} from theta* == implicit (1e-4): "
    + ok(imp["digits_unrolled_implicit"], DIGITS_CAP_LONG)
  )


register(Published(
  name="ch1_hypergrad",
  chapter="ch1_mixing",
  run=run,
  make_config=mixing_configs.HypergradCheckConfig,
  config=mixing_configs.hypergrad_check,
  summary=summary,
  plot=None,
  rtol=1e-4,
  atol=1e-6,
  note="float32 hypergradients; agreement published as capped digit counts "
  "(integers, compared exactly)",
))
