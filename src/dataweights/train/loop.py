"""The host loop: batches in, jitted steps, metrics, checkpoints, resume.

``train_lm(model_cfg, train_cfg, batches)`` trains a language model end to
end; :class:`Trainer` is the same with the pieces exposed (custom loss, a
data-selection :class:`~dataweights.train.method.Method`, evaluation
callback).

Batches come from a :class:`~dataweights.train.feeder.Feeder` of named
sources (a bare sampler, batch function or iterator is the ``"train"``
source): samplers with ``get_state``/``set_state`` are checkpointed and
resume exactly; a method's domain weights are fed to the ``"train"`` sampler
every step. Each batch is ``{"tokens_BxL": int32, "mask_BxL": optional loss
mask, "domain_B": optional int32, "weight_B": optional float}``; the
``"train"`` batch has ``train_cfg.batch_size`` rows.

The device never waits for the host: step ``s`` is dispatched before the
metrics (and method weights) of step ``s - 1`` are fetched, and the next
batches are drawn while step ``s`` runs. A non-finite step is therefore
seen one step late; the step after it is a no-op (``state.halted``), so the
error still carries the last good state.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import SingleDeviceSharding

with warnings.catch_warnings():
  # tqdm.auto warns at import in a notebook without ipywidgets (and then uses
  # the text bar); chapters train with progress=False, so the warning would
  # only clutter their pages.
  warnings.filterwarnings("ignore", message="IProgress not found")
  from tqdm.auto import tqdm

from dataweights import metrics as metrics_lib
from dataweights.checkpoint import CheckpointError, CheckpointManager
from dataweights.configs.train import RESUME_MUTABLE_FIELDS, TrainConfig
from dataweights.train import lisa as lisa_lib
from dataweights.train import optim
from dataweights.train.feeder import Feeder
from dataweights.train.method import Method, check_batches
from dataweights.train.state import (
  StaticParts,
  TrainState,
  abstract_state,
  init_train_state,
)
from dataweights.train.step import (
  SAMPLING_WEIGHTS,
  LossFn,
  guard_for,
  jit_train_step,
  lm_loss,
  make_train_step,
)

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
  """Training produced a NaN or infinity; the update was not applied.

  Attributes:
    step: the 1-based step whose update was rejected.
    keys: the metrics that were not finite.
    state: the last good state (the input of the failed step).
    checkpoint_step: the last good checkpoint on disk, or None.
  """

  def __init__(
    self,
    msg: str,
    *,
    step: int,
    keys: list[str],
    state: Any,
    checkpoint_step: int | None,
  ):
    super().__init__(msg)
    self.step, self.keys, self.state = step, keys, state
    self.checkpoint_step = checkpoint_step


def _config_dict(model_cfg: Any, train_cfg: TrainConfig, extra_keys) -> dict:
  model = (
    dataclasses.asdict(model_cfg)
    if dataclasses.is_dataclass(model_cfg)
    else model_cfg
  )
  return {
    "model": model,
    "train": train_cfg.to_dict(),
    "extra": sorted(extra_keys),
  }


class Trainer:
  """A training run: model, optimiser, compiled step, checkpoints.

  Args:
    model_cfg: the model config (a dataclass; saved with checkpoints).
    train_cfg: the training config.
    mesh: a device mesh (:func:`dataweights.sharding.make_mesh`), or None
      for one device.
    model_factory: ``factory(model_cfg, rngs) -> nnx.Module``; default the
      :class:`~dataweights.models.transformer.Transformer`.
    loss_fn: per-example loss ``loss_fn(model, batch, key) -> loss_B``.
    domain_names: names of the K domains for per-domain metrics.
    extra: initial extra state (e.g. fixed ``{"w_K": ...}`` domain loss
      weights).
    use_rng: give ``loss_fn`` a per-step key (dropout).
    method: a data-selection method; its state is created from the initial
      parameters and kept in ``state.extra["method"]``.
    tx: the optimiser (default :func:`~dataweights.train.optim.make_optimizer`
      of ``train_cfg``), e.g. LISA (:mod:`dataweights.train.lisa`) or a
      method's own (:meth:`~dataweights.train.scalebio.ScaleBiO.w_optimizer`).
    fixed_blocks: LISA's lean mode: ``fixed_blocks(step) -> active blocks``
      of update ``step`` (:func:`dataweights.train.lisa.block_schedule`,
      :meth:`~dataweights.train.scalebio.ScaleBiO.lisa_schedule`). Each
      step runs a program compiled for its period's active set
      (:func:`dataweights.train.lisa.fixed_blocks`; one compile per
      distinct set, cached), in which frozen blocks get no weight
      gradient. Needs a LISA optimiser with the same seed and period.
  """

  def __init__(
    self,
    model_cfg: Any,
    train_cfg: TrainConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    model_factory: Callable[[Any, nnx.Rngs], nnx.Module] | None = None,
    loss_fn: LossFn = lm_loss,
    domain_names: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
    use_rng: bool | None = None,
    method: Method | None = None,
    tx: optax.GradientTransformation | None = None,
    fixed_blocks: Callable[[int], Sequence[int]] | None = None,
  ):
    from dataweights import sharding

    if model_factory is None:
      from dataweights.models.transformer import Transformer

      model_factory = lambda cfg, rngs: Transformer(cfg, rngs=rngs)
    if use_rng is None:
      use_rng = bool(getattr(model_cfg, "dropout", 0.0))
    self.model_cfg, self.train_cfg, self.mesh = model_cfg, train_cfg, mesh
    self.domain_names = None if domain_names is None else list(domain_names)
    self.schedule = optim.make_schedule(train_cfg)
    tx = optim.make_optimizer(train_cfg) if tx is None else tx
    make = lambda: model_factory(model_cfg, nnx.Rngs(params=train_cfg.seed))
    if mesh is None:
      model = make()
      device = jax.devices()[0]
      self.batch_sharding = self.repl_sharding = SingleDeviceSharding(device)
    else:
      sharding.check_divisible(mesh, batch_size=train_cfg.microbatch_size)
      model = sharding.create_sharded(make, mesh)
      self.batch_sharding = sharding.batch_sharding(mesh, 1)
      self.repl_sharding = sharding.replicated(mesh)
    self.method = method
    extra = dict(extra or {})
    if method is not None:
      params = nnx.state(model, nnx.Param)
      extra["method"] = method.init_for_run(
        params,
        jax.random.fold_in(jax.random.key(train_cfg.seed), 0x6D657468),
        None if self.domain_names is None else len(self.domain_names),
        tx,
      )
    state, static, shardings = init_train_state(
      model, tx, seed=train_cfg.seed, extra=extra
    )
    self.state: TrainState = state
    self.static: StaticParts = static
    # make_train_step's guard: a cond on a CPU mesh of several devices.
    self.guard = guard_for(mesh)
    self.shardings = shardings
    self.step_fn = make_train_step(
      static,
      loss_fn=loss_fn,
      accumulation_steps=train_cfg.accumulation_steps,
      domain_names=self.domain_names,
      schedule=self.schedule,
      use_rng=use_rng,
      method=method,
      guard=self.guard,
    )
    # One batch sharding for every named batch (each split along axis 0).
    self.jit_step = jit_train_step(
      self.step_fn, shardings, self.batch_sharding, self.repl_sharding
    )
    self.fixed_blocks = fixed_blocks
    self._fixed_steps: dict[tuple[int, ...], Callable[..., Any]] = {}
    self.config = _config_dict(model_cfg, train_cfg, extra.keys())
    if method is not None:
      self.config["method"] = _method_config(method)
    self.ckpt = (
      None
      if train_cfg.checkpoint_dir is None
      else CheckpointManager(
        train_cfg.checkpoint_dir, keep=train_cfg.keep_checkpoints
      )
    )

  def model(self, state: TrainState | None = None) -> nnx.Module:
    """The model with ``state``'s (default: the current) parameters."""
    return self.static.model(self.state if state is None else state)

  def put_batch(self, batch: dict) -> dict:
    """Checks batch sizes and places the batch (or named batches) on devices.

    A single batch must have ``train_cfg.batch_size`` rows; with named
    batches that holds for ``"train"``, and every array of a batch must have
    that batch's number of rows. The token ids of host (numpy) data are
    checked to lie in ``[0, model_cfg.vocab_size)`` before anything reaches
    a device (ids already on a device are checked inside the model, see
    :mod:`dataweights.models.ids`).

    Raises:
      ValueError: a wrong number of rows.
      TokenIdError: a token id out of range (naming it, its position and
        the vocabulary size).
    """
    vocab_size = getattr(self.model_cfg, "vocab_size", None)
    named = "train" in batch and isinstance(batch["train"], dict)
    batches = batch if named else {"train": batch}
    placed = {}
    for name, b in batches.items():
      arrays = {
        k: np.asarray(v) if not isinstance(v, jax.Array) else v
        for k, v in b.items()
      }
      rows = {x.shape[0] if x.ndim else None for x in arrays.values()}
      want = self.train_cfg.batch_size if name == "train" else next(iter(rows))
      for key, x in arrays.items():
        if x.ndim == 0 or x.shape[0] != want:
          what = "train_cfg.batch_size" if name == "train" else "the batch's"
          raise ValueError(
            f"batch {name!r}: {key!r} has shape {x.shape}; every array must "
            f"have {what} = {want} rows"
          )
      tokens = arrays.get("tokens_BxL")
      if isinstance(tokens, np.ndarray) and vocab_size is not None:
        from dataweights.models.ids import check_token_ids

        check_token_ids(tokens, vocab_size, f"batch {name!r}: 'tokens_BxL'")
      if self.mesh is not None:
        from dataweights import sharding

        placed[name] = sharding.shard_batch(arrays, self.mesh)
      else:
        placed[name] = jax.device_put(arrays, self.batch_sharding)
    return placed if named else placed["train"]

  def restore(
    self, batches: Feeder | None = None, step: int | None = None
  ) -> metrics_lib.History:
    """Restores ``self.state`` (and the data stream) from a checkpoint.

    Returns:
      The metric history saved with the checkpoint.

    Raises:
      CheckpointError: none, corrupt, or incompatible with this run.
    """
    if self.ckpt is None:
      raise CheckpointError("train_cfg.checkpoint_dir is None: no checkpoints")
    restored = self.ckpt.restore(
      step,
      target=abstract_state(self.state, self.shardings),
      config=self.config,
      ignore_config=[f"train.{k}" for k in RESUME_MUTABLE_FIELDS],
    )
    self.state = restored.state
    if batches is not None:
      batches.resume(restored.step, restored.data_state)
    return metrics_lib.History.from_state_dict(restored.history or {})

  def save(self, batches: Feeder, history: metrics_lib.History) -> None:
    """Saves the current state, data-stream state and history."""
    assert self.ckpt is not None
    self.ckpt.save(
      int(self.state.step),
      self.state,
      data_state=batches.get_state(),
      history=history.state_dict(),
      config=self.config,
    )

  def _initial_weights(self) -> np.ndarray | None:
    """The method's sampling weights in the current state, on the host."""
    if self.method is None or not self.method.emits_weights:
      return None
    w = self.method.sampling_weights(self.state.extra["method"])
    return None if w is None else np.asarray(jax.device_get(w), np.float64)

  def step_for(self, step: int) -> Callable[..., Any]:
    """The jitted step that runs update ``step`` (0-based).

    ``jit_step``, or with ``fixed_blocks`` the step compiled for that
    update's active LISA blocks (built on first use, then cached).
    """
    if self.fixed_blocks is None:
      return self.jit_step
    active = tuple(sorted(int(a) for a in self.fixed_blocks(step)))
    if active not in self._fixed_steps:

      def fixed_step(state, batches, _active=active):
        with lisa_lib.fixed_blocks(_active):
          return self.step_fn(state, batches)

      self._fixed_steps[active] = jit_train_step(
        fixed_step, self.shardings, self.batch_sharding, self.repl_sharding
      )
    return self._fixed_steps[active]

  def run(
    self,
    batches: Any,
    *,
    resume: bool = True,
    steps: int | None = None,
    eval_fn: Callable[[nnx.Module, int], dict[str, float]] | None = None,
  ) -> tuple[TrainState, metrics_lib.History]:
    """Trains to ``steps`` (default ``train_cfg.steps``) updates.

    Args:
      batches: a :class:`~dataweights.train.feeder.Feeder`, a dict of named
        sources, or one source (sampler, batch function or iterator).
      resume: continue from the latest checkpoint in ``checkpoint_dir``
        (if any). With ``resume=False`` an existing checkpoint is an error,
        never silently overwritten.
      steps: stop after this many updates in total (default: the config's);
        checkpoints are written on ``checkpoint_every`` and at the end.
      eval_fn: ``eval_fn(model, step) -> {"eval/...": float}`` called every
        ``train_cfg.eval_every`` steps; merged into the history.

    Returns:
      ``(state, history)``.

    Raises:
      NonFiniteError: a step produced NaN/inf (message names the step and
        metrics); the last good checkpoint is kept.
      CheckpointError: an existing checkpoint is corrupt or incompatible.
      ValueError: the feeder lacks a batch the method needs.
    """
    cfg = self.train_cfg
    total = cfg.steps if steps is None else int(steps)
    feeder = batches if isinstance(batches, Feeder) else Feeder(batches)
    if self.method is not None:
      check_batches(self.method, feeder.names)
    history = metrics_lib.History()
    if self.ckpt is not None and self.ckpt.latest_step() is not None:
      if not resume:
        raise CheckpointError(
          f"{self.ckpt.directory} already holds checkpoints (steps "
          f"{self.ckpt.steps()}); pass resume=True to continue, or use a new "
          "checkpoint_dir"
        )
      history = self.restore(feeder)
      history.truncate(int(self.state.step))
      log.info("resumed from step %d", int(self.state.step))
    start = int(self.state.step)
    last_saved = self.ckpt.latest_step() if self.ckpt is not None else None
    bar = tqdm(
      total=total,
      initial=start,
      disable=not cfg.progress,
      desc="train",
      dynamic_ncols=True,
    )
    ctx = jax.set_mesh(self.mesh) if self.mesh is not None else _null()
    in_flight: tuple[int, Any] | None = None  # (done, device metrics)

    def settle(item) -> None:
      """Host work for a finished step: history, guard, eval, progress."""
      nonlocal last_saved
      done, m_dev = item
      m = jax.device_get(m_dev)
      if m["nonfinite"]:
        bad = metrics_lib.nonfinite_keys(m) or ["loss", "grad_norm"]
        where = (
          f"last good checkpoint: step {last_saved} in {self.ckpt.directory}"
          if last_saved is not None
          else "no checkpoint was saved yet"
        )
        good = self.state.replace(halted=jax.numpy.zeros_like(self.state.halted))
        raise NonFiniteError(
          f"non-finite training metrics at step {done}: {', '.join(bad)} "
          f"(loss={m['loss']}, grad_norm={m['grad_norm']}); the update was "
          f"not applied and training stopped; {where}",
          step=done,
          keys=bad,
          state=good,
          checkpoint_step=last_saved,
        )
      if done % cfg.log_every == 0 or done == total:
        history.append(done, m)
      bar.update(1)
      bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)

    try:
      with ctx:
        # Batch s is drawn with the weights after s - lag updates (see
        # dataweights.train.feeder); W[start] is in the restored state.
        prev_w = self._initial_weights()
        host_w = prev_w
        if feeder.pending_weights is not None:  # resumed: what the run used
          host_w = feeder.pending_weights
        batch = self.put_batch(feeder.next(start, host_w))
        for s in range(start, total):
          done = s + 1
          self.state, m = self.step_for(s)(self.state, batch)
          new_w = m.get(SAMPLING_WEIGHTS)
          previous, in_flight = in_flight, (done, m)
          if previous is not None:
            settle(previous)  # waits for step s - 1 only; step s runs on
          if new_w is not None:
            if feeder.lag == 1:  # W[s] for batch s + 1: step s - 1's output
              host_w = np.asarray(jax.device_get(prev_w), np.float64)
              prev_w = new_w
            else:  # W[s + 1]: wait for step s
              host_w = np.asarray(jax.device_get(new_w), np.float64)
          is_ckpt = self.ckpt is not None and (
            done % cfg.checkpoint_every == 0 or done == total
          )
          is_eval = (
            eval_fn is not None
            and cfg.eval_every
            and (done % cfg.eval_every == 0 or done == total)
          )
          if is_ckpt or is_eval:
            settle(in_flight)
            in_flight = None
            if is_eval:
              ev = {k: float(v) for k, v in eval_fn(self.model(), done).items()}
              if history.rows and history.rows[-1]["step"] == done:
                history.rows[-1].update(ev)
              else:
                history.append(done, ev)
            if is_ckpt:
              # Saved before the next batch is drawn, with the weights it
              # will use: the resumed run draws exactly the same batch.
              feeder.pending_weights = host_w
              self.save(feeder, history)
              last_saved = done
          if done < total:
            batch = self.put_batch(feeder.next(done, host_w))
        if in_flight is not None:
          settle(in_flight)
          in_flight = None
    finally:
      bar.close()
      if self.ckpt is not None:
        self.ckpt.wait()
    return self.state, history

  def close(self) -> None:
    """Waits for pending checkpoint writes."""
    if self.ckpt is not None:
      self.ckpt.close()


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _method_config(method: Method) -> dict[str, Any]:
  """The method's name and hyperparameters (saved with checkpoints)."""
  fields = (
    {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
    if dataclasses.is_dataclass(method)
    else {}
  )
  return {"class": type(method).__name__, **fields}


def train_lm(
  model_cfg: Any,
  train_cfg: TrainConfig,
  batches: Any,
  *,
  mesh: jax.sharding.Mesh | None = None,
  resume: bool = True,
  loss_fn: LossFn = lm_loss,
  domain_names: Iterable[str] | None = None,
  extra: dict[str, Any] | None = None,
  eval_fn: Callable[[nnx.Module, int], dict[str, float]] | None = None,
  method: Method | None = None,
) -> tuple[TrainState, metrics_lib.History]:
  """Trains a language model end to end (resuming if a checkpoint exists).

  Args:
    model_cfg: :class:`~dataweights.configs.lm.ModelConfig`.
    train_cfg: :class:`~dataweights.configs.train.TrainConfig`; set
      ``checkpoint_dir`` for checkpoints and resume.
    batches: a sampler (``get_state``/``set_state``), ``batch_fn(step)`` or
      an iterator of batches (see the module docstring).
    mesh: device mesh, or None for one device.
    resume: continue from the latest checkpoint if there is one.
    loss_fn: per-example loss (default next-token cross-entropy).
    domain_names: names of the domains for ``loss/domain/{name}`` metrics.
    extra: extra state carried and checkpointed with the run.
    eval_fn: optional ``eval_fn(model, step) -> dict`` (every ``eval_every``).
    method: a data-selection method (see :mod:`dataweights.train.method`).

  Returns:
    ``(state, history)``: the final :class:`TrainState` and the
    :class:`~dataweights.metrics.History`. Rebuild the model with
    :func:`lm_from_state`.

  Raises:
    NonFiniteError: NaN/inf during training (last good checkpoint kept).
    CheckpointError: an unusable checkpoint in ``checkpoint_dir``.
  """
  trainer = Trainer(
    model_cfg,
    train_cfg,
    mesh=mesh,
    loss_fn=loss_fn,
    domain_names=None if domain_names is None else list(domain_names),
    extra=extra,
    method=method,
  )
  try:
    return trainer.run(batches, resume=resume, eval_fn=eval_fn)
  finally:
    trainer.close()


def lm_from_state(model_cfg: Any, state: TrainState) -> nnx.Module:
  """The :class:`Transformer` with ``state``'s parameters."""
  from dataweights.models.transformer import Transformer

  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
  return nnx.merge(graphdef, state.params, state.model_state)
