"""K-FAC and EK-FAC curvature of chosen linear layers, and their inverses.

G-DIG (Pan et al., 2024; xypan0/G-DIG ``kfac_mapper.py``,
``query_loss_mapper.py``) scores candidates by an influence function whose
Hessian is the empirical Fisher of a few MLP layers in K-FAC form. For a
linear layer ``y = a W + b`` (``a`` its input, ``g = dloss/dy`` the gradient
at its output), one example's gradient is ``dW_n = sum_t a_nt g_nt^T``
(``t`` over sequence positions; the bias is the last row of ``dW`` with
``a`` augmented by a 1). The empirical Fisher of the layer,

  ``F = (1/N) sum_n vec(dW_n) vec(dW_n)^T``        (row-major ``vec``),

is approximated by a Kronecker product (Martens & Grosse, 2015), in the
"expand" convention for sequences (Eschenhagen et al., 2023)::

  F ~= A (x) G,  A = mean over (n, t) of a a^T,  G = (1/N) sum_{n,t} g g^T.

With one position per example this is exact whenever inputs and output
gradients are independent in the data (tests/test_kfac.py builds such a
data set). EK-FAC (George et al., 2018) keeps K-FAC's eigenbasis
``Q_A (x) Q_G`` but refits the eigenvalues to the per-example gradients,
``s_ij = (1/N) sum_n ((Q_A^T dW_n Q_G)_ij)^2``, the diagonal (in that
basis) closest to ``F`` in Frobenius norm.

Inverse-Hessian-vector products with damping ``lam`` (:func:`ihvp`):

* ``"kfac"``: ``(A (x) G + lam I)^{-1} v`` exactly, through the
  eigendecompositions: ``Q_A [(Q_A^T V Q_G) / (l_A l_G^T + lam)] Q_G^T``
  (the paper's ``(F + lam I)^{-1}``);
* ``"kfac_factored"``: ``(A + pi sqrt(lam) I)^{-1} V (G + sqrt(lam)/pi
  I)^{-1}`` with ``pi = sqrt((tr A / dim A) / (tr G / dim G))``, the
  factored Tikhonov damping of Martens & Grosse that G-DIG's released code
  uses (nngeometry's ``PMatKFAC.inverse``; its ``--ekfac`` option only
  changes the representation, not the eigenvalues);
* ``"ekfac"``: ``Q [(Q^T V Q) / (s + lam)] Q^T`` with the refitted ``s``.

Layers are named by their path in the model (``"blocks/0/mlp/fc"``); any
module with a 2-D ``kernel`` (``in x out``, applied as ``x @ kernel``) and an
optional ``bias`` can be chosen. Inputs and output gradients are captured by
swapping the module for a tap inside the traced loss (the model is rebuilt
by ``nnx.merge`` there, so the caller's model is never touched): the tap
records its input and adds a zero perturbation to its output, whose
gradient is ``g``. One forward and one backward pass over a batch give every
example's ``a`` and ``g`` at once (no per-example loop).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dataweights.types import Batch

ModelLoss = Callable[[nnx.Module, Batch], jax.Array]
METHODS: tuple[str, ...] = ("kfac", "kfac_factored", "ekfac")


class LayerError(ValueError):
  """A layer path that does not name a usable linear layer."""


# ----------------------------------------------------------------- layers --


def _children(module: Any) -> list[tuple[str, Any]]:
  if isinstance(module, (list, tuple, nnx.List)):
    return [(str(i), m) for i, m in enumerate(module)]
  out = []
  for name, value in vars(module).items():
    if name.startswith("_"):
      continue
    if isinstance(value, (nnx.Module, nnx.List, list, tuple)):
      out.append((name, value))
  return out


def _is_linear(module: Any) -> bool:
  kernel = getattr(module, "kernel", None)
  return (
    isinstance(module, nnx.Module)
    and isinstance(kernel, nnx.Variable)
    and (kernel[...].ndim == 2)
  )


def linear_layers(model: nnx.Module) -> list[str]:
  """Paths of every module with a 2-D ``kernel`` (candidates for K-FAC)."""
  found: list[str] = []

  def walk(module, prefix):
    if _is_linear(module):
      found.append(prefix)
    for name, child in _children(module):
      walk(child, f"{prefix}/{name}" if prefix else name)

  walk(model, "")
  return found


def _resolve(model: nnx.Module, path: str) -> tuple[Any, str]:
  """The parent module of ``path`` and the last path component."""
  parts = path.split("/")
  node = model
  for p in parts[:-1]:
    node = (
      node[int(p)]
      if isinstance(node, (list, tuple, nnx.List))
      else getattr(node, p, None)
    )
    if node is None:
      break
  return node, parts[-1]


def get_layer(model: nnx.Module, path: str) -> nnx.Module:
  """The linear layer at ``path`` (``"blocks/0/mlp/fc"``).

  Raises:
    LayerError: no such module, or not a linear layer; names the usable ones.
  """
  layer = None
  try:
    parent, last = _resolve(model, path)
    if parent is not None:
      if isinstance(parent, (list, tuple, nnx.List)):
        layer = parent[int(last)]
      else:
        layer = getattr(parent, last, None)
  except (IndexError, ValueError, TypeError):
    layer = None
  if layer is None or not _is_linear(layer):
    what = (
      "does not exist"
      if layer is None
      else "is not a linear layer (2-D kernel)"
    )
    raise LayerError(
      f"layer {path!r} {what} in {type(model).__name__}; linear layers are: "
      + ", ".join(repr(p) for p in linear_layers(model))
    )
  return layer


def _set_layer(model: nnx.Module, path: str, new: Any) -> None:
  parent, last = _resolve(model, path)
  if isinstance(parent, (list, tuple, nnx.List)):
    parent[int(last)] = new
  else:
    setattr(parent, last, new)


def check_tappable(model: nnx.Module) -> None:
  """Raises if the model runs its layers inside ``jax.checkpoint``/``scan``.

  A tap records a layer's input from inside the model's forward pass; a
  block that is split and re-merged under ``jax.checkpoint`` or stacked for
  ``lax.scan`` (the transformer's ``remat`` and ``scan_layers`` options)
  runs in an inner trace the tap cannot leave.

  Raises:
    LayerError: naming the option to turn off.
  """
  cfg = getattr(model, "cfg", None)
  remat = getattr(cfg, "remat", "none")
  if remat not in ("none", False, None):
    raise LayerError(
      f"{type(model).__name__} rematerialises its blocks (cfg.remat = "
      f"{remat!r}); K-FAC taps need cfg.remat = 'none'"
    )
  if getattr(cfg, "scan_layers", False):
    raise LayerError(
      f"{type(model).__name__} scans over stacked blocks (cfg.scan_layers = "
      "True); K-FAC taps need scan_layers = False"
    )


def check_layers(model: nnx.Module, layers: Sequence[str]) -> tuple[str, ...]:
  """Validates layer paths (non-empty, unique, each a linear layer) and
  that the model can be tapped (:func:`check_tappable`)."""
  check_tappable(model)
  layers = tuple(layers)
  if not layers:
    raise LayerError(
      "no layers chosen; pick some of: " + ", ".join(linear_layers(model))
    )
  if len(set(layers)) != len(layers):
    raise LayerError(f"layers {layers} name a layer twice")
  for p in layers:
    get_layer(model, p)
  return layers


class _Tap:
  """Stands in for a linear layer: records its input, perturbs its output."""

  def __init__(
    self, layer, name: str, store: dict, eps: Mapping[str, jax.Array] | None
  ):
    self.layer, self.name, self.store, self.eps = layer, name, store, eps

  def __call__(self, x, *args, **kwargs):
    y = self.layer(x, *args, **kwargs)
    self.store[self.name] = (x, y)
    if self.eps is not None:
      y = y + self.eps[self.name].astype(y.dtype)
    return y


def _tapped_model(graphdef, params, rest, layers, store, eps):
  model = nnx.merge(graphdef, params, rest, copy=True)
  for p in layers:
    _set_layer(model, p, _Tap(get_layer(model, p), p, store, eps))
  return model


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Inputs and output gradients of each chosen layer on one batch.

  Attributes:
    a: ``{path: a_BxTxI}``, inputs augmented with a column of ones when the
      layer has a bias (so ``I = in + 1``).
    g: ``{path: g_BxTxO}``, gradients of ``loss_n`` (each example's own
      loss) with respect to the layer's outputs.
    loss_B: the per-example losses.
  """

  a: dict[str, jax.Array]
  g: dict[str, jax.Array]
  loss_B: jax.Array

  def example_grads(self, path: str) -> jax.Array:
    """Per-example gradients ``dW_BxIxO`` of the layer (bias as last row)."""
    return jnp.einsum("bti,bto->bio", self.a[path], self.g[path])


def _as_btx(x: jax.Array, batch_size: int) -> jax.Array:
  return x.reshape(batch_size, -1, x.shape[-1])


def layer_stats(
  loss_fn: ModelLoss,
  graphdef: Any,
  params: Any,
  rest: Any,
  batch: Batch,
  layers: Sequence[str],
) -> LayerStats:
  """``a`` and ``g`` of every chosen layer for every example of ``batch``.

  Args:
    loss_fn: ``loss_fn(model, batch) -> loss_B`` (per-example losses; the
      examples must not interact, e.g. no batch norm).
    graphdef, params, rest: the model split as ``nnx.split(model,
      nnx.Param, ...)``.
    batch: a batch (leading axis B).
    layers: paths of linear layers.

  Returns:
    :class:`LayerStats` (a pure function of the arrays: jit it).
  """
  bsz = jax.tree.leaves(batch)[0].shape[0]
  probe = nnx.merge(graphdef, params, rest, copy=True)
  check_tappable(probe)
  has_bias = {
    p: getattr(get_layer(probe, p), "bias", None) is not None for p in layers
  }

  def run(eps):
    store: dict[str, Any] = {}
    model = _tapped_model(graphdef, params, rest, layers, store, eps)
    loss_B = loss_fn(model, batch)
    return jnp.sum(loss_B), (loss_B, {p: x for p, (x, _) in store.items()})

  def out_shapes():
    store: dict[str, Any] = {}
    loss_fn(_tapped_model(graphdef, params, rest, layers, store, None), batch)
    return {p: y for p, (_, y) in store.items()}

  eps0 = {
    p: jnp.zeros(s.shape, s.dtype)
    for p, s in jax.eval_shape(out_shapes).items()
  }
  g_eps, (loss_B, acts) = jax.grad(run, has_aux=True)(eps0)
  a_out, g_out = {}, {}
  for p in layers:
    a = _as_btx(acts[p], bsz)
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    if has_bias[p]:
      a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], -1)
    a_out[p] = a
    g = _as_btx(g_eps[p], bsz)
    g_out[p] = g.astype(jnp.promote_types(g.dtype, jnp.float32))
  return LayerStats(a_out, g_out, loss_B)


