"""Token ids outside ``[0, vocab_size)`` never become silently wrong numbers.

Left alone, JAX's indexing hides them: an id ``>= V`` makes ``jnp.take``
return NaN embeddings (and attention spreads the NaN to every logit of the
sequence, earlier positions included), and a negative id counts from the
end (``-1`` silently becomes the last token). :func:`check_token_ids` is
called where ids enter:

* **host side**, on numpy data before it reaches a device: the training
  loop's :meth:`~dataweights.train.loop.Trainer.put_batch` checks every
  batch from the data pipeline. The error names the id, its position and the
  vocabulary size.
* **the model's public entry points**
  (:class:`~dataweights.models.transformer.Transformer` ``__call__`` for its
  input ids, :func:`~dataweights.models.transformer.per_token_loss` for the
  targets):

  - concrete arrays (eager calls): the same host check;
  - traced arrays (inside ``jit``, ``grad``, ``vmap``, ``scan``): an
    in-graph check. Two fused reductions (``min`` and ``max`` of the ids)
    feed a ``lax.cond`` whose true branch calls a host callback
    (``jax.debug.callback``) that raises :class:`TokenIdError`. When every
    id is valid the branch is not taken: no host transfer, no callback, so
    the jitted training step is not slowed beyond measurement noise
    (``benchmarks/bench_lm_input_checks.py``, book-size LM on 2 shared CPU
    cores: process CPU time per step +0.6% to +2% against no check, the
    same order as the round-to-round noise). A bad id stops the computation
    with a ``jax.errors.JaxRuntimeError`` whose message ends with the
    :class:`TokenIdError` text (id and vocabulary size). Under ``vmap``, XLA
    evaluates both branches, so the callback runs once per mapped element
    and raises only for one whose ids are out of range.

``checkify`` was not used: a ``checkify.check`` inside the model would make
every plain ``jax.jit`` of it fail to trace unless callers wrap it in
``checkify.checkify``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class TokenIdError(ValueError):
  """A token id outside ``[0, vocab_size)`` or a non-integer id array."""


def _message(bad_id: int, vocab_size: int, name: str, where: str = "") -> str:
  return (
    f"{name} holds token id {bad_id}{where}, outside the vocabulary: allowed "
    f"ids are 0..{vocab_size - 1} (vocab_size = {vocab_size})"
  )


def _report(lo: Any, hi: Any, *, vocab_size: int, name: str) -> None:
  """Host callback: raises if ``lo < 0`` or ``hi >= vocab_size``.

  Under ``vmap`` the arguments are per element (or batched); any element
  out of range raises.
  """
  lo_N = np.atleast_1d(np.asarray(lo)).reshape(-1)
  hi_N = np.atleast_1d(np.asarray(hi)).reshape(-1)
  for lo_i, hi_i in zip(lo_N.tolist(), hi_N.tolist(), strict=True):
    if hi_i >= vocab_size:
      raise TokenIdError(_message(hi_i, vocab_size, name))
    if lo_i < 0:
      raise TokenIdError(_message(lo_i, vocab_size, name))


def check_token_ids(
  ids: Any, vocab_size: int, name: str = "tokens_BxL"
) -> None:
  """Raises unless every id is an integer in ``[0, vocab_size)``.

  Args:
    ids: an integer array (numpy, JAX, or a tracer under a transformation).
    vocab_size: V.
    name: the argument's name, for the message.

  Raises:
    TokenIdError: non-integer dtype, or an id out of range (concrete ids:
      raised here, naming the id, its position and V; traced ids: raised by
      the host callback when the computation runs, see the module doc).
  """
  dtype = getattr(ids, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TokenIdError(
      f"{name} must hold integer token ids in [0, {vocab_size}); got "
      f"{'dtype ' + str(dtype) if dtype is not None else type(ids).__name__}"
    )
  if isinstance(ids, jax.core.Tracer):
    if ids.size == 0:
      return
    lo, hi = jnp.min(ids), jnp.max(ids)
    report = functools.partial(_report, vocab_size=vocab_size, name=name)
    jax.lax.cond(
      (lo < 0) | (hi >= vocab_size),
      lambda lo, hi: jax.debug.callback(report, lo, hi),
      lambda lo, hi: None,
      lo,
      hi,
    )
    return
  arr = np.asarray(ids)
  bad = (arr < 0) | (arr >= vocab_size)
  if bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    raise TokenIdError(
      _message(int(arr[pos]), vocab_size, name, f" at position {list(pos)}")
    )
