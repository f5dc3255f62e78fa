"""Property tests of the model's public entry points and the GPT-2 loader.

* ``Transformer(cfg)`` for random valid configs, called with random shapes,
  random ids (some out of range), random masks and dropout keys: finite
  float32 logits of shape ``(B, L, V)``, or ``ValueError`` /
  ``TokenIdError`` naming the argument; the losses stay finite under any
  mask (a row with no real token has loss 0).
* ``per_token_loss`` on random finite logits (any magnitude float32 holds)
  and random targets: never NaN, finite whenever the true loss (at most
  ``max - min`` of the logits) is representable, or ``TokenIdError``.
* The GPT-2 loader on random corruptions of a real checkpoint (Hugging
  Face's, tests/fixtures/gpt2_hf/a): deleted, reshaped and added tensors,
  random ``config.json`` values for every field Hugging Face knows and for
  unknown ones, random ``num_heads``: the model loads (and computes the
  reference logits when the change is harmless) or ``CheckpointError`` /
  ``ConfigError`` names the key or field.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from dataweights.configs import lm
from dataweights.configs.base import ConfigError
from dataweights.models import gpt2
from dataweights.models import transformer as tr
from dataweights.models.ids import TokenIdError
from props import anything, examples, json_values, outcome

F32_MAX = float(np.finfo(np.float32).max)
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "gpt2_hf" / "a"


@st.composite
def model_configs(draw):
  heads = draw(st.integers(1, 3))
  return lm.lm_model(
    "smoke",
    vocab_size=draw(st.integers(1, 40)),
    max_len=draw(st.integers(1, 10)),
    num_layers=draw(st.integers(1, 2)),
    num_heads=heads,
    d_model=heads * draw(st.integers(1, 4)),
    d_mlp=draw(st.integers(1, 12)),
    dropout=draw(st.sampled_from([0.0, 0.1, 0.9])),
    use_bias=draw(st.booleans()),
    tie_embeddings=draw(st.booleans()),
    layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5, 1.0])),
    init_std=draw(st.sampled_from([1e-4, 0.02, 1.0])),
    dtype=draw(st.sampled_from(["float32", "bfloat16"])),
    param_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
    remat=draw(st.booleans()),
  )


@pytest.mark.slow
@examples(30)
@given(cfg=model_configs(), data=st.data())
def test_model_call_is_finite_or_names_the_argument(cfg, data):
  model = tr.Transformer(cfg, rngs=nnx.Rngs(data.draw(st.integers(0, 3))))
  b = data.draw(st.integers(0, 3), label="B")
  v = cfg.vocab_size
  fault = data.draw(
    st.sampled_from([None] * 4 + ["bad id", "too long", "empty"]),
    label="fault",
  )
  if fault == "too long":
    length = cfg.max_len + 1 + data.draw(st.integers(0, 2), label="extra")
  elif fault == "empty":
    length = 0
  else:
    length = data.draw(st.integers(1, cfg.max_len), label="L")
  tokens = np.asarray(
    data.draw(
      st.lists(st.integers(0, v - 1), min_size=b * length, max_size=b * length),
      label="tokens",
    ),
    np.int32,
  ).reshape(b, length)
  if fault == "bad id" and tokens.size:
    i = data.draw(st.integers(0, tokens.size - 1))
    tokens.reshape(-1)[i] = data.draw(st.sampled_from([-2, -1, v, v + 1]))
  mask = data.draw(
    st.none()
    | st.lists(st.booleans(), min_size=b * length, max_size=b * length).map(
      lambda m: np.asarray(m, bool).reshape(b, length)
    ),
    label="mask",
  )
  key = data.draw(st.sampled_from([None, jax.random.key(1)]), label="key")
  try:
    logits = model(tokens, mask_BxL=mask, dropout_key=key)
  except TokenIdError as e:
    outcome("TokenIdError")
    assert "tokens_BxL" in str(e) and f"vocab_size = {v}" in str(e)
    assert ((tokens < 0) | (tokens >= v)).any()
    return
  except ValueError as e:
    outcome("ValueError")
    assert "tokens_BxL" in str(e) or "max_len" in str(e), str(e)
    assert length == 0 or length > cfg.max_len
    return
  outcome("finite logits")
  assert fault in (None, "bad id") and not ((tokens < 0) | (tokens >= v)).any()
  assert logits.shape == (b, length, v) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  if b and length >= 2 and ((tokens >= 0) & (tokens < v)).all():
    full = tokens if length <= cfg.max_len + 1 else tokens[:, : cfg.max_len]
    m = None if mask is None else mask[:, : full.shape[1]]
    loss_B = tr.next_token_loss(model, full, m, dropout_key=key)
    assert loss_B.shape == (b,) and np.isfinite(np.asarray(loss_B)).all()
    if m is not None:  # rows with no counted prediction have loss 0
      empty = np.asarray(tr.next_token_mask(m)).sum(1) == 0
      assert (np.asarray(loss_B)[empty] == 0).all()


@examples(40)
@given(
  logits=st.lists(
    st.floats(-F32_MAX, F32_MAX, width=32), min_size=1, max_size=12
  ).map(lambda x: np.asarray(x, np.float32)),
  data=st.data(),
)
def test_per_token_loss_finite_or_bad_target(logits, data):
  v = logits.shape[0]
  b = data.draw(st.integers(1, 3))
  logits_BxLxV = np.broadcast_to(logits, (b, 2, v))
  targets = np.asarray(
    data.draw(st.lists(st.integers(-2, v + 1), min_size=2 * b, max_size=2 * b))
  ).reshape(b, 2)
  try:
    loss = tr.per_token_loss(logits_BxLxV, targets)
  except TokenIdError as e:
    outcome("TokenIdError")
    assert "targets_BxL" in str(e) and f"vocab_size = {v}" in str(e)
    return
  loss = np.asarray(loss)
  outcome("finite" if np.isfinite(loss).all() else "inf (loss beyond float32)")
  assert not np.isnan(loss).any() and (loss >= 0).all()
  # The loss is at most max - min of the logits: finite when that is.
  if float(logits.max()) - float(logits.min()) < F32_MAX:
    assert np.isfinite(loss).all()


# --- the GPT-2 loader -------------------------------------------------------

_BASE = gpt2.read_safetensors(FIXTURE / "model.safetensors")
_BASE_CFG = gpt2.gpt2_config_from_checkpoint(FIXTURE / "model.safetensors")
_KEYS = sorted(_BASE)


@st.composite
def corrupted(draw):
  tensors = dict(_BASE)
  what = draw(st.sampled_from(["delete", "reshape", "add", "dtype"]))
  key = draw(st.sampled_from(_KEYS))
  if what == "delete":
    del tensors[key]
  elif what == "reshape":
    shape = draw(st.lists(st.integers(0, 5), max_size=3).map(tuple))
    tensors[key] = np.zeros(shape, np.float32)
  elif what == "add":
    key = draw(
      st.sampled_from(["h.2.ln_1.weight", "h.0.attn.rotary", "lm_head.weight"])
      | st.text(max_size=10)
    )
    tensors[key] = np.zeros(draw(st.sampled_from([(3,), (40, 16)])), np.float32)
  else:
    tensors[key] = tensors[key].astype(draw(st.sampled_from(["f2", "i4"])))
  return what, key, tensors


@examples(40)
@given(case=corrupted(), heads=st.one_of(st.just(2), anything))
def test_corrupted_tensors_load_or_name_the_key(case, heads):
  what, key, tensors = case
  try:
    cfg = gpt2.config_from_tensors(tensors, heads)
    model = gpt2.load_gpt2_tensors(tensors, cfg)
  except gpt2.CheckpointError as e:
    outcome(f"{what}: CheckpointError")
    msg = str(e)
    named = [k for k in set(tensors) | set(_BASE) if repr(k) in msg]
    assert named or "num_heads" in msg or "h.<i>" in msg, msg
    return
  except ConfigError as e:
    outcome(f"{what}: ConfigError")
    assert "num_heads" in str(e) or "d_model" in str(e), str(e)
    return
  outcome(f"{what}: loaded")
  assert what in ("dtype", "add") or heads == 2
  assert model.cfg.num_heads == heads


_TMP = pathlib.Path(tempfile.mkdtemp(prefix="dw_props_gpt2_"))
shutil.copy(FIXTURE / "model.safetensors", _TMP / "model.safetensors")
_JSON = json.loads((FIXTURE / "config.json").read_text())


@examples(80)
@given(
  field=st.sampled_from(sorted(gpt2.HF_FIELDS)) | st.text(max_size=8),
  value=json_values | st.integers(1, 70),
  drop=st.booleans(),
)
def test_random_config_json_loads_or_names_the_field(field, value, drop):
  hf = dict(_JSON)
  if drop:
    hf.pop(field, None)
  else:
    hf[field] = value
  (_TMP / "config.json").write_text(json.dumps(hf))
  try:
    cfg = gpt2.gpt2_config_from_checkpoint(_TMP / "model.safetensors")
  except gpt2.CheckpointError as e:
    outcome(f"{gpt2.HF_FIELDS.get(field, 'unknown')} field: CheckpointError")
    assert field in str(e) or repr(field) in str(e), str(e)
    return
  except ConfigError as e:  # a valid n_head that does not divide n_embd
    outcome("n_head: ConfigError")
    assert field == "n_head" and "num_heads" in str(e), str(e)
    return
  outcome(f"{gpt2.HF_FIELDS.get(field, 'unknown')} field: loaded")
  want = _BASE_CFG
  if not drop and field == "n_head":
    want = dataclasses.replace(want, num_heads=value)
  if not drop and field == "layer_norm_epsilon":
    want = dataclasses.replace(want, layer_norm_eps=float(value))
  assert cfg == want
