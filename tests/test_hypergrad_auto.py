"""``mode="auto"`` for the finite-horizon hypergradient.

The choice follows the documented cost model in clear-cut cases, and
whatever it picks gives the same hypergradient as every explicit mode
(float64, so the comparison is tight) and as central finite differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataweights.methods import bilevel, mixing


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _mlp(K=2, M=256, D=32, H=32, seed=0):
  """A tanh MLP on M examples per domain: many activations per FLOP."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(K, M, D)))
  y = jnp.asarray(np.sin(rng.normal(size=(K, M))))
  xv, yv = x[0, :16], y[0, :16]
  params = {
    "W": jnp.asarray(rng.normal(size=(D, H)) / np.sqrt(D)),
    "v": jnp.asarray(rng.normal(size=H) / np.sqrt(H)),
  }
  f = lambda p, x: jnp.tanh(x @ p["W"]) @ p["v"]
  domain = lambda p, b: jax.vmap(lambda a, t: jnp.mean((f(p, a) - t) ** 2))(
    x, y
  )
  val = lambda p, b: jnp.mean((f(p, xv) - yv) ** 2)
  return bilevel.MixingProblem(domain, val), params


def _logistic(K=4, M=128, D=512, seed=0):
  """Logistic regression: a matrix-vector step, tiny residuals."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(K, M, D)))
  y = jnp.asarray((rng.uniform(size=(K, M)) < 0.5) * 1.0)
  nll = lambda w, x, y: jnp.mean(jnp.logaddexp(0.0, x @ w) - y * (x @ w))
  domain = lambda p, b: jax.vmap(lambda a, t: nll(p["w"], a, t))(x, y)
  val = lambda p, b: nll(p["w"], x[0, :32], y[0, :32])
  return bilevel.MixingProblem(domain, val), {"w": jnp.zeros(D)}


def _choose(problem, params, K, T, budget=None):
  return bilevel.choose_hypergrad_mode(
    problem,
    params,
    jnp.full((K,), 1.0 / K),
    lr=0.05,
    T=T,
    memory_budget_bytes=budget,
  )


def test_auto_for_a_matrix_vector_step():
  choice = _choose(*_logistic(), K=4, T=100)
  assert choice.mode == "reverse", choice
  # residuals: a few K x M vectors, far below the intensity threshold
  assert choice.residual_bytes < 0.02 * choice.step_flops
  # reading the data dominates: the forward directions share each read
  assert choice.step_flops < 4 * choice.data_bytes
  assert choice.time_steps["forward"] == pytest.approx(1 + 0.55 * 4)
  # K = 2: 1 + 0.55 K = 2.1 > 2, reverse (forward lost by 12-54% in three
  # of four runs of benchmarks/bench_mixing.py at T >= 100)
  assert _choose(*_logistic(K=2), K=2, T=100).mode == "reverse"


@pytest.mark.parametrize("make", [_mlp, _logistic])
@pytest.mark.parametrize("K", [2, 8])
def test_auto_single_step_is_reverse(make, K):
  # theta_0 does not depend on w: one backward pass w.r.t. w, no HVP
  choice = _choose(*make(K=K), K=K, T=1)
  assert choice.mode == "reverse", choice
  assert choice.time_steps["reverse"] < choice.time_steps["reverse_remat"]
  assert choice.time_steps["reverse"] < choice.time_steps["forward"]


def test_auto_picks_remat_when_residuals_dominate():
  choice = _choose(*_mlp(), K=2, T=100)
  assert choice.mode == "reverse_remat", choice
  assert choice.residual_bytes > 0.02 * choice.step_flops
  # with a single step the residuals stay in cache: plain reverse
  assert _choose(*_mlp(), K=2, T=1).mode == "reverse"


def test_auto_picks_forward_under_a_tight_memory_budget():
  problem, params = _logistic()
  P = 512 * 4  # float32 parameters
  # T = 1000 copies of theta do not fit; (K + 2) copies do
  choice = _choose(problem, params, K=4, T=1000, budget=100 * P)
  assert choice.mode == "forward", choice
  assert choice.feasible == ("forward",)
  # nothing fits: the smallest memory (forward), said so
  tiny = _choose(problem, params, K=4, T=1000, budget=P)
  assert tiny.mode == "forward" and "no mode fits" in tiny.reason


def test_many_domains_prefer_reverse_modes():
  choice = _choose(*_logistic(K=8), K=8, T=10)
  assert choice.time_steps["forward"] > choice.time_steps[choice.mode]
  assert choice.mode in ("reverse", "reverse_remat")


@pytest.mark.parametrize("make", [_mlp, _logistic])
def test_auto_equals_every_explicit_mode(x64, make):
  problem, params = make()
  params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
  K = 2 if make is _mlp else 4
  w = jnp.full((K,), 1.0 / K)
  T = 7
  h = {
    mode: jax.jit(
      lambda p, w, mode=mode: bilevel.hypergrad(
        problem, p, w, lr=0.05, T=T, mode=mode
      )
    )(params, w)
    for mode in ("auto",) + bilevel.HYPERGRAD_MODES
  }
  for mode, (h_K, theta) in h.items():
    np.testing.assert_allclose(h_K, h["forward"][0], rtol=1e-10, atol=1e-14)
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(h["forward"][1])):
      np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=mode)
  # and an independent oracle: central differences of g(theta_T(w))
  g = lambda w: problem.val_loss(
    bilevel.inner_steps(problem, params, w, lr=0.05, T=T), None
  )
  eps = 1e-6
  fd = [(g(w + eps * e) - g(w - eps * e)) / (2 * eps) for e in jnp.eye(K)]
  np.testing.assert_allclose(h["auto"][0], fd, rtol=1e-6, atol=1e-10)


def test_run_mixing_auto_equals_explicit_modes(x64):
  problem, params = _logistic(K=2, D=64)
  params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
  kw = dict(lr=0.05, T=5, N=15, beta=0.5)
  w0 = jnp.array([0.5, 0.5])
  auto = mixing.run_mixing(problem, params, w0, hypergrad="auto", **kw)
  for mode in ("forward", "reverse", "reverse_remat"):
    tr = mixing.run_mixing(problem, params, w0, hypergrad=mode, **kw)
    np.testing.assert_allclose(auto.h_RxK, tr.h_RxK, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(auto.w_RxK, tr.w_RxK, rtol=1e-12)
  assert np.abs(np.asarray(auto.h_RxK)).max() > 0


def test_bad_mode_and_budget_raise():
  problem, params = _logistic(K=2, D=8)
  w = jnp.array([0.5, 0.5])
  with pytest.raises(ValueError, match="mode = 'fast' is invalid"):
    bilevel.hypergrad(problem, params, w, lr=0.1, T=2, mode="fast")
  with pytest.raises(ValueError, match="memory_budget_bytes = -1 is invalid"):
    bilevel.choose_hypergrad_mode(
      problem, params, w, lr=0.1, T=2, memory_budget_bytes=-1
    )
  with pytest.raises(mixing.MixingError, match="hypergrad = 'fast'"):
    mixing.run_mixing(
      problem, params, w, lr=0.1, T=2, N=2, beta=0.1, hypergrad="fast"
    )
  with pytest.raises(mixing.MixingError, match="memory_budget_bytes = 0"):
    mixing.run_mixing(
      problem,
      params,
      w,
      lr=0.1,
      T=2,
      N=2,
      beta=0.1,
      hypergrad="auto",
      memory_budget_bytes=0,
    )
