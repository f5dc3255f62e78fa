"""Weighting networks w_φ(x): small scorers of generic examples.

Online data selection (Grangier, Ablin & Hannun; the book's Sources §2)
scores a big generic batch with a network much smaller than the main model
and keeps the examples that help a specific (target) task. Two trunks, one
per modality, each with interchangeable heads:

``bytes`` (language modelling; the reference's ``CNNWeights``)::

  tokens_BxL -> embedding E -> causal conv (C channels, kernel k), ReLU
             -> head "score":    one score per token, masked mean over the
                                 row's real tokens          -> s_B
             -> head "lm":       next-byte logits (a small byte LM, used by
                                 contrastive data selection) -> loss_B

``image`` (digits; label-conditioned, so it can tell a wrong label apart)::

  x_BxHxW -> flatten -> dense (hidden), ReLU -> dense (num_classes)
          -> head "score":     the logit of the example's own label -> s_B
          -> head "classify":  cross-entropy of the label          -> loss_B

The reference sizes (paper profile) are embedding 128, 128 channels,
kernel 7. The output layer starts at zero, so every example first gets the
same score: selection starts uniform (the baseline) and every deviation
from it is learned. Scores are turned into weights over a batch by
:func:`normalize_scores`: a softmax over the batch (DDS, SOBA) or a
softplus per example (Anograd).

Functional use (the methods keep φ as a pytree in their state)::

  graphdef, phi = init_scorer(cfg, "score", key)
  s_B = apply_scorer(cfg, "score", phi, batch)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dataweights.configs.base import ConfigError, check_choice, check_int

MODALITIES: tuple[str, ...] = ("bytes", "image")
HEADS: dict[str, tuple[str, ...]] = {
  "bytes": ("score", "lm"),
  "image": ("score", "classify"),
}
OUTPUTS: tuple[str, ...] = ("softmax", "softplus")
# The batch keys each modality reads.
BATCH_KEYS: dict[str, tuple[str, ...]] = {
  "bytes": ("tokens_BxL",),
  "image": ("x_BxHxW", "y_B"),
}
_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


@dataclasses.dataclass(frozen=True, slots=True)
class ScorerConfig:
  """A weighting network (hashable: methods hold it as a static field).

  Attributes:
    modality: ``"bytes"`` (token rows) or ``"image"`` (labelled images).
    vocab_size: V, byte vocabulary (bytes).
    embed_dim: E, byte embedding width (bytes; reference 128).
    channels: C, causal convolution channels (bytes; reference 128).
    kernel_size: k, causal convolution width (bytes; reference 7).
    image_pixels: H * W of the images (image).
    hidden: width of the hidden layer (image).
    num_classes: label classes (image).
    param_dtype: ``float32`` (float64 for gradient checks).
    score_bias: a bias on the bytes score head. Weights normalised by a
      softmax over the batch do not depend on it (its gradient is exactly
      zero, so an adaptive optimiser would only random-walk it on float
      noise): DDS and SOBA drop it.
  """

  modality: str = "bytes"
  vocab_size: int = 264
  embed_dim: int = 128
  channels: int = 128
  kernel_size: int = 7
  image_pixels: int = 64
  hidden: int = 64
  num_classes: int = 10
  param_dtype: str = "float32"
  score_bias: bool = True

  def __post_init__(self):
    check_choice(self, "modality", MODALITIES)
    check_int(
      self,
      "vocab_size",
      "embed_dim",
      "channels",
      "kernel_size",
      "image_pixels",
      "hidden",
      "num_classes",
    )
    check_choice(self, "param_dtype", tuple(_DTYPES))
    check_choice(self, "score_bias", (True, False))


class ByteScorer(nnx.Module):
  """Embedding -> causal convolution -> per-token head (bytes)."""

  def __init__(self, cfg: ScorerConfig, head: str, *, rngs: nnx.Rngs):
    dt = _DTYPES[cfg.param_dtype]
    self.head_kind = head
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.embed_dim,
      embedding_init=nnx.initializers.normal(1.0),
      param_dtype=dt,
      dtype=dt,
      rngs=rngs,
    )
    k = cfg.kernel_size
    self.conv = nnx.Conv(
      cfg.embed_dim,
      cfg.channels,
      (k,),
      padding=((k - 1, 0),),  # causal: position t sees t-k+1..t
      kernel_init=nnx.initializers.xavier_uniform(),
      param_dtype=dt,
      dtype=dt,
      rngs=rngs,
    )
    out = 1 if head == "score" else cfg.vocab_size
    self.out = nnx.Linear(
      cfg.channels,
      out,
      use_bias=head != "score" or cfg.score_bias,
      kernel_init=nnx.initializers.zeros,
      param_dtype=dt,
      dtype=dt,
      rngs=rngs,
    )

  def features(self, tokens_BxL: jax.Array) -> jax.Array:
    """``h_BxLxC``: the causal convolution's features."""
    return jax.nn.relu(self.conv(self.embed(tokens_BxL)))

  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    tokens_BxL = batch["tokens_BxL"]
    mask_BxL = batch.get("mask_BxL")
    if mask_BxL is None:
      mask_BxL = jnp.ones(tokens_BxL.shape, bool)
    if self.head_kind == "score":
      s_BxL = self.out(self.features(tokens_BxL))[..., 0]
      m_BxL = mask_BxL.astype(s_BxL.dtype)
      return (s_BxL * m_BxL).sum(-1) / jnp.maximum(m_BxL.sum(-1), 1.0)
    # "lm": mean next-byte cross-entropy over the row's real targets.
    logits_BxLxV = self.out(self.features(tokens_BxL[:, :-1]))
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, -1)
    tgt_BxL = tokens_BxL[:, 1:]
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, tgt_BxL[..., None], -1)[..., 0]
    m_BxL = mask_BxL[:, 1:].astype(nll_BxL.dtype)
    return (nll_BxL * m_BxL).sum(-1) / jnp.maximum(m_BxL.sum(-1), 1.0)


