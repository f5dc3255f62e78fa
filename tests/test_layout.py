"""The architecture stays as documented: dependencies flow one way.

  types, configs  ->  data, models  ->  methods  ->  train  ->  experiments

``sharding`` (meshes, logical-axis rules) sits just above the configs, so the
models may place their parameters but sharding never imports a model;
``checkpoint`` sits below ``train``; within ``data`` the flow is sources -> build -> prepared ->
pipeline/mixture. Every ``import`` of a ``dataweights`` module, also inside
functions, is checked.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dataweights"

LAYER = {
  "types": 0, "configs": 0, "errors": 0, "weights": 0,
  "sharding": 0.5,  # meshes and logical-axis rules: below the models
  "data": 1, "models": 1, "metrics": 1,
  "methods": 2,
  "checkpoint": 3,
  "train": 4,
  "results": 5, "experiments": 6, "book": 7, "cli": 8, "__main__": 8,
}
DATA_STAGE = {"sources": 0, "build": 1, "prepare": 2, "prepared": 2, "tokenize": 0,
              "pipeline": 3, "mixture": 4, "online": 4, "instructions": 4}


def _imports(path: Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dataweights"):
      parts = node.module.split(".")
      if len(parts) == 1:  # from dataweights import x
        for alias in node.names:
          yield ["dataweights", alias.name]
      else:
        yield parts + ([node.names[0].name] if len(parts) == 2 and parts[1] == "data" else [])
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("dataweights."):
          yield alias.name.split(".")


def _module_parts(path: Path):
  return list(path.relative_to(SRC).with_suffix("").parts)


FILES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_dependencies_flow_one_way(path):
  me = _module_parts(path)
  if me[0] == "__init__":
    return
  mine = LAYER[me[0]]
  for target in _imports(path):
    top = target[1]
    if top not in LAYER:
      continue
    assert LAYER[top] <= mine, (
      f"{'/'.join(me)}.py imports dataweights.{'.'.join(target[1:])}: {me[0]} (layer {mine}) "
      f"must not depend on {top} (layer {LAYER[top]})")
    if me[0] == "data" and top == "data" and len(me) > 1 and len(target) > 2:
      src_stage = DATA_STAGE.get(me[1])
      dst_stage = DATA_STAGE.get(target[2])
      if src_stage is not None and dst_stage is not None:
        assert dst_stage <= src_stage, (
          f"data/{me[1]} imports data/{target[2]}: the data flow is "
          "sources -> build -> prepared -> pipeline -> mixture")


def test_the_checker_sees_a_violation(tmp_path):
  bad = tmp_path / "x.py"
  bad.write_text("def f():\n  from dataweights.train import loop\n")
  assert ["dataweights", "train", "loop"] in list(_imports(bad)) or ["dataweights", "train"] in [
    t[:2] for t in _imports(bad)]
