"""The decoder-only transformer: causality, masks, losses, jit, remat, configs.

The forward pass itself is checked against an independent numpy GPT-2 in
tests/test_gpt2.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights.configs import lm
from dataweights.configs.base import ConfigError
from dataweights.models import transformer as tr

CFG = lm.lm_model("smoke", num_layers=2, d_model=32, num_heads=4, d_mlp=64)
B, L = 3, 12


@pytest.fixture(scope="module")
def model():
  return tr.Transformer(CFG, rngs=nnx.Rngs(0))


@nnx.jit
def fwd(m, tokens, mask=None, key=None):
  # Jitted: one compile per shape instead of one per eager op.
  return m(tokens, mask_BxL=mask, dropout_key=key)


next_token_loss = nnx.jit(tr.next_token_loss)


@nnx.jit
def loss_grad(m, tokens):
  return nnx.grad(lambda m: tr.next_token_loss(m, tokens).mean())(m)


def _tokens(seed=0, shape=(B, L)):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def test_shapes_and_dtype(model):
  logits = fwd(model, _tokens())
  assert logits.shape == (B, L, CFG.vocab_size)
  assert logits.dtype == jnp.float32


def test_causal_future_tokens_do_not_change_past_logits(model):
  tok = _tokens()
  t = 5
  changed = tok.at[:, t:].set((tok[:, t:] + 7) % CFG.vocab_size)
  a, b = fwd(model, tok), fwd(model, changed)
  np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
  # the test can fail: position t does see the change
  assert np.abs(np.asarray(a[:, t:] - b[:, t:])).max() > 1e-3


def test_jit_equals_no_jit(model):
  tok = _tokens(1)
  mask = jnp.ones((B, L), bool).at[0, 8:].set(False)
  eager = model(tok, mask_BxL=mask)
  jitted = nnx.jit(lambda m, x, k: m(x, mask_BxL=k))(model, tok, mask)
  np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_padding_mask_equals_truncated_sequence(model):
  """Right padding with arbitrary pad ids gives the unpadded logits."""
  tok = _tokens(2)
  n = 7
  padded = tok.at[:, n:].set(CFG.vocab_size - 1)
  mask = jnp.arange(L)[None, :] < n
  mask = jnp.broadcast_to(mask, (B, L))
  got = fwd(model, padded, mask)[:, :n]
  want = fwd(model, tok[:, :n])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # a mask that hides a real key changes the logits after it
  holes = jnp.ones((B, L), bool).at[:, 2].set(False)
  diff = fwd(model, tok, holes)[:, 3:] - fwd(model, tok)[:, 3:]
  assert np.abs(np.asarray(diff)).max() > 1e-3
  assert np.all(np.isfinite(np.asarray(fwd(model, tok, ~mask))))


def test_per_example_loss_matches_manual(model):
  tok = _tokens(3)
  mask = jnp.ones((B, L), bool).at[1, 6:].set(False).at[2, :].set(False)
  logits = fwd(model, tok[:, :-1])
  logp = jax.nn.log_softmax(logits, -1)
  nll = -np.take_along_axis(np.asarray(logp), np.asarray(tok[:, 1:, None]), -1)
  nll = nll[..., 0]
  m = np.asarray(mask[:, 1:], np.float32)
  want = [
    nll[0].mean(),
    (nll[1] * m[1]).sum() / m[1].sum(),
    0.0,  # nothing to predict: safe denominator gives 0
  ]
  got = next_token_loss(model, tok, mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  per_tok = tr.per_token_loss(logits, tok[:, 1:], mask[:, 1:])
  np.testing.assert_allclose(per_tok, nll * m, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
    tr.per_example_loss(logits, tok[:, 1:]), nll.mean(-1), atol=1e-5
  )


def test_examples_are_independent(model):
  """Each example's loss is the same alone or in a batch (no mixing)."""
  tok = _tokens(4)
  batch = next_token_loss(model, tok)
  alone = jnp.concatenate(
    [next_token_loss(model, tok[i : i + 1]) for i in range(B)]
  )
  np.testing.assert_allclose(batch, alone, atol=1e-5, rtol=1e-5)


def test_split_merge_grad_equals_nnx_grad_of_remat_model():
  """jax.grad through nnx.split/merge (no remat) == nnx.grad with remat."""
  tok = _tokens(5)
  plain = tr.Transformer(CFG, rngs=nnx.Rngs(1))
  remat = tr.Transformer(dataclasses.replace(CFG, remat=True), rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(plain, nnx.Param)

  def loss(p):
    return tr.next_token_loss(nnx.merge(graphdef, p), tok).mean()

  g1 = jax.jit(jax.grad(loss))(params)
  g2 = nnx.state(loss_grad(remat, tok), nnx.Param)
  assert jax.tree.structure(g1) == jax.tree.structure(g2)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
  assert max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(g1)) > 0


def test_untied_head_and_no_bias():
  cfg = dataclasses.replace(CFG, tie_embeddings=False, use_bias=False)
  m = tr.Transformer(cfg, rngs=nnx.Rngs(0))
  assert not cfg.gpt2_compat
  assert m.head is not None and m.blocks[0].mlp.fc.bias is None
  assert fwd(m, _tokens()).shape == (B, L, cfg.vocab_size)
  # the untied head is used: zeroing it zeroes the logits
  m.head[...] = jnp.zeros_like(m.head[...])
  np.testing.assert_array_equal(fwd(m, _tokens()), 0.0)


