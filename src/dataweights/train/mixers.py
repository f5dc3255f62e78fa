"""Data-mixing methods plugged into the training loop.

Thin :class:`~dataweights.train.method.Method` adapters around the pure
weight transforms of :mod:`dataweights.methods` (which never import the
training loop). Each keeps its transform's state in the method state and
applies the weights in one of two ways:

* ``apply="loss"``: per-example loss weights ``w_{d_b} / n_{d_b}`` (the
  step minimises ``Σ_k w_k f_k``, Chapter 1's objective); the batches keep
  their own sampling weights (stratified uniform sampling puts every domain
  in every batch);
* ``apply="sample"``: the weights go to the ``"train"`` sampler, which draws
  the next batches with them (one step late by default).

=====================  =============================  ===================
method                 learns from                    applies
=====================  =============================  ===================
:class:`FixedWeights`  nothing (the baselines)        loss or sample
:class:`OnlineAlignment`  ``⟨∇f_k, ∇g⟩`` (T = 1)      loss or sample
:class:`HorizonMixing`  ``∂g(θ_T)/∂w`` through T      loss
                        optimiser steps
:class:`DoReMiProxy`   excess loss over a reference   loss (the proxy)
:class:`OnlineDataMixing`  training loss (EXP3)       sample
=====================  =============================  ===================

Every method that learns emits its weights as metrics ``method/w/<k>``
(domain index ``k``), so a run's history holds the weights over training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dataweights.methods import alignment, domain_weights, doremi, horizon, odm
from dataweights.train.method import Method, StepContext

APPLY: tuple[str, ...] = ("loss", "sample")
MODES: tuple[str, ...] = ("auto", *horizon.MODES)


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def _finite(value: Any, low: float = 0.0, strict: bool = False) -> bool:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  return (
    ok and math.isfinite(value) and (value > low if strict else value >= low)
  )


def _need_domains(method: Method, num_domains: int | None) -> int:
  if num_domains is None:
    raise ValueError(
      f"method {method.name!r} learns domain weights but the run has no "
      "domain names; pass domain_names=... to the Trainer"
    )
  return int(num_domains)


def _domain_B(method: Method, batch: dict) -> jax.Array:
  if "domain_B" not in batch:
    raise ValueError(
      f"method {method.name!r} needs the domain of every example but the "
      f"'train' batch has only {sorted(batch)}; use a MixtureSampler"
    )
  return batch["domain_B"]


def _init_weights(method: Method, K: int) -> jax.Array:
  w = getattr(method, "init_weights", ())
  if not w:
    return domain_weights.uniform_weights(K)
  w = np.asarray(w, np.float64)
  _check(
    w.shape == (K,) and bool(np.all(np.isfinite(w) & (w >= 0))) and w.sum() > 0,
    f"init_weights = {method.init_weights!r} are invalid; expected {K} finite "
    "weights >= 0 (one per domain), not all zero",
  )
  return jnp.asarray(w / w.sum(), jnp.float32)


def weight_metrics(prefix: str, w_K: jax.Array) -> dict[str, jax.Array]:
  """``{f"{prefix}/{k}": w_K[k]}``: a vector as scalar metrics."""
  return {f"{prefix}/{k}": w_K[k] for k in range(w_K.shape[0])}


def weights_from_history(
  history: Any, prefix: str, num_domains: int
) -> tuple[list[int], np.ndarray]:
  """``(steps, w_SxK)`` of the metrics ``method/<prefix>/<k>`` in a History."""
  cols = [history.series(f"method/{prefix}/{k}") for k in range(num_domains)]
  steps = cols[0][0]
  return steps, np.stack([np.asarray(c[1], np.float64) for c in cols], axis=1)


@dataclasses.dataclass(frozen=True)
class FixedWeights(Method):
  """Fixed domain weights (the uniform, natural, temperature baselines).

  Attributes:
    weights: ``w_K`` (normalised on use).
    apply: ``"sample"`` (sampling weights) or ``"loss"`` (loss weights).
  """

  name: str = "fixed"
  weights: tuple[float, ...] = ()
  apply: str = "sample"

  def __post_init__(self):
    _check(
      self.apply in APPLY,
      f"apply = {self.apply!r} is invalid; allowed values are 'loss', 'sample'",
    )
    w = np.asarray(self.weights, np.float64)
    _check(
      w.ndim == 1
      and w.size > 0
      and bool(np.all(np.isfinite(w) & (w >= 0)))
      and w.sum() > 0,
      f"weights = {self.weights!r} are invalid; expected K >= 1 finite "
      "weights >= 0, not all zero",
    )

  @property
  def emits_weights(self) -> bool:  # type: ignore[override]
    return self.apply == "sample"

  def init(self, params, key, num_domains):
    K = _need_domains(self, num_domains)
    _check(
      len(self.weights) == K,
      f"FixedWeights has {len(self.weights)} weights but the run has {K} "
      "domains; give one weight per domain",
    )
    w = np.asarray(self.weights, np.float64)
    return {"w_K": jnp.asarray(w / w.sum(), jnp.float32)}

  def select(self, mstate, ctx):
    batch = dict(ctx.batches["train"])
    if self.apply == "sample":
      return batch, None, mstate
    return (
      batch,
      domain_weights.realised_weights(_domain_B(self, batch), mstate["w_K"]),
      mstate,
    )

  def sampling_weights(self, mstate):
    return mstate["w_K"] if self.apply == "sample" else None


@dataclasses.dataclass(frozen=True)
class OnlineAlignment(Method):
  """The T = 1 alignment rule (:mod:`dataweights.methods.alignment`).

  After each step ``θ_0 → θ_1``: ``∇g(θ_1)`` on the ``"valid"`` batch (one
  backward pass), every domain's ``⟨∇f_k(θ_0), ∇g(θ_1)⟩`` on the training
  batch (one JVP), ``h = −a`` (the learning rate is absorbed into ``β``)
  and an EG step on ``w``.

  Attributes:
    beta: EG step size per update.
    normalize: divide ``h`` by ``max_k |h_k|`` (``β`` bounds each change).
    apply: ``"loss"`` or ``"sample"``.
    init_weights: the starting weights (default uniform); a zero weight
      stays zero (a domain left out of the mixture).
  """

  name: str = "alignment"
  beta: float = 0.1
  normalize: bool = True
  apply: str = "loss"
  init_weights: tuple[float, ...] = ()
  batches = ("valid",)

  def __post_init__(self):
    _check(
      self.apply in APPLY,
      f"apply = {self.apply!r} is invalid; allowed values are 'loss', 'sample'",
    )
    _check(
      _finite(self.beta),
      f"beta = {self.beta!r} is invalid; it must be a finite number >= 0",
    )

  @property
  def emits_weights(self) -> bool:  # type: ignore[override]
    return self.apply == "sample"

  def _tx(self):
    return alignment.alignment_rule(self.beta, normalize=self.normalize)

  def init(self, params, key, num_domains):
    K = _need_domains(self, num_domains)
    return {
      "eg": self._tx().init(_init_weights(self, K)),
      "h_K": jnp.zeros((K,), jnp.float32),
      "valid_loss": jnp.zeros((), jnp.float32),
    }

  def select(self, mstate, ctx):
    batch = dict(ctx.batches["train"])
    domain_B = _domain_B(self, batch)
    if self.apply == "sample":
      return batch, None, mstate
    return (
      batch,
      domain_weights.realised_weights(domain_B, mstate["eg"].w_K),
      mstate,
    )

  def post_update(self, mstate, ctx: StepContext, new_params):
    K = mstate["h_K"].shape[0]
    batch = ctx.batches["train"]
    res = alignment.alignment_step(
      lambda p, b: ctx.loss_fn(p, b),
      ctx.params,
      new_params,
      batch,
      ctx.batches["valid"],
      batch["domain_B"],
      K,
      lr=1.0,
    )
    h_K = jax.lax.stop_gradient(res["h_K"]).astype(jnp.float32)
    w_K, eg = self._tx().update(h_K, mstate["eg"])
    new = {
      "eg": eg,
      "h_K": h_K,
      "valid_loss": res["valid_loss"].astype(jnp.float32),
    }
    return new, {
      "valid_loss": new["valid_loss"],
      **weight_metrics("w", w_K),
      **weight_metrics("h", h_K),
    }

  def sampling_weights(self, mstate):
    return mstate["eg"].w_K if self.apply == "sample" else None


def batch_spec(batch: dict) -> tuple[tuple[str, tuple[int, ...], str], ...]:
  """``((key, shape, dtype), ...)`` of a batch, for :class:`HorizonMixing`."""
  return tuple(
    (k, tuple(int(n) for n in np.shape(v)), np.dtype(v.dtype).name)
    for k, v in sorted(batch.items())
  )


@dataclasses.dataclass(frozen=True)
class HorizonMixing(Method):
  """Finite-horizon mixing (:mod:`dataweights.methods.horizon`).

  Rounds of ``T`` steps with the loss weights of ``w`` fixed. The state keeps
  ``θ`` and the optimiser state at the round's start and the round's T
  training batches; at the round's last step it replays the T steps
  differentiably from that start, takes ``h = ∂g(θ_T)/∂w`` on the
  ``"valid"`` batch of that step, and makes an EG step. Between round ends
  a step costs what a plain step costs (plus copying the batch); at a
  round's end the hypergradient costs about 3 T steps (reverse mode).

  Attributes:
    T: inner steps per round.
    beta: EG step size per round.
    normalize: divide ``h`` by ``max_k |h_k|``.
    mode: ``"auto"`` (:func:`~dataweights.methods.horizon.choose_hypergrad_mode`),
      ``"forward"``, ``"reverse"``, ``"reverse_remat"`` or
      ``"reverse_sweep"``.
    memory_budget_bytes: for ``"auto"``; None: no limit.
    batch_spec: ``((key, shape, dtype), ...)`` of a training batch
      (:func:`batch_spec`), to store the round's batches.
    init_weights: the starting weights (default uniform).
    unroll: unroll the replayed steps (see
      :func:`~dataweights.methods.horizon.replay`).
  """

  name: str = "horizon"
  T: int = 8
  beta: float = 0.5
  normalize: bool = True
  mode: str = "auto"
  memory_budget_bytes: int | None = None
  batch_spec: tuple[tuple[str, tuple[int, ...], str], ...] = ()
  init_weights: tuple[float, ...] = ()
  unroll: bool = True
  batches = ("valid",)

  def __post_init__(self):
    _check(
      isinstance(self.T, int) and not isinstance(self.T, bool) and self.T >= 1,
      f"T = {self.T!r} is invalid; it must be an integer >= 1",
    )
    _check(
      _finite(self.beta),
      f"beta = {self.beta!r} is invalid; it must be a finite number >= 0",
    )
    _check(
      self.mode in MODES,
      f"mode = {self.mode!r} is invalid; allowed values are "
      + ", ".join(map(repr, MODES)),
    )
    _check(
      bool(self.batch_spec),
      "HorizonMixing needs batch_spec=batch_spec(example_batch): the shapes "
      "of the training batches it stores for the replay",
    )

  def _tx(self):
    return horizon.horizon_rule(self.beta, normalize=self.normalize)

  def init(self, params, key, num_domains):
    raise TypeError(
      "HorizonMixing keeps a copy of the optimiser state; create its state "
      "with init_for_run(params, key, num_domains, tx) (the Trainer does)"
    )

  def init_for_run(self, params, key, num_domains, tx):
    K = _need_domains(self, num_domains)
    return {
      "eg": self._tx().init(_init_weights(self, K)),
      "theta0": jax.tree.map(jnp.array, params),
      "opt0": tx.init(params),
      "batches": {
        k: jnp.zeros((self.T, *shape), dtype)
        for k, shape, dtype in self.batch_spec
      },
      "h_K": jnp.zeros((K,), jnp.float32),
      "valid_loss": jnp.zeros((), jnp.float32),
    }

  def _check_batch(self, batch: dict) -> None:
    got = batch_spec(batch)
    if got != tuple(self.batch_spec):
      raise ValueError(
        f"HorizonMixing stores training batches of spec {self.batch_spec} but "
        f"got {got}; build the method with batch_spec=batch_spec(batch) of the "
        "run's sampler"
      )

  def select(self, mstate, ctx: StepContext):
    batch = dict(ctx.batches["train"])
    domain_B = _domain_B(self, batch)
    self._check_batch(batch)
    t = ctx.step % self.T
    start = t == 0
    keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(start, n, o), new, old
    )
    stored = {
      k: jax.lax.dynamic_update_index_in_dim(
        buf, batch[k].astype(buf.dtype), t, 0
      )
      for k, buf in mstate["batches"].items()
    }
    new = dict(
      mstate,
      theta0=keep(ctx.params, mstate["theta0"]),
      opt0=keep(ctx.opt_state, mstate["opt0"]),
      batches=stored,
    )
    return (
      batch,
      domain_weights.realised_weights(domain_B, mstate["eg"].w_K),
      new,
    )

  def resolve_mode(
    self, params, opt_state, loss_fn, tx, num_domains: int
  ) -> horizon.ModeChoice:
    """The mode ``"auto"`` picks (or the fixed mode) and the cost model."""
    batch = {
      k: jax.ShapeDtypeStruct(shape, dtype)
      for k, shape, dtype in self.batch_spec
    }
    residual = horizon.step_residual_bytes(
      loss_fn, params, opt_state, batch, tx=tx, num_domains=num_domains
    )
    choice = horizon.choose_hypergrad_mode(
      self.T,
      num_domains,
      state_bytes=horizon.nbytes(params) + horizon.nbytes(opt_state),
      residual_bytes=residual,
      memory_budget_bytes=self.memory_budget_bytes,
    )
    return choice if self.mode == "auto" else choice._replace(mode=self.mode)

  def post_update(self, mstate, ctx: StepContext, new_params):
    K = mstate["h_K"].shape[0]
    loss_fn = lambda p, b: ctx.loss_fn(p, b)
    mode = self.resolve_mode(ctx.params, ctx.opt_state, loss_fn, ctx.tx, K).mode

    def round_end(ms):
      h_K, g, _ = horizon.hypergradient(
        ms["eg"].w_K,
        ms["theta0"],
        ms["opt0"],
        ms["batches"],
        ctx.batches["valid"],
        loss_fn=loss_fn,
        tx=ctx.tx,
        mode=mode,
        unroll=self.unroll,
      )
      h_K = h_K.astype(jnp.float32)
      _, eg = self._tx().update(h_K, ms["eg"])
      return dict(ms, eg=eg, h_K=h_K, valid_loss=g.astype(jnp.float32))

    end = (ctx.step + 1) % self.T == 0
    new = jax.lax.cond(end, round_end, lambda ms: ms, mstate)
    w_K = new["eg"].w_K
    return new, {
      "valid_loss": new["valid_loss"],
      **weight_metrics("w", w_K),
      **weight_metrics("h", new["h_K"]),
    }


def lm_token_losses(model: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Per-token next-token losses of a language model and their mask.

  The model reads ``tokens_BxL[:, :-1]`` and predicts ``tokens_BxL[:, 1:]``
  (as :func:`dataweights.train.step.lm_loss`).

  Returns:
    ``(loss_Bx(L-1), mask_Bx(L-1))``.
  """
  from dataweights.models.transformer import per_token_loss

  tokens_BxL = batch["tokens_BxL"]
  mask_BxL = batch.get("mask_BxL")
  target_mask = (
    jnp.ones(tokens_BxL[:, 1:].shape, jnp.float32)
    if mask_BxL is None
    else mask_BxL[:, 1:].astype(jnp.float32)
  )
  logits_BxLxV = model(tokens_BxL[:, :-1])
  return per_token_loss(
    logits_BxLxV, tokens_BxL[:, 1:], target_mask
  ), target_mask


