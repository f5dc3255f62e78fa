"""Chapter 2's experiments: config checks, statistics, analyses, end to end.

The analyses are tested on synthetic runs (``run_all`` replaced by known
numbers, so every reported interval has a hand-computed oracle); one slow
test runs the whole smoke profile through ``publish``.
"""

import math

import numpy as np
import pytest

from dataweights import experiments
from dataweights.configs.base import ConfigError
from dataweights.configs.lm_mixing import lm_mixing
from dataweights.experiments.ch2 import (
  all_domains,
  common,
  horizon_question,
  runs,
  specific,
  weights,
)
from dataweights.experiments.registry import REGISTRY

CH2 = ("ch2_all_domains", "ch2_specific", "ch2_weights", "ch2_horizon")


def test_registered_with_config_factory_plot_and_summary():
  for name in CH2:
    e = REGISTRY[name]
    assert e.chapter == "ch2_lm_mixing" and e.plot and e.summary
    assert e.config("smoke").profile == "smoke"


def test_config_checks():
  assert lm_mixing("book").num_domains == 11
  with pytest.raises(
    ConfigError,
    match="batch_size = 8 is invalid; it must be >= the number of domains",
  ):
    lm_mixing("book", batch_size=8)
  with pytest.raises(ConfigError, match="seeds = \\(0,\\) is invalid"):
    lm_mixing("book", seeds=(0,))
  with pytest.raises(ConfigError, match="horizons = \\(1, 500\\) is invalid"):
    lm_mixing("book", horizons=(1, 500))
  with pytest.raises(ConfigError, match="target = 'poetry' is invalid"):
    lm_mixing("book", target="poetry")
  with pytest.raises(ConfigError, match="temperature = 0.5 is invalid"):
    lm_mixing("book", temperature=0.5)


def test_t_interval_is_student_t_with_ddof_1():
  ci = common.t_interval([1.0, 2.0, 3.0])
  # sd = 1, t_{0.975, 2} = 4.302653, half = 4.302653 / sqrt(3).
  assert ci["mean"] == 2.0
  assert math.isclose(ci["half"], 4.302653 / math.sqrt(3), rel_tol=1e-6)
  assert math.isclose(ci["lo"], 2.0 - ci["half"])
  with pytest.raises(ValueError, match=">= 2 values"):
    common.t_interval([1.0])


def test_fixed_weights():
  cfg = lm_mixing("smoke")
  tokens = np.arange(1.0, 12.0)
  np.testing.assert_allclose(
    runs.fixed_weights(cfg, tokens, "natural", "A"), tokens / tokens.sum()
  )
  w = runs.fixed_weights(cfg, tokens, "stratified", "B")
  k = cfg.domains.index(cfg.target)
  assert (
    w[k] == 0
    and math.isclose(w.sum(), 1.0)
    and np.allclose(np.delete(w, k), 0.1)
  )
  t = runs.fixed_weights(cfg, tokens, "temperature", "A")
  np.testing.assert_allclose(
    t, tokens ** (1 / 3) / (tokens ** (1 / 3)).sum(), rtol=1e-6
  )


