"""Chapter-3 experiments: statistics helpers, configs, smoke runs.

Oracles: the AUROC equals the brute-force fraction of correctly ordered
(positive, negative) pairs; the interval equals scipy's t-interval; common
random numbers make base and mixing train on identical generic rows.
"""

import dataclasses
import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy import stats

from dataweights import results
from dataweights.configs import ConfigError
from dataweights.configs import filtering as fcfg
from dataweights.experiments.ch3 import common, experiments, tasks
from dataweights.experiments.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("xla_cache")


def test_auroc_is_the_fraction_of_ordered_pairs():
  rng = np.random.default_rng(0)
  s = np.round(rng.normal(size=60), 1)  # ties on purpose
  pos = rng.random(60) < 0.4
  pairs = [
    1.0 if a > b else 0.5 if a == b else 0.0 for a in s[pos] for b in s[~pos]
  ]
  assert common.auroc(s, pos) == pytest.approx(np.mean(pairs), abs=1e-12)
  assert common.auroc(s, np.ones(60, bool)) != common.auroc(
    s, np.ones(60, bool)
  )  # nan


def test_mean_ci_is_the_t_interval():
  x = np.array([1.0, 2.5, 2.0, 4.0])
  m, half = common.mean_ci(x)
  lo, hi = stats.t.interval(0.95, 3, loc=x.mean(), scale=stats.sem(x))
  assert m == pytest.approx(x.mean()) and half == pytest.approx((hi - lo) / 2)
  assert math.isnan(common.mean_ci([1.0])[1])


def test_configs_check_their_fields():
  with pytest.raises(ConfigError, match="methods = .* must start with 'base'"):
    fcfg.filter_lm("smoke", methods=("dds",))
  with pytest.raises(ConfigError, match="target = 'poetry' is invalid"):
    fcfg.filter_lm("smoke", target="poetry")
  with pytest.raises(ConfigError, match="eval_every = 3 must divide steps = 8"):
    fcfg.filter_images("smoke", eval_every=3)
  with pytest.raises(ConfigError, match="at least 4 targets"):
    fcfg.sar_gar("smoke", image_targets=("uci",), text_targets=("news",))
  with pytest.raises(ConfigError, match="mixing_weight = 1.5 is invalid"):
    fcfg.filter_images("smoke", mixing_weight=1.5)
  # Every method of the tables can be built from a config.
  cfg = fcfg.filter_images("smoke")
  task = tasks.image_task(cfg)
  for name in fcfg.METHOD_NAMES:
    assert common.build_method(name, cfg, task.scorer).name == name


def _finite(x):
  if isinstance(x, dict):
    return all(_finite(v) for v in x.values())
  if isinstance(x, list):
    return all(_finite(v) for v in x)
  if isinstance(x, float):
    return math.isfinite(x)
  return True


@pytest.mark.slow
def test_digits_and_sargar_smoke():
  common.clear_caches()
  cfg = fcfg.filter_images("smoke", methods=("base", "mixing", "soba"))
  data = results.to_jsonable(experiments.run_digits(cfg))
  assert [r["method"] for r in data["table"]] == ["base", "mixing", "soba"]
  assert _finite(data["table"]) and isinstance(
    experiments.plots.plot_digits(data), Figure
  )
  assert "Δ target loss vs base" in experiments.summary_digits(data)
  base = data["table"][0]
  assert base["pre/spec_test/vs_base"] == 0.0  # paired with itself
  # Common random numbers: base and mixing see the same generic rows, so
  # their kept-row make-up is identical.
  mk = data["makeup"]["fractions"]
  assert mk["base"] == mk["mixing"] and mk["base"] != mk["soba"]
  # The SAR/GAR scatter reuses the digits runs (memoised) and adds targets.
  s = experiments.run_sargar(
    fcfg.sar_gar("smoke", image_targets=("uci", "uci_0to4", "noisy_0.2"))
  )
  s = results.to_jsonable(s)
  assert len(s["targets"]) == 4
  for t in s["targets"]:
    assert 0 <= t["sar"] <= 1 and 0 <= t["gar"] <= 1
    assert t["best"] in fcfg.SELECTION_METHODS
  assert isinstance(experiments.plots.plot_sargar(s), Figure)
  assert "Spearman(SAR, gain)" in experiments.summary_sargar(s)


def test_published_configs_rebuild():
  for name in ("ch3_lm", "ch3_digits", "ch3_noisy", "ch3_sargar"):
    entry = REGISTRY[name]
    cfg = entry.config("book")
    assert entry.make_config(**dataclasses.asdict(cfg)) == cfg