def _reference_mismatch(reference: Any, params: Any) -> str | None:
  """A message naming the first difference of structure/shape, or None."""
  ref_paths = jax.tree_util.tree_leaves_with_path(reference)
  par_paths = jax.tree_util.tree_leaves_with_path(params)
  ref_map = {jax.tree_util.keystr(p): x for p, x in ref_paths}
  par_map = {jax.tree_util.keystr(p): x for p, x in par_paths}
  for path, x in par_map.items():
    if path not in ref_map:
      return f"the proxy has a parameter {path} that the reference lacks"
    r = ref_map[path]
    if tuple(np.shape(r)) != tuple(np.shape(x)) or np.dtype(
      r.dtype
    ) != np.dtype(x.dtype):
      return (
        f"parameter {path} is {tuple(np.shape(r))} {np.dtype(r.dtype).name} in the "
        f"reference but {tuple(np.shape(x))} {np.dtype(x.dtype).name} in the proxy"
      )
  extra = sorted(set(ref_map) - set(par_map))
  if extra:
    return f"the reference has parameter(s) {', '.join(extra[:3])} that the proxy lacks"
  return None


def _like_params(reference: Any, params: Any) -> Any:
  """The reference's arrays in the proxy's tree (matched by path).

  Trees with the same parameter paths may still differ in metadata (an
  ``nnx.State`` of a sharded model carries its sharding annotations).
  """
  ref_map = {
    jax.tree_util.keystr(p): x
    for p, x in jax.tree_util.tree_leaves_with_path(reference)
  }
  paths = jax.tree_util.tree_leaves_with_path(params)
  return jax.tree.unflatten(
    jax.tree.structure(params),
    [
      jnp.array(ref_map[jax.tree_util.keystr(p)], dtype=x.dtype)
      for p, x in paths
    ],
  )


