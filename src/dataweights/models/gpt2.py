"""Load GPT-2 weights stored in the Hugging Face ``transformers`` safetensors
layout into :class:`dataweights.models.transformer.Transformer`.

Expected keys (an optional ``transformer.`` prefix is accepted)::

  wte.weight (V, D)   wpe.weight (P, D)   ln_f.weight / ln_f.bias (D,)
  h.{i}.ln_1.weight / .bias (D,)          h.{i}.ln_2.weight / .bias (D,)
  h.{i}.attn.c_attn.weight (D, 3D)  .bias (3D,)   [Conv1D: y = x W + b]
  h.{i}.attn.c_proj.weight (D, D)   .bias (D,)
  h.{i}.mlp.c_fc.weight    (D, F)   .bias (F,)
  h.{i}.mlp.c_proj.weight  (F, D)   .bias (D,)

``c_attn`` is split into query, key and value (in that order along its
output axis), each reshaped to D x H x Dh; ``attn.c_proj`` becomes H x Dh x
D. Causal-mask buffers (``h.{i}.attn.bias``, ``h.{i}.attn.masked_bias``) are
ignored; an ``lm_head.weight`` must equal ``wte.weight`` (tied).

Nothing is downloaded: pass the path of a ``model.safetensors`` you have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from dataweights.configs.lm import ModelConfig, lm_model
from dataweights.models.transformer import Transformer, stack_layers

PREFIX = "transformer."
# Buffers that some checkpoints carry and that hold no weights.
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# GPT-2 head width is 64 for every released size.
_GPT2_HEAD_DIM = 64


class CheckpointError(ValueError):
  """A checkpoint whose keys or shapes do not fit the model."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays, prefix stripped.

  Raises:
    FileNotFoundError: no such file.
  """
  from safetensors.numpy import load_file  # noqa: PLC0415

  tensors = load_file(os.fspath(path))
  return {
    (k[len(PREFIX) :] if k.startswith(PREFIX) else k): v
    for k, v in tensors.items()
  }


def _require(tensors: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in tensors:
    raise CheckpointError(
      f"checkpoint has no key {key!r} (with or without the {PREFIX!r} "
      f"prefix); it has {len(tensors)} keys, e.g. {sorted(tensors)[:6]}"
    )
  return tensors[key]


def config_from_tensors(
  tensors: Mapping[str, np.ndarray],
  num_heads: int | None = None,
  **overrides: Any,
) -> ModelConfig:
  """Infers the GPT-2 architecture from tensor shapes.

  Args:
    tensors: as returned by :func:`read_safetensors`.
    num_heads: heads per layer; weights do not determine it. Default: D / 64
      (true of every released GPT-2).
    **overrides: other :class:`ModelConfig` fields (e.g. ``dtype``).

  Returns:
    A :class:`ModelConfig` with ``use_bias`` and ``tie_embeddings`` set.

  Raises:
    CheckpointError: missing keys, or D not a multiple of 64 with no
      ``num_heads`` given.
  """
  vocab, d = _require(tensors, "wte.weight").shape
  max_len = _require(tensors, "wpe.weight").shape[0]
  layers = sorted(
    {int(m.group(1)) for k in tensors if (m := re.match(r"^h\.(\d+)\.", k))}
  )
  if layers != list(range(len(layers))) or not layers:
    raise CheckpointError(
      f"checkpoint blocks h.<i> must be numbered 0..n-1; found {layers}"
    )
  d_mlp = _require(tensors, "h.0.mlp.c_fc.weight").shape[1]
  if num_heads is None:
    if d % _GPT2_HEAD_DIM:
      raise CheckpointError(
        f"cannot infer num_heads: d_model {d} is not a multiple of "
        f"{_GPT2_HEAD_DIM}; pass num_heads"
      )
    num_heads = d // _GPT2_HEAD_DIM
  fields = dict(
    vocab_size=int(vocab),
    max_len=int(max_len),
    num_layers=len(layers),
    num_heads=int(num_heads),
    d_model=int(d),
    d_mlp=int(d_mlp),
    use_bias=True,
    tie_embeddings=True,
    layer_norm_eps=1e-5,
  )
  fields.update(overrides)
  return lm_model("paper", **fields)


def gpt2_config_from_checkpoint(
  path: str | os.PathLike, num_heads: int | None = None, **overrides: Any
) -> ModelConfig:
  """The :class:`ModelConfig` of a GPT-2 safetensors checkpoint.

  ``num_heads`` and the LayerNorm epsilon are read from a ``config.json``
  beside the file (``n_head``, ``layer_norm_epsilon``) when present, else
  ``num_heads`` defaults to D / 64.

  Args:
    path: the ``.safetensors`` file.
    num_heads: overrides the head count.
    **overrides: other :class:`ModelConfig` fields.

  Returns:
    The config.

  Raises:
    CheckpointError: see :func:`config_from_tensors`.
  """
  cfg_json = os.path.join(os.path.dirname(os.fspath(path)), "config.json")
  if os.path.exists(cfg_json):
    with open(cfg_json) as f:
      hf = json.load(f)
    if num_heads is None and "n_head" in hf:
      num_heads = int(hf["n_head"])
    if "layer_norm_epsilon" in hf:
      overrides.setdefault("layer_norm_eps", float(hf["layer_norm_epsilon"]))
  return config_from_tensors(read_safetensors(path), num_heads, **overrides)


def _mapping(cfg: ModelConfig) -> list[tuple[str, str, Callable]]:
  """(checkpoint key, model path, transform) for every model parameter."""
  d, h, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
  ident = lambda x: x
  out: list[tuple[str, str, Callable]] = [
    ("wte.weight", "wte", ident),
    ("wpe.weight", "wpe", ident),
    ("ln_f.weight", "ln_f.scale", ident),
    ("ln_f.bias", "ln_f.bias", ident),
  ]
  for i in range(cfg.num_layers):
    src, dst = f"h.{i}.", f"blocks.{i}."
    for ln in ("ln_1", "ln_2"):
      out.append((f"{src}{ln}.weight", f"{dst}{ln}.scale", ident))
      out.append((f"{src}{ln}.bias", f"{dst}{ln}.bias", ident))
    for j, name in enumerate(("query", "key", "value")):
      out.append(
        (
          f"{src}attn.c_attn.weight",
          f"{dst}attn.{name}.kernel",
          lambda w, j=j: w[:, j * d : (j + 1) * d].reshape(d, h, dh),
        )
      )
      out.append(
        (
          f"{src}attn.c_attn.bias",
          f"{dst}attn.{name}.bias",
          lambda b, j=j: b[j * d : (j + 1) * d].reshape(h, dh),
        )
      )
    out += [
      (
        f"{src}attn.c_proj.weight",
        f"{dst}attn.out.kernel",
        lambda w: w.reshape(h, dh, d),
      ),
      (f"{src}attn.c_proj.bias", f"{dst}attn.out.bias", ident),
      (f"{src}mlp.c_fc.weight", f"{dst}mlp.fc.kernel", ident),
      (f"{src}mlp.c_fc.bias", f"{dst}mlp.fc.bias", ident),
      (f"{src}mlp.c_proj.weight", f"{dst}mlp.proj.kernel", ident),
      (f"{src}mlp.c_proj.bias", f"{dst}mlp.proj.bias", ident),
    ]
  return out


def _expected_source_shape(key: str, cfg: ModelConfig) -> tuple[int, ...]:
  d, f = cfg.d_model, cfg.d_mlp
  table = {
    "wte.weight": (cfg.vocab_size, d),
    "wpe.weight": (cfg.max_len, d),
    "attn.c_attn.weight": (d, 3 * d),
    "attn.c_attn.bias": (3 * d,),
    "attn.c_proj.weight": (d, d),
    "mlp.c_fc.weight": (d, f),
    "mlp.c_fc.bias": (f,),
    "mlp.c_proj.weight": (f, d),
  }
  for suffix, shape in table.items():
    if key.endswith(suffix):
      return shape
  return (d,)  # LayerNorm weights/biases, c_proj biases


def _get(model: Any, path: str) -> nnx.Variable:
  obj = model
  for part in path.split("."):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  return obj


def load_gpt2_tensors(
  tensors: Mapping[str, np.ndarray],
  cfg: ModelConfig | None = None,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules: Any = None,
  strict: bool = True,
) -> Transformer:
  """Builds a :class:`Transformer` from GPT-2 tensors (prefix stripped).

  Args:
    tensors: checkpoint key -> array, e.g. from :func:`read_safetensors`.
    cfg: the model config; default inferred by :func:`config_from_tensors`.
      Its ``dtype``/``param_dtype`` are respected (weights are cast).
    mesh: if given, parameters are placed in their shards on this mesh.
    rules: logical-to-mesh rules (default :data:`dataweights.sharding.RULES`).
    strict: raise on checkpoint keys that map to no parameter.

  Returns:
    The model with the checkpoint's weights.

  Raises:
    CheckpointError: a missing or unexpected key, a shape mismatch (naming
      the key, the checkpoint shape and the expected shape), a non-GPT-2
      config, or an untied ``lm_head.weight``.
  """
  cfg = config_from_tensors(tensors) if cfg is None else cfg
  if not cfg.gpt2_compat:
    raise CheckpointError(
      "GPT-2 weights need use_bias=True and tie_embeddings=True; got "
      f"use_bias={cfg.use_bias}, tie_embeddings={cfg.tie_embeddings}"
    )
  # The checkpoint is per layer: fill the unrolled layout, then stack the
  # blocks if the config scans over layers.
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  model = nnx.eval_shape(lambda: Transformer(unrolled, rngs=nnx.Rngs(0)))
  used = set()
  for key, path, fn in _mapping(cfg):
    src = np.asarray(_require(tensors, key))
    want = _expected_source_shape(key, cfg)
    if src.shape != want:
      raise CheckpointError(
        f"checkpoint key {key!r} has shape {src.shape} but the model "
        f"(d_model={cfg.d_model}, d_mlp={cfg.d_mlp}, vocab_size="
        f"{cfg.vocab_size}, max_len={cfg.max_len}) expects {want}"
      )
    var = _get(model, path)
    value = fn(src).astype(var.get_value().dtype)
    var.set_value(jax.numpy.asarray(value))
    used.add(key)
  if "lm_head.weight" in tensors:
    head = np.asarray(tensors["lm_head.weight"])
    if head.shape != tensors["wte.weight"].shape or not np.array_equal(
      head, tensors["wte.weight"]
    ):
      raise CheckpointError(
        f"checkpoint key 'lm_head.weight' (shape {head.shape}) differs from "
        "'wte.weight'; only tied GPT-2 heads are supported"
      )
    used.add("lm_head.weight")
  extra = sorted(k for k in tensors if k not in used and not _IGNORED.match(k))
  if strict and extra:
    raise CheckpointError(
      f"checkpoint has {len(extra)} key(s) the model does not use, e.g. "
      f"{extra[:6]}; the config has num_layers={cfg.num_layers} (pass "
      "strict=False to ignore them)"
    )
  if cfg.scan_layers:
    model = stack_layers(model)
  if mesh is not None:
    from dataweights import sharding  # noqa: PLC0415

    rules = sharding.RULES if rules is None else rules
    graphdef, state = nnx.split(model)
    sharding.check_divisible(mesh, state=state, rules=rules)
    with nnx.logical_axis_rules(rules):
      shardings = nnx.get_named_sharding(state, mesh)
    state = jax.device_put(state, shardings)
    model = nnx.merge(graphdef, state)
  return model


def load_gpt2_safetensors(
  path: str | os.PathLike,
  cfg: ModelConfig | None = None,
  **kwargs: Any,
) -> Transformer:
  """Loads a GPT-2 checkpoint in the HF safetensors layout.

  Args:
    path: the ``.safetensors`` file.
    cfg: the model config; default :func:`gpt2_config_from_checkpoint`.
    **kwargs: ``mesh``, ``rules``, ``strict`` of :func:`load_gpt2_tensors`.

  Returns:
    The model.

  Raises:
    CheckpointError: see :func:`load_gpt2_tensors`.
  """
  if cfg is None:
    cfg = gpt2_config_from_checkpoint(path)
  return load_gpt2_tensors(read_safetensors(path), cfg, **kwargs)
