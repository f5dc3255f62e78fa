"""Training: optax factories, train state, the jitted step, the host loop.

``train_lm`` trains a byte-level LM from configs, with gradient accumulation,
per-domain losses, a NaN/inf guard, Orbax checkpoints and exact resume; see
``python -m dataweights.train.example --profile smoke``.
"""

from dataweights.train.loop import (
  NonFiniteError,
  Trainer,
  lm_from_state,
  train_lm,
)
from dataweights.train.optim import make_optimizer, make_schedule
from dataweights.train.state import TrainState, abstract_state, init_train_state
from dataweights.train.step import jit_train_step, lm_loss, make_train_step

__all__ = [
  "NonFiniteError", "TrainState", "Trainer", "abstract_state", "init_train_state",
  "jit_train_step", "lm_from_state", "lm_loss", "make_optimizer",
  "make_schedule", "make_train_step", "train_lm",
]
