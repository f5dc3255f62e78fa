"""Language-model inputs that used to give silently wrong numbers.

* Padding: a left- or right-padded row must have the loss (and gradient) of
  its real tokens alone. The oracle is an unpadded run of the same tokens.
  Left padding shifts the real tokens to later positions, and the learned
  position embedding would change their logits, so the left-padding
  comparison uses a model whose position table is constant (every row the
  same vector): its function is then invariant to shifts, and any
  remaining difference is the masking's.
* Token ids outside ``[0, vocab_size)``: refused with a message naming the
  id and the vocabulary size, eagerly, under jit, vmap and grad, and on
  the host in the training loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights.configs import lm
from dataweights.configs import train as train_configs
from dataweights.models import ids
from dataweights.models import transformer as tr
from dataweights.train.loop import Trainer
from dataweights.train.step import lm_loss

CFG = lm.lm_model("smoke", num_layers=1, d_model=16, num_heads=2, d_mlp=32)
V = CFG.vocab_size


@pytest.fixture(scope="module")
def shift_invariant_model():
  """Random weights, a constant position table: shifts change nothing."""
  model = tr.Transformer(CFG, rngs=nnx.Rngs(3))
  row_D = jax.random.normal(jax.random.key(4), (CFG.d_model,))
  model.wpe.set_value(jnp.broadcast_to(row_D, model.wpe[...].shape))
  return model


@pytest.fixture(scope="module")
def model():
  return tr.Transformer(CFG, rngs=nnx.Rngs(5))


def _rows(seed=0, lengths=(9, 5)):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, n).astype(np.int32) for n in lengths]


def _pad(rows, length, side):
  tokens = np.full((len(rows), length), 256, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for b, r in enumerate(rows):
    cols = slice(length - len(r), length) if side == "left" else slice(len(r))
    tokens[b, cols], mask[b, cols] = r, True
  # Random ids under the padding: they must not matter either.
  noise = np.random.default_rng(9).integers(0, V, tokens.shape)
  return np.where(mask, tokens, noise).astype(np.int32), mask


_ORACLE: dict[int, tuple[np.ndarray, nnx.State]] = {}


def _unpadded(model, rows):
  """Per-row loss and the mean-loss gradient from unpadded single-row runs."""
  if id(model) not in _ORACLE:

    def one(m, r):
      return tr.next_token_loss(m, jnp.asarray(r)[None])[0]

    out = [nnx.jit(nnx.value_and_grad(one))(model, r) for r in rows]
    grad = jax.tree.map(lambda *g: sum(g) / len(rows), *[g for _, g in out])
    _ORACLE[id(model)] = np.array([float(v) for v, _ in out]), grad
  return _ORACLE[id(model)]


def _position_summed(grad, side):
  """Left padding moves tokens to other rows of wpe: compare row sums."""
  if side == "left":
    grad = nnx.State(dict(grad))
    grad["wpe"] = grad["wpe"].replace(grad["wpe"][...].sum(0))
  return grad


@nnx.jit
def _padded_run(model, tokens, mask):
  """next_token_loss, the train step's lm_loss, and the mean-loss gradient."""
  loss = lambda m: tr.next_token_loss(m, tokens, mask)
  batch = {"tokens_BxL": tokens, "mask_BxL": mask}
  grad = nnx.grad(lambda m: loss(m).mean())(model)
  return loss(model), lm_loss(model, batch, None), grad


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_loss_equals_unpadded_run(shift_invariant_model, model, side):
  m = shift_invariant_model if side == "left" else model
  rows = _rows()
  tokens, mask = _pad(rows, 11, side)
  want, want_grad = _unpadded(m, rows)
  loss, train_loss, grad = _padded_run(m, tokens, mask)
  np.testing.assert_allclose(loss, want, rtol=2e-6, atol=0)
  np.testing.assert_allclose(train_loss, want, rtol=2e-6, atol=0)
  grad = _position_summed(grad, side)
  want_grad = _position_summed(want_grad, side)
  for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-7)


