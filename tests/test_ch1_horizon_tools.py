"""Tools of the chapter-1 horizon studies: the quadratic simulator, T*, fits.

Oracles: the generic ``run_mixing_schedule`` (itself checked against
``run_mixing`` and a replay from parts in test_mixing.py) with the same
noise; closed forms for the EG outer rate; exact parabolas and exact laws
for the estimators; scipy for the t interval.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dataweights.experiments.ch1 import quadsim as qs
from dataweights.experiments.ch1 import tstar as ts
from dataweights.experiments.ch1.common import geometric_grid, outer_rate
from dataweights.methods import bilevel, mixing
from dataweights.methods import synthetic as syn


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_simulator_equals_generic_schedule(sigma):
  """Every lane (horizon, growth, lr, beta, decay, curvature scale, seed)."""
  q = syn.sweep_quadratic()
  cfg = qs.lanes(
    T0=[1, 7, 30],
    growth=[0.0, 0.5, 2.0],
    lr=[0.02, 0.01, 0.03],
    beta=[0.1, 0.3, 0.05],
    decay=[0.0, 0.1, 0.0],
    scale=np.array([[1.0, 1.0], [1.0, 3.0], [2.0, 0.5]]),
  )
  budgets = (50, 333, 1000)
  keys = jax.random.split(jax.random.key(5), 2)
  res = qs.simulate(q, cfg, budgets=budgets, seeds=keys, sigma=sigma)
  assert res.w_BxKxSxM.shape == (3, 3, 2, 3)
  with jax.enable_x64(True):
    for m in range(3):
      qm = syn.make_quadratic(
        q.a_KxD * cfg.scale[m][None], q.c_KxD, q.a_val_D, q.c_val_D
      )
      problem = bilevel.MixingProblem(
        *syn.noisy_quadratic_losses(qm, jnp.float64)
      )

      def step_batch_fn(k):
        return {"xi": sigma * jax.random.normal(k, (3, 2), jnp.float64)}

      for s in range(2):
        tr = mixing.run_mixing_schedule(
          problem,
          jnp.zeros(2),
          jnp.full(3, 1 / 3),
          lr=cfg.lr[m],
          beta=cfg.beta[m],
          beta_decay=cfg.decay[m],
          T0=cfg.T0[m],
          T_growth=cfg.growth[m],
          budgets=budgets,
          step_batch_fn=step_batch_fn,
          key=keys[s],
        )
        np.testing.assert_allclose(
          res.w_BxKxSxM[:, :, s, m], tr.w_BxK, rtol=1e-12, atol=1e-15
        )
        np.testing.assert_allclose(
          res.theta_BxDxSxM[:, :, s, m], tr.params_B, rtol=1e-12, atol=1e-14
        )
        np.testing.assert_array_equal(res.rounds_BxSxM[:, s, m], tr.rounds_B)
  if sigma > 0:  # the two seeds saw different noise
    assert (
      np.abs(res.w_BxKxSxM[-1, :, 0] - res.w_BxKxSxM[-1, :, 1]).max() > 1e-3
    )


def test_curvature_scale_leaves_outer_objective_unchanged():
  q = syn.sweep_quadratic()
  w_NxK = np.random.default_rng(0).dirichlet(np.ones(3), size=20)
  q10 = syn.make_quadratic(
    q.a_KxD * np.array([1.0, 10.0]), q.c_KxD, q.a_val_D, q.c_val_D
  )
  np.testing.assert_allclose(
    syn.val_at(q10, w_NxK), syn.val_at(q, w_NxK), rtol=1e-13
  )


def test_outer_rate_matches_the_boundary_closed_form():
  """EG drives w_3 -> 0 at rate β (∂_3Φ − ∂_1Φ)(w*), the slowest mode here."""
  q = syn.sweep_quadratic()
  opt = syn.bilevel_optimum(q)
  eps = 1e-6
  grad = np.array(
    [
      (
        syn.val_at(q, opt["w_K"] + eps * e)
        - syn.val_at(q, opt["w_K"] - eps * e)
      )
      / (2 * eps)
      for e in np.eye(3)
    ]
  )
  kappa = outer_rate(q, 0.1, np.full(3, 1 / 3))
  assert kappa == pytest.approx(0.1 * (grad[2] - grad[0]), rel=2e-3)
  assert outer_rate(q, 0.2, np.full(3, 1 / 3)) == pytest.approx(
    2 * kappa, rel=5e-3
  )


def test_tstar_recovers_an_off_grid_vertex_and_flags_edges():
  T = np.geomspace(1, 1000, 31)
  loss = np.exp(0.7 * (np.log(T) - np.log(37.3)) ** 2 - 3.0)
  est = ts.tstar(T, loss, half=3)
  assert est["T"] == pytest.approx(37.3, rel=1e-9)
  assert not est["edge"] and est["grid_T"] in T
  # NaN entries (horizons above the budget) are ignored.
  loss_nan = np.where(T > 500, np.nan, loss)
  assert ts.tstar(T, loss_nan)["T"] == pytest.approx(37.3, rel=1e-9)
  # A monotone curve has its minimum at the edge: no estimate.
  est = ts.tstar(T, 1.0 / T)
  assert est["edge"] and np.isnan(est["T"])
  with pytest.raises(ValueError, match=">= 3 positive"):
    ts.tstar(T[:2], loss[:2])
  assert (
    ts.near_optimal_range(T, loss, 1.1)[0]
    <= 37.3
    <= ts.near_optimal_range(T, loss, 1.1)[1]
  )


@pytest.mark.parametrize(
  "law, a, b",
  [
    ("log", -40.0, 20.0),
    ("sqrt_nlogn", 3.0, 0.5),
    ("sqrt", -2.0, 1.3),
    ("power", 0.2, 0.61),
  ],
)
def test_each_law_is_recovered_and_wins_on_held_out_budgets(law, a, b):
  N = np.geomspace(300, 3e5, 12)
  T = ts.predict(N, law, {"a": a, "b": b})
  fit = ts.fit_law(N, T, law)
  assert fit["a"] == pytest.approx(a, rel=1e-8, abs=1e-8)
  assert fit["b"] == pytest.approx(b, rel=1e-8)
  cmp = ts.compare_laws(N, T, n_fit=8)
  assert cmp[law]["rms_heldout"] < 1e-8
  others = [v["rms_heldout"] for k, v in cmp.items() if k != law]
  assert min(others) > 0.01


def test_loglog_slope_interval_is_student_t():
  rng = np.random.default_rng(3)
  N = np.geomspace(100, 1e5, 9)
  T = 2.0 * N**0.5 * np.exp(0.05 * rng.normal(size=9))
  got = ts.loglog_slope(N, T, level=0.9)
  res = stats.linregress(np.log(N), np.log(T))
  half = stats.t.ppf(0.95, 7) * res.stderr
  assert got["slope"] == pytest.approx(res.slope)
  assert got["hi"] - got["slope"] == pytest.approx(half)
  assert got["lo"] < 0.5 < got["hi"]
  exact = ts.loglog_slope(N, 3 * N**0.25)
  assert (
    exact["slope"] == pytest.approx(0.25) and exact["hi"] - exact["lo"] < 1e-10
  )


def test_bootstrap_and_mean_ci():
  T = np.geomspace(1, 1000, 25)
  base = np.exp(0.5 * (np.log(T) - np.log(20.0)) ** 2)
  same = np.broadcast_to(base, (2, 6, 25))  # no seed variability
  boot = ts.bootstrap_tstar(same, np.broadcast_to(T, (2, 25)), resamples=20)
  np.testing.assert_allclose(boot, 20.0, rtol=1e-9)
  x = np.random.default_rng(0).normal(size=(8, 3))
  m, lo, hi = ts.mean_ci(x, 0.95)
  for j in range(3):
    want = stats.t.interval(
      0.95, 7, loc=x[:, j].mean(), scale=stats.sem(x[:, j])
    )
    assert (lo[j], hi[j]) == pytest.approx(want)


def test_geometric_grid_unique_and_spanning():
  g = geometric_grid(1, 1e5, 48)
  assert (
    g[0] == 1 and g[-1] == 100000 and np.all(np.diff(g) > 0) and len(g) >= 30
  )
