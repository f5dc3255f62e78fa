"""ScaleBiO as a training-loop method: source weights by penalty minimax.

The objective and the three gradient directions are in
:mod:`dataweights.methods.scalebio` (Pan et al. 2024, Eq. 3). Here they run
inside the project's jitted train step
(:func:`dataweights.train.step.make_train_step`):

* ``w`` is the trained model (``state.params``) and its optimiser is the
  run's (``state.opt_state``): AdamW, or LISA with AdamW
  (:meth:`ScaleBiO.w_optimizer`);
* ``u``, its optimiser state (AdamW or LISA), the source logits ``p_K``
  and their AdamW state are the method state (``state.extra["method"]``);
  ``u`` and its moments are placed in the parameters' shards
  (:func:`dataweights.train.method.state_shardings`), ``p_K`` is
  replicated.

One step costs three forward/backward passes over the training rows' size,
as in the paper, but in two calls: :meth:`ScaleBiO.select` hands the step
the training batch *and* the validation batch as one batch, weighted so
that the step's one gradient is ``grad_w [L_val(w) + alpha L_tr(w, lam)]``
(training row ``b``: ``alpha lam_{k_b} / n_{k_b}``; validation row:
``1 / B_val``); :meth:`ScaleBiO.update` undoes the step's normalisation by
the weight sum, takes ``u``'s gradient on the training rows, the
``p``-gradient from both models' per-source losses, and steps ``u`` and
``p``. All three gradients are taken at the same ``(w, u, p)``. That is
``w_pass="joint"`` (the default; the chapter's runs). ``w_pass="split"``
takes ``w``'s gradient in two passes instead, the training rows and then
the validation rows (:meth:`ScaleBiO.loss_and_grads`), so that no pass holds
more rows than the larger batch: at GPT-2 124M shape this is what brings
the compiled peak per device from about 2x plain fine-tuning to about 1.2x
(benchmarks/bench_scalebio.py).

LISA (``lisa_active > 0``) freezes the same blocks in ``u`` and ``w``: both
optimisers are :func:`dataweights.train.lisa.lisa` with the same seed and
period and are updated in lockstep. With
``Trainer(fixed_blocks=method.lisa_schedule(num_blocks))`` each period's
step is compiled with its active blocks fixed, and the frozen blocks get
no weight gradient in any of the three passes
(:func:`dataweights.train.lisa.fixed_blocks`). Batches are drawn
uniformly over the sources (:class:`dataweights.data.instructions.PairSampler`); ``lam`` only
reweights the losses, so the method emits no sampling weights.

Checkpoints: the method state (``u``, both optimiser states of ``u`` and
``p``, ``p``) and the run's state (``w``, its optimiser and LISA state)
are one pytree, saved and restored bit-exactly with the sampler state by
:class:`dataweights.train.loop.Trainer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dataweights.configs.base import (
  ConfigError,
  check_choice,
  check_in_range,
  check_int,
  check_positive,
  check_profile,
  from_profile,
)
from dataweights.configs.train import SCHEDULES, TrainConfig
from dataweights.methods import scalebio as sb
from dataweights.train import lisa as lisa_lib
from dataweights.train import optim
from dataweights.train.method import Method, StepContext

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
W_PASSES: tuple[str, ...] = ("joint", "split")


def _scaled(schedule: optax.Schedule, tau: float, round_steps: int):
  if tau == 1.0 or round_steps <= 0:
    return schedule
  return lambda count: schedule(count) * sb.lr_scale_at(count, tau, round_steps)


@dataclasses.dataclass(frozen=True)
class ScaleBiO(Method):
  """ScaleBiO's hyperparameters (a frozen, hashable config with profiles).

  ``w``'s optimiser comes from the run's :class:`TrainConfig` through
  :meth:`w_optimizer`; the fields here set ``u``'s and ``p``'s.

  Attributes:
    profile: the preset (smoke | book | paper).
    alpha: penalty weight (> 0); the released GPT-2 script uses 10.
    tau: growth of ``alpha`` per outer round (1: constant).
    round_steps: steps per outer round (0: one round, ``alpha`` constant).
    scale_lr_by_tau: divide every learning rate by ``tau^round`` (the
      released code does).
    optimizer: ``adamw`` or ``sgd`` (no momentum) for ``u`` and ``p``.
    lr_u: ``u``'s peak learning rate.
    weight_decay_u: ``u``'s decoupled weight decay (rank >= 2 parameters).
    lr_p: the source logits' peak learning rate (the paper: 1e-2).
    schedule: shape of ``u``'s and ``p``'s schedules (``constant``,
      ``cosine``, ``inverse_sqrt``), each with its own peak.
    warmup_steps: linear warm-up of those schedules.
    steps: length of the cosine schedule.
    min_lr_ratio: final fraction of the cosine schedule.
    b1, b2, eps: Adam constants of ``u`` and ``p``.
    grad_clip_u: clip ``u``'s gradient norm (0: off; the released code
      clips at 1e9, i.e. not at all).
    lisa_active: LISA's active blocks in ``u`` and ``w`` (0: no LISA).
    lisa_period: steps between redraws of the active blocks.
    lisa_seed: seed of the block choice (shared by ``u`` and ``w``).
    w_pass: how ``w``'s gradient is taken. ``joint``: one pass over the
      training and validation rows together (the chapter's runs; the
      step's ``loss`` metric covers both). ``split``: a pass over the
      training rows, then one over the validation rows, then ``u``'s pass
      (optimisation barriers order them), so that no pass holds more rows
      than the larger of the two batches: the compiled peak stays near
      one plain fine-tuning step's (benchmarks/bench_scalebio.py); the
      step's ``loss`` metric is then the training rows' weighted loss.
      Both give the three gradients of the penalty objective
      (tests/test_scalebio.py).
  """

  name: str = "scalebio"
  profile: str = "book"
  alpha: float = 10.0
  tau: float = 1.0
  round_steps: int = 0
  scale_lr_by_tau: bool = True
  optimizer: str = "adamw"
  lr_u: float = 1e-3
  weight_decay_u: float = 5e-4
  lr_p: float = 1e-2
  schedule: str = "constant"
  warmup_steps: int = 0
  steps: int = 300
  min_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_u: float = 0.0
  lisa_active: int = 0
  lisa_period: int = 20
  lisa_seed: int = 0
  w_pass: str = "joint"
  batches = ("valid",)

  def __post_init__(self):
    check_profile(self.profile)
    check_positive(self, "alpha", "tau", "lr_u", "lr_p", "eps")
    check_positive(self, "weight_decay_u", "grad_clip_u", allow_zero=True)
    check_int(self, "round_steps", "warmup_steps", "lisa_active", minimum=0)
    check_int(self, "steps", "lisa_period")
    check_int(self, "lisa_seed", minimum=0)
    check_choice(self, "optimizer", OPTIMIZERS)
    check_choice(self, "w_pass", W_PASSES)
    check_choice(self, "schedule", SCHEDULES)
    check_choice(self, "scale_lr_by_tau", (True, False))
    check_in_range(self, "min_lr_ratio", 0.0, 1.0)
    check_in_range(self, "b1", 0.0, 0.999999)
    check_in_range(self, "b2", 0.0, 0.999999)
    if self.schedule == "inverse_sqrt" and self.warmup_steps == 0:
      raise ConfigError(
        "ScaleBiO.warmup_steps = 0 is invalid with schedule='inverse_sqrt'; "
        "it must be an integer >= 1"
      )

  # ------------------------------------------------------------ optimisers

  def _cfg(self, lr: float, weight_decay: float, clip: float) -> TrainConfig:
    return TrainConfig(
      profile=self.profile,
      optimizer="adamw" if self.optimizer == "adamw" else "sgd",
      learning_rate=lr,
      schedule=self.schedule,
      warmup_steps=self.warmup_steps,
      min_lr_ratio=self.min_lr_ratio,
      steps=self.steps,
      grad_clip=clip,
      weight_decay=weight_decay,
      b1=self.b1 if self.optimizer == "adamw" else 0.0,
      b2=self.b2,
      eps=self.eps,
      progress=False,
    )

  def _tx(
    self, cfg: TrainConfig, *, lisa: bool
  ) -> optax.GradientTransformation:
    """AdamW/SGD of ``cfg`` (or LISA with it) on the tau-scaled schedule."""
    tau = self.tau if self.scale_lr_by_tau else 1.0
    schedule = _scaled(optim.make_schedule(cfg), tau, self.round_steps)
    if lisa and self.lisa_active:
      if cfg.optimizer != "adamw":
        raise ConfigError(
          f"LISA here runs AdamW; optimizer = {cfg.optimizer!r} is invalid "
          "with lisa_active > 0"
        )
      return lisa_lib.lisa(
        schedule,
        num_active=self.lisa_active,
        period=self.lisa_period,
        seed=self.lisa_seed,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
      )
    if tau != 1.0 and self.round_steps > 0:
      return _with_schedule(cfg, schedule)
    return optim.make_optimizer(cfg)

  def w_optimizer(self, train_cfg: TrainConfig) -> optax.GradientTransformation:
    """The optimiser of ``w`` (the run's ``tx``): ``train_cfg``'s AdamW,
    with LISA when ``lisa_active > 0`` (same blocks as ``u``'s) and the
    tau-scaled schedule."""
    return self._tx(train_cfg, lisa=True)

  def u_optimizer(self) -> optax.GradientTransformation:
    """``u``'s optimiser: AdamW (or LISA) with ``lr_u``."""
    return self._tx(
      self._cfg(self.lr_u, self.weight_decay_u, self.grad_clip_u), lisa=True
    )

  def lisa_schedule(self, num_blocks: int):
    """``step -> active blocks`` of ``u``'s and ``w``'s LISA, for the
    trainer's lean mode (``Trainer(fixed_blocks=...)``).

    Raises:
      ConfigError: LISA is off (``lisa_active = 0``).
    """
    if not self.lisa_active:
      raise ConfigError(
        "ScaleBiO.lisa_schedule needs LISA; lisa_active = 0 is invalid here"
      )
    return lisa_lib.block_schedule(
      seed=self.lisa_seed,
      period=self.lisa_period,
      num_blocks=num_blocks,
      num_active=self.lisa_active,
    )

  def p_optimizer(self) -> optax.GradientTransformation:
    """The source logits' optimiser: AdamW (no decay) with ``lr_p``."""
    return self._tx(self._cfg(self.lr_p, 0.0, 0.0), lisa=False)

  # ----------------------------------------------------------------- hooks

  def init(self, params, key, num_domains):
    del key
    if num_domains is None:
      raise ValueError(
        "ScaleBiO learns one weight per training source but the run has no "
        "source names; pass domain_names=[...] to the Trainer"
      )
    k = int(num_domains)
    if k < 1:
      raise ValueError(f"ScaleBiO needs at least one source; got {k}")
    p_K = jnp.zeros((k,), jnp.float32)
    return {
      "u": jax.tree.map(lambda x: jnp.array(x, copy=True), params),
      "u_opt": self.u_optimizer().init(params),
      "p_K": p_K,
      "p_opt": self.p_optimizer().init(p_K),
    }

  def _alpha(self, step):
    return sb.alpha_at(step, self.alpha, self.tau, self.round_steps)

  def select(self, mstate, ctx: StepContext):
    train, valid = ctx.batches["train"], ctx.batches["valid"]
    if "domain_B" not in train:
      raise ValueError(
        "ScaleBiO needs the source of every training row ('domain_B'); the "
        f"'train' batch has only {sorted(train)}"
      )
    k = mstate["p_K"].shape[0]
    lam_K = sb.lambdas(mstate["p_K"])
    alpha = self._alpha(ctx.step)
    if self.w_pass == "split":
      # The passes are taken in loss_and_grads().
      weight_B = alpha * sb.example_weights(train["domain_B"], lam_K)
      return dict(train), weight_B, mstate
    b_val = valid["tokens_BxL"].shape[0]
    weight_B = jnp.concatenate(
      [
        alpha * sb.example_weights(train["domain_B"], lam_K),
        jnp.full((b_val,), 1.0 / b_val, jnp.float32),
      ]
    )
    keys = ("tokens_BxL", "mask_BxL")
    batch = {
      key: jnp.concatenate([train[key], valid[key]])
      for key in keys
      if key in train
    }
    # Validation rows belong to no training source (id K).
    batch["domain_B"] = jnp.concatenate(
      [train["domain_B"], jnp.full((b_val,), k, train["domain_B"].dtype)]
    )
    return batch, weight_B, mstate

  def _step_u(self, mstate, ctx: StepContext, train, wt_B):
    """``u``'s pass on the training rows and its optimiser step."""
    u = mstate["u"]
    _, loss_u_B, g_u = ctx.grad_fn(u, train, wt_B)
    # grad_fn normalises by the weight sum: alpha grad L_tr(u, lam) exactly.
    g_u = jax.tree.map(lambda g: g * jnp.sum(wt_B).astype(g.dtype), g_u)
    u_upd, u_opt = self.u_optimizer().update(g_u, mstate["u_opt"], u)
    return optax.apply_updates(u, u_upd), u_opt, loss_u_B

  def loss_and_grads(self, mstate, ctx: StepContext, batch, weight_B, key):
    """``w_pass="split"``: ``w``'s two passes, the validation rows' second.

    The training rows' pass, then (after an optimisation barrier that
    carries the gradient, the parameters and the validation rows, so that
    XLA starts the pass, parameter gathers included, only then) the
    validation rows' pass. Returns ``w``'s gradient unnormalised,
    ``grad_w [L_val(w) + alpha L_tr(w, lam)]``; :meth:`update` takes
    ``u``'s pass after both and steps ``u`` and ``p``. (``u`` first would
    be no better: the step keeps the old state alive to its end for the
    non-finite guard, so a ``u`` updated early is an extra copy.) Dropout
    is not used (as in the joint form).
    """
    del key
    if self.w_pass != "split":
      return None
    loss, loss_B, g_tr = ctx.grad_fn(ctx.params, batch, weight_B)
    weight_sum = jnp.sum(weight_B)
    g_tr = jax.tree.map(lambda g: g * weight_sum.astype(g.dtype), g_tr)
    # Only what is trained passes the barrier (frozen LISA blocks' zero
    # gradients would be stored by it).
    g_live, rebuild = lisa_lib.trainable_leaves(g_tr)
    g_live, w, valid = jax.lax.optimization_barrier(
      (g_live, ctx.params, ctx.batches["valid"])
    )
    g_tr = rebuild(g_live)
    _, val_B, g_val = ctx.grad_fn(w, valid, None)
    g_w = jax.tree.map(jnp.add, g_tr, g_val)
    return (loss, loss_B, g_w, weight_sum), dict(mstate, _val_B=val_B)

  def update(self, mstate, ctx: StepContext, grads, loss_B, batch):
    train = ctx.batches["train"]
    b = train["tokens_BxL"].shape[0]
    k = mstate["p_K"].shape[0]
    lam_K = sb.lambdas(mstate["p_K"])
    alpha = self._alpha(ctx.step)
    wt_B = alpha * sb.example_weights(train["domain_B"], lam_K)
    if self.w_pass == "split":
      # loss_and_grads took w's two passes: grad_w F, unnormalised.
      mstate = dict(mstate)
      val_B = mstate.pop("_val_B")
      g_w, loss_w_B = grads, loss_B
    else:
      # The step's gradient is normalised by the weight sum
      # alpha * sum_{present} lam_k + 1; undo it: grad_w F exactly.
      total = jnp.sum(wt_B) + 1.0
      g_w = jax.tree.map(lambda g: g * total.astype(g.dtype), grads)
      loss_w_B, val_B = loss_B[:b], loss_B[b:]
    # u: descends alpha L_tr(u, lam) on the same rows. The barrier makes
    # u's pass wait for w's gradients: the passes are independent, and XLA
    # otherwise keeps their activations alive at once (compiled peak at
    # GPT-2 124M shape, benchmarks/bench_scalebio.py).
    g_live, rebuild = lisa_lib.trainable_leaves(g_w)
    g_live, u, train = jax.lax.optimization_barrier(
      (g_live, mstate["u"], train)
    )
    g_w = rebuild(g_live)
    u_new, u_opt, loss_u_B = self._step_u(dict(mstate, u=u), ctx, train, wt_B)
    # p: grad_p F = J(lam)^T alpha (m^w - m^u).
    m_w, count_K = sb.source_means(loss_w_B, train["domain_B"], k)
    m_u, _ = sb.source_means(loss_u_B, train["domain_B"], k)
    g_p = sb.lambda_grad(lam_K, alpha * (m_w - m_u))
    p_upd, p_opt = self.p_optimizer().update(
      g_p, mstate["p_opt"], mstate["p_K"]
    )
    p_new = optax.apply_updates(mstate["p_K"], p_upd)
    new = {"u": u_new, "u_opt": u_opt, "p_K": p_new, "p_opt": p_opt}
    tr_w = jnp.dot(lam_K, m_w)
    tr_u = jnp.dot(lam_K, m_u)
    metrics = {
      "val_loss": jnp.mean(val_B),
      "train_loss_w": tr_w,
      "train_loss_u": tr_u,
      "penalty_gap": tr_w - tr_u,
      "alpha": alpha,
      "grad_p_norm": jnp.linalg.norm(g_p),
    }
    lam_new = sb.lambdas(p_new)
    metrics.update({f"lambda/{i}": lam_new[i] for i in range(k)})
    metrics.update({f"count/{i}": count_K[i] for i in range(k)})
    return g_w, new, metrics


def _with_schedule(cfg: TrainConfig, schedule) -> optax.GradientTransformation:
  """:func:`optim.make_optimizer` of ``cfg`` with another schedule."""
  if cfg.optimizer == "adamw":
    opt = optax.adamw(
      schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=optim.decay_mask,
    )
  elif cfg.optimizer == "adam":
    opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  else:
    parts = []
    if cfg.weight_decay:
      parts.append(
        optax.add_decayed_weights(cfg.weight_decay, mask=optim.decay_mask)
      )
    parts.append(optax.sgd(schedule, momentum=cfg.b1 or None))
    opt = optax.chain(*parts)
  if cfg.grad_clip:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


SCALEBIO_PRESETS: dict[str, dict[str, Any]] = {
  "smoke": dict(steps=8, lr_u=1e-2, lr_p=5e-2, lisa_period=2),
  "book": dict(steps=300, lr_u=1e-3, lr_p=5e-2),
  # The released GPT-2 / 8B scripts: alpha 10 (100 at 8B), peak lr 1e-5,
  # lambda lr 1e-2, cosine, decay 5e-4; LISA 2 blocks every 20 steps.
  # w_pass "split": the lower peak memory at GPT-2 scale.
  "paper": dict(
    steps=3000,
    lr_u=1e-5,
    lr_p=1e-2,
    schedule="cosine",
    lisa_active=2,
    lisa_period=20,
    w_pass="split",
  ),
}


def scalebio(profile: str = "book", **overrides: Any) -> ScaleBiO:
  """The ScaleBiO method for ``profile`` with ``overrides``.

  Raises:
    ConfigError: unknown profile or field, or an invalid value (e.g.
      ``alpha <= 0``), naming the field.
  """
  return from_profile(ScaleBiO, SCALEBIO_PRESETS, profile, overrides)
