"""LISA as an optax transformation (dataweights.train.lisa).

Oracles: with every block active and one period it equals optax's
clip + AdamW; a float64 numpy re-implementation of the LISA rule (fresh
AdamW slots every period, global-count schedule, clipping over what is
trained) for a run with switches; frozen blocks bit-identical; the
optimiser state's size against the number of active blocks, also in XLA's
compiled memory analysis; the counter-based choice makes a resumed state
continue exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dataweights.configs import lm
from dataweights.models.transformer import Transformer
from dataweights.train import lisa, optim
from jaxpr_counts import count_primitive

N, D = 4, 3


def _params(stacked=False, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  rest = {"wte": f(5, D), "ln_f": {"scale": f(D)}}
  if stacked:
    return {**rest, "blocks": {"k": f(N, D, D), "b": f(N, D)}}
  return {**rest, "blocks": {i: {"k": f(D, D), "b": f(D)} for i in range(N)}}


def _grads(p, t):
  key = jax.random.fold_in(jax.random.key(7), t)
  leaves, treedef = jax.tree.flatten(p)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )


SCHED = optax.linear_schedule(0.05, 0.01, 12)


@pytest.mark.parametrize("stacked", [False, True])
def test_all_blocks_active_one_period_is_adamw(stacked):
  p = _params(stacked)
  kw = dict(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)
  tx = lisa.lisa(SCHED, num_active=N, period=100, grad_clip=0.7, **kw)
  ref = optax.chain(
    optax.clip_by_global_norm(0.7),
    optax.adamw(SCHED, mask=optim.decay_mask, **kw),
  )
  if stacked:  # per-block shapes decide the decay: biases (N, D) none
    ref = optax.chain(
      optax.clip_by_global_norm(0.7),
      optax.adamw(
        SCHED,
        mask=lambda t: {
          "wte": True,
          "ln_f": {"scale": False},
          "blocks": {"k": True, "b": False},
        },
        **kw,
      ),
    )
  s1, s2, p1, p2 = tx.init(p), ref.init(p), p, p
  for t in range(6):
    g = _grads(p, t)
    u1, s1 = jax.jit(tx.update)(g, s1, p1)
    u2, s2 = ref.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _reference(p0, grads, *, k, period, seed, b1, b2, eps, wd, clip, lr):
  """LISA in float64 numpy, written from the rule (not from the code)."""
  rest_keys = ["wte", ("ln_f", "scale")]
  get = lambda t, key: t[key[0]][key[1]] if isinstance(key, tuple) else t[key]  # noqa: E731
  p = {
    "rest": {str(r): np.asarray(get(p0, r), np.float64) for r in rest_keys},
    "blocks": [
      {n: np.asarray(p0["blocks"][i][n], np.float64) for n in ("k", "b")}
      for i in range(N)
    ],
  }
  m_r = {key: np.zeros_like(v) for key, v in p["rest"].items()}
  v_r = {key: np.zeros_like(v) for key, v in p["rest"].items()}
  active, slots, since = None, {}, 0
  for c, g in enumerate(grads):
    if c % period == 0:
      active = [int(a) for a in lisa.choose_blocks(seed, c // period, N, k)]
      slots = {
        i: {n: [np.zeros_like(p["blocks"][i][n])] * 2 for n in ("k", "b")}
        for i in active
      }
      since = 0
    g_rest = {str(r): np.asarray(get(g, r), np.float64) for r in rest_keys}
    g_blk = {
      i: {n: np.asarray(g["blocks"][i][n], np.float64) for n in ("k", "b")}
      for i in active
    }
    sq = sum((x**2).sum() for x in g_rest.values())
    sq += sum((x**2).sum() for b in g_blk.values() for x in b.values())
    scale = min(1.0, clip / np.sqrt(sq))
    step_lr = lr(c)

    def adam(x, gx, m, v, t, decay, step_lr=step_lr):
      m = b1 * m + (1 - b1) * gx
      v = b2 * v + (1 - b2) * gx**2
      upd = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
      if decay:
        upd = upd + wd * x
      return x - step_lr * upd, m, v

    for key in p["rest"]:
      p["rest"][key], m_r[key], v_r[key] = adam(
        p["rest"][key],
        scale * g_rest[key],
        m_r[key],
        v_r[key],
        c + 1,
        p["rest"][key].ndim >= 2,
      )
    for i in active:
      for n in ("k", "b"):
        m, v = slots[i][n]
        p["blocks"][i][n], m, v = adam(
          p["blocks"][i][n], scale * g_blk[i][n], m, v, since + 1, n == "k"
        )
        slots[i][n] = [m, v]
    since += 1
  return p


def test_lisa_matches_a_numpy_reference_across_switches():
  p = _params()
  kw = dict(k=2, period=3, seed=4, b1=0.9, b2=0.99, eps=1e-8, wd=0.05, clip=0.9)
  tx = lisa.lisa(
    SCHED,
    num_active=2,
    period=3,
    seed=4,
    b1=0.9,
    b2=0.99,
    eps=1e-8,
    weight_decay=0.05,
    grad_clip=0.9,
  )
  grads = [_grads(p, t) for t in range(8)]
  ref = _reference(p, grads, lr=lambda c: float(SCHED(c)), **kw)
  state, q = tx.init(p), p
  update = jax.jit(tx.update)
  switched = set()
  for g in grads:
    u, state = update(g, state, q)
    q = optax.apply_updates(q, u)
    switched.add(tuple(np.asarray(state.active_K).tolist()))
  assert len(switched) >= 2  # the run did change blocks
  np.testing.assert_allclose(q["wte"], ref["rest"]["wte"], rtol=2e-5, atol=1e-6)
  for i in range(N):
    for n in ("k", "b"):
      np.testing.assert_allclose(
        q["blocks"][i][n], ref["blocks"][i][n], rtol=2e-5, atol=1e-6
      )


@pytest.mark.parametrize("stacked", [False, True])
def test_frozen_blocks_are_bitwise_unchanged(stacked):
  p = _params(stacked)
  if stacked:
    p["blocks"]["b"] = p["blocks"]["b"].at[:, 0].set(-0.0)
  else:
    for i in range(N):
      p["blocks"][i]["b"] = p["blocks"][i]["b"].at[0].set(-0.0)
  tx = lisa.lisa(0.1, num_active=1, period=10, seed=3, weight_decay=0.1)
  s = tx.init(p)
  u, s = jax.jit(tx.update)(_grads(p, 0), s, p)
  q = optax.apply_updates(p, u)
  (a,) = np.asarray(s.active_K).tolist()
  for i in range(N):
    for n in ("k", "b"):
      old = p["blocks"][n][i] if stacked else p["blocks"][i][n]
      new = q["blocks"][n][i] if stacked else q["blocks"][i][n]
      same = np.asarray(old).tobytes() == np.asarray(new).tobytes()
      assert same == (i != a), (i, n)
  assert not np.array_equal(q["wte"], p["wte"])  # embeddings always train


def _model_params(num_layers=4):
  model = Transformer(
    lm.lm_model("smoke", num_layers=num_layers, d_model=32, d_mlp=64),
    rngs=nnx.Rngs(0),
  )
  return nnx.state(model, nnx.Param)


def test_state_holds_moments_only_for_active_blocks():
  p = _model_params(4)
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
  block = nbytes(p["blocks"][0])
  rest = nbytes(p) - 4 * block
  scalars = 4 + 4 + 4  # LISA count, the two AdamW counts
  for k in (1, 2, 3, 4):
    s = lisa.lisa(1e-3, num_active=k, period=5).init(p)
    assert lisa.state_bytes(s) == 2 * (rest + k * block) + scalars + 4 * k
  full = optax.adamw(1e-3).init(p)
  assert lisa.state_bytes(full) == 2 * nbytes(p) + 4
  # XLA's own accounting of the compiled update: the state arguments grow
  # by the moments of one block per active block.
  args = {}
  for k in (1, 2, 4):
    tx = lisa.lisa(1e-3, num_active=k, period=5)
    s = tx.init(p)
    ma = jax.jit(tx.update).lower(p, s, p).compile().memory_analysis()
    args[k] = ma.argument_size_in_bytes
  assert args[2] - args[1] == 2 * block + 4
  assert args[4] - args[2] == 2 * (2 * block + 4)


def test_choice_is_counter_based_and_resume_is_exact():
  p = _params()
  tx = lisa.lisa(SCHED, num_active=2, period=2, seed=9)
  update = jax.jit(tx.update)
  s, q, seen = tx.init(p), p, []
  for t in range(4):
    u, s = update(_grads(p, t), s, q)
    q = optax.apply_updates(q, u)
    seen.append(np.asarray(s.active_K).tolist())
  saved = jax.tree.map(np.asarray, (s, q))
  for t in range(4, 8):
    u, s = update(_grads(p, t), s, q)
    q = optax.apply_updates(q, u)
    seen.append(np.asarray(s.active_K).tolist())
  s2, q2 = jax.tree.map(jnp.asarray, saved)
  for t in range(4, 8):
    u, s2 = update(_grads(p, t), s2, q2)
    q2 = optax.apply_updates(q2, u)
  for a, b in zip(jax.tree.leaves((s, q)), jax.tree.leaves((s2, q2))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  want = [lisa.choose_blocks(9, t // 2, N, 2).tolist() for t in range(8)]
  assert seen == want
  assert len({tuple(x) for x in want}) > 1
  # Another instance with the same seed draws the same blocks.
  other = lisa.lisa(0.3, num_active=2, period=2, seed=9)
  assert np.asarray(other.init(p).active_K).tolist() == want[0]


def test_bad_inputs_are_clear_errors():
  p = _params()
  with pytest.raises(
    ValueError, match="num_active = 5 is invalid: the model has only 4 blocks"
  ):
    lisa.lisa(0.1, num_active=5, period=2).init(p)
  with pytest.raises(
    ValueError, match="num_active = 0 is invalid; it must be an int >= 1"
  ):
    lisa.lisa(0.1, num_active=0, period=2)
  with pytest.raises(ValueError, match="period = 0 is invalid"):
    lisa.lisa(0.1, num_active=1, period=0)
  with pytest.raises(ValueError, match="found no 'blocks'.*wte"):
    lisa.lisa(0.1, num_active=1, period=1).init({"wte": jnp.ones(3)})
  bad = _params()
  bad["blocks"][2]["k"] = jnp.ones((2, 2))
  with pytest.raises(ValueError, match="block 2 under 'blocks' differs"):
    lisa.lisa(0.1, num_active=1, period=1).init(bad)


# ------------------------------------------------------ fixed blocks (lean) --


@pytest.mark.parametrize("stacked", [False, True])
def test_fixed_blocks_equal_the_in_step_choice_across_periods(stacked):
  # Oracle: the in-step mode (blocks drawn inside the update). The lean
  # mode gathers and scatters by constant indices instead; the same AdamW
  # arithmetic on the same values, so equal up to XLA's fusion (rtol 1e-6).
  p = _params(stacked)
  tx = lisa.lisa(SCHED, num_active=2, period=3, seed=5, weight_decay=0.1)
  dyn = jax.jit(tx.update)
  s_d, q_d = tx.init(p), p
  s_f, q_f = tx.init(p), p
  for t in range(9):
    g = _grads(p, t)
    u, s_d = dyn(g, s_d, q_d)
    q_d = optax.apply_updates(q_d, u)
    blocks = lisa.blocks_at(t, seed=5, period=3, num_blocks=N, num_active=2)

    def fixed_update(g, s, q, blocks=blocks):
      with lisa.fixed_blocks(blocks):
        return tx.update(g, s, q)

    u, s_f = jax.jit(fixed_update)(g, s_f, q_f)
    q_f = optax.apply_updates(q_f, u)
    assert np.asarray(s_f.active_K).tolist() == list(blocks)
    assert np.asarray(s_d.active_K).tolist() == list(blocks)
  for a, b in zip(jax.tree.leaves((s_d, q_d)), jax.tree.leaves((s_f, q_f))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_blocks_at_is_the_in_step_draw():
  for t in range(12):
    want = lisa.choose_blocks(4, t // 5, 7, 3).tolist()
    assert (
      list(lisa.blocks_at(t, seed=4, period=5, num_blocks=7, num_active=3))
      == want
    )
  sched = lisa.block_schedule(seed=4, period=5, num_blocks=7, num_active=3)
  # Every step, in and out of order (the cache is per period, not per call).
  for t in [11, 0, 4, 5, 14, 3, 9, 10]:
    assert sched(t) == lisa.blocks_at(
      t, seed=4, period=5, num_blocks=7, num_active=3
    ), t
  info = sched.cache_info()
  assert (info.misses, info.hits) == (3, 5)  # periods 0, 1, 2 drawn once each


def test_fixed_blocks_form_no_weight_gradient_for_frozen_blocks():
  from dataweights.train.step import lm_loss

  cfg = lm.lm_model(
    "smoke", num_layers=4, d_model=32, num_heads=2, d_mlp=64, remat="none"
  )
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)

  def loss(params):
    params = lisa.freeze_inactive(params)
    m = nnx.merge(graphdef, params)
    return lm_loss(m, {"tokens_BxL": tokens}, None).mean()

  def grad_fixed(params):
    with lisa.fixed_blocks((1,)):
      return jax.grad(loss)(params)

  full = count_primitive(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  lean = count_primitive(jax.make_jaxpr(grad_fixed)(params).jaxpr)
  # Per block: 4 weight matmuls (query/key/value as one stacked
  # contraction, out, fc, proj), each with one weight-gradient matmul in
  # the backward pass; 3 blocks frozen.
  assert full - lean == 3 * 4, (full, lean)
  g_full, g_lean = jax.grad(loss)(params), grad_fixed(params)
  for i in range(4):
    for a, b in zip(
      jax.tree.leaves(g_full["blocks"][i]), jax.tree.leaves(g_lean["blocks"][i])
    ):
      if i == 1:  # the active block: the same gradient (oracle: no freezing)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
      else:
        assert not np.any(np.asarray(b)) and np.any(np.asarray(a))
  np.testing.assert_allclose(g_full["wte"], g_lean["wte"], rtol=1e-6, atol=1e-8)


def test_fixed_blocks_bad_input():
  p = _params()
  tx = lisa.lisa(0.1, num_active=2, period=2)
  s = tx.init(p)
  with pytest.raises(
    ValueError, match=r"fixed LISA blocks \(1, 1\) are invalid"
  ):
    with lisa.fixed_blocks((1, 1)):
      pass
  with pytest.raises(
    ValueError, match="fixed LISA blocks .* are invalid for a model with 4"
  ):
    with lisa.fixed_blocks((1, 4)):
      tx.update(_grads(p, 0), s, p)
  with pytest.raises(ValueError, match="num_active = 2: give 2 distinct"):
    with lisa.fixed_blocks((1,)):
      tx.update(_grads(p, 0), s, p)
  assert lisa.current_fixed_blocks() is None