@dataclasses.dataclass(frozen=True)
class DoReMiProxy(Method):
  """The DoReMi proxy model's step (:mod:`dataweights.methods.doremi`).

  Each step: the per-domain clipped excess loss of the proxy (the model
  being trained) over the reference on the training batch, the EG ascent
  step to ``α_t``, and the proxy's update on ``Σ_k α_t[k] L_k``. The
  average ``ᾱ`` (:meth:`average_weights`) then trains the main model.

  Attributes:
    step_size: ``η`` (1 in the paper).
    smoothing: ``c`` (10⁻³ in the paper).
    excess: ``"token"`` (clip each token's excess, the paper; needs a
      language-model batch) or ``"example"`` (clip each example's mean).
    reference: the reference model's parameters (an ``nnx.State`` with the
      proxy's structure and shapes); an init-only argument, stored with the
      method state (and its checkpoints), not in the method's config.
  """

  name: str = "doremi"
  step_size: float = 1.0
  smoothing: float = 1e-3
  excess: str = "token"
  reference: dataclasses.InitVar[Any] = None

  def __post_init__(self, reference):
    _check(
      _finite(self.step_size),
      f"step_size = {self.step_size!r} is invalid; it must be a finite number >= 0",
    )
    _check(
      _finite(self.smoothing) and self.smoothing <= 1,
      f"smoothing = {self.smoothing!r} is invalid; it must lie in [0, 1]",
    )
    _check(
      self.excess in ("token", "example"),
      f"excess = {self.excess!r} is invalid; allowed values are 'token', 'example'",
    )
    object.__setattr__(self, "_reference", reference)

  def _tx(self):
    return doremi.doremi(self.step_size, self.smoothing)

  def init(self, params, key, num_domains):
    K = _need_domains(self, num_domains)
    reference = getattr(self, "_reference", None)
    if reference is None:
      raise ValueError(
        "DoReMiProxy needs the reference model's parameters: "
        "DoReMiProxy(reference=<params of a model trained on fixed weights>)"
      )
    why = _reference_mismatch(reference, params)
    if why is not None:
      raise ValueError(
        f"the DoReMi reference model has another shape than the proxy: {why}; "
        "train the reference with the proxy's model config"
      )
    return {
      "ref": _like_params(reference, params),
      "w": self._tx().init(domain_weights.uniform_weights(K)),
      "excess_K": jnp.zeros((K,), jnp.float32),
    }

  def select(self, mstate, ctx: StepContext):
    batch = dict(ctx.batches["train"])
    domain_B = _domain_B(self, batch)
    K = mstate["excess_K"].shape[0]
    if self.excess == "token":
      proxy_BxL, mask = lm_token_losses(ctx.model_fn(ctx.params), batch)
      ref_BxL, _ = lm_token_losses(ctx.model_fn(mstate["ref"]), batch)
    else:
      proxy_BxL = ctx.loss_fn(ctx.params, batch)[:, None]
      ref_BxL = ctx.loss_fn(mstate["ref"], batch)[:, None]
      mask = None
    lam_K, _ = doremi.excess_losses(
      jax.lax.stop_gradient(proxy_BxL),
      jax.lax.stop_gradient(ref_BxL),
      mask,
      domain_B,
      K,
    )
    _, wstate = self._tx().update(lam_K.astype(jnp.float32), mstate["w"])
    alpha_K = doremi.current_weights(wstate)
    new = dict(mstate, w=wstate, excess_K=lam_K.astype(jnp.float32))
    return batch, domain_weights.realised_weights(domain_B, alpha_K), new

  def update(self, mstate, ctx, grads, loss_B, batch):
    return (
      grads,
      mstate,
      {
        **weight_metrics("w", doremi.current_weights(mstate["w"])),
        **weight_metrics("avg", doremi.average_weights(mstate["w"])),
        **weight_metrics("excess", mstate["excess_K"]),
      },
    )

  @staticmethod
  def average_weights(mstate) -> jax.Array:
    """``ᾱ``, the weights DoReMi hands to the main model."""
    return doremi.average_weights(mstate["w"])


