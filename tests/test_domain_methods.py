"""Domain-weight methods against their formulas (hand-computed cases).

Pure transforms of :mod:`dataweights.methods`: baselines, exponentiated
gradient, DoReMi's excess-loss step, ODM's EXP3, the alignment rule and the
finite-horizon hypergradient. Oracles: closed forms computed by hand, a
numpy port of the ODM authors' EXP3 updater, explicit per-domain gradients,
and float64 central finite differences.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dataweights.errors import WeightsError
from dataweights.methods import alignment, domain_weights, doremi, horizon, odm
from dataweights.methods.simplex import SimplexError


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------- baselines


def test_baseline_weights():
  np.testing.assert_allclose(domain_weights.uniform_weights(4), [0.25] * 4)
  np.testing.assert_allclose(
    domain_weights.natural_weights([1, 3, 6]), [0.1, 0.3, 0.6]
  )
  # tau = 2: sqrt of the sizes, normalised: (1, 2, 3) / 6.
  np.testing.assert_allclose(
    domain_weights.temperature_weights([1.0, 4.0, 9.0], 2.0),
    [1 / 6, 2 / 6, 3 / 6],
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    domain_weights.temperature_weights([1.0, 4.0, 9.0], 1.0),
    [1 / 14, 4 / 14, 9 / 14],
    rtol=1e-6,
  )
  far = domain_weights.temperature_weights([1.0, 1e6], 1e6)
  np.testing.assert_allclose(far, [0.5, 0.5], atol=1e-5)
  with pytest.raises(ValueError, match=r"tau = 0.5 is invalid; .*>= 1"):
    domain_weights.temperature_weights([1.0, 2.0], 0.5)
  with pytest.raises(WeightsError, match=r"sizes \[1.0, 0.0\] are invalid"):
    domain_weights.temperature_weights([1.0, 0.0], 2.0)
  with pytest.raises(
    WeightsError, match=r"counts_K \[ 1. -1.\] are invalid; every count"
  ):
    domain_weights.natural_weights([1.0, -1.0])


def test_constant_ignores_its_signal_and_checks_the_simplex():
  tx = domain_weights.constant([0.2, 0.8])
  w, state = tx.update(jnp.array([5.0, -5.0]), tx.init([0.5, 0.5]))
  np.testing.assert_allclose(w, [0.2, 0.8])
  with pytest.raises(SimplexError, match="sum to"):
    domain_weights.constant([0.2, 0.2])


def test_exponentiated_gradient_hand_cases():
  # w = (1/2, 1/2), h = (1, 0), beta = ln 3: w ∝ (1/2 * 1/3, 1/2) = (1/4, 3/4).
  tx = domain_weights.exponentiated_gradient(math.log(3.0))
  w, state = tx.update(jnp.array([1.0, 0.0]), tx.init([0.5, 0.5]))
  np.testing.assert_allclose(w, [0.25, 0.75], rtol=1e-6)
  np.testing.assert_allclose(state.w_K, w)
  # Smoothing c = 0.2 mixes with uniform: 0.8 * (1/4, 3/4) + 0.1.
  tx = domain_weights.exponentiated_gradient(math.log(3.0), smoothing=0.2)
  w, state = tx.update(jnp.array([1.0, 0.0]), tx.init([0.5, 0.5]))
  np.testing.assert_allclose(w, [0.3, 0.7], rtol=1e-6)
  # ... and the smoothed weights are the next step's start.
  w2, _ = tx.update(jnp.array([0.0, 0.0]), state)
  np.testing.assert_allclose(w2, 0.8 * np.array([0.3, 0.7]) + 0.1, rtol=1e-6)
  # Normalised: h = (4, -2) acts as (1, -1/2).
  tx = domain_weights.exponentiated_gradient(1.0, normalize=True)
  w, _ = tx.update(jnp.array([4.0, -2.0]), tx.init([0.5, 0.5]))
  e = np.exp([-1.0, 0.5])
  np.testing.assert_allclose(w, e / e.sum(), rtol=1e-6)
  # A zero weight stays zero; beta = 0 never moves.
  w, _ = tx.update(jnp.array([1.0, -1.0, 0.0]), tx.init([0.0, 0.5, 0.5]))
  assert float(w[0]) == 0.0
  still = domain_weights.exponentiated_gradient(0.0)
  w, _ = still.update(jnp.array([3.0, -1.0]), still.init([0.3, 0.7]))
  np.testing.assert_allclose(w, [0.3, 0.7], rtol=1e-6)
  with pytest.raises(ValueError, match=r"signal has shape \(3,\)"):
    tx.update(jnp.zeros(3), tx.init([0.5, 0.5]))
  with pytest.raises(ValueError, match="smoothing = 1.5 is invalid"):
    domain_weights.exponentiated_gradient(1.0, smoothing=1.5)


def test_running_average_and_chain():
  avg = domain_weights.running_average()
  state = avg.init([0.5, 0.5])
  for w in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.1, 0.9]):
    mean, state = avg.update(jnp.array(w), state)
  np.testing.assert_allclose(mean, [0.4, 0.6], rtol=1e-6)
  assert int(state.count) == 4
  # chain: the EG weights feed the average; the first state keeps them.
  tx = domain_weights.chain(
    domain_weights.exponentiated_gradient(math.log(3.0)),
    domain_weights.running_average(),
  )
  state = tx.init([0.5, 0.5])
  out1, state = tx.update(jnp.array([1.0, 0.0]), state)
  out2, state = tx.update(jnp.array([1.0, 0.0]), state)
  w1 = np.array([0.25, 0.75])
  w2 = w1 * np.array([1 / 3, 1.0])
  w2 /= w2.sum()
  np.testing.assert_allclose(state[0].w_K, w2, rtol=1e-6)
  np.testing.assert_allclose(out2, (w1 + w2) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="at least one"):
    domain_weights.chain()


def test_realised_weights_give_the_mixed_objective():
  domain_B = jnp.array([0, 2, 2, 0, 0])
  loss_B = jnp.array([1.0, 2.0, 4.0, 3.0, 5.0])
  w_K = jnp.array([0.5, 0.2, 0.3])
  weight_B = domain_weights.realised_weights(domain_B, w_K)
  # Σ_b weight_b loss_b = 0.5 * mean(1, 3, 5) + 0.3 * mean(2, 4).
  np.testing.assert_allclose(jnp.sum(weight_B * loss_B), 0.5 * 3 + 0.3 * 3)
  mean_K, count_K = domain_weights.domain_means(loss_B, domain_B, 3)
  np.testing.assert_allclose(mean_K, [3.0, 0.0, 3.0])
  np.testing.assert_allclose(count_K, [3, 0, 2])


# ----------------------------------------------------------------- DoReMi


def test_doremi_excess_losses_clip_per_token():
  proxy = jnp.array([[2.0, 1.0, 3.0], [1.0, 1.0, 1.0], [4.0, 0.0, 2.0]])
  ref = jnp.array([[1.0, 2.0, 1.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 1]])
  domain_B = jnp.array([0, 0, 1])
  lam, tokens = doremi.excess_losses(proxy, ref, mask, domain_B, 3)
  # Domain 0: clipped (1, 0, 2) and (0, 0, -) over 5 tokens; domain 1:
  # (3, -, 1) over 2 tokens; domain 2: no token.
  np.testing.assert_allclose(lam, [3 / 5, 4 / 2, 0.0])
  np.testing.assert_allclose(tokens, [5, 2, 0])
  # Per example (L = 1): clip the mean, not the tokens.
  lam_ex, _ = doremi.excess_losses(
    jnp.array([[2.0], [1.0]]),
    jnp.array([[1.0], [3.0]]),
    None,
    jnp.array([0, 0]),
    1,
  )
  np.testing.assert_allclose(lam_ex, [0.5])
  with pytest.raises(ValueError, match="same"):
    doremi.excess_losses(proxy, ref[:, :2], None, domain_B, 3)


def test_doremi_step_is_exponentiated_ascent_with_smoothing_then_average():
  eta, c = 0.5, 0.1
  tx = doremi.doremi(eta, c)
  state = tx.init(jnp.full(3, 1 / 3))
  lam1 = np.array([1.0, 0.0, 2.0])
  lam2 = np.array([0.0, 3.0, 0.0])
  # By hand: α_t = (1 - c) α_{t-1} exp(η λ_t) / Z + c / K.
  a1 = np.full(3, 1 / 3) * np.exp(eta * lam1)
  a1 = (1 - c) * a1 / a1.sum() + c / 3
  a2 = a1 * np.exp(eta * lam2)
  a2 = (1 - c) * a2 / a2.sum() + c / 3
  avg1, state = tx.update(jnp.asarray(lam1), state)
  np.testing.assert_allclose(doremi.current_weights(state), a1, rtol=1e-6)
  np.testing.assert_allclose(avg1, a1, rtol=1e-6)
  avg2, state = tx.update(jnp.asarray(lam2), state)
  np.testing.assert_allclose(doremi.current_weights(state), a2, rtol=1e-6)
  np.testing.assert_allclose(avg2, (a1 + a2) / 2, rtol=1e-6)
  np.testing.assert_allclose(
    doremi.average_weights(state), (a1 + a2) / 2, rtol=1e-6
  )
  # Smoothing keeps every weight >= c / K however large the excess.
  for _ in range(20):
    _, state = tx.update(jnp.array([50.0, 0.0, 0.0]), state)
  assert float(doremi.current_weights(state).min()) >= c / 3 - 1e-7


# -------------------------------------------------------------------- ODM


class AuthorsExp3:
  """A numpy port of the ODM authors' ``Exp3WeightUpdater.update`` (one
  domain per call; alon-albalak/online-data-mixing), used as the oracle."""

  def __init__(self, K):
    self.K = K
    self.reward = np.zeros(K)
    self.pi = np.full(K, 1.0 / K)
    self.eps = 1.0 / K

  def update(self, k, loss, iteration):
    reward = loss / 10
    self.reward[k] += reward / self.pi[k]
    prev_eps = self.eps
    self.eps = min(
      1 / self.K, math.sqrt(math.log(self.K) / (self.K * iteration))
    )
    total = sum(math.exp(r * prev_eps) for r in self.reward)
    scale = (1 - self.K * self.eps) / total
    weights = [math.exp(r * prev_eps) * scale + self.eps for r in self.reward]
    self.pi = np.array(weights) / sum(weights)
    return self.pi


def test_exp3_equals_the_authors_updater_for_one_domain_batches():
  K = 4
  tx = odm.exp3()
  state = tx.init(jnp.full(K, 1 / K))
  ref = AuthorsExp3(K)
  rng = np.random.default_rng(0)
  for it in range(1, 60):
    k = int(rng.integers(K))
    loss = float(rng.uniform(1, 4)) + k  # higher loss, higher reward
    count = np.zeros(K)
    count[k] = 1
    loss_K = np.where(count > 0, loss, 0.0)
    pi, state = tx.update(
      (jnp.asarray(loss_K), jnp.asarray(count), state.pi_K), state
    )
    np.testing.assert_allclose(
      pi, ref.update(k, loss, it), rtol=2e-5, err_msg=f"step {it}"
    )
  assert int(state.t) == 59
  # While t <= K ln K the distribution stays uniform; later it favours the
  # high-loss arm.
  assert float(pi[3]) > float(pi[0])


def test_exp3_batch_rewards_are_importance_weighted():
  # B = 4 rows: 3 of domain 0, 1 of domain 2, drawn with pi = (0.5, 0.25, 0.25).
  r = odm.reward_estimates(
    jnp.array([2.0, 9.0, 4.0]),
    jnp.array([3.0, 0.0, 1.0]),
    jnp.array([0.5, 0.25, 0.25]),
    0.1,
  )
  np.testing.assert_allclose(
    r, [0.1 * 2 * 3 / (4 * 0.5), 0.0, 0.1 * 4 * 1 / (4 * 0.25)], rtol=1e-6
  )
  # One step by hand: t = 1, eps_1 = min(1/3, sqrt(ln 3 / 3)) = 1/3, so pi is
  # uniform; the exponent uses eps_0 = 1/3.
  tx = odm.exp3(decay=0.5)
  state = tx.init(jnp.full(3, 1 / 3))
  pi, state = tx.update(
    (
      jnp.array([2.0, 9.0, 4.0]),
      jnp.array([3.0, 0.0, 1.0]),
      jnp.array([0.5, 0.25, 0.25]),
    ),
    state,
  )
  np.testing.assert_allclose(state.reward_K, r, rtol=1e-6)
  np.testing.assert_allclose(pi, np.full(3, 1 / 3), rtol=1e-6)
  # Later: decay halves the old rewards; eps_t < 1/K mixes in the softmax.
  state = state._replace(
    t=jnp.asarray(99, jnp.int32), eps=jnp.asarray(0.05, jnp.float32)
  )
  pi, state = tx.update(
    (
      jnp.array([1.0, 1.0, 1.0]),
      jnp.array([1.0, 1.0, 2.0]),
      jnp.full(3, 1 / 3),
    ),
    state,
  )
  R = 0.5 * np.asarray(r) + 0.1 * np.array([1.0, 1.0, 2.0]) / (4 / 3)
  np.testing.assert_allclose(state.reward_K, R, rtol=1e-6)
  eps = min(1 / 3, math.sqrt(math.log(3) / (3 * 100)))
  soft = np.exp(0.05 * R) / np.exp(0.05 * R).sum()
  np.testing.assert_allclose(pi, (1 - 3 * eps) * soft + eps, rtol=1e-6)
  np.testing.assert_allclose(float(state.eps), eps, rtol=1e-6)
  with pytest.raises(ValueError, match="decay = 0 is invalid"):
    odm.exp3(decay=0)


# ------------------------------------------------------- a tiny float model


K_DOM, D_IN, H_HID, N_CLS = 3, 4, 5, 3


def _mlp_params(key, dtype):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "w1": jax.random.normal(k1, (D_IN, H_HID), dtype) / 2,
    "b1": jax.random.normal(k3, (H_HID,), dtype) / 4,
    "w2": jax.random.normal(k2, (H_HID, N_CLS), dtype) / 2,
  }


def _mlp_loss(params, batch):
  h = jnp.tanh(batch["x_BxD"] @ params["w1"] + params["b1"][None, :])
  logp = jax.nn.log_softmax(h @ params["w2"])
  return -jnp.take_along_axis(logp, batch["y_B"][:, None], axis=1)[:, 0]


def _mlp_batch(key, B, dtype, domain_B=None):
  kx, ky, kd = jax.random.split(key, 3)
  if domain_B is None:
    domain_B = jax.random.randint(kd, (B,), 0, K_DOM)
  # Each domain shifts its inputs differently: the domains disagree.
  shift_KxD = (
    jnp.arange(K_DOM * D_IN, dtype=dtype).reshape(K_DOM, D_IN) / 6 - 0.8
  )
  x = jax.random.normal(kx, (B, D_IN), dtype) + shift_KxD[domain_B]
  return {
    "x_BxD": x,
    "y_B": jax.random.randint(ky, (B,), 0, N_CLS),
    "domain_B": domain_B,
  }


def test_alignment_equals_explicit_per_domain_gradients(x64):
  params = _mlp_params(jax.random.key(0), jnp.float64)
  batch = _mlp_batch(jax.random.key(1), 11, jnp.float64)
  direction = _mlp_params(jax.random.key(2), jnp.float64)
  a_K, count_K = alignment.domain_alignment(
    _mlp_loss, params, batch, batch["domain_B"], K_DOM, direction
  )
  for k in range(K_DOM):
    sel = np.asarray(batch["domain_B"]) == k
    sub = jax.tree.map(lambda x, sel=sel: x[sel], batch)
    g_k = jax.grad(lambda p, sub=sub: jnp.mean(_mlp_loss(p, sub)))(params)
    want = sum(jnp.vdot(g_k[n], direction[n]) for n in g_k)
    np.testing.assert_allclose(a_K[k], want, rtol=1e-12)
    assert count_K[k] == sel.sum()


def test_alignment_rule_is_the_exact_one_sgd_step_hypergradient(x64):
  # For θ_1 = θ_0 − η ∇Σ_k w_k f_k(θ_0): ∂g(θ_1)/∂w_k = −η ⟨∇g(θ_1), ∇f_k(θ_0)⟩.
  lr = 0.3
  params0 = _mlp_params(jax.random.key(0), jnp.float64)
  batch = _mlp_batch(jax.random.key(1), 12, jnp.float64)
  valid = _mlp_batch(jax.random.key(3), 8, jnp.float64)
  w_K = jnp.array([0.2, 0.5, 0.3])

  def theta1(w):
    def F(p):
      mean_K, _ = domain_weights.domain_means(
        _mlp_loss(p, batch), batch["domain_B"], K_DOM
      )
      return jnp.sum(w * mean_K)

    return jax.tree.map(lambda p, g: p - lr * g, params0, jax.grad(F)(params0))

  g_of_w = lambda w: jnp.mean(_mlp_loss(theta1(w), valid))
  exact = jax.grad(g_of_w)(w_K)
  res = alignment.alignment_step(
    _mlp_loss, params0, theta1(w_K), batch, valid, batch["domain_B"], K_DOM, lr
  )
  np.testing.assert_allclose(res["h_K"], exact, rtol=1e-10)
  np.testing.assert_allclose(res["valid_loss"], g_of_w(w_K), rtol=1e-12)
  eps = 1e-6
  fd = [
    (g_of_w(w_K.at[k].add(eps)) - g_of_w(w_K.at[k].add(-eps))) / (2 * eps)
    for k in range(K_DOM)
  ]
  np.testing.assert_allclose(res["h_K"], fd, rtol=1e-6)


# ----------------------------------------------------------- finite horizon


def _adamw(lr=0.05):
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      optax.linear_schedule(lr / 2, lr, 3),
      b2=0.95,
      eps_root=1e-30,
      weight_decay=0.1,
    ),
  )


def _round(T, dtype, B=9, key=5):
  keys = jax.random.split(jax.random.key(key), T)
  bs = [_mlp_batch(k, B, dtype) for k in keys]
  return jax.tree.map(lambda *x: jnp.stack(x), *bs)


def test_replay_is_the_optimiser_loop(x64):
  tx = _adamw()
  params = _mlp_params(jax.random.key(0), jnp.float64)
  batches = _round(4, jnp.float64)
  w_K = jnp.array([0.6, 0.1, 0.3])
  # The loop, written out: weighted mean loss, tx.update, apply_updates.
  p, o = params, tx.init(params)

  def objective(q, b):
    weight_B = domain_weights.realised_weights(b["domain_B"], w_K)
    return jnp.sum(weight_B * _mlp_loss(q, b)) / jnp.sum(weight_B)

  for t in range(4):
    g = jax.grad(objective)(p, jax.tree.map(lambda x, t=t: x[t], batches))
    u, o = tx.update(g, o, p)
    p = optax.apply_updates(p, u)
  for unroll in (True, False):
    for remat in (False, True):
      got, got_o = horizon.replay(
        w_K,
        params,
        tx.init(params),
        batches,
        loss_fn=_mlp_loss,
        tx=tx,
        unroll=unroll,
        remat=remat,
      )
      for a, b in zip(jax.tree.leaves((got, got_o)), jax.tree.leaves((p, o))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 3])
def test_forward_equals_reverse_equals_finite_differences(x64, T):
  tx = _adamw()
  params = _mlp_params(jax.random.key(0), jnp.float64)
  # A warm optimiser state: three uniform-weight steps before the round.
  params, opt = horizon.replay(
    jnp.full(3, 1 / 3),
    params,
    tx.init(params),
    _round(3, jnp.float64, key=7),
    loss_fn=_mlp_loss,
    tx=tx,
  )
  batches = _round(T, jnp.float64)
  valid = _mlp_batch(jax.random.key(9), 10, jnp.float64)
  w_K = jnp.array([0.5, 0.2, 0.3])
  hs = {}
  for mode in horizon.MODES:
    for unroll in (True, False):
      h, g, pT = horizon.hypergradient(
        w_K,
        params,
        opt,
        batches,
        valid,
        loss_fn=_mlp_loss,
        tx=tx,
        mode=mode,
        unroll=unroll,
      )
      hs[mode, unroll] = np.asarray(h)
  ref = hs["reverse", True]
  for key, h in hs.items():
    np.testing.assert_allclose(h, ref, rtol=1e-9, err_msg=str(key))

  def g_of_w(w):
    pT, _ = horizon.replay(w, params, opt, batches, loss_fn=_mlp_loss, tx=tx)
    return jnp.mean(_mlp_loss(pT, valid))

  eps = 1e-6
  fd = np.array(
    [
      (g_of_w(w_K.at[k].add(eps)) - g_of_w(w_K.at[k].add(-eps))) / (2 * eps)
      for k in range(K_DOM)
    ]
  )
  np.testing.assert_allclose(ref, fd, rtol=1e-5, atol=1e-9)
  assert np.abs(ref).max() > 1e-4  # not trivially zero


def test_horizon_one_sgd_step_is_the_alignment_rule_up_to_a_shift(x64):
  # With SGD and T = 1 the loop's objective Σ_k w_k f_k / Σ_k w_k (every
  # domain present, Σ w = 1) gives h_k = −η (a_k − Σ_j w_j a_j): the
  # alignment rule shifted by a constant, which EG ignores.
  lr = 0.2
  tx = optax.sgd(lr)
  params = _mlp_params(jax.random.key(0), jnp.float64)
  domain_B = jnp.array([0, 1, 2, 0, 1, 2, 0, 2])
  batch = _mlp_batch(jax.random.key(1), 8, jnp.float64, domain_B)
  valid = _mlp_batch(jax.random.key(3), 8, jnp.float64)
  w_K = jnp.array([0.2, 0.5, 0.3])
  h, _, p1 = horizon.hypergradient(
    w_K,
    params,
    tx.init(params),
    jax.tree.map(lambda x: x[None], batch),
    valid,
    loss_fn=_mlp_loss,
    tx=tx,
  )
  res = alignment.alignment_step(
    _mlp_loss, params, p1, batch, valid, domain_B, K_DOM, lr
  )
  a = np.asarray(res["a_K"])
  np.testing.assert_allclose(h, -lr * (a - np.dot(w_K, a)), rtol=1e-10)
  eg = domain_weights.exponentiated_gradient(2.0)
  np.testing.assert_allclose(
    eg.update(h, eg.init(w_K))[0],
    eg.update(res["h_K"], eg.init(w_K))[0],
    rtol=1e-6,
  )  # the EG transform computes in float32


def test_choose_hypergrad_mode():
  MiB = 2**20
  choose = horizon.choose_hypergrad_mode
  # Plenty of memory, a short round: reverse (3 steps per step) beats forward.
  c = choose(4, 11, state_bytes=MiB, residual_bytes=4 * MiB)
  assert c.mode == "reverse" and c.time["forward"] == 17.5
  assert c.memory["reverse"] == 4 * 5 * MiB + MiB
  # A long round: the unrolled programs are out, the sweep (one step) wins.
  assert (
    choose(8, 11, state_bytes=MiB, residual_bytes=4 * MiB).mode
    == "reverse_sweep"
  )
  assert (
    choose(8, 11, state_bytes=MiB, residual_bytes=4 * MiB, max_unrolled=8).mode
    == "reverse"
  )
  # T copies of state + residuals do not fit, T copies of the state do.
  c = choose(
    4, 11, state_bytes=MiB, residual_bytes=4 * MiB, memory_budget_bytes=12 * MiB
  )
  assert c.mode == "reverse_sweep"
  # A long horizon that not even T states fit: forward (memory independent of T).
  c = choose(
    1000, 2, state_bytes=MiB, residual_bytes=MiB, memory_budget_bytes=50 * MiB
  )
  assert c.mode == "forward" and c.memory["forward"] == 3 * 2 * MiB
  # Nothing fits: the least memory.
  c = choose(
    1000, 50, state_bytes=MiB, residual_bytes=MiB, memory_budget_bytes=MiB
  )
  assert c.mode == "forward"
  for bad in (
    dict(T=0),
    dict(K=1.5),
    dict(memory_budget_bytes=-1),
    dict(max_unrolled=0),
  ):
    kw = {**dict(T=2, K=2, state_bytes=1, residual_bytes=1), **bad}
    with pytest.raises(ValueError, match="is invalid"):
      choose(kw.pop("T"), kw.pop("K"), **kw)


def test_step_residual_bytes_is_traced_not_run():
  tx = _adamw()
  params = jax.eval_shape(lambda: _mlp_params(jax.random.key(0), jnp.float32))
  opt = jax.eval_shape(tx.init, params)
  batch = jax.eval_shape(lambda: _mlp_batch(jax.random.key(1), 64, jnp.float32))
  small = horizon.step_residual_bytes(
    _mlp_loss, params, opt, batch, tx=tx, num_domains=K_DOM
  )
  batch2 = jax.eval_shape(
    lambda: _mlp_batch(jax.random.key(1), 640, jnp.float32)
  )
  big = horizon.step_residual_bytes(
    _mlp_loss, params, opt, batch2, tx=tx, num_domains=K_DOM
  )
  # Activations grow with the batch: 576 more rows of (D_IN + H_HID + N_CLS) floats at least.
  assert big - small >= 576 * (H_HID + N_CLS) * 4
  assert small > horizon.nbytes(params)
