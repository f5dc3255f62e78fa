"""Train a small byte-level LM on the offline text data, with checkpoints.

  python -m dataweights.train.example --profile smoke      # seconds
  python -m dataweights.train.example --profile book       # a few minutes

Uses the prepared ``dw_text_domains`` data set if it is there
(``python -m dataweights.data.prepare --only dw_text_domains``), mixing the
domains in proportion to their size; otherwise it says so and trains on
synthetic bytes (a small deterministic byte language, so the loss still
falls). Checkpoints go to ``--checkpoint-dir``; run the command again and it
resumes where it stopped (``--fresh`` starts over). Interrupt it with Ctrl-C
at any time: nothing already saved is lost.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dataweights.configs import lm
from dataweights.configs import train as train_configs


class SyntheticBytes:
  """A resumable stream of byte sequences from a tiny fixed 'language'.

  Each row concatenates words drawn from a fixed vocabulary of byte strings;
  row ``b`` of step ``s`` depends only on ``(seed, s, b)``. Two domains:
  lower-case words (id 0) and upper-case words (id 1).
  """

  WORDS = [
    w.encode()
    for w in (
      "the data weights learn which examples matter for the target domain "
      "while training a small language model on bytes"
    ).split()
  ]

  def __init__(self, batch_size: int, seq_len: int, seed: int = 0):
    self.batch_size, self.seq_len, self.seed, self.step = (
      batch_size,
      seq_len,
      seed,
      0,
    )

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    tokens = np.zeros((self.batch_size, self.seq_len), np.int32)
    domain = np.zeros(self.batch_size, np.int32)
    for b in range(self.batch_size):
      rng = np.random.default_rng([self.seed, self.step, b])
      domain[b] = rng.integers(0, 2)
      out = b""
      while len(out) < self.seq_len:
        word = self.WORDS[rng.integers(len(self.WORDS))]
        out += (word.upper() if domain[b] else word) + b" "
      tokens[b] = np.frombuffer(out[: self.seq_len], np.uint8)
    self.step += 1
    return {
      "tokens_BxL": tokens,
      "mask_BxL": np.ones_like(tokens, dtype=bool),
      "domain_B": domain,
    }

  def get_state(self) -> dict[str, Any]:
    return {"seed": self.seed, "step": self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    self.seed, self.step = int(state["seed"]), int(state["step"])


def text_sampler(profile: str, data_dir: str | None, synthetic: bool):
  """(sampler, domain names, description) for the run."""
  from dataweights.data import pipeline

  pipe = pipeline.pipeline(profile)
  if not synthetic:
    from dataweights.data import build

    problems = build.verify("dw_text_domains", data_dir)
    if not problems:
      from dataweights.data import mixture

      domains = pipeline.prepared_domains("train", data_dir=data_dir)
      sampler = mixture.train_sampler(domains, pipe)
      names = [d.name for d in domains]
      return sampler, names, f"offline text data ({', '.join(names)})"
    print(
      "[example] the offline text data is not prepared "
      f"({problems[0]}); run `python -m dataweights.data.prepare --only "
      "dw_text_domains` to use it. Training on SYNTHETIC bytes instead.",
      file=sys.stderr,
    )
  return (
    SyntheticBytes(pipe.batch_size, pipe.seq_len, pipe.seed),
    ["lower", "upper"],
    "synthetic bytes",
  )


def main(argv: list[str] | None = None) -> int:
  """Trains (or resumes); returns the exit code.

  Exit codes: 0 done; 1 a checkpoint that is corrupt or does not match this
  run (the message names ``--fresh``), or a non-finite loss; 2 bad
  arguments; 130 interrupted (the last checkpoint is kept).
  """
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  ap.add_argument(
    "--profile", default="smoke", choices=["smoke", "book", "paper"]
  )
  ap.add_argument(
    "--steps", type=int, default=None, help="updates (default: the profile's)"
  )
  ap.add_argument(
    "--checkpoint-dir",
    default=None,
    help="default: <tmp>/dataweights_lm_example_<profile>",
  )
  ap.add_argument(
    "--fresh", action="store_true", help="delete existing checkpoints first"
  )
  ap.add_argument(
    "--synthetic",
    action="store_true",
    help="train on synthetic bytes even if data is prepared",
  )
  ap.add_argument("--data-dir", default=None)
  args = ap.parse_args(argv)

  from dataweights.data import pipeline
  from dataweights.train.loop import train_lm

  ckpt = Path(
    args.checkpoint_dir
    or Path(tempfile.gettempdir()) / f"dataweights_lm_example_{args.profile}"
  )
  if args.fresh and ckpt.exists():
    shutil.rmtree(ckpt)
  pipe = pipeline.pipeline(args.profile)
  model_cfg = lm.lm_model(args.profile, max_len=pipe.seq_len - 1)
  overrides = dict(batch_size=pipe.batch_size, checkpoint_dir=str(ckpt))
  if args.steps is not None:
    overrides["steps"] = args.steps
  if args.profile == "smoke":
    overrides.update(steps=args.steps or 40, checkpoint_every=20)
  train_cfg = train_configs.train(args.profile, **overrides)
  sampler, names, what = text_sampler(
    args.profile, args.data_dir, args.synthetic
  )
  print(
    f"[example] {args.profile}: {model_cfg.num_layers} layers, width "
    f"{model_cfg.d_model}, context {model_cfg.max_len}; {train_cfg.steps} "
    f"steps of {train_cfg.batch_size} sequences on {what}; checkpoints in "
    f"{ckpt} (run again to resume)"
  )
  from dataweights.checkpoint import CheckpointError, CheckpointManager
  from dataweights.train.loop import NonFiniteError

  try:
    if ckpt.exists() and (done := CheckpointManager(ckpt).latest_step()):
      print(f"[example] resuming from the checkpoint at step {done}")
    state, history = train_lm(
      model_cfg, train_cfg, sampler, domain_names=names
    )
  except CheckpointError as e:
    print(
      f"error: {e}\n  to start over: add --fresh (deletes {ckpt}), or "
      "choose another --checkpoint-dir",
      file=sys.stderr,
    )
    return 1
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    last = CheckpointManager(ckpt).latest_step() if ckpt.exists() else None
    where = f"step {last}" if last else "the start (no checkpoint yet)"
    print(
      f"error: interrupted; run the same command again to resume from {where}",
      file=sys.stderr,
    )
    return 130
  steps, losses = history.series("loss")
  if steps:
    print(
      f"[example] loss {losses[0]:.3f} (step {steps[0]}) -> "
      f"{losses[-1]:.3f} (step {steps[-1]}); uniform over bytes would be "
      f"{np.log(256):.3f} nats"
    )
    last = history.last()
    per = {
      n: last[f"loss/domain/{n}"]
      for n in names
      if last.get(f"count/domain/{n}", 0) > 0
    }
    print(
      "[example] last batch, per domain present: "
      + ", ".join(f"{n}={v:.3f}" for n, v in per.items())
    )
  print(f"[example] done at step {int(state.step)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
