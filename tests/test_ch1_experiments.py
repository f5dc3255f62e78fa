"""Chapter-1 experiments under the smoke profile: well-formed data, plots."""

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from dataweights import experiments, results
from dataweights.configs import ConfigError
from dataweights.configs import mixing as cm
from dataweights.experiments.registry import REGISTRY


def _finite(x):
  if isinstance(x, dict):
    return all(_finite(v) for v in x.values())
  if isinstance(x, list):
    return all(_finite(v) for v in x)
  if isinstance(x, float):
    return math.isfinite(x)
  return True


def _check(name, cfg, keys):
  data = results.to_jsonable(REGISTRY[name].run(cfg))
  assert set(keys) <= set(data), f"{name}: missing {set(keys) - set(data)}"
  assert _finite(data)
  if REGISTRY[name].plot is not None:
    assert isinstance(REGISTRY[name].plot(data), Figure)
  assert isinstance(getattr(experiments, name).summary(data), str)
  return data


def test_hypergrad_table_agrees():
  data = _check("ch1_hypergrad", cm.hypergrad_check("smoke"), ["rows", "implicit"])
  assert len(data["rows"]) == 2
  for row in data["rows"]:
    assert row["rel_fwd_rev"] < 1e-4 and row["rel_fwd_fd"] < 1e-4


def test_greedy_smoke_is_biased():
  data = _check("ch1_greedy", cm.greedy_quadratic("smoke"), ["optimum", "greedy", "runs"])
  t1 = data["runs"][0]
  assert t1["T"] == 1
  assert t1["final_val"] > 3 * data["optimum"]["val"]
  assert abs(t1["final_w2"] - data["greedy"]["w2"]) < 0.05
  assert len(t1["steps"]) == len(t1["w2"]) <= 2 * 20


def test_horizon_full_smoke():
  cfg = cm.horizon_full("smoke")
  data = _check("ch1_horizon_full", cfg, ["horizons", "budgets", "optimum"])
  for b in data["budgets"]:
    assert len(b["val"]) == len(cfg.horizons) and b["best_T"] in cfg.horizons
    assert [v is None for v in b["val"]] == [T > b["N"] for T in cfg.horizons]


def test_scaling_smoke():
  cfg = cm.horizon_scaling("smoke")
  data = _check("ch1_scaling", cfg, ["full", "minibatch", "budgets"])
  for case in ("full", "minibatch"):
    assert len(data[case]["T_star"]) == len(cfg.budgets)
    assert np.isfinite(data[case]["fit_log"]["r2"])


@pytest.mark.slow
def test_horizon_minibatch_smoke():
  cfg = cm.horizon_minibatch("smoke")
  data = _check("ch1_horizon_minibatch", cfg, ["horizons", "budgets"])
  for b in data["budgets"]:
    assert len(b["acc_mean"]) == len(cfg.horizons)
    assert all(0 <= a <= 1 for a in b["acc_mean"])
    assert np.allclose(np.sum(b["w_mean_TxK"], axis=1), 1, atol=1e-4)


@pytest.mark.slow
def test_adult_smoke():
  data = _check("ch1_adult", cm.adult_mixing("smoke"), ["methods", "domain_names"])
  assert len(data["methods"]) == 2 + 2
  for m in data["methods"]:
    assert abs(sum(m["w_mean"]) - 1) < 1e-4


def test_config_errors_name_field_and_allowed_values():
  with pytest.raises(ConfigError, match="smoke, book, paper"):
    cm.horizon_full("laptop")
  with pytest.raises(ConfigError, match=r"HorizonFullConfig\.outer.*'eg', 'pgd'"):
    cm.horizon_full("smoke", outer="adam")
  with pytest.raises(ConfigError, match=r"beta = -1.*> 0"):
    cm.horizon_scaling("smoke", beta=-1.0)
  with pytest.raises(ConfigError, match=r"horizons.*increasing"):
    cm.greedy_quadratic("smoke", horizons=(10, 1))
  with pytest.raises(ConfigError, match=r"\[3\] do not divide chunk = 100"):
    cm.horizon_minibatch("smoke", horizons=(1, 3))
  with pytest.raises(ConfigError, match="unknown field"):
    cm.adult_mixing("smoke", domain="race")
  with pytest.raises(ConfigError, match="domain_column.*'workclass'"):
    cm.adult_mixing("smoke", domain_column="income")


def test_registry_has_every_ch1_result():
  names = {n for n, e in REGISTRY.items() if e.chapter == "ch1_mixing"}
  assert names == {"ch1_hypergrad", "ch1_greedy", "ch1_horizon_full",
                   "ch1_horizon_minibatch", "ch1_scaling", "ch1_adult"}