@dataclasses.dataclass(frozen=True)
class OnlineDataMixing(Method):
  """ODM (:mod:`dataweights.methods.odm`): EXP3 over domains, sampling.

  The reward of each domain is its mean training loss in the batch the step
  trained on (no extra computation), importance-weighted by the
  distribution that batch was drawn with: with the feeder's one-step lag
  (``lag=1``, the default) the previous ``π``; set ``lag=0`` with
  ``Feeder(..., lag=0)``.

  Attributes:
    reward_scale: ``s`` (the authors' 1/10).
    decay: ``γ`` (1: the authors' cumulative rewards).
    lag: the feeder's lag (0 or 1).
  """

  name: str = "odm"
  reward_scale: float = 0.1
  decay: float = 1.0
  lag: int = 1
  emits_weights = True

  def __post_init__(self):
    _check(
      self.lag in (0, 1),
      f"lag = {self.lag!r} is invalid; allowed values are 0 and 1 (the Feeder's)",
    )
    self._tx()  # checks reward_scale and decay

  def _tx(self):
    return odm.exp3(reward_scale=self.reward_scale, decay=self.decay)

  def init(self, params, key, num_domains):
    K = _need_domains(self, num_domains)
    st = self._tx().init(domain_weights.uniform_weights(K))
    return {"exp3": st, "pi_prev": st.pi_K}

  def update(self, mstate, ctx, grads, loss_B, batch):
    K = mstate["pi_prev"].shape[0]
    loss_K, count_K = domain_weights.domain_means(
      jax.lax.stop_gradient(loss_B), _domain_B(self, batch), K
    )
    st = mstate["exp3"]
    pi_used = mstate["pi_prev"] if self.lag == 1 else st.pi_K
    pi_K, new_st = self._tx().update((loss_K, count_K, pi_used), st)
    return (
      grads,
      {"exp3": new_st, "pi_prev": st.pi_K},
      {
        **weight_metrics("w", pi_K),
        **weight_metrics("reward", new_st.reward_K),
      },
    )

  def sampling_weights(self, mstate):
    return mstate["exp3"].pi_K