def test_dropout_only_with_key():
  cfg = dataclasses.replace(CFG, dropout=0.3)
  m = tr.Transformer(cfg, rngs=nnx.Rngs(0))
  m0 = tr.Transformer(CFG, rngs=nnx.Rngs(0))
  tok = _tokens(7)
  np.testing.assert_array_equal(fwd(m, tok), fwd(m0, tok))
  k = jax.random.key(3)
  a, b = fwd(m, tok, key=k), fwd(m, tok, key=k)
  np.testing.assert_array_equal(a, b)
  c = fwd(m, tok, key=jax.random.key(4))
  assert np.abs(np.asarray(a - c)).max() > 1e-3


def test_bfloat16_compute_close_to_float32():
  m32 = tr.Transformer(CFG, rngs=nnx.Rngs(0))
  m16 = tr.Transformer(
    dataclasses.replace(CFG, dtype="bfloat16"), rngs=nnx.Rngs(0)
  )
  tok = _tokens(8)
  a, b = fwd(m32, tok), fwd(m16, tok)
  assert b.dtype == jnp.float32 and m16.wte[...].dtype == jnp.float32
  # bfloat16 has 8 mantissa bits: relative error ~ 2^-8 per op
  scale = np.abs(np.asarray(a)).max()
  assert np.abs(np.asarray(a - b)).max() < 0.05 * scale
  assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_param_count_gpt2_124m():
  cfg = lm.lm_model("paper", size="gpt2-124m")
  abstract = nnx.eval_shape(lambda: tr.Transformer(cfg, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n == 124_439_808  # the published GPT-2 small count (tied head)


def test_bad_inputs_raise(model):
  with pytest.raises(ValueError, match="exceeds ModelConfig.max_len = 32"):
    model(jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="mask shape"):
    model(_tokens(), mask_BxL=jnp.ones((B, L + 1), bool))


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(d_model=30, num_heads=4), "d_model = 30 is not divisible by"),
    (dict(dtype="float16"), "dtype = 'float16' is invalid"),
    (dict(num_layers=0), "num_layers = 0 is invalid"),
    (dict(dropout=1.5), "dropout = 1.5 is invalid"),
    (dict(widht=3), "unknown field"),
  ],
)
def test_bad_configs_raise(overrides, match):
  with pytest.raises(ConfigError, match=match):
    lm.lm_model("smoke", **overrides)


def test_profiles_and_sizes():
  assert lm.lm_model("smoke").num_layers <= 2
  book = lm.lm_model("book")
  assert (book.num_layers, book.d_model, book.max_len) == (4, 128, 128)
  big = lm.lm_model("smoke", size="gpt2-355m")
  assert (big.num_layers, big.d_model, big.num_heads) == (24, 1024, 16)
  with pytest.raises(ConfigError, match="unknown model size 'gpt5'"):
    lm.lm_model("book", size="gpt5")
  with pytest.raises(ConfigError, match="unknown profile"):
    lm.lm_model("huge")


def test_token_xent_value_and_gradient():
  # Oracles: a float64 numpy cross-entropy (value), its closed-form
  # gradient softmax - onehot, central finite differences in float64, and
  # autodiff of the log_softmax form (the default path) in float32.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 7)) * 4.0
  x[0, 0, 3] = 60.0  # a dominant logit: the log-normaliser must be stable
  t = rng.integers(0, 7, size=(2, 5))
  g = rng.normal(size=(2, 5))
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  want = lse - np.take_along_axis(x, t[..., None], -1)[..., 0]
  p = np.exp(x - lse[..., None])
  want_grad = (p - np.eye(7)[t]) * g[..., None]
  x32, t32 = jnp.asarray(x, jnp.float32), jnp.asarray(t)
  np.testing.assert_allclose(
    tr.token_xent(x32, t32), want, rtol=1e-5, atol=1e-5
  )
  f = lambda z: jnp.sum(jnp.asarray(g, z.dtype) * tr.token_xent(z, t32))  # noqa: E731
  np.testing.assert_allclose(jax.grad(f)(x32), want_grad, atol=2e-6)
  f_ref = lambda z: jnp.sum(g * tr.per_token_loss(z, t32))  # noqa: E731
  np.testing.assert_allclose(jax.grad(f)(x32), jax.grad(f_ref)(x32), atol=1e-6)
  with jax.enable_x64(True):
    x64 = jnp.asarray(x, jnp.float64)
    d = rng.normal(size=x.shape)
    h = 1e-6
    fd = (f(x64 + h * d) - f(x64 - h * d)) / (2 * h)
    np.testing.assert_allclose(
      float(jnp.sum(jax.grad(f)(x64) * d)), float(fd), rtol=1e-7
    )
  # bfloat16 logits: the gradient comes back in bfloat16.
  gb = jax.grad(f)(x32.astype(jnp.bfloat16))
  assert gb.dtype == jnp.bfloat16


def test_fused_loss_equals_the_default_loss(model):
  from dataweights.train.step import lm_loss, lm_loss_fused

  tok = _tokens(5)
  mask = jnp.ones((B, L), bool).at[1, 7:].set(False)
  graphdef, params = nnx.split(model, nnx.Param)
  batch = {"tokens_BxL": tok, "mask_BxL": mask}

  def total(params, fn):
    return jnp.sum(
      fn(nnx.merge(graphdef, params), batch, None) * jnp.arange(1.0, B + 1)
    )

  v1, g1 = jax.jit(jax.value_and_grad(total), static_argnums=1)(params, lm_loss)
  v2, g2 = jax.jit(jax.value_and_grad(total), static_argnums=1)(
    params, lm_loss_fused
  )
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