def layer_param_grads(grads: Any, path: str) -> jax.Array:
  """``[dkernel; dbias]`` of one layer from a gradient pytree (``I x O``).

  ``grads`` is an ``nnx.State`` of parameters, or a batch of them with a
  leading axis; the bias row is appended when the layer has one.
  """
  node = grads
  for p in path.split("/"):
    node = node[int(p)] if p.isdigit() else node[p]
  k = node["kernel"]
  k = k[...] if isinstance(k, nnx.Variable) else k
  b = node["bias"] if "bias" in node else None
  if b is None:
    return k
  b = b[...] if isinstance(b, nnx.Variable) else b
  return jnp.concatenate([k, b[..., None, :]], axis=-2)


# ---------------------------------------------------------------- factors --


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KFAC:
  """K-FAC (and optionally EK-FAC) factors of the chosen layers.

  Attributes:
    A: ``{path: I x I}`` input second moments (mean over positions).
    G: ``{path: O x O}`` output-gradient second moments (sum over
      positions, mean over examples).
    eig_A, vec_A, eig_G, vec_G: eigendecompositions of ``A`` and ``G``.
    s: ``{path: I x O}`` EK-FAC eigenvalues refitted to the per-example
      gradients, or None when not computed.
  """

  A: dict[str, jax.Array]
  G: dict[str, jax.Array]
  eig_A: dict[str, jax.Array]
  vec_A: dict[str, jax.Array]
  eig_G: dict[str, jax.Array]
  vec_G: dict[str, jax.Array]
  s: dict[str, jax.Array] | None = None

  @property
  def layers(self) -> tuple[str, ...]:
    return tuple(self.A)

  def dense(self, path: str) -> jax.Array:
    """``A (x) G`` of one layer as an ``IO x IO`` matrix (tests)."""
    return jnp.kron(self.A[path], self.G[path])