@pytest.fixture
def fake_runs(monkeypatch):
  """``run_all`` replaced by known per-seed losses and weights."""
  cfg = lm_mixing("smoke")
  K, S = cfg.num_domains, len(cfg.seeds)
  rng = np.random.default_rng(0)
  out = {"A": {}, "B": {}}
  for target in ("A", "B"):
    for i, m in enumerate(runs.methods(cfg, target)):
      recs = []
      for s in range(S):
        rec = {
          "loss_K": 2.0
          + 0.01 * i
          + 0.1 * np.arange(K) / K
          + 0.02 * s
          + 0.001 * rng.random(K),
          "final_w_K": np.full(K, 1 / K),
        }
        if m not in runs.BASELINES_A:
          rec["w_SxK"] = np.full((cfg.steps // cfg.weight_every, K), 1 / K)
        recs.append(rec)
      out[target][m] = recs
  data = {"runs": out, "tokens_K": np.arange(1.0, K + 1)}
  monkeypatch.setattr(runs, "run_all", lambda c: data)
  return cfg, data


def test_all_domains_analysis(fake_runs):
  cfg, data = fake_runs
  d = all_domains.run(cfg)
  A = data["runs"]["A"]
  for m in d["methods"]:
    L = np.array([r["loss_K"] for r in A[m]])
    base = np.array([r["loss_K"] for r in A["stratified"]])
    want = common.t_interval(L.mean(1) - base.mean(1))
    got = d["rows"][m]["avg_minus_stratified"]
    assert math.isclose(got["mean"], want["mean"], rel_tol=1e-5, abs_tol=1e-9)
    assert math.isclose(
      d["rows"][m]["worst"]["mean"], L.max(1).mean(), rel_tol=1e-5
    )
  assert d["rows"]["stratified"]["avg_minus_stratified"]["mean"] == 0.0
  text = all_domains.summary(d)
  assert "stratified uniform" in text and "horizon T=2" in text
  png = experiments.registry.REGISTRY["ch2_all_domains"].plot(d)
  assert png is not None


def test_specific_analysis(fake_runs):
  cfg, data = fake_runs
  d = specific.run(cfg)
  k = cfg.domains.index(cfg.target)
  B = data["runs"]["B"]
  for m in d["methods"]:
    L = np.array([r["loss_K"] for r in B[m]])
    assert math.isclose(
      d["rows"][m]["target"]["mean"], L[:, k].mean(), rel_tol=1e-5
    )
    others = np.delete(L, k, axis=1).mean(1)
    assert math.isclose(
      d["rows"][m]["others"]["mean"], others.mean(), rel_tol=1e-5
    )
  ref = np.array([r["loss_K"] for r in data["runs"]["A"]["stratified"]])[:, k]
  assert math.isclose(
    d["in_domain"]["target"]["mean"], ref.mean(), rel_tol=1e-5
  )
  assert "in-domain reference" in specific.summary(d)


def test_horizon_question_and_weights(fake_runs):
  cfg, data = fake_runs
  d = horizon_question.run(cfg)
  for target in ("A", "B"):
    t = d["targets"][target]
    assert t["reference"] == "horizon_T1"
    assert set(t["rows"]) == {"horizon_T2", "alignment", "stratified"}
  # Target A, horizon T=2 minus T=1: 0.01 * (index difference) in every seed.
  i2 = runs.methods(cfg, "A").index("horizon_T2")
  i1 = runs.methods(cfg, "A").index("horizon_T1")
  diff = d["targets"]["A"]["rows"]["horizon_T2"]["minus_reference"]["mean"]
  assert math.isclose(diff, 0.01 * (i2 - i1), rel_tol=0.2)
  assert "Paired over 2 seeds" in horizon_question.summary(d)
  w = weights.run(cfg)
  assert [(p["target"], p["method"]) for p in w["panels"]] == [
    ("A", "doremi"),
    ("A", "odm"),
    ("A", "alignment"),
    ("A", "horizon_T1"),
    ("A", "horizon_T2"),
    ("B", "alignment"),
    ("B", "horizon_T1"),
    ("B", "horizon_T2"),
  ]
  assert "Final domain weights" in weights.summary(w)
  for name in ("ch2_horizon", "ch2_weights"):
    assert (
      REGISTRY[name].plot(
        horizon_question.run(cfg) if name == "ch2_horizon" else w
      )
      is not None
    )


@pytest.mark.slow
def test_smoke_profile_publishes_every_result(tmp_path):
  for name in CH2:
    res = experiments.publish(name, "smoke", str(tmp_path))
    assert (tmp_path / f"{name}.json").exists() and (
      tmp_path / f"{name}.png"
    ).exists()
    assert res.summary and res._repr_png_()[:4] == b"\x89PNG"
  # The runs are shared: every weight panel has the smoke run's steps.
  w = experiments.publish("ch2_weights", "smoke", "").data
  assert all(len(p["steps"]) == 3 for p in w["panels"])
  assert "plain" in runs.cost_table()
