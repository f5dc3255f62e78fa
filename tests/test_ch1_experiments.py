"""Chapter-1 experiments: what each published result must satisfy.

Oracles: closed forms on the diagonal quadratic, the library's
``run_mixing`` (an independent implementation of the algorithm) at single
(N, T) points, data counts, and inequalities that hold by construction or
that the science of the chapter guarantees (checked at a scale where they
are sharp).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.figure import Figure

from dataweights import results
from dataweights.configs import ConfigError
from dataweights.configs import mixing as cm
from dataweights.experiments.ch1 import hypergrad as ch1_hypergrad
from dataweights.experiments.registry import REGISTRY
from dataweights.methods import bilevel, mixing
from dataweights.methods import synthetic as syn


def _finite(x):
  if isinstance(x, dict):
    return all(_finite(v) for v in x.values())
  if isinstance(x, list):
    return all(_finite(v) for v in x)
  if isinstance(x, float):
    return math.isfinite(x)
  return True


def _check(name, cfg):
  data = results.to_jsonable(REGISTRY[name].run(cfg))
  assert _finite(data), f"{name}: non-finite numbers in the published data"
  if REGISTRY[name].plot is not None:
    assert isinstance(REGISTRY[name].plot(data), Figure)
  assert isinstance(REGISTRY[name].summary(data), str)
  return data


def _between(lo, x, hi, tol=1e-12):
  return lo - tol <= x <= hi + tol


def test_hypergrad_table_agrees():
  data = _check("ch1_hypergrad", cm.hypergrad_check("smoke"))
  cap, cap_long = ch1_hypergrad.DIGITS_CAP, ch1_hypergrad.DIGITS_CAP_LONG
  assert [row["T"] for row in data["rows"]] == [1, 5]
  for row in data["rows"]:
    assert row["digits_fwd_rev"] == cap and row["digits_fwd_fd"] == cap
    # The FD column is float64 numpy, independent of JAX.
    np.testing.assert_allclose(row["forward"], row["fd"], rtol=1e-5, atol=1e-7)
  imp = data["implicit"]
  assert imp["digits_implicit_closed"] == cap
  assert imp["digits_unrolled_implicit"] == cap_long
  # T = 1: h_j = −η ⟨∇g(θ_1), ∇f_j(θ_0)⟩ (the greedy rule), in numpy.
  q = syn.sweep_quadratic()
  rng = np.random.default_rng(0)
  w, th0 = rng.dirichlet(np.ones(3)), rng.normal(size=2)
  gf = q.a_KxD * (th0[None] - q.c_KxD)
  th1 = th0 - 0.02 * (w @ gf)
  want = -0.02 * gf @ (q.a_val_D * (th1 - q.c_val_D))
  np.testing.assert_allclose(data["rows"][0]["forward"], want, rtol=1e-5)


def test_hypergrad_agreement_fields_can_fail(monkeypatch):
  """A 0.1% error in reverse mode changes the published integers."""
  original = bilevel.hypergrad_reverse

  def wrong(*args, **kwargs):
    h, p = original(*args, **kwargs)
    return h * 1.001, p

  monkeypatch.setattr(bilevel, "hypergrad_reverse", wrong)
  data = REGISTRY["ch1_hypergrad"].run(cm.hypergrad_check("smoke"))
  assert [row["digits_fwd_rev"] for row in data["rows"]] == [3, 3]
  assert ch1_hypergrad.agree_digits(float("nan"), 5) == 0
  assert ch1_hypergrad.agree_digits(0.0, 5) == 5


def test_greedy_smoke_is_biased():
  data = _check("ch1_greedy", cm.greedy_quadratic("smoke"))
  t1 = data["runs"][0]
  assert t1["T"] == 1
  assert t1["final_val"] > 3 * data["optimum"]["val"]
  assert abs(t1["final_w2"] - data["greedy"]["w2"]) < 0.05
  assert len(t1["steps"]) == len(t1["w2"]) <= 2 * 20


def test_horizon_full_against_run_mixing_and_closed_form():
  cfg = cm.horizon_full("smoke")
  data = _check("ch1_horizon_full", cfg)
  q = syn.sweep_quadratic()
  problem = bilevel.MixingProblem(*syn.quadratic_losses(q))
  w0 = mixing.uniform_weights(3)
  for b in data["budgets"]:
    N = b["N"]
    assert [v is None for v in b["val"]] == [T > N for T in cfg.horizons]
    for i, T in enumerate(cfg.horizons):
      if T > N:
        continue
      tr = mixing.run_mixing(
        problem, jnp.zeros(2), w0, lr=cfg.lr, T=T, N=N, beta=cfg.beta
      )
      assert b["val"][i] == pytest.approx(float(tr.val_loss_R1[-1]), rel=1e-5)
      assert b["w2"][i] == pytest.approx(
        float(tr.w_RxK[-1, 1]), rel=1e-5, abs=1e-7
      )
      assert b["mixture_excess"][i] >= -1e-12
    # Uniform weights: gradient descent on a diagonal quadratic, closed form.
    w = np.full(3, 1 / 3)
    H, star = w @ q.a_KxD, syn.inner_optimum(q, w)
    theta = star + (1 - cfg.lr * H) ** N * (0.0 - star)
    want = 0.5 * np.sum(q.a_val_D * (theta - q.c_val_D) ** 2)
    assert b["uniform_val"] == pytest.approx(want, rel=1e-5)
    valid = [i for i, T in enumerate(cfg.horizons) if T <= N]
    assert b["best_val"] == min(b["val"][i] for i in valid)
    assert b["w2_peak"] == max(b["w2"][i] for i in valid)
    assert b["near_best_T"][0] <= b["best_T"] <= b["near_best_T"][1]


def test_scaling_square_root_and_log_laws():
  """Where the asymptotics are sharp (ημ = 0.2): constant β gives T* ≈ the
  model √(κN/2ν) with slope ~1/2; a decaying β gives a slower, log-like T*."""
  cfg = cm.horizon_scaling(
    "smoke",
    budgets=(500, 1000, 2000, 4000, 8000),
    n_horizons=40,
    t_max=4000.0,
    curvature_scales=(10.0,),
  )
  data = _check("ch1_scaling", cfg)
  assert data["kappa"] == pytest.approx(0.0570, rel=2e-3)
  const, dec = data["arms"]["constant"][0], data["arms"]["decaying"][0]
  assert const["eta_mu"] == pytest.approx(0.2, rel=1e-6)
  T_c = np.array([row["T"] for row in const["rows"]], float)
  T_d = np.array([row["T"] for row in dec["rows"]], float)
  assert np.all(np.isfinite(T_c)) and np.all(np.isfinite(T_d))
  np.testing.assert_allclose(T_c / np.array(const["model_T"]), 1.0, atol=0.12)
  s_c, s_d = const["slope_all"], dec["slope_all"]
  assert 0.4 < s_c["lo"] < 0.5 < s_c["hi"] < 0.6
  assert s_d["hi"] < 0.35 < s_c["lo"] and np.all(T_d < T_c)
  for row in const["rows"]:
    assert row["range"][0] <= row["range"][1] and row["excess"] >= cfg.floor
  # A budget whose best excess is below the float64 floor gets no T*.
  data = _check("ch1_scaling", cm.horizon_scaling("smoke", floor=1.0))
  assert all(
    row["floored"] and row["T"] is None
    for c in data["arms"]["constant"]
    for row in c["rows"]
  )


def test_scaling_minibatch_arms():
  cfg = cm.minibatch_scaling("smoke")
  data = _check("ch1_scaling_minibatch", cfg)
  const, dec = (
    data["arms"]["constant"]["rows"],
    data["arms"]["decaying"]["rows"],
  )
  for c, d in zip(const, dec):
    assert c["lr"] == cfg.lr
    assert d["lr"] == pytest.approx(
      cfg.lr * (cfg.budget0 / d["N"]) ** 0.5, rel=1e-5
    )
    for row in (c, d):
      assert _between(row["excess_lo"], row["excess"], row["excess_hi"])
      assert row["excess"] == pytest.approx(min(row["mean_excess_T"]), rel=1e-6)
      if row["T"] is not None:
        assert row["grid_T"][0] < row["T"] < row["grid_T"][-1]
  # At N = budget0 both arms have the same steps and noise: identical runs.
  i = cfg.budgets.index(cfg.budget0)
  assert const[i]["mean_excess_T"] == dec[i]["mean_excess_T"]
  assert const[i]["T"] == dec[i]["T"]


@pytest.mark.slow
def test_adaptive_against_run_mixing():
  cfg = cm.adaptive_horizon("smoke")
  data = _check("ch1_adaptive", cfg)
  qd = data["quadratic"]
  for row in qd["rows"]:
    assert row["best_T_excess"] <= row["single_T_excess"]
    assert row["best_c_excess"] <= row["single_c_excess"]
  # One (N, T) point against run_mixing in float64 (independent code).
  row = qd["rows"][-1]
  q = syn.sweep_quadratic()
  with jax.enable_x64(True):
    problem = bilevel.MixingProblem(*syn.quadratic_losses(q, jnp.float64))
    tr = mixing.run_mixing(
      problem,
      jnp.zeros(2),
      jnp.full(3, 1 / 3),
      lr=cfg.quad_lr,
      T=row["best_T"],
      N=row["N"],
      beta=cfg.quad_beta,
    )
    want = (
      syn.val_at(q, np.asarray(tr.w_RxK[-1])) - syn.bilevel_optimum(q)["val"]
    )
  assert row["best_T_excess"] == pytest.approx(float(want), rel=1e-6)
  for row in data["classification"]["rows"]:
    assert _between(row["diff_lo"], row["diff"], row["diff_hi"])
    assert row["best_T"] <= row["N"]


@pytest.mark.slow
def test_horizon_minibatch_intervals_and_baselines():
  cfg = cm.horizon_minibatch("smoke")
  data = _check("ch1_horizon_minibatch", cfg)
  np.testing.assert_allclose(
    data["natural_w"], np.array(cfg.pool_sizes) / sum(cfg.pool_sizes), rtol=1e-6
  )
  for b in data["budgets"]:
    for k in ("val", "acc", "w2"):
      for lo, m, hi in zip(b[f"{k}_lo"], b[f"{k}_mean"], b[f"{k}_hi"]):
        assert _between(lo, m, hi)
    assert all(0 <= a <= 1 for a in b["acc_mean"])
    np.testing.assert_allclose(np.sum(b["w_mean_TxK"], axis=1), 1, atol=1e-5)
    assert b["best_T"] in cfg.horizons


@pytest.mark.slow
def test_adult_baselines_and_targets():
  from dataweights.data import prepared

  cfg = cm.adult_mixing("smoke")
  data = _check("ch1_adult", cfg)
  d = prepared.load_adult(domain_column=cfg.domain_column)
  counts = np.bincount(d["train"]["domain_M"], minlength=len(d["domain_names"]))
  assert data["train_counts"] == counts.tolist()
  small = sorted(np.argsort(counts)[:2].tolist())
  for t in data["targets"]:
    by = {m["name"]: m for m in t["methods"]}
    np.testing.assert_allclose(
      by["natural"]["w_mean"], counts / counts.sum(), rtol=1e-6
    )
    np.testing.assert_allclose(
      by["uniform"]["w_mean"], 1 / len(counts), rtol=1e-6
    )
    assert by["natural (pooled)"]["diff_vs_pooled"] == 0.0
    for m in t["methods"]:
      assert abs(sum(m["w_mean"]) - 1) < 1e-5
      assert _between(m["diff_lo"], m["diff_vs_pooled"], m["diff_hi"])
      assert _between(m["test_loss_lo"], m["test_loss"], m["test_loss_hi"])
    if t["target"] == "smallest2":
      assert t["target_domains"] == [d["domain_names"][k] for k in small]
      assert t["n_test"] == int(np.isin(d["test"]["domain_M"], small).sum())
      only = np.array(by["target domains only"]["w_mean"])
      assert np.all(
        only[[k for k in range(len(counts)) if k not in small]] == 0
      )
    else:
      assert t["n_test"] == len(d["test"]["y_M"])


def test_config_errors_name_field_and_allowed_values():
  with pytest.raises(ConfigError, match="smoke, book, paper"):
    cm.horizon_full("laptop")
  with pytest.raises(
    ConfigError, match=r"HorizonFullConfig\.outer.*'eg', 'pgd'"
  ):
    cm.horizon_full("smoke", outer="adam")
  with pytest.raises(ConfigError, match=r"beta = -1.*> 0"):
    cm.horizon_scaling("smoke", beta=-1.0)
  with pytest.raises(ConfigError, match=r"horizons.*increasing"):
    cm.greedy_quadratic("smoke", horizons=(10, 1))
  with pytest.raises(ConfigError, match=r"curvature_scales = \(0\.0,\)"):
    cm.horizon_scaling("smoke", curvature_scales=(0.0,))
  with pytest.raises(ConfigError, match=r"seeds = 1 is invalid.*>= 2"):
    cm.minibatch_scaling("smoke", seeds=1)
  with pytest.raises(ConfigError, match=r"quad_growths = \(\)"):
    cm.adaptive_horizon("smoke", quad_growths=())
  with pytest.raises(
    ConfigError, match=r"targets = \('ood',\).*'all', 'smallest2'"
  ):
    cm.adult_mixing("smoke", targets=("ood",))
  with pytest.raises(ConfigError, match="unknown field"):
    cm.adult_mixing("smoke", domain="race")
  with pytest.raises(ConfigError, match="domain_column.*'workclass'"):
    cm.adult_mixing("smoke", domain_column="income")


def test_registry_has_every_ch1_result():
  names = {n for n, e in REGISTRY.items() if e.chapter == "ch1_mixing"}
  assert names == {
    "ch1_hypergrad",
    "ch1_greedy",
    "ch1_horizon_full",
    "ch1_horizon_minibatch",
    "ch1_scaling",
    "ch1_scaling_minibatch",
    "ch1_adaptive",
    "ch1_adult",
  }
