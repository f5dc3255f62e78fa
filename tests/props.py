"""Shared hypothesis strategies for the property-based tests (test_props_*).

The property every public entry point must have: random values and shapes
either work or raise the project's documented error type with the field or
argument named; never a raw TypeError/IndexError from deep inside a
library, never NaN output from finite input.

Settings: no example database and no deadline (the profiles in
tests/conftest.py); each test sets a modest ``max_examples`` through
:func:`examples`, derandomized so that CI runs the same cases every time;
under ``HYPOTHESIS_PROFILE=explore`` the cases are random and 10x as many.
"""

from __future__ import annotations

import math
import os

from hypothesis import event, settings
from hypothesis import strategies as st

SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else 1


def examples(n: int) -> settings:
  """``n`` derandomized examples; x10 random ones under the explore profile."""
  return settings(max_examples=n * SCALE, derandomize=SCALE == 1)


# Strings some fields accept, so random choices sometimes hit valid ones.
KNOWN_STRINGS = (
  "smoke",
  "book",
  "paper",
  "adamw",
  "adam",
  "sgd",
  "constant",
  "cosine",
  "inverse_sqrt",
  "float32",
  "bfloat16",
  "pack",
  "pad",
  "eg",
  "pgd",
  "forward",
  "reverse",
  "workclass",
  "race",
  "localhost:1234",
  "",
)

scalars = st.one_of(
  st.none(),
  st.booleans(),
  st.integers(-1000, 1000),  # bounded: sizes drawn from here get allocated
  st.floats(allow_nan=True, allow_infinity=True),
  st.text(max_size=4),
  st.sampled_from(KNOWN_STRINGS),
  st.binary(max_size=3),
)

#: Any JSON-ish value: scalars, short lists, tuples, dicts.
anything = st.recursive(
  scalars,
  lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=3), inner, max_size=2),
  ),
  max_leaves=5,
)

#: JSON values (what a config.json can hold).
json_values = st.recursive(
  st.none()
  | st.booleans()
  | st.integers(-(2**40), 2**40)
  | st.floats(allow_nan=False)
  | st.text(max_size=4)
  | st.sampled_from(KNOWN_STRINGS),
  lambda inner: (
    st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3), inner, max_size=2)
  ),
  max_leaves=4,
)

small_ints = st.integers(-3, 40)
int_like = st.one_of(
  small_ints,
  st.integers(-(10**6), 10**6),
  st.booleans(),
  st.floats(-5, 50),
  anything,
)
float_like = st.one_of(
  st.floats(-2, 2),
  st.floats(0, 1),
  st.floats(allow_nan=True, allow_infinity=True),
  st.integers(-5, 5),
  st.booleans(),
  anything,
)
int_tuple = st.one_of(
  st.lists(small_ints, min_size=0, max_size=5).map(tuple),
  st.lists(small_ints, min_size=1, max_size=4).map(
    lambda v: tuple(sorted(set(v)))
  ),
  st.lists(st.one_of(small_ints, st.booleans(), st.floats(0, 9)), max_size=3),
  anything,
)
float_tuple = st.one_of(
  st.lists(st.floats(-1, 3), max_size=4).map(tuple),
  st.lists(
    st.one_of(st.floats(), st.integers(-2, 3), st.booleans()), max_size=3
  ),
  anything,
)
float3 = st.one_of(
  st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
  st.just((0.8, 0.1, 0.1)),
  st.lists(
    st.one_of(
      st.floats(allow_nan=True), st.integers(-1, 2), st.text(max_size=1)
    ),
    max_size=4,
  ).map(tuple),
  anything,
)


#: Values that break naive checks (bools are ints, NaN compares False, ...).
adversarial = st.sampled_from(
  [
    True,
    False,
    math.nan,
    math.inf,
    -math.inf,
    -1,
    0,
    0.5,
    -0.0,
    10**18,
    "",
    "1",
    None,
    (),
    [],
  ]
)


def near(default) -> st.SearchStrategy:
  """The default with one part replaced by an adversarial value."""
  if isinstance(default, tuple) and default:
    return (
      st.tuples(st.integers(0, len(default) - 1), adversarial).map(
        lambda ia: default[: ia[0]] + (ia[1],) + default[ia[0] + 1 :]
      )
      | st.just(list(default))
      | st.just(default[:-1])
      | st.just(default * 2)
    )
  return adversarial


def value_for(annotation: str, default=None) -> st.SearchStrategy:
  """Random values for a dataclass field with this type annotation.

  Args:
    annotation: the field's type annotation (a string).
    default: the field's default; its near variants are drawn too.
  """
  table = {
    "int": int_like,
    "float": float_like,
    "bool": st.one_of(st.booleans(), anything),
    "str": st.one_of(st.sampled_from(KNOWN_STRINGS), anything),
    "str | None": st.one_of(
      st.none(), st.sampled_from(KNOWN_STRINGS), anything
    ),
    "int | None": st.one_of(st.none(), int_like),
    "tuple[int, ...]": int_tuple,
    "tuple[float, float, float]": float3,
    "tuple[float, ...]": float_tuple,
    "tuple[str, ...]": st.one_of(
      st.lists(
        st.sampled_from(KNOWN_STRINGS) | st.text(max_size=3), max_size=3
      ).map(tuple),
      anything,
    ),
  }
  if annotation not in table:
    raise KeyError(f"no strategy for annotation {annotation!r}")
  return st.one_of(table[annotation], near(default))


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return (
    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  )


def conforms(value, annotation: str) -> bool:
  """Whether an accepted field value has its annotated type (finite floats)."""
  checks = {
    "int": _is_int,
    "float": _is_real,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "str | None": lambda v: v is None or isinstance(v, str),
    "int | None": lambda v: v is None or _is_int(v),
    "tuple[int, ...]": lambda v: isinstance(v, tuple) and all(map(_is_int, v)),
    "tuple[float, ...]": lambda v: (
      isinstance(v, tuple) and all(map(_is_real, v))
    ),
    "tuple[float, float, float]": lambda v: (
      isinstance(v, tuple) and len(v) == 3 and all(map(_is_real, v))
    ),
    "tuple[str, ...]": lambda v: (
      isinstance(v, tuple) and all(isinstance(x, str) for x in v)
    ),
  }
  return checks[annotation](value)


@st.composite
def faulty_args(draw, valid: dict, bad: dict, max_faults: int = 2):
  """Keyword arguments drawn valid, then up to ``max_faults`` of them bad.

  Returns:
    ``(kwargs, faulty)``: the arguments and the names made bad. Drawing
    every argument from ``valid | bad`` would make almost every case an
    error; this way most cases run (shrinking goes to no fault) and each
    fault is attributable.
  """
  kwargs = {k: draw(v, label=k) for k, v in valid.items()}
  faulty = draw(
    st.lists(st.sampled_from(sorted(bad)), max_size=max_faults, unique=True),
    label="faulty",
  )
  for k in faulty:
    kwargs[k] = draw(bad[k], label=f"bad {k}")
  return kwargs, faulty


def outcome(kind: str) -> None:
  """Records how a case ended (counted in --hypothesis-show-statistics)."""
  event(f"outcome: {kind}")
