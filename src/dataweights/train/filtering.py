"""Online data filtering with a weighting network, as training-loop Methods.

Grangier, Ablin & Hannun (the book's Sources §2): each step draws a big
generic batch of ``G = B x downsampling`` rows (the ``"generic"`` batch) and
a specific (target) batch (``"specific"``); a small network w_φ scores the
big batch, B rows are kept (:mod:`dataweights.methods.selection`) and the
model takes one step on them with uniform loss weights. A meta-step updates
φ (and SOBA's ``v``) with the cores of :mod:`dataweights.methods.metagrad`.
The ``"train"`` batch (B rows of the same big batch, see
:class:`dataweights.data.filter_feed.FilterFeed`) is what the baselines
train on, so every method sees the same generic rows (common random
numbers).

======================  ===============================================
method                  what it does each step
======================  ===============================================
:class:`Base`           trains on the ``"train"`` rows (generic only)
:class:`Mixing`         ``(1 - λ) ∇L_gen + λ ∇L_spec`` (λ = 0.1)
:class:`Classifier`     w_φ = logistic specific-vs-generic classifier,
                        keeps the top 1/downsampling of the big batch
:class:`CDS`            contrastive data selection: two small models of
                        the scorer's trunk, one trained on generic rows,
                        one fine-tuned from it on specific rows after
                        ``warmup`` steps; keeps the rows whose loss drops
                        most from the first to the second
:class:`DDS`            φ ← Adam(∇_φ L_spec(θ − α∇_θ L_gen(θ; B_r, w_φ)))
:class:`Anograd`        φ ascends ⟨∇_θ Σ w ℓ, ∇L_spec⟩ / ‖∇_θ Σ w ℓ‖
:class:`SOBA`           v ← v − ρ(Hv + ∇L_spec); φ descends
                        ``∂_φ⟨∇_θ L_gen(θ; B, w_φ), v⟩``
======================  ===============================================

The method state is a dict of arrays: ``phi`` (an ``nnx.State``) and its
Adam state ``phi_opt``; SOBA adds ``v`` (shaped like the parameters, so it
and its optimiser moments are sharded like them) and ``v_opt``; CDS holds
its two small models and their optimiser states. All of it is checkpointed
with the run and restored bit-exactly. ``meta_every = k`` runs the meta-step
on steps ``0, k, 2k, ...`` only (``lax.cond``: the other steps pay for the
scoring and the model's step alone).

SOBA fuses its heavy work into the model's gradient
(:meth:`dataweights.train.method.Method.loss_and_grads`): one
forward-over-reverse pass over the kept rows in the direction ``v`` gives
the gradient the optimiser applies, ``H v`` and every ``⟨∇ℓ_i, v⟩``; the
meta-gradient is then the vector-Jacobian product of the small network's
softmax weights with those ``⟨∇ℓ_i, v⟩``. The fused pass does not split
the batch into microbatches (``fused=False`` does, at the cost of one more
gradient).

[reconstruction] CDS here scores with two small online models (the
Moore-Lewis form of contrastive selection) instead of the reference's
offline scoring of the whole generic set by the pre-trained and fine-tuned
main model; the reference's exact constants are in its configs, ours in
:mod:`dataweights.configs.filtering`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dataweights.methods import metagrad
from dataweights.methods import selection as sel
from dataweights.models import weighting_net as wn
from dataweights.train.method import Method, StepContext

Batch = dict[str, jax.Array]
FILTER_BATCHES: tuple[str, ...] = ("generic", "specific")
V_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
_SCRATCH = "_scratch"  # per-step values passed between hooks (never saved)


def _rows(batch: Batch) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def _every(pred: jax.Array | None, fn: Callable[[], Any], skip_state: Any):
  """``fn()`` when ``pred`` (or always if None), else ``(skip_state, 0s)``.

  ``fn() -> (state, metrics)``; skipped steps return the state unchanged and
  zero metrics (``lax.cond``: only the taken branch runs).
  """
  if pred is None:
    return fn()
  shapes = jax.eval_shape(fn)

  def skip():
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1])
    return skip_state, zeros

  return jax.lax.cond(pred, fn, skip)


def _adam_step(tx, params, opt_state, grads):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _entropy_frac(logw_N: jax.Array) -> jax.Array:
  """Entropy of ``softmax(logw)`` over ``log N``: 1 = uniform weights."""
  p_N = jax.nn.softmax(logw_N)
  ent = -jnp.sum(p_N * jnp.log(jnp.maximum(p_N, 1e-30)))
  return ent / jnp.log(jnp.asarray(logw_N.shape[0], ent.dtype))


def _flag_metric(batch: Batch) -> dict[str, jax.Array]:
  """``kept_flag``: the mean ``flag_B`` (e.g. corrupted labels) of the rows
  the step trains on, when the batch marks rows."""
  if "flag_B" not in batch:
    return {}
  return {"kept_flag": jnp.mean(batch["flag_B"].astype(jnp.float32))}


@dataclasses.dataclass(frozen=True)
class Base(Method):
  """Standard training on generic data: the ``"train"`` rows as they come."""

  name: str = "base"

  def update(self, mstate, ctx, grads, loss_B, batch):
    return grads, mstate, _flag_metric(batch)


@dataclasses.dataclass(frozen=True)
class Mixing(Method):
  """Trains on ``(1 - λ) ∇L_gen + λ ∇L_spec`` (the reference's λ = 0.1).

  Not a selection method: it trains on the specific set directly.
  """

  name: str = "mixing"
  batches: tuple[str, ...] = ("specific",)
  specific_weight: float = 0.1

  def __post_init__(self):
    _check(
      0.0 <= self.specific_weight <= 1.0,
      f"Mixing.specific_weight = {self.specific_weight!r} is invalid; it "
      "must lie in [0, 1]",
    )

  def update(self, mstate, ctx, grads, loss_B, batch):
    lam = self.specific_weight
    spec_loss, _, g_spec = ctx.grad_fn(
      ctx.params, ctx.batches["specific"], None
    )
    grads = jax.tree.map(lambda a, b: (1 - lam) * a + lam * b, grads, g_spec)
    return grads, mstate, {"spec_loss": spec_loss, **_flag_metric(batch)}


@dataclasses.dataclass(frozen=True)
class FilterMethod(Method):
  """Common parts of the methods that score and filter the big batch.

  Attributes:
    scorer: the weighting network (its modality must match the batches).
    selection: how the B rows are kept (see
      :data:`dataweights.methods.selection.SELECTIONS`).
    meta_lr: Adam step size of φ (the reference: 1e-3).
    meta_every: run the meta-step every this many steps (1: every step).
  """

  name: str = "filter"
  batches: tuple[str, ...] = FILTER_BATCHES
  scorer: wn.ScorerConfig = wn.ScorerConfig()
  selection: str = "sample"
  meta_lr: float = 1e-3
  meta_every: int = 1
  output: str = "softmax"  # how scores become weights (class constant)
  shift_invariant: bool = True  # weights unchanged by a constant score shift

  def __post_init__(self):
    sel.check_selection(self.selection)
    _check(
      isinstance(self.meta_lr, (int, float)) and self.meta_lr > 0,
      f"{type(self).__name__}.meta_lr = {self.meta_lr!r} is invalid; it "
      "must be a number > 0",
    )
    _check(
      isinstance(self.meta_every, int) and self.meta_every >= 1,
      f"{type(self).__name__}.meta_every = {self.meta_every!r} is invalid; "
      "it must be an integer >= 1",
    )

  # -- pieces --------------------------------------------------------------
  @property
  def score_cfg(self) -> wn.ScorerConfig:
    """The scorer as used: no score bias where weights ignore it."""
    if self.shift_invariant and self.scorer.score_bias:
      return dataclasses.replace(self.scorer, score_bias=False)
    return self.scorer

  def phi_tx(self) -> optax.GradientTransformation:
    """φ's optimiser."""
    return optax.adam(self.meta_lr)

  def scores(self, phi: Any, batch: Batch) -> jax.Array:
    """``s_B``, the raw scores of the weighting network."""
    return wn.apply_scorer(self.score_cfg, "score", phi, batch)

  def weights(self, phi: Any, batch: Batch) -> jax.Array:
    """``w_B``: scores normalised as this method wants them."""
    return wn.normalize_scores(self.scores(phi, batch), self.output)

  def log_weights(self, s_B: jax.Array) -> jax.Array:
    """``log w_B`` up to a constant (what selection needs)."""
    if self.output == "softmax":
      return s_B
    return jnp.log(jnp.maximum(jax.nn.softplus(s_B), 1e-30))

  def problem(self, ctx: StepContext) -> metagrad.BilevelProblem:
    """``L_in(θ, φ; b) = Σ w_φ(b)_i ℓ_i(θ)``, ``L_out`` = mean specific loss."""
    return metagrad.weighted_examples(
      lambda theta, b: ctx.loss_fn(theta, b), self.weights
    )

  def sizes(self, ctx: StepContext) -> tuple[int, int]:
    """``(B, G)``; fails clearly on a big batch smaller than B."""
    for name in ("train", *self.batches):
      _check(
        name in ctx.batches,
        f"method {self.name!r} needs the batch {name!r}; the step has "
        f"{', '.join(map(repr, ctx.batches))}",
      )
    b, g = _rows(ctx.batches["train"]), _rows(ctx.batches["generic"])
    _check(
      g >= b,
      f"the generic batch has G = {g} rows but the step keeps B = {b}: "
      f"downsampling G / B = {g / b:.3g} must be >= 1",
    )
    wn.check_batch(self.scorer, ctx.batches["generic"])
    return b, g

  def is_meta(self, ctx: StepContext) -> jax.Array | None:
    """Whether this step runs the meta-step (None: every step)."""
    if self.meta_every == 1:
      return None
    return (ctx.step % self.meta_every) == 0

  def init(self, params, key, num_domains):
    del params, num_domains
    phi = wn.init_scorer(self.score_cfg, "score", key)
    return {"phi": phi, "phi_opt": self.phi_tx().init(phi)}

  def select(self, mstate, ctx):
    b, g = self.sizes(ctx)
    gen = ctx.batches["generic"]
    s_G = self.scores(mstate["phi"], gen)
    logw_G = self.log_weights(s_G)
    idx_B, iw_B = sel.select(
      jax.random.fold_in(ctx.key, 1), logw_G, b, self.selection
    )
    scratch = {
      "metrics": {
        "w_entropy": _entropy_frac(logw_G),
        "w_max": jnp.exp(jnp.max(jax.nn.log_softmax(logw_G))),
      }
    }
    if iw_B is not None:
      scratch["iw_mean"] = jnp.mean(iw_B)
    kept = sel.take_rows(gen, idx_B)
    scratch["metrics"].update(_flag_metric(kept))
    return kept, iw_B, {**mstate, _SCRATCH: scratch}

  def meta_step(
    self, core: dict, ctx: StepContext, batch: Batch, scratch: dict
  ) -> tuple[dict, dict]:
    """The method's meta-step: ``(new core state, metrics)``."""
    del ctx, batch, scratch
    return core, {}

  def update(self, mstate, ctx, grads, loss_B, batch):
    core = {k: v for k, v in mstate.items() if k != _SCRATCH}
    scratch = mstate.get(_SCRATCH, {})
    if "iw_mean" in scratch:
      # Unbiased importance weighting: the step divided Σ w ℓ by Σ w; the
      # unbiased estimate divides by B (Hansen-Hurwitz).
      grads = jax.tree.map(lambda x: x * scratch["iw_mean"], grads)
    pred = self.is_meta(ctx)
    core, metrics = _every(
      pred, lambda: self.meta_step(core, ctx, batch, scratch), core
    )
    metrics = {**scratch.get("metrics", {}), **metrics}
    if pred is not None:
      metrics["meta_step"] = pred.astype(jnp.float32)
    return grads, core, metrics


@dataclasses.dataclass(frozen=True)
class DDS(FilterMethod):
  """Differentiable data selection: one look-ahead step (the "soft" method).

  Attributes:
    lookahead_lr: α of the look-ahead step ``θ − α ∇_θ L_gen`` (0.1).
  """

  name: str = "dds"
  lookahead_lr: float = 0.1

  def meta_step(self, core, ctx, batch, scratch):
    b, g = self.sizes(ctx)
    gen = ctx.batches["generic"]
    rows = sel.random_rows(jax.random.fold_in(ctx.key, 2), g, b)
    g_phi, la_loss = metagrad.dds_metagrad(
      self.problem(ctx),
      ctx.params,
      core["phi"],
      sel.take_rows(gen, rows),
      ctx.batches["specific"],
      self.lookahead_lr,
    )
    phi, opt = _adam_step(self.phi_tx(), core["phi"], core["phi_opt"], g_phi)
    return {**core, "phi": phi, "phi_opt": opt}, {
      "lookahead_loss": la_loss,
      "meta_grad_norm": optax.tree.norm(g_phi),
    }


@dataclasses.dataclass(frozen=True)
class Anograd(FilterMethod):
  """Aligned normalised gradient: φ ascends the gradients' cosine-like score.

  Weights are softplus of the scores (positive, unnormalised); the inner
  batch is a random sub-batch of the big batch of the specific batch's size.

  Attributes:
    eps: ε of ``⟨g, s⟩ / (‖g‖ + ε)``.
  """

  name: str = "anograd"
  output: str = "softplus"
  shift_invariant: bool = False
  eps: float = 1e-6

  def meta_step(self, core, ctx, batch, scratch):
    _, g = self.sizes(ctx)
    gen, spec = ctx.batches["generic"], ctx.batches["specific"]
    rows = sel.random_rows(
      jax.random.fold_in(ctx.key, 2), g, min(g, _rows(spec))
    )
    g_phi, align = metagrad.anograd_metagrad(
      self.problem(ctx),
      ctx.params,
      core["phi"],
      sel.take_rows(gen, rows),
      spec,
      self.eps,
    )
    phi, opt = _adam_step(self.phi_tx(), core["phi"], core["phi_opt"], g_phi)
    return {**core, "phi": phi, "phi_opt": opt}, {
      "alignment": align,
      "meta_grad_norm": optax.tree.norm(g_phi),
    }


@dataclasses.dataclass(frozen=True)
class SOBA(FilterMethod):
  """Single-loop implicit differentiation with a linear-system variable v.

  Attributes:
    v_optimizer: ``"sgd"`` (``v ← v − ρ D_v``, the textbook SOBA step) or
      ``"adam"`` (the reference steps v with an adaptive optimiser).
    v_lr: ρ.
    damping: λ in ``D_v = (H + λI) v + ∇L_spec`` (0: plain SOBA; > 0 keeps
      v bounded where the Hessian has tiny or negative eigenvalues).
    fused: compute the model's gradient, ``H v`` and every ``⟨∇ℓ_i, v⟩``
      in one forward-over-reverse pass (see the module docstring).
  """

  name: str = "soba"
  v_optimizer: str = "adam"
  v_lr: float = 1e-3
  damping: float = 0.0
  fused: bool = True

  def __post_init__(self):
    FilterMethod.__post_init__(self)
    _check(
      self.v_optimizer in V_OPTIMIZERS,
      f"SOBA.v_optimizer = {self.v_optimizer!r} is invalid; allowed values "
      f"are {', '.join(map(repr, V_OPTIMIZERS))}",
    )
    _check(
      self.v_lr > 0 and self.damping >= 0,
      f"SOBA.v_lr = {self.v_lr!r} must be > 0 and damping = "
      f"{self.damping!r} >= 0",
    )

  def v_tx(self) -> optax.GradientTransformation:
    """v's optimiser."""
    if self.v_optimizer == "sgd":
      return optax.sgd(self.v_lr)
    return optax.adam(self.v_lr)

  def init(self, params, key, num_domains):
    state = FilterMethod.init(self, params, key, num_domains)
    v = jax.tree.map(jnp.zeros_like, params)
    return {**state, "v": v, "v_opt": self.v_tx().init(v)}

  def _pass(self, ctx, batch, weight_B, key, v):
    """``(Σwℓ, ℓ_B, ∇Σwℓ)`` and, with a direction v, ``H_Σwℓ v`` and ``d_B``."""

    def objective(theta):
      loss_B = ctx.loss_fn(theta, batch, key=key)
      return jnp.sum(weight_B * loss_B), loss_B

    def grads_and_losses(theta):
      (total, loss_B), g = jax.value_and_grad(objective, has_aux=True)(theta)
      return g, loss_B, total

    if v is None:
      g, loss_B, total = grads_and_losses(ctx.params)
      return (
        g,
        loss_B,
        total,
        jax.tree.map(jnp.zeros_like, g),
        jnp.zeros_like(loss_B),
      )
    (g, loss_B, total), (hv, d_B, _) = jax.jvp(
      grads_and_losses, (ctx.params,), (v,)
    )
    return g, loss_B, total, hv, d_B

  def loss_and_grads(self, mstate, ctx, batch, weight_B, key):
    if not self.fused:
      return None
    pred = self.is_meta(ctx)
    v = mstate["v"]
    if pred is None:
      out = self._pass(ctx, batch, weight_B, key, v)
    else:
      out = jax.lax.cond(
        pred,
        lambda: self._pass(ctx, batch, weight_B, key, v),
        lambda: self._pass(ctx, batch, weight_B, key, None),
      )
    g, loss_B, total, hv, d_B = out
    wsum = jnp.sum(weight_B)
    denom = jnp.maximum(wsum, jnp.finfo(jnp.float32).tiny)
    grads = jax.tree.map(lambda x: x / denom.astype(x.dtype), g)
    hv = jax.tree.map(lambda x: x / denom.astype(x.dtype), hv)
    scratch = {**mstate.get(_SCRATCH, {}), "hv": hv, "d_B": d_B}
    return (total / denom, loss_B, grads, wsum), {**mstate, _SCRATCH: scratch}

  def meta_step(self, core, ctx, batch, scratch):
    if self.fused:
      hv, d_B = scratch["hv"], scratch["d_B"]
    else:
      weight_B = jnp.ones((_rows(batch),), jnp.float32)
      _, _, _, hv, d_B = self._pass(ctx, batch, weight_B, None, core["v"])
      hv = jax.tree.map(lambda x: x / _rows(batch), hv)
    spec_loss, g_spec = jax.value_and_grad(
      lambda t: jnp.mean(ctx.loss_fn(t, ctx.batches["specific"]))
    )(ctx.params)
    v = core["v"]
    d_v = jax.tree.map(
      lambda h, vi, gs: h + self.damping * vi + gs, hv, v, g_spec
    )
    v_new, v_opt = _adam_step(self.v_tx(), v, core["v_opt"], d_v)
    # Cross-derivative ∂_φ Σ_i w_φ(x_i) ⟨∇ℓ_i, v⟩ over the kept rows.
    w_B, vjp = jax.vjp(lambda p: self.weights(p, batch), core["phi"])
    (g_phi,) = vjp(jax.lax.stop_gradient(d_B).astype(w_B.dtype))
    phi, opt = _adam_step(self.phi_tx(), core["phi"], core["phi_opt"], g_phi)
    return {**core, "phi": phi, "phi_opt": opt, "v": v_new, "v_opt": v_opt}, {
      "spec_loss": spec_loss,
      "v_residual": optax.tree.norm(d_v),
      "v_norm": optax.tree.norm(v_new),
      "meta_grad_norm": optax.tree.norm(g_phi),
    }


@dataclasses.dataclass(frozen=True)
class Classifier(FilterMethod):
  """An online specific-vs-generic classifier keeps the top 1/downsampling.

  φ minimises the logistic loss of "specific" (the specific batch, label +1)
  against "generic" (the big batch, label -1), each side averaged; the B
  rows with the highest scores are kept (deterministic top-k).
  """

  name: str = "classifier"
  selection: str = "topk"
  shift_invariant: bool = False  # the logistic loss needs the offset

  def select(self, mstate, ctx):
    b, _ = self.sizes(ctx)
    gen, spec = ctx.batches["generic"], ctx.batches["specific"]

    def loss(phi):
      s_G = self.scores(phi, gen)
      s_S = self.scores(phi, spec)
      value = 0.5 * (
        jnp.mean(jax.nn.softplus(-s_S)) + jnp.mean(jax.nn.softplus(s_G))
      )
      return value, s_G

    def train():
      (value, s_G), g_phi = jax.value_and_grad(loss, has_aux=True)(
        mstate["phi"]
      )
      phi, opt = _adam_step(
        self.phi_tx(), mstate["phi"], mstate["phi_opt"], g_phi
      )
      return {"phi": phi, "phi_opt": opt}, {"clf_loss": value, "s_G": s_G}

    core = {"phi": mstate["phi"], "phi_opt": mstate["phi_opt"]}
    pred = self.is_meta(ctx)
    if pred is None:
      core, out = train()
    else:

      def score_only():
        value, s_G = loss(mstate["phi"])
        return core, {"clf_loss": value, "s_G": s_G}

      core, out = jax.lax.cond(pred, train, score_only)
    s_G = jax.lax.stop_gradient(out["s_G"])
    idx_B, iw_B = sel.select(
      jax.random.fold_in(ctx.key, 1), s_G, b, self.selection
    )
    kept = sel.take_rows(gen, idx_B)
    metrics = {
      "clf_loss": out["clf_loss"],
      "w_entropy": _entropy_frac(s_G),
      **_flag_metric(kept),
    }
    new = {**mstate, **core, _SCRATCH: {"metrics": metrics}}
    if iw_B is not None:
      new[_SCRATCH]["iw_mean"] = jnp.mean(iw_B)
    return kept, iw_B, new

  def update(self, mstate, ctx, grads, loss_B, batch):
    core = {k: v for k, v in mstate.items() if k != _SCRATCH}
    scratch = mstate.get(_SCRATCH, {})
    if "iw_mean" in scratch:
      grads = jax.tree.map(lambda x: x * scratch["iw_mean"], grads)
    return grads, core, dict(scratch.get("metrics", {}))


@dataclasses.dataclass(frozen=True)
class CDS(FilterMethod):
  """Contrastive data selection with two small online models.

  A small model of the scorer's trunk with an LM head (bytes) or a
  classifier head (images) trains on random generic rows; from step
  ``warmup`` on, a copy of it is fine-tuned on the specific batches. The
  score of a row is ``loss_generic(x) − loss_finetuned(x)``; the B rows with
  the largest scores are kept (before ``warmup``: B random rows).

  Attributes:
    warmup: steps before the fine-tuned copy starts (and selection with it).
  """

  name: str = "cds"
  selection: str = "topk"
  warmup: int = 50

  def head(self) -> str:
    return "lm" if self.scorer.modality == "bytes" else "classify"

  def small_loss(self, params, batch):
    return wn.apply_scorer(self.scorer, self.head(), params, batch)

  def init(self, params, key, num_domains):
    del params, num_domains
    lm = wn.init_scorer(self.scorer, self.head(), key)
    opt = self.phi_tx().init(lm)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    return {
      "gen_lm": lm,
      "gen_opt": opt,
      "spec_lm": copy(lm),
      "spec_opt": copy(opt),
    }

  def select(self, mstate, ctx):
    b, g = self.sizes(ctx)
    gen = ctx.batches["generic"]
    score_G = self.small_loss(mstate["gen_lm"], gen) - self.small_loss(
      mstate["spec_lm"], gen
    )
    score_G = jax.lax.stop_gradient(score_G)
    idx_top, _ = sel.select(
      jax.random.fold_in(ctx.key, 1), score_G, b, self.selection
    )
    idx_rand = sel.random_rows(jax.random.fold_in(ctx.key, 1), g, b)
    idx_B = jnp.where(ctx.step < self.warmup, idx_rand, idx_top)
    kept = sel.take_rows(gen, idx_B)
    scratch = {
      "metrics": {"cds_score_mean": jnp.mean(score_G), **_flag_metric(kept)}
    }
    return kept, None, {**mstate, _SCRATCH: scratch}

  def meta_step(self, core, ctx, batch, scratch):
    b, g = self.sizes(ctx)
    gen, spec = ctx.batches["generic"], ctx.batches["specific"]
    rows = sel.random_rows(jax.random.fold_in(ctx.key, 2), g, b)
    tx = self.phi_tx()

    def mean_loss(params, batch):
      return jnp.mean(self.small_loss(params, batch))

    gen_loss, g_gen = jax.value_and_grad(mean_loss)(
      core["gen_lm"], sel.take_rows(gen, rows)
    )
    gen_lm, gen_opt = _adam_step(tx, core["gen_lm"], core["gen_opt"], g_gen)
    spec_loss, g_spec = jax.value_and_grad(mean_loss)(core["spec_lm"], spec)
    spec_lm, spec_opt = _adam_step(
      tx, core["spec_lm"], core["spec_opt"], g_spec
    )
    # Before warm-up the fine-tuned copy is the generic model itself, with a
    # fresh optimiser: fine-tuning starts from both at step `warmup`.
    before = ctx.step < self.warmup
    spec_lm, spec_opt = jax.tree.map(
      lambda a, c: jnp.where(before, a, c),
      (gen_lm, tx.init(gen_lm)),
      (spec_lm, spec_opt),
    )
    return {
      "gen_lm": gen_lm,
      "gen_opt": gen_opt,
      "spec_lm": spec_lm,
      "spec_opt": spec_opt,
    }, {"cds_gen_loss": gen_loss, "cds_spec_loss": spec_loss}


METHODS: dict[str, type[Method]] = {
  "base": Base,
  "mixing": Mixing,
  "classifier": Classifier,
  "cds": CDS,
  "dds": DDS,
  "anograd": Anograd,
  "soba": SOBA,
}
