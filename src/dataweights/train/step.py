"""The pure train step ``train_step(state, batches) -> (state, metrics)``.

:func:`make_train_step` builds it from the static parts, a pluggable
per-example loss and a data-selection method (:mod:`dataweights.train.method`);
it is made of two reusable halves, :func:`make_grad_fn` (loss and gradient,
accumulated) and :func:`apply_gradients` (the optimiser), so that methods can
add meta-steps between them. :func:`jit_train_step` jits it once with
explicit in/out shardings and donates the state (nanodo's ``train.py``
pattern).

Objective. With per-example losses ``loss_b`` and weights ``weight_b``
(default 1), the step minimises

  ``L = sum_b weight_b loss_b / sum_b weight_b``.

Weights come from ``batch["weight_B"]`` (per-example weights, e.g. from a
weighting network) times, if ``state.extra["w_K"]`` is present, the domain
weights realised per example by
:func:`dataweights.metrics.domain_to_example_weights` (``w_K[d_b] / n_K``),
which makes ``L = sum_K w_K L_K / sum_K w_K`` over the domains present: the
DoReMi / ScaleBiO training objective. Weights are data: no gradient flows
into them here.

Gradient accumulation. The weights are computed on the whole batch, then
the batch is split into ``A`` strided microbatches (rows ``j::A``, so a
sharded batch needs no communication) and ``lax.scan`` sums the
gradients of ``sum_b weight_b loss_b``; dividing by the total weight gives
exactly the one-big-batch gradient (up to float summation order).

Non-finite guard. If the loss, the model's gradient, the applied gradient or
the method state is NaN/inf, the update is skipped inside the step (the
returned state equals the input state), ``state.halted`` becomes 1 so that
every later step is skipped too, and ``metrics["nonfinite"]`` is 1; the host
loop, which reads metrics one step late, then stops with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dataweights import metrics as metrics_lib
from dataweights.train import lisa as lisa_lib
from dataweights.train.jaxpr_passes import drop_noop_reduce_precision
from dataweights.train.method import Method, Plain, StepContext
from dataweights.train.state import StaticParts, TrainState

Batch = dict[str, jax.Array]
SAMPLING_WEIGHTS = "sampling/w_K"
"""Metrics key of the method's sampling weights (a ``(K,)`` vector)."""
# loss_fn(model, batch, key) -> loss_B; key is None when no randomness is due.
LossFn = Callable[[nnx.Module, Batch, jax.Array | None], jax.Array]


def lm_loss(
  model: nnx.Module,
  batch: Batch,
  key: jax.Array | None,
  *,
  fused: bool = False,
) -> jax.Array:
  """Per-example next-token cross-entropy (nats/token), the default loss.

  The model reads ``tokens_BxL[:, :-1]`` and predicts ``tokens_BxL[:, 1:]``.
  With a ``mask_BxL`` (true, or a weight, at real tokens) the model also
  gets ``mask_BxL=mask_BxL[:, :-1]`` (real tokens never attend to padding,
  whichever side it is on) and a prediction counts only when its input and
  its target are real tokens
  (:func:`~dataweights.models.transformer.next_token_mask`): a left- or
  right-padded row has the loss of its real tokens alone.

  Args:
    model: a model mapping ``tokens_BxL`` to ``logits_BxLxV`` that accepts
      a ``mask_BxL`` keyword when the batch has a mask, and a
      ``dropout_key`` keyword when ``key`` is not None.
    batch: ``{"tokens_BxL": int, "mask_BxL": optional padding mask}``.
    key: dropout key or None.
    fused: the cross-entropy with a hand-written backward pass
      (:func:`~dataweights.models.transformer.token_xent`; see
      :func:`lm_loss_fused`).

  Returns:
    loss_B, float32.
  """
  from dataweights.models.transformer import next_token_mask, per_example_loss

  tokens_BxL = batch["tokens_BxL"]
  mask_BxL = batch.get("mask_BxL")
  kwargs = {} if key is None else {"dropout_key": key}
  if mask_BxL is not None:
    kwargs["mask_BxL"] = mask_BxL[:, :-1]
  logits_BxLxV = model(tokens_BxL[:, :-1], **kwargs)
  target_mask = None if mask_BxL is None else next_token_mask(mask_BxL)
  return per_example_loss(
    logits_BxLxV, tokens_BxL[:, 1:], target_mask, fused=fused
  )


