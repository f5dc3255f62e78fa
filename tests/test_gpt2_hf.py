"""GPT-2 loading and the Transformer against Hugging Face's own GPT2LMHeadModel.

The fixtures in ``tests/fixtures/gpt2_hf/`` were made once by
``tests/fixtures/gpt2_hf/make_reference.py`` (transformers 5.24.0, torch
2.13.0, a throwaway environment; transformers is not needed here): three tiny
configurations (one with ``layer_norm_epsilon=1e-3`` and ``n_inner=40``,
one with ``layer_norm_epsilon=1e-6``, ``n_inner=20`` and the
``gelu_pytorch_tanh``/``reorder_and_upcast_attn`` variants), every parameter
perturbed, saved with ``save_pretrained``; the reference holds logits, loss
and every parameter's gradient (tied embedding included) in float64, with
no padding, left padding and right padding, and the same from Hugging
Face's float32 run of the same weights.

Tolerance. ``rel(x) = max|x - ref64| / max|ref64|`` per array. For each
case (configuration x padding) the yardstick is ``eps_hf``, the largest
``rel`` of Hugging Face's own float32 run over the case's arrays (logits at
real positions, loss, every gradient): 5.4e-7 to 2.8e-6. Every one of our
float32 arrays must satisfy ``rel <= 4 eps_hf``: as close to the float64
reference as Hugging Face's own float32 arithmetic, with a factor for a
different summation order (measured: our worst ``rel`` is 0.57 to 1.67
times ``eps_hf``). The defects this guards against are orders of magnitude
larger: the left-padding loss bug gave ``rel`` 1e-2 (loss) and 0.8
(gradients), a stop_gradient on the tied output embedding gives ``rel``
0.4-0.9 on ``wte``; in configuration b, epsilon 1e-5 instead of 1e-3 gives
``rel`` 1.1e-2 on the logits and 1 head instead of 4 gives 0.83.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights.models import gpt2
from dataweights.models import transformer as tr
from dataweights.train.step import lm_loss

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "gpt2_hf"
CASES = ("a", "b", "c")
PADS = ("none", "left", "right")
FACTOR = 4.0

_models: dict[str, tr.Transformer] = {}


def _model(case: str) -> tr.Transformer:
  if case not in _models:
    _models[case] = gpt2.load_gpt2_safetensors(
      FIXTURES / case / "model.safetensors"
    )
  return _models[case]


def _reference(case: str, pad: str) -> dict[str, np.ndarray]:
  z = np.load(FIXTURES / case / "reference.npz")
  prefix = "" if pad == "none" else pad + "/"
  out = {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}
  if pad == "none":
    out = {
      k: v for k, v in out.items() if not k.startswith(("left/", "right/"))
    }
  return out


def _hf_layout(g: nnx.State, cfg) -> dict[str, jax.Array]:
  """Our gradients in Hugging Face's names and Conv1D layout (x W + b)."""
  d = cfg.d_model
  out = {
    "wte.weight": g.wte[...],
    "wpe.weight": g.wpe[...],
    "ln_f.weight": g.ln_f.scale[...],
    "ln_f.bias": g.ln_f.bias[...],
  }
  for i in range(cfg.num_layers):
    b, p = g.blocks[i], f"h.{i}."
    a = b.attn
    qkv = (a.query, a.key, a.value)
    out |= {
      p + "ln_1.weight": b.ln_1.scale[...],
      p + "ln_1.bias": b.ln_1.bias[...],
      p + "ln_2.weight": b.ln_2.scale[...],
      p + "ln_2.bias": b.ln_2.bias[...],
      p + "attn.c_attn.weight": jnp.concatenate(
        [x.kernel[...].reshape(d, d) for x in qkv], axis=1
      ),
      p + "attn.c_attn.bias": jnp.concatenate(
        [x.bias[...].reshape(d) for x in qkv]
      ),
      p + "attn.c_proj.weight": a.out.kernel[...].reshape(d, d),
      p + "attn.c_proj.bias": a.out.bias[...],
      p + "mlp.c_fc.weight": b.mlp.fc.kernel[...],
      p + "mlp.c_fc.bias": b.mlp.fc.bias[...],
      p + "mlp.c_proj.weight": b.mlp.proj.kernel[...],
      p + "mlp.c_proj.bias": b.mlp.proj.bias[...],
    }
  return {"transformer." + k: v for k, v in out.items()}


