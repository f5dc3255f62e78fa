"""A jaxpr pass on the gradient program: no-op ``reduce_precision`` removed.

``jax.checkpoint`` (the model's per-block remat, ``ModelConfig.remat``)
splits each block into a forward part that keeps residuals and a backward
part that recomputes the rest. When it does, JAX wraps every saved float
residual in ``reduce_precision(x, exponent_bits=finfo.nexp,
mantissa_bits=finfo.nmant)`` of its own dtype (jax PR #22244,
``ad_checkpoint._insert_reduce_precision``). The forward and the backward
recomputation then see the same bits when XLA computes a narrow dtype such as
bfloat16 in excess precision.

For float32 and float64 the operation maps every finite and infinite value
to itself: it rounds to the dtype's own mantissa and clamps to its own exponent
range. XLA's GPU pipeline removes such no-ops (``enable_remove_no_op_reduce_
precision``); XLA:CPU keeps them. At the book shape the 12 residuals of the
4-layer model become ``reduce-precision`` instructions in 76 places of the
compiled gradient program (fused into their consumers, plus a separate copy
of each residual). Without them the forward+backward is 4.6% faster at the
book shape and 0-3% at 2-12 layers, the train step 1.9% (paired medians,
``benchmarks/bench_lm_train.py``, variant ``keep_reduce_precision``;
``benchmarks/results/lm_train_run4.json``).

:func:`drop_noop_reduce_precision` traces a function to a jaxpr, removes those
operations for float32/float64 values (in nested jaxprs too: ``jit``,
``scan``, ``cond``, ``remat``, ...) and evaluates the result in the caller's
trace. Narrower dtypes keep theirs, and so does any ``reduce_precision`` that
changes values. The removed operations return their inputs, so only XLA's
fusion decisions change: the book model's gradients came out bitwise the
same here (``tests/test_jaxpr_passes.py`` holds the smoke model's to 1e-6
of each leaf's largest entry, against float64 closed forms elsewhere).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

# Dtypes for which reduce_precision to the dtype's own format is the identity
# and no backend computes in excess precision.
_IDENTITY_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float64)})


def is_noop_reduce_precision(eqn: jcore.JaxprEqn) -> bool:
  """Whether ``eqn`` is ``reduce_precision`` of f32/f64 to its own format."""
  if eqn.primitive is not prims.reduce_precision_p:
    return False
  dtype = np.dtype(eqn.invars[0].aval.dtype)
  if dtype not in _IDENTITY_DTYPES:
    return False
  info = np.finfo(dtype)
  return (
    eqn.params["exponent_bits"] == info.nexp
    and eqn.params["mantissa_bits"] == info.nmant
  )


def _rewrite_param(value: Any, memo: dict) -> Any:
  if isinstance(value, jcore.ClosedJaxpr):
    key = id(value)
    if key not in memo:
      memo[key] = (value, value.replace(jaxpr=_strip(value.jaxpr, memo)))
    return memo[key][1]
  if isinstance(value, jcore.Jaxpr):
    return _strip(value, memo)
  if isinstance(value, tuple) and any(
    isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)) for v in value
  ):
    return tuple(_rewrite_param(v, memo) for v in value)
  return value


def _strip(jaxpr: jcore.Jaxpr, memo: dict) -> jcore.Jaxpr:
  """``jaxpr`` with every no-op reduce_precision replaced by its input."""
  alias: dict = {}

  def sub(v):
    return alias.get(v, v) if isinstance(v, jcore.Var) else v

  eqns = []
  for eqn in jaxpr.eqns:
    invars = [sub(v) for v in eqn.invars]
    if is_noop_reduce_precision(eqn):
      alias[eqn.outvars[0]] = invars[0]
      continue
    params = {k: _rewrite_param(v, memo) for k, v in eqn.params.items()}
    eqns.append(eqn.replace(invars=invars, params=params))
  return jaxpr.replace(eqns=eqns, outvars=[sub(v) for v in jaxpr.outvars])


def drop_noop_reduce_precision(fn: Callable) -> Callable:
  """``fn`` with the no-op float32/float64 ``reduce_precision`` removed.

  ``fn`` takes and returns pytrees of arrays (like ``jax.value_and_grad`` of
  a loss). The wrapper traces it with ``jax.make_jaxpr`` at each call (under
  an outer ``jit`` that is once per compilation), rewrites the jaxpr and
  evaluates it in the caller's trace, so it composes with ``jit``, ``vmap``,
  ``scan`` and sharding constraints like ``fn`` itself.

  Args:
    fn: the function, typically a gradient of a rematerialised model.

  Returns:
    A function with the same signature and the same values.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    # A new function object per call: make_jaxpr caches traces by function
    # and argument types, and would otherwise reuse a trace made under other
    # trace-time state (e.g. lisa.fixed_blocks' active set).
    def fresh(*a, **k):
      return fn(*a, **k)

    closed, out_shape = jax.make_jaxpr(fresh, return_shape=True)(
      *args, **kwargs
    )
    stripped = closed.replace(jaxpr=_strip(closed.jaxpr, {}))
    flat_out = jcore.jaxpr_as_fun(stripped)(*jax.tree.leaves((args, kwargs)))
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat_out)

  return wrapped
