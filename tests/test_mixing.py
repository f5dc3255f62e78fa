"""Online data mixing (run_mixing, train_fixed): behaviour and equivalences.

Oracles: a step-by-step replay of the algorithm from its parts, forward ==
reverse runs, jit == no-jit, T = N == fixed-weight training, and the
levanter three-domain recovery (learnable / pure noise / easy).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataweights.errors import WeightsError
from dataweights.methods import bilevel, mixing, simplex
from dataweights.methods.mixing import MixingError, NonFiniteHypergradientError


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _three_domains(seed=0, D=5, M=64, dtype=jnp.float32):
  """Linear regression: learnable (noisy labels), pure noise, easy (exact).

  Validation data follow the same linear model as the learnable and easy
  domains; the noise domain's labels are independent of x.
  """
  rng = np.random.default_rng(seed)
  theta_D = rng.normal(size=D)
  x_KxMxD = rng.normal(size=(3, M, D))
  y_KxM = x_KxMxD @ theta_D
  y_KxM[0] += 0.5 * rng.normal(size=M)
  y_KxM[1] = 2.0 * rng.normal(size=M)
  xv_MxD = rng.normal(size=(M, D))
  yv_M = xv_MxD @ theta_D + 0.1 * rng.normal(size=M)
  train = {"x": jnp.asarray(x_KxMxD, dtype), "y": jnp.asarray(y_KxM, dtype)}
  val = {"x": jnp.asarray(xv_MxD, dtype), "y": jnp.asarray(yv_M, dtype)}

  def domain_losses(p_D, batch):
    b = train if batch is None else batch
    return 0.5 * jnp.mean((b["x"] @ p_D - b["y"]) ** 2, axis=-1)

  def val_loss(p_D, batch):
    b = val if batch is None else batch
    return 0.5 * jnp.mean((b["x"] @ p_D - b["y"]) ** 2)

  problem = bilevel.MixingProblem(domain_losses, val_loss)
  return problem, jnp.zeros(D, dtype), train, val


def _batch_fns(train, val, T, B):
  """Minibatch samplers: T batches of B examples per domain; B val examples."""
  M = train["y"].shape[1]

  def batch_fn(key):
    idx_TxB = jax.random.randint(key, (T, B), 0, M)
    return {
      "x": jnp.swapaxes(train["x"][:, idx_TxB], 0, 1),  # (T, K, B, D)
      "y": jnp.swapaxes(train["y"][:, idx_TxB], 0, 1),  # (T, K, B)
    }

  def val_batch_fn(key):
    idx_B = jax.random.randint(key, (B,), 0, val["y"].shape[0])
    return {"x": val["x"][idx_B], "y": val["y"][idx_B]}

  return batch_fn, val_batch_fn


def _tree_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, **kw)


@pytest.mark.parametrize("outer, beta", [("eg", 5.0), ("pgd", 1.0)])
def test_three_domains_noise_weight_vanishes(outer, beta):
  problem, params0, _, _ = _three_domains()
  w0_K = mixing.uniform_weights(3)
  tr = mixing.run_mixing(
    problem, params0, w0_K, lr=0.1, T=10, N=500, beta=beta, outer=outer
  )
  assert tr.w_RxK.shape == (51, 3) and tr.h_RxK.shape == (50, 3)
  assert tr.val_loss_R1.shape == (51,)
  w_K = np.asarray(tr.w_RxK[-1])
  np.testing.assert_allclose(np.asarray(tr.w_RxK).sum(axis=1), 1.0, rtol=1e-5)
  assert w_K[1] < 0.05, w_K  # pure noise
  assert w_K[1] < min(w_K[0], w_K[2]), w_K
  # Learned weights beat uniform weights on the same budget.
  _, val_fixed = mixing.train_fixed(problem, params0, w0_K, lr=0.1, N=500)
  assert val_fixed.shape == (501,)
  assert tr.val_loss_R1[-1] < 0.5 * val_fixed[-1]


def test_replay_forward_equals_reverse_minibatch(x64):
  """Every round of run_mixing, rebuilt from its documented parts."""
  problem, params0, train, val = _three_domains(dtype=jnp.float64)
  T, N, lr, beta = 4, 12, 0.05, 2.0
  batch_fn, val_batch_fn = map(jax.jit, _batch_fns(train, val, T, B=8))
  key = jax.random.key(3)
  w0_K = jnp.array([0.5, 0.3, 0.2])
  kw = dict(
    lr=lr,
    T=T,
    N=N,
    beta=beta,
    batch_fn=batch_fn,
    val_batch_fn=val_batch_fn,
    key=key,
  )
  tr_f = mixing.run_mixing(problem, params0, w0_K, hypergrad="forward", **kw)
  tr_r = mixing.run_mixing(
    problem, params0, w0_K, hypergrad="reverse", remat=True, **kw
  )
  for a, b in zip(tr_f, tr_r, strict=True):
    _tree_close(a, b, rtol=1e-9, atol=1e-12)

  hypergrad = jax.jit(
    lambda p, w, b, vb: bilevel.hypergrad_reverse(
      problem, p, w, lr=lr, T=T, batches=b, val_batch=vb
    )
  )
  params, w_K = params0, w0_K
  for k, key_k in enumerate(jax.random.split(key, N // T)):
    np.testing.assert_allclose(tr_f.w_RxK[k], w_K, rtol=1e-9)
    np.testing.assert_allclose(
      tr_f.val_loss_R1[k], problem.val_loss(params, None), rtol=1e-9
    )
    key_b, key_v = jax.random.split(key_k)
    h_K, params = hypergrad(params, w_K, batch_fn(key_b), val_batch_fn(key_v))
    np.testing.assert_allclose(tr_f.h_RxK[k], h_K, rtol=1e-9, atol=1e-12)
    w_K = simplex.eg_update(w_K, h_K, beta)
  np.testing.assert_allclose(tr_f.w_RxK[-1], w_K, rtol=1e-9)
  np.testing.assert_allclose(tr_f.params, params, rtol=1e-9)
  assert np.ptp(np.asarray(tr_f.w_RxK), axis=0).max() > 1e-3  # w moved

  # train_fixed with eval_every=T draws the same minibatches per chunk.
  p_fixed, val_C = mixing.train_fixed(
    problem,
    params0,
    w0_K,
    lr=lr,
    N=N,
    batch_fn=batch_fn,
    key=key,
    eval_every=T,
  )
  step = jax.jit(
    lambda p, b: bilevel.inner_steps(problem, p, w0_K, lr=lr, T=T, batches=b)
  )
  p = params0
  for key_k in jax.random.split(key, N // T):
    p = step(p, batch_fn(jax.random.split(key_k)[0]))
  np.testing.assert_allclose(p_fixed, p, rtol=1e-9)
  assert val_C.shape == (N // T + 1,)
  np.testing.assert_allclose(val_C[-1], problem.val_loss(p, None), rtol=1e-9)


def test_jit_equals_no_jit_and_vmap_equals_loop(x64):
  problem, params0, train, val = _three_domains(dtype=jnp.float64, M=16)
  batch_fn, val_batch_fn = _batch_fns(train, val, T=2, B=4)
  kw = dict(
    lr=0.05,
    T=2,
    N=6,
    beta=1.0,
    batch_fn=batch_fn,
    val_batch_fn=val_batch_fn,
    key=jax.random.key(0),
    normalize=True,
  )
  w0_K = mixing.uniform_weights(3)
  tr = mixing.run_mixing(problem, params0, w0_K, **kw)
  with jax.disable_jit():
    tr_eager = mixing.run_mixing(problem, params0, w0_K, **kw)
  for a, b in zip(tr, tr_eager, strict=True):
    _tree_close(a, b, rtol=1e-10, atol=1e-13)
  # Under jit(vmap) over seeds (as the chapter's sweeps call it): row s is
  # the run with key s. Checks are skipped for tracers, not broken by them.
  keys = jax.random.split(jax.random.key(1), 2)
  kw_v = {k: v for k, v in kw.items() if k != "key"}
  tr_S = jax.jit(
    jax.vmap(lambda k: mixing.run_mixing(problem, params0, w0_K, key=k, **kw_v))
  )(keys)
  tr_1 = mixing.run_mixing(problem, params0, w0_K, key=keys[1], **kw_v)
  for a, b in zip(tr_S, tr_1, strict=True):
    _tree_close(a[1], b, rtol=1e-10, atol=1e-13)
  # normalize=True: each round's hypergradient has max |h_j| = 1.
  np.testing.assert_allclose(np.abs(tr.h_RxK).max(axis=1), 1.0, rtol=1e-12)


def test_single_round_then_leftover_steps_with_final_weights(x64):
  problem, params0, _, _ = _three_domains(dtype=jnp.float64)
  w0_K = jnp.array([0.2, 0.5, 0.3])
  tr = mixing.run_mixing(problem, params0, w0_K, lr=0.1, T=30, N=59, beta=1.0)
  assert tr.w_RxK.shape == (2, 3)  # R = 59 // 30 = 1; 29 leftover steps
  p_fixed, val_2 = mixing.train_fixed(
    problem, params0, w0_K, lr=0.1, N=30, eval_every=30
  )
  np.testing.assert_allclose(tr.val_loss_R1[0], val_2[0], rtol=1e-12)
  h_K, _ = bilevel.hypergrad_forward(problem, params0, w0_K, lr=0.1, T=30)
  w1_K = simplex.eg_update(w0_K, h_K, 1.0)
  np.testing.assert_allclose(tr.w_RxK[1], w1_K, rtol=1e-12)
  # The 29 leftover steps are spent with the final weights w_1.
  p_59 = bilevel.inner_steps(problem, p_fixed, w1_K, lr=0.1, T=29)
  np.testing.assert_allclose(tr.params, p_59, rtol=1e-12)
  np.testing.assert_allclose(
    tr.val_loss_R1[-1], problem.val_loss(p_59, None), rtol=1e-12
  )
  assert np.max(np.abs(np.asarray(tr.params - p_fixed))) > 1e-3


@pytest.mark.parametrize("T, N", [(1, 7), (3, 7), (7, 7), (4, 10), (9, 10)])
def test_every_horizon_spends_exactly_n_steps(x64, T, N):
  """One domain, f = ½θ², lr 0.1: θ_N = 0.9^N θ_0 whatever T (oracle)."""
  problem = bilevel.MixingProblem(
    lambda p, b: 0.5 * jnp.sum(p**2)[None], lambda p, b: 0.5 * jnp.sum(p**2)
  )
  tr = mixing.run_mixing(
    problem, jnp.ones(2), jnp.ones(1), lr=0.1, T=T, N=N, beta=1.0
  )
  np.testing.assert_allclose(tr.params, 0.9**N * np.ones(2), rtol=1e-13)
  st = mixing.run_mixing_schedule(
    problem, jnp.ones(2), jnp.ones(1), lr=0.1, beta=1.0, budgets=(N,), T0=T
  )
  np.testing.assert_allclose(st.params_B[0], 0.9**N * np.ones(2), rtol=1e-13)
  assert int(st.rounds_B[0]) == N // T


def test_leftover_minibatches_replayed(x64):
  """The leftover steps use the first N mod T batches of the documented key."""
  problem, params0, train, val = _three_domains(dtype=jnp.float64)
  T, N, lr, beta = 4, 10, 0.05, 2.0
  batch_fn, val_batch_fn = map(jax.jit, _batch_fns(train, val, T, B=8))
  key = jax.random.key(5)
  w0_K = jnp.array([0.5, 0.3, 0.2])
  tr = mixing.run_mixing(
    problem, params0, w0_K, lr=lr, T=T, N=N, beta=beta, batch_fn=batch_fn,
    val_batch_fn=val_batch_fn, key=key,
  )
  tr8 = mixing.run_mixing(
    problem, params0, w0_K, lr=lr, T=T, N=8, beta=beta, batch_fn=batch_fn,
    val_batch_fn=val_batch_fn, key=key,
  )
  # R = 2 rounds as with N = 8 (same keys), then 2 steps with w_2.
  np.testing.assert_allclose(tr.w_RxK, tr8.w_RxK, rtol=1e-12)
  key_b = jax.random.split(jax.random.fold_in(key, 2))[0]
  batches = jax.tree.map(lambda x: x[:2], batch_fn(key_b))
  p = bilevel.inner_steps(
    problem, tr8.params, tr8.w_RxK[-1], lr=lr, T=2, batches=batches
  )
  np.testing.assert_allclose(tr.params, p, rtol=1e-12)


def test_natural_and_uniform_weights():
  np.testing.assert_allclose(mixing.uniform_weights(4), [0.25] * 4)
  np.testing.assert_allclose(
    mixing.natural_weights([10, 30, 60]), [0.1, 0.3, 0.6], rtol=1e-6
  )
  for bad in (0, -2, 1.5, True):
    with pytest.raises(MixingError, match=f"K = {bad!r}"):
      mixing.uniform_weights(bad)
  with pytest.raises(WeightsError, match=r"\[10\. +0\. +5\.\]"):
    mixing.natural_weights([10, 0, 5])
  with pytest.raises(WeightsError, match=r"\[-1\. +2\.\]"):
    mixing.natural_weights([-1, 2])
  with pytest.raises(WeightsError, match="nan"):
    mixing.natural_weights([np.nan, 2])
  with pytest.raises(WeightsError, match="1-D"):
    mixing.natural_weights([[1, 2]])


_BAD = [
  (dict(w0_K=[0.5, 0.6, 0.1]), r"w0_K \[.*\] sum to 1\.2, not 1"),
  (dict(w0_K=[1.2, -0.1, -0.1]), r"w0_K .* have negative entries at \[1, 2\]"),
  (dict(w0_K=[0.5, 0.5]), r"shape \(2,\)"),  # K mismatch
  (dict(T=0), r"T = 0 is invalid"),
  (dict(T=2.5), r"T = 2\.5 is invalid"),
  (dict(N=7.0), r"N = 7\.0 is invalid"),
  (dict(T=10, N=5), r"N = 5 is invalid with T = 10"),
  (dict(beta=0.0), r"beta = 0\.0 is invalid"),
  (dict(beta=-1), r"beta = -1 is invalid"),
  (dict(beta=float("nan")), r"beta = nan is invalid"),
  (dict(beta=float("inf")), r"beta = inf is invalid"),
  (dict(lr=0), r"lr = 0 is invalid"),
  (dict(outer="adam"), r"outer = 'adam' is invalid.*'eg', 'pgd'"),
  (dict(hypergrad="implicit"), r"hypergrad = 'implicit' is invalid"),
  (dict(batch_fn=lambda key: None), r"key = None is invalid"),
]


@pytest.mark.parametrize("bad, pattern", _BAD)
def test_bad_inputs_raise_naming_the_value(bad, pattern):
  problem, params0, _, _ = _three_domains(D=2, M=4)
  kw = dict(w0_K=mixing.uniform_weights(3), lr=0.1, T=2, N=4, beta=1.0)
  kw.update(bad)
  with pytest.raises((MixingError, ValueError), match=pattern):
    mixing.run_mixing(problem, params0, kw.pop("w0_K"), **kw)


def test_divergence_reports_first_bad_round():
  problem, params0, _, _ = _three_domains(D=2, M=4)
  with pytest.raises(NonFiniteHypergradientError, match=r"round \d+") as e:
    mixing.run_mixing(
      problem,
      params0,
      mixing.uniform_weights(3),
      lr=50.0,
      T=5,
      N=200,
      beta=1.0,
    )
  msg = str(e.value)
  assert "smaller beta (beta = 1.0)" in msg and "(lr = 50.0)" in msg, msg
  with pytest.raises(MixingError, match="N = 5 is invalid with eval_every"):
    mixing.train_fixed(
      problem, params0, mixing.uniform_weights(3), lr=0.1, N=5, eval_every=2
    )


# run_mixing_schedule: the step-level algorithm with per-round horizons.


def _step_fns(train, val, B):
  """Per-step samplers (no T axis) for run_mixing_schedule."""
  batch_T1, val_batch_fn = _batch_fns(train, val, 1, B)

  def step_batch_fn(key):
    return jax.tree.map(lambda x: x[0], batch_T1(key))

  return step_batch_fn, val_batch_fn


@pytest.mark.parametrize("T", [1, 3, 7, 20])
def test_schedule_equals_run_mixing_at_every_budget(x64, T):
  problem, params0, _, _ = _three_domains(dtype=jnp.float64)
  w0_K = jnp.array([0.2, 0.5, 0.3])
  budgets = (20, 41, 60)
  st = mixing.run_mixing_schedule(
    problem, params0, w0_K, lr=0.05, beta=3.0, budgets=budgets, T0=T
  )
  for b, N in enumerate(budgets):
    tr = mixing.run_mixing(problem, params0, w0_K, lr=0.05, T=T, N=N, beta=3.0)
    np.testing.assert_allclose(st.w_BxK[b], tr.w_RxK[-1], rtol=1e-11)
    np.testing.assert_allclose(st.params_B[b], tr.params, rtol=1e-11)
    np.testing.assert_allclose(st.val_loss_B[b], tr.val_loss_R1[-1], rtol=1e-11)
    assert int(st.rounds_B[b]) == N // T and int(st.horizon_B[b]) == T


def test_schedule_replay_growth_decay_minibatches(x64):
  """Growing horizons, decaying beta, minibatches: rebuilt from the parts."""
  problem, params0, train, val = _three_domains(dtype=jnp.float64)
  step_batch_fn, val_batch_fn = _step_fns(train, val, B=4)
  lr, beta, T0, growth, decay = 0.05, 4.0, 2.0, 1.5, 0.5
  key = jax.random.key(11)
  w0_K = jnp.array([0.5, 0.3, 0.2])
  budgets = (9, 23)
  st = mixing.run_mixing_schedule(
    problem, params0, w0_K, lr=lr, beta=beta, budgets=budgets, T0=T0,
    T_growth=growth, beta_decay=decay, step_batch_fn=step_batch_fn,
    val_batch_fn=val_batch_fn, key=key,
  )
  k_tr, k_val = jax.random.split(key)
  params, w_K, n, r = params0, w0_K, 0, 0
  got = {}
  while n < budgets[-1]:
    T_r = max(1, int(np.floor(T0 + growth * r)))
    steps = min(T_r, budgets[-1] - n)
    for nb in budgets:  # record budgets falling inside this round
      if n < nb <= n + steps and nb - n < T_r:
        got[nb] = (bilevel.inner_steps(
          problem, params, w_K, lr=lr, T=nb - n, batches=jax.tree.map(
            lambda *x: jnp.stack(x),
            *[step_batch_fn(jax.random.fold_in(k_tr, m)) for m in range(n, nb)])),
          w_K)
    if steps < T_r:
      break
    batches = jax.tree.map(
      lambda *x: jnp.stack(x),
      *[step_batch_fn(jax.random.fold_in(k_tr, m)) for m in range(n, n + T_r)],
    )
    vb = val_batch_fn(jax.random.fold_in(k_val, n + T_r - 1))
    h_K, params = bilevel.hypergrad_forward(
      problem, params, w_K, lr=lr, T=T_r, batches=batches, val_batch=vb
    )
    w_K = simplex.eg_update(w_K, h_K, beta / (1 + decay * r))
    n, r = n + T_r, r + 1
    if n in budgets:
      got[n] = (params, w_K)
  assert sorted(got) == list(budgets)
  for b, N in enumerate(budgets):
    np.testing.assert_allclose(st.params_B[b], got[N][0], rtol=1e-10)
    np.testing.assert_allclose(st.w_BxK[b], got[N][1], rtol=1e-10)
  assert int(st.rounds_B[-1]) == r  # 2, 3, 5, 6 steps: 4 rounds in 16 steps
  assert np.max(np.abs(np.asarray(st.w_BxK[-1] - w0_K))) > 1e-3


def test_schedule_fixed_weights_and_common_random_numbers(x64):
  """update_weights=False is SGD with w0; no round ending = the same run."""
  problem, params0, train, val = _three_domains(dtype=jnp.float64)
  step_batch_fn, val_batch_fn = _step_fns(train, val, B=4)
  key = jax.random.key(2)
  w0_K = jnp.array([0.2, 0.5, 0.3])
  kw = dict(lr=0.05, beta=1.0, budgets=(10,), step_batch_fn=step_batch_fn, key=key)
  fixed = mixing.run_mixing_schedule(
    problem, params0, w0_K, T0=1, update_weights=False, **kw
  )
  k_tr = jax.random.split(key)[0]
  p = params0
  for n in range(10):
    p = bilevel.inner_steps(problem, p, w0_K, lr=0.05, T=1, batches=jax.tree.map(
      lambda x: x[None], step_batch_fn(jax.random.fold_in(k_tr, n))))
  np.testing.assert_allclose(fixed.params_B[0], p, rtol=1e-12)
  # A mixing run whose first round never ends sees the same minibatches.
  late = mixing.run_mixing_schedule(
    problem, params0, w0_K, T0=11, val_batch_fn=val_batch_fn, **kw
  )
  np.testing.assert_allclose(late.params_B[0], p, rtol=1e-12)
  np.testing.assert_allclose(late.w_BxK[0], w0_K, rtol=0)
  # Under vmap over horizons (traced T0): lane i is the run with T0[i].
  lanes = jax.jit(jax.vmap(lambda t: mixing.run_mixing_schedule(
    problem, params0, w0_K, T0=t, val_batch_fn=val_batch_fn, check_finite=False,
    **kw).params_B))(jnp.array([3.0, 11.0]))
  one = mixing.run_mixing_schedule(
    problem, params0, w0_K, T0=3, val_batch_fn=val_batch_fn, **kw
  )
  np.testing.assert_allclose(lanes[0], one.params_B, rtol=1e-12)
  np.testing.assert_allclose(lanes[1, 0], p, rtol=1e-12)


_BAD_SCHEDULE = [
  (dict(budgets=(10, 5)), r"budgets = \(10, 5\) is invalid.*increasing"),
  (dict(budgets=(0,)), r"budgets = \(0,\) is invalid"),
  (dict(T0=0), r"T0 = 0 is invalid.*>= 1"),
  (dict(T_growth=-1.0), r"T_growth = -1\.0 is invalid"),
  (dict(beta_decay=float("nan")), r"beta_decay = nan is invalid"),
  (dict(lr=-0.1), r"lr = -0\.1 is invalid"),
  (dict(outer="adam"), r"outer = 'adam' is invalid"),
  (dict(step_batch_fn=lambda k: None), r"key = None is invalid"),
]


@pytest.mark.parametrize("bad, pattern", _BAD_SCHEDULE)
def test_schedule_bad_inputs_raise_naming_the_value(bad, pattern):
  problem, params0, _, _ = _three_domains(D=2, M=4)
  kw = dict(lr=0.1, beta=1.0, budgets=(4,), T0=2)
  kw.update(bad)
  with pytest.raises(MixingError, match=pattern):
    mixing.run_mixing_schedule(problem, params0, mixing.uniform_weights(3), **kw)


def test_schedule_divergence_raises():
  problem, params0, _, _ = _three_domains(D=2, M=4)
  with pytest.raises(NonFiniteHypergradientError, match=r"budget N = 200"):
    mixing.run_mixing_schedule(
      problem, params0, mixing.uniform_weights(3), lr=50.0, beta=1.0,
      budgets=(200,), T0=5,
    )
