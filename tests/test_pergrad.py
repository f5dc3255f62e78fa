"""Per-example gradients (vmap, chunked), projections and the gradient store.

Oracles: a Python loop of single-example gradients (the PyTorch way), the
batch gradient (sum of per-example gradients), an explicitly materialised
projection matrix, and numpy for the store.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dataweights.configs import lm
from dataweights.methods import gradstore, pergrad
from dataweights.methods.projection import Projector, leaf_paths
from dataweights.models import transformer as tr
from dataweights.models.mlp import MLP, cross_entropy

# vmap and the loop are different XLA programs (batched vs unbatched
# matmuls); float32 sums reassociate, so allow a few ulps of the largest
# entry rather than bitwise equality.
RTOL, ATOL = 1e-5, 1e-7


def _mlp_problem(n=7, seed=0):
  model = MLP((5, 6, 3), rngs=nnx.Rngs(seed))
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  k1, k2 = jax.random.split(jax.random.key(seed + 1))
  batch = {
    "x_BxI": jax.random.normal(k1, (n, 5)),
    "y_B": jax.random.randint(k2, (n,), 0, 3),
  }
  loss = lambda p, b: cross_entropy(nnx.merge(gd, p, rest, copy=True), b)
  return loss, params, batch


def _lm_problem(n=5, length=12):
  cfg = lm.lm_model(
    "smoke", num_layers=1, d_model=16, num_heads=2, d_mlp=32, max_len=16
  )
  gd, params, rest = nnx.split(
    tr.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...
  )
  tok = jax.random.randint(jax.random.key(3), (n, length), 0, cfg.vocab_size)
  mask = jnp.ones((n, length), bool).at[1, 7:].set(False)
  batch = {"tokens_BxL": tok, "mask_BxL": mask}

  def loss(p, b):
    return tr.next_token_loss(
      nnx.merge(gd, p, rest, copy=True), b["tokens_BxL"], b["mask_BxL"]
    )

  return loss, params, batch


def _close(a, b, rtol=RTOL, atol=ATOL):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol
    )


def _fast(loss, params, batch, chunk):
  return jax.jit(
    lambda p, b: pergrad.per_example_grads(loss, p, b, chunk_size=chunk)
  )(params, batch)


@pytest.mark.parametrize(
  "problem,chunk",
  [
    (_mlp_problem, None),
    (_mlp_problem, 1),
    (_mlp_problem, 3),
    pytest.param(_lm_problem, 2, marks=pytest.mark.slow),
  ],
)
def test_vmap_equals_loop(problem, chunk):
  loss, params, batch = problem()
  fast = _fast(loss, params, batch, chunk)
  slow = pergrad.per_example_grads_loop(loss, params, batch)
  _close(fast, slow)


def test_per_example_grads_sum_to_batch_gradient():
  # Independent of the per-example machinery: one autodiff of the sum.
  loss, params, batch = _lm_problem()
  per = _fast(loss, params, batch, 2)
  total = jax.jit(jax.grad(lambda p: loss(p, batch).sum()))(params)
  _close(jax.tree.map(lambda x: x.sum(0), per), total, rtol=1e-5, atol=1e-6)


def test_examples_do_not_interact():
  # Changing example 1 must not change example 0's gradient (a bug that
  # mixes rows, e.g. a wrong chunk reshape, would).
  loss, params, batch = _mlp_problem()
  g = _fast(loss, params, batch, 3)
  batch2 = dict(batch, x_BxI=batch["x_BxI"].at[1].set(9.0))
  g2 = _fast(loss, params, batch2, 3)
  _close(jax.tree.map(lambda x: x[0], g), jax.tree.map(lambda x: x[0], g2))
  assert not np.allclose(
    pergrad.flatten_per_example(g)[1], pergrad.flatten_per_example(g2)[1]
  )


def test_bad_inputs():
  loss, params, batch = _mlp_problem()
  with pytest.raises(ValueError, match="chunk_size"):
    pergrad.per_example_grads(loss, params, batch, chunk_size=0)
  with pytest.raises(ValueError, match="same leading size"):
    pergrad.per_example_grads(
      loss, params, dict(batch, y_B=batch["y_B"][:3]), chunk_size=2
    )
  with pytest.raises(ValueError, match="per-example losses"):
    pergrad.per_example_grads(lambda p, b: loss(p, b).sum(), params, batch)


# ----------------------------------------------------------- projection --


def _tree():
  return {
    "a": jnp.zeros((3, 5)),  # 15 entries: two blocks of 8, one padded
    "b": {"c": jnp.zeros((4,)), "d": jnp.zeros((2, 2, 2))},
  }


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_rows_are_reproducible(kind):
  proj = Projector(dim=6, seed=3, kind=kind, block_rows=8)
  tree = _tree()
  r = np.asarray(proj.matrix(tree))
  assert r.shape == (15 + 4 + 8, 6)
  # Row by row, in any order, from a fresh projector object.
  again = Projector(dim=6, seed=3, kind=kind, block_rows=8)
  paths = leaf_paths(tree)
  offsets = np.cumsum(
    [0] + [int(np.prod(x.shape)) for x in jax.tree.leaves(tree)]
  )
  for li in (2, 0, 1):
    for row in (offsets[li + 1] - offsets[li] - 1, 0):
      np.testing.assert_array_equal(
        np.asarray(again.rows(paths[li], row, row + 1))[0], r[offsets[li] + row]
      )
  # Projecting a unit vector picks that row.
  flat_unit = np.zeros(r.shape[0], np.float32)
  flat_unit[17] = 1.0
  _, unravel = jax.flatten_util.ravel_pytree(tree)
  np.testing.assert_allclose(
    proj.project(unravel(jnp.asarray(flat_unit))), r[17]
  )
  # A different seed gives a different matrix.
  assert not np.allclose(
    Projector(dim=6, seed=4, kind=kind, block_rows=8).matrix(tree), r
  )


def test_projection_equals_explicit_matmul_and_ignores_other_leaves():
  proj = Projector(dim=16, seed=0, block_rows=4)
  tree = _tree()
  g = jax.tree.map(
    lambda x: jax.random.normal(jax.random.key(x.size), (7,) + x.shape), tree
  )
  flat = np.asarray(pergrad.flatten_per_example(g))
  want = flat @ np.asarray(proj.matrix(tree))
  np.testing.assert_allclose(proj.project_batch(g), want, rtol=1e-5, atol=1e-5)
  # The rows of leaf "a" do not depend on the other leaves being there.
  only_a = {"a": g["a"]}
  want_a = flat[:, :15] @ np.asarray(proj.matrix(tree))[:15]
  np.testing.assert_allclose(
    proj.project_batch(only_a), want_a, rtol=1e-5, atol=1e-5
  )


def test_rademacher_entries_and_norm_preservation():
  d = 512
  proj = Projector(dim=d, seed=1)
  tree = {"w": jnp.zeros((300,))}
  r = np.asarray(proj.matrix(tree))
  np.testing.assert_allclose(np.abs(r), 1 / np.sqrt(d), rtol=1e-6)
  # JL: squared norms are preserved to within a few 1/sqrt(d) (statistical
  # margin: the relative error has standard deviation sqrt(2/d) = 0.0625).
  x = jax.random.normal(jax.random.key(0), (20, 300))
  y = proj.project_batch({"w": x})
  ratio = np.sum(np.asarray(y) ** 2, 1) / np.sum(np.asarray(x) ** 2, 1)
  assert np.all(np.abs(ratio - 1) < 0.3)
  assert abs(ratio.mean() - 1) < 0.1


def test_projector_bad_config():
  with pytest.raises(ValueError, match="kind"):
    Projector(dim=4, kind="sparse")
  with pytest.raises(ValueError, match="dim"):
    Projector(dim=0)


# ---------------------------------------------------------------- store --


def test_store_roundtrip_and_streaming_matmul(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(23, 8)).astype(np.float32)
  st = gradstore.GradientStore.create(tmp_path / "s", 23, 8, meta={"seed": 3})
  for start in range(0, 23, 5):
    st.append(x[start : start + 5])
  st = st.close()
  assert st.meta == {"seed": 3} and st.num_rows == 23 and st.dim == 8
  np.testing.assert_allclose(st.read(), x, rtol=1e-3, atol=1e-3)  # float16
  stored = st.read()
  v = rng.normal(size=(8, 3)).astype(np.float32)
  np.testing.assert_allclose(
    st.matmul(v, chunk_rows=4), stored @ v, rtol=1e-5, atol=1e-5
  )
  unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
  np.testing.assert_allclose(
    st.matmul(v[:, 0], chunk_rows=7, normalize=True),
    unit @ v[:, 0],
    rtol=1e-5,
    atol=1e-5,
  )
  again = gradstore.GradientStore.open(tmp_path / "s")
  np.testing.assert_array_equal(again.read(), stored)


def test_store_errors(tmp_path):
  st = gradstore.GradientStore.create(tmp_path / "s", 4, 2, dtype="float32")
  st.append(np.ones((3, 2)))
  with pytest.raises(gradstore.StoreError, match="incomplete"):
    gradstore.GradientStore.open(tmp_path / "s")
  with pytest.raises(gradstore.StoreError, match="overflows"):
    st.append(np.ones((2, 2)))
  with pytest.raises(gradstore.StoreError, match="width"):
    st.append(np.ones((1, 3)))
  with pytest.raises(gradstore.StoreError, match="1 of|3 of"):
    st.close()
  with pytest.raises(gradstore.StoreError, match="already holds"):
    gradstore.GradientStore.create(tmp_path / "s", 4, 2)
  with pytest.raises(gradstore.StoreError, match="no gradient store"):
    gradstore.GradientStore.open(tmp_path / "nothing")
  with pytest.raises(gradstore.StoreError, match="dtype"):
    gradstore.GradientStore.create(tmp_path / "t", 4, 2, dtype="int8")
