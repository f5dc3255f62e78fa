"""Property tests of the methods' public functions: simplex maps, run_mixing.

* ``project_simplex`` of any finite float32 vector is on the simplex, and
  (for moderate magnitudes) equals an independent float64 sort-based
  projection (Duchi et al. 2008) in numpy.
* ``eg_update`` / ``projected_update`` of a point of the simplex, any finite
  hypergradient and any finite step size > 0 stay on the simplex, finite;
  ``eg_update`` keeps zero weights at zero. Bad shapes or step sizes raise
  ``SimplexError`` naming them; ``check_simplex`` returns or raises it.
* ``run_mixing`` / ``train_fixed`` / ``uniform_weights`` /
  ``natural_weights`` with random arguments on a small quadratic problem:
  a finite trace, or ``MixingError`` naming the argument, or
  ``NonFiniteHypergradientError`` when the run diverges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dataweights.errors import WeightsError
from dataweights.methods import bilevel, mixing, simplex
from dataweights.methods.mixing import MixingError, NonFiniteHypergradientError
from props import anything, examples, faulty_args, outcome

F32_MAX = float(np.finfo(np.float32).max)
f32 = st.floats(-F32_MAX, F32_MAX, width=32)


def _np_projection(v):
  """Euclidean projection onto the simplex (sort-based, float64)."""
  v = np.asarray(v, np.float64)
  u = np.sort(v)[::-1]
  css = np.cumsum(u) - 1.0
  rho = np.nonzero(u - css / np.arange(1, v.size + 1) > 0)[0][-1]
  return np.maximum(v - css[rho] / (rho + 1), 0.0)


def _on_simplex(w, atol=1e-5):
  w = np.asarray(w, np.float64)
  return np.isfinite(w).all() and (w >= 0).all() and abs(w.sum() - 1) <= atol


simplex_points = (
  st.lists(st.floats(0, 1) | st.just(0.0), min_size=1, max_size=6)
  .filter(lambda w: sum(w) > 0)
  .map(lambda w: np.asarray(w) / np.sum(w))
)


@examples(80)
@given(v=st.lists(f32, min_size=1, max_size=8))
def test_project_simplex_lands_on_the_simplex(v):
  w = simplex.project_simplex(jnp.asarray(v, jnp.float32))
  assert _on_simplex(w), (v, w)
  if max(abs(x) for x in v) <= 1e3:
    np.testing.assert_allclose(w, _np_projection(v), atol=1e-5)


@examples(40)
@given(v=anything)
def test_project_simplex_bad_input_names_the_shape(v):
  try:
    with np.errstate(over="ignore"):
      arr = np.asarray(v, np.float32)
  except (TypeError, ValueError):
    return  # not numeric at all: jnp.asarray refuses it itself
  assume(arr.ndim != 1 or arr.size == 0)
  with pytest.raises(simplex.SimplexError, match="shape"):
    simplex.project_simplex(arr)


@examples(80)
@given(
  w=simplex_points,
  data=st.data(),
  beta=st.floats(1e-30, 1e30) | st.floats(0.01, 10),
  update=st.sampled_from(["eg", "pgd"]),
)
def test_outer_updates_stay_on_the_simplex(w, data, beta, update):
  h = np.asarray(
    data.draw(st.lists(f32, min_size=len(w), max_size=len(w))), np.float32
  )
  fn = simplex.eg_update if update == "eg" else simplex.projected_update
  out = np.asarray(fn(jnp.asarray(w, jnp.float32), jnp.asarray(h), beta))
  assert _on_simplex(out, atol=1e-4), (w, h, beta, out)
  if update == "eg":
    assert (out[w == 0] == 0).all()


@examples(40)
@given(w=anything | st.lists(st.floats(-1, 2), max_size=4), beta=anything)
def test_check_simplex_and_bad_step_sizes_raise_simplex_error(w, beta):
  try:
    out = simplex.check_simplex(w)
  except simplex.SimplexError as e:
    outcome("check_simplex: SimplexError")
    assert "weights" in str(e)
  else:
    outcome("check_simplex: accepted")
    assert _on_simplex(out)
  try:
    simplex.eg_update(jnp.ones(2) / 2, jnp.zeros(2), beta)
  except simplex.SimplexError as e:
    assert "beta" in str(e)


# --- run_mixing on a quadratic --------------------------------------------------

C_KxD = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
C_VAL = jnp.asarray([0.5, 0.2])
PROBLEM = bilevel.MixingProblem(
  domain_losses=lambda p, b: 0.5 * jnp.sum((p[None] - C_KxD) ** 2, -1),
  val_loss=lambda p, b: 0.5 * jnp.sum((p - C_VAL) ** 2),
)
P0 = jnp.zeros(2)


MIXING_VALID = dict(
  T=st.integers(1, 3),
  N=st.integers(3, 7),
  lr=st.floats(1e-3, 1.5),
  beta=st.floats(1e-3, 1e3),
  outer=st.sampled_from(["eg", "pgd"]),
  hypergrad=st.sampled_from(["forward", "reverse"]),
  w0_K=st.sampled_from([[1 / 3] * 3, [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]),
  normalize=st.booleans(),
)
MIXING_BAD = dict(
  T=st.integers(-1, 0) | anything,
  N=st.integers(-1, 0) | anything,
  lr=st.floats(-1, 0) | st.floats(10, 1e30) | anything,
  beta=st.floats(-1, 0) | anything,
  outer=anything,
  hypergrad=anything,
  w0_K=st.lists(st.floats(-1, 2), max_size=4) | anything,
)


@pytest.mark.slow
@examples(40)
@given(case=faulty_args(MIXING_VALID, MIXING_BAD))
def test_run_mixing_finite_or_names_the_argument(case):
  kwargs, faulty = case
  w0_K = kwargs.pop("w0_K")
  try:
    trace = mixing.run_mixing(PROBLEM, P0, w0_K, **kwargs)
  except (MixingError, WeightsError) as e:
    outcome("MixingError")
    assert any(k in str(e) for k in [*kwargs, "w0_K"]), str(e)
    assert faulty, (kwargs, w0_K, str(e))
    return
  except NonFiniteHypergradientError as e:
    outcome("NonFiniteHypergradientError")
    assert "beta" in str(e) and "lr" in str(e)
    return
  outcome("finite trace")
  R = kwargs["N"] // kwargs["T"]
  assert trace.w_RxK.shape == (R + 1, 3) and trace.h_RxK.shape == (R, 3)
  for w in np.asarray(trace.w_RxK):
    assert _on_simplex(w, atol=1e-4)
  assert np.isfinite(np.asarray(trace.val_loss_R1)).all()


@examples(30)
@given(
  case=faulty_args(
    dict(
      N=st.integers(1, 6),
      lr=st.floats(1e-3, 1.0),
      w_K=st.sampled_from([[1 / 3] * 3, [0.2, 0.3, 0.5]]),
      eval_every=st.none() | st.just(1),
    ),
    dict(
      N=st.integers(-1, 0) | anything,
      lr=st.floats(-1, 0) | anything,
      w_K=st.lists(st.floats(-1, 2), max_size=4) | anything,
      eval_every=st.integers(-1, 4) | anything,
    ),
  )
)
def test_train_fixed_finite_or_names_the_argument(case):
  kwargs, faulty = case
  w_K = kwargs.pop("w_K")
  try:
    params, val = mixing.train_fixed(PROBLEM, P0, w_K, **kwargs)
  except (MixingError, WeightsError) as e:
    outcome("MixingError")
    assert any(k in str(e) for k in ("N", "lr", "w_K", "eval_every")), str(e)
    assert faulty, str(e)
    return
  outcome("finite")
  assert np.isfinite(np.asarray(params)).all()
  assert np.isfinite(np.asarray(val)).all()


@examples(40)
@given(
  k=st.integers(-2, 6) | anything, counts=anything | st.lists(f32, max_size=4)
)
def test_weight_baselines_or_mixing_error(k, counts):
  try:
    w = mixing.uniform_weights(k)
  except (MixingError, WeightsError) as e:
    outcome("uniform_weights: MixingError")
    assert "K" in str(e)
  else:
    outcome("uniform_weights: ok")
    assert _on_simplex(w)
  try:
    w = mixing.natural_weights(counts)
  except (MixingError, WeightsError) as e:
    outcome("natural_weights: MixingError")
    assert "counts_K" in str(e)
  else:
    outcome("natural_weights: ok")
    assert _on_simplex(w)


def test_hypergradients_reject_bad_horizons():
  """The lower-level bilevel functions name T (their ValueError)."""
  for T in (0, -1, 1.5, True, "2"):
    with pytest.raises(ValueError, match="T = "):
      bilevel.hypergrad_forward(PROBLEM, P0, jnp.ones(3) / 3, lr=0.1, T=T)
    with pytest.raises(ValueError, match="T = "):
      bilevel.inner_steps(PROBLEM, P0, jnp.ones(3) / 3, lr=0.1, T=T)
  jax.block_until_ready(
    bilevel.hypergrad_reverse(PROBLEM, P0, jnp.ones(3) / 3, lr=0.1, T=2)
  )
