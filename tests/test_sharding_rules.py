"""Sharding rules, mesh configs and divisibility checks (single process).

Multi-device numerics (sharded == single device) are in tests/sharding/.
"""

import re

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from dataweights import sharding
from dataweights.configs import lm
from dataweights.configs.base import ConfigError
from dataweights.models import transformer as tr
from dataweights.models.transformer import Transformer

CFG = lm.lm_model(
  "smoke", num_layers=2, d_model=32, num_heads=4, d_mlp=64, tie_embeddings=False
)

# Expected mesh specs, written out by hand per parameter (regex on the path).
EXPECTED = {
  "RULES": [
    (r"wte", P("model", "fsdp")),
    (r"wpe", P(None, "fsdp")),
    (r"head", P("fsdp", "model")),
    (r".*ln_(1|2|f)/(scale|bias)", P(None)),
    (r".*attn/(query|key|value)/kernel", P("fsdp", "model", None)),
    (r".*attn/(query|key|value)/bias", P("model", None)),
    (r".*attn/out/kernel", P("model", None, "fsdp")),
    (r".*attn/out/bias", P(None)),
    (r".*mlp/fc/kernel", P("fsdp", "model")),
    (r".*mlp/fc/bias", P("model")),
    (r".*mlp/proj/kernel", P("model", "fsdp")),
    (r".*mlp/proj/bias", P(None)),
  ],
  "REPLICATED_RULES": [(r".*", None)],  # None: all-None spec of full rank
}


def _abstract(cfg=CFG):
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def _mesh(data, fsdp, model):
  return AbstractMesh(
    (data, fsdp, model), lm.MESH_AXES, axis_types=(AxisType.Auto,) * 3
  )


@pytest.mark.parametrize("rules_name", ["RULES", "REPLICATED_RULES"])
def test_partition_spec_of_every_parameter(rules_name):
  rules = getattr(sharding, rules_name)
  abstract = _abstract()
  specs = dict(nnx.to_flat_state(sharding.partition_specs(abstract, rules)))
  params = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  assert specs.keys() == params.keys()
  for path, var in params.items():
    name = "/".join(str(p) for p in path)
    spec = specs[path].get_value()
    want = next(s for pat, s in EXPECTED[rules_name] if re.fullmatch(pat, name))
    if want is None:
      want = P(*([None] * var.get_value().ndim))
    assert spec == want, f"{name}: got {spec}, expected {want}"
    assert len(spec) == var.get_value().ndim, name


def test_rules_table_is_small_and_names_mesh_axes_only():
  assert len(sharding.RULES) <= 8
  names = [n for n, _ in sharding.RULES]
  assert len(set(names)) == len(names)
  for _, axes in sharding.RULES:
    for a in (axes,) if isinstance(axes, str) else axes or ():
      assert a in lm.MESH_AXES
  # every logical name used by the model has a rule
  used = set()
  for _, var in nnx.to_flat_state(nnx.state(_abstract(), nnx.Param)):
    used |= set(var.get_metadata()["out_sharding"])
  assert used <= set(names)
  assert sharding.logical_to_mesh(("batch", "length")) == P(
    ("data", "fsdp"), None
  )
  with pytest.raises(KeyError, match="'speed' has no sharding rule"):
    sharding.logical_to_mesh(("speed",))


def test_resolve_mesh_shape():
  cfg = lm.MeshConfig
  assert sharding.resolve_mesh_shape(cfg(), 8) == (8, 1, 1)
  assert sharding.resolve_mesh_shape(cfg(data=2, fsdp=-1), 8) == (2, 4, 1)
  assert sharding.resolve_mesh_shape(cfg(data=2, fsdp=2, model=2), 8) == (
    2,
    2,
    2,
  )
  with pytest.raises(
    ConfigError, match="multiply to 3, which does not divide 8"
  ):
    sharding.resolve_mesh_shape(cfg(data=-1, model=3), 8)
  with pytest.raises(ConfigError, match="needs 4 devices but 8 are available"):
    sharding.resolve_mesh_shape(cfg(data=2, fsdp=2, model=1), 8)


def test_make_mesh_single_device():
  mesh = sharding.make_mesh(lm.mesh("smoke"))
  assert mesh.axis_names == lm.MESH_AXES
  assert mesh.shape == {"data": jax.device_count(), "fsdp": 1, "model": 1}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sharding.batch_sharding(mesh, 2).spec == P(("data", "fsdp"), None)
  assert sharding.replicated(mesh).spec == P()


@pytest.mark.parametrize(
  "fields,match",
  [
    (dict(data=0), r"MeshConfig.data = 0 is invalid"),
    (dict(fsdp=-1), r"more than one axis set to -1"),
    (dict(model=2.0), r"MeshConfig.model = 2.0 is invalid"),
    (dict(process_id=-1), r"process_id = -1 is invalid"),
  ],
)
def test_bad_mesh_configs(fields, match):
  with pytest.raises(ConfigError, match=match):
    lm.MeshConfig(**fields)


def test_check_divisible_batch_and_model():
  mesh = _mesh(2, 2, 2)
  sharding.check_divisible(mesh, batch_size=8, state=tr.abstract_model(CFG))
  with pytest.raises(
    ConfigError, match=r"batch size 6 is not divisible by the 4 batch shards"
  ):
    sharding.check_divisible(mesh, batch_size=6)
  # 4 heads do not split over a tensor-parallel axis of 8
  with pytest.raises(
    ConfigError,
    match=r"blocks/0/attn/key/bias of shape \(4, 8\): dimension 0 \(size 4\) "
    r"is not divisible by mesh axes model of total size 8",
  ):
    sharding.check_divisible(_mesh(1, 1, 8), state=tr.abstract_model(CFG))
  # d_model = 36 does not split over fsdp = 8
  bad = lm.lm_model("smoke", d_model=36, num_heads=4)
  with pytest.raises(
    ConfigError, match=r"of shape \(36, 4, 9\): dimension 0 \(size 36\)"
  ):
    sharding.check_divisible(_mesh(1, 8, 1), state=tr.abstract_model(bad))
  # replicated rules accept any model
  sharding.check_divisible(
    _mesh(1, 8, 1), state=tr.abstract_model(bad), rules=sharding.REPLICATED_RULES
  )


def test_model_inside_mesh_needs_rules():
  mesh = sharding.make_mesh(lm.MeshConfig())
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="without logical axis rules"):
      Transformer(CFG, rngs=nnx.Rngs(0))


def test_maybe_initialize_distributed_checks_fields():
  assert sharding.maybe_initialize_distributed(lm.MeshConfig()) is False
  partial = lm.MeshConfig(distributed=True, coordinator_address="h:1234")
  with pytest.raises(ConfigError, match="partly set"):
    sharding.maybe_initialize_distributed(partial)
