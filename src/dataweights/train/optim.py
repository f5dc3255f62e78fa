"""Optax optimisers and learning-rate schedules built from a TrainConfig.

``make_optimizer(cfg)`` chains global-norm clipping with AdamW / Adam / SGD
under the schedule of ``make_schedule(cfg)``. Weight decay applies only to
parameters of rank >= 2 (kernels and embeddings): biases and norm scales are
left alone (the GPT-2 / nanoGPT convention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dataweights.configs.train import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """The learning rate as a function of the (0-based) update count.

  Linear warm-up from 0 to ``cfg.learning_rate`` over ``cfg.warmup_steps``,
  then: ``constant``; ``cosine`` decay to ``cfg.min_lr_ratio *
  learning_rate`` at ``cfg.steps``; or ``inverse_sqrt``,
  ``lr * sqrt(warmup_steps / count)``.

  Args:
    cfg: the training config.

  Returns:
    An optax schedule ``count -> lr``.
  """
  lr, warm = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == "constant":
    if warm == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)],
      [warm],
    )
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=warm,
      decay_steps=max(cfg.steps, warm + 1),
      end_value=lr * cfg.min_lr_ratio,
    )
  if cfg.schedule == "inverse_sqrt":

    def schedule(count):
      count = jnp.asarray(count, jnp.float32)
      warmup = lr * count / warm
      decay = lr * jnp.sqrt(warm / jnp.maximum(count, 1.0))
      return jnp.where(count < warm, warmup, decay)

    return schedule
  raise ValueError(f"unknown schedule {cfg.schedule!r}")  # config checks this


def decay_mask(params):
  """True for leaves that get weight decay: arrays of rank >= 2."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Clip, then AdamW / Adam / SGD with the config's schedule.

  Args:
    cfg: the training config (``optimizer``, ``learning_rate``, schedule
      fields, ``grad_clip``, ``weight_decay``, ``b1``, ``b2``, ``eps``,
      ``eps_root``).

  Returns:
    An optax gradient transformation. Its state is a pytree of arrays, so it
    checkpoints with orbax and shards like the parameters.
  """
  schedule = make_schedule(cfg)
  if cfg.optimizer == "adamw":
    opt = optax.adamw(
      schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      eps_root=cfg.eps_root,
      weight_decay=cfg.weight_decay,
      mask=decay_mask,
    )
  elif cfg.optimizer == "adam":
    opt = optax.adam(
      schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, eps_root=cfg.eps_root
    )
  elif cfg.optimizer == "sgd":
    parts = []
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=cfg.b1 or None))
    opt = optax.chain(*parts)
  else:  # config checks this
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
  if cfg.grad_clip:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


FROZEN = None
"""In :func:`make_grouped_optimizer`, a group mapped to ``FROZEN`` (None)
gets zero updates and holds no optimiser state."""


def layer_labels(params: Any) -> Any:
  """Labels the transformer's parameters by group.

  ``"embed"`` (token and position embeddings), ``"block/<i>"`` (each
  transformer block), ``"head"`` (the final LayerNorm and an untied output
  head). Use with :func:`make_grouped_optimizer` for layer-wise methods.
  """

  def label(path, _):
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if keys and keys[0] == "blocks":
      return f"block/{keys[1]}"
    if keys and keys[0] in ("wte", "wpe"):
      return "embed"
    return "head"

  return jax.tree_util.tree_map_with_path(label, params)


def make_grouped_optimizer(
  groups: dict[str, TrainConfig | None],
  label_fn: Callable[[Any], Any] = layer_labels,
) -> optax.GradientTransformation:
  """One optimiser per parameter group (``optax.multi_transform``).

  Args:
    groups: ``{label: TrainConfig}`` (each group's own optimiser, schedule
      and clipping; clipping is per group) or ``{label: FROZEN}`` (no
      update, no state: optax masks the group out of every other
      optimiser's state).
    label_fn: ``label_fn(params) -> labels`` with the parameters' structure.

  Returns:
    The composed transformation.

  Raises:
    ValueError: at init, a parameter whose label has no group (names the
      label and the groups).
  """
  transforms = {
    name: optax.set_to_zero() if cfg is FROZEN else make_optimizer(cfg)
    for name, cfg in groups.items()
  }

  def checked_labels(params):
    labels = label_fn(params)
    unknown = sorted(set(jax.tree.leaves(labels)) - set(groups))
    if unknown:
      raise ValueError(
        f"parameter group(s) {', '.join(map(repr, unknown))} have no "
        f"optimiser; groups given: {', '.join(map(repr, groups))}"
      )
    return labels

  return optax.multi_transform(transforms, checked_labels)
