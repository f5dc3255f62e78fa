"""Configs for the decoder-only language model and the device mesh.

``lm_model(profile, size=None, **overrides)`` returns a :class:`ModelConfig`;
``mesh(profile, **overrides)`` returns a :class:`MeshConfig`.

Profiles for the language model:
  * ``smoke``: 2 layers, width 32, length 32: a forward pass in milliseconds.
  * ``book``:  4 layers, width 128, length 128: trains meaningfully on two CPU
    cores in a few minutes (the published chapters).
  * ``paper``: the byte-level reference LM of Grangier et al. (12 layers,
    width 256, MLP 1024, length 256), meant for an accelerator.

Named sizes (``size="gpt2-124m"`` or ``"gpt2-355m"``) replace the
architecture fields with GPT-2's (vocabulary 50257, context 1024) whatever
the profile; pair them with :mod:`dataweights.models.gpt2` to load weights.

Example:
  >>> from dataweights.configs import lm
  >>> cfg = lm.lm_model("smoke", num_layers=1)
  >>> cfg.d_model // cfg.num_heads
  8
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dataweights.configs.base import (
  ConfigError,
  check_choice,
  check_in_range,
  check_int,
  check_optional_str,
  check_positive,
  from_profile,
)

# Byte-level vocabulary: ids 0..255 are bytes, 256.. are special ids (pad,
# bos, eos, ...). 264 = 256 + 8 reserved specials keeps V divisible by 8 so
# that the vocabulary can be split over a tensor-parallel axis of up to 8.
NUM_BYTES = 256
BYTE_VOCAB_SIZE = 264

DTYPES = ("float32", "bfloat16")

# What a rematerialised block keeps for the backward pass (``ModelConfig.remat``):
#   none           no remat: every intermediate is stored;
#   full           only the block input: the block's forward is recomputed;
#   dots           matmul outputs are kept, elementwise ops recomputed
#                  (``jax.checkpoint_policies.dots_saveable``);
#   dots_no_batch  matmul outputs without batch dimensions are kept (the
#                  projections, not the attention scores/mix):
#                  ``dots_with_no_batch_dims_saveable``.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
  """A GPT-2-style decoder-only transformer.

  The block is GPT-2's: learned positions, pre-LayerNorm, causal multi-head
  attention and a GELU(tanh) MLP, both with biases; a final LayerNorm; output
  head tied to the token embedding. ``use_bias=False`` or
  ``tie_embeddings=False`` leave GPT-2's architecture (see
  :attr:`gpt2_compat`).
  """

  vocab_size: int = BYTE_VOCAB_SIZE  # V; bytes + special ids by default
  max_len: int = 128  # longest sequence (rows of the position table)
  num_layers: int = 4  # transformer blocks
  num_heads: int = 4  # H; d_model must be divisible by it
  d_model: int = 128  # D, residual width
  d_mlp: int = 512  # F, MLP hidden width (GPT-2: 4 D)
  dropout: float = 0.0  # on attention output, MLP output and embeddings
  use_bias: bool = True  # biases in attention and MLP (GPT-2: True)
  tie_embeddings: bool = True  # logits = x @ wte.T (GPT-2: True)
  layer_norm_eps: float = 1e-5  # GPT-2: 1e-5
  init_std: float = 0.02  # normal init; residual outputs / sqrt(2 layers)
  dtype: str = "float32"  # compute dtype: float32 on CPU, bfloat16 on TPU/GPU
  param_dtype: str = "float32"  # storage dtype of the parameters
  # REMAT_POLICIES; True / False mean "full" / "none". Default: the fastest
  # measured on CPU at the book shape (benchmarks/results/lm_train.json),
  # and 2.7x less temp memory than "none".
  remat: str = "dots_no_batch"
  scan_layers: bool = False  # one lax.scan over stacked blocks (fast compile)
  grad_barrier: bool = True  # materialise the residual gradient (see model)
  # Activation x weight products through transformer.weight_dot (weight
  # gradients as row-major matmuls on XLA:CPU; same values, gradients equal
  # up to float rounding). Off: the published chapters ran without it.
  weight_dot: bool = False

  def __post_init__(self):
    check_int(
      self,
      "vocab_size",
      "max_len",
      "num_layers",
      "num_heads",
      "d_model",
      "d_mlp",
    )
    check_in_range(self, "dropout", 0.0, 0.99)
    check_positive(self, "layer_norm_eps", "init_std")
    check_choice(self, "dtype", DTYPES)
    check_choice(self, "param_dtype", DTYPES)
    if isinstance(self.remat, bool):  # the old boolean switch
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    check_choice(self, "remat", REMAT_POLICIES)
    for name in (
      "use_bias",
      "tie_embeddings",
      "scan_layers",
      "grad_barrier",
      "weight_dot",
    ):
      check_choice(self, name, (True, False))
    if self.d_model % self.num_heads:
      raise ConfigError(
        f"ModelConfig.d_model = {self.d_model} is not divisible by "
        f"num_heads = {self.num_heads}; d_model must be a multiple of "
        "num_heads (head width Dh = d_model / num_heads)"
      )

  @property
  def head_dim(self) -> int:
    """Dh, the width of one attention head."""
    return self.d_model // self.num_heads

  @property
  def gpt2_compat(self) -> bool:
    """True when the architecture is exactly GPT-2's (weights can load)."""
    return self.use_bias and self.tie_embeddings


