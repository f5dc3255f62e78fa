"""K-FAC / EK-FAC factors and damped inverses against dense oracles (float64).

Oracles: the exact empirical Fisher built from per-example gradients
(``jax.vmap(jax.grad)``, independent of the layer taps) and dense linear
algebra (``np.kron``, ``np.linalg.solve``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights.configs import lm
from dataweights.methods import kfac, pergrad
from dataweights.models import transformer as tr
from dataweights.models.mlp import MLP, cross_entropy


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def sq_loss(model, batch):
  r = model(batch["x_BxI"]) - batch["t_BxO"]
  return 0.5 * jnp.sum(r**2, -1)


def _linear(sizes=(3, 2), seed=0, zero=False):
  model = MLP(sizes, rngs=nnx.Rngs(seed), param_dtype=jnp.float64)
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  if zero:
    params = jax.tree.map(jnp.zeros_like, params)
  return model, gd, params, rest


def _exact_fisher(loss, gd, params, rest, batch, path):
  lp = lambda p, b: loss(nnx.merge(gd, p, rest, copy=True), b)
  g = pergrad.per_example_grads(lp, params, batch)
  dw = np.asarray(kfac.layer_param_grads(g, path))  # N x I x O
  flat = dw.reshape(dw.shape[0], -1)  # row-major vec
  return flat.T @ flat / flat.shape[0], dw


def _stats_fn(loss, gd, params, rest, layers):
  return jax.jit(lambda b: kfac.layer_stats(loss, gd, params, rest, b, layers))


def _product_batch(rng, n_x=4, n_t=5, d_in=3, d_out=2):
  xs = rng.normal(size=(n_x, d_in))
  ts = rng.normal(size=(n_t, d_out))
  x = np.repeat(xs, n_t, axis=0)
  t = np.tile(ts, (n_x, 1))
  return {"x_BxI": jnp.asarray(x), "t_BxO": jnp.asarray(t)}


def test_kfac_is_the_exact_fisher_for_one_linear_layer():
  # At W = 0 the output gradient of 0.5||Wx + b - t||^2 is -t; on the
  # product data set {(x_i, t_j)} inputs and output gradients are
  # independent, so E[(a a^T) (x) (g g^T)] = E[a a^T] (x) E[g g^T] exactly.
  _, gd, params, rest = _linear(zero=True)
  batch = _product_batch(np.random.default_rng(0))
  f_exact, _ = _exact_fisher(sq_loss, gd, params, rest, batch, "layers/0")
  fit = kfac.fit_kfac(
    _stats_fn(sq_loss, gd, params, rest, ["layers/0"]), [batch]
  )
  np.testing.assert_allclose(
    fit.dense("layers/0"), f_exact, rtol=1e-12, atol=1e-12
  )
  # Splitting the data into batches changes nothing.
  half = (
    {k: v[:10] for k, v in batch.items()},
    {k: v[10:] for k, v in batch.items()},
  )
  fit2 = kfac.fit_kfac(
    _stats_fn(sq_loss, gd, params, rest, ["layers/0"]), list(half)
  )
  np.testing.assert_allclose(
    fit2.dense("layers/0"), f_exact, rtol=1e-12, atol=1e-12
  )


def test_kfac_differs_from_fisher_when_inputs_and_gradients_correlate():
  # The negative control: the same layer on data where t depends on x.
  _, gd, params, rest = _linear(zero=True)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(20, 3))
  batch = {"x_BxI": jnp.asarray(x), "t_BxO": jnp.asarray(x[:, :2] * 3)}
  f_exact, _ = _exact_fisher(sq_loss, gd, params, rest, batch, "layers/0")
  fit = kfac.fit_kfac(
    _stats_fn(sq_loss, gd, params, rest, ["layers/0"]), [batch]
  )
  assert np.abs(fit.dense("layers/0") - f_exact).max() > 0.1


def _mlp_case():
  _, gd, params, rest = _linear((4, 5, 3), seed=2)
  rng = np.random.default_rng(2)
  batch = {
    "x_BxI": jnp.asarray(rng.normal(size=(30, 4))),
    "y_B": jnp.asarray(rng.integers(0, 3, 30)),
  }
  return gd, params, rest, batch


def test_ekfac_eigenvalues_and_frobenius_optimality():
  gd, params, rest, batch = _mlp_case()
  for path in ("layers/0", "layers/1"):
    f_exact, _ = _exact_fisher(cross_entropy, gd, params, rest, batch, path)
    fit = kfac.fit_kfac(
      _stats_fn(cross_entropy, gd, params, rest, [path]), [batch]
    )
    q = np.kron(np.asarray(fit.vec_A[path]), np.asarray(fit.vec_G[path]))
    # s is the diagonal of the exact Fisher in the K-FAC eigenbasis.
    np.testing.assert_allclose(
      np.asarray(fit.s[path]).ravel(),
      np.diag(q.T @ f_exact @ q),
      rtol=1e-9,
      atol=1e-12,
    )
    ekfac = q @ np.diag(np.asarray(fit.s[path]).ravel()) @ q.T
    err_e = np.linalg.norm(ekfac - f_exact)
    err_k = np.linalg.norm(fit.dense(path) - f_exact)
    assert err_e <= err_k + 1e-12


@pytest.mark.parametrize("method", ["kfac", "kfac_factored", "ekfac"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
def test_ihvp_equals_dense_solve(method, lam):
  gd, params, rest, batch = _mlp_case()
  # Softmax output gradients sum to zero, so layer 1's G is singular: the
  # undamped inverse is only defined for the hidden layer.
  path = "layers/0" if lam == 0.0 else "layers/1"
  fit = kfac.fit_kfac(
    _stats_fn(cross_entropy, gd, params, rest, [path]), [batch]
  )
  A, G = np.asarray(fit.A[path]), np.asarray(fit.G[path])
  v = np.random.default_rng(3).normal(size=A.shape[:1] + G.shape[:1])
  if method == "kfac":
    dense = np.kron(A, G) + lam * np.eye(A.shape[0] * G.shape[0])
    want = np.linalg.solve(dense, v.ravel())
  elif method == "kfac_factored":
    pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
    a = A + pi * np.sqrt(lam) * np.eye(A.shape[0])
    g = G + np.sqrt(lam) / pi * np.eye(G.shape[0])
    want = np.linalg.solve(np.kron(a, g), v.ravel())
  else:
    q = np.kron(np.asarray(fit.vec_A[path]), np.asarray(fit.vec_G[path]))
    dense = q @ np.diag(np.asarray(fit.s[path]).ravel()) @ q.T
    want = np.linalg.solve(dense + lam * np.eye(dense.shape[0]), v.ravel())
  got = kfac.ihvp(fit, {path: jnp.asarray(v)}, lam, method)[path]
  np.testing.assert_allclose(
    np.asarray(got).ravel(), want, rtol=1e-7, atol=1e-9
  )


@pytest.mark.parametrize("method", ["kfac", "kfac_factored", "ekfac"])
def test_damping_behaves_as_documented(method):
  gd, params, rest, batch = _mlp_case()
  path = "layers/0"
  fit = kfac.fit_kfac(
    _stats_fn(cross_entropy, gd, params, rest, [path]), [batch]
  )
  v = jnp.asarray(
    np.random.default_rng(4).normal(
      size=fit.A[path].shape[:1] + fit.G[path].shape[:1]
    )
  )
  norms = [
    float(jnp.linalg.norm(kfac.ihvp(fit, {path: v}, lam, method)[path]))
    for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
  ]
  assert all(a > b for a, b in zip(norms, norms[1:]))  # more damping, smaller
  # lam (F + lam I)^{-1} v -> v; the factored form converges at the rate
  # 1/sqrt(lam) (its damping is split over the factors), the others 1/lam.
  big = 1e10
  got = big * kfac.ihvp(fit, {path: v}, big, method)[path]
  assert float(jnp.abs(got - v).max()) < 1e-3 * float(jnp.abs(v).max())
  with pytest.raises(ValueError, match="damping"):
    kfac.ihvp(fit, {path: v}, -1.0, method)


@pytest.mark.slow
def test_taps_give_per_example_gradients_of_a_transformer():
  # Sequences: dW_n = sum_t a_nt g_nt^T must equal autodiff per example.
  cfg = lm.lm_model(
    "smoke",
    num_layers=2,
    d_model=16,
    num_heads=2,
    d_mlp=24,
    max_len=16,
    remat="none",
  )
  gd, params, rest = nnx.split(
    tr.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...
  )
  params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
  tok = jax.random.randint(jax.random.key(1), (3, 10), 0, cfg.vocab_size)
  batch = {"tokens_BxL": tok}
  loss = lambda m, b: tr.next_token_loss(m, b["tokens_BxL"])
  layers = ["blocks/0/mlp/fc", "blocks/1/mlp/proj"]
  st = jax.jit(lambda p: kfac.layer_stats(loss, gd, p, rest, batch, layers))(
    params
  )
  lp = lambda p, b: loss(nnx.merge(gd, p, rest, copy=True), b)
  per = jax.jit(lambda p: pergrad.per_example_grads(lp, p, batch))(params)
  for path in layers:
    np.testing.assert_allclose(
      st.example_grads(path),
      kfac.layer_param_grads(per, path),
      rtol=1e-5,
      atol=1e-9,
    )
  assert st.a[layers[0]].shape == (3, 9, 17) and st.g[layers[0]].shape == (
    3,
    9,
    24,
  )


def test_layer_errors():
  model, gd, params, rest = _linear((3, 4, 2))
  with pytest.raises(
    kfac.LayerError, match=r"'layers/7' does not exist.*'layers/0', 'layers/1'"
  ):
    kfac.get_layer(model, "layers/7")
  with pytest.raises(kfac.LayerError, match="does not exist"):
    kfac.check_layers(model, ["decoder/fc"])
  with pytest.raises(kfac.LayerError, match="no layers"):
    kfac.check_layers(model, [])
  cfg = lm.lm_model(
    "smoke",
    num_layers=1,
    d_model=16,
    num_heads=2,
    d_mlp=24,
    max_len=16,
    remat="none",
  )
  t = tr.Transformer(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(kfac.LayerError, match="not a linear layer"):
    kfac.get_layer(t, "blocks/0/attn/query")
  assert kfac.check_layers(t, ["blocks/0/mlp/fc"]) == ("blocks/0/mlp/fc",)
  # A rematerialised or scanned model cannot be tapped: a clear error, not a
  # tracer leak from inside jax.checkpoint.
  for kw in ({"remat": "full"}, {"scan_layers": True}):
    other = tr.Transformer(dataclasses.replace(cfg, **kw), rngs=nnx.Rngs(0))
    with pytest.raises(kfac.LayerError, match="remat|scan_layers"):
      kfac.check_layers(other, ["blocks/0/mlp/fc"])
  fit = kfac.fit_kfac(
    _stats_fn(sq_loss, gd, params, rest, ["layers/0"]),
    [{"x_BxI": jnp.ones((2, 3)), "t_BxO": jnp.ones((2, 2))}],
    ekfac=False,
  )
  with pytest.raises(ValueError, match="ekfac=True"):
    kfac.ihvp(fit, {"layers/0": jnp.ones((4, 4))}, 0.5, "ekfac")
  with pytest.raises(kfac.LayerError, match="no factors"):
    kfac.ihvp(fit, {"layers/1": jnp.ones((5, 2))}, 0.5, "kfac")
  with pytest.raises(ValueError, match="method"):
    kfac.ihvp(fit, {"layers/0": jnp.ones((4, 4))}, 0.5, "newton")
