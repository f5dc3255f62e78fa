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

The weights fix every width but not the number of attention heads, nor the
LayerNorm epsilon, activation or attention scaling. Those come from the
``config.json`` that Hugging Face saves beside the weights; every field of
``GPT2Config`` (transformers 5.24, and the extra fields older versions
wrote) is either read, checked against the tensor shapes, required to hold
the value this model computes (anything else is refused, naming the field),
or known not to change the function of the weights (see :data:`HF_FIELDS`).
Without a ``config.json`` the head count must be passed (``num_heads``);
the other fields then take ``GPT2Config``'s defaults, as Hugging Face would
for a ``config.json`` that omits them.

Reference: checked against Hugging Face's own ``GPT2LMHeadModel``
(logits, loss and every gradient) by ``tests/test_gpt2_hf.py``.

Nothing is downloaded: pass the path of a ``model.safetensors`` you have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
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


# One CheckpointError for training checkpoints and pretrained weights alike.
from dataweights.errors import CheckpointError  # noqa: E402, F401

# How each Hugging Face GPT2Config field is treated. Keys of config.json
# outside every table are refused unless strict=False.
#
# Read: n_head -> num_heads; layer_norm_epsilon -> layer_norm_eps.
_HF_READ = ("n_head", "layer_norm_epsilon")
# Checked against the tensor shapes (config field -> ModelConfig field);
# n_inner = None means 4 * n_embd.
_HF_SHAPE = {
  "vocab_size": "vocab_size",
  "n_positions": "max_len",
  "n_embd": "d_model",
  "n_layer": "num_layers",
  "n_inner": "d_mlp",
}
# Change the function computed from the weights: only these values are what
# this model computes. ``gelu_new`` and ``gelu_pytorch_tanh`` are both
# GELU with the tanh approximation (our MLP's activation).
_HF_FIXED: dict[str, tuple[Any, ...]] = {
  "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
  "scale_attn_weights": (True,),
  "scale_attn_by_inverse_layer_idx": (False,),
  "add_cross_attention": (False,),
  "tie_word_embeddings": (True,),
  "model_type": ("gpt2",),
  "is_encoder_decoder": (False,),
  "pruned_heads": ({},),
}
# Do not change the function of the weights:
_HF_INERT = frozenset(
  {
    # Order of float operations only (scale before the dot product, float32
    # softmax under mixed precision): the same function. Our attention's
    # precision follows ModelConfig.dtype.
    "reorder_and_upcast_attn",
    # Training-time only: dropout is ModelConfig.dropout (default 0, pass
    # dropout=... to fine-tune with it); initialisation is overwritten.
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "initializer_range",
    # GPT2DoubleHeadsModel's multiple-choice head (not part of the LM).
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    # Special token ids, generation, caching, outputs, labels, bookkeeping.
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "architectures",
    "dtype",
    "torch_dtype",
    "use_bfloat16",
    "transformers_version",
    "_name_or_path",
    "n_ctx",  # GPT-2's original context field; unused since transformers 2
    "task_specific_params",
    "id2label",
    "label2id",
    "_num_labels",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "tokenizer_class",
    "prefix",
    "return_dict",
    "use_return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "chunk_size_feed_forward",  # not used by GPT-2
    "is_decoder",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "gradient_checkpointing",
    "tf_legacy_loss",
    "loss_type",
    "_attn_implementation",
    "attn_implementation",
    "_attn_implementation_autoset",
    # Generation defaults that transformers 4.x wrote into config.json.
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
  }
)
#: Every config.json field the loader knows: ``read``, ``shape`` (checked
#: against the tensors), ``fixed`` (allowed values) or ``inert``.
HF_FIELDS: dict[str, str] = {
  **{k: "read" for k in _HF_READ},
  **{k: "shape" for k in _HF_SHAPE},
  **{k: "fixed" for k in _HF_FIXED},
  **{k: "inert" for k in _HF_INERT},
}
# ModelConfig fields that the checkpoint (weights + config.json) determines;
# an override of one of them that contradicts the checkpoint is an error.
_ARCH_FIELDS = (
  "vocab_size",
  "max_len",
  "num_layers",
  "num_heads",
  "d_model",
  "d_mlp",
  "layer_norm_eps",
  "use_bias",
  "tie_embeddings",
)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays, prefix stripped.

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: the file is not a safetensors file.
  """
  from safetensors import SafetensorError  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such checkpoint file: {path!r}")
  try:
    tensors = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(
      f"{path!r} is not a readable safetensors file: {e}"
    ) from e
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


def _matrix(tensors: Mapping[str, np.ndarray], key: str) -> tuple[int, int]:
  shape = np.shape(_require(tensors, key))
  if len(shape) != 2 or 0 in shape:
    raise CheckpointError(
      f"checkpoint key {key!r} has shape {shape}; expected a non-empty "
      "matrix (2 axes)"
    )
  return int(shape[0]), int(shape[1])


def _as_int(value: Any) -> Any:
  """Python int for int-like values (numpy ints), else unchanged."""
  if isinstance(value, bool):
    return value
  try:
    return operator.index(value)
  except TypeError:
    return value


def config_from_tensors(
  tensors: Mapping[str, np.ndarray],
  num_heads: int | None = None,
  **overrides: Any,
) -> ModelConfig:
  """The GPT-2 architecture from tensor shapes and the head count.

  Args:
    tensors: as returned by :func:`read_safetensors`.
    num_heads: heads per layer. Required: the weights do not determine it
      (a 4-head model loaded as 1 head gives wrong logits without error).
    **overrides: other :class:`ModelConfig` fields (e.g. ``dtype``,
      ``layer_norm_eps``; default GPT-2's 1e-5).

  Returns:
    A :class:`ModelConfig` with ``use_bias`` and ``tie_embeddings`` set.

  Raises:
    CheckpointError: no ``num_heads``, missing keys, malformed shapes.
    ConfigError: an invalid value (e.g. ``num_heads`` not dividing D).
  """
  if num_heads is None:
    raise CheckpointError(
      "num_heads is required: the weights do not determine the number of "
      "attention heads; pass num_heads=... (GPT-2 124M: 12) or keep the "
      "checkpoint's config.json (with n_head) beside the .safetensors file"
    )
  vocab, d = _matrix(tensors, "wte.weight")
  max_len, d_pos = _matrix(tensors, "wpe.weight")
  if d_pos != d:
    raise CheckpointError(
      f"checkpoint key 'wpe.weight' has width {d_pos} but 'wte.weight' has "
      f"width {d}; both must be d_model"
    )
  layers = sorted(
    {int(m.group(1)) for k in tensors if (m := re.match(r"^h\.(\d+)\.", k))}
  )
  if layers != list(range(len(layers))) or not layers:
    raise CheckpointError(
      f"checkpoint blocks h.<i> must be numbered 0..n-1; found {layers}"
    )
  d_mlp = _matrix(tensors, "h.0.mlp.c_fc.weight")[1]
  fields = dict(
    vocab_size=vocab,
    max_len=max_len,
    num_layers=len(layers),
    num_heads=_as_int(num_heads),
    d_model=d,
    d_mlp=d_mlp,
    use_bias=True,
    tie_embeddings=True,
    layer_norm_eps=1e-5,
  )
  fields.update(overrides)
  return lm_model("paper", **fields)


def read_hf_config(
  hf: Any, *, strict: bool = True, source: str = "config.json"
) -> dict[str, Any]:
  """Checks a Hugging Face ``GPT2Config`` dict; returns what it determines.

  Args:
    hf: the parsed ``config.json``.
    strict: refuse fields the loader does not know (they might change the
      model); ``False`` ignores them.
    source: the file name, for messages.

  Returns:
    :class:`ModelConfig` fields set by the config: ``num_heads``,
    ``layer_norm_eps`` and the shape fields present (``vocab_size``,
    ``max_len``, ``d_model``, ``num_layers``, ``d_mlp``).

  Raises:
    CheckpointError: not a JSON object; a field with a value this model
      does not compute (naming the field, the value and what is allowed);
      an invalid value; an unknown field (when ``strict``).
  """
  if not isinstance(hf, Mapping):
    raise CheckpointError(
      f"{source} must hold a JSON object (a GPT2Config); got "
      f"{type(hf).__name__}"
    )
  unknown = sorted(k for k in hf if k not in HF_FIELDS)
  if unknown and strict:
    raise CheckpointError(
      f"{source} has field(s) {unknown} that this loader does not know and "
      "that might change the model; pass strict=False to ignore them if you "
      "know they do not"
    )
  for key, allowed in _HF_FIXED.items():
    if key in hf and hf[key] not in allowed:
      raise CheckpointError(
        f"{source}: {key} = {hf[key]!r} is not supported (this model "
        f"computes {key} = " + " or ".join(repr(a) for a in allowed) + "); "
        "loading it would give wrong numbers"
      )
  out: dict[str, Any] = {}

  def positive_int(key: str) -> int:
    value = _as_int(hf[key])
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise CheckpointError(
        f"{source}: {key} = {hf[key]!r} is invalid; it must be an integer >= 1"
      )
    return value

  if "n_head" in hf:
    out["num_heads"] = positive_int("n_head")
  if "layer_norm_epsilon" in hf:
    eps = hf["layer_norm_epsilon"]
    if (
      not isinstance(eps, (int, float))
      or isinstance(eps, bool)
      or not math.isfinite(eps)
      or eps <= 0
    ):
      raise CheckpointError(
        f"{source}: layer_norm_epsilon = {eps!r} is invalid; it must be a "
        "finite number > 0"
      )
    out["layer_norm_eps"] = float(eps)
  for key, field in _HF_SHAPE.items():
    if key == "n_inner" and hf.get(key) is None:
      if "n_embd" in hf:
        out["d_mlp"] = 4 * positive_int("n_embd")
      continue
    if key in hf:
      out[field] = positive_int(key)
  return out


# ModelConfig field -> the config.json field that sets it.
_JSON_NAME = {
  "num_heads": "n_head",
  "layer_norm_eps": "layer_norm_epsilon",
  **{v: k for k, v in _HF_SHAPE.items()},
}


def _check_agree(
  want: Mapping[str, Any], got: Mapping[str, Any], what: str, against: str
) -> None:
  """Raises if a field of ``got`` differs from ``want`` (from ``against``)."""
  for field, value in want.items():
    if field in got and got[field] != value:
      src = _JSON_NAME.get(field, field) if against.endswith(".json") else field
      raise CheckpointError(
        f"{what} has {field} = {got[field]!r} but {against} says "
        f"{src} = {value!r}; they must agree"
      )


def gpt2_config_from_checkpoint(
  path: str | os.PathLike,
  num_heads: int | None = None,
  *,
  strict: bool = True,
  **overrides: Any,
) -> ModelConfig:
  """The :class:`ModelConfig` of a GPT-2 safetensors checkpoint.

  With a ``config.json`` beside the file, every field of it is checked (see
  the module docstring and :func:`read_hf_config`): ``n_head`` and
  ``layer_norm_epsilon`` are read, the sizes must match the tensors, and a
  field with a value this model does not compute is refused. Without one,
  ``num_heads`` is required.

  Args:
    path: the ``.safetensors`` file.
    num_heads: the head count; must agree with ``n_head`` when both exist.
    strict: refuse unknown ``config.json`` fields.
    **overrides: other :class:`ModelConfig` fields (``dtype``,
      ``param_dtype``, ``remat``, ``dropout``, ...); an architecture field
      that contradicts the checkpoint is an error.

  Returns:
    The config.

  Raises:
    CheckpointError: see :func:`config_from_tensors` and
      :func:`read_hf_config`; or ``num_heads``/``overrides`` contradicting
      the ``config.json``, or its sizes contradicting the tensors.
  """
  tensors = read_safetensors(path)
  cfg_json = os.path.join(os.path.dirname(os.fspath(path)), "config.json")
  from_json: dict[str, Any] = {}
  if os.path.exists(cfg_json):
    try:
      with open(cfg_json) as f:
        hf = json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"cannot read {cfg_json!r}: {e}") from e
    from_json = read_hf_config(hf, strict=strict, source=cfg_json)
    args = dict(overrides)
    if num_heads is not None:
      args["num_heads"] = _as_int(num_heads)
    _check_agree(from_json, args, "the call", cfg_json)
  if num_heads is None:
    num_heads = from_json.get("num_heads")
  fields = {"layer_norm_eps": from_json.get("layer_norm_eps", 1e-5)}
  fields.update(overrides)
  cfg = config_from_tensors(tensors, num_heads, **fields)
  shapes = {k: v for k, v in from_json.items() if k in _HF_SHAPE.values()}
  _check_agree(shapes, _shape_fields(cfg), "the checkpoint's tensors", cfg_json)
  return cfg


def _shape_fields(cfg: ModelConfig) -> dict[str, Any]:
  return {f: getattr(cfg, f) for f in _HF_SHAPE.values()}


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
  *,
  num_heads: int | None = None,
  **kwargs: Any,
) -> Transformer:
  """Loads a GPT-2 checkpoint in the HF safetensors layout.

  Args:
    path: the ``.safetensors`` file.
    cfg: the model config; default :func:`gpt2_config_from_checkpoint`
      (which reads the ``config.json`` beside the file). A given ``cfg`` is
      checked against that ``config.json`` when there is one.
    num_heads: the head count when there is no ``config.json`` (and no
      ``cfg``).
    **kwargs: ``mesh``, ``rules``, ``strict`` of :func:`load_gpt2_tensors`
      (``strict`` also refuses unknown ``config.json`` fields).

  Returns:
    The model.

  Raises:
    CheckpointError: see :func:`load_gpt2_tensors` and
      :func:`gpt2_config_from_checkpoint`; or a ``cfg`` that contradicts
      the ``config.json``.
  """
  strict = kwargs.get("strict", True)
  if cfg is None:
    cfg = gpt2_config_from_checkpoint(path, num_heads, strict=strict)
  else:
    cfg_json = os.path.join(os.path.dirname(os.fspath(path)), "config.json")
    if os.path.exists(cfg_json):
      heads = cfg.num_heads if num_heads is None else num_heads
      want = gpt2_config_from_checkpoint(path, heads, strict=strict)
      got = {f: getattr(cfg, f) for f in _ARCH_FIELDS}
      _check_agree(
        {f: getattr(want, f) for f in _ARCH_FIELDS}, got, "cfg", cfg_json
      )
  return load_gpt2_tensors(read_safetensors(path), cfg, **kwargs)
