"""Published-result I/O and the shared config machinery."""

import dataclasses
import json

import numpy as np
import pytest

from dataweights import results
from dataweights.configs import base
from dataweights.configs.base import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class _Cfg:
  profile: str
  steps: int
  lr: float
  mode: str = "a"

  def __post_init__(self):
    base.check_profile(self.profile)
    base.check_int(self, "steps")
    base.check_positive(self, "lr")
    base.check_choice(self, "mode", ("a", "b"))


_PRESETS = {"smoke": dict(steps=2, lr=0.1), "book": dict(steps=20, lr=0.1), "paper": dict(steps=2000, lr=0.01)}


def test_from_profile_presets_and_overrides():
  cfg = base.from_profile(_Cfg, _PRESETS, "book", {"lr": 0.5})
  assert cfg == _Cfg(profile="book", steps=20, lr=0.5)
  assert base.from_profile(_Cfg, _PRESETS, "paper", {}).steps == 2000


@pytest.mark.parametrize(
  "profile, overrides, match",
  [
    ("fast", {}, r"unknown profile 'fast'; allowed profiles are smoke, book, paper"),
    ("book", {"stepz": 3}, r"unknown field\(s\) stepz for _Cfg; known fields are lr, mode, profile, steps"),
    ("book", {"steps": 0}, r"_Cfg.steps = 0 is invalid; it must be an integer >= 1"),
    ("book", {"steps": 2.5}, r"_Cfg.steps = 2.5 is invalid"),
    ("book", {"lr": float("nan")}, r"_Cfg.lr = nan is invalid; it must be a finite number > 0"),
    ("book", {"lr": -1.0}, r"_Cfg.lr = -1.0 is invalid"),
    ("book", {"mode": "c"}, r"_Cfg.mode = 'c' is invalid; allowed values are 'a', 'b'"),
  ],
)
def test_bad_configs_name_the_field_and_allowed_values(profile, overrides, match):
  with pytest.raises(ConfigError, match=match):
    base.from_profile(_Cfg, _PRESETS, profile, overrides)


def test_configs_are_frozen():
  cfg = base.from_profile(_Cfg, _PRESETS, "smoke", {})
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.steps = 3  # type: ignore[misc]


def test_save_load_roundtrip_with_provenance(tmp_path):
  cfg = base.from_profile(_Cfg, _PRESETS, "smoke", {})
  data = {"x_N": np.arange(3, dtype=np.float32), "best": np.float64(0.25), "inf": float("inf")}
  path = results.save("r", data, tmp_path, config=cfg, profile="smoke", wall_time_s=1.234)
  rec = results.load("r", tmp_path)
  assert rec["data"] == {"x_N": [0.0, 1.0, 2.0], "best": 0.25, "inf": "inf"}
  assert rec["config"] == {"profile": "smoke", "steps": 2, "lr": 0.1, "mode": "a"}
  prov = rec["provenance"]
  assert prov["profile"] == "smoke" and prov["wall_time_s"] == 1.23
  assert {"jax", "numpy"} <= set(prov["versions"]) and prov["device"].startswith("cpu")
  assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_empty_results_dir_writes_nothing(tmp_path):
  assert results.save("r", {"a": 1}, "", profile="book") is None
  assert results.save_figure(object(), "r", None) is None


def test_load_errors_are_clear(tmp_path):
  with pytest.raises(results.ResultError, match="no published result 'nope'"):
    results.load("nope", tmp_path)
  (tmp_path / "bad.json").write_text('{"name": "bad", "da')
  with pytest.raises(results.ResultError, match="is corrupt"):
    results.load("bad", tmp_path)
  (tmp_path / "partial.json").write_text(json.dumps({"name": "partial"}))
  with pytest.raises(results.ResultError, match="lacks the field 'data'"):
    results.load("partial", tmp_path)


def test_png_bytes_are_reproducible(tmp_path):
  from matplotlib.figure import Figure

  def render(d):
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([0, 1, 2], [1, 3, 2], marker="o")
    return results.save_figure(fig, "f", d)

  a, b = render(tmp_path / "a"), render(tmp_path / "b")
  assert a.read_bytes() == b.read_bytes()


# --- the composed run config ---------------------------------------------------


@pytest.mark.parametrize("profile", ["smoke", "book", "paper"])
def test_run_presets_agree(profile):
  from dataweights.configs import run

  cfg = run.run(profile)
  assert cfg.pipeline.seq_len == cfg.model.max_len + 1
  assert cfg.pipeline.batch_size == cfg.train.batch_size
  assert cfg.to_dict()["train"]["batch_size"] == cfg.train.batch_size


def test_run_config_rules_name_the_fields():
  from dataweights.configs import run

  with pytest.raises(ConfigError, match=r"pipeline.seq_len = 50 does not fit model.max_len = 32.*33"):
    run.run("smoke", pipeline=dict(seq_len=50))
  with pytest.raises(ConfigError, match=r"pipeline.batch_size = 8 and train.batch_size = 4 differ"):
    run.run("smoke", pipeline=dict(batch_size=8))
  with pytest.raises(ConfigError, match=r"train.microbatch_size = 4 does not split over .* data x fsdp = 8"):
    run.run("smoke", mesh=dict(data=8))
  with pytest.raises(ConfigError, match=r"model.num_heads = 4 does not split over the tensor axis model = 8"):
    run.run("smoke", train=dict(batch_size=8), mesh=dict(data=1, model=8))
  with pytest.raises(ConfigError, match="unknown field"):
    run.run("smoke", model=dict(layers=3))
  cfg = run.run("book", mesh=dict(data=-1))
  assert cfg.check_devices(8) == {"data": 8, "fsdp": 1, "model": 1}
  with pytest.raises(ConfigError, match=r"train.microbatch_size = 16 does not split .* = 3"):
    cfg.check_devices(3)