def _rel(x, ref) -> float:
  ref = np.asarray(ref, np.float64)
  return float(
    np.abs(np.asarray(x, np.float64) - ref).max() / np.abs(ref).max()
  )


def _inputs(ref):
  tokens = jnp.asarray(ref["tokens_BxL"])
  mask = ref.get("mask_BxL")
  real = np.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
  return tokens, None if mask is None else jnp.asarray(real), real


def _yardstick(ref, real) -> float:
  """eps_hf: the worst relative error of Hugging Face's float32 run."""
  errs = [
    _rel(ref["logits32_BxLxV"][real], ref["logits64_BxLxV"][real]),
    _rel(ref["loss32"], ref["loss64"]),
  ]
  errs += [
    _rel(ref[k.replace("grad64/", "grad32/")], ref[k])
    for k in ref
    if k.startswith("grad64/")
  ]
  return max(errs)


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("case", CASES)
def test_logits_loss_and_gradients_match_hugging_face(case, pad):
  ref = _reference(case, pad)
  model = _model(case)
  tokens, mask, real = _inputs(ref)
  eps_hf = _yardstick(ref, real)
  tol = FACTOR * eps_hf
  assert 1e-8 < eps_hf < 1e-5  # float32 rounding, not a broken reference

  logits = jax.jit(lambda m, t, k: m(t, mask_BxL=k))(model, tokens, mask)
  # Logits at padded positions are meaningless (documented); real ones agree.
  err = _rel(np.asarray(logits)[real], ref["logits64_BxLxV"][real])
  assert err <= tol, f"logits rel {err:.3g} > {tol:.3g} (eps_hf {eps_hf:.3g})"

  loss_fn = lambda m: tr.next_token_loss(m, tokens, mask).mean()
  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  err = _rel(loss, ref["loss64"])
  assert err <= tol, (
    f"loss rel {err:.3g} > {tol:.3g}: {loss} vs {ref['loss64']}"
  )

  ours = _hf_layout(grads, model.cfg)
  want = {k[len("grad64/") :] for k in ref if k.startswith("grad64/")}
  assert set(ours) == want  # every parameter, the tied wte counted once
  bad = {
    k: f"{_rel(v, ref['grad64/' + k]):.3g}"
    for k, v in ours.items()
    if _rel(v, ref["grad64/" + k]) > tol
  }
  assert not bad, f"gradients beyond {tol:.3g} (eps_hf {eps_hf:.3g}): {bad}"


@pytest.mark.parametrize("pad", ("left", "right"))
def test_train_step_loss_matches_hugging_face_under_padding(pad):
  """lm_loss (the training step's default loss) is the same masked loss."""
  ref = _reference("a", pad)
  tokens, mask, real = _inputs(ref)
  batch = {"tokens_BxL": tokens, "mask_BxL": mask}
  loss = jax.jit(lambda m, b: lm_loss(m, b, None).mean())(_model("a"), batch)
  tol = FACTOR * _yardstick(ref, real)
  assert _rel(loss, ref["loss64"]) <= tol


def test_config_json_is_read():
  for case, (heads, eps, d_mlp) in {
    "a": (2, 1e-5, 64),
    "b": (4, 1e-3, 40),
    "c": (3, 1e-6, 20),
  }.items():
    cfg = _model(case).cfg
    assert (cfg.num_heads, cfg.layer_norm_eps, cfg.d_mlp) == (heads, eps, d_mlp)


def test_every_gpt2config_field_is_classified():
  """Each field Hugging Face's GPT2Config has is read, checked or known."""
  fields = json.loads((FIXTURES / "gpt2_config_fields.json").read_text())
  missing = [f for f in fields["fields"] if f not in gpt2.HF_FIELDS]
  assert not missing
  for case in CASES:
    saved = json.loads((FIXTURES / case / "config.json").read_text())
    assert set(saved) <= set(gpt2.HF_FIELDS)


def _copy_case(tmp_path, case="a", **changes):
  """The fixture's checkpoint with config.json fields changed (None: drop)."""
  for name in ("model.safetensors", "config.json"):
    shutil.copy(FIXTURES / case / name, tmp_path / name)
  path = tmp_path / "config.json"
  hf = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      hf.pop(key, None)
    else:
      hf[key] = value
  path.write_text(json.dumps(hf))
  return tmp_path / "model.safetensors"


