"""The chapter's filtering problems: byte-level text and 8x8 digits.

Text (:func:`lm_task`): the generic pool is every prepared text domain but
the target (ten English domains and two natural noise sources: Slovenian
opinions and non-English chat), each drawn in proportion to its bytes; the
specific set is ``specific_train_docs``
documents of the target's training split; held-out sets come from the
validation (fine-tuning's step choice) and test splits. The generic loss is
the mean over the English generic domains of their test loss (noise
domains excluded), each domain weighted equally.

Digits (:func:`image_task`): the generic pool is the MNIST digits mapped
onto the 8x8 UCI grid; the targets are the UCI digits (a real shift),
class subsets (only digits 0-4, of UCI or MNIST) and clean MNIST with the
generic labels corrupted at a known rate.
"""

from __future__ import annotations

import functools

import numpy as np

from dataweights.configs import filtering as fcfg
from dataweights.configs import lm as lm_configs
from dataweights.configs import train as train_configs
from dataweights.data import filter_feed, mixture, pipeline, prepared
from dataweights.data.pipeline import DomainSource
from dataweights.data.sources import corrupt
from dataweights.experiments.ch3.common import Task
from dataweights.models import classifier
from dataweights.models import weighting_net as wn
from dataweights.train.step import lm_loss

NOISE = ("noise_slovenian", "noise_multilingual")
SPLIT_SEED = 0  # which documents / examples form the small specific sets


@functools.lru_cache(maxsize=4)
def _text(split: str) -> dict:
  d = prepared.text_split(split)
  names = prepared.domain_names("dw_text_domains")
  by = {n: [] for n in names}
  for t, k in zip(d["text"], d["domain_M"].tolist()):
    by[names[k]].append(t)
  return by


def _source(name: str, texts: list[str]) -> DomainSource:
  return DomainSource(name, [{"text": t} for t in texts])


def _rows(src: DomainSource, seq_len: int, n: int) -> np.ndarray:
  """``n`` rows spread evenly over the domain's packed documents."""
  docs = [src[i] for i in range(len(src))]
  tokens, _ = pipeline.pack_documents(docs, seq_len, "pack")
  tokens = tokens[:-1] if len(tokens) > 1 else tokens  # last row is padded
  idx = np.unique(
    np.linspace(0, len(tokens) - 1, min(n, len(tokens))).astype(int)
  )
  return tokens[idx]


def _lm_batch(
  tokens_RxL: np.ndarray, domain_R: np.ndarray | None = None
) -> dict:
  out = {
    "tokens_BxL": tokens_RxL.astype(np.int32),
    "mask_BxL": np.ones(tokens_RxL.shape, bool),
  }
  if domain_R is not None:
    out["domain_B"] = domain_R.astype(np.int32)
  return out


