"""Property tests: every public config accepts valid values or names the field.

For each config factory (``configs.*`` and the pipeline's), random values for
each field alone and for random sets of fields, under a random profile
(values drawn around the field's type and around its default with one part
replaced by an adversarial value: a bool for an int, NaN, a string, a
list for a tuple, ...): the factory either
returns a config whose every field has its annotated type (ints are ints,
floats finite, tuples of the right kind) or raises :class:`ConfigError`
naming one of the fields set. Unknown fields and profiles are refused by
name too.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataweights.configs import data, lm, mixing, run, train
from dataweights.configs.base import PROFILES, ConfigError
from dataweights.data import pipeline
from props import anything, conforms, examples, outcome, value_for

FACTORIES = {
  "data": (data.data, data.DataConfig),
  "lm_model": (lm.lm_model, lm.ModelConfig),
  "mesh": (lm.mesh, lm.MeshConfig),
  "train": (train.train, train.TrainConfig),
  "pipeline": (pipeline.pipeline, pipeline.PipelineConfig),
  "hypergrad_check": (mixing.hypergrad_check, mixing.HypergradCheckConfig),
  "greedy_quadratic": (mixing.greedy_quadratic, mixing.GreedyQuadraticConfig),
  "horizon_full": (mixing.horizon_full, mixing.HorizonFullConfig),
  "horizon_minibatch": (
    mixing.horizon_minibatch,
    mixing.HorizonMinibatchConfig,
  ),
  "horizon_scaling": (mixing.horizon_scaling, mixing.HorizonScalingConfig),
  "minibatch_scaling": (
    mixing.minibatch_scaling,
    mixing.MinibatchScalingConfig,
  ),
  "adaptive_horizon": (mixing.adaptive_horizon, mixing.AdaptiveHorizonConfig),
  "adult_mixing": (mixing.adult_mixing, mixing.AdultMixingConfig),
}


def _fields(cls) -> dict[str, str]:
  return {
    f.name: f.type for f in dataclasses.fields(cls) if f.name != "profile"
  }


def _defaults(cls) -> dict[str, object]:
  return {f.name: f.default for f in dataclasses.fields(cls)}


def _check(name, overrides, profile):
  """The property, for one factory call."""
  factory, cls = FACTORIES[name]
  fields = _fields(cls)
  try:
    cfg = factory(profile, **overrides)
  except ConfigError as e:
    outcome("ConfigError")
    assert any(k in str(e) for k in overrides), (
      f"error names none of {sorted(overrides)}: {e}"
    )
    return
  outcome("accepted")
  bad = {
    k: getattr(cfg, k)
    for k, ann in fields.items()
    if not conforms(getattr(cfg, k), ann)
  }
  assert not bad, f"{cls.__name__} accepted ill-typed {bad}"


FIELDS = [
  (name, field)
  for name, (_, cls) in sorted(FACTORIES.items())
  for field in _fields(cls)
]


@pytest.mark.parametrize("name,field", FIELDS)
@examples(25)
@given(data=st.data())
def test_each_field_validates_or_is_named(name, field, data):
  cls = FACTORIES[name][1]
  value = data.draw(value_for(_fields(cls)[field], _defaults(cls)[field]))
  _check(name, {field: value}, data.draw(st.sampled_from(PROFILES)))


@pytest.mark.parametrize("name", sorted(FACTORIES))
@examples(60)
@given(data=st.data())
def test_random_field_combinations_validate_or_name_a_field(name, data):
  """Several fields at once: cross-field checks name one of them."""
  cls = FACTORIES[name][1]
  fields, defaults = _fields(cls), _defaults(cls)
  chosen = data.draw(
    st.lists(
      st.sampled_from(sorted(fields)), min_size=2, max_size=4, unique=True
    )
  )
  overrides = {
    k: data.draw(value_for(fields[k], defaults[k]), label=k) for k in chosen
  }
  _check(name, overrides, data.draw(st.sampled_from(PROFILES)))


@pytest.mark.parametrize("name", sorted(FACTORIES))
@examples(15)
@given(profile=anything, field=st.text(min_size=1, max_size=8), value=anything)
def test_unknown_profiles_and_fields_are_named(name, profile, field, value):
  factory, cls = FACTORIES[name]
  if profile not in PROFILES:
    with pytest.raises(ConfigError, match="profile"):
      factory(profile)
  if field not in {f.name for f in dataclasses.fields(cls)} | {"profile"}:
    with pytest.raises(ConfigError, match="unknown field"):
      factory("smoke", **{field: value})


def test_presets_conform():
  """The shipped presets themselves pass the type check (the oracle works)."""
  for factory, cls in FACTORIES.values():
    for profile in PROFILES:
      cfg = factory(profile)
      for k, ann in _fields(cls).items():
        assert conforms(getattr(cfg, k), ann), (cls.__name__, profile, k)


PARTS = {
  "model": lm.ModelConfig,
  "pipeline": pipeline.PipelineConfig,
  "train": train.TrainConfig,
  "mesh": lm.MeshConfig,
}


@examples(60)
@given(data=st.data())
def test_run_config_validates_or_names_the_field(data):
  """The composed run config: per-part overrides, cross-part rules."""
  overrides: dict[str, dict] = {}
  for _ in range(data.draw(st.integers(1, 3))):
    part = data.draw(st.sampled_from(sorted(PARTS)))
    cls = PARTS[part]
    field = data.draw(st.sampled_from(sorted(_fields(cls))))
    value = data.draw(value_for(_fields(cls)[field], _defaults(cls)[field]))
    overrides.setdefault(part, {})[field] = value
  profile = data.draw(st.sampled_from(PROFILES))
  try:
    cfg = run.run(profile, **overrides)
  except ConfigError as e:
    outcome("ConfigError")
    named = [f for fields in overrides.values() for f in fields]
    assert any(f in str(e) for f in named), f"names none of {named}: {e}"
    return
  outcome("accepted")
  for part, cls in PARTS.items():
    sub = getattr(cfg, part)
    for k, ann in _fields(cls).items():
      assert conforms(getattr(sub, k), ann), (part, k, getattr(sub, k))
