"""A plain Flax linen GPT-2, written for the benchmark as a peer.

The textbook implementation (nanoGPT's structure in linen): token and
position embeddings, pre-LayerNorm blocks with one fused ``c_attn`` Dense
(D -> 3D), causal softmax attention written with ``einsum`` and a
``jnp.where`` mask, a GELU(tanh) MLP, a final LayerNorm and a head tied to
the token embedding. Same parameter count as
:class:`dataweights.models.transformer.Transformer` with the same config.

Its train step (:func:`make_step`) is the usual one: ``value_and_grad`` of
the mean next-token cross-entropy, then global-norm clipping and AdamW with
weight decay on rank >= 2 parameters, everything in one ``jax.jit`` with
the state donated.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class Block(nn.Module):
  d: int
  heads: int
  d_mlp: int

  @nn.compact
  def __call__(self, x):
    b, length, d = x.shape
    h = nn.LayerNorm(epsilon=1e-5)(x)
    qkv = nn.Dense(3 * d, name="c_attn")(h)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    split = lambda t: t.reshape(b, length, self.heads, d // self.heads)
    q, k, v = split(q), split(k), split(v)
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d / self.heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    att = jnp.where(causal, att, jnp.finfo(att.dtype).min)
    att = jax.nn.softmax(att, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, length, d)
    x = x + nn.Dense(d, name="c_proj")(y)
    h = nn.LayerNorm(epsilon=1e-5)(x)
    h = nn.gelu(nn.Dense(self.d_mlp, name="c_fc")(h), approximate=True)
    return x + nn.Dense(d, name="mlp_proj")(h)


class GPT2(nn.Module):
  vocab: int
  max_len: int
  layers: int
  d: int
  heads: int
  d_mlp: int

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(self.vocab, self.d, name="wte")
    pos = jnp.arange(tokens.shape[1])
    x = wte(tokens) + nn.Embed(self.max_len, self.d, name="wpe")(pos)[None]
    for i in range(self.layers):
      x = Block(self.d, self.heads, self.d_mlp, name=f"h_{i}")(x)
    x = nn.LayerNorm(epsilon=1e-5, name="ln_f")(x)
    return wte.attend(x)


def make_step(cfg, batch_size: int, lr: float = 3e-3, seed: int = 0):
  """``(step, state)``: the jitted, donated train step and its state.

  Args:
    cfg: a :class:`dataweights.configs.lm.ModelConfig` (its architecture
      fields are used).
    batch_size: sequences per step (the step itself reads the batch shape).
    lr: AdamW learning rate.
    seed: parameter init seed.
  """
  model = GPT2(
    cfg.vocab_size,
    cfg.max_len,
    cfg.num_layers,
    cfg.d_model,
    cfg.num_heads,
    cfg.d_mlp,
  )
  tokens = jnp.zeros((batch_size, cfg.max_len), jnp.int32)
  params = model.init(jax.random.key(seed), tokens)
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      lr,
      b1=0.9,
      b2=0.95,
      weight_decay=0.1,
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
    ),
  )

  def loss_fn(params, tokens_BxL):
    logits = model.apply(params, tokens_BxL[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], -1)
    return nll.mean()

  def step(state, tokens_BxL):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxL)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def forward(params, tokens_BxL):
    return loss_fn(params, tokens_BxL)

  state = (params, tx.init(params))
  return (
    jax.jit(step, donate_argnums=0),
    state,
    {"forward": jax.jit(forward), "grad": jax.jit(jax.grad(loss_fn))},
  )


def num_params(state) -> int:
  return sum(x.size for x in jax.tree.leaves(state[0]))
