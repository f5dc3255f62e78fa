"""Byte tokenizer: exact round trip, ids, errors."""

import numpy as np
import pytest

from dataweights.configs import lm
from dataweights.data import tokenize as tok


@pytest.mark.parametrize(
  "text",
  [
    b"",
    b"hello",
    bytes(range(256)),
    "ünïcödé ✓ 漢字".encode(),
    b"\x00\xff" * 7,
  ],
)
def test_round_trip_bytes(text):
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.shape == (len(text) + 2,)
  assert ids[0] == tok.BOS_ID and ids[-1] == tok.EOS_ID
  # Byte ids are the byte values themselves.
  np.testing.assert_array_equal(ids[1:-1], np.frombuffer(text, np.uint8))
  assert tok.decode(ids) == text


def test_str_is_utf8_and_uint8_arrays_are_raw_bytes():
  assert tok.decode(tok.encode("naïve")) == "naïve".encode()
  img = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
  np.testing.assert_array_equal(tok.encode(img)[1:-1], np.arange(12))
  assert tok.decode(tok.encode(np.bytes_(b"ab"))) == b"ab"


def test_special_ids_are_distinct_from_bytes_and_fit_the_model_vocab():
  specials = [tok.PAD_ID, tok.BOS_ID, tok.EOS_ID]
  assert len(set(specials)) == 3
  assert all(tok.NUM_BYTES <= s < tok.VOCAB_SIZE for s in specials)
  assert tok.VOCAB_SIZE == lm.BYTE_VOCAB_SIZE


def test_decode_drops_specials_and_split_documents_inverts_packing():
  docs = [b"ab", b"", b"xyz"]
  stream = np.concatenate([tok.encode(d) for d in docs] + [[tok.PAD_ID] * 3])
  assert tok.decode(stream) == b"abxyz"
  assert tok.split_documents(stream) == docs
  # An unterminated tail (a document cut by the end of a row) is kept.
  assert tok.split_documents(stream[:-5]) == [b"ab", b"", b"xy"]


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(TypeError, match="float.*allowed are bytes, str"):
    tok.encode(3.5)
  with pytest.raises(TypeError, match="dtype float32"):
    tok.encode(np.zeros(3, np.float32))
  with pytest.raises(
    ValueError, match=r"token id 264 is out of range.*0\.\.263"
  ):
    tok.decode([1, 264])
  with pytest.raises(ValueError, match="token id -1"):
    tok.decode([-1])
