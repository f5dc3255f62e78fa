"""Chapter-5 experiments: statistics helpers, configs, the selection pool.

Oracles: scipy's t-interval for ``mean_ci``; Fisher's z-interval computed
by hand for ``corr_ci``; the raw ``dw_instructions`` rows for the pool (the
seed set is disjoint from the pool, the corruption labels are exactly the
pairs whose response is not their own).
"""

import numpy as np
import pytest
from scipy import stats

from dataweights.configs import ConfigError
from dataweights.configs import influence as cfgs
from dataweights.experiments.ch5 import common, loo, select
from dataweights.experiments.registry import REGISTRY
from dataweights.methods import subset

pytestmark = pytest.mark.usefixtures("xla_cache")


def test_mean_ci_is_the_t_interval_with_ddof_1():
  x = np.array([1.0, 2.5, 2.0, 4.0])
  s = common.mean_ci(x)
  lo, hi = stats.t.interval(0.95, 3, loc=x.mean(), scale=stats.sem(x))
  assert s["mean"] == pytest.approx(x.mean())
  assert (s["lo"], s["hi"]) == pytest.approx((lo, hi), rel=1e-12)
  assert common.mean_ci([2.0]) == {"mean": 2.0, "lo": 2.0, "hi": 2.0, "n": 1}


def test_corr_ci_is_the_fisher_z_interval():
  r = np.array([0.9, 0.95, 0.8])
  z = np.arctanh(r)
  lo, hi = stats.t.interval(0.95, 2, loc=z.mean(), scale=stats.sem(z))
  s = common.corr_ci(r)
  assert (s["lo"], s["mean"], s["hi"]) == pytest.approx(
    (np.tanh(lo), np.tanh(z.mean()), np.tanh(hi)), rel=1e-12
  )
  assert -1 < s["lo"] < s["hi"] < 1


def test_bootstrap_corr_brackets_the_sample_correlation():
  rng = np.random.default_rng(0)
  x = rng.normal(size=80)
  y = x + 0.5 * rng.normal(size=80)
  lo, hi = common.bootstrap_corr(x, y, 500, seed=1)
  assert lo < np.corrcoef(x, y)[0, 1] < hi
  assert common.bootstrap_corr(x, y, 500, seed=1) == [lo, hi]


def test_config_name_lists_agree_with_the_library():
  # configs sit below data and methods, so they keep their own copies
  from dataweights.data.sources.instructions import SOURCE_NAMES
  from dataweights.methods import kfac

  assert cfgs.INSTRUCTION_SOURCES == SOURCE_NAMES
  assert cfgs.KFAC_METHODS == kfac.METHODS


def test_configs_check_their_fields():
  with pytest.raises(ConfigError, match="unknown source 'poetry'"):
    cfgs.selection("smoke", sources=("chat", "poetry"))
  with pytest.raises(ConfigError, match="target"):
    cfgs.selection("smoke", target="news")  # not among the smoke sources
  with pytest.raises(ConfigError, match="budgets = .* fractions in"):
    cfgs.selection("smoke", budgets=(0.1, 1.5))
  with pytest.raises(ConfigError, match="checkpoints = 3 must divide"):
    cfgs.selection("smoke", checkpoints=3)
  with pytest.raises(ConfigError, match="gdig_method"):
    cfgs.selection("smoke", gdig_method="shampoo")
  with pytest.raises(ConfigError, match="n_removed = 70 exceeds n_train"):
    cfgs.influence_loo("smoke", n_removed=70)
  with pytest.raises(ConfigError, match="seeds"):
    cfgs.influence_loo("smoke", seeds=(1, 1))
  for profile in ("smoke", "book", "paper"):
    cfgs.selection(profile)
    cfgs.influence_loo(profile)


def test_pool_labels_and_disjoint_seed_set():
  from dataweights.data import prepared
  from dataweights.data.sources.instructions import SOURCE_NAMES

  cfg = cfgs.selection("smoke")
  data = select.build_pool(cfg, seed=3)
  n = len(cfg.sources) * cfg.pool_per_source
  assert data["pool"]["tokens_BxL"].shape == (n, cfg.seq_len)
  assert data["seed"]["tokens_BxL"].shape == (cfg.seed_size, cfg.seq_len)
  # corrupt_rate of the pool is swapped (a swap of two equal responses is
  # no corruption, so at most that many)
  assert 0 < data["corrupted_N"].sum() <= round(cfg.corrupt_rate * n)
  assert data["target_N"].sum() == cfg.pool_per_source
  # The seed set shares no row with the pool, and is the target's text.
  pool_rows = {r.tobytes() for r in data["pool"]["tokens_BxL"]}
  assert not pool_rows & {r.tobytes() for r in data["seed"]["tokens_BxL"]}
  train = prepared.instruction_split("train")
  tgt = train["source_M"] == SOURCE_NAMES.index(cfg.target)
  assert tgt.sum() >= cfg.seed_size
  # Same program, same pool.
  again = select.build_pool(cfg, seed=3)
  np.testing.assert_array_equal(
    again["pool"]["tokens_BxL"], data["pool"]["tokens_BxL"]
  )
  np.testing.assert_array_equal(again["corrupted_N"], data["corrupted_N"])


def test_seed_set_of_another_modality_is_refused():
  cfg = cfgs.selection("smoke")
  data = select.build_pool(cfg, seed=0)
  data["seed"] = {"x_BxI": np.zeros((4, 64), np.float32)}
  with pytest.raises(subset.SelectionError, match="not the same modality"):
    select.scores_for(cfg, 0, data)


def test_results_are_registered_for_the_chapter():
  for name in ("ch5_loo", "ch5_select"):
    assert REGISTRY[name].chapter == "ch5_influence"
  assert loo.ESTIMATORS[0] == "hessian"


@pytest.mark.slow
def test_smoke_runs_end_to_end():
  d = loo.run(cfgs.influence_loo("smoke"))
  # exact-Hessian influence predicts leave-one-out on the convex model
  r = d["models"]["logistic"]["summary"]["hessian"]["pearson"]["mean"]
  assert r > 0.95
  assert "Pearson r" in loo.summary(d)
  s = select.run(cfgs.selection("smoke"))
  per = s["per_seed"][0]
  for rows in per["budgets"].values():
    assert set(rows) == set(cfgs.SELECTION_METHODS)
    for row in rows.values():
      assert 0 <= row["corrupted"] <= 1 and np.isfinite(row["target_loss"])
  assert "AUROC" in select.summary(s)
