"""Meta-gradient cores against independent oracles (float64).

* DDS: central finite differences of the look-ahead outer loss in φ.
* Anograd: the closed form from an explicit per-example gradient matrix.
* SOBA: on a quadratic with known Hessian, v -> -H^{-1} grad L_out; at
  (θ*, v*) the meta-gradient equals the implicit hypergradient obtained by
  differentiating the closed-form θ*(φ) = H(φ)^{-1} b through a linear
  solve; the cross-derivative equals finite differences.
* The weighting-network problem: weights from the real image scorer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dataweights.methods import metagrad
from dataweights.models import weighting_net as wn


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


P, C, M = 4, 3, 7  # pixels, classes, examples


def _linear_loss_B(theta, batch):
  """Softmax regression: per-example cross-entropy."""
  x = batch["x_BxHxW"].reshape(batch["x_BxHxW"].shape[0], -1)
  logits = x @ theta["w"] + theta["b"][None, :]
  y = batch["y_B"]
  return (
    jax.nn.logsumexp(logits, -1)
    - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
  )


def _batch(seed, m=M):
  rng = np.random.default_rng(seed)
  return {
    "x_BxHxW": jnp.asarray(rng.normal(size=(m, 2, 2))),
    "y_B": jnp.asarray(rng.integers(0, C, m), jnp.int32),
  }


SCORER = wn.ScorerConfig(
  modality="image",
  image_pixels=P,
  hidden=5,
  num_classes=C,
  param_dtype="float64",
)


def _setup(output):
  rng = np.random.default_rng(0)
  theta = {
    "w": jnp.asarray(rng.normal(size=(P, C)) * 0.5),
    "b": jnp.asarray(rng.normal(size=(C,)) * 0.1),
  }
  phi = wn.init_scorer(SCORER, "score", jax.random.key(1))
  problem = metagrad.weighted_examples(
    _linear_loss_B,
    lambda p, b: wn.normalize_scores(
      wn.apply_scorer(SCORER, "score", p, b), output
    ),
  )
  return problem, theta, phi, _batch(1), _batch(2)


def _fd(f, phi, direction, eps=1e-6):
  flat, unravel = ravel_pytree(phi)
  d, _ = ravel_pytree(direction)
  return (f(unravel(flat + eps * d)) - f(unravel(flat - eps * d))) / (2 * eps)


def _random_like(tree, seed):
  flat, unravel = ravel_pytree(tree)
  return unravel(
    jnp.asarray(np.random.default_rng(seed).normal(size=flat.shape))
  )


@pytest.mark.parametrize("lr", [0.1, 1.5])
def test_dds_equals_finite_differences_of_the_lookahead_loss(lr):
  problem, theta, phi, b_in, b_out = _setup("softmax")
  g_phi, la = metagrad.dds_metagrad(problem, theta, phi, b_in, b_out, lr)

  @jax.jit
  def lookahead(p):
    g = jax.grad(problem.inner_loss)(theta, p, b_in)
    return problem.outer_loss(
      jax.tree.map(lambda t, d: t - lr * d, theta, g), b_out
    )

  np.testing.assert_allclose(la, lookahead(phi), rtol=1e-12)
  for seed in range(3):
    d = _random_like(phi, seed)
    fd = _fd(lookahead, phi, d)
    an = metagrad.tree_vdot(g_phi, d)
    np.testing.assert_allclose(an, fd, rtol=1e-6, atol=1e-10)
  assert float(metagrad.tree_vdot(g_phi, g_phi)) > 1e-8  # not trivially 0


def test_anograd_equals_its_closed_form():
  problem, theta, phi, b_in, b_out = _setup("softplus")
  eps = 1e-6
  neg_grad, align = metagrad.anograd_metagrad(
    problem, theta, phi, b_in, b_out, eps
  )
  # Oracle: explicit per-example gradients G (M x |θ|), w = softplus(s).
  flat, unravel = ravel_pytree(theta)
  G = jax.jacrev(lambda f: _linear_loss_B(unravel(f), b_in))(flat)
  s = jax.grad(lambda f: jnp.mean(_linear_loss_B(unravel(f), b_out)))(flat)
  w, vjp = jax.vjp(
    lambda p: jax.nn.softplus(wn.apply_scorer(SCORER, "score", p, b_in)), phi
  )
  g = w @ G
  n, a = np.linalg.norm(g), g @ s
  np.testing.assert_allclose(align, a / (n + eps), rtol=1e-12)
  dA_dw = (G @ s) / (n + eps) - a * (G @ g) / (n * (n + eps) ** 2)
  (want,) = vjp(jnp.asarray(dA_dw))
  for x, y in zip(jax.tree.leaves(neg_grad), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, -y, rtol=1e-9, atol=1e-12)


def _quadratic(seed=0, n=4, k=3):
  """L_in = ½ θᵀ(A + diag(e^φ))θ − bᵀθ (φ: per-coordinate ridge, n of them);
  L_out = ½ ‖Cθ − d‖². H(φ) = A + diag(e^φ)."""
  rng = np.random.default_rng(seed)
  r = rng.normal(size=(n, n))
  A = jnp.asarray(r @ r.T / n + 0.5 * np.eye(n))
  b = jnp.asarray(rng.normal(size=n))
  Cm = jnp.asarray(rng.normal(size=(k, n)))
  d = jnp.asarray(rng.normal(size=k))

  def inner(theta, phi, batch):
    del batch
    t = theta["t"]
    return (
      0.5 * t @ (A @ t) + 0.5 * jnp.sum(jnp.exp(phi["log_reg"]) * t**2) - b @ t
    )

  def outer(theta, batch):
    del batch
    r = Cm @ theta["t"] - d
    return 0.5 * r @ r

  def theta_star(phi):
    H = A + jnp.diag(jnp.exp(phi["log_reg"]))
    return {"t": jnp.linalg.solve(H, b)}

  phi = {"log_reg": jnp.asarray(rng.normal(size=n) * 0.3)}
  return metagrad.BilevelProblem(inner, outer), phi, theta_star, A


def test_soba_v_converges_to_minus_inverse_hessian_times_outer_gradient():
  problem, phi, theta_star, A = _quadratic()
  rng = np.random.default_rng(5)
  theta = {"t": jnp.asarray(rng.normal(size=4))}  # any θ: H is constant
  H = A + jnp.diag(jnp.exp(phi["log_reg"]))
  g_out = jax.grad(problem.outer_loss)(theta, None)["t"]
  want = -np.linalg.solve(np.asarray(H), np.asarray(g_out))
  rho = 1.0 / float(np.linalg.eigvalsh(np.asarray(H)).max())

  @jax.jit
  def iterate(rho, damping):
    return jax.lax.fori_loop(
      0,
      3000,
      lambda _, v: metagrad.soba_v_update(
        problem, theta, phi, None, None, v, rho, damping
      ),
      {"t": jnp.zeros(4)},
    )

  v = iterate(rho, 0.0)
  np.testing.assert_allclose(v["t"], want, rtol=1e-9, atol=1e-12)
  # With damping λ the fixed point is −(H + λI)⁻¹ ∇L_out.
  v = iterate(rho / 2, 0.7)
  want = -np.linalg.solve(np.asarray(H) + 0.7 * np.eye(4), np.asarray(g_out))
  np.testing.assert_allclose(v["t"], want, rtol=1e-9, atol=1e-12)


def test_soba_metagrad_at_the_fixed_point_is_the_implicit_hypergradient():
  problem, phi, theta_star, A = _quadratic(seed=3)
  theta = theta_star(phi)
  H = A + jnp.diag(jnp.exp(phi["log_reg"]))
  g_out = jax.grad(problem.outer_loss)(theta, None)
  v = {"t": -jnp.linalg.solve(H, g_out["t"])}
  got = metagrad.soba_metagrad(problem, theta, phi, None, v)
  # Independent: differentiate φ -> L_out(θ*(φ)) through the linear solve.
  want = jax.grad(lambda p: problem.outer_loss(theta_star(p), None))(phi)
  np.testing.assert_allclose(got["log_reg"], want["log_reg"], rtol=1e-10)
  assert np.abs(np.asarray(want["log_reg"])).max() > 1e-3


def test_soba_on_a_hyperparameter_problem_reaches_the_implicit_hypergradient():
  """Ridge regression with one log-regularisation per feature: SOBA's v and
  θ iterated from zero, then the meta-gradient vs the exact hypergradient."""
  rng = np.random.default_rng(7)
  n, p = 40, 5
  X, Xv = (
    jnp.asarray(rng.normal(size=(n, p))),
    jnp.asarray(rng.normal(size=(n, p))),
  )
  w_true = rng.normal(size=p)
  y = X @ w_true + 0.3 * jnp.asarray(rng.normal(size=n))
  yv = Xv @ w_true + 0.3 * jnp.asarray(rng.normal(size=n))

  def inner(theta, phi, batch):
    del batch
    r = X @ theta["w"] - y
    return 0.5 * jnp.mean(r**2) + 0.5 * jnp.sum(
      jnp.exp(phi["lam"]) * theta["w"] ** 2
    )

  def outer(theta, batch):
    del batch
    return 0.5 * jnp.mean((Xv @ theta["w"] - yv) ** 2)

  problem = metagrad.BilevelProblem(inner, outer)
  phi = {"lam": jnp.asarray(np.log([0.05, 0.1, 0.5, 1.0, 0.02]))}

  def theta_star(phi):
    H = X.T @ X / n + jnp.diag(jnp.exp(phi["lam"]))
    return {"w": jnp.linalg.solve(H, X.T @ y / n)}

  theta, v = {"w": jnp.zeros(p)}, {"w": jnp.zeros(p)}

  def soba_inner(_, carry):
    theta, v = carry
    g = metagrad.inner_grad(problem, theta, phi, None)
    v = metagrad.soba_v_update(problem, theta, phi, None, None, v, 0.3)
    return jax.tree.map(lambda t, d: t - 0.3 * d, theta, g), v

  theta, v = jax.jit(lambda c: jax.lax.fori_loop(0, 4000, soba_inner, c))(
    (theta, v)
  )
  got = metagrad.soba_metagrad(problem, theta, phi, None, v)
  want = jax.grad(lambda q: outer(theta_star(q), None))(phi)
  np.testing.assert_allclose(got["lam"], want["lam"], rtol=1e-8, atol=1e-12)


def test_cross_derivative_equals_finite_differences():
  problem, theta, phi, b_in, _ = _setup("softmax")
  u = _random_like(theta, 11)
  x = metagrad.cross_derivative(problem, theta, phi, b_in, u)

  def directional(p):
    return metagrad.tree_vdot(metagrad.inner_grad(problem, theta, p, b_in), u)

  for seed in range(3):
    d = _random_like(phi, 20 + seed)
    np.testing.assert_allclose(
      metagrad.tree_vdot(x, d), _fd(directional, phi, d), rtol=1e-6, atol=1e-10
    )


def test_hvp_equals_the_dense_hessian():
  problem, theta, phi, b_in, _ = _setup("softmax")
  flat, unravel = ravel_pytree(theta)
  H = jax.jit(jax.hessian(lambda f: problem.inner_loss(unravel(f), phi, b_in)))(
    flat
  )
  v = _random_like(theta, 3)
  got = ravel_pytree(
    jax.jit(metagrad.hvp, static_argnums=0)(problem, theta, phi, b_in, v)
  )[0]
  np.testing.assert_allclose(got, H @ ravel_pytree(v)[0], rtol=1e-10)