def _eigh(m):
  w, q = jnp.linalg.eigh((m + m.T) / 2)
  return jnp.maximum(w, 0.0), q


def fit_kfac(
  stats_fn: Callable[[Batch], LayerStats],
  batches: Sequence[Batch],
  *,
  ekfac: bool = True,
) -> KFAC:
  """K-FAC factors over a sequence of batches (and EK-FAC eigenvalues).

  Args:
    stats_fn: ``stats_fn(batch) -> LayerStats`` (e.g. a jitted closure of
      :func:`layer_stats`).
    batches: the data the Fisher is taken over (G-DIG: the candidate pool
      the model was fine-tuned on).
    ekfac: also refit the eigenvalues (a second pass over ``batches``).

  Returns:
    :class:`KFAC`.
  """
  if not batches:
    raise ValueError("fit_kfac needs at least one batch")
  a_sum: dict[str, jax.Array] = {}
  g_sum: dict[str, jax.Array] = {}
  n_pos = n_ex = 0
  for batch in batches:
    st = stats_fn(batch)
    for p in st.a:
      aa = jnp.einsum("bti,btj->ij", st.a[p], st.a[p])
      gg = jnp.einsum("bti,btj->ij", st.g[p], st.g[p])
      a_sum[p] = a_sum.get(p, 0.0) + aa
      g_sum[p] = g_sum.get(p, 0.0) + gg
    first = next(iter(st.a.values()))
    n_pos += first.shape[0] * first.shape[1]
    n_ex += first.shape[0]
  A = {p: v / n_pos for p, v in a_sum.items()}
  G = {p: v / n_ex for p, v in g_sum.items()}
  eig_A, vec_A, eig_G, vec_G = {}, {}, {}, {}
  for p in A:
    eig_A[p], vec_A[p] = _eigh(A[p])
    eig_G[p], vec_G[p] = _eigh(G[p])
  s = None
  if ekfac:
    s_sum: dict[str, jax.Array] = {}
    for batch in batches:
      st = stats_fn(batch)
      for p in st.a:
        dw_BxIxO = st.example_grads(p)
        rot = jnp.einsum("ij,bjk,kl->bil", vec_A[p].T, dw_BxIxO, vec_G[p])
        s_sum[p] = s_sum.get(p, 0.0) + jnp.sum(rot**2, axis=0)
    s = {p: v / n_ex for p, v in s_sum.items()}
  return KFAC(A, G, eig_A, vec_A, eig_G, vec_G, s)