def lm_loss_fused(
  model: nnx.Module, batch: Batch, key: jax.Array | None
) -> jax.Array:
  """:func:`lm_loss` with the lean cross-entropy backward pass.

  The same loss up to float rounding; the backward pass holds the logits
  and one gradient of their size instead of what XLA's fusion of the
  autodiff of ``log_softmax`` keeps (several ``(B, L, V)`` buffers at
  GPT-2's vocabulary). The project's chapters use :func:`lm_loss` (their
  published numbers); large-vocabulary runs and the memory benchmark
  (benchmarks/bench_scalebio.py) use this one.
  """
  return lm_loss(model, batch, key, fused=True)


def example_weights(batch: Batch, extra: dict[str, Any]) -> jax.Array:
  """The per-example weights of the objective (see the module docstring)."""
  batch_size = jax.tree.leaves(batch)[0].shape[0]
  weight_B = jnp.ones((batch_size,), jnp.float32)
  if "weight_B" in batch:
    weight_B = weight_B * jnp.asarray(batch["weight_B"], jnp.float32)
  if "w_K" in extra:
    if "domain_B" not in batch:
      raise ValueError(
        "state.extra has domain weights 'w_K' but the batch has no "
        "'domain_B'; domain weights need the domain id of every example"
      )
    weight_B = weight_B * metrics_lib.domain_to_example_weights(
      batch["domain_B"], extra["w_K"]
    )
  return jax.lax.stop_gradient(weight_B)


def _split_microbatches(batch: Batch, num: int) -> Batch:
  """``(B, ...) -> (num, B / num, ...)``, microbatch ``j`` = rows ``j::num``.

  Strided rather than contiguous: with the batch split over devices along
  axis 0, every device keeps its own rows in every microbatch (no
  communication).
  """

  def split(x):
    if x.shape[0] % num:
      raise ValueError(
        f"batch of {x.shape[0]} examples cannot be split into "
        f"accumulation_steps = {num} equal microbatches"
      )
    return x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def make_grad_fn(
  static: StaticParts,
  *,
  loss_fn: LossFn = lm_loss,
  accumulation_steps: int = 1,
  drop_reduce_precision: bool = True,
) -> Callable[..., tuple[jax.Array, jax.Array, Any]]:
  """The weighted loss and its gradient, accumulated over microbatches.

  Args:
    static: graphdef and optax transformation.
    loss_fn: ``loss_fn(model, batch, key) -> loss_B``.
    accumulation_steps: microbatches per update; must divide the batch.
    drop_reduce_precision: remove the no-op float32 ``reduce_precision``
      that ``jax.checkpoint`` puts on saved residuals
      (:mod:`dataweights.train.jaxpr_passes`; same values, faster on
      XLA:CPU). False keeps JAX's program as it is.

  Returns:
    ``grad_fn(params, model_state, batch, weight_B, key) -> (loss, loss_B,
    grads, weight_sum)`` with ``loss = sum_b w_b loss_b / sum_b w_b`` and
    ``grads`` its gradient (the one-big-batch gradient whatever the number
    of microbatches, up to float summation order).
  """
  num_micro = int(accumulation_steps)
  if num_micro < 1:
    raise ValueError(f"accumulation_steps = {num_micro} must be >= 1")

  def weighted_sum(params, model_state, micro, key):
    # Under lisa.fixed_blocks the frozen blocks are constants: no weight
    # gradient is formed for them (their gradients are zeros).
    params = lisa_lib.freeze_inactive(params)
    model = nnx.merge(static.graphdef, params, model_state, copy=True)
    loss_B = loss_fn(model, micro, key).astype(jnp.float32)
    if loss_B.ndim != 1:
      raise ValueError(
        f"loss_fn must return per-example losses of shape (B,); got "
        f"{loss_B.shape}"
      )
    return jnp.sum(micro["weight_B"] * loss_B), loss_B

  vg = jax.value_and_grad(weighted_sum, has_aux=True)
  if drop_reduce_precision:
    vg = drop_noop_reduce_precision(vg)

  def grad_fn(params, model_state, batch, weight_B, key):
    batch = dict(batch, weight_B=weight_B)
    if num_micro == 1:
      (total, loss_B), grads = vg(params, model_state, batch, key)
    else:
      micro_AxB = _split_microbatches(batch, num_micro)

      # The carry holds only what is trained (all leaves unless
      # lisa.fixed_blocks freezes blocks).
      def body(carry, inp):
        g_acc, t_acc = carry
        i, micro = inp
        k = None if key is None else jax.random.fold_in(key, i)
        (t, loss_b), g = vg(params, model_state, micro, k)
        g_live, _ = lisa_lib.trainable_leaves(g)
        return ([a + b for a, b in zip(g_acc, g_live)], t_acc + t), loss_b

      zeros, rebuild = lisa_lib.trainable_leaves(
        jax.tree.map(jnp.zeros_like, params)
      )
      (g_live, total), loss_AxB = jax.lax.scan(
        body,
        (zeros, jnp.zeros((), jnp.float32)),
        (jnp.arange(num_micro), micro_AxB),
      )
      grads = rebuild(g_live)
      loss_B = loss_AxB.swapaxes(0, 1).reshape(-1)  # back to batch order
    weight_sum = jnp.sum(weight_B)
    denom = jnp.maximum(weight_sum, jnp.finfo(jnp.float32).tiny)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    return total / denom, loss_B, grads, weight_sum

  return grad_fn