@pytest.mark.parametrize(
  "field,value",
  [
    ("activation_function", "gelu"),
    ("activation_function", "relu"),
    ("scale_attn_by_inverse_layer_idx", True),
    ("scale_attn_weights", False),
    ("add_cross_attention", True),
    ("tie_word_embeddings", False),
    ("model_type", "gpt_neo"),
    ("pruned_heads", {"0": [1]}),
  ],
)
def test_config_fields_that_change_the_model_are_refused(
  tmp_path, field, value
):
  path = _copy_case(tmp_path, **{field: value})
  with pytest.raises(gpt2.CheckpointError, match=rf"{field} = .*not supported"):
    gpt2.load_gpt2_safetensors(path)
  with pytest.raises(gpt2.CheckpointError, match=field):
    gpt2.gpt2_config_from_checkpoint(path, strict=False)


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("n_head", 0, r"n_head = 0 is invalid"),
    ("n_head", "2", r"n_head = '2' is invalid"),
    ("layer_norm_epsilon", -1.0, r"layer_norm_epsilon = -1.0 is invalid"),
    ("vocab_size", 41, r"vocab_size = 40 .* vocab_size = 41"),
    ("n_positions", 13, r"max_len = 12 .* n_positions = 13"),
    ("n_embd", 32, r"d_model = 16 .* n_embd = 32"),
    ("n_layer", 3, r"num_layers = 2 .* n_layer = 3"),
    ("n_inner", 63, r"d_mlp = 64 .* n_inner = 63"),
    ("some_new_field", 1, r"some_new_field"),
  ],
)
def test_config_json_errors_name_the_field(tmp_path, field, value, match):
  path = _copy_case(tmp_path, **{field: value})
  with pytest.raises(gpt2.CheckpointError, match=match):
    gpt2.load_gpt2_safetensors(path)


def test_unknown_config_field_allowed_with_strict_false(tmp_path):
  path = _copy_case(tmp_path, some_new_field=1)
  model = gpt2.load_gpt2_safetensors(path, strict=False)
  assert model.cfg == _model("a").cfg


def test_without_config_json_the_head_count_is_required(tmp_path):
  """A 4-head model must not load as some guessed head count."""
  path = _copy_case(tmp_path, "b")
  (tmp_path / "config.json").unlink()
  with pytest.raises(gpt2.CheckpointError, match="num_heads is required"):
    gpt2.load_gpt2_safetensors(path)
  with pytest.raises(gpt2.CheckpointError, match="num_heads is required"):
    gpt2.gpt2_config_from_checkpoint(path)
  # Stated explicitly (with the epsilon config.json would have given):
  model = gpt2.load_gpt2_safetensors(
    path,
    gpt2.gpt2_config_from_checkpoint(path, num_heads=4, layer_norm_eps=1e-3),
  )
  ref = _reference("b", "none")
  logits = model(jnp.asarray(ref["tokens_BxL"]))
  assert _rel(logits, ref["logits64_BxLxV"]) <= FACTOR * _yardstick(
    ref, np.ones(ref["tokens_BxL"].shape, bool)
  )


def test_arguments_contradicting_config_json_are_refused(tmp_path):
  path = _copy_case(tmp_path, "b")
  with pytest.raises(
    gpt2.CheckpointError, match=r"num_heads = 2 .* n_head = 4"
  ):
    gpt2.gpt2_config_from_checkpoint(path, num_heads=2)
  with pytest.raises(gpt2.CheckpointError, match="layer_norm_epsilon = 0.001"):
    gpt2.gpt2_config_from_checkpoint(path, layer_norm_eps=1e-5)
  wrong = gpt2.gpt2_config_from_checkpoint(path, strict=True)
  wrong = wrong.__class__(**{**_asdict(wrong), "layer_norm_eps": 1e-5})
  with pytest.raises(gpt2.CheckpointError, match="layer_norm_eps"):
    gpt2.load_gpt2_safetensors(path, wrong)
  # Fields the checkpoint does not fix may be chosen freely:
  cfg = gpt2.gpt2_config_from_checkpoint(path, dtype="bfloat16", remat=True)
  assert (cfg.dtype, cfg.remat, cfg.num_heads) == ("bfloat16", "full", 4)  # True means "full"


def _asdict(cfg):
  import dataclasses

  return dataclasses.asdict(cfg)