def test_left_padding_would_differ_with_target_mask_only(shift_invariant_model):
  """The test above can fail: mask[:, 1:] alone changes the loss."""
  m = shift_invariant_model
  rows = _rows()
  tokens, mask = _pad(rows, 11, "left")
  logits = m(jnp.asarray(tokens[:, :-1]), mask_BxL=jnp.asarray(mask[:, :-1]))
  old = tr.per_example_loss(logits, tokens[:, 1:], mask[:, 1:])
  want, _ = _unpadded(m, rows)
  assert np.abs(np.asarray(old) - want).min() > 1e-3  # tolerance: 1e-5


def test_next_token_mask():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(
    tr.next_token_mask(mask),
    [[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]],
  )
  # weights of the target are kept, the input position only gates
  w = np.array([[0.5, 2.0, 3.0]], np.float32)
  np.testing.assert_array_equal(tr.next_token_mask(w), [[2.0, 3.0]])


# --- token ids -------------------------------------------------------------

MSG = rf"token id {{}}.*vocab_size = {V}"


@pytest.mark.parametrize("bad", [V, V + 36, -1])
def test_eager_call_names_bad_id_position_and_vocab(model, bad):
  tokens = np.zeros((2, 5), np.int32)
  tokens[1, 3] = bad
  with pytest.raises(ids.TokenIdError, match=r"position \[1, 3\]"):
    model(tokens)
  with pytest.raises(ids.TokenIdError, match=MSG.format(bad)):
    model(jnp.asarray(tokens))


def test_non_integer_ids_refused(model):
  with pytest.raises(ids.TokenIdError, match="integer token ids.*float32"):
    model(jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ids.TokenIdError, match="integer token ids.*bool"):
    model(np.zeros((2, 3), bool))


@pytest.mark.parametrize("bad", [V, -1])
def test_jit_grad_and_vmap_raise_with_the_message(model, bad):
  tokens = jnp.zeros((2, 6), jnp.int32).at[0, 2].set(bad)
  f = nnx.jit(lambda m, t: m(t))
  g = nnx.jit(nnx.grad(lambda m, t: tr.next_token_loss(m, t).mean()))
  v = nnx.jit(lambda m, t: nnx.vmap(lambda x: m(x[None]), in_axes=0)(t))
  for fn in (f, g, v):
    with pytest.raises(jax.errors.JaxRuntimeError, match=MSG.format(bad)):
      jax.block_until_ready(fn(model, tokens))
  # Valid ids take no error path (vmap calls the callback, which passes).
  for fn in (f, g, v):
    jax.block_until_ready(fn(model, jnp.abs(tokens) % V))


def test_targets_checked_too(model):
  """The last column is only a target: the model never reads it."""
  tokens = jnp.zeros((2, 6), jnp.int32).at[1, 5].set(V + 1)
  with pytest.raises(ids.TokenIdError, match=r"targets_BxL.*token id 265"):
    tr.next_token_loss(model, tokens)
  loss = nnx.jit(tr.next_token_loss)
  with pytest.raises(jax.errors.JaxRuntimeError, match="targets_BxL"):
    jax.block_until_ready(loss(model, tokens))


def test_trainer_checks_host_batches_before_the_device():
  model_cfg = lm.lm_model(
    "smoke", num_layers=1, d_model=16, num_heads=2, d_mlp=32, vocab_size=256
  )
  trainer = Trainer(model_cfg, train_configs.train("smoke", batch_size=2))
  tokens = np.zeros((2, 8), np.int32)
  tokens[1, 7] = 258  # the pipeline's EOS id, outside a 256-id vocabulary
  batch = {"tokens_BxL": tokens, "mask_BxL": np.ones((2, 8), bool)}
  with pytest.raises(
    ids.TokenIdError,
    match=r"batch 'train': 'tokens_BxL' holds token id 258 at position \[1, 7\].*"
    r"vocab_size = 256",
  ):
    trainer.put_batch(batch)
  trainer.put_batch({**batch, "tokens_BxL": tokens % 256})