def apply_gradients(
  tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any
) -> tuple[Any, Any, Any]:
  """One optimiser update: ``(params, opt_state, updates)``."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, updates


def _as_batches(batch_or_batches: Any) -> dict[str, Batch]:
  """``{"train": batch}`` for a single batch; named batches as they are."""
  b = dict(batch_or_batches)
  if "train" in b and isinstance(b["train"], dict):
    return b
  return {"train": b}


# How a non-finite step keeps the old state (make_train_step's ``guard``).
GUARDS = ("select", "cond")


def guard_for(mesh: jax.sharding.Mesh | None) -> str:
  """:func:`make_train_step`'s ``guard`` for a device mesh.

  ``"cond"`` on a mesh of several CPU devices (host devices made with
  ``--xla_force_host_platform_device_count``), ``"select"`` otherwise: one
  device (the published chapters' programs), or accelerators, where the
  selects fuse into the update and a ``cond`` may have to read its
  predicate on the host.
  """
  if mesh is None or mesh.size < 2:
    return "select"
  cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
  return "cond" if cpu else "select"


def make_train_step(
  static: StaticParts,
  *,
  loss_fn: LossFn = lm_loss,
  accumulation_steps: int = 1,
  domain_names: Sequence[str] | None = None,
  schedule: optax.Schedule | None = None,
  use_rng: bool = False,
  method: Method | None = None,
  drop_reduce_precision: bool = True,
  guard: str = "select",
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the pure step ``train_step(state, batches) -> (state, metrics)``.

  ``batches`` is one batch, or a dict of named batches (``"train"`` and
  those the method consumes). The step is: the method selects and weights
  the training rows, the model's loss and gradient are computed
  (:func:`make_grad_fn`), the method's meta-steps run and may change the
  gradient, the optimiser applies it (:func:`apply_gradients`), and the
  method looks at the new parameters (see :mod:`dataweights.train.method`).

  Args:
    static: graphdef and optax transformation.
    loss_fn: ``loss_fn(model, batch, key) -> loss_B`` (see :func:`lm_loss`).
    accumulation_steps: microbatches per update; must divide the batch.
    domain_names: names of the K domains; with ``batch["domain_B"]`` the
      metrics get ``loss/domain/{name}`` and ``count/domain/{name}``.
    schedule: the learning-rate schedule, reported as ``lr``.
    use_rng: pass ``fold_in(fold_in(rng, step), microbatch)`` to ``loss_fn``
      (dropout); otherwise ``key`` is None.
    method: the data-selection method (default: none); its state is
      ``state.extra["method"]``.
    drop_reduce_precision: see :func:`make_grad_fn`.
    guard: how a non-finite step keeps the old state: ``"select"``, a
      ``jnp.where`` per state leaf (one device; the published chapters'
      programs), or ``"cond"``, one ``lax.cond`` between the new and the
      old state. The values are the same, but XLA fuses the two programs
      differently, so they differ by float rounding. With the state
      replicated over two CPU host devices, the per-leaf selects left the
      devices waiting for each other at the gradient all-reduce: in the
      book LM's step, the time beyond forward+backward was 22 ms with
      ``"select"`` and 12-17 ms with ``"cond"`` (``bench_host_devices.py``).
      :class:`dataweights.train.loop.Trainer` picks ``"cond"`` on a CPU
      mesh of more than one device (:func:`guard_for`); elsewhere it keeps
      ``"select"``, which fuses into the update (an accelerator's ``cond``
      may have to read its predicate on the host).

  Returns:
    The pure step function. Metrics (float32 scalars): ``loss`` (the
    weighted objective), ``loss/mean`` (unweighted mean of loss_B),
    ``grad_norm``, ``param_norm``, ``update_norm``, ``weight_sum``,
    ``nonfinite``, ``lr`` (with a schedule), per-domain keys and the
    method's own metrics (``method/...``).
  """
  if guard not in GUARDS:
    raise ValueError(f"guard={guard!r}; allowed: {', '.join(GUARDS)}")
  method = method or Plain()
  grad_fn = make_grad_fn(
    static,
    loss_fn=loss_fn,
    accumulation_steps=accumulation_steps,
    drop_reduce_precision=drop_reduce_precision,
  )
  num_domains = None if domain_names is None else len(domain_names)

  def train_step(state: TrainState, batches: Any):
    batches = _as_batches(batches)
    step_key = state.step_key()
    dropout_key = step_key if use_rng else None
    mstate = state.extra.get("method", {})

    def params_loss(params, batch, weight_B=None, key=None):
      model = nnx.merge(static.graphdef, params, state.model_state, copy=True)
      return loss_fn(model, batch, key).astype(jnp.float32)

    def params_grad(params, batch, weight_B):
      loss, loss_B, grads, _ = grad_fn(
        params,
        state.model_state,
        batch,
        jnp.ones(jax.tree.leaves(batch)[0].shape[0], jnp.float32)
        if weight_B is None
        else jax.lax.stop_gradient(weight_B),
        None,
      )
      return loss, loss_B, grads

    ctx = StepContext(
      step=state.step,
      key=jax.random.fold_in(step_key, 0x6D657468),  # "meth": not dropout's
      params=state.params,
      model_state=state.model_state,
      batches=batches,
      loss_fn=params_loss,
      grad_fn=params_grad,
      num_domains=num_domains,
      opt_state=state.opt_state,
      tx=static.tx,
      model_fn=lambda p: nnx.merge(
        static.graphdef, p, state.model_state, copy=True
      ),
    )
    batch, method_weight_B, mstate = method.select(mstate, ctx)
    weight_B = example_weights(batch, state.extra)
    if method_weight_B is not None:
      weight_B = weight_B * jax.lax.stop_gradient(method_weight_B)
    fused = method.loss_and_grads(mstate, ctx, batch, weight_B, dropout_key)
    if fused is None:
      loss, loss_B, grads, weight_sum = grad_fn(
        state.params, state.model_state, batch, weight_B, dropout_key
      )
    else:
      (loss, loss_B, grads, weight_sum), mstate = fused
    raw_grad_norm = metrics_lib.global_norm(grads)
    grads, mstate, m_metrics = method.update(mstate, ctx, grads, loss_B, batch)
    params, opt_state, updates = apply_gradients(
      static.tx, state.params, state.opt_state, grads
    )
    mstate, m_post = method.post_update(mstate, ctx, params)
    m_metrics = {**m_metrics, **m_post}

    grad_norm = metrics_lib.global_norm(grads)
    ok = (
      jnp.isfinite(loss)
      & jnp.isfinite(raw_grad_norm)
      & jnp.isfinite(grad_norm)
      & (state.halted == 0)
    )
    # One reduction over the method state's leaves, behind a barrier: a
    # chain of per-leaf ANDs is cheap enough for XLA to copy into every
    # consumer (each jnp.where below), which made the optimised program
    # quadratic in the number of leaves (ScaleBiO's u and its moments:
    # 77k HLO lines instead of 14k, compile time x4).
    finite = [
      jnp.all(jnp.isfinite(v))
      for v in jax.tree.leaves(mstate)
      if jnp.issubdtype(v.dtype, jnp.inexact)
    ]
    if finite:
      ok = ok & jnp.all(jnp.stack(finite))
    ok = jax.lax.optimization_barrier(ok)
    extra = dict(state.extra)
    if "method" in extra or jax.tree.leaves(mstate):
      extra["method"] = mstate
    new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, extra=extra
    )
    # Skip the update on NaN/inf, and every later one (`halted` is sticky):
    # the host loop reads the metrics one step late and then stops.
    if guard == "cond":
      new_state = jax.lax.cond(ok, lambda: new_state, lambda: state)
    else:
      new_state = jax.tree.map(
        lambda new, old: jnp.where(ok, new, old), new_state, state
      )
    new_state = new_state.replace(
      halted=jnp.where(ok, state.halted, jnp.ones_like(state.halted))
    )
    out = {
      "loss": loss,
      "loss/mean": jnp.mean(loss_B),
      "grad_norm": grad_norm,
      "update_norm": metrics_lib.global_norm(updates),
      "param_norm": metrics_lib.global_norm(new_state.params),
      "weight_sum": weight_sum,
      "nonfinite": 1.0 - ok.astype(jnp.float32),
    }
    if schedule is not None:
      out["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    if domain_names is not None and "domain_B" in batch:
      loss_K, count_K = metrics_lib.per_domain_mean(
        loss_B, batch["domain_B"], len(domain_names)
      )
      out.update(metrics_lib.domain_metrics(loss_K, count_K, domain_names))
    w_K = method.sampling_weights(new_state.extra.get("method", {}))
    if w_K is not None:
      # The state is donated to the next step: the host reads the weights
      # for the sampler from here (a vector; History keeps scalars only).
      out[SAMPLING_WEIGHTS] = w_K
      if domain_names is not None and w_K.shape == (len(domain_names),):
        out.update({f"weight/{n}": w_K[k] for k, n in enumerate(domain_names)})
    out.update({f"method/{k}": v for k, v in m_metrics.items()})
    out = {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}
    return new_state, out

  return train_step


def jit_train_step(
  train_step: Callable[..., Any],
  state_shardings: Any,
  batch_sharding: Any,
  metrics_sharding: Any,
) -> Callable[..., Any]:
  """``jax.jit`` with explicit shardings and the state donated.

  Args:
    train_step: the pure step from :func:`make_train_step`.
    state_shardings: ``TrainState``-shaped pytree of shardings.
    batch_sharding: one sharding for every batch array (leading axis split
      over the data axes), or a dict of them.
    metrics_sharding: sharding of the metric scalars (replicated).

  Returns:
    The jitted step; the input state's buffers are donated, so do not use
    the state passed in after the call.
  """
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, metrics_sharding),
    donate_argnums=(0,),
  )
