"""Chapter 4's experiments: config checks, helpers with oracles, end to end.

Oracles: Student-t quantiles by hand; GPT-2's byte-to-token table (known
ids of " ", "\\n", "!" and "A"); an unpadded run for the padded source
axis; the largest-remainder counts of the resampled sets.
"""

import math

import numpy as np
import pytest

from dataweights.configs import scalebio as configs
from dataweights.configs.base import ConfigError
from dataweights.data import tokenize
from dataweights.experiments.ch4 import common, mixture, two_sources
from dataweights.experiments.registry import REGISTRY

CH4 = ("ch4_noise", "ch4_two_sources", "ch4_mixture")

pytestmark = pytest.mark.usefixtures("xla_cache")


def test_registered_with_config_factory_plot_and_summary():
  for name in CH4:
    e = REGISTRY[name]
    assert e.chapter == "ch4_scalebio" and e.plot and e.summary
    assert e.config("smoke").profile == "smoke"


def test_config_source_names_equal_the_data_layers():
  from dataweights.data.sources.instructions import SOURCE_NAMES

  assert configs.SOURCE_NAMES == SOURCE_NAMES


def test_bad_configs_are_clear_errors():
  with pytest.raises(
    ConfigError, match=r"alpha = 0 is invalid; it must be a finite number > 0"
  ):
    configs.noise_ordering("smoke", alpha=0)
  with pytest.raises(ConfigError, match=r"alpha = -1.0 is invalid"):
    configs.two_sources("smoke", alpha=-1.0)
  with pytest.raises(
    ConfigError, match=r"source = 'poetry' is not an instruction source"
  ):
    configs.noise_ordering("smoke", source="poetry")
  with pytest.raises(ConfigError, match=r"unknown source\(s\) \['poetry'\]"):
    configs.two_sources("smoke", sources=("chat", "poetry"))
  with pytest.raises(
    ConfigError, match=r"valid_sources = \(\) is invalid.*at least one source"
  ):
    configs.two_sources("smoke", valid_sources=())
  with pytest.raises(ConfigError, match=r"target = 'chat' is also a training"):
    configs.mixture("smoke", target="chat")
  with pytest.raises(
    ConfigError,
    match=r"lisa_active = 3 is invalid: the model has only num_layers = 2",
  ):
    configs.noise_ordering("smoke", lisa_active=3)
  with pytest.raises(ConfigError, match=r"sources = \('chat', 'chat'\)"):
    configs.two_sources("smoke", sources=("chat", "chat"))
  with pytest.raises(ConfigError, match=r"seeds = \(\) is invalid"):
    configs.mixture("smoke", seeds=())


def test_t_interval_is_student_t_with_ddof_1():
  mean, half = common.t_interval([1.0, 2.0, 3.0])
  # sd = 1, t_{0.975, 2} = 4.302653.
  assert mean == 2.0
  assert math.isclose(half, 4.302653 / math.sqrt(3), rel_tol=1e-6)


def test_gpt2_ids_are_gpt2_single_byte_tokens():
  row = tokenize.encode(" \n!A")
  # GPT-2's vocabulary: "!" 0, "A" 32, "\n" 198, " " 220.
  # BOS and EOS around the bytes become <|endoftext|>.
  want = [common.GPT2_EOT, 220, 198, 0, 32, common.GPT2_EOT]
  np.testing.assert_array_equal(common.gpt2_ids(row), want)
  specials = [tokenize.BOS_ID, tokenize.EOS_ID, tokenize.PAD_ID]
  assert (common.gpt2_ids(np.array(specials)) == common.GPT2_EOT).all()
  assert common.gpt2_ids(np.array([tokenize.SEP_ID])) == 198
  ids = common.gpt2_ids(np.arange(256))
  assert sorted(ids.tolist()) == list(range(256))  # a bijection on bytes


@pytest.mark.slow  # two compiled ScaleBiO programs and a fine-tuning one
def test_padded_sources_equal_an_unpadded_run_and_stage_two_budget():
  cfg = configs.two_sources("smoke", steps=3, seeds=(0, 1))
  padded = two_sources.run(cfg)
  unpadded = two_sources.run(
    configs.two_sources("smoke", steps=3, seeds=(0, 1), pad_sources=2)
  )
  lam = np.asarray(padded["lambda_SxRxK"])
  # Weight-0 sources change no real weight (same sums up to reduction order).
  np.testing.assert_allclose(lam, unpadded["lambda_SxRxK"], rtol=1e-6)
  np.testing.assert_allclose(lam.sum(-1), 1.0, rtol=1e-6)
  assert np.abs(lam[-1] - 0.5).max() > 1e-4  # the weights moved

  mcfg = configs.mixture("smoke", steps=3)
  data = mixture.run(mcfg)
  k = len(mcfg.sources)
  for key, n_K in data["rows_per_source"].items():
    mix, seed = key.split("/")
    assert sum(n_K) == mcfg.resample_rows  # the same budget for every mixture
    if mix == "uniform":
      w = np.full(k, 1 / k)
    elif mix == "natural":
      w = np.asarray(data["natural_K"])
    else:
      w = np.asarray(data["final_lambda_RxK"])[mcfg.seeds.index(int(seed))]
    assert np.abs(np.asarray(n_K) - mcfg.resample_rows * w).max() < 1
  loss = np.asarray(data["test_loss_MxR"])
  assert loss.shape == (3, len(mcfg.seeds)) and np.isfinite(loss).all()
