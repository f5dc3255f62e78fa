"""Property tests of the data entry points: tokenizer, packing, sources, mixture.

Random values and shapes either work, with the documented invariants, or
raise the documented error type (``ValueError``, ``ConfigError``, or
``TypeError`` for a value that cannot be tokenised) naming the argument or
field; never a raw ``TypeError``/``IndexError``/``KeyError`` from inside
numpy or Python, never silently wrong data (a negative index wrapping
around, a float label truncated, weights that overflow to zero).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataweights.configs.base import ConfigError
from dataweights.data import mixture, pipeline, tokenize
from dataweights.data.pipeline import DomainSource
from props import anything, examples, faulty_args, outcome

V = tokenize.VOCAB_SIZE
documents = st.one_of(
  st.binary(max_size=12),
  st.text(max_size=8),
  st.lists(st.integers(0, 255), max_size=8).map(
    lambda v: np.asarray(v, np.uint8)
  ),
)


# --- tokenizer --------------------------------------------------------------


@examples(60)
@given(value=documents | anything)
def test_encode_roundtrips_or_refuses_the_type(value):
  try:
    raw = tokenize.to_bytes(value)
  except TypeError as e:
    outcome("TypeError")
    assert "allowed are bytes, str" in str(e)
    with pytest.raises(TypeError, match="allowed are"):
      tokenize.encode(value)
    return
  outcome("encoded")
  ids = tokenize.encode(value)
  assert ids.dtype == np.int32 and ids[0] == tokenize.BOS_ID
  assert ids[-1] == tokenize.EOS_ID and ((ids >= 0) & (ids < V)).all()
  assert tokenize.decode(ids) == raw
  assert tokenize.split_documents(ids) == [raw]


@examples(60)
@given(tokens=st.lists(st.integers(-3, V + 3), max_size=10) | anything)
def test_decode_and_split_return_bytes_or_name_the_id(tokens):
  for fn in (tokenize.decode, tokenize.split_documents):
    try:
      out = fn(tokens)
    except ValueError as e:
      outcome(f"{fn.__name__}: ValueError")
      assert "token id" in str(e), str(e)
      continue
    outcome(f"{fn.__name__}: ok")
    assert isinstance(out, bytes) or all(isinstance(d, bytes) for d in out)


# --- packing ------------------------------------------------------------------

encoded_docs = st.lists(
  st.lists(st.integers(0, V - 1), max_size=9).map(
    lambda v: np.asarray(v, np.int32)
  ),
  max_size=5,
)


@examples(60)
@given(
  docs=encoded_docs,
  case=faulty_args(
    dict(
      seq_len=st.integers(1, 12), packing=st.sampled_from(pipeline.PACKINGS)
    ),
    dict(seq_len=st.integers(-1, 0) | anything, packing=anything),
  ),
)
def test_pack_documents_keeps_every_token_or_names_the_argument(docs, case):
  kwargs, faulty = case
  seq_len, packing = kwargs["seq_len"], kwargs["packing"]
  try:
    tokens, mask = pipeline.pack_documents(docs, seq_len, packing)
  except ConfigError as e:
    outcome("ConfigError")
    assert "seq_len" in str(e) or "packing" in str(e), str(e)
    assert faulty, str(e)
    return
  outcome("packed")
  assert tokens.shape == mask.shape and tokens.shape[1] == seq_len
  assert (tokens[~mask] == tokenize.PAD_ID).all()
  want = np.concatenate([np.zeros(0, np.int32), *docs])
  np.testing.assert_array_equal(tokens[mask], want)  # order kept, nothing lost
  assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding


# --- domain sources ------------------------------------------------------------

record = st.one_of(
  st.fixed_dictionaries({"text": documents}),
  st.dictionaries(
    st.sampled_from(["text", "body", "domain"]), anything, max_size=2
  ),
  documents,
)


@examples(60)
@given(
  records=st.lists(record, max_size=4),
  indices=st.none() | st.lists(st.integers(-5, 5), max_size=4) | anything,
  in_memory=st.booleans(),
)
def test_domain_source_reads_its_records_or_names_the_problem(
  records, indices, in_memory
):
  try:
    src = DomainSource("d", records, indices, in_memory=in_memory)
    docs = [src[i] for i in range(len(src))]
  except ValueError as e:
    outcome("ValueError")
    assert "indices" in str(e) or "no documents" in str(e), str(e)
    return
  except KeyError as e:
    outcome("KeyError")
    assert "'text'" in str(e), str(e)
    return
  except TypeError as e:
    outcome("TypeError")
    assert "cannot tokenise" in str(e) and "'text'" in str(e), str(e)
    return
  outcome("read")
  rows = range(len(records)) if indices is None else indices
  want = [
    tokenize.encode(
      records[i]["text"] if isinstance(records[i], dict) else records[i]
    )
    for i in rows
  ]
  assert len(docs) == len(want)
  for got, w in zip(docs, want, strict=True):
    np.testing.assert_array_equal(got, w)


@examples(40)
@given(
  labels=st.lists(st.integers(0, 3), min_size=1, max_size=6),
  bad=st.none()
  | st.tuples(
    st.integers(0, 5),
    st.floats(-1, 3) | st.booleans() | st.integers(-3, -1) | anything,
  ),
  names=st.none() | st.just(["a", "b", "c", "d"]) | st.just(["a"]),
)
def test_group_by_domain_splits_by_integer_labels_or_names_the_record(
  labels, bad, names
):
  if bad is not None:
    labels[bad[0] % len(labels)] = bad[1]
  records = [{"text": f"doc{i}", "domain": lab} for i, lab in enumerate(labels)]
  try:
    sources = pipeline.group_by_domain(records, names=names)
  except ValueError as e:
    outcome("ValueError")
    assert "domain" in str(e) and ("record" in str(e) or "label" in str(e)), e
    return
  outcome("grouped")
  assert all(
    isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in labels
  )
  assert sum(len(s) for s in sources) == len(records)


# --- mixture sampler -----------------------------------------------------------


def _domains(k=3):
  return [
    DomainSource(f"d{j}", [{"text": b"x" * (j + i)} for i in range(j + 2)])
    for j in range(k)
  ]


DOMAINS = _domains()
NAMES = [d.name for d in DOMAINS]
weights = st.one_of(
  st.lists(st.floats(0, 1e308), min_size=3, max_size=3),
  st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
  st.dictionaries(
    st.sampled_from(NAMES + ["zz"]), st.floats(-1, 5), max_size=3
  ),
  anything,
)


def _check_batch(batch, sampler):
  tok, mask, dom = batch["tokens_BxL"], batch["mask_BxL"], batch["domain_B"]
  assert tok.shape == mask.shape == (sampler.batch_size, sampler.seq_len)
  assert ((tok >= 0) & (tok < V)).all() and (
    tok[~mask] == tokenize.PAD_ID
  ).all()
  assert ((dom >= 0) & (dom < sampler.num_domains)).all()


@examples(60)
@given(
  case=faulty_args(
    dict(
      batch_size=st.integers(1, 5),
      seq_len=st.integers(1, 9),
      seed=st.integers(0, 5),
      stream=st.integers(0, 3),
      packing=st.sampled_from(pipeline.PACKINGS),
      weights=st.none()
      | st.lists(st.floats(0.01, 1e300), min_size=3, max_size=3),
    ),
    dict(
      batch_size=st.integers(-1, 0) | anything,
      seq_len=st.integers(-1, 0) | anything,
      seed=st.integers(-3, -1) | anything,
      stream=st.integers(-3, -1) | anything,
      packing=anything,
      weights=weights,
    ),
  )
)
def test_sampler_construction_validates_or_names_the_argument(case):
  kwargs, faulty = case
  try:
    s = mixture.MixtureSampler(DOMAINS, **kwargs)
  except ValueError as e:
    outcome("ValueError")
    assert any(k in str(e) for k in kwargs), str(e)
    assert faulty, str(e)
    return
  outcome("sampler")
  assert np.isclose(s.weights.sum(), 1) and (s.weights >= 0).all()
  _check_batch(s.next_batch(), s)


@examples(60)
@given(w=weights, steps=st.integers(1, 3))
def test_next_batch_weights_validate_or_name_weights(w, steps):
  s = mixture.MixtureSampler(DOMAINS, batch_size=4, seq_len=6)
  before = s.get_state()
  try:
    for _ in range(steps):
      _check_batch(s.next_batch(w), s)
  except ValueError as e:
    outcome("ValueError")
    assert "weight" in str(e), str(e)
    assert s.get_state() == before  # left unchanged
    return
  outcome("batches")
  w_K = s.weights
  assert np.isfinite(w_K).all() and np.isclose(w_K.sum(), 1) and w_K.max() > 0


@examples(60)
@given(
  path=st.lists(
    st.sampled_from(["step", "weights", "cursors", "seed", "format"]),
    min_size=1,
    max_size=1,
  ),
  value=anything
  | st.lists(st.lists(st.integers(-2, 9), max_size=3), max_size=4),
  data=st.data(),
)
def test_set_state_of_corrupted_state_names_the_field(path, value, data):
  s = mixture.MixtureSampler(DOMAINS, batch_size=3, seq_len=5)
  s.next_batch()
  state = copy.deepcopy(s.get_state())
  key = path[0]
  if key == "cursors" and data.draw(st.booleans()):
    # Corrupt one cursor only.
    state["cursors"][data.draw(st.integers(0, 2))] = value
  else:
    state[key] = value
  t = mixture.MixtureSampler(DOMAINS, batch_size=3, seq_len=5)
  try:
    t.set_state(state)
  except ValueError as e:
    outcome("ValueError")
    assert key in str(e) or (key == "weights" and "weight" in str(e)), str(e)
    return
  outcome("restored")
  _check_batch(t.next_batch(), t)


@examples(20)
@given(specific=st.sampled_from(NAMES) | anything)
def test_split_specific_names_unknown_domains(specific):
  try:
    generic, target = mixture.split_specific(DOMAINS, specific)
  except ValueError as e:
    assert "unknown domain" in str(e)
    return
  assert target.name == specific and len(generic) == len(DOMAINS) - 1
