"""``mode="auto"`` for the finite-horizon hypergradient.

The choice follows the documented cost model in clear-cut cases, and
whatever it picks gives the same hypergradient as every explicit mode
(float64, so the comparison is tight) and as central finite differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataweights.methods import bilevel, mixing


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _mlp(K=2, M=256, D=32, H=32, seed=0):
  """A tanh MLP on M examples per domain: many activations per FLOP."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(K, M, D)))
  y = jnp.asarray(np.sin(rng.normal(size=(K, M))))
  xv, yv = x[0, :16], y[0, :16]
  params = {
    "W": jnp.asarray(rng.normal(size=(D, H)) / np.sqrt(D)),
    "v": jnp.asarray(rng.normal(size=H) / np.sqrt(H)),
  }
  f = lambda p, x: jnp.tanh(x @ p["W"]) @ p["v"]
  domain = lambda p, b: jax.vmap(lambda a, t: jnp.mean((f(p, a) - t) ** 2))(
    x, y
  )
  val = lambda p, b: jnp.mean((f(p, xv) - yv) ** 2)
  return bilevel.MixingProblem(domain, val), params


def _logistic(K=4, M=128, D=512, seed=0):
  """Logistic regression: a matrix-vector step, tiny residuals."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(K, M, D)))
  y = jnp.asarray((rng.uniform(size=(K, M)) < 0.5) * 1.0)
  nll = lambda w, x, y: jnp.mean(jnp.logaddexp(0.0, x @ w) - y * (x @ w))
  domain = lambda p, b: jax.vmap(lambda a, t: nll(p["w"], a, t))(x, y)
  val = lambda p, b: nll(p["w"], x[0, :32], y[0, :32])
  return bilevel.MixingProblem(domain, val), {"w": jnp.zeros(D)}


def _choose(problem, params, K, T, budget=None, cache=None):
  return bilevel.choose_hypergrad_mode(
    problem,
    params,
    jnp.full((K,), 1.0 / K),
    lr=0.05,
    T=T,
    memory_budget_bytes=budget,
    data_cache_bytes=cache,
  )


def test_auto_for_a_matrix_vector_step_in_cache():
  problem, params = _logistic()
  data = 4 * 128 * 512 * 4  # x, float32; y adds 2 KiB
  choice = _choose(problem, params, K=4, T=100, cache=4 * data)
  assert data < choice.data_bytes < data + 4096
  assert choice.cache_bytes == 4 * data
  # residuals: a few K x M vectors, far below the intensity threshold
  assert choice.residual_bytes < 0.02 * choice.step_flops
  # few FLOPs per byte, but the data fit in the cache: every direction costs
  # one step, and reverse mode (2 steps) wins for every K >= 2
  assert choice.step_flops < 4 * choice.data_bytes
  assert choice.time_steps["forward"] == pytest.approx(1 + 1.0 * 4)
  assert choice.traced_data_bytes == 0  # closed-over constants
  assert choice.mode == "reverse", choice
  for K in (2, 8):
    assert _choose(*_logistic(K=K), K=K, T=100, cache=4 * data).mode == (
      "reverse"
    )


@pytest.mark.parametrize(
  ("K", "forward_steps", "mode"),
  # max(2, 1 + 0.2 K): the two sweeps of the data bound forward mode up to
  # K = 5; it ties reverse mode's 2 steps and wins on memory; K = 8 costs
  # 2.6 steps, reverse
  [(2, 2.0, "forward"), (4, 2.0, "forward"), (8, 2.6, "reverse")],
)
def test_auto_for_a_matrix_vector_step_streaming_its_data(
  K, forward_steps, mode
):
  problem, params = _logistic(K=K)
  choice = _choose(problem, params, K=K, T=100, cache=1 << 16)
  assert choice.data_bytes > choice.cache_bytes == 1 << 16
  assert choice.time_steps["forward"] == pytest.approx(forward_steps)
  assert choice.time_steps["reverse"] == 2.0
  assert choice.mode == mode, choice


def _logistic_builder(K, M=128, D=256, seed=0):
  """Logistic regression built from data passed in, e.g. as jit arguments."""
  rng = np.random.default_rng(seed)
  data = (
    jnp.asarray(rng.normal(size=(K, M, D))),
    jnp.asarray((rng.uniform(size=(K, M)) < 0.5) * 1.0),
  )

  def build(data):
    x, y = data
    nll = lambda w, x, y: jnp.mean(jnp.logaddexp(0.0, x @ w) - y * (x @ w))
    domain = lambda p, b: jax.vmap(lambda a, t: nll(p["w"], a, t))(x, y)
    val = lambda p, b: nll(p["w"], x[0, :32], y[0, :32])
    return bilevel.MixingProblem(domain, val)

  return build, data, {"w": jnp.zeros(D)}


@pytest.mark.parametrize("K", [2, 8])
def test_traced_data_charge_reverse_mode_its_transposes(K):
  build, data, params = _logistic_builder(K)
  w = jnp.full((K,), 1.0 / K)
  choose = lambda d: bilevel.choose_hypergrad_mode(
    build(d), params, w, lr=0.05, T=100, data_cache_bytes=1 << 30
  )
  const = choose(data)
  seen = {}

  def traced(d):
    seen["choice"] = choose(d)
    return 0.0

  jax.jit(traced)(data)
  choice = seen["choice"]
  assert const.traced_data_bytes == 0
  # the data, traced; the weights w_K (closed over by the step) are not
  assert choice.traced_data_bytes == sum(a.nbytes for a in data)
  assert (
    choice.data_bytes
    == const.data_bytes
    == sum(a.nbytes for a in data) + w.nbytes
  )
  extra = 8.0 if jax.default_backend() == "cpu" else 0.0
  assert choice.time_steps["reverse"] == const.time_steps["reverse"] + extra
  assert choice.time_steps["reverse_remat"] == (
    const.time_steps["reverse_remat"] + extra
  )
  assert choice.time_steps["forward"] == const.time_steps["forward"]
  assert const.mode == "reverse"
  # in cache: forward 1 + K = 3 or 9 steps against reverse's 10
  assert choice.mode == ("forward" if extra else "reverse"), choice


def test_auto_on_traced_data_equals_reverse_mode(x64):
  build, data, params = _logistic_builder(2, M=16, D=8)
  w = jnp.array([0.3, 0.7])
  hg = lambda mode: jax.jit(
    lambda d: bilevel.hypergrad(build(d), params, w, lr=0.1, T=5, mode=mode)
  )(data)
  h_auto, th_auto = hg("auto")
  h_rev, th_rev = hg("reverse")
  np.testing.assert_allclose(h_auto, h_rev, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(th_auto["w"], th_rev["w"], rtol=1e-10)
  assert np.abs(h_rev).max() > 1e-4


def test_the_mlp_is_not_data_bound_whatever_the_cache():
  # many FLOPs per byte: the cache does not enter; 1 + 1.5 K
  for cache in (1 << 10, 1 << 30):
    choice = _choose(*_mlp(), K=2, T=100, cache=cache)
    assert choice.step_flops > 4 * choice.data_bytes
    assert choice.time_steps["forward"] == pytest.approx(4.0)


def _fake_cache(root, entries):
  for i, (level, kind, size) in enumerate(entries):
    d = root / f"index{i}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")
  return str(root)


@pytest.mark.parametrize(
  ("entries", "expected"),
  [
    (
      [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K")],
      2 << 20,
    ),
    ([(2, "Unified", "1M"), (3, "Unified", "480M")], 1 << 20),
    ([(2, "Data", "512K")], 512 << 10),
    ([(1, "Data", "48K"), (3, "Unified", "30M")], None),  # no level 2
    ([(2, "Instruction", "1M")], None),  # not a data cache
    ([(2, "Unified", "abc")], None),
    ([(2, "Unified", "0K")], None),
    ([(2, "Unified", "12T")], None),
  ],
)
def test_core_cache_bytes_reads_sysfs(tmp_path, entries, expected):
  assert bilevel.core_cache_bytes(_fake_cache(tmp_path, entries)) == expected


def test_core_cache_bytes_without_sysfs(tmp_path):
  assert bilevel.core_cache_bytes(str(tmp_path / "missing")) is None
  found = bilevel.core_cache_bytes()
  default = bilevel.default_data_cache_bytes()
  assert default == (bilevel.CACHE_BYTES if found is None else found)
  assert _choose(*_logistic(K=2), K=2, T=10).cache_bytes == default


@pytest.mark.parametrize("make", [_mlp, _logistic])
@pytest.mark.parametrize("K", [2, 8])
def test_auto_single_step_is_reverse(make, K):
  # theta_0 does not depend on w: one backward pass w.r.t. w, no HVP
  choice = _choose(*make(K=K), K=K, T=1)
  assert choice.mode == "reverse", choice
  assert choice.time_steps["reverse"] < choice.time_steps["reverse_remat"]
  assert choice.time_steps["reverse"] < choice.time_steps["forward"]


def test_auto_picks_remat_when_residuals_dominate():
  choice = _choose(*_mlp(), K=2, T=100)
  assert choice.mode == "reverse_remat", choice
  assert choice.residual_bytes > 0.02 * choice.step_flops
  # with a single step the residuals stay in cache: plain reverse
  assert _choose(*_mlp(), K=2, T=1).mode == "reverse"


def test_auto_picks_forward_under_a_tight_memory_budget():
  problem, params = _logistic()
  P = 512 * 4  # float32 parameters
  # T = 1000 copies of theta do not fit; (K + 2) copies do
  choice = _choose(problem, params, K=4, T=1000, budget=100 * P)
  assert choice.mode == "forward", choice
  assert choice.feasible == ("forward",)
  # nothing fits: the smallest memory (forward), said so
  tiny = _choose(problem, params, K=4, T=1000, budget=P)
  assert tiny.mode == "forward" and "no mode fits" in tiny.reason


def test_many_domains_prefer_reverse_modes():
  choice = _choose(*_logistic(K=8), K=8, T=10)
  assert choice.time_steps["forward"] > choice.time_steps[choice.mode]
  assert choice.mode in ("reverse", "reverse_remat")


@pytest.mark.parametrize("make", [_mlp, _logistic])
def test_auto_equals_every_explicit_mode(x64, make):
  problem, params = make()
  params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
  K = 2 if make is _mlp else 4
  w = jnp.full((K,), 1.0 / K)
  T = 7
  h = {
    mode: jax.jit(
      lambda p, w, mode=mode: bilevel.hypergrad(
        problem, p, w, lr=0.05, T=T, mode=mode
      )
    )(params, w)
    for mode in ("auto",) + bilevel.HYPERGRAD_MODES
  }
  for mode, (h_K, theta) in h.items():
    np.testing.assert_allclose(h_K, h["forward"][0], rtol=1e-10, atol=1e-14)
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(h["forward"][1])):
      np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=mode)
  # and an independent oracle: central differences of g(theta_T(w))
  g = lambda w: problem.val_loss(
    bilevel.inner_steps(problem, params, w, lr=0.05, T=T), None
  )
  eps = 1e-6
  fd = [(g(w + eps * e) - g(w - eps * e)) / (2 * eps) for e in jnp.eye(K)]
  np.testing.assert_allclose(h["auto"][0], fd, rtol=1e-6, atol=1e-10)


def test_run_mixing_auto_equals_explicit_modes(x64):
  problem, params = _logistic(K=2, D=64)
  params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
  kw = dict(lr=0.05, T=5, N=15, beta=0.5)
  w0 = jnp.array([0.5, 0.5])
  auto = mixing.run_mixing(problem, params, w0, hypergrad="auto", **kw)
  for mode in ("forward", "reverse", "reverse_remat"):
    tr = mixing.run_mixing(problem, params, w0, hypergrad=mode, **kw)
    np.testing.assert_allclose(auto.h_RxK, tr.h_RxK, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(auto.w_RxK, tr.w_RxK, rtol=1e-12)
  assert np.abs(np.asarray(auto.h_RxK)).max() > 0


def test_bad_mode_and_budget_raise():
  problem, params = _logistic(K=2, D=8)
  w = jnp.array([0.5, 0.5])
  with pytest.raises(ValueError, match="mode = 'fast' is invalid"):
    bilevel.hypergrad(problem, params, w, lr=0.1, T=2, mode="fast")
  with pytest.raises(ValueError, match="memory_budget_bytes = -1 is invalid"):
    bilevel.choose_hypergrad_mode(
      problem, params, w, lr=0.1, T=2, memory_budget_bytes=-1
    )
  for bad in (0, 2.5, True, "1M"):
    with pytest.raises(ValueError, match=f"data_cache_bytes = {bad!r} is"):
      bilevel.choose_hypergrad_mode(
        problem, params, w, lr=0.1, T=2, data_cache_bytes=bad
      )
  with pytest.raises(mixing.MixingError, match="hypergrad = 'fast'"):
    mixing.run_mixing(
      problem, params, w, lr=0.1, T=2, N=2, beta=0.1, hypergrad="fast"
    )
  with pytest.raises(mixing.MixingError, match="memory_budget_bytes = 0"):
    mixing.run_mixing(
      problem,
      params,
      w,
      lr=0.1,
      T=2,
      N=2,
      beta=0.1,
      hypergrad="auto",
      memory_budget_bytes=0,
    )