def check_damping(damping: float) -> float:
  if (
    not isinstance(damping, (int, float))
    or isinstance(damping, bool)
    or not damping >= 0
  ):
    raise ValueError(f"damping = {damping!r} must be a number >= 0")
  return float(damping)


def ihvp(
  kf: KFAC, v: Mapping[str, jax.Array], damping: float, method: str = "kfac"
) -> dict[str, jax.Array]:
  """``(F + damping I)^{-1} v`` layer by layer, ``F`` in K-FAC/EK-FAC form.

  Args:
    kf: the factors.
    v: ``{path: V_IxO}`` (the gradient of each layer, bias as last row);
      a leading batch axis ``V_BxIxO`` is allowed.
    damping: ``lam >= 0``. With ``lam = 0`` the factors must be invertible.
      As ``lam`` grows the result tends to ``v / lam``.
    method: ``"kfac"`` (exact damping of the Kronecker product),
      ``"kfac_factored"`` (G-DIG's code: damping split over the factors),
      or ``"ekfac"`` (refitted eigenvalues; needs ``fit_kfac(ekfac=True)``).

  Returns:
    ``{path: same shape as v[path]}``.

  Raises:
    ValueError: unknown method, bad damping, EK-FAC without refitted
      eigenvalues, or a layer missing from the factors.
  """
  lam = check_damping(damping)
  if method not in METHODS:
    raise ValueError(f"method = {method!r}; allowed: {', '.join(METHODS)}")
  if method == "ekfac" and kf.s is None:
    raise ValueError("method 'ekfac' needs factors fitted with ekfac=True")
  missing = [p for p in v if p not in kf.A]
  if missing:
    raise LayerError(f"no factors for layer(s) {missing}; fitted: {list(kf.A)}")
  out = {}
  for p, vp in v.items():
    if method == "kfac_factored":
      A, G = kf.A[p], kf.G[p]
      ni, no = A.shape[0], G.shape[0]
      pi = jnp.sqrt((jnp.trace(A) / ni) / jnp.maximum(jnp.trace(G) / no, 1e-30))
      a_inv = jnp.linalg.inv(
        A + pi * jnp.sqrt(lam) * jnp.eye(ni, dtype=A.dtype)
      )
      g_inv = jnp.linalg.inv(
        G + jnp.sqrt(lam) / pi * jnp.eye(no, dtype=G.dtype)
      )
      out[p] = jnp.einsum("ij,...jk,kl->...il", a_inv, vp, g_inv)
      continue
    qa, qg = kf.vec_A[p], kf.vec_G[p]
    rot = jnp.einsum("ji,...jk,kl->...il", qa, vp, qg)
    if method == "kfac":
      diag = kf.eig_A[p][:, None] * kf.eig_G[p][None, :]
    else:
      diag = kf.s[p]  # type: ignore[index]
    rot = rot / (diag + lam)
    out[p] = jnp.einsum("ij,...jk,lk->...il", qa, rot, qg)
  return out
