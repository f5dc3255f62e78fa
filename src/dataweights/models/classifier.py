"""A small image classifier (MLP) and its per-example loss.

The main model of the image chapters: ``x_BxHxW`` (scaled to [0, 1]) ->
flatten -> ``depth`` dense ReLU layers of width ``hidden`` -> ``logits_BxC``.
Plugs into :class:`dataweights.train.loop.Trainer` with
``model_factory=image_mlp`` and ``loss_fn=classification_loss``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dataweights.configs.base import check_int


@dataclasses.dataclass(frozen=True, slots=True)
class ImageMLPConfig:
  """The image classifier.

  Attributes:
    image_pixels: H * W.
    hidden: width of each hidden layer.
    depth: number of hidden layers.
    num_classes: C.
  """

  image_pixels: int = 64
  hidden: int = 128
  depth: int = 1
  num_classes: int = 10

  def __post_init__(self):
    check_int(self, "image_pixels", "hidden", "depth", "num_classes")


class ImageMLP(nnx.Module):
  """Flatten -> (dense, ReLU) x depth -> dense logits."""

  def __init__(self, cfg: ImageMLPConfig, *, rngs: nnx.Rngs):
    widths = [cfg.image_pixels] + [cfg.hidden] * cfg.depth
    self.layers = nnx.List(
      [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths, widths[1:])]
    )
    self.out = nnx.Linear(widths[-1], cfg.num_classes, rngs=rngs)

  def __call__(self, x_BxHxW: jax.Array) -> jax.Array:
    h = x_BxHxW.reshape(x_BxHxW.shape[0], -1)
    for layer in self.layers:
      h = jax.nn.relu(layer(h))
    return self.out(h)


def image_mlp(cfg: ImageMLPConfig, rngs: nnx.Rngs) -> ImageMLP:
  """``model_factory`` for the Trainer."""
  return ImageMLP(cfg, rngs=rngs)


def classification_loss(
  model: ImageMLP, batch: dict[str, jax.Array], key: jax.Array | None
) -> jax.Array:
  """Per-example cross-entropy ``loss_B`` of ``batch["y_B"]``."""
  del key
  logits_BxC = model(batch["x_BxHxW"]).astype(jnp.float32)
  y_B = batch["y_B"]
  picked = jnp.take_along_axis(logits_BxC, y_B[:, None], -1)[:, 0]
  return jax.nn.logsumexp(logits_BxC, -1) - picked


def accuracy(model: ImageMLP, x_BxHxW: jax.Array, y_B: jax.Array) -> jax.Array:
  """Fraction of correct argmax predictions."""
  return jnp.mean((jnp.argmax(model(x_BxHxW), -1) == y_B).astype(jnp.float32))
