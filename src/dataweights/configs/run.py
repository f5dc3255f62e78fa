"""One composed config for a language-model run, and the rules between parts.

A run needs a model, a data pipeline, a training config and a mesh; each is
valid on its own (its own ``__post_init__``), but they must also agree:

* the pipeline's rows hold ``seq_len = model.max_len + 1`` tokens (the step
  reads ``tokens_BxL[:, :-1]`` and predicts ``tokens_BxL[:, 1:]``);
* there is one batch size: ``pipeline.batch_size == train.batch_size``;
* the batch (each microbatch) and the pipeline's other batches split evenly
  over the mesh axes that shard examples (``data x fsdp``), and the model's
  heads, MLP width and vocabulary over the tensor axis (``model``);
* every part comes from the same profile.

:class:`RunConfig` checks all of it; ``run(profile, **parts)`` builds one from
the presets with per-part overrides::

  cfg = run("book", model=dict(num_layers=2), train=dict(steps=100))

Mesh axes set to ``-1`` ("all remaining devices") are resolved when the
mesh is made; :meth:`RunConfig.check_devices` checks divisibility for a
device count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dataweights.configs.base import ConfigError, check_profile
from dataweights.configs.data import PipelineConfig
from dataweights.configs.data import pipeline as pipeline_config
from dataweights.configs.lm import MeshConfig, ModelConfig, lm_model
from dataweights.configs.lm import mesh as mesh_config
from dataweights.configs.train import TrainConfig
from dataweights.configs.train import train as train_config


@dataclasses.dataclass(frozen=True, slots=True)
class RunConfig:
  """Model, pipeline, training and mesh configs that agree with each other.

  Attributes:
    profile: the preset every part came from (smoke | book | paper).
    model: the language model.
    pipeline: shapes and seeds of the text batches.
    train: optimiser, schedule, steps and batch size.
    mesh: the device mesh's axis sizes.
  """

  profile: str
  model: ModelConfig
  pipeline: PipelineConfig
  train: TrainConfig
  mesh: MeshConfig

  def __post_init__(self):
    check_profile(self.profile)
    for part in ("pipeline", "train"):
      got = getattr(self, part).profile
      if got != self.profile:
        raise ConfigError(
          f"RunConfig.{part}.profile = {got!r} but the run's profile is "
          f"{self.profile!r}; build every part from the same profile"
        )
    want_len = self.model.max_len + 1
    if self.pipeline.seq_len != want_len:
      raise ConfigError(
        f"RunConfig: pipeline.seq_len = {self.pipeline.seq_len} does not fit "
        f"model.max_len = {self.model.max_len}; rows must hold max_len + 1 = "
        f"{want_len} tokens (the model reads L - 1 and predicts the next)"
      )
    if self.pipeline.batch_size != self.train.batch_size:
      raise ConfigError(
        f"RunConfig: pipeline.batch_size = {self.pipeline.batch_size} and "
        f"train.batch_size = {self.train.batch_size} differ; a run has one "
        "batch size"
      )
    self._check_axes(
      {a: getattr(self.mesh, a) for a in ("data", "fsdp", "model")}
    )

  def _check_axes(self, sizes: dict[str, int]) -> None:
    """Divisibility for the axis sizes that are known (-1: skipped)."""
    batch_split = 1
    for a in ("data", "fsdp"):
      batch_split *= sizes[a] if sizes[a] > 0 else 1
    batches = {
      "train.microbatch_size": self.train.microbatch_size,
      "pipeline.specific_batch_size": self.pipeline.specific_batch_size,
      "pipeline.generic_batch_size": self.pipeline.generic_batch_size,
    }
    for name, n in batches.items():
      if n % batch_split:
        raise ConfigError(
          f"RunConfig: {name} = {n} does not split over the mesh's example "
          f"axes data x fsdp = {batch_split}; use a multiple of {batch_split}"
        )
    tp = sizes["model"]
    if tp > 1:
      for name in ("num_heads", "d_mlp", "vocab_size"):
        n = getattr(self.model, name)
        if n % tp:
          raise ConfigError(
            f"RunConfig: model.{name} = {n} does not split over the tensor "
            f"axis model = {tp}; use a multiple of {tp}"
          )
    fsdp = sizes["fsdp"]
    if fsdp > 1 and self.model.d_model % fsdp:
      raise ConfigError(
        f"RunConfig: model.d_model = {self.model.d_model} does not split over "
        f"fsdp = {fsdp}; use a multiple of {fsdp}"
      )

  def check_devices(self, num_devices: int) -> dict[str, int]:
    """Resolves ``-1`` axes for ``num_devices`` and checks divisibility.

    Returns:
      The axis sizes ``{"data", "fsdp", "model"}``.

    Raises:
      ConfigError: the axes do not multiply to ``num_devices`` or a size
        does not divide.
    """
    sizes = {a: getattr(self.mesh, a) for a in ("data", "fsdp", "model")}
    known = 1
    for v in sizes.values():
      known *= v if v > 0 else 1
    free = [a for a, v in sizes.items() if v == -1]
    if num_devices % known:
      raise ConfigError(
        f"RunConfig: mesh axes {sizes} do not fit {num_devices} devices"
      )
    if free:
      sizes[free[0]] = num_devices // known
    elif known != num_devices:
      raise ConfigError(
        f"RunConfig: mesh axes {sizes} use {known} devices but {num_devices} "
        "are available; set one axis to -1"
      )
    self._check_axes(sizes)
    return sizes

  def to_dict(self) -> dict[str, Any]:
    """The parts as JSON-able dicts."""
    return {
      "profile": self.profile,
      **{
        k: dataclasses.asdict(getattr(self, k))
        for k in ("model", "pipeline", "train", "mesh")
      },
    }


def run(
  profile: str = "book",
  *,
  size: str | None = None,
  model: dict[str, Any] | None = None,
  pipeline: dict[str, Any] | None = None,
  train: dict[str, Any] | None = None,
  mesh: dict[str, Any] | None = None,
) -> RunConfig:
  """A :class:`RunConfig` from the presets of ``profile`` with overrides.

  Args:
    profile: ``smoke``, ``book`` or ``paper``.
    size: a named model size (``"gpt2-124m"``); the pipeline's ``seq_len``
      follows its context.
    model, pipeline, train, mesh: field overrides of each part.

  Returns:
    The checked config. Unless overridden, the pipeline's ``seq_len`` is
    the model's ``max_len + 1`` and its batch size the training config's.

  Raises:
    ConfigError: an unknown field or profile, or parts that disagree.
  """
  m = lm_model(profile, size, **(model or {}))
  t = train_config(profile, **(train or {}))
  pipe_over = {
    "seq_len": m.max_len + 1,
    "batch_size": t.batch_size,
    **(pipeline or {}),
  }
  p = pipeline_config(profile, **pipe_over)
  return RunConfig(
    profile=profile,
    model=m,
    pipeline=p,
    train=t,
    mesh=mesh_config(profile, **(mesh or {})),
  )
