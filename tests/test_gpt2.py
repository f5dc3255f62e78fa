"""GPT-2 safetensors loading against an independent numpy forward pass."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from dataweights.configs.base import ConfigError
from dataweights.models import gpt2
from dataweights.models.transformer import per_token_loss

V, P, D, H, F, NL = 50, 16, 16, 2, 64, 2


def _random_checkpoint(seed=0, prefix="", extra=None):
  rng = np.random.default_rng(seed)
  n = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
  t = {
    "wte.weight": n(V, D),
    "wpe.weight": n(P, D),
    "ln_f.weight": 1 + n(D),
    "ln_f.bias": n(D),
  }
  for i in range(NL):
    t.update(
      {
        f"h.{i}.ln_1.weight": 1 + n(D),
        f"h.{i}.ln_1.bias": n(D),
        f"h.{i}.ln_2.weight": 1 + n(D),
        f"h.{i}.ln_2.bias": n(D),
        f"h.{i}.attn.c_attn.weight": n(D, 3 * D),
        f"h.{i}.attn.c_attn.bias": n(3 * D),
        f"h.{i}.attn.c_proj.weight": n(D, D),
        f"h.{i}.attn.c_proj.bias": n(D),
        f"h.{i}.mlp.c_fc.weight": n(D, F),
        f"h.{i}.mlp.c_fc.bias": n(F),
        f"h.{i}.mlp.c_proj.weight": n(F, D),
        f"h.{i}.mlp.c_proj.bias": n(D),
        # causal-mask buffer found in older HF checkpoints: must be ignored
        f"h.{i}.attn.bias": np.tril(np.ones((1, 1, P, P), np.float32)),
      }
    )
  t.update(extra or {})
  return {prefix + k: v for k, v in t.items()}


def _np_gpt2_logits(t, tokens, n_head):
  """Plain numpy GPT-2 forward (HF GPT2LMHeadModel semantics), float64."""
  t = {k: v.astype(np.float64) for k, v in t.items()}

  def ln(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b

  def gelu(x):
    return (
      0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    )

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  b, length = tokens.shape
  d = t["wte.weight"].shape[1]
  dh = d // n_head
  x = t["wte.weight"][tokens] + t["wpe.weight"][:length]
  causal = np.tril(np.ones((length, length), bool))
  for i in range(NL):
    p = f"h.{i}."
    a = ln(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"])
    qkv = a @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
    q, k, v = np.split(qkv, 3, axis=-1)
    heads = lambda z: z.reshape(b, length, n_head, dh).transpose(0, 2, 1, 3)
    q, k, v = heads(q), heads(k), heads(v)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    s = np.where(causal, s, -np.inf)
    o = (softmax(s) @ v).transpose(0, 2, 1, 3).reshape(b, length, d)
    x = x + o @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
    m = ln(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"])
    m = gelu(m @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
    x = x + m @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
  x = ln(x, t["ln_f.weight"], t["ln_f.bias"])
  return x @ t["wte.weight"].T


@pytest.fixture
def ckpt_dir(tmp_path):
  save_file(
    _random_checkpoint(prefix="transformer."),
    str(tmp_path / "model.safetensors"),
  )
  (tmp_path / "config.json").write_text(json.dumps({"n_head": H}))
  return tmp_path


def test_config_from_checkpoint(ckpt_dir):
  cfg = gpt2.gpt2_config_from_checkpoint(ckpt_dir / "model.safetensors")
  assert (
    cfg.vocab_size,
    cfg.max_len,
    cfg.num_layers,
    cfg.d_model,
    cfg.num_heads,
    cfg.d_mlp,
  ) == (V, P, NL, D, H, F)
  assert cfg.gpt2_compat


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_loaded_logits_match_numpy_reference(tmp_path, prefix):
  tensors = _random_checkpoint(seed=1, prefix=prefix)
  path = tmp_path / "model.safetensors"
  save_file(tensors, str(path))
  cfg = gpt2.gpt2_config_from_checkpoint(path, num_heads=H)
  model = gpt2.load_gpt2_safetensors(path, cfg)
  tokens = np.random.default_rng(2).integers(0, V, size=(3, P))
  ref = _np_gpt2_logits(_random_checkpoint(seed=1), tokens, H)
  got = np.asarray(model(jnp.asarray(tokens)))
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  # and under jit, through the loss
  tgt = np.roll(tokens, -1, axis=1)
  loss = jax.jit(lambda m, x, y: per_token_loss(m(x), y))(model, tokens, tgt)
  logp = ref - ref.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  ref_loss = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(loss), ref_loss, atol=1e-5, rtol=1e-5)


def test_wrong_shape_names_key_and_shapes():
  tensors = _random_checkpoint()
  tensors["h.0.mlp.c_fc.weight"] = np.zeros((D, F + 1), np.float32)
  cfg = gpt2.config_from_tensors(_random_checkpoint(), num_heads=H)
  with pytest.raises(
    gpt2.CheckpointError,
    match=r"'h\.0\.mlp\.c_fc\.weight' has shape \(16, 65\).*"
    r"expects \(16, 64\)",
  ):
    gpt2.load_gpt2_tensors(tensors, cfg)


def test_missing_and_extra_keys():
  cfg = gpt2.config_from_tensors(_random_checkpoint(), num_heads=H)
  tensors = _random_checkpoint()
  del tensors["h.1.ln_2.bias"]
  with pytest.raises(gpt2.CheckpointError, match=r"no key 'h\.1\.ln_2\.bias'"):
    gpt2.load_gpt2_tensors(tensors, cfg)
  extra = _random_checkpoint(extra={"h.0.attn.rotary": np.zeros(3, np.float32)})
  with pytest.raises(gpt2.CheckpointError, match=r"h\.0\.attn\.rotary"):
    gpt2.load_gpt2_tensors(extra, cfg)
  gpt2.load_gpt2_tensors(extra, cfg, strict=False)


def test_untied_head_and_bad_heads_rejected():
  t = _random_checkpoint()
  cfg = gpt2.config_from_tensors(t, num_heads=H)
  gpt2.load_gpt2_tensors({**t, "lm_head.weight": t["wte.weight"].copy()}, cfg)
  with pytest.raises(gpt2.CheckpointError, match="lm_head.weight"):
    gpt2.load_gpt2_tensors({**t, "lm_head.weight": t["wte.weight"] + 1}, cfg)
  with pytest.raises(gpt2.CheckpointError, match="num_heads"):
    gpt2.config_from_tensors(t)  # D=16 is not a multiple of 64
  with pytest.raises(ConfigError, match="num_heads"):
    gpt2.config_from_tensors(t, num_heads=3)
  untied = gpt2.config_from_tensors(t, num_heads=H, tie_embeddings=False)
  with pytest.raises(gpt2.CheckpointError, match="tie_embeddings=False"):
    gpt2.load_gpt2_tensors(t, untied)
