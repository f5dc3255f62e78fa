"""Hypergradients of bilevel data mixing (Proposition 4.1; the book's Sources §1).

Oracles: central finite differences of the unrolled validation loss,
forward == reverse, the closed form on a quadratic (finite T and the
implicit T → ∞ limit) and the T = 1 gradient-alignment rule. All
numerical comparisons run in float64 inside ``jax.enable_x64(True)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataweights.methods import bilevel

K = 3


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------- problems


def _data(seed, K, M, D, kind):
  rng = np.random.default_rng(seed)
  x_KxMxD = rng.normal(size=(K, M, D))
  theta_D = rng.normal(size=D)
  shift_K = rng.normal(size=K)
  z_KxM = x_KxMxD @ theta_D + shift_K[:, None]
  if kind == "logistic":
    y_KxM = (rng.uniform(size=(K, M)) < 1 / (1 + np.exp(-z_KxM))) * 1.0
  else:
    y_KxM = np.sin(z_KxM) + 0.1 * rng.normal(size=(K, M))
  xv_MxD = rng.normal(size=(M, D))
  zv_M = xv_MxD @ theta_D
  yv_M = (zv_M > 0) * 1.0 if kind == "logistic" else np.sin(zv_M)
  return (
    {"x": jnp.asarray(x_KxMxD), "y": jnp.asarray(y_KxM)},
    {"x": jnp.asarray(xv_MxD), "y": jnp.asarray(yv_M)},
  )


def _make_problem(kind, seed=0, M=12, D=4, Hd=5):
  """Quadratic (least squares), logistic regression or a tanh MLP."""
  train, val = _data(seed, K, M, D, kind)
  rng = np.random.default_rng(seed + 1)
  if kind == "mlp":
    params = {
      "W1_DxH": jnp.asarray(rng.normal(size=(D, Hd)) / np.sqrt(D)),
      "b1_H": jnp.asarray(0.1 * rng.normal(size=Hd)),
      "w2_H": jnp.asarray(rng.normal(size=Hd) / np.sqrt(Hd)),
      "b2": jnp.asarray(0.0),
    }

    def predict(p, x_MxD):
      h_MxH = jnp.tanh(x_MxD @ p["W1_DxH"] + p["b1_H"][None])
      return h_MxH @ p["w2_H"] + p["b2"]
  else:
    params = {
      "w_D": jnp.asarray(0.1 * rng.normal(size=D)),
      "b": jnp.asarray(0.0),
    }

    def predict(p, x_MxD):
      return x_MxD @ p["w_D"] + p["b"]

  def loss_M(p, x_MxD, y_M):
    z_M = predict(p, x_MxD)
    if kind == "logistic":
      return jnp.logaddexp(0.0, z_M) - y_M * z_M
    return 0.5 * (z_M - y_M) ** 2

  def domain_losses(p, batch):
    b = train if batch is None else batch
    return jax.vmap(lambda x, y: jnp.mean(loss_M(p, x, y)))(b["x"], b["y"])

  def val_loss(p, batch):
    b = val if batch is None else batch
    return jnp.mean(loss_M(p, b["x"], b["y"]))

  return bilevel.MixingProblem(domain_losses, val_loss), params, train, val


def _minibatches(train, val, T, B, seed=0):
  """T minibatches of B examples per domain, and one validation batch."""
  rng = np.random.default_rng(seed)
  M = train["y"].shape[1]
  idx_TxB = rng.integers(0, M, size=(T, B))
  batches = {
    "x": train["x"][:, idx_TxB].swapaxes(0, 1),
    "y": train["y"][:, idx_TxB].swapaxes(0, 1),
  }
  vidx_B = rng.integers(0, val["y"].shape[0], size=B)
  return batches, {"x": val["x"][vidx_B], "y": val["y"][vidx_B]}


def _fd(problem, params, w_K, lr, T, batches=None, val_batch=None, eps=1e-5):
  @jax.jit
  def g(w):
    p = bilevel.inner_steps(problem, params, w, lr=lr, T=T, batches=batches)
    return problem.val_loss(p, val_batch)

  out = []
  for j in range(w_K.shape[0]):
    e_K = jnp.zeros_like(w_K).at[j].set(eps)
    out.append((g(w_K + e_K) - g(w_K - e_K)) / (2 * eps))
  return np.array(out)


W_K = (0.2, 0.3, 0.5)


def _jit(fn, problem, **kw):
  """``fn(problem, params, w_K, **kw)`` compiled once (fast tests)."""
  return jax.jit(lambda params, w_K: fn(problem, params, w_K, **kw))


def _fwd(problem, params, w_K, **kw):
  return _jit(bilevel.hypergrad_forward, problem, **kw)(params, w_K)


def _rev(problem, params, w_K, **kw):
  return _jit(bilevel.hypergrad_reverse, problem, **kw)(params, w_K)


def _tree_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, **kw)


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("kind", ["quadratic", "logistic", "mlp"])
def test_forward_equals_reverse_equals_finite_differences(x64, kind):
  problem, params, _, _ = _make_problem(kind)
  w_K = jnp.asarray(W_K)
  lr, T = 0.3, 8
  h_fwd, p_fwd = _fwd(problem, params, w_K, lr=lr, T=T)
  h_rev, p_rev = _rev(problem, params, w_K, lr=lr, T=T)
  h_fd = _fd(problem, params, w_K, lr, T)
  assert h_fwd.dtype == jnp.float64
  assert np.max(np.abs(h_fd)) > 1e-3  # a non-trivial hypergradient
  np.testing.assert_allclose(h_fwd, h_rev, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(h_fwd, h_fd, rtol=1e-6, atol=1e-9)
  _tree_close(p_fwd, p_rev, rtol=1e-12)


def test_minibatch_forward_equals_reverse_equals_finite_differences(x64):
  problem, params, train, val = _make_problem("mlp")
  w_K = jnp.asarray(W_K)
  lr, T = 0.3, 6
  batches, val_batch = _minibatches(train, val, T, B=4)
  kw = dict(lr=lr, T=T, batches=batches, val_batch=val_batch)
  h_fwd, p_fwd = _fwd(problem, params, w_K, **kw)
  h_rev, _ = _rev(problem, params, w_K, **kw)
  h_rem, _ = _rev(problem, params, w_K, remat=True, **kw)
  h_fd = _fd(problem, params, w_K, lr, T, batches, val_batch)
  np.testing.assert_allclose(h_fwd, h_rev, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(h_rem, h_rev, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(h_fwd, h_fd, rtol=1e-6, atol=1e-9)
  # The minibatches matter: the full-batch hypergradient is different.
  h_full, _ = _fwd(problem, params, w_K, lr=lr, T=T)
  assert np.max(np.abs(h_full - h_fwd)) > 1e-4
  # Step t uses minibatch t: replay the steps one by one.
  step = jax.jit(
    lambda p, b: bilevel.inner_steps(problem, p, w_K, lr=lr, T=1, batches=b)
  )
  p = params
  for t in range(T):
    p = step(p, jax.tree.map(lambda x, t=t: x[t : t + 1], batches))
  _tree_close(p_fwd, p, rtol=1e-12)


def test_T1_is_the_gradient_alignment_rule(x64):
  problem, params, _, _ = _make_problem("mlp")
  w_K = jnp.asarray(W_K)
  lr = 0.2
  h_K, p_1 = _fwd(problem, params, w_K, lr=lr, T=1)
  grad_g = jax.grad(problem.val_loss)(p_1, None)
  jac_f = jax.jacrev(problem.domain_losses)(params, None)  # leaves (K, ...)
  align_K = sum(
    jnp.tensordot(jf, gg, axes=gg.ndim)
    for jf, gg in zip(jax.tree.leaves(jac_f), jax.tree.leaves(grad_g))
  )
  np.testing.assert_allclose(h_K, -lr * align_K, rtol=1e-10)


# ----------------------------------------------- quadratic with closed form


def _quadratic(seed=0, D=4):
  """f_j = ½(θ−c_j)ᵀA_j(θ−c_j), g = ½(θ−c_v)ᵀA_v(θ−c_v), diagonal A_j."""
  rng = np.random.default_rng(seed)
  a_KxD = rng.uniform(0.5, 3.0, size=(K, D))
  c_KxD = rng.normal(size=(K, D))
  a_v_D = rng.uniform(0.5, 2.0, size=D)
  c_v_D = rng.normal(size=D)

  def domain_losses(p, batch):
    r_KxD = p["th_D"][None] - c_KxD
    return 0.5 * jnp.sum(a_KxD * r_KxD**2, axis=1)

  def val_loss(p, batch):
    return 0.5 * jnp.sum(a_v_D * (p["th_D"] - c_v_D) ** 2)

  def closed_form(w_K):
    h_D = w_K @ a_KxD  # diagonal of H = Σ_j w_j A_j
    theta_D = (w_K @ (a_KxD * c_KxD)) / h_D
    grad_f_KxD = a_KxD * (theta_D[None] - c_KxD)
    grad_g_D = a_v_D * (theta_D - c_v_D)
    return h_D, theta_D, grad_f_KxD, grad_g_D

  return bilevel.MixingProblem(domain_losses, val_loss), closed_form


def test_implicit_matches_closed_form_and_finite_differences(x64):
  problem, closed_form = _quadratic()
  w_K = np.array(W_K)
  h_D, theta_D, grad_f_KxD, grad_g_D = closed_form(w_K)
  h_exact_K = -(grad_f_KxD / h_D) @ grad_g_D  # −∇gᵀ H⁻¹ ∇f_j
  params = {"th_D": jnp.asarray(theta_D)}
  for solver in ("dense", "cg", "auto"):
    implicit = _jit(bilevel.hypergrad_implicit, problem, solver=solver)
    h_K = implicit(params, w_K)
    np.testing.assert_allclose(h_K, h_exact_K, rtol=1e-9)
  # d g(θ*(w)) / dw by central differences of the closed-form θ*(w).
  eps = 1e-6
  fd_K = []
  for j in range(K):
    e_K = np.eye(K)[j] * eps
    gp = problem.val_loss({"th_D": jnp.asarray(closed_form(w_K + e_K)[1])}, 0)
    gm = problem.val_loss({"th_D": jnp.asarray(closed_form(w_K - e_K)[1])}, 0)
    fd_K.append((gp - gm) / (2 * eps))
  np.testing.assert_allclose(h_exact_K, fd_K, rtol=1e-7)
  # solve_inner reaches θ*(w).
  p_star, info = bilevel.solve_inner(
    problem, {"th_D": jnp.zeros(4)}, w_K, lr=0.3, tol=1e-11, return_info=True
  )
  np.testing.assert_allclose(p_star["th_D"], theta_D, rtol=1e-9)
  assert info["grad_norm"] <= 1e-11


def test_unrolled_converges_geometrically_to_implicit(x64):
  problem, closed_form = _quadratic()
  w_K = np.array(W_K)
  lr = 0.3
  h_D, theta_D, grad_f_KxD, grad_g_D = closed_form(w_K)
  h_impl_K = -(grad_f_KxD / h_D) @ grad_g_D
  rho = np.max(np.abs(1 - lr * h_D))  # contraction of I − ηH
  assert 0 < rho < 1
  params = {"th_D": jnp.asarray(theta_D)}  # start at θ*(w)
  errs = []
  for T in (5, 10, 20, 40):
    h_f, _ = _fwd(problem, params, w_K, lr=lr, T=T)
    if T == 20:
      h_r, _ = _rev(problem, params, w_K, lr=lr, T=T)
      np.testing.assert_allclose(h_f, h_r, rtol=1e-10, atol=1e-14)
    # Finite T at θ*: Z_T = −H⁻¹(I − (I − ηH)^T) ∇f_j exactly.
    decay_D = 1 - (1 - lr * h_D) ** T
    h_T_K = -(grad_f_KxD * decay_D / h_D) @ grad_g_D
    np.testing.assert_allclose(h_f, h_T_K, rtol=1e-9, atol=1e-14)
    err = np.max(np.abs(np.asarray(h_f) - h_impl_K))
    assert err <= 2 * rho**T * np.max(np.abs(h_impl_K)) + 1e-14
    errs.append(err)
  assert errs[0] > 1e-3  # short horizons are measurably biased
  for e_short, e_long in zip(errs, errs[1:]):
    assert e_long < e_short
  # From a cold start θ_0 = 0, the warm-up transient also dies out.
  h_cold, _ = _fwd(problem, {"th_D": jnp.zeros(4)}, w_K, lr=lr, T=300)
  np.testing.assert_allclose(h_cold, h_impl_K, rtol=1e-8, atol=1e-12)


# ------------------------------- implicit with distinct train/val batches


def _ls_batch(rng, n, D, theta_D, noise):
  """Least-squares examples ``{"x", "y", "d"}`` (d: domain id, K domains)."""
  x_NxD = rng.normal(size=(n, D))
  d_N = np.arange(n) % K
  y_N = x_NxD @ theta_D + 0.5 * d_N + noise * rng.normal(size=n)
  return {"x": x_NxD, "y": y_N, "d": d_N}


def _ls_problem(full_train, full_val):
  """f_j = mean over domain j of ½(xᵀθ − y)², g = mean of ½(xᵀθ − y)².

  Train and validation batches have the same structure, so a hypergradient
  that evaluates ``g`` on the wrong batch still runs and gives a number.
  """

  def sq_N(p, b):
    return 0.5 * (jnp.asarray(b["x"]) @ p["th_D"] - jnp.asarray(b["y"])) ** 2

  def domain_losses(p, batch):
    b = full_train if batch is None else batch
    onehot_NxK = jax.nn.one_hot(jnp.asarray(b["d"]), K, dtype=jnp.float64)
    return (sq_N(p, b) @ onehot_NxK) / onehot_NxK.sum(0)

  def val_loss(p, batch):
    return jnp.mean(sq_N(p, full_val if batch is None else batch))

  return bilevel.MixingProblem(domain_losses, val_loss)


def _ls_oracle(train, val, w_K):
  """numpy closed form: θ*(w) on ``train``, h_j = −∇g(θ*)ᵀ H⁻¹ ∇f_j(θ*)."""
  A_KxDxD, b_KxD = [], []
  for j in range(K):
    x_nxD, y_n = train["x"][train["d"] == j], train["y"][train["d"] == j]
    A_KxDxD.append(x_nxD.T @ x_nxD / len(y_n))
    b_KxD.append(x_nxD.T @ y_n / len(y_n))
  A_KxDxD, b_KxD = np.array(A_KxDxD), np.array(b_KxD)
  H_DxD = np.einsum("k,kde->de", w_K, A_KxDxD)
  theta_D = np.linalg.solve(H_DxD, w_K @ b_KxD)
  grad_f_KxD = A_KxDxD @ theta_D - b_KxD
  r_N = val["x"] @ theta_D - val["y"]
  grad_g_D = val["x"].T @ r_N / len(r_N)
  g = 0.5 * np.mean(r_N**2)
  return theta_D, -grad_f_KxD @ np.linalg.solve(H_DxD, grad_g_D), g


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_implicit_uses_the_validation_batch_for_g(x64, solver):
  # Oracle: the numpy closed form, checked against central differences of
  # g(θ*(w)) with θ*(w) solved in numpy. Train batch, validation batch and
  # the full data (batch None) all differ, so ∇g taken on the training
  # batch (or on the full validation data) gives another number.
  rng = np.random.default_rng(7)
  D = 3
  t_D, v_D = rng.normal(size=D), rng.normal(size=D)
  train = _ls_batch(rng, 30, D, t_D, 0.3)
  val = _ls_batch(rng, 12, D, v_D, 0.3)  # another target: another θ
  full_train = _ls_batch(rng, 30, D, t_D, 1.0)
  full_val = _ls_batch(rng, 12, D, t_D, 1.0)
  problem = _ls_problem(full_train, full_val)
  w_K = np.array(W_K)
  theta_D, h_K, _ = _ls_oracle(train, val, w_K)
  eps = 1e-6
  fd_K = [
    (
      _ls_oracle(train, val, w_K + eps * np.eye(K)[j])[2]
      - _ls_oracle(train, val, w_K - eps * np.eye(K)[j])[2]
    )
    / (2 * eps)
    for j in range(K)
  ]
  np.testing.assert_allclose(h_K, fd_K, rtol=1e-6)
  # The oracle has power: g on the training batch, or on the full
  # validation data, gives a hypergradient far from the right one.
  for wrong_val in (train, full_val):
    h_wrong_K = _ls_oracle(train, wrong_val, w_K)[1]
    assert np.max(np.abs(h_wrong_K - h_K)) > 0.1 * np.max(np.abs(h_K))
  implicit = _jit(
    bilevel.hypergrad_implicit,
    problem,
    batch=train,
    val_batch=val,
    solver=solver,
  )
  got_K = implicit({"th_D": jnp.asarray(theta_D)}, jnp.asarray(w_K))
  np.testing.assert_allclose(got_K, h_K, rtol=1e-8)


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_naming_the_value():
  problem, params, train, val = _make_problem("quadratic")
  w_K = jnp.asarray(W_K, dtype=jnp.float32)
  for T in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match=f"T = {T!r}"):
      bilevel.hypergrad_forward(problem, params, w_K, lr=0.1, T=T)
  batches, _ = _minibatches(train, val, T=3, B=2)
  with pytest.raises(ValueError, match=r"leading axis T = 4.*\[3\]"):
    bilevel.hypergrad_reverse(
      problem, params, w_K, lr=0.1, T=4, batches=batches
    )
  with pytest.raises(ValueError, match="solver = 'lu'"):
    bilevel.hypergrad_implicit(problem, params, w_K, solver="lu")
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    bilevel.inner_steps(problem, params, w_K[:2], lr=0.1, T=1)
  with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
    bilevel.inner_steps(problem, params, w_K[None], lr=0.1, T=1)
  with pytest.raises(ValueError, match="max_steps = 0"):
    bilevel.solve_inner(problem, params, w_K, lr=0.1, max_steps=0)
  with pytest.raises(ValueError, match="tol = -1"):
    bilevel.solve_inner(problem, params, w_K, lr=0.1, tol=-1)
  with pytest.warns(RuntimeWarning, match="gradient norm"):
    bilevel.solve_inner(problem, params, w_K, lr=0.1, max_steps=2)