class ImageScorer(nnx.Module):
  """A label-conditioned MLP on flattened images."""

  def __init__(self, cfg: ScorerConfig, head: str, *, rngs: nnx.Rngs):
    dt = _DTYPES[cfg.param_dtype]
    self.head_kind = head
    self.hidden = nnx.Linear(
      cfg.image_pixels, cfg.hidden, param_dtype=dt, dtype=dt, rngs=rngs
    )
    self.out = nnx.Linear(
      cfg.hidden,
      cfg.num_classes,
      kernel_init=nnx.initializers.zeros,
      param_dtype=dt,
      dtype=dt,
      rngs=rngs,
    )

  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    x_BxHxW = batch["x_BxHxW"]
    y_B = batch["y_B"]
    x_BxP = x_BxHxW.reshape(x_BxHxW.shape[0], -1)
    logits_BxC = self.out(jax.nn.relu(self.hidden(x_BxP)))
    picked_B = jnp.take_along_axis(logits_BxC, y_B[:, None], -1)[:, 0]
    if self.head_kind == "score":
      return picked_B
    return jax.nn.logsumexp(logits_BxC, -1) - picked_B


def _check_head(cfg: ScorerConfig, head: str) -> None:
  if head not in HEADS[cfg.modality]:
    raise ConfigError(
      f"head {head!r} is invalid for a {cfg.modality!r} weighting network; "
      f"allowed heads are {', '.join(map(repr, HEADS[cfg.modality]))}"
    )


def build_scorer(cfg: ScorerConfig, head: str, rngs: nnx.Rngs) -> nnx.Module:
  """The NNX module of ``cfg`` with ``head`` (see the module docstring)."""
  _check_head(cfg, head)
  cls = ByteScorer if cfg.modality == "bytes" else ImageScorer
  return cls(cfg, head, rngs=rngs)


@functools.lru_cache(maxsize=64)
def scorer_graphdef(cfg: ScorerConfig, head: str) -> Any:
  """The (static) graph of ``cfg``'s network; cached per config and head."""
  abstract = nnx.eval_shape(lambda: build_scorer(cfg, head, nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract, nnx.Param)
  return graphdef


def init_scorer(cfg: ScorerConfig, head: str, key: jax.Array) -> Any:
  """Fresh parameters φ (an ``nnx.State``) of ``cfg``'s network."""
  model = build_scorer(cfg, head, nnx.Rngs(params=key))
  _, params = nnx.split(model, nnx.Param)
  return params


def check_batch(cfg: ScorerConfig, batch: dict[str, Any]) -> None:
  """Fails clearly when ``batch`` is not of the network's modality.

  Raises:
    ValueError: a key the modality needs is missing (names the modality,
      the missing key and the batch's keys).
  """
  missing = [k for k in BATCH_KEYS[cfg.modality] if k not in batch]
  if missing:
    other = [m for m in MODALITIES if m != cfg.modality]
    raise ValueError(
      f"a weighting network for modality {cfg.modality!r} needs batch "
      f"key(s) {', '.join(map(repr, missing))}, but the batch has "
      f"{', '.join(map(repr, sorted(batch))) or 'no keys'}; is this a "
      f"{other[0]!r} batch? build the ScorerConfig with the batch's modality"
    )


def apply_scorer(
  cfg: ScorerConfig, head: str, params: Any, batch: dict[str, jax.Array]
) -> jax.Array:
  """``s_B`` (head ``"score"``) or ``loss_B`` (``"lm"``, ``"classify"``).

  Raises:
    ValueError: the batch is not of the network's modality.
  """
  check_batch(cfg, batch)
  model = nnx.merge(scorer_graphdef(cfg, head), params, copy=True)
  return model(batch)


def normalize_scores(s_B: jax.Array, output: str) -> jax.Array:
  """Weights from scores: softmax over the batch, or softplus per example.

  Args:
    s_B: scores.
    output: ``"softmax"`` (DDS, SOBA: weights sum to one over the batch) or
      ``"softplus"`` (Anograd: positive, unnormalised).

  Returns:
    ``w_B``.
  """
  if output == "softmax":
    return jax.nn.softmax(s_B)
  if output == "softplus":
    return jax.nn.softplus(s_B)
  raise ValueError(
    f"output = {output!r} is invalid; allowed values are "
    + ", ".join(map(repr, OUTPUTS))
  )