def lm_task(cfg: fcfg.FilterLMConfig) -> Task:
  """The language-modelling task of ``cfg`` (see the module docstring)."""
  train, valid, test = _text("train"), _text("validation"), _text("test")
  generic = tuple(n for n in train if n != cfg.target)
  rng = np.random.default_rng(SPLIT_SEED)
  docs = train[cfg.target]
  keep = np.sort(rng.permutation(len(docs))[: cfg.specific_train_docs])
  spec = _source(cfg.target, [docs[i] for i in keep])
  gen_sources = [_source(n, train[n]) for n in generic]
  L = cfg.seq_len
  model = lm_configs.lm_model(
    cfg.profile,
    num_layers=cfg.num_layers,
    d_model=cfg.d_model,
    num_heads=cfg.num_heads,
    d_mlp=cfg.d_mlp,
    max_len=L - 1,
  )
  pipe = dict(
    seq_len=L,
    batch_size=cfg.batch_size,
    downsampling=cfg.downsampling,
    specific_batch_size=cfg.specific_batch_size,
  )

  # The pool as it comes, in bytes: each domain in proportion to its tokens
  # (by documents, the many short tweets and chat lines would dominate).
  tokens_K = np.array([s.num_tokens() for s in gen_sources], np.float64)

  def make_streams(seed):
    p = pipeline.pipeline(cfg.profile, seed=seed, **pipe)
    return mixture.FilterStreams(gen_sources, spec, p, generic_weights=tokens_K)

  def make_finetune(seed):
    return mixture.MixtureSampler(
      [spec], batch_size=cfg.batch_size, seq_len=L, seed=seed, stream=5
    )

  gen_rows, gen_dom = [], []
  for k, n in enumerate(generic):
    r = _rows(_source(n, test[n]), L, cfg.eval_rows)
    gen_rows.append(r)
    gen_dom.append(np.full(len(r), k))
  gen_dom = np.concatenate(gen_dom)
  weights = np.zeros(len(gen_dom))
  for k, n in enumerate(generic):
    if n not in NOISE:
      weights[gen_dom == k] = 1.0 / np.sum(gen_dom == k)
  eval_sets = {
    "spec_test": _lm_batch(
      _rows(_source(cfg.target, test[cfg.target]), L, 4 * cfg.eval_rows)
    ),
    "spec_valid": _lm_batch(
      _rows(_source(cfg.target, valid[cfg.target]), L, 4 * cfg.eval_rows)
    ),
    "gen_test": _lm_batch(np.concatenate(gen_rows), gen_dom),
  }
  # SAR / GAR: references from the training sets, evaluated rows held out.
  spec_ref = _lm_batch(_rows(spec, L, 4 * cfg.eval_rows))
  big = make_streams(10_000)
  gen_ref = _lm_batch(
    np.concatenate([big.next()[0]["tokens_BxL"] for _ in range(4)])
  )
  gen_eval_rows = [
    _rows(_source(n, valid[n]), L, cfg.eval_rows // 2) for n in generic
  ]
  sar = (
    spec_ref,
    gen_ref,
    eval_sets["spec_valid"],
    _lm_batch(np.concatenate(gen_eval_rows)),
  )
  scorer = wn.ScorerConfig(
    modality="bytes",
    embed_dim=cfg.scorer_embed,
    channels=cfg.scorer_channels,
    kernel_size=cfg.scorer_kernel,
  )
  return Task(
    key=(
      "lm",
      cfg.profile,
      cfg.target,
      cfg.specific_train_docs,
      model,
      tuple(sorted(pipe.items())),
      cfg.pretrain_steps,
      cfg.pretrain_lr,
      cfg.steps,
      cfg.learning_rate,
      cfg.warmup_steps,
      cfg.eval_every,
      cfg.eval_rows,
      scorer,
      cfg.finetune_steps,
      cfg.finetune_lr,
      cfg.finetune_eval_every,
    ),
    model_cfg=model,
    model_factory=None,
    loss_fn=lm_loss,
    domain_names=generic,
    make_streams=make_streams,
    make_finetune=make_finetune,
    eval_sets=eval_sets,
    gen_weights=weights,
    train_cfg=lambda seed: _train_cfg(cfg, seed),
    finetune_cfg=lambda seed: _finetune_cfg(cfg, seed),
    scorer=scorer,
    accuracy=False,
    sar_batches=sar,
    pretrain_cfg=lambda seed: _pretrain_cfg(cfg, seed),
  )


def _train_cfg(cfg, seed):
  return train_configs.train(
    cfg.profile,
    batch_size=cfg.batch_size,
    steps=cfg.steps,
    learning_rate=cfg.learning_rate,
    warmup_steps=cfg.warmup_steps,
    schedule="cosine",
    seed=seed,
    eval_every=cfg.eval_every,
    log_every=1,
    checkpoint_dir=None,
    progress=False,
  )


def _pretrain_cfg(cfg, seed):
  if not getattr(cfg, "pretrain_steps", 0):
    return None
  return train_configs.train(
    cfg.profile,
    batch_size=cfg.batch_size,
    steps=cfg.pretrain_steps,
    learning_rate=cfg.pretrain_lr,
    warmup_steps=cfg.warmup_steps,
    schedule="cosine",
    seed=seed,
    log_every=cfg.pretrain_steps,
    checkpoint_dir=None,
    progress=False,
  )


def _finetune_cfg(cfg, seed):
  if cfg.finetune_steps == 0:
    return None
  return train_configs.train(
    cfg.profile,
    batch_size=cfg.batch_size,
    steps=cfg.finetune_steps,
    learning_rate=cfg.finetune_lr,
    warmup_steps=0,
    schedule="constant",
    seed=seed,
    eval_every=cfg.finetune_eval_every,
    log_every=cfg.finetune_steps,
    checkpoint_dir=None,
    progress=False,
  )


@functools.lru_cache(maxsize=1)
def _digits() -> dict:
  out = {}
  for split, d in prepared.digits_arrays().items():
    out[split] = {
      "x": (d["x_MxHxW"].astype(np.float32) / 16.0),
      "y": d["y_M"].astype(np.int32),
      "dom": d["domain_M"].astype(np.int32),
    }
  return out


CLASSES = tuple(str(c) for c in range(10))


def _img(x, y, dom, flag=None) -> dict:
  """An image batch; ``domain_B`` is the (given) label of a generic row, so
  every digits task has the same domains and shares compiled steps;
  ``flag_B`` marks corrupted labels."""
  n = len(y)
  return {
    "x_BxHxW": x,
    "y_B": y.astype(np.int32),
    "domain_B": np.asarray(dom).astype(np.int32),
    "flag_B": np.zeros(n, np.float32)
    if flag is None
    else np.asarray(flag, np.float32),
  }


def image_task(cfg: fcfg.FilterImageConfig) -> Task:
  """The digits task of ``cfg.target`` (see the module docstring)."""
  d = _digits()
  rng = np.random.default_rng(SPLIT_SEED)

  def part(split, domain, classes=None):
    s = d[split]
    keep = s["dom"] == domain
    if classes is not None:
      keep &= s["y"] < classes
    return s["x"][keep], s["y"][keep]

  gx, gy = part("train", 0)
  target = cfg.target
  noisy = target.startswith("noisy_")
  if noisy:
    rate = float(target.split("_")[1])
    gy_noisy, corrupted = corrupt.corrupt_labels(gy, rate, 10, seed=SPLIT_SEED)
    generic = _img(gx, gy_noisy, gy_noisy, corrupted)
    vx, vy = part("validation", 0)
    perm = rng.permutation(len(vy))
    tr, va = perm[: cfg.specific_train], perm[cfg.specific_train :]
    spec_train = (vx[tr], vy[tr])
    spec_valid = (vx[va], vy[va])
    spec_test = part("test", 0)
  else:
    generic = _img(gx, gy, gy, np.zeros(len(gy), bool))
    classes = 5 if target.endswith("0to4") else None
    src = 1 if target.startswith("uci") else 0
    if src == 1:
      tx, ty = part("train", 1, classes)
      perm = rng.permutation(len(ty))[: cfg.specific_train]
      spec_train = (tx[perm], ty[perm])
      spec_valid = part("validation", 1, classes)
    else:
      vx, vy = part("validation", 0, classes)
      perm = rng.permutation(len(vy))
      tr, va = perm[: cfg.specific_train], perm[cfg.specific_train :]
      spec_train, spec_valid = (vx[tr], vy[tr]), (vx[va], vy[va])
    spec_test = part("test", src, classes)
  sx, sy = spec_train
  specific = _img(sx, sy, sy)
  tx_, ty_ = part("test", 0)
  eval_sets = {
    "spec_test": _img(*spec_test, spec_test[1]),
    "spec_valid": _img(*spec_valid, spec_valid[1]),
    "gen_test": _img(tx_, ty_, ty_),
  }
  G = cfg.batch_size * cfg.downsampling

  def make_streams(seed):
    return filter_feed.ArrayStreams(
      generic,
      specific,
      generic_batch_size=G,
      specific_batch_size=cfg.specific_batch_size,
      seed=seed,
    )

  def make_finetune(seed):
    streams = filter_feed.ArrayStreams(
      specific,
      specific,
      generic_batch_size=cfg.batch_size,
      specific_batch_size=1,
      seed=seed + 7919,
    )
    return lambda step: streams.next()[0]

  probe = None
  sub = np.random.default_rng(1).permutation(len(gy))
  if noisy:
    pi = sub[: cfg.probe]
    probe = {
      **{k: v[pi] for k, v in generic.items()},
      "clean_B": generic["flag_B"][pi] == 0,
    }
  gref = {k: v[sub[cfg.probe : cfg.probe + 256]] for k, v in generic.items()}
  geval = {
    k: v[sub[cfg.probe + 256 : cfg.probe + 512]] for k, v in generic.items()
  }
  sar = (specific, gref, eval_sets["spec_valid"], geval)
  model = classifier.ImageMLPConfig(image_pixels=64, hidden=cfg.hidden)
  scorer = wn.ScorerConfig(
    modality="image", image_pixels=64, hidden=cfg.scorer_hidden
  )
  return Task(
    key=(
      "img",
      cfg.profile,
      target,
      cfg.specific_train,
      model,
      cfg.batch_size,
      cfg.downsampling,
      cfg.specific_batch_size,
      cfg.steps,
      cfg.learning_rate,
      cfg.warmup_steps,
      cfg.eval_every,
      scorer,
      cfg.finetune_steps,
      cfg.finetune_lr,
      cfg.finetune_eval_every,
      cfg.probe,
    ),
    model_cfg=model,
    model_factory=classifier.image_mlp,
    loss_fn=classifier.classification_loss,
    domain_names=CLASSES,
    make_streams=make_streams,
    make_finetune=make_finetune,
    eval_sets=eval_sets,
    gen_weights=np.ones(len(ty_)),
    train_cfg=lambda seed: _train_cfg(cfg, seed),
    finetune_cfg=lambda seed: _finetune_cfg(cfg, seed),
    scorer=scorer,
    accuracy=True,
    sar_batches=sar,
    probe=probe,
  )