_BASE: dict[str, Any] = dict(vocab_size=BYTE_VOCAB_SIZE)

LM_PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(
    _BASE, max_len=32, num_layers=2, num_heads=4, d_model=32, d_mlp=128
  ),
  "book": dict(
    _BASE, max_len=128, num_layers=4, num_heads=4, d_model=128, d_mlp=512
  ),
  # Grangier et al. reference byte-level LM (the book's Sources §2).
  "paper": dict(
    _BASE, max_len=256, num_layers=12, num_heads=8, d_model=256, d_mlp=1024
  ),
}

GPT2_VOCAB_SIZE = 50257

SIZES: dict[str, dict[str, Any]] = {
  "gpt2-124m": dict(
    vocab_size=GPT2_VOCAB_SIZE,
    max_len=1024,
    num_layers=12,
    num_heads=12,
    d_model=768,
    d_mlp=3072,
    use_bias=True,
    tie_embeddings=True,
  ),
  "gpt2-355m": dict(
    vocab_size=GPT2_VOCAB_SIZE,
    max_len=1024,
    num_layers=24,
    num_heads=16,
    d_model=1024,
    d_mlp=4096,
    use_bias=True,
    tie_embeddings=True,
  ),
}


def lm_model(
  profile: str = "book", size: str | None = None, **overrides: Any
) -> ModelConfig:
  """The language-model config for a profile, optionally a named size.

  Args:
    profile: ``smoke``, ``book`` or ``paper``.
    size: ``None`` for the profile's byte-level LM, or a key of
      :data:`SIZES` (``"gpt2-124m"``, ``"gpt2-355m"``) whose architecture
      fields replace the profile's.
    **overrides: any :class:`ModelConfig` field; applied last.

  Returns:
    The validated :class:`ModelConfig`.

  Raises:
    ConfigError: unknown profile, size or field, or an invalid value.
  """
  if size is not None:
    if not isinstance(size, str) or size not in SIZES:
      raise ConfigError(
        f"unknown model size {size!r}; allowed sizes are "
        + ", ".join(repr(s) for s in SIZES)
      )
    overrides = {**SIZES[size], **overrides}
  return from_profile(ModelConfig, LM_PRESETS, profile, overrides)


MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "model")
# Mesh axes that split the batch (examples) dimension.
BATCH_MESH_AXES: tuple[str, str] = ("data", "fsdp")


@dataclasses.dataclass(frozen=True, slots=True)
class MeshConfig:
  """Sizes of the three mesh axes; ``-1`` means "all remaining devices".

  Axes: ``data`` (data parallel: batch split, parameters replicated),
  ``fsdp`` (batch split and parameters/optimiser state sharded along the
  model width, ZeRO-3 style), ``model`` (tensor parallel over heads, MLP
  width and vocabulary). At most one axis may be ``-1``.

  The multi-host fields are read by
  :func:`dataweights.sharding.maybe_initialize_distributed`.
  """

  data: int = -1  # data-parallel replicas
  fsdp: int = 1  # parameter-sharding (fully sharded data parallel) degree
  model: int = 1  # tensor-parallel degree
  distributed: bool = False  # call jax.distributed.initialize (multi-host)
  coordinator_address: str | None = None  # "host:port"; None: auto-detect
  num_processes: int | None = None  # None: auto-detect (TPU pods, SLURM)
  process_id: int | None = None  # None: auto-detect

  def __post_init__(self):
    sizes = {a: getattr(self, a) for a in MESH_AXES}
    for axis, value in sizes.items():
      if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or (value < 1 and value != -1)
      ):
        raise ConfigError(
          f"MeshConfig.{axis} = {value!r} is invalid; it must be an integer "
          ">= 1, or -1 for all remaining devices"
        )
    if sum(v == -1 for v in sizes.values()) > 1:
      raise ConfigError(
        f"MeshConfig has more than one axis set to -1 ({sizes}); at most one "
        "axis may take the remaining devices"
      )
    check_choice(self, "distributed", (True, False))
    check_optional_str(self, "coordinator_address")
    for name in ("num_processes",):
      value = getattr(self, name)
      if value is not None:
        check_int(self, name, minimum=1)
    if self.process_id is not None:
      check_int(self, "process_id", minimum=0)


MESH_PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(data=-1, fsdp=1, model=1),
  "book": dict(data=-1, fsdp=1, model=1),
  "paper": dict(data=1, fsdp=-1, model=1),
}


def mesh(profile: str = "book", **overrides: Any) -> MeshConfig:
  """The mesh config for a profile (``paper`` shards parameters by FSDP).

  Args:
    profile: ``smoke``, ``book`` or ``paper``.
    **overrides: any :class:`MeshConfig` field.

  Returns:
    The validated :class:`MeshConfig`.

  Raises:
    ConfigError: unknown profile or field, or an invalid value.
  """
  return from_profile(MeshConfig, MESH_PRESETS, profile, overrides)
